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

    // 3. A listener change needs a restart: said, and the rest still applies.
    let moved = original.replace(
        &format!("listen = \"{}\"", gw.metrics),
        "listen = \"127.0.0.1:1\"",
    );
    assert_ne!(moved, original);
    std::fs::write(&config_path, &moved).unwrap();
    gw.signal("HUP");
    until_status(&gw, "/v2/status", 404).await;
    assert_eq!(
        gw.metric("keygate_config_reloads_total{result=\"ok\"}")
            .await,
        2.0
    );
    assert!(gw.log().contains("need a restart"), "{}", gw.log());
    assert!(gw.log().contains("metrics.listen"));

    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let (sent, failed) = traffic.await.unwrap();
    println!(
        "reload under traffic: {sent} signed requests, {failed} failed, 3 reloads (1 refused)"
    );
    assert!(sent > 20, "too little traffic to show anything: {sent}");
    assert_eq!(
        failed, 0,
        "{failed} of {sent} requests failed during the reloads"
    );
}
