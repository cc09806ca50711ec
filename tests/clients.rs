//! The client libraries of `clients/` against the real keygate binary: each library's own
//! test suite (every case of tests/fixtures/signing.json included), its end-to-end cases
//! through a running gateway whose upstream verifies the assertion with the library's
//! middleware, and its example sending one signed request.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

use serde_json::json;
use support::{free_port, repo_root, run_output, Echo, Gateway, Key, Options};

/// A venv under target/ with clients/python installed (editable) and its test extras, made
/// once; a missing python3-venv or pip failure is a loud failure with the install command.
fn python() -> PathBuf {
    static MADE: Mutex<()> = Mutex::new(());
    let _once = MADE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let venv = repo_root().join("target/clients-venv");
    let py = venv.join("bin/python");
    let ready = Command::new(&py)
        .args(["-c", "import keygate_client, pytest, requests, httpx, jwt"])
        .status()
        .is_ok_and(|s| s.success());
    if !ready {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status();
        assert!(
            made.is_ok_and(|s| s.success()),
            "python3 with venv is needed for clients/python: apt-get install -y python3-venv \
             (scripts/dev test installs it)"
        );
        let (code, out) = run_output(
            Command::new(venv.join("bin/pip"))
                .args(["install", "-q", "-e"])
                .arg(format!(
                    "{}[test]",
                    repo_root().join("clients/python").display()
                )),
        );
        assert_eq!(code, 0, "pip install clients/python[test] failed:\n{out}");
    }
    py
}

#[test]
fn python_library_passes_its_tests_and_every_signing_vector() {
    let (code, out) = run_output(
        Command::new(python())
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
            .current_dir(repo_root().join("clients/python")),
    );
    assert_eq!(code, 0, "{out}");
    let vectors: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("tests/fixtures/signing.json")).unwrap(),
    )
    .unwrap();
    let cases = vectors["cases"].as_array().unwrap().len();
    // One test per vector case, plus the library's own.
    let passed: usize = out
        .lines()
        .find_map(|l| {
            let (n, _) = l.split_once(" passed in ")?;
            n.rsplit(' ').next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no count in:\n{out}"));
    assert!(
        passed > cases,
        "{passed} passed, {cases} vector cases:\n{out}"
    );
    eprintln!("python: {passed} tests passed ({cases} vector cases)");
}

/// A gateway whose only upstream, `py-upstream`, is a port the client script serves.
async fn gateway_for_clients(echo: &Echo) -> (Gateway, u16) {
    let port = free_port();
    let mut opts = Options::new(echo);
    opts.routes = format!(
        r#"
[[upstreams]]
name = "py-upstream"
endpoints = ["127.0.0.1:{port}"]
connect_timeout = "2s"
read_timeout = "5s"

[[routes]]
name = "create-payment"
methods = ["POST"]
path = "/v1/payments"
scope = "payments.create"
upstream = "py-upstream"

[[routes]]
name = "read-payment"
methods = ["GET"]
path = "/v1/payments/*"
scope = "payments.read"
upstream = "py-upstream"
"#
    );
    (Gateway::start(opts).await, port)
}

fn key_env(prefix: &str, key: &Key) -> [(String, String); 3] {
    [
        (
            format!("KEYGATE_{prefix}_PUBLIC_KEY"),
            key.public_key.clone(),
        ),
        (format!("KEYGATE_{prefix}_SECRET"), key.secret.clone()),
        (format!("KEYGATE_{prefix}_ID"), key.id.clone()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_library_against_the_real_gateway() {
    let py = tokio::task::spawn_blocking(python).await.unwrap();
    let echo = Echo::start().await;
    let (gw, port) = gateway_for_clients(&echo).await;
    let v1 = gw.mint(json!({})).await;
    let body = gw.mint(json!({"auth": "hmac-body"})).await;
    let bearer = gw.mint(json!({"auth": "bearer"})).await;
    let limited = gw
        .mint(json!({"rate_limits": [{"name": "burst", "limit": 1, "window": "1m"}]}))
        .await;
    let mut cmd = Command::new(py);
    cmd.arg(repo_root().join("clients/python/tests/e2e_gateway.py"))
        .env("KEYGATE_URL", format!("http://{}", gw.proxy))
        .env("KEYGATE_JWKS_URL", gw.admin_url("/.well-known/jwks.json"))
        .env("KEYGATE_UPSTREAM_PORT", port.to_string())
        .env("KEYGATE_UPSTREAM_NAME", "py-upstream")
        .env("KEYGATE_BEARER_SECRET", &bearer.secret);
    for (prefix, key) in [("V1", &v1), ("BODY", &body), ("LIMITED", &limited)] {
        cmd.envs(key_env(prefix, key));
    }
    let (code, out) = tokio::task::spawn_blocking(move || run_output(&mut cmd))
        .await
        .unwrap();
    eprintln!("{out}");
    assert_eq!(code, 0, "{out}\n{}", gw.log());
    assert!(out.contains("python: 10 cases passed"), "{out}");
    // Nothing went to the standard upstream: every request reached the script's.
    assert_eq!(echo.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_example_sends_one_signed_request() {
    let py = tokio::task::spawn_blocking(python).await.unwrap();
    let echo = Echo::start().await;
    let gw = Gateway::start(Options::new(&echo)).await;
    let key = gw.mint(json!({})).await;
    let run = |secret: &str| {
        run_output(
            Command::new(&py)
                .arg(repo_root().join("clients/python/examples/send.py"))
                .env("KEYGATE_URL", format!("http://{}", gw.proxy))
                .env("KEYGATE_PUBLIC_KEY", &key.public_key)
                .env("KEYGATE_SECRET", secret),
        )
    };
    let (code, out) = run(&key.secret);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.trim_end().lines().last(), Some("200"), "{out}");
    let seen = echo.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        (seen[0].method.as_str(), seen[0].target.as_str()),
        ("POST", "/v1/payments")
    );
    assert_eq!(&seen[0].body[..], br#"{"amount":"1.00"}"#);
    let (code, out) = run("sk_test_not_the_secret");
    assert_eq!(code, 1, "{out}");
    assert_eq!(out.trim_end().lines().last(), Some("401"), "{out}");
    assert!(out.contains("bad_signature"), "{out}");
}
