//! Rate limits through the real binary: a key's own limits and a route's defaults with a
//! cost, 429 `rate_limited` naming the limit with `Retry-After`, the draft's `RateLimit-Policy`
//! and `RateLimit` on every limited response, nothing spent by a refused request, limits set
//! through the admin API, and the fleet-wide accuracy of two gateways sharing one Redis.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use support::redis::RedisServer;
use support::{assert_problem, now, v1_headers, Echo, Gateway, Options};

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// Routes with a default limit and a cost, before the usual ones.
fn limited_routes(echo: &Echo) -> String {
    support::routes_with(
        echo.addr,
        r#"[[routes]]
name = "payout"
methods = ["POST"]
path = "/v1/payouts"
upstream = "echo"
cost = 10
rate_limits = [{ name = "payouts", limit = 25, window = "1h" }]

[[routes]]
name = "refund"
methods = ["POST"]
path = "/v1/refunds"
upstream = "echo"
rate_limits = [{ name = "refunds", limit = 2, window = "1h" }]
"#,
    )
}

#[tokio::test]
async fn a_keys_limit_answers_429_with_the_drafts_headers_and_spends_nothing_refused() {
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    opts.routes = limited_routes(&echo);
    let gw = Gateway::start(opts).await;
    let key = gw
        .mint(json!({"rate_limits": [
            {"name": "burst", "limit": 3, "window": "1h"},
            {"name": "daily", "limit": 1000, "window": "1d"}
        ]}))
        .await;
    assert_eq!(
        key.record["rate_limits"],
        json!([
            {"name": "burst", "limit": 3, "window": "1h"},
            {"name": "daily", "limit": 1000, "window": "1d"}
        ])
    );

    for left in [2, 1, 0] {
        let r = gw.post(&key, "/v1/payments").await;
        assert_eq!(r.status(), 200);
        assert_eq!(
            header(&r, "ratelimit-policy"),
            r#""burst";q=3;w=3600, "daily";q=1000;w=86400"#
        );
        let state = header(&r, "ratelimit");
        assert!(
            state.starts_with(&format!("\"burst\";r={left};t=")),
            "{state}"
        );
        assert!(
            state.contains(&format!("\"daily\";r={};t=", 997 + left)),
            "{state}"
        );
    }
    let r = gw.post(&key, "/v1/payments").await;
    assert_eq!(r.status(), 429);
    let retry: u64 = header(&r, "retry-after").parse().unwrap();
    assert!(
        (1..=1200).contains(&retry),
        "one unit of 3/h is 20 min: {retry}"
    );
    assert!(header(&r, "ratelimit").starts_with("\"burst\";r=0;"));
    let body = assert_problem(r, 429, "rate_limited").await;
    assert!(
        body["detail"].as_str().unwrap().contains("\"burst\""),
        "{body}"
    );
    assert_eq!(
        echo.count(),
        3,
        "the refused request never reached the upstream"
    );

    // Refused again: `daily` stood still while `burst` refused (all or nothing).
    let r = gw.post(&key, "/v1/payments").await;
    assert_eq!(r.status(), 429);
    assert!(header(&r, "ratelimit").contains("\"daily\";r=997;"));
    assert!(gw
        .metrics_text()
        .await
        .contains(r#"keygate_rate_limited_total{limit="burst",route="create-payment"} 2"#));
}

#[tokio::test]
async fn route_defaults_cost_and_admin_changes() {
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    opts.routes = limited_routes(&echo);
    let gw = Gateway::start(opts).await;
    let key = gw.mint(json!({})).await;

    // cost 10 against the route's 25/h: two pass, the third would need 30.
    for _ in 0..2 {
        let r = gw.post(&key, "/v1/payouts").await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "ratelimit-policy"), r#""payouts";q=25;w=3600"#);
    }
    let r = gw.post(&key, "/v1/payouts").await;
    assert_eq!(r.status(), 429);
    assert!(header(&r, "ratelimit").starts_with("\"payouts\";r=5;"));
    // Another route's defaults are counted apart; an unlimited route carries no headers.
    assert_eq!(gw.post(&key, "/v1/refunds").await.status(), 200);
    let r = gw.post(&key, "/v1/payments").await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("ratelimit-policy").is_none());

    // The key's own limits replace the route's, on every route.
    let admin = reqwest::Client::new();
    let patch = |body: serde_json::Value| {
        admin
            .patch(gw.admin_url(&format!("/v1/keys/{}", key.id)))
            .bearer_auth(support::ADMIN_TOKEN)
            .json(&body)
            .send()
    };
    let r = patch(json!({"rate_limits": [{"name": "own", "limit": 0, "window": "1s"}]}))
        .await
        .unwrap();
    let body = assert_problem(r, 422, "validation_failed").await;
    assert!(body["errors"]["rate_limits[0].limit"].is_string(), "{body}");
    let r = patch(json!({"rate_limits": [{"name": "own", "limit": 1, "window": "1h"}]}))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The cache learns of the change at once on this gateway (the admin API evicts).
    let r = gw.post(&key, "/v1/refunds").await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "ratelimit-policy"), r#""own";q=1;w=3600"#);
    let r = gw.post(&key, "/v1/payments").await;
    assert_problem(r, 429, "rate_limited").await;
    // `[]` puts the route's defaults back.
    let r = patch(json!({"rate_limits": []})).await.unwrap();
    assert_eq!(r.status(), 200);
    let r = gw.post(&key, "/v1/refunds").await;
    assert_eq!(r.status(), 200);
    assert!(header(&r, "ratelimit").starts_with("\"refunds\";r=0;"));
}

