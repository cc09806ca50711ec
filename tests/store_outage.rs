//! The real binary on Redis through store outages (the circuit breaker: fail fast, recover
//! without a restart) and with `store.nonce_durability` against a primary and a replica.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::redis::{RedisCluster, RedisReplicated, RedisServer};
use support::{assert_problem, now, v1_headers, Echo, Gateway, Key, Options};

/// `store.url = url`, plus more `[store]` lines.
fn on_url(echo: &Echo, url: &str, more: &str) -> Options {
    let mut opts = Options::new(echo);
    opts.store_toml = Some(format!(
        "[store]\nkind = \"redis\"\nurl = \"{url}\"\n{more}"
    ));
    opts
}

const N: usize = 20;

/// `N` signed requests at once: each one's status, problem code and time.
async fn burst(gw: &Gateway, key: &Key) -> Vec<(u16, String, Duration)> {
    let one = || async {
        let started = Instant::now();
        let r = gw.post(key, "/v1/payments").await;
        let status = r.status().as_u16();
        let body: serde_json::Value = r.json().await.unwrap_or_default();
        let code = body["code"].as_str().unwrap_or_default().to_owned();
        (status, code, started.elapsed())
    };
    futures_util::future::join_all((0..N).map(|_| one())).await
}

fn slowest(answers: &[(u16, String, Duration)]) -> Duration {
    answers.iter().map(|a| a.2).max().unwrap_or_default()
}

fn all_unavailable(answers: &[(u16, String, Duration)], what: &str) {
    for (status, code, _) in answers {
        assert_eq!(
            (*status, code.as_str()),
            (503, "store_unavailable"),
            "{what}"
        );
    }
}

