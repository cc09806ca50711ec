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