#[tokio::test]
async fn a_route_whose_cost_exceeds_its_limit_says_it_can_never_pass() {
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    opts.routes = limited_routes(&echo);
    let gw = Gateway::start(opts).await;
    let key = gw
        .mint(json!({"rate_limits": [{"name": "tiny", "limit": 5, "window": "1s"}]}))
        .await;
    let h = v1_headers(&key, "POST", "/v1/payouts", b"{}", now(), "x");
    let r = gw.send("POST", "/v1/payouts", &h, b"{}").await;
    let body = assert_problem(r, 429, "rate_limited").await;
    assert!(
        body["detail"].as_str().unwrap().contains("can never pass"),
        "{body}"
    );
}

/// Two gateways on one Redis in `mode`, sharing the same `[limits]` section.
async fn fleet(echo: &Echo, redis: &RedisServer, limits: &str) -> (Arc<Gateway>, Arc<Gateway>) {
    let store = format!("[store]\nkind = \"redis\"\nurl = \"{}\"", redis.url());
    let mut opts = Options::new(echo);
    opts.store_toml = Some(store.clone());
    opts.routes = format!("{limits}\n{}", opts.routes);
    let gw1 = Arc::new(Gateway::start(opts).await);
    let mut opts = Options::new(echo);
    opts.store_toml = Some(store);
    opts.routes = format!("{limits}\n{}", opts.routes);
    opts.master_key = Some(gw1.master_key.clone());
    let gw2 = Arc::new(Gateway::start(opts).await);
    (gw1, gw2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_on_redis_hold_the_rate_within_two_percent_exact_mode() {
    two_gateways_hold_the_rate("[limits]\nmode = \"exact\"").await;
}

/// Lease mode with slices of 5% of the limit: near the limit no slice is granted, so the
/// rate holds as in exact mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_on_redis_hold_the_rate_within_two_percent_lease_mode() {
    two_gateways_hold_the_rate("[limits]\nmode = \"lease\"\nlease_fraction = 0.05").await;
}

/// Traffic well over a 100/s limit split between two gateways: after the burst, accepted
/// requests match the limit's rate within 2%.
async fn two_gateways_hold_the_rate(limits: &str) {
    let redis = RedisServer::start();
    let echo = Echo::start().await;
    let (gw1, gw2) = fleet(&echo, &redis, limits).await;
    let key = gw1
        .mint(json!({"rate_limits": [{"name": "rate", "limit": 100, "window": "1s"}]}))
        .await;

    let counting = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..8 {
        let gw = Arc::clone(if w % 2 == 0 { &gw1 } else { &gw2 });
        let (key, counting, stop) = (key.clone(), counting.clone(), stop.clone());
        let (accepted, refused) = (accepted.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = gw.post(&key, "/v1/payments").await;
                let status = r.status().as_u16();
                assert!(matches!(status, 200 | 429), "{status}");
                if counting.load(Ordering::Relaxed) {
                    if status == 200 {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    } else {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(4)).await;
            }
        }));
    }
    // The burst is spent in the first second; then count over five.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    counting.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    counting.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let accepted = accepted.load(Ordering::Relaxed) as f64;
    let refused = refused.load(Ordering::Relaxed);
    let expected = 100.0 * elapsed;
    let error = (accepted - expected).abs() / expected;
    println!(
        "two gateways, 100/s limit, {limits:?}: {accepted} accepted in {elapsed:.3} s (expected {expected:.1}, error {:.2}%), {refused} refused",
        error * 100.0
    );
    assert!(
        refused as f64 > accepted,
        "the offered load must exceed the limit"
    );
    assert!(error <= 0.02, "accepted {accepted}, expected {expected:.1}");
}

