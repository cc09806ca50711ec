//! Config reload through the real binary, under traffic: a good config takes effect without a
//! failed request, a bad one is refused and counted while the old one keeps serving, and
//! settings that need a restart say so.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use support::{Echo, Gateway, Options};

/// Signed requests in a loop until stopped: (sent, failed).
fn traffic(
    gw: &Gateway,
    key: &support::Key,
) -> (Arc<AtomicBool>, tokio::task::JoinHandle<(usize, usize)>) {
    let stop = Arc::new(AtomicBool::new(false));
    let (stop2, key, proxy) = (Arc::clone(&stop), key.clone(), gw.proxy);
    let handle = tokio::spawn(async move {
        let http = reqwest::Client::new();
        let (sent, failed) = (AtomicUsize::new(0), AtomicUsize::new(0));
        while !stop2.load(Ordering::Relaxed) {
            let body = br#"{"amount":"1.00"}"#;
            let headers = support::v1_headers(
                &key,
                "POST",
                "/v1/payments",
                body,
                support::now(),
                &uuid::Uuid::new_v4().to_string(),
            );
            let mut req = http
                .post(format!("http://{proxy}/v1/payments"))
                .body(body.to_vec());
            for (k, v) in &headers {
                req = req.header(k.as_str(), v.as_str());
            }
            sent.fetch_add(1, Ordering::Relaxed);
            match req.send().await {
                Ok(r) if r.status() == 200 => {}
                _ => {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        (sent.into_inner(), failed.into_inner())
    });
    (stop, handle)
}

fn keygate_reload(gw: &Gateway) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["reload", "--config"])
        .arg(gw.dir.join("keygate.toml"))
        .output()
        .unwrap()
}

/// Waits for `GET target` to answer `status`.
async fn until_status(gw: &Gateway, target: &str, status: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = gw.send("GET", target, &[], b"").await.status().as_u16();
        if got == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{target} still answers {got}, not {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_traffic_changes_routes_without_a_failed_request() {
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("keygate.pid");
    opts.server_extra = format!("pid_file = {:?}", pid_file.display().to_string());
    opts.rust_log = "info";
    let gw = Gateway::start(opts).await;
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        gw.pid().to_string()
    );
    let key = gw.mint(json!({})).await;
    let (stop, traffic) = traffic(&gw, &key);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let config_path = gw.dir.join("keygate.toml");
    let original = std::fs::read_to_string(&config_path).unwrap();

    // 1. A new public route.
    assert_eq!(gw.send("GET", "/v2/status", &[], b"").await.status(), 404);
    let with_v2 = format!(
        "{original}\n[[routes]]\nname = \"v2\"\npath = \"/v2/*\"\nupstream = \"echo\"\npublic = true\n"
    );
    std::fs::write(&config_path, &with_v2).unwrap();
    let out = keygate_reload(&gw);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("reloaded"),
        "keygate reload reports the gateway's answer"
    );
    until_status(&gw, "/v2/status", 200).await;
    assert_eq!(
        gw.metric("keygate_config_reloads_total{result=\"ok\"}")
            .await,
        1.0
    );

    // 2. A broken file: refused whole, counted, and the running config keeps serving.
    let broken = with_v2.replace(
        "upstream = \"echo\"\npublic = true",
        "upstream = \"nowhere\"\npublic = true\nbogus = 1",
    );
    std::fs::write(&config_path, &broken).unwrap();
    let out = keygate_reload(&gw);
    assert_eq!(
        out.status.code(),
        Some(64),
        "keygate reload checks the file before signalling"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bogus") || err.contains("nowhere"), "{err}");
    gw.signal("HUP"); // the gateway itself refuses it too
    let deadline = Instant::now() + Duration::from_secs(5);
    while gw
        .metric("keygate_config_reloads_total{result=\"error\"}")
        .await
        < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "the refused reload was not counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(gw.send("GET", "/v2/status", &[], b"").await.status(), 200);
    assert!(gw.log().contains("config reload refused"), "{}", gw.log());

    // 3. Another gateway's file (a listener moved): refused whole, not half-applied — the
    // file's routes (no /v2) do not take effect either.
    let moved = original.replace(
        &format!("listen = \"{}\"", gw.metrics),
        "listen = \"127.0.0.1:1\"",
    );
    assert_ne!(moved, original);
    std::fs::write(&config_path, &moved).unwrap();
    // `keygate reload` reads the outcome from the metrics listener the file names, which the
    // running gateway does not listen on: it says it cannot tell, and why that may be.
    let out = keygate_reload(&gw);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(err.contains("metrics.listen"), "{err}");
    until_errors(&gw, 2.0).await;
    assert!(gw.log().contains("metrics.listen differ"), "{}", gw.log());
    assert_eq!(gw.send("GET", "/v2/status", &[], b"").await.status(), 200);

    // 3b. Another store: a file check cannot know the running one, so check-config passes,
    // but the gateway refuses it — and `keygate reload` says so (issue 25: it said "sent
    // SIGHUP" and exited 0).
    let other_store = original.replace("keygate.db", "other.db");
    assert_ne!(other_store, original);
    std::fs::write(&config_path, &other_store).unwrap();
    let out = keygate_reload(&gw);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "{err}");
    assert!(err.contains("refused"), "{err}");
    until_errors(&gw, 3.0).await;
    assert!(gw.log().contains("differ"), "{}", gw.log());

    // 3c. HTTPS added to the metrics listener: that listener was built plain and stays so,
    // so the file is refused like a listener change (it was "reloaded", still plain).
    let tls_dir = tempfile::tempdir().unwrap();
    let files = support::redis::TlsFiles::generate(tls_dir.path());
    let with_metrics_tls = format!(
        "{original}\n[metrics.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        files.cert.display().to_string(),
        files.key.display().to_string()
    );
    std::fs::write(&config_path, &with_metrics_tls).unwrap();
    let out = keygate_reload(&gw);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "{err}");
    until_errors(&gw, 4.0).await;
    assert!(gw.log().contains("metrics.tls differ"), "{}", gw.log());

    // 4. An empty file (a save cut short, `: > keygate.toml`): refused, routes keep serving.
    std::fs::write(&config_path, "").unwrap();
    let out = keygate_reload(&gw);
    assert_eq!(
        out.status.code(),
        Some(64),
        "keygate reload refuses it first"
    );
    gw.signal("HUP");
    until_errors(&gw, 5.0).await;
    assert!(gw.log().contains("no [[routes]]"), "{}", gw.log());
    assert_eq!(gw.send("GET", "/v2/status", &[], b"").await.status(), 200);
    assert_eq!(
        gw.metric("keygate_config_reloads_total{result=\"ok\"}")
            .await,
        1.0
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let (sent, failed) = traffic.await.unwrap();
    println!(
        "reload under traffic: {sent} signed requests, {failed} failed, 6 reloads (5 refused)"
    );
    assert!(sent > 20, "too little traffic to show anything: {sent}");
    assert_eq!(
        failed, 0,
        "{failed} of {sent} requests failed during the reloads"
    );
}

/// Issue 24: a reload that removes `[server.tls]` said "config reloaded" while the listener
/// stayed TLS. Removing TLS, like adding it, needs a restart: the reload says so, applies the
/// rest, and the listener goes on speaking TLS with the certificate it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_removing_tls_says_it_needs_a_restart_and_tls_stays() {
    let dir = tempfile::tempdir().unwrap();
    let files = support::redis::TlsFiles::generate(dir.path());
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    opts.rust_log = "info";
    let tls_table = format!(
        "\n[server.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        files.cert.display().to_string(),
        files.key.display().to_string()
    );
    opts.server_extra.clone_from(&tls_table);
    let gw = Gateway::start(opts).await;
    let over_tls = || {
        let out = std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(&files.ca)
            .arg("--resolve")
            .arg(format!("localhost:{}:127.0.0.1", gw.proxy.port()))
            .arg(format!("https://localhost:{}/public/x", gw.proxy.port()))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(over_tls(), "200");

    let config_path = gw.dir.join("keygate.toml");
    let original = std::fs::read_to_string(&config_path).unwrap();
    let plain = original.replace(&tls_table, "\n");
    assert_ne!(plain, original);
    std::fs::write(&config_path, plain).unwrap();
    gw.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw
        .metric("keygate_config_reloads_total{result=\"ok\"}")
        .await
        < 1.0
    {
        assert!(Instant::now() < deadline, "no reload: {}", gw.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = gw.log();
    let warning = log
        .lines()
        .find(|l| l.contains("server.tls was removed"))
        .unwrap_or_else(|| panic!("no warning that TLS stays:\n{log}"));
    assert!(
        warning.contains(" WARN ") && warning.contains("keeps speaking TLS"),
        "{warning}"
    );
    let kept = log
        .lines()
        .find(|l| l.contains("need a restart: they keep their running values"))
        .unwrap_or_else(|| panic!("no restart list:\n{log}"));
    assert!(kept.contains("settings=\"server.tls\""), "{kept}");
    // Still TLS, and plain HTTP is still not served.
    assert_eq!(over_tls(), "200");
    let plain_answer = support::raw_exchange(
        gw.proxy,
        &[b"GET /public/x HTTP/1.1\r\nhost: x\r\n\r\n"],
        Duration::ZERO,
        Duration::from_secs(2),
    )
    .await;
    assert!(!plain_answer.starts_with("HTTP/1.1 200"), "{plain_answer}");
}

/// Waits (up to 5 s) until `n` reloads have been refused.
async fn until_errors(gw: &Gateway, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while gw
        .metric("keygate_config_reloads_total{result=\"error\"}")
        .await
        < n
    {
        assert!(
            Instant::now() < deadline,
            "reload {n} not refused: {}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `keygate reload` signals only a `keygate serve` reading the file it was given (outside test,
/// issue 25): a pid file left by a killed gateway may name another process by now, which
/// SIGHUP ended; and a gateway re-reads its own `--config`, so "reloaded OTHER" was untrue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keygate_reload_signals_only_the_gateway_reading_that_file() {
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("keygate.pid");
    opts.server_extra = format!("pid_file = {:?}", pid_file.display().to_string());
    let gw = Gateway::start(opts).await;
    let original = std::fs::read_to_string(gw.dir.join("keygate.toml")).unwrap();

    // Another file naming the same pid file: refused, nothing signalled, nothing counted.
    let other = dir.path().join("other.toml");
    std::fs::write(&other, original.replace("/public/*", "/elsewhere/*")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["reload", "--config"])
        .arg(&other)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(err.contains("nothing was signalled"), "{err}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        gw.metric("keygate_config_reloads_total{result=\"ok\"}")
            .await,
        0.0
    );

    // A stale pid file naming an unrelated process: it is left alone.
    let mut bystander = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    std::fs::write(&pid_file, format!("{}\n", bystander.id())).unwrap();
    let out = keygate_reload(&gw);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(err.contains("not a keygate serve"), "{err}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        bystander.try_wait().unwrap().is_none(),
        "the unrelated process was signalled"
    );
    let _ = bystander.kill();
    let _ = bystander.wait();
}
