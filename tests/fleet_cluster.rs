//! A fleet of four gateways on a Redis Cluster with a replica per master, under signed load
//! from several tasks: a master SIGKILLed mid-load (false refusals, the window of non-200
//! answers, replays of requests accepted just before the kill), revocation propagation before
//! and after the failover, and per-key and per-owner limits against the GCRA bound.
//!
//! CI runs the short version; `KEYGATE_FLEET_LONG=1` (`scripts/dev fleet`) the long one, whose
//! figures docs/operations.md quotes.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use support::redis::RedisCluster;
use support::{now, v1_headers, Echo, Gateway, Key, Options};

const TARGET: &str = "/v1/payments";

/// The fleet tests run one at a time: each starts up to nine Redis nodes and four gateways,
/// and their figures mean little while another one shares the machine.
static ONE_FLEET_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How much the test does: CI's smoke or the long run.
struct Scale {
    revocations: usize,
    load_tasks: usize,
    /// Requests per second each load task sends: the fleet serves traffic without being
    /// saturated, so revocation times measure propagation rather than queueing.
    task_rate: u32,
    limit_secs: u64,
    /// Per second: well below what the load offers, so it is saturated throughout.
    key_limit: u32,
    owner_limit: u32,
}

fn scale() -> Scale {
    if std::env::var_os("KEYGATE_FLEET_LONG").is_some() {
        Scale {
            revocations: 100,
            load_tasks: 8,
            task_rate: 250,
            limit_secs: 20,
            key_limit: 50,
            owner_limit: 60,
        }
    } else {
        // CI runs debug binaries on 2 cores: a lighter load.
        Scale {
            revocations: 20,
            load_tasks: 4,
            task_rate: 50,
            limit_secs: 5,
            key_limit: 20,
            owner_limit: 25,
        }
    }
}

/// One request of the load and what it got.
struct Shot {
    at: Instant,
    gw: usize,
    status: u16,
    code: String,
    headers: Vec<(String, String)>,
}

/// Signed requests with fresh nonces from `tasks` tasks, each at most `rate` per second
/// (`None`: as fast as answers come), spread over the gateways, until `stop`; every answer
/// recorded.
fn start_load(
    proxies: &Arc<Vec<SocketAddr>>,
    keys: &Arc<Vec<Key>>,
    tasks: usize,
    rate: Option<u32>,
    stop: &Arc<AtomicBool>,
    shots: &Arc<Mutex<Vec<Shot>>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..tasks)
        .map(|t| {
            let (proxies, keys, stop, shots) = (
                Arc::clone(proxies),
                Arc::clone(keys),
                Arc::clone(stop),
                Arc::clone(shots),
            );
            tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .unwrap();
                let mut tick = rate.map(|r| {
                    let mut t = tokio::time::interval(Duration::from_secs(1) / r.max(1));
                    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    t
                });
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    if let Some(t) = tick.as_mut() {
                        t.tick().await;
                    }
                    let gw = (t + n) % proxies.len();
                    let key = &keys[(t + n) % keys.len()];
                    n += 1;
                    let (status, code, headers) =
                        send_signed(&client, proxies[gw], key, &uuid::Uuid::new_v4().to_string())
                            .await;
                    shots.lock().unwrap().push(Shot {
                        at: Instant::now(),
                        gw,
                        status,
                        code,
                        headers,
                    });
                }
            })
        })
        .collect()
}

/// One signed POST; its status, problem code (empty on success) and the headers sent.
async fn send_signed(
    client: &reqwest::Client,
    proxy: SocketAddr,
    key: &Key,
    nonce: &str,
) -> (u16, String, Vec<(String, String)>) {
    let headers = v1_headers(key, "POST", TARGET, b"{}", now(), nonce);
    let (status, code) = resend(client, proxy, &headers).await;
    (status, code, headers)
}

/// Sends exactly these headers (a replay when they were sent before).
async fn resend(
    client: &reqwest::Client,
    proxy: SocketAddr,
    headers: &[(String, String)],
) -> (u16, String) {
    let mut req = client
        .post(format!("http://{proxy}{TARGET}"))
        .body(b"{}".to_vec());
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    match req.send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let body: serde_json::Value = resp.json().await.unwrap_or_default();
            let code = body["code"].as_str().unwrap_or_default().to_owned();
            (status, code)
        }
        // A connection cut by the gateway counts as an error answer, not a refusal.
        Err(_) => (599, "transport".into()),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Revokes `count` fresh keys, each on one gateway after every gateway has it cached, and
