//! The upstream identity assertion through the real binary, verified by PyJWT (an independent
//! JWT library) the way docs/assertion.md tells upstreams to: JWKS from the admin listener,
//! Ed25519 and HS256, a changed body, target or method refused, rotation with overlap, and one
//! keyring shared by a Redis fleet.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use support::{Echo, Gateway, Options, Seen, ADMIN_TOKEN};

/// A Python with PyJWT, made once under target/ (PyPI); a missing python3 is a loud failure.
fn python() -> PathBuf {
    support::python_venv(
        "pyjwt-venv",
        "jwt, cryptography",
        &["pyjwt[crypto]>=2.8,<3"],
    )
}

/// A directory with `jose` from npm, made once under target/; a missing node or npm is a
/// loud failure.
fn jose_dir() -> PathBuf {
    static MADE: Mutex<()> = Mutex::new(());
    let _once = MADE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/jose-node");
    if !dir.join("node_modules/jose/package.json").exists() {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("package.json"),
            r#"{"private": true, "type": "module"}"#,
        )
        .unwrap();
        let npm = Command::new("npm")
            .args(["install", "--silent", "--no-audit", "--no-fund", "jose@5"])
            .current_dir(&dir)
            .status();
        assert!(
            npm.is_ok_and(|s| s.success()),
            "node and npm are needed to verify assertions with jose: \
             apt-get install -y nodejs npm (scripts/dev test installs them)"
        );
    }
    dir
}

