//! Credential stuffing through the real binary: a flood of unknown keys from one address is
//! blocked after `[abuse] max_failures` with 429 `too_many_failures` — valid keys from it too —
//! while other addresses and `never_block` ones still work; IPv6 counts per /64; on a Redis
//! fleet the count is shared, and a blocked request costs no Redis command once the gateway
//! knows the block.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use serde_json::json;
use support::redis::RedisServer;
use support::{assert_problem, now, v1_headers, Echo, Gateway, Key, Options};

fn stranger(n: usize) -> Key {
    Key {
        id: format!("key_stranger{n}"),
        public_key: format!("pk_test_stranger{n}"),
        secret: format!("sk_test_guess{n}"),
        record: json!({}),
    }
}

/// A signed POST as if from `ip` (keygate trusts the loopback proxy's X-Forwarded-For).
async fn pay_from(gw: &Gateway, key: &Key, ip: &str, nonce: &str) -> reqwest::Response {
    let mut h = v1_headers(key, "POST", "/v1/payments", b"{}", now(), nonce);
    h.push(("x-forwarded-for".into(), ip.into()));
    gw.send("POST", "/v1/payments", &h, b"{}").await
}

fn options(echo: &Echo, store: Option<String>) -> Options {
    let mut opts = Options::new(echo);
    opts.server_extra = "trusted_proxies = [\"127.0.0.1/32\"]".into();
    opts.routes = format!(
        "[abuse]\nmax_failures = 5\nwindow = \"1m\"\nblock_for = \"1m\"\nnever_block = [\"198.51.100.1\"]\n{}",
        opts.routes
    );
    opts.store_toml = store;
    opts
}

#[tokio::test]
async fn a_flood_of_unknown_keys_blocks_that_address_only() {
    let echo = Echo::start().await;
    let gw = Gateway::start(options(&echo, None)).await;
    let good = gw.mint(json!({})).await;
    let bad_ip = "203.0.113.7";

    for n in 0..5 {
        let r = pay_from(&gw, &stranger(n), bad_ip, &format!("s{n}")).await;
        assert_problem(r, 401, "unknown_key").await;
    }
    let r = pay_from(&gw, &stranger(5), bad_ip, "s5").await;
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_problem(r, 429, "too_many_failures").await;
    // Blocked whatever it sends, a valid key included: the block comes before any lookup.
    let r = pay_from(&gw, &good, bad_ip, "g0").await;
    assert_problem(r, 429, "too_many_failures").await;
    // Others are untouched.
    assert_eq!(
        pay_from(&gw, &good, "203.0.113.8", "g1").await.status(),
        200
    );
    // A bad signature and a replayed nonce count as failures too; a wrong scope does not.
    let ip = "192.0.2.50";
    let mut wrong = good.clone();
    wrong.secret = "sk_test_wrong".into();
    for n in 0..3 {
        let r = pay_from(&gw, &wrong, ip, &format!("w{n}")).await;
        assert_problem(r, 401, "bad_signature").await;
    }
    assert_eq!(pay_from(&gw, &good, ip, "dup").await.status(), 200);
    for _ in 0..2 {
        let r = pay_from(&gw, &good, ip, "dup").await;
        assert_problem(r, 401, "replayed_nonce").await;
    }
    let r = pay_from(&gw, &good, ip, "after").await;
    assert_problem(r, 429, "too_many_failures").await;

    // An address on never_block is never blocked.
    for n in 0..12 {
        let r = pay_from(&gw, &stranger(100 + n), "198.51.100.1", &format!("m{n}")).await;
        assert_problem(r, 401, "unknown_key").await;
    }
    // IPv6 counts by /64: five addresses of one /64 block the sixth.
    for n in 1..=5 {
        let r = pay_from(&gw, &stranger(200 + n), &format!("2001:db8:7:7::{n}"), "v6").await;
        assert_problem(r, 401, "unknown_key").await;
    }
    let r = pay_from(&gw, &good, "2001:db8:7:7:ffff::9", "v6-good").await;
    assert_problem(r, 429, "too_many_failures").await;
    assert_eq!(
        pay_from(&gw, &good, "2001:db8:7:8::1", "v6-other")
            .await
            .status(),
        200
    );

    assert_eq!(gw.metric("keygate_abuse_blocked_total").await, 4.0);
    assert_eq!(
        echo.count(),
        3,
        "no blocked or failed request reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_shares_the_count_and_a_known_block_costs_no_redis_command() {
    let redis = RedisServer::start();
    let echo = Echo::start().await;
    let store = Some(format!(
        "[store]\nkind = \"redis\"\nurl = \"{}\"",
        redis.url()
    ));
    // No keyring refresh while Redis commands are counted.
    let quiet = |store: Option<String>| {
        let mut o = options(&echo, store);
        o.routes = format!("[assertion]\nrefresh_interval = \"1h\"\n{}", o.routes);
        o
    };
    let gw1 = Gateway::start(quiet(store.clone())).await;
    let mut opts = quiet(store);
    opts.master_key = Some(gw1.master_key.clone());
    let gw2 = Gateway::start(opts).await;
    let ip = "203.0.113.99";

    // Five failures split over two gateways reach the threshold together.
    for n in 0..5 {
        let gw = if n % 2 == 0 { &gw1 } else { &gw2 };
        let r = pay_from(gw, &stranger(n), ip, &format!("f{n}")).await;
        assert_problem(r, 401, "unknown_key").await;
    }
    // gw1 counted the fifth failure: it knows of the block.
    let r = pay_from(&gw1, &stranger(9), ip, "b0").await;
    assert_problem(r, 429, "too_many_failures").await;
    // gw2 learns of it on its next failure there.
    let r = pay_from(&gw2, &stranger(10), ip, "b1").await;
    assert_problem(r, 401, "unknown_key").await;
    let r = pay_from(&gw2, &stranger(11), ip, "b2").await;
    assert_problem(r, 429, "too_many_failures").await;

    // Fifty blocked requests: no Redis command at all (INFO itself counts one).
    let before = redis.commands_processed();
    for n in 0..50 {
        let gw = if n % 2 == 0 { &gw1 } else { &gw2 };
        let r = pay_from(gw, &stranger(20 + n), ip, &format!("x{n}")).await;
        assert_eq!(r.status(), 429);
    }
    let after = redis.commands_processed();
    println!(
        "Redis commands for 50 blocked requests: {}",
        after - before - 1
    );
    assert_eq!(after - before, 1, "only the INFO that measured");
}
