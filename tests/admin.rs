//! The admin API through the real binary: tokens, minting, reading, listing, revoking,
//! validation errors, health and readiness.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use serde_json::{json, Value};
use support::{assert_problem, Echo, Gateway, Key, Options, ADMIN_TOKEN};

async fn setup() -> (Echo, Gateway) {
    let echo = Echo::start().await;
    let gw = Gateway::start(Options::new(&echo)).await;
    (echo, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness_need_no_token() {
    let (_echo, gw) = setup().await;
    let r = gw.http.get(gw.admin_url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-request-id"));
    let r = gw.http.get(gw.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body,
        json!({"store": true, "proxy_listener": true, "assertion_keys": true})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_calls_need_an_accepted_admin_token() {
    let (_echo, gw) = setup().await;
    let r = gw.http.get(gw.admin_url("/v1/keys")).send().await.unwrap();
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    assert_problem(r, 401, "unauthorized").await;
    let r = gw.admin_get("/v1/keys", "wrong").await;
    assert_problem(r, 401, "unauthorized").await;
    let r = gw.admin_get("/v1/keys", ADMIN_TOKEN).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_sha256_from_config_is_accepted() {
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    let token = "ops-team-token";
    let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(token.as_bytes()));
    opts.admin_token_sha256 = vec![hash];
    let gw = Gateway::start(opts).await;
    let r = gw.admin_get("/v1/keys", token).await;
    assert_eq!(r.status(), 200);
    let r = gw.admin_get("/v1/keys", ADMIN_TOKEN).await;
    assert_eq!(
        r.status(),
        200,
        "the environment token still works beside the hashes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minting_returns_the_secret_once_and_reading_never_does() {
    let (_echo, gw) = setup().await;
    let key = gw
        .mint(json!({
            "owner": "merchant_7",
            "name": "checkout",
            "description": "web checkout",
            "scopes": ["payments.create"],
            "ip_allow_list": ["10.0.0.0/8", "2001:db8::1"],
            "expires_at": "2099-01-01T00:00:00Z",
            "environment": "live",
            "metadata": {"created_by_user_id": "u_1"}
        }))
        .await;
    let r = &key.record;
    assert!(key.id.starts_with("key_") && key.id.len() == 4 + 36);
    assert!(key.public_key.starts_with("pk_live_") && key.public_key.len() == 8 + 24);
    assert!(key.secret.starts_with("sk_live_") && key.secret.len() == 8 + 43);
    assert_eq!(r["secret_prefix"], &key.secret[..12]);
    assert_eq!(r["ip_allow_list"], json!(["10.0.0.0/8", "2001:db8::1/128"]));
    assert_eq!(r["expires_at"], "2099-01-01T00:00:00Z");
    assert_eq!(r["auth"], "hmac-v1");
    assert_eq!(r["metadata"]["created_by_user_id"], "u_1");
    assert_eq!(r["total_requests"], 0);
    assert_eq!(r["revoked_at"], Value::Null);
    assert_eq!(r["last_used_at"], Value::Null);

    for id in [&key.id, &key.public_key] {
        let got: Value = gw
            .admin_get(&format!("/v1/keys/{id}"), ADMIN_TOKEN)
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(got["id"], key.id.as_str());
        assert!(got.get("secret").is_none(), "secret shown again: {got}");
        assert!(!got.to_string().contains(&key.secret));
    }
    let r = gw.admin_get("/v1/keys/key_nope", ADMIN_TOKEN).await;
    assert_problem(r, 404, "not_found").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_fields_are_each_named_in_a_422() {
    let (_echo, gw) = setup().await;
    let post = |body: String| {
        gw.http
            .post(gw.admin_url("/v1/keys"))
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let r = post(json!({"owner": "", "name": "x".repeat(256), "scopes": ["Pay"], "ip_allow_list": ["300.0.0.1"], "auth": "magic"}).to_string())
        .await
        .unwrap();
    let body = assert_problem(r, 422, "validation_failed").await;
    let fields: Vec<&String> = body["errors"].as_object().unwrap().keys().collect();
    assert_eq!(
        fields,
        ["auth", "ip_allow_list[0]", "name", "owner", "scopes[0]"]
    );
    // Issue 24: an entry with host bits set was widened (10.9.9.9/0 stored as 0.0.0.0/0).
    for entry in ["10.9.9.9/0", "192.168.1.1/24", "2001:db8::1/64"] {
        let r = post(
            json!({"owner": "a", "name": "b", "ip_allow_list": ["10.0.0.1", "10.0.0.0/8", entry]})
                .to_string(),
        )
        .await
        .unwrap();
        let body = assert_problem(r, 422, "validation_failed").await;
        let msg = body["errors"]["ip_allow_list[2]"]
            .as_str()
            .unwrap_or_default();
        assert!(
            msg.contains(&format!("{entry:?}")) && msg.contains("host bits"),
            "{body}"
        );
        assert_eq!(body["errors"].as_object().unwrap().len(), 1, "{body}");
    }
    let r = post("{\"owner\": ".into()).await.unwrap();
    assert_problem(r, 400, "malformed_json").await;
    let r = post(json!({"owner": "a", "name": "b", "colour": "red"}).to_string())
        .await
        .unwrap();
    let body = assert_problem(r, 422, "validation_failed").await;
    assert!(body["errors"].to_string().contains("colour"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_filters_by_owner_and_pages_with_a_cursor() {
    let (_echo, gw) = setup().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(gw.mint(json!({"owner": "acme"})).await.id);
    }
    gw.mint(json!({"owner": "globex"})).await;
    ids.reverse();
    let list = |q: String| {
        let gw = &gw;
        async move {
            let r = gw.admin_get(&format!("/v1/keys?{q}"), ADMIN_TOKEN).await;
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (s, page1) = list("owner=acme&limit=2".into()).await;
    assert_eq!(s, 200);
    let cursor = page1["next_cursor"].as_str().unwrap().to_owned();
    let (_, page2) = list(format!("owner=acme&limit=2&cursor={cursor}")).await;
    assert_eq!(page2["next_cursor"], Value::Null);
    let got: Vec<&str> = page1["items"]
        .as_array()
        .unwrap()
        .iter()
        .chain(page2["items"].as_array().unwrap())
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, ids);
    assert!(page1["items"][0].get("secret").is_none());
    let (s, body) = list("limit=201".into()).await;
    assert_eq!((s, body["code"].as_str()), (422, Some("validation_failed")));
    let (_, all) = list(String::new()).await;
    assert_eq!(all["items"].as_array().unwrap().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_is_recorded_and_idempotent() {
    let (_echo, gw) = setup().await;
    let key = gw.mint(json!({})).await;
    let revoke = || {
        gw.http
            .post(gw.admin_url(&format!("/v1/keys/{}/revoke", key.id)))
            .bearer_auth(ADMIN_TOKEN)
            .send()
    };
    let first: Value = revoke().await.unwrap().json().await.unwrap();
    assert!(first["revoked_at"].is_string());
    let second: Value = revoke().await.unwrap().json().await.unwrap();
    assert_eq!(first["revoked_at"], second["revoked_at"]);
    let r = gw
        .http
        .post(gw.admin_url("/v1/keys/key_nope/revoke"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_problem(r, 404, "not_found").await;
}

async fn send_json(
    gw: &Gateway,
    method: reqwest::Method,
    path: &str,
    body: Value,
) -> reqwest::Response {
    gw.http
        .request(method, gw.admin_url(path))
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_applies_to_the_very_next_request() {
    let (echo, gw) = setup().await;
    let key = gw
        .mint(json!({"scopes": ["payments.read"], "description": "old"}))
        .await;
    assert_problem(
        gw.send_v1(&key, "POST", "/v1/payments", b"{}").await,
        403,
        "insufficient_scope",
    )
    .await;
    let path = format!("/v1/keys/{}", key.id);
    let r = send_json(
        &gw,
        reqwest::Method::PATCH,
        &path,
        json!({"scopes": ["payments.create"], "description": null}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let updated: Value = r.json().await.unwrap();
    assert_eq!(updated["scopes"], json!(["payments.create"]));
    assert_eq!(updated["description"], Value::Null);
    assert!(updated.get("secret").is_none());
    assert_eq!(
        gw.send_v1(&key, "POST", "/v1/payments", b"{}")
            .await
            .status(),
        200
    );

    let r = send_json(
        &gw,
        reqwest::Method::PATCH,
        &path,
        json!({"ip_allow_list": ["10.0.0.0/8"]}),
    )
    .await;
    assert_eq!(r.status(), 200);
    echo.clear();
    assert_problem(
        gw.send_v1(&key, "POST", "/v1/payments", b"{}").await,
        403,
        "ip_not_allowed",
    )
    .await;
    assert_eq!(echo.count(), 0);

    let r = send_json(
        &gw,
        reqwest::Method::PATCH,
        &path,
        json!({"owner": "someone-else"}),
    )
    .await;
    let body = assert_problem(r, 422, "validation_failed").await;
    assert_eq!(body["errors"]["owner"], "unknown field");
    let r = send_json(
        &gw,
        reqwest::Method::PATCH,
        &path,
        json!({"expires_at": "2001-01-01T00:00:00Z", "scopes": ["BAD"]}),
    )
    .await;
    let body = assert_problem(r, 422, "validation_failed").await;
    assert!(
        body["errors"].get("expires_at").is_some() && body["errors"].get("scopes[0]").is_some(),
        "{body}"
    );
    let unchanged: Value = gw.admin_get(&path, ADMIN_TOKEN).await.json().await.unwrap();
    assert_eq!(
        unchanged["scopes"],
        json!(["payments.create"]),
        "a refused patch changed the key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_the_old_secret_for_its_grace_only() {
    let (_echo, gw) = setup().await;
    let first = gw.mint(json!({})).await;
    let path = format!("/v1/keys/{}/rotate", first.id);
    let r = send_json(
        &gw,
        reqwest::Method::POST,
        &path,
        json!({"grace_seconds": 3600}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let rotated: Value = r.json().await.unwrap();
    let second = support::Key {
        secret: rotated["secret"].as_str().unwrap().to_owned(),
        record: rotated.clone(),
        ..first.clone()
    };
    assert_ne!(second.secret, first.secret);
    assert_eq!(
        rotated["public_key"],
        first.public_key.as_str(),
        "rotation keeps the public key"
    );
    assert_eq!(rotated["secret_prefix"], &second.secret[..12]);
    assert_eq!(
        gw.send_v1(&first, "POST", "/v1/payments", b"{}")
            .await
            .status(),
        200,
        "old secret inside grace"
    );
    assert_eq!(
        gw.send_v1(&second, "POST", "/v1/payments", b"{}")
            .await
            .status(),
        200,
        "new secret"
    );

    // A second rotation ends the first grace at once; with grace 0 the second secret goes too.
    let r = gw
        .http
        .post(gw.admin_url(&path))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "an empty body means grace 0");
    let third = support::Key {
        secret: r.json::<Value>().await.unwrap()["secret"]
            .as_str()
            .unwrap()
            .to_owned(),
        ..first.clone()
    };
    assert_problem(
        gw.send_v1(&first, "POST", "/v1/payments", b"{}").await,
        401,
        "bad_signature",
    )
    .await;
    assert_problem(
        gw.send_v1(&second, "POST", "/v1/payments", b"{}").await,
        401,
        "bad_signature",
    )
    .await;
    assert_eq!(
        gw.send_v1(&third, "POST", "/v1/payments", b"{}")
            .await
            .status(),
        200
    );

    let r = send_json(
        &gw,
        reqwest::Method::POST,
        &path,
        json!({"grace_seconds": 604_801}),
    )
    .await;
    let body = assert_problem(r, 422, "validation_failed").await;
    assert!(body["errors"].get("grace_seconds").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_rotation_grace_through_the_proxy() {
    let (_echo, gw) = setup().await;
    let key = gw.mint(json!({"auth": "bearer"})).await;
    let r = send_json(
        &gw,
        reqwest::Method::POST,
        &format!("/v1/keys/{}/rotate", key.id),
        json!({"grace_seconds": 60}),
    )
    .await;
    let fresh = r.json::<Value>().await.unwrap()["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    for secret in [&key.secret, &fresh] {
        let h = vec![("x-api-key".to_owned(), secret.clone())];
        assert_eq!(
            gw.send("POST", "/v1/payments", &h, b"{}").await.status(),
            200
        );
    }
}

/// Issue 24: a bearer key authenticates with its secret alone, so a revoked and deleted bearer
/// key's secret imported under a new public key was 201 and `Bearer S` was 200 again. The
/// revocation tombstones the secret too: the import is 409 `conflict` unless forced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_bearer_secret_is_not_imported_again_under_a_new_public_key_unless_forced() {
    let (_echo, gw) = setup().await;
    let key = gw
        .mint(json!({"auth": "bearer", "scopes": ["payments.read"]}))
        .await;
    let bearer = vec![("authorization".to_owned(), format!("Bearer {}", key.secret))];
    assert_eq!(bearer_status(&gw, &bearer).await, 200);
    gw.revoke(&key).await;
    assert_eq!(bearer_status(&gw, &bearer).await, 401);
    let r = send_json(
        &gw,
        reqwest::Method::DELETE,
        &format!("/v1/keys/{}", key.id),
        Value::Null,
    )
    .await;
    assert_eq!(r.status(), 204);

    let body = json!({"owner": "acme", "name": "r", "public_key": "pk_live_brandnew01", "secret": key.secret, "auth": "bearer", "scopes": ["payments.read"]});
    let r = send_json(&gw, reqwest::Method::POST, "/v1/keys/import", body.clone()).await;
    let problem = assert_problem(r, 409, "conflict").await;
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("secret") && detail.contains("force"),
        "{problem}"
    );
    assert_eq!(bearer_status(&gw, &bearer).await, 401);
    // The operator means it: forced, the secret works again.
    let mut forced = body;
    forced["force"] = json!(true);
    let r = send_json(&gw, reqwest::Method::POST, "/v1/keys/import", forced).await;
    assert_eq!(r.status(), 201);
    assert_eq!(bearer_status(&gw, &bearer).await, 200);
}

async fn bearer_status(gw: &Gateway, h: &[(String, String)]) -> u16 {
    gw.send("GET", "/v1/payments/p1", h, b"")
        .await
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_keys_are_gone_everywhere() {
    let (_echo, gw) = setup().await;
    let key = gw.mint(json!({})).await;
    assert_eq!(
        gw.send_v1(&key, "POST", "/v1/payments", b"{}")
            .await
            .status(),
        200
    );
    let path = format!("/v1/keys/{}", key.id);
    let r = gw
        .http
        .delete(gw.admin_url(&path))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(r.headers().contains_key("x-request-id"));
    assert_problem(gw.admin_get(&path, ADMIN_TOKEN).await, 404, "not_found").await;
    assert_problem(
        gw.send_v1(&key, "POST", "/v1/payments", b"{}").await,
        401,
        "unknown_key",
    )
    .await;
    let r = gw
        .http
        .delete(gw.admin_url(&path))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_problem(r, 404, "not_found").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_onchainpay_style_keys_sign_with_the_secret_as_given() {
    let (echo, gw) = setup().await;
    // The hmac-body signing vector: a base64-looking secret used as text.
    let secret =
        "QoK/3fZY8QK68z3DFvwcTgN4LSTDa8pi6rUNbGQfM4EgKCyt9whSFkbIQOFIAsGKlCZlCE1gyvi0Q6vf77KHKw==";
    let body = json!({"public_key": "ocp_3f9a2c", "secret": secret, "owner": "org_1", "name": "imported", "auth": "hmac-body", "scopes": ["payments.*"]});
    let r = send_json(&gw, reqwest::Method::POST, "/v1/keys/import", body.clone()).await;
    assert_eq!(r.status(), 201);
    let rec: Value = r.json().await.unwrap();
    assert_eq!(rec["public_key"], "ocp_3f9a2c");
    assert_eq!(rec["secret"], secret);
    assert_eq!(rec["environment"], "test");
    let signed = br#"{"from":"ETH","to":"USDT","nonce":1643881172430}"#;
    let h = vec![
        ("x-api-public-key".to_owned(), "ocp_3f9a2c".to_owned()),
        (
            "x-api-signature".to_owned(),
            "30facc8352430dedadd40de2637bd3ae5ff9ac1cacb123d5f180c8c8d9f0168c".to_owned(),
        ),
    ];
    assert_eq!(
        gw.send("POST", "/v1/payments", &h, signed).await.status(),
        200
    );
    assert_eq!(&echo.seen()[0].body[..], &signed[..]);
    let again = send_json(&gw, reqwest::Method::POST, "/v1/keys/import", body).await;
    assert_problem(again, 409, "conflict").await;
    let bad = send_json(
        &gw,
        reqwest::Method::POST,
        "/v1/keys/import",
        json!({"public_key": "has space", "owner": "o", "name": "n"}),
    )
    .await;
    let errs = assert_problem(bad, 422, "validation_failed").await;
    assert!(
        errs["errors"].get("public_key").is_some() && errs["errors"].get("secret").is_some(),
        "{errs}"
    );
}

/// Issue 24: a revoked and deleted key's pair could be imported again (201) and signed at
/// once. Its public key is remembered; importing it again is 409 unless forced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_and_deleted_pair_is_not_imported_again_unless_forced() {
    let (_echo, gw) = setup().await;
    let secret = "sk_test_imported_secret_of_a_leaked_pair_0001";
    let body = json!({"public_key": "pk_test_leaked01", "secret": secret, "owner": "acme", "name": "leaked", "scopes": ["payments.*"]});
    let r = send_json(&gw, reqwest::Method::POST, "/v1/keys/import", body.clone()).await;
    assert_eq!(r.status(), 201);
    let rec: Value = r.json().await.unwrap();
    let id = rec["id"].as_str().unwrap().to_owned();
    let key = Key {
        id: id.clone(),
        public_key: "pk_test_leaked01".into(),
        secret: secret.into(),
        record: rec,
    };
    gw.revoke(&key).await;
    let r = send_json(
        &gw,
        reqwest::Method::DELETE,
        &format!("/v1/keys/{id}"),
        Value::Null,
    )
    .await;
    assert_eq!(r.status(), 204);

    let r = send_json(&gw, reqwest::Method::POST, "/v1/keys/import", body.clone()).await;
    let problem = assert_problem(r, 409, "conflict").await;
    assert!(
        problem["detail"].as_str().unwrap().contains("force"),
        "{problem}"
    );
    assert_problem(
        gw.send_v1(&key, "GET", "/v1/payments/p1", b"").await,
        401,
        "unknown_key",
    )
    .await;
    // The operator means it: forced, the pair is back.
    let mut forced = body;
    forced["force"] = json!(true);
    let r = send_json(&gw, reqwest::Method::POST, "/v1/keys/import", forced).await;
    assert_eq!(r.status(), 201);
    assert_eq!(
        gw.send_v1(&key, "GET", "/v1/payments/p1", b"")
            .await
            .status(),
        200
    );
    // A key deleted without being revoked leaves no mark.
    let other = json!({"public_key": "pk_test_moved01", "secret": secret, "owner": "acme", "name": "moved"});
    let r = send_json(&gw, reqwest::Method::POST, "/v1/keys/import", other.clone()).await;
    let moved: Value = r.json().await.unwrap();
    let r = send_json(
        &gw,
        reqwest::Method::DELETE,
        &format!("/v1/keys/{}", moved["id"].as_str().unwrap()),
        Value::Null,
    )
    .await;
    assert_eq!(r.status(), 204);
    let r = send_json(&gw, reqwest::Method::POST, "/v1/keys/import", other).await;
    assert_eq!(r.status(), 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_filters_by_environment_and_status() {
    let (_echo, gw) = setup().await;
    let live = gw.mint(json!({"owner": "f", "environment": "live"})).await;
    let revoked = gw.mint(json!({"owner": "f"})).await;
    gw.revoke(&revoked).await;
    let active_test = gw.mint(json!({"owner": "f"})).await;
    let ids = |v: Value| {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let gw = &gw;
    let get = |q: &'static str| async move {
        gw.admin_get(&format!("/v1/keys?owner=f&{q}"), ADMIN_TOKEN)
            .await
            .json::<Value>()
            .await
            .unwrap()
    };
    assert_eq!(ids(get("environment=live").await), vec![live.id.clone()]);
    assert_eq!(ids(get("status=revoked").await), vec![revoked.id.clone()]);
    assert_eq!(
        ids(get("status=active&environment=test").await),
        vec![active_test.id.clone()]
    );
    // A filtered page is filled from as many store pages as it takes.
    let page = get("status=active&limit=1").await;
    assert_eq!(ids(page.clone()), vec![active_test.id.clone()]);
    let next = page["next_cursor"].as_str().unwrap().to_owned();
    let rest: Value = gw
        .admin_get(
            &format!("/v1/keys?owner=f&status=active&limit=1&cursor={next}"),
            ADMIN_TOKEN,
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(ids(rest), vec![live.id.clone()]);
    let r = gw.admin_get("/v1/keys?status=sleeping", ADMIN_TOKEN).await;
    assert_problem(r, 422, "validation_failed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_is_audited_with_actor_and_fields_but_no_secret() {
    let (_echo, gw) = setup().await;
    let key = gw.mint(json!({"description": "d"})).await;
    let id = key.id.clone();
    send_json(
        &gw,
        reqwest::Method::PATCH,
        &format!("/v1/keys/{id}"),
        json!({"name": "renamed", "scopes": ["payments.read"]}),
    )
    .await;
    let rotated: Value = send_json(
        &gw,
        reqwest::Method::POST,
        &format!("/v1/keys/{id}/rotate"),
        json!({"grace_seconds": 10}),
    )
    .await
    .json()
    .await
    .unwrap();
    gw.revoke(&key).await;
    let r = gw
        .http
        .delete(gw.admin_url(&format!("/v1/keys/{id}")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);

    let resp = gw
        .admin_get(&format!("/v1/audit?key_id={id}"), ADMIN_TOKEN)
        .await;
    assert_eq!(resp.status(), 200);
    let log: Value = resp.json().await.unwrap();
    let items = log["items"].as_array().unwrap();
    let actions: Vec<&str> = items
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["delete", "revoke", "rotate", "update", "create"]);
    let token_id = &hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
        ADMIN_TOKEN.as_bytes(),
    ))[..12];
    for e in items {
        assert_eq!(e["actor"], json!({"kind": "admin", "token_id": token_id}));
        assert_eq!(e["key_id"], id.as_str());
        assert_eq!(e["owner"], "acme");
        assert!(e["at"].is_string());
    }
    assert_eq!(items[3]["fields"], json!(["name", "scopes"]));
    assert_eq!(items[2]["fields"], json!(["secret"]));
    let text = log.to_string();
    assert!(!text.contains(&key.secret) && !text.contains(rotated["secret"].as_str().unwrap()));
    let by_owner: Value = gw
        .admin_get("/v1/audit?owner=acme&limit=2", ADMIN_TOKEN)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(by_owner["items"].as_array().unwrap().len(), 2);
    assert!(by_owner["next_cursor"].is_string());
    assert_problem(
        gw.admin_get("/v1/audit", "wrong").await,
        401,
        "unauthorized",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_and_methods_are_problem_json() {
    let (_echo, gw) = setup().await;
    assert_problem(
        gw.admin_get("/v2/nothing", ADMIN_TOKEN).await,
        404,
        "not_found",
    )
    .await;
    let r = gw
        .http
        .put(gw.admin_url("/v1/keys"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_problem(r, 405, "method_not_allowed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_openapi_document_matches_the_routes() {
    let (_echo, gw) = setup().await;
    let served: Value = gw
        .admin_get("/v1/openapi.json", ADMIN_TOKEN)
        .await
        .json()
        .await
        .unwrap();
    let file: Value = serde_json::from_str(include_str!("../docs/openapi.json")).unwrap();
    assert_eq!(
        served, file,
        "GET /v1/openapi.json differs from docs/openapi.json"
    );

    let all = ["get", "post", "put", "patch", "delete"];
    for (path, item) in file["paths"].as_object().unwrap() {
        let concrete = path.replace("{id}", "key_does_not_exist");
        for method in all {
            let r = gw
                .http
                .request(
                    method.to_uppercase().parse().unwrap(),
                    gw.admin_url(&concrete),
                )
                .bearer_auth(ADMIN_TOKEN)
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            if item.get(method).is_some() {
                assert_ne!(status, 405, "{method} {path} is documented but not routed");
                assert_ne!(
                    body["detail"], "no such admin endpoint",
                    "{method} {path} is documented but not routed"
                );
            } else {
                assert_eq!(status, 405, "{method} {path} is routed but not documented");
            }
        }
    }
}

/// Issue 24: the admin API read JSON under any Content-Type (a `text/plain` cross-site form
/// post included) and took the bearer scheme only as `Bearer`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_must_be_json_and_the_bearer_scheme_is_case_insensitive() {
    let (_echo, gw) = setup().await;
    let body = json!({"owner": "acme", "name": "ct"}).to_string();
    let send = |path: &str, ctype: Option<&str>, body: &str| {
        let mut req = gw
            .http
            .post(gw.admin_url(path))
            .bearer_auth(ADMIN_TOKEN)
            .body(body.to_owned());
        if let Some(c) = ctype {
            req = req.header("content-type", c);
        }
        req.send()
    };
    for ctype in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        Some("application/jsonx"),
    ] {
        let r = send("/v1/keys", ctype, &body).await.unwrap();
        assert_problem(r, 415, "unsupported_media_type").await;
    }
    let key = gw.mint(json!({})).await;
    let r = send(
        &format!("/v1/keys/{}/rotate", key.id),
        Some("text/plain"),
        "{}",
    )
    .await
    .unwrap();
    assert_problem(r, 415, "unsupported_media_type").await;
    // Nothing was created by the refused posts.
    let list: Value = gw
        .admin_get("/v1/keys", ADMIN_TOKEN)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "{list}");
    for ctype in [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON",
    ] {
        let r = send("/v1/keys", Some(ctype), &body).await.unwrap();
        assert_eq!(r.status(), 201, "{ctype}");
    }
    // A request without a body needs no Content-Type.
    let r = send(&format!("/v1/keys/{}/rotate", key.id), None, "")
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    for scheme in ["bearer", "BEARER", "Bearer"] {
        let r = gw
            .http
            .get(gw.admin_url("/v1/keys"))
            .header("authorization", format!("{scheme} {ADMIN_TOKEN}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{scheme}");
    }
    let r = gw
        .http
        .get(gw.admin_url("/v1/keys"))
        .header("authorization", format!("Basic {ADMIN_TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_problem(r, 401, "unauthorized").await;
}