/// times, from the admin API's answer, how long until every other gateway refuses it.
async fn revocation_propagation(gws: &[Gateway], count: usize) -> Vec<Duration> {
    let client = reqwest::Client::new();
    let mut took = Vec::with_capacity(count);
    for i in 0..count {
        let home = &gws[i % gws.len()];
        let key = home.mint(json!({"name": format!("revoked {i}")})).await;
        for gw in gws {
            let (status, code, _) =
                send_signed(&client, gw.proxy, &key, &uuid::Uuid::new_v4().to_string()).await;
            assert_eq!(status, 200, "warming the cache: {code}");
        }
        home.revoke(&key).await;
        let acknowledged = Instant::now();
        let others = gws
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i % gws.len())
            .map(|(_, gw)| {
                let (client, key) = (client.clone(), key.clone());
                let proxy = gw.proxy;
                async move {
                    loop {
                        let (status, code, _) =
                            send_signed(&client, proxy, &key, &uuid::Uuid::new_v4().to_string())
                                .await;
                        if status == 401 {
                            assert_eq!(code, "revoked_key");
                            return acknowledged.elapsed();
                        }
                        assert_eq!(status, 200, "{code}");
                        assert!(
                            acknowledged.elapsed() < Duration::from_secs(2),
                            "a gateway still accepts a key revoked 2 s ago"
                        );
                    }
                }
            });
        let each = futures_util::future::join_all(others).await;
        took.push(each.into_iter().max().unwrap_or_default());
    }
    took.sort();
    took
}

