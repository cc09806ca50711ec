//! Unauthenticated clients cannot exhaust the gateway: checks 3–7 answer before the body is
//! read, refused bodies are drained (not buffered), slow heads and bodies are cut off at
//! `server.header_timeout` / `server.body_timeout`, and `server.max_connections` keeps
//! descriptors for the admin listener. Through the real binary; figures are printed.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{now, open_fds, rss_mib, Echo, Gateway, Options};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads what arrives within `wait`; stops early once `enough` is seen or the peer closes.
async fn read_for(s: &mut TcpStream, wait: Duration, enough: &str) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(Ok(n)) => {
                out.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&out);
                if !enough.is_empty() && text.contains(enough) {
                    return (text.into_owned(), false);
                }
            }
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false),
        }
    }
}

fn fast_limits(echo: &Echo, extra: &str) -> Options {
    let mut opts = Options::new(echo);
    opts.server_extra = format!("header_timeout = \"1s\"\nbody_timeout = \"1s\"\n{extra}");
    opts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_3_to_7_answer_before_a_byte_of_the_body() {
    let echo = Echo::start().await;
    let gw = Gateway::start(Options::new(&echo)).await;
    let live = gw.mint(json!({})).await;
    let revoked = gw.mint(json!({})).await;
    gw.revoke(&revoked).await;
    let fenced = gw.mint(json!({"ip_allow_list": ["203.0.113.0/24"]})).await;
    let mut unknown = live.clone();
    unknown.public_key = "pk_test_nobodyhasthiskey0000".into();
    let t = "/v1/payments";
    let cases = [
        ("missing_credentials", String::new()),
        (
            "unknown_key",
            support::v1_lines(&unknown, "POST", t, b"", now()),
        ),
        (
            "revoked_key",
            support::v1_lines(&revoked, "POST", t, b"", now()),
        ),
        (
            "ip_not_allowed",
            support::v1_lines(&fenced, "POST", t, b"", now()),
        ),
        (
            "stale_timestamp",
            support::v1_lines(&live, "POST", t, b"", now() - 3600),
        ),
    ];
    for (code, creds) in cases {
        let mut s = TcpStream::connect(gw.proxy).await.unwrap();
        let head =
            format!("POST {t} HTTP/1.1\r\nhost: gw\r\ncontent-length: 1048576\r\n{creds}\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        // Not a byte of the 1 MiB body is sent: the answer comes anyway.
        let (out, _) = read_for(&mut s, Duration::from_secs(5), code).await;
        assert!(out.contains(code), "{code}: {out}");
    }
    assert_eq!(echo.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_body_is_drained_and_the_connection_serves_on() {
    let echo = Echo::start().await;
    let gw = Gateway::start(Options::new(&echo)).await;
    let mut s = TcpStream::connect(gw.proxy).await.unwrap();
    let body = "x".repeat(64 * 1024);
    let first = format!(
        "POST /v1/payments HTTP/1.1\r\nhost: gw\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(first.as_bytes()).await.unwrap();
    let (out, closed) = read_for(&mut s, Duration::from_secs(5), "}").await;
    assert!(out.starts_with("HTTP/1.1 401"), "{out}");
    assert!(!closed);
    s.write_all(b"GET /public/after HTTP/1.1\r\nhost: gw\r\n\r\n")
        .await
        .unwrap();
    let (out, _) = read_for(&mut s, Duration::from_secs(5), "\"echo\":true").await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(
        echo.count(),
        1,
        "only the public request reached the upstream"
    );
}

/// A client that sends a whole oversized body before reading (Python's `http.client`, and so
/// `requests`) reads the 413: keygate answers, then reads and discards the rest before it
/// closes (lingering close), instead of closing under the client's writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_is_answered_413_to_a_client_still_sending() {
    let echo = Echo::start().await;
    let gw = Gateway::start(Options::new(&echo)).await;
    // 8 MiB: more than loopback's socket buffers hold, so the client is still writing when
    // the 413 is sent (with 2 MiB the buffers can swallow the whole body on this machine).
    let body = vec![b'x'; 8 * 1024 * 1024];
    for _ in 0..3 {
        let mut s = TcpStream::connect(gw.proxy).await.unwrap();
        let head = format!(
            "POST /v1/payments HTTP/1.1\r\nhost: gw\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        // Every byte goes out: no reset while the client is still sending.
        s.write_all(&body).await.unwrap();
        let (out, closed) = read_for(&mut s, Duration::from_secs(5), "body_too_large").await;
        assert!(out.starts_with("HTTP/1.1 413"), "{out}");
        let (_, closed_after) = read_for(&mut s, Duration::from_secs(5), "").await;
        assert!(
            closed || closed_after,
            "the connection closes after the 413"
        );
    }
    // The client the defect was found with.
    let script = format!(
        r#"
import http.client, json
c = http.client.HTTPConnection("127.0.0.1", {port}, timeout=10)
c.request("POST", "/v1/payments", body=b"x" * (8 * 1024 * 1024))
r = c.getresponse()
print(r.status, json.loads(r.read())["code"])
"#,
        port = gw.proxy.port()
    );
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args(["-c", &script])
            .output()
            .expect("python3 (scripts/dev installs it)")
    })
    .await
    .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(text.trim(), "413 body_too_large", "{text}");
    assert_eq!(echo.count(), 0);
}

/// Many clients trickling a byte at a time are all cut off; others are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trickled_heads_and_bodies_are_cut_off_at_their_deadlines() {
    const CLIENTS: usize = 40;
    let echo = Echo::start().await;
    let gw = Gateway::start(fast_limits(&echo, "")).await;
    let bearer = gw.mint(json!({"auth": "bearer"})).await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let addr = gw.proxy;
        let secret = bearer.secret.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let opened = Instant::now();
            let (head, body) = if i % 2 == 0 {
                // The head itself, one byte every 200 ms.
                ("GET /public/slow-head HTTP/1.1\r\nhost: gw\r\nx-pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n".to_owned(), String::new())
            } else {
                // A whole authenticated head, then the body one byte every 200 ms.
                (
                    format!("POST /v1/payments HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {secret}\r\ncontent-length: 100\r\n\r\n"),
                    "y".repeat(100),
                )
            };
            let (fast, slow) = if body.is_empty() { (String::new(), head) } else { (head, body) };
            if !fast.is_empty() {
                s.write_all(fast.as_bytes()).await.unwrap();
            }
            let mut closed_after = None;
            for b in slow.bytes() {
                if s.write_all(&[b]).await.is_err() {
                    break;
                }
                let mut probe = [0u8; 512];
                match tokio::time::timeout(Duration::from_millis(200), s.read(&mut probe)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => {
                        closed_after = Some(opened.elapsed());
                        break;
                    }
                    _ => {}
                }
            }
            closed_after.unwrap_or_else(|| opened.elapsed())
        }));
    }
    // Meanwhile a normal client is served.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = gw.send("GET", "/public/meanwhile", &[], b"").await;
    assert_eq!(r.status(), 200);
    let mut longest = Duration::ZERO;
    for t in tasks {
        longest = longest.max(t.await.unwrap());
    }
    eprintln!(
        "{CLIENTS} trickling clients: the longest was held {longest:?} (deadlines 1 s); all done after {:?}",
        started.elapsed()
    );
    // A client trickling for ever would be held 60 s by pingora's per-read timeout alone.
    assert!(longest < Duration::from_secs(5), "held {longest:?}");
    assert_eq!(echo.count(), 1, "no trickled request reached the upstream");
    let heads = gw
        .metric("keygate_connections_closed_total{reason=\"header_timeout\"}")
        .await;
    let bodies = gw
        .metric("keygate_connections_closed_total{reason=\"body_timeout\"}")
        .await;
    assert!(
        heads >= (CLIENTS / 2) as f64,
        "header_timeout closed {heads}"
    );
    assert!(
        bodies >= (CLIENTS / 2) as f64,
        "body_timeout closed {bodies}"
    );
    // The log may be coloured: look for the level alone.
    assert!(
        !gw.log().contains("ERROR"),
        "slow clients are not errors: {}",
        gw.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_flood_leaves_the_admin_listener_reachable() {
    const LIMIT: usize = 50;
    const FLOOD: usize = 400;
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    opts.server_extra = format!("max_connections = {LIMIT}\nheader_timeout = \"3s\"");
    let gw = Gateway::start(opts).await;
    let before = open_fds(gw.pid());
    let mut held = Vec::new();
    for _ in 0..FLOOD {
        let mut s = TcpStream::connect(gw.proxy).await.unwrap();
        let _ = s.write_all(b"G").await;
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = open_fds(gw.pid());
    let health = gw.http.get(gw.admin_url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let closed = gw
        .metric("keygate_connections_closed_total{reason=\"max_connections\"}")
        .await;
    eprintln!(
        "{FLOOD} idle connections, max_connections = {LIMIT}: descriptors {before} before, \
         {during} during; {closed} closed at once"
    );
    assert!(closed >= (FLOOD - LIMIT) as f64, "closed {closed}");
    assert!(
        during <= before + LIMIT + 10,
        "descriptors {before} -> {during}"
    );
    drop(held);
    // Once they are gone, the proxy serves again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(gw.send("GET", "/public/x", &[], b"").await.status(), 200);
}

/// 200 clients each declare a 1 MiB body without credentials and send all but its last byte.
/// Bodies are refused on the headers and drained, never buffered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn withheld_bodies_of_unauthenticated_clients_are_not_buffered() {
    const CLIENTS: usize = 200;
    const BODY: usize = 1024 * 1024;
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    opts.server_extra = "body_timeout = \"5s\"".into();
    let gw = Gateway::start(opts).await;
    let pid = gw.pid();
    let before = rss_mib(pid);
    let mut rounds = Vec::new();
    for _ in 0..2 {
        let mut tasks = Vec::new();
        for _ in 0..CLIENTS {
            let addr = gw.proxy;
            tasks.push(tokio::spawn(async move {
                let chunk = vec![b'z'; 64 * 1024];
                let mut s = TcpStream::connect(addr).await.unwrap();
                let head = format!(
                    "POST /v1/payments HTTP/1.1\r\nhost: gw\r\ncontent-length: {BODY}\r\n\r\n"
                );
                s.write_all(head.as_bytes()).await.unwrap();
                let mut sent = 0;
                while sent < BODY - 1 {
                    let n = chunk.len().min(BODY - 1 - sent);
                    if s.write_all(&chunk[..n]).await.is_err() {
                        break;
                    }
                    sent += n;
                }
                s
            }));
        }
        let mut held = Vec::new();
        for t in tasks {
            held.push(t.await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let during = rss_mib(pid);
        drop(held);
        tokio::time::sleep(Duration::from_secs(2)).await;
        rounds.push((during, rss_mib(pid)));
    }
    let [(during1, after1), (during2, after2)] = [rounds[0], rounds[1]];
    eprintln!(
        "{CLIENTS} withheld 1 MiB bodies, twice: RSS {before:.0} MiB before, {during1:.0} during, \
         {after1:.0} after; second flood {during2:.0} during, {after2:.0} after"
    );
    // Buffered, each flood would hold 200 MiB.
    assert!(
        during1 - before < 100.0,
        "RSS grew {before:.0} -> {during1:.0} MiB"
    );
    // What the first flood left is reused by the second, not added to.
    assert!(
        during2 - after1 < 50.0,
        "RSS grew again {after1:.0} -> {during2:.0} MiB"
    );
    assert_eq!(echo.count(), 0);
}

/// 10,000 clients connect and send nothing. The gateway holds them all (each one's descriptor
/// is counted), answers signed requests and the admin listener meanwhile, and the memory they
/// cost is printed per connection — measured, not asserted (benches/RESULTS.md has the figure).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_idle_connections_leave_the_gateway_serving() {
    const IDLE: usize = 10_000;
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    // Above the default (half the descriptor limit): accepted with a warning.
    opts.server_extra = format!(
        "max_connections = {}\nheader_timeout = \"120s\"",
        IDLE + 500
    );
    let gw = Gateway::start(opts).await;
    let key = gw.mint(json!({})).await;
    // Warm: one request through, so allocations of the first request are not counted below.
    assert_eq!(gw.post(&key, "/v1/payments").await.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (fds_before, rss_before) = (open_fds(gw.pid()), rss_mib(gw.pid()));
    let started = Instant::now();
    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        idle.push(TcpStream::connect(gw.proxy).await.unwrap());
    }
    let opened_in = started.elapsed();
    // Until the gateway has accepted them all.
    let deadline = Instant::now() + Duration::from_secs(30);
    while gw.metric("keygate_open_connections").await < IDLE as f64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let open = gw.metric("keygate_open_connections").await;
    let (fds_during, rss_during) = (open_fds(gw.pid()), rss_mib(gw.pid()));
    // Served meanwhile: signed requests and the admin listener.
    let t = Instant::now();
    for _ in 0..20 {
        assert_eq!(gw.post(&key, "/v1/payments").await.status(), 200);
    }
    let served_in = t.elapsed();
    let health = gw.http.get(gw.admin_url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let per_conn_kib = (rss_during - rss_before) * 1024.0 / IDLE as f64;
    eprintln!(
        "{IDLE} idle connections opened in {opened_in:?}; gateway: open {open}, descriptors \
         {fds_before} -> {fds_during}, RSS {rss_before:.1} -> {rss_during:.1} MiB \
         ({per_conn_kib:.1} KiB per connection); 20 signed requests meanwhile in {served_in:?}"
    );
    assert!(open >= IDLE as f64, "the gateway holds {open} of {IDLE}");
    assert!(
        fds_during >= fds_before + IDLE,
        "descriptors {fds_before} -> {fds_during}"
    );
    // The idle connections were never answered or closed: each is still readable-empty.
    let mut buf = [0u8; 1];
    let probe = tokio::time::timeout(Duration::from_millis(200), idle[0].read(&mut buf)).await;
    assert!(
        probe.is_err(),
        "an idle connection was answered or closed: {probe:?}"
    );
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(30);
    while gw.metric("keygate_open_connections").await > 1.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gw.metric("keygate_open_connections").await <= 1.0);
    assert!(!gw.log().contains("panicked"), "{}", gw.log());
}

/// Without `server.max_connections` the gateway derives it (from the descriptor limit here; a
/// cgroup memory limit can only lower it: `src/sizing.rs` unit tests) and says so at INFO
/// with its source, so an operator can see what a pod was given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_derived_max_connections_is_logged_with_its_source() {
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    opts.launcher = vec!["prlimit".into(), "--nofile=2048:2048".into()];
    opts.rust_log = "info";
    let gw = Gateway::start(opts).await;
    let memory = keygate::sizing::read_memory_limit();
    let (expected, source) = keygate::sizing::default_max_connections(2048, memory, 100_000);
    let log = gw.log();
    let line = log
        .lines()
        .find(|l| l.contains("server.max_connections not set"))
        .unwrap_or_else(|| panic!("no line on the derived limit:\n{log}"));
    eprintln!("{line}");
    assert!(line.contains(" INFO "), "{line}");
    assert!(
        line.contains(&format!("max_connections={expected}")),
        "{line}"
    );
    assert!(line.contains(source.as_str()), "{line}");
}
