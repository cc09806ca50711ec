//! Regression tests for the security review's findings, each through the real binary: the
//! self-service takeover, lost revocations (both stores), path confusion, ambiguous
//! credentials, forged client addresses and headers, nonce size, file modes and secrets.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use support::redis::RedisServer;
use support::status_of;
use support::{
    assert_problem, now, raw_exchange, v1_headers, Echo, Gateway, Key, Options, ADMIN_TOKEN,
};

// ---- 1. A keys.manage key cannot take over a stronger key of its owner -------------------

/// The embedded store, or (with `redis`) a private Redis.
fn opts_on(echo: &Echo, redis: Option<&RedisServer>) -> Options {
    let mut opts = Options::new(echo);
    if let Some(r) = redis {
        opts.store_toml = Some(format!("[store]\nkind = \"redis\"\nurl = \"{}\"", r.url()));
    }
    opts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manager_cannot_touch_keys_with_powers_it_lacks() {
    a_manager_cannot_touch_stronger_keys(None).await;
    a_manager_cannot_touch_stronger_keys(Some(&RedisServer::start())).await;
}

async fn a_manager_cannot_touch_stronger_keys(redis: Option<&RedisServer>) {
    let echo = Echo::start().await;
    let gw = Gateway::start(opts_on(&echo, redis)).await;
    let manager = gw
        .mint(json!({"owner": "acme", "scopes": ["keys.manage"], "environment": "live"}))
        .await;
    let strong = gw
        .mint(json!({"owner": "acme", "scopes": ["*"], "environment": "live"}))
        .await;
    for (method, target, body) in [
        (
            "POST",
            format!("/_keygate/v1/keys/{}/rotate", strong.id),
            json!({"grace_seconds": 604800}),
        ),
        (
            "POST",
            format!("/_keygate/v1/keys/{}/revoke", strong.id),
            Value::Null,
        ),
        (
            "GET",
            format!("/_keygate/v1/keys/{}", strong.id),
            Value::Null,
        ),
        (
            "GET",
            format!("/_keygate/v1/keys/{}", strong.public_key),
            Value::Null,
        ),
    ] {
        let r = gw.call(&manager, method, &target, body).await;
        assert_problem(r, 404, "not_found").await;
    }
    let list: Value = gw
        .call(&manager, "GET", "/_keygate/v1/keys", Value::Null)
        .await
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        vec![manager.id.as_str()],
        "it sees itself only: {list}"
    );
    // The strong key is untouched: its secret still works, no rotation happened.
    let r = gw.send_v1(&strong, "POST", "/v1/payments", b"{}").await;
    assert_eq!(r.status(), 200);
    assert_eq!(gw.key_record(&strong.id).await["version"], 1);

    // A key it minted is its own to rotate and revoke, even though it holds only keys.manage.
    let child: Value = gw
        .call(
            &manager,
            "POST",
            "/_keygate/v1/keys",
            json!({"name": "child"}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(child["created_by"], manager.id.as_str());
    let child_id = child["id"].as_str().unwrap();
    let r = gw
        .call(
            &manager,
            "POST",
            &format!("/_keygate/v1/keys/{child_id}/rotate"),
            Value::Null,
        )
        .await;
    assert_eq!(r.status(), 200);
    // And itself: its powers are its own.
    let r = gw
        .call(
            &manager,
            "POST",
            &format!("/_keygate/v1/keys/{}/rotate", manager.id),
            Value::Null,
        )
        .await;
    assert_eq!(r.status(), 200);
}

// ---- 4. Self-service children inherit environment, allow-list and expiry ---------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minted_child_stays_within_its_parent() {
    minted_children_stay_within(None).await;
    minted_children_stay_within(Some(&RedisServer::start())).await;
}

async fn minted_children_stay_within(redis: Option<&RedisServer>) {
    let echo = Echo::start().await;
    let gw = Gateway::start(opts_on(&echo, redis)).await;
    let manager = gw
        .mint(
            json!({"owner": "acme", "scopes": ["keys.manage", "payments.*"],
                     "environment": "test", "ip_allow_list": ["127.0.0.1/32"],
                     "expires_at": "2027-06-01T00:00:00Z"}),
        )
        .await;
    // Defaults: the parent's environment, allow-list and expiry.
    let r = gw
        .call(
            &manager,
            "POST",
            "/_keygate/v1/keys",
            json!({"name": "c", "scopes": ["payments.read"]}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let child: Value = r.json().await.unwrap();
    assert_eq!(child["environment"], "test");
    assert_eq!(child["ip_allow_list"], json!(["127.0.0.1/32"]));
    assert_eq!(child["expires_at"], "2027-06-01T00:00:00Z");
    assert!(child["public_key"]
        .as_str()
        .unwrap()
        .starts_with("pk_test_"));

    // Anything wider is a 422 naming each field.
    let r = gw
        .call(
            &manager,
            "POST",
            "/_keygate/v1/keys",
            json!({"name": "c", "environment": "live", "ip_allow_list": ["0.0.0.0/0"],
               "expires_at": "2030-01-01T00:00:00Z"}),
        )
        .await;
    let body = assert_problem(r, 422, "validation_failed").await;
    for field in ["environment", "ip_allow_list[0]", "expires_at"] {
        assert!(body["errors"].get(field).is_some(), "{field}: {body}");
    }
    let r = gw
        .call(
            &manager,
            "POST",
            "/_keygate/v1/keys",
            json!({"name": "c", "ip_allow_list": []}),
        )
        .await;
    let body = assert_problem(r, 422, "validation_failed").await;
    assert!(body["errors"].get("ip_allow_list").is_some(), "{body}");
    assert_eq!(echo.count(), 0);
}

// ---- 2. A revocation is never undone by concurrent writers -----------------------------

/// Revokes a key while a self-service key and the admin API rotate it from 8 tasks; counts
/// the trials where the revocation did not hold (stored, or through the proxy).
async fn revocation_race(gw: &Gateway, trials: usize) -> usize {
    let manager = gw.mint(json!({"owner": "acme", "scopes": ["*"]})).await;
    let mut undone = 0;
    for trial in 0..trials {
        let target = gw
            .mint(json!({"owner": "acme", "scopes": ["payments.*"]}))
            .await;
        let stop = Arc::new(AtomicBool::new(false));
        let mut rotators = Vec::new();
        for i in 0..8 {
            let stop = Arc::clone(&stop);
            let (http, admin, proxy) = (gw.http.clone(), gw.admin, gw.proxy);
            let (manager, id) = (manager.clone(), target.id.clone());
            rotators.push(tokio::spawn(async move {
                let mut newest = None;
                while !stop.load(Ordering::Relaxed) {
                    let r = if i % 2 == 0 {
                        let path = format!("/_keygate/v1/keys/{id}/rotate");
                        let h = v1_headers(
                            &manager,
                            "POST",
                            &path,
                            b"",
                            now(),
                            &uuid::Uuid::new_v4().to_string(),
                        );
                        let mut req = http.post(format!("http://{proxy}{path}"));
                        for (k, v) in &h {
                            req = req.header(k.as_str(), v.as_str());
                        }
                        req.send().await.unwrap()
                    } else {
                        http.post(format!("http://{admin}/v1/keys/{id}/rotate"))
                            .bearer_auth(ADMIN_TOKEN)
                            .json(&json!({"grace_seconds": 604800}))
                            .send()
                            .await
                            .unwrap()
                    };
                    if r.status() == 200 {
                        let v: Value = r.json().await.unwrap();
                        newest = v["secret"].as_str().map(str::to_owned);
                    } else {
                        assert_eq!(r.status(), 409, "rotation refused for another reason");
                    }
                }
                newest
            }));
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
        let answered = gw.revoke(&target).await;
        assert!(answered["revoked_at"].is_string());
        tokio::time::sleep(Duration::from_millis(40)).await;
        stop.store(true, Ordering::Relaxed);
        let mut secrets = vec![target.secret.clone()];
        for t in rotators {
            secrets.extend(t.await.unwrap());
        }
        let stored = gw.key_record(&target.id).await;
        let mut held = stored["revoked_at"].is_string();
        for secret in secrets {
            let k = Key {
                secret,
                ..target.clone()
            };
            let status = gw.send_v1(&k, "GET", "/v1/payments/p1", b"").await.status();
            held &= status == 401;
        }
        if !held {
            eprintln!("trial {trial}: revocation undone: {stored}");
            undone += 1;
        }
    }
    undone
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revocations_hold_against_concurrent_rotations_embedded() {
    let echo = Echo::start().await;
    let gw = Gateway::start(Options::new(&echo)).await;
    let undone = revocation_race(&gw, 10).await;
    eprintln!("embedded: {undone} of 10 revocations undone");
    assert_eq!(undone, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revocations_hold_against_concurrent_rotations_redis() {
    let redis = RedisServer::start();
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    opts.store_toml = Some(format!(
        "[store]\nkind = \"redis\"\nurl = \"{}\"",
        redis.url()
    ));
    let gw = Gateway::start(opts).await;
    let undone = revocation_race(&gw, 10).await;
    eprintln!("redis: {undone} of 10 revocations undone");
    assert_eq!(undone, 0);
}

// ---- 3. Paths an upstream could read as another route ----------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_and_encoded_separators_are_refused_before_routing() {
    let echo = Echo::start().await;
    let gw = Gateway::start(Options::new(&echo)).await;
    let reader = gw.mint(json!({"scopes": ["payments.read"]})).await;
    for path in [
        "/public/../v1/admin/secret",
        "/public/%2e%2e/v1/admin",
        "/public/%2E%2E/v1/admin",
        "/public/..%2fv1/admin",
        "/public/..;/v1/admin",
        "/public/..\\v1/admin",
        "/public/./../../v1/admin",
        "/public/..%5cv1/admin",
        "/public//x",
        // An unreserved character percent-encoded: `/v1/p%61yments` is `/v1/payments` to an
        // upstream that decodes it, but another route to matching (found by fuzzing).
        "/v1/p%61yments",
        "/public/%61",
    ] {
        let out = gw
            .raw(format!("GET {path} HTTP/1.1\r\nhost: gw\r\n\r\n").as_bytes())
            .await;
        assert_eq!(status_of(&out), 400, "{path}: {out}");
        assert!(
            out.contains("bad_request") || out.is_empty() || status_of(&out) == 400,
            "{out}"
        );
    }
    // Signed, by a key that may read payments, in origin and absolute form.
    for target in [
        "/v1/payments/../admin/secret",
        "http://gw/v1/payments/../admin/secret",
    ] {
        let signed = support::v1_lines(&reader, "GET", target, b"", now());
        let out = gw
            .raw(format!("GET {target} HTTP/1.1\r\nhost: gw\r\n{signed}\r\n").as_bytes())
            .await;
        assert_eq!(status_of(&out), 400, "{target}: {out}");
        assert!(out.contains("bad_request"), "{out}");
    }
    assert_eq!(echo.count(), 0, "nothing reached the upstream");
    // Route matching is case-sensitive: /V1/payments is not /v1/payments.
    let r = gw.send_v1(&reader, "GET", "/V1/payments/p1", b"").await;
    assert_problem(r, 404, "no_route").await;
}

// ---- 5. Ambiguous credentials ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_header_twice_or_two_schemes_is_400() {
    let echo = Echo::start().await;
    let gw = Gateway::start(Options::new(&echo)).await;
    let key = gw.mint(json!({})).await;
    let bearer = gw.mint(json!({"auth": "bearer"})).await;
    let target = "/v1/verifies/x";
    let base = v1_headers(&key, "GET", target, b"", now(), "dup-1");
    for name in [
        "x-api-public-key",
        "x-api-signature",
        "x-api-nonce",
        "x-api-timestamp",
    ] {
        let mut h = base.clone();
        let value = h.iter().find(|(k, _)| k == name).unwrap().1.clone();
        h.push((name.to_owned(), value));
        let r = gw.send("GET", target, &h, b"").await;
        assert_problem(r, 400, "malformed_credentials").await;
    }
    for extra in [
        ("authorization", format!("Bearer {}", bearer.secret)),
        ("x-api-key", bearer.secret.clone()),
    ] {
        let mut h = base.clone();
        h.push((extra.0.to_owned(), extra.1));
        let r = gw.send("GET", target, &h, b"").await;
        assert_problem(r, 400, "malformed_credentials").await;
    }
    let twice = [
        vec![("x-api-key".to_owned(), bearer.secret.clone()); 2],
        vec![
            (
                "authorization".to_owned(),
                format!("Bearer {}", bearer.secret)
            );
            2
        ],
        vec![
            (
                "authorization".to_owned(),
                format!("Bearer {}", bearer.secret),
            ),
            ("x-api-key".to_owned(), "something-else".to_owned()),
        ],
    ];
    for h in twice {
        let r = gw.send("GET", target, &h, b"").await;
        assert_problem(r, 400, "malformed_credentials").await;
    }
    assert_eq!(echo.count(), 0);
    // One of each still works.
    assert_eq!(gw.send("GET", target, &base, b"").await.status(), 200);
}

// ---- 6. Forwarded addresses a trusted proxy cannot vouch for ---------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_forwarded_for_from_a_trusted_proxy_is_400() {
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    opts.server_extra = "trusted_proxies = [\"127.0.0.0/8\"]".into();
    let gw = Gateway::start(opts).await;
    let key = gw.mint(json!({"ip_allow_list": ["127.0.0.0/8"]})).await;
    for xff in [&b"\xff, 203.0.113.7"[..], b"203.0.113.7, bogus", b"unknown"] {
        let signed = support::v1_lines(&key, "GET", "/v1/payments/p1", b"", now());
        let mut req = format!("GET /v1/payments/p1 HTTP/1.1\r\nhost: gw\r\n{signed}").into_bytes();
        req.extend_from_slice(b"x-forwarded-for: ");
        req.extend_from_slice(xff);
        req.extend_from_slice(b"\r\n\r\n");
        let out = raw_exchange(gw.proxy, &[&req], Duration::ZERO, Duration::from_secs(3)).await;
        assert_eq!(
            status_of(&out),
            400,
            "{}: {out}",
            String::from_utf8_lossy(xff)
        );
        assert!(out.contains("bad_request"), "{out}");
    }
    // A readable one is believed, and this one is outside the key's allow-list.
    let mut h = v1_headers(&key, "GET", "/v1/payments/p1", b"", now(), "xff-ok");
    h.push(("x-forwarded-for".into(), "203.0.113.7".into()));
    let r = gw.send("GET", "/v1/payments/p1", &h, b"").await;
    assert_problem(r, 403, "ip_not_allowed").await;
    assert_eq!(echo.count(), 0);
}

// ---- 8. Underscore spellings never reach the upstream ----------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn underscore_spellings_of_identity_and_credential_headers_are_stripped() {
    let echo = Echo::start().await;
    let gw = Gateway::start(Options::new(&echo)).await;
    let key = gw.mint(json!({})).await;
    for target in ["/v1/payments/p1", "/v1/verifies/x"] {
        let mut h = v1_headers(
            &key,
            "GET",
            target,
            b"",
            now(),
            &uuid::Uuid::new_v4().to_string(),
        );
        for name in [
            "x_keygate_owner",
            "X_Keygate_Key_Id",
            "x_api_key",
            "x_api_signature",
            "x-keygate_scopes",
        ] {
            h.push((name.into(), "forged".into()));
        }
        assert_eq!(gw.send("GET", target, &h, b"").await.status(), 200);
        let seen = echo.seen().pop().unwrap();
        for (name, value) in &seen.headers {
            assert_ne!(value, "forged", "{target}: {name} reached the upstream");
        }
        assert_eq!(seen.headers["x-keygate-owner"], "acme");
    }
}

// ---- 9. Body nonces are bounded like header nonces -------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hmac_body_nonce_follows_the_header_nonce_rule() {
    let echo = Echo::start().await;
    let gw = Gateway::start(Options::new(&echo)).await;
    let key = gw.mint(json!({"auth": "hmac-body"})).await;
    for (nonce, status) in [
        (json!("n".repeat(64)), 200),
        (json!(1_733_000_000_123_u64), 200),
        (json!("n".repeat(65)), 401),
        (json!("x".repeat(900 * 1024)), 401),
        (json!("has space"), 401),
    ] {
        let body = serde_json::to_vec(&json!({"amount": "1.00", "nonce": nonce})).unwrap();
        let h = support::body_headers(&key, &body);
        let r = gw.send("POST", "/v1/payments", &h, &body).await;
        if status == 200 {
            assert_eq!(r.status(), 200);
        } else {
            assert_problem(r, 401, "missing_nonce").await;
        }
    }
    assert_eq!(echo.count(), 2);
}

// ---- 10. Hygiene -------------------------------------------------------------------------

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_files_are_private_and_secrets_can_come_from_files() {
    use std::os::unix::fs::PermissionsExt;
    let echo = Echo::start().await;
    let token = "kgadm_from_a_file_0123456789";
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut opts = Options::new(&echo);
    opts.admin_token_env = false;
    opts.admin_extra = format!("token_file = {:?}", token_file.display().to_string());
    let gw = Gateway::start(opts).await;

    let mode = |p: std::path::PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(gw.dir.join("keygate.db")), 0o600);
    assert_eq!(mode(gw.dir.join("keygate.db.nonces")), 0o700);

    let ok = gw.admin_get("/v1/keys", token).await;
    assert_eq!(ok.status(), 200);
    let refused = gw.admin_get("/v1/keys", ADMIN_TOKEN).await;
    assert_eq!(
        refused.status(),
        401,
        "the env token was not given this time"
    );
    // The master key came from the environment: said once, as a warning.
    assert!(
        gw.log().contains("KEYGATE_MASTER_KEY is set"),
        "{}",
        gw.log()
    );
    assert!(!gw.log().contains("KEYGATE_ADMIN_TOKEN is set"));

    // A token file others can read is refused at start.
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = std::fs::read_to_string(gw.dir.join("keygate.toml")).unwrap();
    std::fs::write(dir.path().join("again.toml"), config).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["serve", "--config"])
        .arg(dir.path().join("again.toml"))
        .env("KEYGATE_MASTER_KEY", &gw.master_key)
        .env_remove("KEYGATE_ADMIN_TOKEN")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(
        stderr.contains("admin.token_file") && stderr.contains("chmod 600"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_framing_is_400_not_500_and_never_forwarded() {
    let echo = Echo::start().await;
    let gw = Gateway::start(Options::new(&echo)).await;
    let bearer = gw.mint(json!({"auth": "bearer"})).await;
    let auth = format!("authorization: Bearer {}\r\n", bearer.secret);
    for (what, request) in [
        ("CL list", format!("POST /v1/payments HTTP/1.1\r\nhost: gw\r\n{auth}content-length: 7, 7\r\n\r\n{{\"a\":1}}")),
        ("CL leading zero", format!("POST /v1/payments HTTP/1.1\r\nhost: gw\r\n{auth}content-length: 07\r\n\r\n{{\"a\":1}}")),
        ("CL public", "POST /public/x HTTP/1.1\r\nhost: gw\r\ncontent-length: 07\r\n\r\n{\"a\":1}".to_owned()),
        ("bad chunk size", format!("POST /v1/payments HTTP/1.1\r\nhost: gw\r\n{auth}transfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n")),
    ] {
        let out = gw.raw(request.as_bytes()).await;
        assert_eq!(status_of(&out), 400, "{what}: {out}");
        assert!(out.contains("bad_request"), "{what}: {out}");
    }
    assert_eq!(echo.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_chunk_on_a_public_route_is_400_not_500() {
    let echo = Echo::start().await;
    let gw = Gateway::start(Options::new(&echo)).await;
    let out = gw
        .raw(b"POST /public/x HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n")
        .await;
    assert_eq!(status_of(&out), 400, "{out}");
    assert!(out.contains("bad_request"), "{out}");
    // Public routes stream: the upstream may have seen the head and a body cut short, never
    // a whole request.
    assert!(echo.seen().iter().all(|r| r.body.is_empty()));
}

/// The claims of a compact JWS, unverified (the assertion tests verify signatures).
fn jws_claims(token: &str) -> Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// Issue 24: the assertion's `jti` was the client's `x-request-id`, so a client could send the
/// `jti`s another client's requests were about to carry, and an upstream refusing seen `jti`s
/// would refuse that client's payments. Now the `jti` is keygate's, random per request; the
/// client's `x-request-id` stays the correlation id, upstream and in the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_assertion_jti_is_random_per_request_whatever_the_request_id() {
    let echo = Echo::start().await;
    let gw = Gateway::start(Options::new(&echo)).await;
    let key = gw
        .mint(json!({"owner": "acme", "scopes": ["payments.*"]}))
        .await;
    let chosen = "victim-next-id-0000000041";
    let mut jtis = Vec::new();
    for _ in 0..2 {
        echo.clear();
        let mut headers = v1_headers(
            &key,
            "POST",
            "/v1/payments",
            b"{}",
            now(),
            &uuid::Uuid::new_v4().to_string(),
        );
        headers.push(("x-request-id".into(), chosen.into()));
        let r = gw.send("POST", "/v1/payments", &headers, b"{}").await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-request-id"], chosen);
        let seen = echo.seen().pop().unwrap();
        assert_eq!(seen.headers["x-request-id"], chosen);
        let claims = jws_claims(seen.headers["x-keygate-assertion"].to_str().unwrap());
        let jti = claims["jti"].as_str().unwrap().to_owned();
        assert_ne!(jti, chosen);
        assert!(
            jti.len() >= 24 && jti.bytes().all(|b| b.is_ascii_hexdigit()),
            "not 96 random bits or more: {jti}"
        );
        jtis.push(jti);
    }
    assert_ne!(jtis[0], jtis[1], "two requests, one jti");
}

/// Issue 24: keygate's own request ids were a per-process prefix and a counter: seeing one
/// told a client the next. Over 1,000 requests they are distinct, each at least 96 bits of
/// hex, and consecutive ids share no run a counter would leave (a common prefix of 8 hex
/// digits happens by chance once in 4 billion pairs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keygates_request_ids_are_random_not_a_counter() {
    let echo = Echo::start().await;
    let gw = Gateway::start(Options::new(&echo)).await;
    let mut ids: Vec<String> = Vec::with_capacity(1000);
    for _ in 0..1000 {
        // Answered by keygate itself (no route): the id is keygate's, not an upstream's.
        let r = gw.send("GET", "/nowhere", &[], b"").await;
        assert_eq!(r.status(), 404);
        ids.push(r.headers()["x-request-id"].to_str().unwrap().to_owned());
    }
    for id in &ids {
        assert!(
            id.len() >= 24 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "not 96 random bits or more: {id}"
        );
    }
    let distinct: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "a request id repeated");
    for pair in ids.windows(2) {
        let shared = pair[0]
            .bytes()
            .zip(pair[1].bytes())
            .take_while(|(a, b)| a == b)
            .count();
        let shared_tail = pair[0]
            .bytes()
            .rev()
            .zip(pair[1].bytes().rev())
            .take_while(|(a, b)| a == b)
            .count();
        assert!(
            shared < 8 && shared_tail < 8,
            "consecutive ids look like a sequence: {} then {}",
            pair[0],
            pair[1]
        );
    }
}