/// `[[owners]]`: every key of the owner spends from one limit, on top of its own.
#[tokio::test]
async fn an_owners_limit_is_shared_by_all_its_keys() {
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    opts.routes = format!(
        "{}\n[[owners]]\nname = \"acme\"\nrate_limits = [{{ name = \"contract\", limit = 4, window = \"1h\" }}]\n",
        support::routes(echo.addr)
    );
    let gw = Gateway::start(opts).await;
    let a = gw.mint(json!({"owner": "acme"})).await;
    let b = gw
        .mint(json!({"owner": "acme", "rate_limits": [{"name": "burst", "limit": 10, "window": "1s"}]}))
        .await;
    let other = gw.mint(json!({"owner": "globex"})).await;

    for (i, key) in [&a, &b, &a, &b].into_iter().enumerate() {
        let r = gw.post(key, "/v1/payments").await;
        assert_eq!(r.status(), 200);
        let policy = header(&r, "ratelimit-policy");
        assert!(
            policy.ends_with(r#""owner:contract";q=4;w=3600"#),
            "{policy}"
        );
        assert!(
            header(&r, "ratelimit").contains(&format!("\"owner:contract\";r={};", 3 - i)),
            "{}",
            header(&r, "ratelimit")
        );
    }
    for key in [&a, &b] {
        let r = gw.post(key, "/v1/payments").await;
        let body = assert_problem(r, 429, "rate_limited").await;
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains("\"owner:contract\""),
            "{body}"
        );
    }
    // Another owner is not limited at all.
    let r = gw.post(&other, "/v1/payments").await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("ratelimit-policy").is_none());
    assert!(gw.metrics_text().await.contains(
        r#"keygate_rate_limited_total{limit="owner:contract",route="create-payment"} 2"#
    ));
}