/// Runs tests/fixtures/verify_assertion.mjs (jose) on `token`.
fn verify_with_jose(
    token: &str,
    jwks: &str,
    audience: &str,
    method: &str,
    target: &str,
    body: &[u8],
) -> Verdict {
    let dir = jose_dir();
    let script = dir.join("verify_assertion.mjs");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/verify_assertion.mjs"),
        &script,
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let body_file = tmp.path().join("body");
    std::fs::write(&body_file, body).unwrap();
    let child = Command::new("node")
        .arg(&script)
        .args([jwks, audience, method, target])
        .arg(&body_file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node is needed: apt-get install -y nodejs npm");
    run_verifier(child, token)
}

/// Feeds `token` to a verifier process and reads its verdict: exit 0 and the claims as JSON,
/// or exit 1 and the reason.
fn run_verifier(mut child: std::process::Child, token: &str) -> Verdict {
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(token.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    match out.status.code() {
        Some(0) => Verdict::Accepted(serde_json::from_str(&stdout).unwrap()),
        Some(1) => Verdict::Rejected(stdout),
        _ => panic!(
            "verifier crashed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// What the verifier made of one assertion.
enum Verdict {
    Accepted(Value),
    Rejected(String),
}

/// Runs tests/fixtures/verify_assertion.py on `token` for the request described.
fn verify(
    token: &str,
    key: &[&str],
    audience: &str,
    method: &str,
    target: &str,
    body: &[u8],
) -> Verdict {
    let dir = tempfile::tempdir().unwrap();
    let body_file = dir.path().join("body");
    std::fs::write(&body_file, body).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/verify_assertion.py");
    let child = Command::new(python())
        .arg(script)
        .args(key)
        .args([
            "--audience",
            audience,
            "--method",
            method,
            "--target",
            target,
        ])
        .arg("--body-file")
        .arg(&body_file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    run_verifier(child, token)
}

fn accepted(v: Verdict) -> Value {
    match v {
        Verdict::Accepted(c) => c,
        Verdict::Rejected(why) => panic!("the verifier rejected keygate's assertion: {why}"),
    }
}

fn rejected(v: Verdict) -> String {
    match v {
        Verdict::Accepted(c) => panic!("the verifier accepted what it must not: {c}"),
        Verdict::Rejected(why) => why,
    }
}

fn header<'a>(seen: &'a Seen, name: &str) -> Option<&'a str> {
    seen.headers.get(name).and_then(|v| v.to_str().ok())
}

/// The `kid` in a compact JWS's header.
fn kid_of(token: &str) -> String {
    let head = token.split('.').next().unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(head)
        .unwrap();
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    v["kid"].as_str().unwrap_or_default().to_owned()
}

fn jwks_args(gw: &Gateway) -> [String; 2] {
    ["--jwks".into(), gw.admin_url("/.well-known/jwks.json")]
}

/// `GET url` answered as JSON.
async fn get_json(gw: &Gateway, url: String) -> Value {
    gw.http.get(url).send().await.unwrap().json().await.unwrap()
}

/// `POST /v1/assertion/rotate` with the admin token and `body`.
async fn rotate(gw: &Gateway, body: Value) -> reqwest::Response {
    gw.http
        .post(gw.admin_url("/v1/assertion/rotate"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// Sends a signed POST and returns what the upstream received.
async fn forwarded(
    gw: &Gateway,
    echo: &Echo,
    key: &support::Key,
    target: &str,
    body: &[u8],
) -> Seen {
    echo.clear();
    let r = gw.send_v1(key, "POST", target, body).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    echo.seen().pop().unwrap()
}

#[tokio::test]
async fn an_upstream_verifies_the_assertion_and_a_changed_request_does_not_match() {
    let echo = Echo::start().await;
    let gw = Gateway::start(Options::new(&echo)).await;
    let key = gw
        .mint(json!({"owner": "acme", "scopes": ["payments.create", "payments.read"]}))
        .await;
    let body = br#"{"amount":"10.00","currency":"EUR"}"#;
    let seen = forwarded(&gw, &echo, &key, "/v1/payments?idempotency=7", body).await;
    let token = header(&seen, "x-keygate-assertion")
        .expect("no assertion forwarded")
        .to_owned();
    let jwks = jwks_args(&gw);
    let jwks: Vec<&str> = jwks.iter().map(String::as_str).collect();

    let claims = accepted(verify(
        &token,
        &jwks,
        "echo",
        &seen.method,
        &seen.target,
        &seen.body,
    ));
    assert_eq!(claims["iss"], "keygate");
    assert_eq!(claims["aud"], "echo");
    assert_eq!(claims["sub"], key.id.as_str());
    assert_eq!(claims["owner"], "acme");
    assert_eq!(
        claims["scopes"],
        json!(["payments.create", "payments.read"])
    );
    assert_eq!(claims["environment"], key.record["environment"]);
    assert_eq!(claims["method"], "POST");
    assert_eq!(claims["target"], "/v1/payments?idempotency=7");
    // keygate's own, random: not the request id a client may choose (issue 24).
    let jti = claims["jti"].as_str().unwrap();
    assert_eq!(jti.len(), 32, "{jti}");
    assert_ne!(jti, header(&seen, "x-request-id").unwrap());
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        60
    );

    // The same token presented with another body, target, method or audience: refused.
    let other_body = br#"{"amount":"99999.00","currency":"EUR"}"#;
    for (method, target, body, aud) in [
        ("POST", seen.target.as_str(), &other_body[..], "echo"),
        ("POST", "/v1/payments?idempotency=8", &seen.body[..], "echo"),
        ("PUT", seen.target.as_str(), &seen.body[..], "echo"),
        ("POST", seen.target.as_str(), &seen.body[..], "ledger"),
    ] {
        let why = rejected(verify(&token, &jwks, aud, method, target, body));
        assert!(why.starts_with("rejected:"), "{why}");
    }
    // jose (Node) agrees, as docs/assertion.md shows.
    let claims_js = accepted(verify_with_jose(
        &token,
        jwks[1],
        "echo",
        &seen.method,
        &seen.target,
        &seen.body,
    ));
    assert_eq!(claims_js, claims);
    let why = rejected(verify_with_jose(
        &token,
        jwks[1],
        "echo",
        "POST",
        &seen.target,
        other_body,
    ));
    assert!(why.contains("another request"), "{why}");
    // A claim changed in transit breaks the signature.
    let parts: Vec<&str> = token.split('.').collect();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut payload: Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
    payload["owner"] = json!("mallory");
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        b64.encode(payload.to_string()),
        parts[2]
    );
    let why = rejected(verify(
        &forged,
        &jwks,
        "echo",
        &seen.method,
        &seen.target,
        &seen.body,
    ));
    assert!(why.contains("InvalidSignatureError"), "{why}");

    // A client cannot hand the upstream an assertion of its own: keygate's replaces it.
    echo.clear();
    let mut headers = support::v1_headers(
        &key,
        "POST",
        "/v1/payments",
        body,
        support::now(),
        "n-forge",
    );
    headers.push(("x-keygate-assertion".into(), token.clone()));
    let r = gw.send("POST", "/v1/payments", &headers, body).await;
    assert_eq!(r.status(), 200);
    let seen = echo.seen().pop().unwrap();
    let values: Vec<_> = seen.headers.get_all("x-keygate-assertion").iter().collect();
    assert_eq!(values.len(), 1);
    assert_ne!(values[0].to_str().unwrap(), token);
    accepted(verify(
        values[0].to_str().unwrap(),
        &jwks,
        "echo",
        "POST",
        "/v1/payments",
        body,
    ));
}

#[tokio::test]
async fn hs256_and_off_upstreams_and_the_jwks_on_the_proxy() {
    let echo = Echo::start().await;
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("ledger.hs256");
    std::fs::write(
        &secret_file,
        "a-shared-secret-of-more-than-32-bytes-0123456789\n",
    )
    .unwrap();
    std::fs::set_permissions(
        &secret_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let mut opts = Options::new(&echo);
    opts.server_extra = "name = \"keygate-eu\"".into();
    opts.routes = format!(
        r#"
[assertion]
jwks_on_proxy = true
ttl = "30s"

[[upstreams]]
name = "ledger"
endpoints = ["{echo}"]
assertion = "hs256"
assertion_secret_file = "{secret}"

[[upstreams]]
name = "legacy"
endpoints = ["{echo}"]
assertion = "off"

[[routes]]
path = "/ledger/*"
upstream = "ledger"

[[routes]]
path = "/legacy/*"
upstream = "legacy"
"#,
        echo = echo.addr,
        secret = secret_file.display()
    );
    let gw = Gateway::start(opts).await;
    let key = gw.mint(json!({})).await;

    let seen = forwarded(&gw, &echo, &key, "/ledger/entries", b"{}").await;
    let token = header(&seen, "x-keygate-assertion").unwrap();
    assert_eq!(kid_of(token), "", "HS256 assertions carry no kid");
    // PyJWT requires the issuer the docs name; this fleet calls itself keygate-eu.
    let secret_arg = ["--hs256-secret-file", secret_file.to_str().unwrap()];
    let why = rejected(verify(
        token,
        &secret_arg,
        "ledger",
        "POST",
        "/ledger/entries",
        b"{}",
    ));
    assert!(why.contains("InvalidIssuerError"), "{why}");
    let payload: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(payload["iss"], "keygate-eu");
    assert_eq!(
        payload["exp"].as_i64().unwrap() - payload["iat"].as_i64().unwrap(),
        30
    );
    // With the wrong secret the signature does not hold.
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "another-secret-of-more-than-32-bytes-0123456789").unwrap();
    let wrong_arg = ["--hs256-secret-file", wrong.to_str().unwrap()];
    let why = rejected(verify(
        token,
        &wrong_arg,
        "ledger",
        "POST",
        "/ledger/entries",
        b"{}",
    ));
    assert!(why.contains("InvalidSignatureError"), "{why}");

    let seen = forwarded(&gw, &echo, &key, "/legacy/entries", b"{}").await;
    assert_eq!(
        header(&seen, "x-keygate-assertion"),
        None,
        "assertion = off"
    );
    assert_eq!(header(&seen, "x-keygate-key-id"), Some(key.id.as_str()));

    // The JWKS is on the proxy listener too, the same document as on the admin listener.
    let on_proxy: Value = get_json(&gw, gw.url("/.well-known/jwks.json")).await;
    let on_admin: Value = get_json(&gw, gw.admin_url("/.well-known/jwks.json")).await;
    assert_eq!(on_proxy, on_admin);
    assert_eq!(on_proxy["keys"][0]["crv"], "Ed25519");
}

#[tokio::test]
async fn rotation_publishes_the_new_key_and_keeps_the_old_one_until_it_expires() {
    let echo = Echo::start().await;
    let gw = Gateway::start(Options::new(&echo)).await;
    let key = gw.mint(json!({})).await;
    let jwks = jwks_args(&gw);
    let jwks: Vec<&str> = jwks.iter().map(String::as_str).collect();
    let before = forwarded(&gw, &echo, &key, "/v1/payments", b"{}").await;
    let old_token = header(&before, "x-keygate-assertion").unwrap().to_owned();
    let old_kid = kid_of(&old_token);

    // With a publish-ahead period, the new key is published but the old one still signs.
    let out = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args([
            "assertion",
            "rotate",
            "--publish-ahead",
            "1h",
            "--json",
            "--admin-url",
        ])
        .arg(gw.admin_url(""))
        .env("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ring: Value = serde_json::from_slice(&out.stdout).unwrap();
    let states: Vec<&str> = ring["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["active", "next"]);
    let seen = forwarded(&gw, &echo, &key, "/v1/payments", b"{}").await;
    assert_eq!(
        kid_of(header(&seen, "x-keygate-assertion").unwrap()),
        old_kid
    );

    // Rotating at once: the newest key signs (replacing the scheduled one, which never
    // signed), the old one stays published, and the old token still verifies.
    let r = rotate(&gw, json!({"publish_ahead_seconds": 0})).await;
    assert_eq!(r.status(), 200);
    let ring: Value = r.json().await.unwrap();
    let states: Vec<&str> = ring["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["retiring", "active"]);
    let seen = forwarded(&gw, &echo, &key, "/v1/payments", b"{}").await;
    let new_token = header(&seen, "x-keygate-assertion").unwrap().to_owned();
    assert_eq!(kid_of(&new_token), ring["keys"][1]["kid"].as_str().unwrap());
    let published: Value = get_json(&gw, gw.admin_url("/.well-known/jwks.json")).await;
    let kids: Vec<&str> = published["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(kids.len(), 2);
    assert!(kids.contains(&old_kid.as_str()));
    accepted(verify(
        &new_token,
        &jwks,
        "echo",
        "POST",
        "/v1/payments",
        b"{}",
    ));
    accepted(verify(
        &old_token,
        &jwks,
        "echo",
        "POST",
        "/v1/payments",
        b"{}",
    ));

    // Bad input to the rotation is refused without a change.
    let r = rotate(&gw, json!({"publish_ahead_seconds": -1})).await;
    support::assert_problem(r, 422, "validation_failed").await;
    let r = gw
        .http
        .post(gw.admin_url("/v1/assertion/rotate"))
        .send()
        .await
        .unwrap();
    support::assert_problem(r, 401, "unauthorized").await;
    let now: Value = gw
        .admin_get("/v1/assertion/keys", ADMIN_TOKEN)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(now["version"], ring["version"]);
}

#[tokio::test]
async fn a_redis_fleet_shares_one_keyring_and_a_rotation_reaches_every_gateway() {
    let redis = support::redis::RedisServer::start();
    let echo = Echo::start().await;
    // A fleet shares its master key, which opens the shared signing keys.
    let master = support::master_key();
    let start = |refresh: &str| {
        let mut opts = Options::new(&echo);
        opts.master_key = Some(master.clone());
        opts.store_toml = Some(format!(
            "[store]\nkind = \"redis\"\nurl = \"{}\"",
            redis.url()
        ));
        opts.routes = format!(
            "[assertion]\nrefresh_interval = \"{refresh}\"\n{}",
            opts.routes
        );
        Gateway::start(opts)
    };
    let a = start("1s").await;
    let b = start("1s").await;
    let key = a.mint(json!({})).await;
    let seen = forwarded(&a, &echo, &key, "/v1/payments", b"{}").await;
    let token = header(&seen, "x-keygate-assertion").unwrap().to_owned();
    // Signed on A, verified with B's JWKS: one key for the fleet.
    let jwks_b = jwks_args(&b);
    let jwks_b: Vec<&str> = jwks_b.iter().map(String::as_str).collect();
    accepted(verify(
        &token,
        &jwks_b,
        "echo",
        "POST",
        "/v1/payments",
        b"{}",
    ));

    let r = rotate(&b, json!({"publish_ahead_seconds": 0})).await;
    assert_eq!(r.status(), 200);
    let ring: Value = r.json().await.unwrap();
    let new_kid = ring["keys"][1]["kid"].as_str().unwrap().to_owned();
    assert_ne!(new_kid, kid_of(&token));
    // A re-reads the keyring every second: within a few, it signs with B's new key.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = forwarded(&a, &echo, &key, "/v1/payments", b"{}").await;
        let t = header(&seen, "x-keygate-assertion").unwrap().to_owned();
        if kid_of(&t) == new_kid {
            accepted(verify(&t, &jwks_b, "echo", "POST", "/v1/payments", b"{}"));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "gateway A never picked up the rotation"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
