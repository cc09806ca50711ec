//! Credits through the real binary: a metered key's `remaining` spent by each route's `cost`,
//! 429 `quota_exhausted` at zero with nothing spent, atomic top-ups through
//! `POST /v1/keys/{id}/credits` (audited), refunds on 5xx where the route says so, no credit
//! spent by a rate-limited request, and a Redis fleet of two gateways never spending more
//! than there is.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use std::sync::Arc;

use serde_json::{json, Value};
use support::redis::RedisServer;
use support::{assert_problem, Echo, Gateway, Key, Options, ADMIN_TOKEN};

fn metered_routes(echo: &Echo) -> String {
    support::routes_with(
        echo.addr,
        r#"[[routes]]
name = "payout"
methods = ["POST"]
path = "/v1/payouts"
upstream = "echo"
cost = 10

[[routes]]
name = "refunding"
methods = ["POST"]
path = "/v1/refunding/*"
upstream = "echo"
cost = 10
refund_on_5xx = true

[[routes]]
name = "limited"
methods = ["POST"]
path = "/v1/limited"
upstream = "echo"
rate_limits = [{ name = "once", limit = 1, window = "1h" }]
"#,
    )
}

async fn remaining(gw: &Gateway, key: &Key) -> Value {
    gw.key_record(&key.id).await["remaining"].clone()
}

/// `remaining` once it reads `want`, or what it reads after 3 s: a refund is made as the
/// request ends, just after its response is sent.
async fn remaining_after_refund(gw: &Gateway, key: &Key, want: u64) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        let now = remaining(gw, key).await;
        if now == want || std::time::Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

async fn credits(gw: &Gateway, key: &Key, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(gw.admin_url(&format!("/v1/keys/{}/credits", key.id)))
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn credits_are_spent_refused_topped_up_and_refunded() {
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    opts.routes = metered_routes(&echo);
    let gw = Gateway::start(opts).await;
    let key = gw.mint(json!({"remaining": 25})).await;
    assert_eq!(key.record["remaining"], 25);
    let free = gw.mint(json!({})).await;
    assert_eq!(free.record["remaining"], Value::Null, "not metered");

    assert_eq!(gw.post(&key, "/v1/payouts").await.status(), 200);
    assert_eq!(gw.post(&key, "/v1/payouts").await.status(), 200);
    let r = gw.post(&key, "/v1/payouts").await;
    let body = assert_problem(r, 429, "quota_exhausted").await;
    assert!(
        body["detail"].as_str().unwrap().contains("5 left"),
        "{body}"
    );
    assert_eq!(remaining(&gw, &key).await, 5, "a refusal spends nothing");
    assert_eq!(echo.count(), 2);
    // A route of cost 1 still fits.
    assert_eq!(gw.post(&key, "/v1/payments").await.status(), 200);
    assert_eq!(remaining(&gw, &key).await, 4);

    // Top-ups: atomic add and set, answered with the record.
    let r = credits(&gw, &key, json!({"add": 20})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["remaining"], 24);
    let r = credits(&gw, &key, json!({"set": 30})).await;
    assert_eq!(r.json::<Value>().await.unwrap()["remaining"], 30);
    for bad in [json!({"add": 1, "set": 2}), json!({}), json!({"add": -1})] {
        let r = credits(&gw, &key, bad.clone()).await;
        assert!(
            matches!(r.status().as_u16(), 400 | 422),
            "{bad}: {}",
            r.status()
        );
    }
    let r = credits(&gw, &free, json!({"add": 5})).await;
    assert_problem(r, 422, "validation_failed").await;
    let audit: Value = gw
        .admin_get(&format!("/v1/audit?key_id={}", key.id), ADMIN_TOKEN)
        .await
        .json()
        .await
        .unwrap();
    let actions: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions.iter().filter(|a| **a == "credits").count(),
        2,
        "{audit}"
    );

    // refund_on_5xx: the upstream's 503 gives the 10 back; without it they stay spent.
    let r = gw.post(&key, "/v1/refunding/fail").await;
    assert_eq!(r.status(), 503);
    assert_eq!(remaining(&gw, &key).await, 30);
    let r = gw.post(&key, "/v1/refunding/ok").await;
    assert_eq!(r.status(), 200);
    assert_eq!(remaining(&gw, &key).await, 20);
    let r = gw.post(&key, "/v1/payments/fail").await;
    assert_eq!(r.status(), 503);
    assert_eq!(remaining(&gw, &key).await, 19, "no refund on this route");

    // A request refused by a rate limit spends no credit.
    assert_eq!(gw.post(&key, "/v1/limited").await.status(), 200);
    let r = gw.post(&key, "/v1/limited").await;
    assert_problem(r, 429, "rate_limited").await;
    assert_eq!(remaining(&gw, &key).await, 18);

    // Not metered any more: requests pass, nothing is counted.
    let r = reqwest::Client::new()
        .patch(gw.admin_url(&format!("/v1/keys/{}", key.id)))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"remaining": null}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["remaining"], Value::Null);
    for _ in 0..3 {
        assert_eq!(gw.post(&key, "/v1/payouts").await.status(), 200);
    }
    assert!(gw
        .metrics_text()
        .await
        .contains(r#"keygate_quota_exhausted_total{route="payout"} 1"#));
}

#[tokio::test]
async fn a_refill_starts_the_key_at_its_amount() {
    let echo = Echo::start().await;
    let gw = Gateway::start(Options::new(&echo)).await;
    let key = gw
        .mint(json!({"refill": {"interval": "daily", "amount": 100}}))
        .await;
    assert_eq!(key.record["remaining"], 100);
    assert_eq!(
        key.record["refill"],
        json!({"interval": "daily", "amount": 100})
    );
    assert_eq!(gw.post(&key, "/v1/payments").await.status(), 200);
    assert_eq!(remaining(&gw, &key).await, 99);
}

/// Two gateways on one Redis, 40 concurrent requests on 25 credits: exactly 25 pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_never_spends_more_than_there_is() {
    let redis = RedisServer::start();
    let echo = Echo::start().await;
    let store = format!("[store]\nkind = \"redis\"\nurl = \"{}\"", redis.url());
    let mut opts = Options::new(&echo);
    opts.store_toml = Some(store.clone());
    let gw1 = Arc::new(Gateway::start(opts).await);
    let mut opts = Options::new(&echo);
    opts.store_toml = Some(store);
    opts.master_key = Some(gw1.master_key.clone());
    let gw2 = Arc::new(Gateway::start(opts).await);
    let key = gw1.mint(json!({"remaining": 25})).await;

    let tasks: Vec<_> = (0..40)
        .map(|n| {
            let gw = Arc::clone(if n % 2 == 0 { &gw1 } else { &gw2 });
            let key = key.clone();
            tokio::spawn(async move { gw.post(&key, "/v1/payments").await.status().as_u16() })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 25);
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 15);
    assert_eq!(remaining(&gw2, &key).await, 0);
    assert_eq!(echo.count(), 25);
}

