//! Fault injection through the real binary, loopback only, bounded in time: an upstream that
//! breaks mid-response under concurrent traffic, the embedded store's disk filling up, and a
//! gateway run near its file-descriptor limit. Each asserts that no request is accepted
//! without a recorded nonce, no replay passes, nothing panics, and the gateway recovers
//! without a restart. Redis outages are in `tests/redis_gateway.rs`. Figures are printed.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{now, v1_headers, Echo, Gateway, Options};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An upstream on raw TCP: `…/cut-head` closes without answering, `…/cut-body` promises
/// 1000 bytes and closes after 10, `…/stall` answers after 3 s (past the test routes' 1 s
/// `read_timeout`), anything else answers `ok`.
async fn breaking_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(serve_breaking(s));
        }
    });
    addr
}

async fn serve_breaking(mut s: TcpStream) {
    let mut buf = Vec::new();
    while let Some((head, used)) = read_message(&mut s, &mut buf).await {
        let path = head.split(' ').nth(1).unwrap_or_default().to_owned();
        buf.drain(..used);
        if path.ends_with("/cut-head") {
            return;
        }
        if path.ends_with("/stall") {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        if path.ends_with("/cut-body") {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789")
                .await;
            return;
        }
        if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Reads one HTTP/1 message (head, then its `content-length` body) into `buf`: its head,
/// lowercased, and how many bytes of `buf` it took. `None` once the peer closes.
async fn read_message(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, usize)> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                return Some((head, end + 4 + length));
            }
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[derive(Debug, Default)]
struct Outcomes {
    ok: usize,
    bad_gateway: usize,
    truncated: usize,
    timed_out: usize,
    other: Vec<String>,
}

/// 8 clients send 240 signed requests, a quarter each to a path whose upstream answer breaks
/// before its head, one that breaks in its body, and one that stalls past `read_timeout`. Only
/// those requests fail — 502 `upstream_unavailable`, a body cut short (never a
/// complete-looking answer), 504 `upstream_timeout` — and each failed request's nonce stays
/// used.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_breaking_mid_response_fails_only_those_requests() {
    let echo = Echo::start().await;
    let upstream = breaking_upstream().await;
    let mut opts = Options::new(&echo);
    opts.routes = support::routes(upstream);
    let gw = std::sync::Arc::new(Gateway::start(opts).await);
    let key = std::sync::Arc::new(gw.mint(json!({})).await);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..8 {
        let (gw, key) = (gw.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Outcomes::default();
            let mut failed_heads = Vec::new();
            for i in 0..30 {
                let path = [
                    "/v1/x/fine",
                    "/v1/x/cut-head",
                    "/v1/x/cut-body",
                    "/v1/x/stall",
                ][(client + i) % 4];
                let nonce = format!("c{client}-{i}");
                let headers = v1_headers(&key, "GET", path, b"", now(), &nonce);
                let r = gw.send("GET", path, &headers, b"").await;
                let status = r.status().as_u16();
                let body = r.bytes().await;
                match (path, status, body) {
                    (p, 200, Ok(b)) if p.ends_with("/fine") && &b[..] == b"ok" => out.ok += 1,
                    (p, 502, Ok(b)) if p.ends_with("/cut-head") => {
                        let v: Value = serde_json::from_slice(&b).unwrap();
                        assert_eq!(v["code"], "upstream_unavailable");
                        out.bad_gateway += 1;
                        failed_heads.push(headers);
                    }
                    (p, 200, Err(_)) if p.ends_with("/cut-body") => out.truncated += 1,
                    (p, 200, Ok(b)) if p.ends_with("/cut-body") && b.len() < 1000 => {
                        out.truncated += 1
                    }
                    (p, 504, Ok(b)) if p.ends_with("/stall") => {
                        let v: Value = serde_json::from_slice(&b).unwrap();
                        assert_eq!(v["code"], "upstream_timeout");
                        out.timed_out += 1;
                    }
                    (p, s, b) => out.other.push(format!("{p} -> {s} {b:?}")),
                }
            }
            (out, failed_heads)
        }));
    }
    let mut all = Outcomes::default();
    let mut failed_heads = Vec::new();
    for t in tasks {
        let (o, heads) = t.await.unwrap();
        all.ok += o.ok;
        all.bad_gateway += o.bad_gateway;
        all.truncated += o.truncated;
        all.timed_out += o.timed_out;
        all.other.extend(o.other);
        failed_heads.extend(heads);
    }
    eprintln!(
        "240 requests in {:?}: {} ok, {} 502 (head never came), {} truncated bodies, {} 504 \
         (stalled), other {:?}",
        started.elapsed(),
        all.ok,
        all.bad_gateway,
        all.truncated,
        all.timed_out,
        all.other
    );
    assert!(all.other.is_empty(), "{:?}", all.other);
    assert_eq!(
        (all.ok, all.bad_gateway, all.truncated, all.timed_out),
        (60, 60, 60, 60)
    );
    // A request that failed upstream was still verified and its nonce spent: the replay is
    // refused, whatever happened beyond keygate.
    for headers in failed_heads.iter().take(5) {
        let r = gw.send("GET", "/v1/x/cut-head", headers, b"").await;
        assert_eq!(r.status(), 401);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["code"], "replayed_nonce");
    }
    assert_eq!(gw.post(&key, "/v1/x/fine").await.status(), 200);
    assert!(!gw.log().contains("panicked"), "{}", gw.log());
}

