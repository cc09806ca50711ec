//! The process as operators run it: restarts keep keys and nonces, SIGTERM drains, SIGINT
//! stops at once, and the CLI's `check-config`, `sign` and `demo` do what they print.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use support::{assert_problem, free_port, now, v1_headers, Echo, Gateway, Options};

const BIN: &str = env!("CARGO_BIN_EXE_keygate");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_nonces_survive_a_restart() {
    let echo = Echo::start().await;
    let mut gw = Gateway::start(Options::new(&echo)).await;
    let key = gw.mint(json!({})).await;
    let used = v1_headers(&key, "POST", "/v1/payments", b"{}", now(), "before-restart");
    assert_eq!(
        gw.send("POST", "/v1/payments", &used, b"{}").await.status(),
        200
    );

    let tmp = gw.take_dir();
    let (dir, master) = (gw.dir.clone(), gw.master_key.clone());
    assert!(
        gw.signal_and_wait("TERM", Duration::from_secs(10))
            .is_some(),
        "SIGTERM did not stop the gateway"
    );
    drop(gw);

    let mut opts = Options::new(&echo);
    opts.dir = Some(dir);
    opts.master_key = Some(master);
    let gw = Gateway::start(opts).await;
    echo.clear();
    // The request made just before SIGTERM was counted by the final usage flush.
    let record = gw.key_record(&key.id).await;
    assert_eq!(record["total_requests"], 1, "{record}");
    // The nonce used before the restart is still inside its window.
    assert_problem(
        gw.send("POST", "/v1/payments", &used, b"{}").await,
        401,
        "replayed_nonce",
    )
    .await;
    assert_eq!(echo.count(), 0);
    // The key itself still works.
    assert_eq!(
        gw.send_v1(&key, "POST", "/v1/payments", b"{}")
            .await
            .status(),
        200
    );
    let got = gw
        .admin_get(&format!("/v1/keys/{}", key.id), support::ADMIN_TOKEN)
        .await;
    assert_eq!(got.status(), 200);
    drop(tmp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_then_exits() {
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    opts.shutdown_grace = "4s";
    // Short client deadlines: the drain once stopped waiting after header + body timeout
    // (plus 1 s), cutting a request the grace still allowed (outside test, issue 25).
    opts.server_extra = "header_timeout = \"500ms\"\nbody_timeout = \"500ms\"".into();
    let mut gw = Gateway::start(opts).await;
    // A public route to the slow endpoint (30 s read timeout): the echo answers after 3 s.
    let url = gw.url("/public/slow");
    let client = gw.http.clone();
    let in_flight =
        tokio::spawn(async move { client.get(url).send().await.map(|r| r.status().as_u16()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        let s = gw.signal_and_wait("TERM", Duration::from_secs(15));
        (s, gw)
    })
    .await
    .unwrap();
    assert!(
        status.0.is_some(),
        "gateway still running 15 s after SIGTERM"
    );
    assert_eq!(
        in_flight.await.unwrap().ok(),
        Some(200),
        "in-flight request was cut off"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "exited before the in-flight request finished"
    );
}

/// With nothing in flight, SIGTERM stops the gateway at once rather than after the whole
/// `shutdown_grace`: every stop (a restart, the embedded store's master-key rotation) used to
/// refuse requests for the full grace period (issue 25).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_nothing_in_flight_exits_without_waiting_the_grace_period() {
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    opts.shutdown_grace = "30s";
    let mut gw = Gateway::start(opts).await;
    let r = gw.send("GET", "/public/x", &[], b"").await;
    assert_eq!(r.status(), 200);
    let started = Instant::now();
    let status =
        tokio::task::spawn_blocking(move || gw.signal_and_wait("TERM", Duration::from_secs(40)))
            .await
            .unwrap();
    let took = started.elapsed();
    println!("SIGTERM with nothing in flight: exited after {took:?} (shutdown_grace 30 s)");
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "a graceful stop exits 0"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_stops_at_once() {
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    opts.shutdown_grace = "30s";
    let mut gw = Gateway::start(opts).await;
    let status =
        tokio::task::spawn_blocking(move || gw.signal_and_wait("INT", Duration::from_secs(5)))
            .await
            .unwrap();
    assert!(
        status.is_some(),
        "SIGINT must not wait for the 30 s grace period"
    );
}

#[test]
fn check_config_accepts_the_example_and_reports_every_problem() {
    // --offline: the example names data/master.key, which lives where a gateway runs.
    let ok = Command::new(BIN)
        .args([
            "check-config",
            "--offline",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/keygate.toml"),
        ])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        r#"
[server]
listen = "not an address"

[[upstreams]]
name = "payments"
endpoints = ["127.0.0.1:9000"]

[[routes]]
path = "/v1/payments"
upstream = "payments"

[[routes]]
path = "/v1/refunds"
upstream = "payments"

[[routes]]
path = "/v1/payouts"
upstream = "pay"
"#,
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check-config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server.listen: "), "{err}");
    assert!(
        err.contains(r#"routes[2].upstream: no upstream named "pay""#),
        "{err}"
    );

    let unknown = dir.path().join("unknown.toml");
    std::fs::write(&unknown, "[cache]\nttl = \"30s\"\nttl_jitter = \"1s\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["check-config"])
        .arg(&unknown)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cache") && err.contains("ttl_jitter"), "{err}");
}

#[test]
fn serve_refuses_a_world_readable_master_key_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("master.key");
    std::fs::write(&key_file, support::master_key()).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = dir.path().join("k.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:{}\"\nallow_no_routes = true\n[store]\npath = \"{}\"\n[secrets]\nmaster_key_file = \"{}\"\n",
            free_port(),
            dir.path().join("k.db").display(),
            key_file.display()
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&cfg)
        .env_remove("KEYGATE_MASTER_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chmod 600"), "{err}");
}

#[test]
fn sign_prints_the_vector_signature() {
    let out = Command::new(BIN)
        .args([
            "sign",
            "--public-key",
            "pk_test_aaaaaaaaaaaaaaaaaaaaaaaa",
            "--method",
            "GET",
            "--target",
            "/v1/payments/pay_123?expand=customer&limit=10",
            "--timestamp",
            "1767225600",
            "--nonce",
            "n1",
        ])
        .env(
            "KEYGATE_SECRET",
            "sk_test_4eC39HqLyjWDarjtT1zdp7dc4eC39HqLyjWDarjtT1z",
        )
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            "x-api-signature: 9a90fe175a69737f237612cd35b498bbd79292e99bb1b6a72db7d4b6319bce28"
        ),
        "{text}"
    );
    assert!(text.contains("x-api-timestamp: 1767225600"));
}

/// Reads the `curl` command the demo prints and sends exactly what it says.
fn parse_curl(lines: &[String]) -> (String, String, Vec<(String, String)>, String) {
    let start = lines
        .iter()
        .position(|l| l.starts_with("curl "))
        .expect("demo printed no curl command");
    let mut cmd = String::new();
    for l in &lines[start..] {
        cmd.push_str(l.trim_end_matches('\\').trim());
        cmd.push(' ');
        if !l.ends_with('\\') {
            break;
        }
    }
    // Tokens are single-quoted and contain no quotes in the demo's request.
    let quoted: Vec<&str> = cmd.split('\'').skip(1).step_by(2).collect();
    let method = cmd.split_whitespace().nth(4).unwrap().to_owned();
    let url = quoted[0].to_owned();
    let mut headers = Vec::new();
    for h in &quoted[1..quoted.len() - 1] {
        let (k, v) = h.split_once(": ").unwrap();
        headers.push((k.to_owned(), v.to_owned()));
    }
    (method, url, headers, quoted[quoted.len() - 1].to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_prints_a_signed_curl_command_that_works() {
    // A port picked free can be taken by a parallel test before the demo binds it: then the
    // demo exits (or pingora retries the bind for 30 s), and it is tried again on other ports.
    let http = reqwest::Client::new();
    let mut attempt = 0;
    let (mut child, method, url, headers, body) = loop {
        attempt += 1;
        let (proxy, admin, metrics) = (free_port(), free_port(), free_port());
        let mut child = Command::new(BIN)
            .args(["demo", "--listen", &format!("127.0.0.1:{proxy}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let lines = tokio::task::spawn_blocking(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let line = line.unwrap();
                let done = line.contains("Ctrl-C stops the demo");
                lines.push(line);
                if done {
                    break;
                }
            }
            lines
        })
        .await
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut exited = false;
        while http
            .get(format!("http://127.0.0.1:{admin}/readyz"))
            .send()
            .await
            .map(|r| r.status() != 200)
            .unwrap_or(true)
        {
            if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
                exited = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if exited {
            let _ = child.kill();
            let _ = child.wait();
            assert!(
                attempt < 4,
                "the demo did not become ready in {attempt} attempts"
            );
            continue;
        }
        let (method, url, headers, body) = parse_curl(&lines);
        break (child, method, url, headers, body);
    };
    assert_eq!(method, "POST");
    let mut req = http.post(&url).body(body.clone());
    for (k, v) in &headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let echoed: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(echoed["upstream"], "keygate demo echo");
    assert_eq!(echoed["body"], body.as_str());
    assert_eq!(echoed["headers"]["x-keygate-owner"], "demo-merchant");
    assert!(echoed["headers"].get("x-api-signature").is_none());
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let _ = child.wait();
}