/// Until a signed request gets an answer other than 503 `store_unavailable` (200, or 401
/// `unknown_key` once a restarted, empty Redis is asked): how long that took.
async fn until_store_answers(gw: &Gateway, key: &Key, within: Duration) -> (Duration, u16) {
    let started = Instant::now();
    loop {
        let r = gw.post(key, "/v1/payments").await;
        let status = r.status().as_u16();
        let body: serde_json::Value = r.json().await.unwrap_or_default();
        if (status, body["code"].as_str()) != (503, Some("store_unavailable")) {
            return (started.elapsed(), status);
        }
        assert!(
            started.elapsed() < within,
            "the store did not answer again within {within:?}: {}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Issue 26 item 4. Redis frozen (SIGSTOP) and then killed: the calls in flight when it
/// stopped answering wait out the call timeout (about 1 s, what every call cost before the
/// breaker), but once the circuit is open each signed request is answered 503 at once; cached
/// keys keep working; when Redis is back, 200s return within about a second, no restart.
/// Prints the slowest answer of a burst before and after the circuit opened; the latter must
/// come at once.
fn circuit_figures(
    what: &str,
    first: &[(u16, String, Duration)],
    open: &[(u16, String, Duration)],
) {
    println!(
        "{what} Redis: {N} concurrent signed requests, slowest {:?} before the circuit opened, \
         {:?} after",
        slowest(first),
        slowest(open)
    );
    assert!(
        slowest(open) < Duration::from_millis(100),
        "circuit open: {open:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_redis_is_known_down_signed_requests_fail_at_once_and_recover_without_a_restart() {
    let mut redis = RedisServer::start();
    let echo = Echo::start().await;
    let gw = Gateway::start(on_url(&echo, &redis.url(), "")).await;
    let key = gw.mint(json!({})).await;
    let bearer = gw.mint(json!({"auth": "bearer"})).await;
    let bearer_h = vec![("x-api-key".to_owned(), bearer.secret.clone())];
    assert_eq!(gw.post(&key, "/v1/payments").await.status(), 200);
    assert_eq!(
        gw.send("POST", "/v1/payments", &bearer_h, b"{}")
            .await
            .status(),
        200
    );
    assert_eq!(gw.metric("keygate_store_circuit_open").await, 0.0);

    // Frozen: connections stay open, nothing answers.
    redis.pause();
    let first = burst(&gw, &key).await;
    all_unavailable(&first, "frozen, circuit still closed");
    assert_eq!(gw.metric("keygate_store_circuit_open").await, 1.0);
    let open = burst(&gw, &key).await;
    all_unavailable(&open, "frozen, circuit open");
    circuit_figures("frozen", &first, &open);
    assert!(gw.metric("keygate_store_fast_failures_total").await >= N as f64);
    assert_eq!(
        gw.send("POST", "/v1/payments", &bearer_h, b"{}")
            .await
            .status(),
        200,
        "a cached key never touches the store"
    );
    redis.resume();
    let (back, status) = until_store_answers(&gw, &key, Duration::from_millis(1500)).await;
    assert_eq!(status, 200);
    println!("frozen Redis resumed: 200 again after {back:?}");
    assert_eq!(gw.metric("keygate_store_circuit_open").await, 0.0);

    // Killed: refused connections.
    redis.stop();
    let first = burst(&gw, &key).await;
    all_unavailable(&first, "killed, circuit still closed");
    let open = burst(&gw, &key).await;
    all_unavailable(&open, "killed, circuit open");
    circuit_figures("killed", &first, &open);
    assert_eq!(gw.metric("keygate_store_circuit_open").await, 1.0);
    redis.restart();
    // Back empty (no persistence here): once the change feed is back too, the cached key is
    // dropped and the store says it is unknown. Either answer means the store serves again.
    let (back, status) = until_store_answers(&gw, &key, Duration::from_millis(1500)).await;
    println!("killed Redis restarted: answered {status} again after {back:?}");
    let fresh = gw.mint(json!({})).await;
    assert_eq!(gw.post(&fresh, "/v1/payments").await.status(), 200);
    assert!(!gw.log().contains("panicked"), "{}", gw.log());
}

/// Issue 26 item 3. `"replicated"`: a nonce is acknowledged by the replica before the request
/// goes upstream; the replica frozen, no acknowledgement within replication_timeout answers
/// 503 store_unavailable (quickly: the timeout, not the call timeout), and 200 again once it
/// is thawed. `"async"` does not wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_nonces_wait_for_the_replica_and_async_ones_do_not() {
    let set = RedisReplicated::start();
    let echo = Echo::start().await;
    let replicated = Gateway::start(on_url(
        &echo,
        &set.primary.url(),
        "nonce_durability = \"replicated\"\nreplication_timeout = \"50ms\"",
    ))
    .await;
    let mut opts = on_url(&echo, &set.primary.url(), "");
    opts.master_key = Some(replicated.master_key.clone());
    let asynchronous = Gateway::start(opts).await;
    let key = replicated.mint(json!({})).await;
    for gw in [&replicated, &asynchronous] {
        assert_eq!(gw.post(&key, "/v1/payments").await.status(), 200);
    }
    let waits_before = wait_calls(&set.primary);
    assert!(waits_before >= 1, "the replicated gateway sent WAIT");

    set.replica.pause();
    let started = Instant::now();
    let r = replicated.post(&key, "/v1/payments").await;
    let took = started.elapsed();
    assert_problem(r, 503, "store_unavailable").await;
    println!("replica frozen: \"replicated\" answered 503 after {took:?}");
    assert!(took < Duration::from_millis(400), "{took:?}");
    assert_eq!(
        asynchronous.post(&key, "/v1/payments").await.status(),
        200,
        "async does not wait for the replica"
    );
    // An unacknowledged nonce is no connection failure: the circuit stays closed.
    assert_eq!(replicated.metric("keygate_store_circuit_open").await, 0.0);

    set.replica.resume();
    let (back, status) = until_store_answers(&replicated, &key, Duration::from_secs(3)).await;
    assert_eq!(status, 200);
    println!("replica thawed: \"replicated\" 200 again after {back:?}");
    assert_eq!(asynchronous.post(&key, "/v1/payments").await.status(), 200);
}

/// On a cluster a bare `WAIT` goes to every master (redis-rs takes the minimum): the nonce's
/// `WAIT` must reach the master holding the nonce, and only it. This test cluster has no
/// replicas, so "replicated" answers 503 — after asking the right node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_the_wait_goes_to_the_master_holding_the_nonce() {
    let cluster = RedisCluster::start();
    let echo = Echo::start().await;
    let gw = Gateway::start(on_url(
        &echo,
        &cluster.url(),
        "nonce_durability = \"replicated\"\nreplication_timeout = \"20ms\"",
    ))
    .await;
    let key = gw.mint(json!({})).await;
    for i in 0..6 {
        let nonce = format!("cluster-wait-{i}");
        let before: Vec<u64> = cluster.nodes.iter().map(wait_calls).collect();
        let h = v1_headers(&key, "POST", "/v1/payments", b"{}", now(), &nonce);
        assert_problem(
            gw.send("POST", "/v1/payments", &h, b"{}").await,
            503,
            "store_unavailable",
        )
        .await;
        let holder = cluster.node_for(&format!("kg:n:{}:{nonce}", key.id)).port;
        for (node, was) in cluster.nodes.iter().zip(before) {
            let sent = wait_calls(node) - was;
            let expected = u64::from(node.port == holder);
            assert_eq!(sent, expected, "WAITs on node {} for {nonce}", node.port);
        }
    }
}

/// `WAIT` calls the server has executed (`INFO commandstats`).
fn wait_calls(server: &RedisServer) -> u64 {
    server
        .cli(&["INFO", "commandstats"])
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_wait:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}