/// Unmounts a tmpfs when the test ends, however it ends.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(size: &str) -> Result<Self, String> {
        let dir = tempfile::tempdir().unwrap().keep();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(Self(dir))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Writes zeros to `path` until the filesystem is full.
fn fill(path: &Path) -> u64 {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![0u8; 64 * 1024];
    let mut written = 0;
    while let Ok(n) = f.write(&block) {
        if n == 0 {
            break;
        }
        written += n as u64;
    }
    let _ = f.sync_all();
    written
}

async fn code(r: reqwest::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap_or_default();
    (status, v["code"].as_str().unwrap_or_default().to_owned())
}

/// A signed `POST /v1/payments` of `{}` with this nonce: its headers (to replay it) and the
/// answer's status and code.
async fn pay(
    gw: &Gateway,
    key: &support::Key,
    nonce: &str,
) -> (Vec<(String, String)>, (u16, String)) {
    let headers = v1_headers(key, "POST", "/v1/payments", b"{}", now(), nonce);
    let answer = code(gw.send("POST", "/v1/payments", &headers, b"{}").await).await;
    (headers, answer)
}

/// The embedded store's directory fills up (a 16 MiB tmpfs). Signed requests go on while the
/// nonce journal's last page has room; once a write fails, every signed request is refused
/// 503 `store_unavailable` (never let through on a nonce a restart would forget) and so is
/// minting; nothing panics. Once space is freed the same process serves again, and after a
/// restart not one nonce accepted before or during the fault can be replayed: none was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_what_cannot_be_recorded_and_recovers() {
    let disk = match Tmpfs::mount("16m") {
        Ok(d) => d,
        Err(e) => {
            eprintln!("SKIPPED: mounting a tmpfs needs root (CAP_SYS_ADMIN): {e}");
            return;
        }
    };
    let echo = Echo::start().await;
    let options = |master: Option<String>| {
        let mut opts = Options::new(&echo);
        opts.dir = Some(disk.0.clone());
        opts.master_key = master;
        opts
    };
    let mut gw = Gateway::start(options(None)).await;
    let key = gw.mint(json!({})).await;
    let (before, answer) = pay(&gw, &key, "before").await;
    assert_eq!(answer.0, 200);
    let mut accepted = vec![before];

    let filler = disk.0.join("filler");
    let filled = fill(&filler);
    let mut first_refusal = None;
    for i in 0..5_000 {
        match pay(&gw, &key, &format!("full-{i}")).await {
            (h, (200, _)) => accepted.push(h),
            (_, refusal) => {
                first_refusal = Some((i, refusal));
                break;
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut later = Vec::new();
    for i in 0..20 {
        later.push(pay(&gw, &key, &format!("later-{i}")).await.1);
    }
    let mint = gw
        .create_key(&json!({"owner": "acme", "name": "on a full disk"}))
        .await;
    let mint = code(mint).await;
    eprintln!(
        "disk full after {filled} bytes of filler: {} requests accepted while the journal's last \
         page had room, first refusal {first_refusal:?}; 20 later -> {:?}; mint -> {mint:?}",
        accepted.len() - 1,
        later.iter().collect::<std::collections::BTreeSet<_>>()
    );
    let unavailable = (503, "store_unavailable".to_owned());
    assert_eq!(first_refusal.map(|(_, r)| r), Some(unavailable.clone()));
    assert!(later.iter().all(|r| *r == unavailable), "{later:?}");
    assert_eq!(mint, unavailable);

    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut recovered = None;
    let mut i = 0;
    while Instant::now() < deadline {
        i += 1;
        if let (h, (200, _)) = pay(&gw, &key, &format!("after-{i}")).await {
            accepted.push(h);
            recovered = Some(i);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("space freed: served again after {recovered:?} attempts");
    assert!(
        recovered.is_some(),
        "no recovery without a restart: {}",
        gw.log()
    );
    let new_key = gw.mint(json!({})).await;
    assert_eq!(gw.post(&new_key, "/v1/payments").await.status(), 200);
    assert!(!gw.log().contains("panicked"), "{}", gw.log());
    // Usage counted while the disk was full was kept and written once it could be: every
    // accepted request is counted, refused ones are not.
    let n = accepted.len() as u64;
    let record = gw
        .key_record_with_usage(&key.id, n, Duration::from_secs(10))
        .await;
    assert_eq!(record["total_requests"], n, "{record}");

    // Every nonce accepted reached the journal: a restarted gateway refuses each replay. (A
    // clean stop: a crash may lose the last batch window of nonces, as documented.)
    let master = gw.master_key.clone();
    assert!(gw
        .signal_and_wait("TERM", Duration::from_secs(10))
        .is_some());
    let gw = Gateway::start(options(Some(master))).await;
    for (i, h) in accepted.iter().enumerate() {
        let r = code(gw.send("POST", "/v1/payments", h, b"{}").await).await;
        assert_eq!(
            r,
            (401, "replayed_nonce".to_owned()),
            "accepted request {i}"
        );
    }
    eprintln!(
        "after a restart, {} of {} replays refused",
        accepted.len(),
        accepted.len()
    );
}

/// The gateway runs with 1,024 descriptors (`prlimit`), and 1,500 clients connect at once and
/// hold their connections. Connections beyond `max_connections` (default: half the limit less
/// 256) are closed at once, so the descriptors that signed requests need for the upstream and
/// the store stay free: a client connected before the flood goes on being served, and the
/// admin listener answers; once the flood ends new clients are served as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn near_the_descriptor_limit_signed_traffic_goes_on() {
    const FLOOD: usize = 1_500;
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    opts.launcher = vec!["prlimit".into(), "--nofile=1024:1024".into()];
    let gw = Gateway::start(opts).await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", gw.pid())).unwrap();
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .nth(3)
        .unwrap()
        .to_owned();
    assert_eq!(nofile, "1024");
    let key = gw.mint(json!({})).await;
    // A client with a kept-alive connection, opened before the flood.
    let mut kept = TcpStream::connect(gw.proxy).await.unwrap();
    assert_eq!(exchange(&mut kept, &key, 0).await, 200);
    // The flood goes on while the kept-alive client sends: a new connection takes any slot
    // that frees up, so the kept-alive one must never give its slot back between requests.
    let proxy = gw.proxy;
    let flood = tokio::spawn(async move {
        let mut held = Vec::new();
        for _ in 0..FLOOD {
            if let Ok(s) = TcpStream::connect(proxy).await {
                held.push(s);
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        held
    });
    let mut served = 0;
    for i in 1..=50 {
        assert_eq!(exchange(&mut kept, &key, i).await, 200, "request {i}");
        served += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let held = flood.await.unwrap();
    let fds = support::open_fds(gw.pid());
    let health = gw.http.get(gw.admin_url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let closed = gw
        .metric("keygate_connections_closed_total{reason=\"max_connections\"}")
        .await;
    eprintln!(
        "descriptor limit {nofile}: {} of {FLOOD} connects succeeded, gateway at {fds} \
         descriptors, {closed} closed for max_connections, {served} signed requests served \
         meanwhile on a connection opened before",
        held.len()
    );
    assert!(fds < 1024, "{fds} descriptors");
    assert!(closed > 0.0);
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gw.post(&key, "/v1/payments").await.status(), 200);
    assert!(!gw.log().contains("panicked"), "{}", gw.log());
}

/// One signed POST on a kept-alive connection, its answer read to the end; the status.
async fn exchange(s: &mut TcpStream, key: &support::Key, i: usize) -> u16 {
    let mut head =
        String::from("POST /v1/payments HTTP/1.1\r\nhost: keygate\r\ncontent-length: 2\r\n");
    for (k, v) in v1_headers(
        key,
        "POST",
        "/v1/payments",
        b"{}",
        now(),
        &format!("kept-{i}"),
    ) {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n{}");
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let (head, _) = read_message(s, &mut buf)
        .await
        .expect("the kept-alive connection was closed");
    head[9..12].parse().unwrap()
}