/// A key far below its limit: in lease mode one script call serves a slice of requests, in
/// exact mode every request makes one. Same traffic, both modes, Redis commands counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_mode_spares_the_round_trips_of_a_key_far_below_its_limit() {
    let mut per_mode = Vec::new();
    for mode in ["exact", "lease"] {
        let redis = RedisServer::start();
        let echo = Echo::start().await;
        let limits = format!("[limits]\nmode = \"{mode}\"\nlease_ttl = \"10s\"\n[assertion]\nrefresh_interval = \"1h\"");
        let (gw, _other) = fleet(&echo, &redis, &limits).await;
        let key = gw
            .mint(json!({"rate_limits": [{"name": "big", "limit": 100000, "window": "1h"}]}))
            .await;
        assert_eq!(gw.post(&key, "/v1/payments").await.status(), 200);
        let before = redis.commands_processed();
        for _ in 0..200 {
            let r = gw.post(&key, "/v1/payments").await;
            assert_eq!(r.status(), 200);
            assert!(r.headers().contains_key("ratelimit"));
        }
        let used = redis.commands_processed() - before - 1;
        println!("{mode} mode: {used} Redis commands for 200 limited requests");
        per_mode.push(used);
    }
    let (exact, lease) = (per_mode[0], per_mode[1]);
    // Each request checks its nonce in both modes; exact mode adds one script call each.
    assert!(
        exact >= lease + 195,
        "exact {exact}, lease {lease}: a slice of 1,000 units covers all 200"
    );
}

/// Redis goes away: a route with `limits_on_store_error = "open"` forwards unchecked (counted),
/// a `sensitive` one refuses with 503; the outage is logged once, not per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_limit_state_is_unreachable_routes_fail_open_or_closed() {
    let mut redis = RedisServer::start();
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    // Nonces fall back to memory, so only the limits see the outage.
    opts.store_toml = Some(format!(
        "[store]\nkind = \"redis\"\nurl = \"{}\"\nnonce_fallback = \"local\"",
        redis.url()
    ));
    opts.cache_toml = Some("[cache]\nttl = \"1h\"\nstale_if_error = \"1h\"".into());
    opts.rust_log = "warn,keygate=warn";
    let extra = r#"[[routes]]
name = "open"
methods = ["POST"]
path = "/v1/open"
upstream = "echo"
rate_limits = [{ name = "r", limit = 1000, window = "1h" }]

[[routes]]
name = "closed"
methods = ["POST"]
path = "/v1/closed"
upstream = "echo"
sensitive = true
rate_limits = [{ name = "r", limit = 1000, window = "1h" }]
"#;
    opts.routes = format!(
        "[limits]\nmode = \"exact\"\n{}",
        support::routes_with(echo.addr, extra)
    );
    let gw = Gateway::start(opts).await;
    let key = gw.mint(json!({})).await;
    assert_eq!(gw.post(&key, "/v1/open").await.status(), 200);
    assert_eq!(gw.post(&key, "/v1/closed").await.status(), 200);

    redis.stop();
    for _ in 0..5 {
        let r = gw.post(&key, "/v1/open").await;
        assert_eq!(r.status(), 200, "open: forwarded unchecked");
        assert!(r.headers().get("ratelimit").is_none());
        let r = gw.post(&key, "/v1/closed").await;
        assert_problem(r, 503, "store_unavailable").await;
    }
    let metrics = gw.metrics_text().await;
    assert!(
        metrics.contains(r#"keygate_rate_limit_unchecked_total{route="open"} 5"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"keygate_store_errors_total{op="rate_limit"} 10"#));
    let log = gw.log();
    assert_eq!(
        log.matches("rate-limit or credit state unreachable")
            .count(),
        1,
        "once per outage: {log}"
    );

    // Redis comes back empty (no persistence here): once the change feed has resubscribed, the
    // cache is dropped and the key is unknown to the store. Whether the first answer after the
    // restart is 200 (still cached) or 401 races the feed against the store's circuit probe
    // (every 250 ms); either way the store answers again, and a fresh key is served.
    redis.restart();
    let mut back = false;
    for _ in 0..50 {
        let r = gw.post(&key, "/v1/closed").await;
        if r.status() != 503 {
            back = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(back, "the closed route recovers with Redis");
    let fresh = gw.mint(json!({})).await;
    assert_eq!(gw.post(&fresh, "/v1/closed").await.status(), 200);
    assert!(gw.log().contains("reachable again"));
}
