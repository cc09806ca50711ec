//! The admin API through the real binary: tokens, minting, reading, listing, revoking,
//! validation errors, health and readiness.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use serde_json::{json, Value};
use support::{assert_problem, Echo, Gateway, Options, ADMIN_TOKEN};

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
    assert_eq!(body, json!({"store": true, "proxy_listener": true}));
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