/// A signed request whose head nominates `x-forwarded-for` in `Connection`: keygate verifies it
/// and spends its limits, then pingora refuses to forward it (400).
async fn nominating(gw: &Gateway, key: &Key, i: usize) -> String {
    let body = b"{}";
    let mut head = String::from(
        "POST /v1/limited HTTP/1.1\r\nhost: gw\r\ncontent-length: 2\r\nconnection: x-forwarded-for\r\n",
    );
    for (k, v) in support::v1_headers(
        key,
        "POST",
        "/v1/limited",
        body,
        support::now(),
        &format!("nominating-{i}"),
    ) {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n{}");
    support::raw_exchange(
        gw.proxy,
        &[head.as_bytes()],
        std::time::Duration::ZERO,
        std::time::Duration::from_secs(2),
    )
    .await
}

/// A request that never reaches the upstream spends nothing, whoever refuses it: pingora (a
/// `Connection` nomination it will not forward, after keygate verified the request and took its
/// credits and rate-limit units) or no endpoint accepting the connection. On the embedded
/// store and on Redis. Before, a key with 3 credits lost all 3 to three such 400s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_never_reaches_the_upstream_spends_nothing() {
    let redis = RedisServer::start();
    for store in [
        None,
        Some(format!(
            "[store]\nkind = \"redis\"\nurl = \"{}\"",
            redis.url()
        )),
    ] {
        let on = if store.is_some() { "redis" } else { "embedded" };
        let echo = Echo::start().await;
        let mut opts = Options::new(&echo);
        opts.routes = metered_routes(&echo);
        opts.store_toml = store;
        let gw = Gateway::start(opts).await;
        // `limited` allows one request an hour; the key has 3 credits.
        let key = gw.mint(json!({"remaining": 3})).await;
        for i in 0..3 {
            let answer = nominating(&gw, &key, i).await;
            assert!(answer.starts_with("HTTP/1.1 400"), "{on}: {answer}");
        }
        assert_eq!(echo.count(), 0, "{on}: nothing reached the upstream");
        assert_eq!(remaining(&gw, &key).await, 3, "{on}: no credit spent");
        // The one request an hour is still there.
        assert_eq!(gw.post(&key, "/v1/limited").await.status(), 200, "{on}");
        assert_eq!(remaining(&gw, &key).await, 2, "{on}");
        // No endpoint takes the connection: 502, and nothing is spent either.
        let r = gw.post(&key, "/v1/dead").await;
        assert_problem(r, 502, "upstream_unavailable").await;
        assert_eq!(
            remaining_after_refund(&gw, &key, 2).await,
            2,
            "{on}: a 502 before sending spends nothing"
        );
    }
}

/// `refund_on_5xx` gives credits back only when the upstream said it did not act (503): a 504
/// comes after the upstream may have processed the payment, so the credits stay spent.
#[tokio::test]
async fn refund_on_5xx_refunds_a_503_but_not_a_504() {
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    opts.routes = metered_routes(&echo);
    let gw = Gateway::start(opts).await;
    let key = gw.mint(json!({"remaining": 100})).await;
    let r = gw.post(&key, "/v1/refunding/fail").await;
    assert_eq!(r.status(), 503);
    assert_eq!(
        remaining_after_refund(&gw, &key, 100).await,
        100,
        "503: refunded"
    );
    // The echo's `/slow` answers after 3 s; the route's upstream gives up after 1 s.
    let r = gw.post(&key, "/v1/refunding/slow").await;
    assert_problem(r, 504, "upstream_timeout").await;
    assert_eq!(
        remaining(&gw, &key).await,
        90,
        "504: the upstream may have acted"
    );
}
