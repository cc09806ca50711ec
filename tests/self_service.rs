//! Self-service on the proxy listener (SPEC §5): a key with `keys.manage`, signed as usual,
//! manages its own owner's keys and nothing else. Two owners throughout.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use serde_json::{json, Value};
use support::{assert_problem, Echo, Gateway, Key, Options, ADMIN_TOKEN};

struct World {
    echo: Echo,
    gw: Gateway,
    /// acme's manager: may manage keys, holds payments.*.
    manager: Key,
    /// acme's ordinary key.
    acme_key: Key,
    /// Another owner's key.
    globex_key: Key,
}

async fn world() -> World {
    let echo = Echo::start().await;
    let gw = Gateway::start(Options::new(&echo)).await;
    let manager = gw
        .mint(json!({"owner": "acme", "scopes": ["keys.manage", "payments.*"]}))
        .await;
    let acme_key = gw
        .mint(json!({"owner": "acme", "scopes": ["payments.read"]}))
        .await;
    let globex_key = gw
        .mint(json!({"owner": "globex", "scopes": ["payments.*"]}))
        .await;
    World {
        echo,
        gw,
        manager,
        acme_key,
        globex_key,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manager_mints_lists_gets_rotates_and_revokes_its_own_keys() {
    let w = world().await;
    let r =
        w.gw.call(
            &w.manager,
            "POST",
            "/_keygate/v1/keys",
            json!({"name": "from self-service", "scopes": ["payments.create"]}),
        )
        .await;
    assert_eq!(r.status(), 201);
    assert!(r.headers().contains_key("x-request-id"));
    let minted: Value = r.json().await.unwrap();
    assert_eq!(minted["owner"], "acme", "owner defaults to the caller's");
    assert!(minted["secret"].as_str().unwrap().starts_with("sk_test_"));
    let id = minted["id"].as_str().unwrap().to_owned();

    let list: Value =
        w.gw.call(&w.manager, "GET", "/_keygate/v1/keys", Value::Null)
            .await
            .json()
            .await
            .unwrap();
    let owners: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["owner"].as_str().unwrap())
        .collect();
    assert_eq!(owners.len(), 3, "{list}");
    assert!(owners.iter().all(|o| *o == "acme"));
    // Asking for another owner's listing still yields only its own keys.
    let list: Value =
        w.gw.call(
            &w.manager,
            "GET",
            "/_keygate/v1/keys?owner=globex",
            Value::Null,
        )
        .await
        .json()
        .await
        .unwrap();
    assert!(list["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k["owner"] == "acme"));

    let got =
        w.gw.call(
            &w.manager,
            "GET",
            &format!("/_keygate/v1/keys/{id}"),
            Value::Null,
        )
        .await;
    assert_eq!(got.status(), 200);
    let rotated =
        w.gw.call(
            &w.manager,
            "POST",
            &format!("/_keygate/v1/keys/{id}/rotate"),
            json!({"grace_seconds": 0}),
        )
        .await;
    assert_eq!(rotated.status(), 200);
    assert!(rotated.json::<Value>().await.unwrap()["secret"].is_string());
    let revoked =
        w.gw.call(
            &w.manager,
            "POST",
            &format!("/_keygate/v1/keys/{}/revoke", w.acme_key.id),
            Value::Null,
        )
        .await;
    assert_eq!(revoked.status(), 200);
    assert_problem(
        w.gw.send_v1(&w.acme_key, "GET", "/v1/payments/p1", b"")
            .await,
        401,
        "revoked_key",
    )
    .await;

    // The audit log names the key that acted.
    let log: Value =
        w.gw.admin_get(&format!("/v1/audit?key_id={id}"), ADMIN_TOKEN)
            .await
            .json()
            .await
            .unwrap();
    let actors: Vec<&Value> = log["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["actor"])
        .collect();
    assert_eq!(actors.len(), 2, "{log}");
    assert!(actors
        .iter()
        .all(|a| **a == json!({"kind": "key", "key_id": w.manager.id})));
    assert_eq!(
        w.echo.count(),
        0,
        "self-service must never reach the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_owners_keys_are_not_found() {
    let w = world().await;
    let other = &w.globex_key;
    for (method, target) in [
        ("GET", format!("/_keygate/v1/keys/{}", other.id)),
        ("GET", format!("/_keygate/v1/keys/{}", other.public_key)),
        ("POST", format!("/_keygate/v1/keys/{}/rotate", other.id)),
        ("POST", format!("/_keygate/v1/keys/{}/revoke", other.id)),
    ] {
        let r = w.gw.call(&w.manager, method, &target, Value::Null).await;
        assert_problem(r, 404, "not_found").await;
    }
    // Untouched: the other owner's key still works.
    assert_eq!(
        w.gw.send_v1(other, "POST", "/v1/payments", b"{}")
            .await
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manager_cannot_grant_more_than_it_holds_or_mint_for_others() {
    let w = world().await;
    let r =
        w.gw.call(
            &w.manager,
            "POST",
            "/_keygate/v1/keys",
            json!({"name": "x", "scopes": ["refunds.create", "payments.read"]}),
        )
        .await;
    let body = assert_problem(r, 422, "validation_failed").await;
    assert_eq!(
        body["errors"],
        json!({"scopes[0]": "you can only grant scopes you hold"})
    );
    let r =
        w.gw.call(
            &w.manager,
            "POST",
            "/_keygate/v1/keys",
            json!({"name": "x", "scopes": ["*"]}),
        )
        .await;
    assert_problem(r, 422, "validation_failed").await;
    let r =
        w.gw.call(
            &w.manager,
            "POST",
            "/_keygate/v1/keys",
            json!({"name": "x", "owner": "globex"}),
        )
        .await;
    let body = assert_problem(r, 422, "validation_failed").await;
    assert!(body["errors"].get("owner").is_some());
    // Holding keys.manage, it may hand keys.manage on.
    let r =
        w.gw.call(
            &w.manager,
            "POST",
            "/_keygate/v1/keys",
            json!({"name": "deputy", "scopes": ["keys.manage"]}),
        )
        .await;
    assert_eq!(r.status(), 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_without_keys_manage_and_unsigned_calls_are_refused() {
    let w = world().await;
    let r =
        w.gw.call(&w.acme_key, "GET", "/_keygate/v1/keys", Value::Null)
            .await;
    let body = assert_problem(r, 403, "insufficient_scope").await;
    assert!(body["detail"].as_str().unwrap().contains("keys.manage"));
    let r = w.gw.send("GET", "/_keygate/v1/keys", &[], b"").await;
    assert_problem(r, 401, "missing_credentials").await;
    // Operations self-service does not offer.
    let r =
        w.gw.call(
            &w.manager,
            "DELETE",
            &format!("/_keygate/v1/keys/{}", w.acme_key.id),
            Value::Null,
        )
        .await;
    assert_problem(r, 404, "not_found").await;
    let r =
        w.gw.call(
            &w.manager,
            "PATCH",
            &format!("/_keygate/v1/keys/{}", w.acme_key.id),
            json!({"name": "n"}),
        )
        .await;
    assert_problem(r, 404, "not_found").await;
    // Replays are refused like anywhere else on the proxy.
    let h = support::v1_headers(
        &w.manager,
        "GET",
        "/_keygate/v1/keys",
        b"",
        support::now(),
        "once-only",
    );
    assert_eq!(
        w.gw.send("GET", "/_keygate/v1/keys", &h, b"")
            .await
            .status(),
        200
    );
    assert_problem(
        w.gw.send("GET", "/_keygate/v1/keys", &h, b"").await,
        401,
        "replayed_nonce",
    )
    .await;
    assert_eq!(w.echo.count(), 0);
}

/// A signed call as if from `ip` (the gateway trusts the loopback proxy's X-Forwarded-For).
async fn call_from(
    gw: &Gateway,
    key: &Key,
    ip: &str,
    method: &str,
    target: &str,
    body: Value,
) -> reqwest::Response {
    gw.call_with(key, method, target, body, &[("x-forwarded-for", ip)])
        .await
}

/// Issue 24: a `keys.manage` key narrowed by an operator kept full control of a key it had
/// minted while broader — it rotated it and used the new secret from outside its new
/// allow-list, with a scope it no longer holds. Having minted a key is no longer enough to
/// change it: the caller must hold every power of the target now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_narrowed_manager_cannot_change_a_broader_key_it_minted() {
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    opts.server_extra = "trusted_proxies = [\"127.0.0.1/32\"]".into();
    let gw = Gateway::start(opts).await;
    let inside = "198.51.100.7";
    let outside = "203.0.113.9";
    let parent = gw
        .mint(json!({"owner": "acme", "scopes": ["keys.manage", "payments.*"]}))
        .await;
    let r = call_from(
        &gw,
        &parent,
        outside,
        "POST",
        "/_keygate/v1/keys",
        json!({"name": "child", "scopes": ["payments.create"]}),
    )
    .await;
    assert_eq!(r.status(), 201);
    let child: Value = r.json().await.unwrap();
    let child_id = child["id"].as_str().unwrap().to_owned();
    let child_pk = child["public_key"].as_str().unwrap().to_owned();

    // The operator narrows the parent and rotates the child.
    let r = gw
        .http
        .patch(gw.admin_url(&format!("/v1/keys/{}", parent.id)))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"scopes": ["keys.manage", "payments.read"],
                      "ip_allow_list": ["198.51.100.0/24"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = gw
        .http
        .post(gw.admin_url(&format!("/v1/keys/{child_id}/rotate")))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"grace_seconds": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let admins: Value = r.json().await.unwrap();
    let child_key = Key {
        id: child_id.clone(),
        public_key: child_pk.clone(),
        secret: admins["secret"].as_str().unwrap().to_owned(),
        record: admins.clone(),
    };

    // The reproductions: rotate by id, rotate by public key, revoke — all refused, and the
    // refusal names what the parent lacks.
    for (what, target) in [
        (
            "rotate by id",
            format!("/_keygate/v1/keys/{child_id}/rotate"),
        ),
        (
            "rotate by public key",
            format!("/_keygate/v1/keys/{child_pk}/rotate"),
        ),
        ("revoke", format!("/_keygate/v1/keys/{child_id}/revoke")),
    ] {
        let r = call_from(
            &gw,
            &parent,
            inside,
            "POST",
            &target,
            json!({"grace_seconds": 0}),
        )
        .await;
        let body = assert_problem(r, 403, "insufficient_scope").await;
        let errors = body["errors"].as_object().unwrap();
        assert!(errors.contains_key("scopes[0]"), "{what}: {body}");
        assert!(errors.contains_key("ip_allow_list"), "{what}: {body}");
        assert!(body.get("secret").is_none(), "{what}");
    }
    // The child still answers to the operator's secret alone, and is not revoked.
    let r = call_from(&gw, &child_key, outside, "POST", "/v1/payments", json!({})).await;
    assert_eq!(r.status(), 200, "the operator's rotation still stands");
    assert!(gw.key_record(&child_id).await["revoked_at"].is_null());
    // Listing and reading still show it: the parent sees what it minted.
    let r = call_from(
        &gw,
        &parent,
        inside,
        "GET",
        &format!("/_keygate/v1/keys/{child_id}"),
        Value::Null,
    )
    .await;
    assert_eq!(r.status(), 200);
    // A key within the parent's new powers it still manages.
    let r = call_from(
        &gw,
        &parent,
        inside,
        "POST",
        "/_keygate/v1/keys",
        json!({"name": "narrow child", "scopes": ["payments.read"]}),
    )
    .await;
    assert_eq!(r.status(), 201);
    let narrow: Value = r.json().await.unwrap();
    let r = call_from(
        &gw,
        &parent,
        inside,
        "POST",
        &format!(
            "/_keygate/v1/keys/{}/rotate",
            narrow["id"].as_str().unwrap()
        ),
        json!({"grace_seconds": 0}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        echo.count(),
        1,
        "only the child's payment reached the upstream"
    );
}

/// Issue 24: self-service read JSON bodies under any Content-Type too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_self_service_body_must_be_json() {
    let w = world().await;
    let body = serde_json::to_vec(&json!({"name": "ct", "scopes": ["payments.read"]})).unwrap();
    for ctype in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let mut h = support::v1_headers(
            &w.manager,
            "POST",
            "/_keygate/v1/keys",
            &body,
            support::now(),
            &uuid::Uuid::new_v4().to_string(),
        );
        if let Some(c) = ctype {
            h.push(("content-type".into(), c.into()));
        }
        let r = w.gw.send("POST", "/_keygate/v1/keys", &h, &body).await;
        assert_problem(r, 415, "unsupported_media_type").await;
    }
    let mut h = support::v1_headers(
        &w.manager,
        "POST",
        "/_keygate/v1/keys",
        &body,
        support::now(),
        "charset-ok",
    );
    h.push((
        "content-type".into(),
        "application/json; charset=utf-8".into(),
    ));
    let r = w.gw.send("POST", "/_keygate/v1/keys", &h, &body).await;
    assert_eq!(r.status(), 201);
    // Bodiless calls need none.
    let r =
        w.gw.call(&w.manager, "GET", "/_keygate/v1/keys", Value::Null)
            .await;
    assert_eq!(r.status(), 200);
}
