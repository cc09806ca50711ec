//! The real binary on `store.kind = "redis"`, against a private `redis-server`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use std::time::Duration;

use serde_json::json;
use support::redis::RedisServer;
use support::{assert_problem, now, v1_headers, Echo, Gateway, Options};

fn on_redis(echo: &Echo, redis: &RedisServer) -> Options {
    let mut opts = Options::new(echo);
    opts.store_toml = Some(format!(
        "[store]\nkind = \"redis\"\nurl = \"{}\"",
        redis.url()
    ));
    opts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_on_redis_mints_verifies_refuses_replays_and_revokes() {
    let redis = RedisServer::start();
    let echo = Echo::start().await;
    let mut gw = Gateway::start(on_redis(&echo, &redis)).await;
    let key = gw.mint(json!({})).await;
    let h = v1_headers(&key, "POST", "/v1/payments", b"{}", now(), "redis-nonce-1");
    assert_eq!(
        gw.send("POST", "/v1/payments", &h, b"{}").await.status(),
        200
    );
    assert_problem(
        gw.send("POST", "/v1/payments", &h, b"{}").await,
        401,
        "replayed_nonce",
    )
    .await;

    // A second gateway process on the same Redis (a fleet shares its master key) sees the key
    // and the used nonce.
    let mut opts = on_redis(&echo, &redis);
    opts.master_key = Some(gw.master_key.clone());
    let gw2 = Gateway::start(opts).await;
    assert_problem(
        gw2.send("POST", "/v1/payments", &h, b"{}").await,
        401,
        "replayed_nonce",
    )
    .await;
    assert_eq!(
        gw2.send_v1(&key, "POST", "/v1/payments", b"{}")
            .await
            .status(),
        200
    );

    gw.revoke(&key).await;
    assert_problem(
        gw.send_v1(&key, "POST", "/v1/payments", b"{}").await,
        401,
        "revoked_key",
    )
    .await;

    // Usage from both gateways lands in the one record.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r: serde_json::Value = gw
            .admin_get(&format!("/v1/keys/{}", key.id), support::ADMIN_TOKEN)
            .await
            .json()
            .await
            .unwrap();
        if r["total_requests"] == 2 {
            assert!(r["last_used_at"].is_string());
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "usage not counted: {r}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gw
        .signal_and_wait("TERM", Duration::from_secs(10))
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_reaches_the_other_gateway_within_a_second() {
    let redis = RedisServer::start();
    let echo = Echo::start().await;
    let gw1 = Gateway::start(on_redis(&echo, &redis)).await;
    let mut opts = on_redis(&echo, &redis);
    opts.master_key = Some(gw1.master_key.clone());
    let gw2 = Gateway::start(opts).await;

    let mut took = Vec::new();
    for _ in 0..20 {
        let key = gw1.mint(json!({})).await;
        // Cached on gw2 (cache.ttl is 30 s there): only the change feed can evict it.
        assert_eq!(
            gw2.send_v1(&key, "POST", "/v1/payments", b"{}")
                .await
                .status(),
            200
        );
        let started = std::time::Instant::now();
        gw1.revoke(&key).await;
        loop {
            let status = gw2
                .send_v1(&key, "POST", "/v1/payments", b"{}")
                .await
                .status();
            if status == 401 {
                break;
            }
            assert_eq!(status, 200);
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "gw2 still accepts a key revoked on gw1"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        took.push(started.elapsed());
    }
    took.sort();
    println!(
        "revocation seen by the other gateway: median {:?}, max {:?} over {} revocations",
        took[took.len() / 2],
        took[took.len() - 1],
        took.len()
    );
}