/// The change feed's own lag on every gateway (Redis' clock at the write to the gateway's at
/// the eviction, `keygate_change_feed_lag_seconds`): changes timed, and how many within 5, 10
/// and 25 ms.
async fn feed_lag(gws: &[Gateway]) -> String {
    let (mut total, mut within) = (0.0, [0.0f64; 3]);
    for gw in gws {
        let text = gw.metrics_text().await;
        let value = |line: &str| {
            line.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        for line in text.lines() {
            if line.starts_with("keygate_change_feed_lag_seconds_count") {
                total += value(line);
            }
            for (i, le) in ["0.005", "0.01", "0.025"].iter().enumerate() {
                if line.starts_with(&format!(
                    "keygate_change_feed_lag_seconds_bucket{{le=\"{le}\"}}"
                )) {
                    within[i] += value(line);
                }
            }
        }
    }
    format!(
        "{total} changes delivered, {:.1} % within 5 ms, {:.1} % within 10 ms, {:.1} % within 25 ms",
        within[0] / total.max(1.0) * 100.0,
        within[1] / total.max(1.0) * 100.0,
        within[2] / total.max(1.0) * 100.0,
    )
}

fn fleet_options(echo: &Echo, cluster: &RedisCluster, store_more: &str) -> Options {
    let mut opts = Options::new(echo);
    opts.store_toml = Some(format!(
        "[store]\nkind = \"redis\"\nurl = \"{}\"\n{store_more}",
        cluster.url()
    ));
    opts.routes.push_str(&format!(
        "\n[[owners]]\nname = \"fleet-owner\"\nrate_limits = [{{ name = \"owner\", limit = {}, window = \"1s\" }}]\n",
        scale().owner_limit
    ));
    opts
}

async fn start_fleet(echo: &Echo, cluster: &RedisCluster, store_more: &str) -> Vec<Gateway> {
    let first = Gateway::start(fleet_options(echo, cluster, store_more)).await;
    let mut gws = vec![first];
    for _ in 1..4 {
        let mut opts = fleet_options(echo, cluster, store_more);
        opts.master_key = Some(gws[0].master_key.clone());
        gws.push(Gateway::start(opts).await);
    }
    gws
}

/// The whole failover story on one cluster, as the issue counts it.
async fn master_kill_under_load(store_more: &str, replicated: bool) {
    let _alone = ONE_FLEET_AT_A_TIME.lock().await;
    let scale = scale();
    // "replicated" needs a replica left after the failover: two per master.
    let cluster = RedisCluster::start_with_replicas(if replicated { 2 } else { 1 }, 1000);
    let echo = Echo::start().await;
    let gws = start_fleet(&echo, &cluster, store_more).await;
    let proxies: Arc<Vec<SocketAddr>> = Arc::new(gws.iter().map(|g| g.proxy).collect());
    let mut keys = Vec::new();
    for i in 0..8 {
        keys.push(gws[i % 4].mint(json!({"name": format!("load {i}")})).await);
    }
    let keys = Arc::new(keys);
    let stop = Arc::new(AtomicBool::new(false));
    let shots: Arc<Mutex<Vec<Shot>>> = Arc::default();
    let load = start_load(
        &proxies,
        &keys,
        scale.load_tasks,
        Some(scale.task_rate),
        &stop,
        &shots,
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    let before = revocation_propagation(&gws, scale.revocations).await;

    // The master holding every key record (`{kg}`): the worst one to lose.
    let dead = cluster.master_index_for("{kg}:all");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut cluster = cluster;
    let killed_at = Instant::now();
    cluster.nodes[dead].stop();
    let failover =
        tokio::task::block_in_place(|| cluster.wait_failover(dead, Duration::from_secs(20)));
    // Load goes on until every gateway has answered 200s for a while again.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Replays: every request accepted in the 2 s before the kill, sent again to another
    // gateway now that the replica serves.
    let accepted_before: Vec<(usize, Vec<(String, String)>)> = shots
        .lock()
        .unwrap()
        .iter()
        .filter(|s| {
            s.status == 200 && s.at <= killed_at && killed_at - s.at < Duration::from_secs(2)
        })
        .map(|s| (s.gw, s.headers.clone()))
        .collect();
    let client = reqwest::Client::new();
    let (mut replay_ok, mut replay_refused, mut replay_other) = (0, 0, 0);
    for (gw, headers) in &accepted_before {
        match resend(&client, proxies[(gw + 1) % 4], headers).await {
            (200, _) => replay_ok += 1,
            (401, code) if code == "replayed_nonce" => replay_refused += 1,
            _ => replay_other += 1,
        }
    }

    let after = revocation_propagation(&gws, scale.revocations).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }

    let shots = std::mem::take(&mut *shots.lock().unwrap());
    let false_refusals: Vec<_> = shots
        .iter()
        .filter(|s| s.status == 401 || s.status == 403)
        .map(|s| (s.status, s.code.clone()))
        .collect();
    let non_200_before = shots
        .iter()
        .filter(|s| s.at < killed_at && s.status != 200)
        .count();
    let failed_after: Vec<&Shot> = shots
        .iter()
        .filter(|s| s.at >= killed_at && s.status != 200)
        .collect();
    let window = failed_after
        .last()
        .map_or(Duration::ZERO, |s| s.at - killed_at);
    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    for s in &failed_after {
        *codes.entry(format!("{} {}", s.status, s.code)).or_default() += 1;
    }
    let span = shots.last().map_or(Duration::ZERO, |l| l.at - shots[0].at);
    eprintln!("fleet: {store_more:?}");
    eprintln!(
        "fleet: {} signed requests on 4 gateways in {span:?}; master {dead} killed, replica promoted after {failover:?}; \
         non-200 answers after the kill: {} over {window:?} ({codes:?}); before the kill: {non_200_before}; \
         401/403 to valid requests: {}",
        shots.len(),
        failed_after.len(),
        false_refusals.len(),
    );
    eprintln!(
        "fleet: replays of the {} requests accepted in the 2 s before the kill: {replay_ok} accepted, \
         {replay_refused} refused replayed_nonce, {replay_other} other",
        accepted_before.len()
    );
    eprintln!(
        "fleet: revocation propagation to the 3 other gateways under load, {} revocations: \
         before the failover p50 {:?} p99 {:?} max {:?}; after it p50 {:?} p99 {:?} max {:?}",
        before.len(),
        percentile(&before, 0.5),
        percentile(&before, 0.99),
        before[before.len() - 1],
        percentile(&after, 0.5),
        percentile(&after, 0.99),
        after[after.len() - 1],
    );
    eprintln!(
        "fleet: change feed lag on the 4 gateways: {}",
        feed_lag(&gws).await
    );
    assert!(
        false_refusals.is_empty(),
        "valid requests refused: {false_refusals:?}"
    );
    assert_eq!(non_200_before, 0, "errors before the kill");
    assert!(
        window < Duration::from_secs(5),
        "non-200 answers for {window:?} after the kill"
    );
    assert!(!accepted_before.is_empty(), "no request to replay");
    if replicated {
        assert_eq!(replay_ok, 0, "replays accepted after the failover");
    }
    assert_eq!(
        replay_ok + replay_refused,
        accepted_before.len(),
        "every replay is answered 200 or replayed_nonce once the replica serves ({replay_other} other)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_rides_out_a_cluster_master_kill() {
    master_kill_under_load("", false).await;
}

/// With `nonce_durability = "replicated"` no request accepted before the kill is accepted
/// again after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_replicated_nonces_no_replay_survives_a_cluster_master_kill() {
    master_kill_under_load("nonce_durability = \"replicated\"", true).await;
}

/// Requests admitted under a limit of `limit` per `window` over `elapsed`, against the GCRA
/// bound `L + L·t/W`: the relative difference.
fn off_bound(admitted: usize, limit: f64, window: f64, elapsed: f64) -> (f64, f64) {
    let bound = limit + limit * elapsed / window;
    (bound, (admitted as f64 - bound).abs() / bound)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limits_hold_across_four_gateways_on_a_cluster() {
    let _alone = ONE_FLEET_AT_A_TIME.lock().await;
    let scale = scale();
    let cluster = RedisCluster::start_with_replicas(1, 1000);
    let echo = Echo::start().await;
    let gws = start_fleet(&echo, &cluster, "").await;
    let proxies: Arc<Vec<SocketAddr>> = Arc::new(gws.iter().map(|g| g.proxy).collect());
    let limited = gws[0]
        .mint(json!({
            "name": "limited",
            "rate_limits": [{"name": "key", "limit": scale.key_limit, "window": "1s"}],
        }))
        .await;
    let owned: Vec<Key> = futures_util::future::join_all(
        (0..2).map(|i| gws[i].mint(json!({"name": format!("owned {i}"), "owner": "fleet-owner"}))),
    )
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let key_shots: Arc<Mutex<Vec<Shot>>> = Arc::default();
    let owner_shots: Arc<Mutex<Vec<Shot>>> = Arc::default();
    let mut load = start_load(
        &proxies,
        &Arc::new(vec![limited]),
        4,
        None,
        &stop,
        &key_shots,
    );
    load.extend(start_load(
        &proxies,
        &Arc::new(owned),
        4,
        None,
        &stop,
        &owner_shots,
    ));
    tokio::time::sleep(Duration::from_secs(scale.limit_secs)).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let mut failures = Vec::new();
    let seen = echo.seen();
    for (name, shots, limit, owner) in [
        ("key", &key_shots, f64::from(scale.key_limit), "acme"),
        (
            "owner",
            &owner_shots,
            f64::from(scale.owner_limit),
            "fleet-owner",
        ),
    ] {
        let shots = shots.lock().unwrap();
        let admitted = shots.iter().filter(|s| s.status == 200).count();
        let refused = shots
            .iter()
            .filter(|s| s.status == 429 && s.code == "rate_limited")
            .count();
        let other = shots.len() - admitted - refused;
        // The span the limit admitted over, as close to the decisions as the test can see:
        // when the upstream received the first and the last admitted request.
        let times: Vec<Instant> = seen
            .iter()
            .filter(|r| r.headers.get("x-keygate-owner").is_some_and(|o| o == owner))
            .map(|r| r.at)
            .collect();
        assert_eq!(
            times.len(),
            admitted,
            "{name}: upstream saw every admitted request"
        );
        let first = times.iter().min().unwrap();
        let last = times.iter().max().unwrap();
        let elapsed = (*last - *first).as_secs_f64();
        let (bound, off) = off_bound(admitted, limit, 1.0, elapsed);
        eprintln!(
            "fleet: {name} limit {limit}/s on 4 gateways over {elapsed:.2} s: {admitted} admitted \
             (GCRA bound {bound:.1}, off by {:.2} %), {refused} refused, {other} other",
            off * 100.0
        );
        if other > 0 || refused == 0 || off > 0.02 {
            failures.push(format!(
                "{name}: {admitted} admitted against a bound of {bound:.1}, {refused} refused, \
                 {other} answers other than 200 and 429 rate_limited"
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}
