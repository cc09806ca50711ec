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

/// A venv under target/ with clients/python installed (editable) with its test extras.
fn python() -> PathBuf {
    let package = format!("{}[test]", repo_root().join("clients/python").display());
    support::python_venv(
        "clients-venv",
        "keygate_client, pytest, requests, httpx, jwt, flask",
        &["-e", &package],
    )
}

/// How many cases tests/fixtures/signing.json has.
fn vector_cases() -> usize {
    let vectors: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("tests/fixtures/signing.json")).unwrap(),
    )
    .unwrap();
    vectors["cases"].as_array().unwrap().len()
}

#[test]
fn python_library_passes_its_tests_and_every_signing_vector() {
    let (code, out) = run_output(
        Command::new(python())
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
            .current_dir(repo_root().join("clients/python")),
    );
    assert_eq!(code, 0, "{out}");
    let cases = vector_cases();
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

/// Runs a library's end-to-end script against a real gateway whose upstream the script
/// serves, with four keys minted for it; the script's output must say `expect`.
async fn end_to_end(mut cmd: Command, expect: &str) {
    let echo = Echo::start().await;
    let (gw, port) = gateway_for_clients(&echo).await;
    let v1 = gw.mint(json!({})).await;
    let body = gw.mint(json!({"auth": "hmac-body"})).await;
    let bearer = gw.mint(json!({"auth": "bearer"})).await;
    let limited = gw
        .mint(json!({"rate_limits": [{"name": "burst", "limit": 1, "window": "1m"}]}))
        .await;
    cmd.env("KEYGATE_URL", format!("http://{}", gw.proxy))
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
    assert!(out.contains(expect), "{out}");
    // Nothing went to the standard upstream: every request reached the script's.
    assert_eq!(echo.count(), 0);
}

/// Runs a library's example against a real gateway: a signed POST answered 200 (exit 0,
/// "200" last), then with a wrong secret 401 (exit 1, "401" last, the code named).
async fn example(make: impl Fn() -> Command) {
    let echo = Echo::start().await;
    let gw = Gateway::start(Options::new(&echo)).await;
    let key = gw.mint(json!({})).await;
    let run = |secret: &str| {
        let mut cmd = make();
        cmd.env("KEYGATE_URL", format!("http://{}", gw.proxy))
            .env("KEYGATE_PUBLIC_KEY", &key.public_key)
            .env("KEYGATE_SECRET", secret);
        run_output(&mut cmd)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_library_against_the_real_gateway() {
    let py = tokio::task::spawn_blocking(python).await.unwrap();
    let mut cmd = Command::new(py);
    cmd.arg(repo_root().join("clients/python/tests/e2e_gateway.py"));
    end_to_end(cmd, "python: 10 cases passed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_example_sends_one_signed_request() {
    let py = tokio::task::spawn_blocking(python).await.unwrap();
    example(|| {
        let mut cmd = Command::new(&py);
        cmd.arg(repo_root().join("clients/python/examples/send.py"));
        cmd
    })
    .await;
}

/// clients/typescript with its locked dependencies installed (`npm ci`) and built, once; a
/// missing node or npm is a loud failure with the install command.
fn typescript() -> PathBuf {
    static MADE: Mutex<()> = Mutex::new(());
    let _once = MADE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = repo_root().join("clients/typescript");
    if !dir.join("node_modules/.package-lock.json").exists() {
        let (code, out) = run_output(
            Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund"])
                .current_dir(&dir),
        );
        assert_eq!(
            code, 0,
            "npm ci in clients/typescript failed (node and npm are needed: apt-get install -y \
             nodejs npm; scripts/dev test installs them):\n{out}"
        );
    }
    let (code, out) = run_output(Command::new("npm").args(["run", "build"]).current_dir(&dir));
    assert_eq!(code, 0, "npm run build:\n{out}");
    dir
}

#[test]
fn typescript_library_passes_its_tests_and_every_signing_vector() {
    let dir = typescript();
    let (code, out) = run_output(Command::new("npm").arg("test").current_dir(&dir));
    assert_eq!(code, 0, "{out}");
    let count = |label: &str| -> usize {
        out.lines()
            .find_map(|l| l.strip_prefix(label))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {label} in:\n{out}"))
    };
    assert_eq!(count("# fail"), 0, "{out}");
    let vectors = out
        .lines()
        .filter(|l| l.starts_with("ok ") && l.contains(" - vector: "))
        .count();
    assert_eq!(vectors, vector_cases(), "{out}");
    assert!(count("# pass") > vectors, "{out}");
    eprintln!(
        "typescript: {} tests passed ({vectors} vector cases)",
        count("# pass")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_library_against_the_real_gateway() {
    let dir = tokio::task::spawn_blocking(typescript).await.unwrap();
    let mut cmd = Command::new("node");
    cmd.arg(dir.join("test/e2e_gateway.mjs"));
    end_to_end(cmd, "typescript: 9 cases passed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_example_sends_one_signed_request() {
    let dir = tokio::task::spawn_blocking(typescript).await.unwrap();
    example(|| {
        let mut cmd = Command::new("node");
        cmd.arg(dir.join("examples/send.mjs"));
        cmd
    })
    .await;
}

/// clients/go's e2e program and example, built once into target/; a missing Go toolchain is
/// a loud failure with the install command.
fn go_built() -> (PathBuf, PathBuf) {
    static MADE: Mutex<()> = Mutex::new(());
    let _once = MADE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = repo_root().join("clients/go");
    let out = repo_root().join("target/clients-go");
    let (e2e, send) = (out.join("e2e"), out.join("send"));
    for (bin, pkg) in [(&e2e, "./e2e"), (&send, "./examples/send")] {
        let (code, text) = run_output(
            Command::new("go")
                .args(["build", "-o"])
                .arg(bin)
                .arg(pkg)
                .current_dir(&dir),
        );
        assert_eq!(
            code, 0,
            "go build {pkg} failed (Go is needed: apt-get install -y golang-go; scripts/dev \
             test installs it):\n{text}"
        );
    }
    (e2e, send)
}

#[test]
fn go_library_passes_its_tests_and_every_signing_vector() {
    let dir = repo_root().join("clients/go");
    let (code, out) = run_output(Command::new("go").args(["vet", "./..."]).current_dir(&dir));
    assert_eq!(code, 0, "go vet (Go: apt-get install -y golang-go):\n{out}");
    let (code, out) = run_output(
        Command::new("go")
            .args(["test", "-count=1", "-v", "./..."])
            .current_dir(&dir),
    );
    assert_eq!(code, 0, "{out}");
    let vectors = out
        .lines()
        .filter(|l| l.trim_start().starts_with("--- PASS: TestVectors/vector:"))
        .count();
    assert_eq!(vectors, vector_cases(), "{out}");
    let passed = out.lines().filter(|l| l.starts_with("--- PASS: ")).count();
    assert!(out.lines().all(|l| !l.contains("--- FAIL")), "{out}");
    eprintln!("go: {passed} tests passed ({vectors} vector cases)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_library_against_the_real_gateway() {
    let (e2e, _) = tokio::task::spawn_blocking(go_built).await.unwrap();
    end_to_end(Command::new(e2e), "go: 8 cases passed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_example_sends_one_signed_request() {
    let (_, send) = tokio::task::spawn_blocking(go_built).await.unwrap();
    example(|| Command::new(&send)).await;
}

/// The libraries are versioned with keygate: each says the version Cargo.toml does.
#[test]
fn every_library_has_keygates_version() {
    let version = env!("CARGO_PKG_VERSION");
    let read = |p: &str| std::fs::read_to_string(repo_root().join(p)).unwrap();
    let pyproject: toml::Table = toml::from_str(&read("clients/python/pyproject.toml")).unwrap();
    assert_eq!(pyproject["project"]["version"].as_str(), Some(version));
    assert!(read("clients/python/src/keygate_client/__init__.py")
        .contains(&format!("__version__ = \"{version}\"")));
    let package: serde_json::Value =
        serde_json::from_str(&read("clients/typescript/package.json")).unwrap();
    assert_eq!(package["version"], version);
    let lock: serde_json::Value =
        serde_json::from_str(&read("clients/typescript/package-lock.json")).unwrap();
    assert_eq!(lock["version"], version);
    // Go modules carry no version in go.mod: a release tags clients/go/v<version>.
    assert!(read("clients/go/go.mod").starts_with("module github.com/keygate/keygate/clients/go\n"));
}
