//! The real binary on Redis Sentinel (issue 26): two gateways on one primary + replica + three
//! sentinels, the primary SIGKILLed under signed load; the config's Sentinel errors; passwords.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use support::redis::SentinelSet;
use support::{assert_problem, free_port, run_output, Echo, Gateway, Key, Options};

const BIN: &str = env!("CARGO_BIN_EXE_keygate");

fn on_sentinels(echo: &Echo, set: &SentinelSet, more: &str) -> Options {
    let mut opts = Options::new(echo);
    opts.store_toml = Some(set.store_toml(more));
    opts
}

fn secret_file(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

/// Signed load: several tasks sending valid requests (fresh nonce each) to the gateways in
/// turn, each answer's status recorded with when it came.
struct Load {
    answers: Arc<Mutex<Vec<(Instant, u16)>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(gateways: &Arc<Vec<Gateway>>, key: &Key, tasks: usize) -> Self {
        let answers: Arc<Mutex<Vec<(Instant, u16)>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..tasks)
            .map(|t| {
                let (gateways, key, answers, stop) = (
                    Arc::clone(gateways),
                    key.clone(),
                    Arc::clone(&answers),
                    Arc::clone(&stop),
                );
                tokio::spawn(async move {
                    let mut i = t;
                    while !stop.load(Ordering::Relaxed) {
                        let gw = &gateways[i % gateways.len()];
                        i += 1;
                        let status = gw
                            .send_v1(&key, "POST", "/v1/payments", b"{}")
                            .await
                            .status()
                            .as_u16();
                        answers.lock().unwrap().push((Instant::now(), status));
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
            .collect();
        Self {
            answers,
            stop,
            tasks,
        }
    }

    /// Waits until only 200s came for 2 s after some non-200 after `event` (true), or 30 s
    /// pass (false).
    async fn wait_recovered(&self, event: Instant) -> bool {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let last_bad = self
                .answers
                .lock()
                .unwrap()
                .iter()
                .filter(|(at, s)| *at > event && *s != 200)
                .map(|(at, _)| *at)
                .max();
            if last_bad.is_some_and(|b| b.elapsed() > Duration::from_secs(2)) {
                return true;
            }
            if last_bad.is_none() && event.elapsed() > Duration::from_secs(8) {
                // Not one failed answer: nothing to recover from.
                return true;
            }
            if event.elapsed() > Duration::from_secs(30) {
                return false;
            }
        }
    }

    async fn finish(self) -> Vec<(Instant, u16)> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let seen = self.answers.lock().unwrap().clone();
        seen
    }
}

/// The figures of one failover: (valid requests answered 401/403, time from `event` to the
/// last non-200), printed for the note.
fn figures(what: &str, seen: &[(Instant, u16)], event: Instant) -> (usize, Duration) {
    let after: Vec<&(Instant, u16)> = seen.iter().filter(|(at, _)| *at > event).collect();
    let refused_as_invalid = seen.iter().filter(|(_, s)| *s == 401 || *s == 403).count();
    let bad: Vec<Instant> = after
        .iter()
        .filter(|(_, s)| *s != 200)
        .map(|(at, _)| *at)
        .collect();
    let window = match (bad.iter().min(), bad.iter().max()) {
        (Some(a), Some(b)) => *b - *a,
        _ => Duration::ZERO,
    };
    let until_last_bad = bad.iter().max().map_or(Duration::ZERO, |b| *b - event);
    let mut statuses = std::collections::BTreeMap::new();
    for (_, s) in &after {
        *statuses.entry(*s).or_insert(0u32) += 1;
    }
    eprintln!(
        "{what}: {} requests ({} before, {} after); valid requests answered 401/403: \
         {refused_as_invalid}; non-200 window {:.2} s (first to last), {:.2} s from the event \
         to the last non-200; statuses after: {statuses:?}",
        seen.len(),
        seen.len() - after.len(),
        after.len(),
        window.as_secs_f64(),
        until_last_bad.as_secs_f64(),
    );
    (refused_as_invalid, until_last_bad)
}

/// Two gateways on `set` sharing one master key, and a key that works on both.
async fn fleet(echo: &Echo, set: &SentinelSet) -> (Arc<Vec<Gateway>>, Key) {
    let gw1 = Gateway::start(on_sentinels(echo, set, "")).await;
    let mut opts = on_sentinels(echo, set, "");
    opts.master_key = Some(gw1.master_key.clone());
    let gw2 = Gateway::start(opts).await;
    let gateways = Arc::new(vec![gw1, gw2]);
    let key = gateways[0].mint(json!({})).await;
    for gw in gateways.iter() {
        assert_eq!(
            gw.send_v1(&key, "POST", "/v1/payments", b"{}")
                .await
                .status(),
            200
        );
    }
    (gateways, key)
}

/// A key minted after the failover works on both gateways, and its revocation on one reaches
/// the other over the change feed, now on the new primary. Returns how long that took.
async fn fresh_key_and_revocation_work(gateways: &[Gateway]) -> Duration {
    let fresh = gateways[1].mint(json!({})).await;
    for gw in gateways {
        assert_eq!(
            gw.send_v1(&fresh, "POST", "/v1/payments", b"{}")
                .await
                .status(),
            200
        );
    }
    let revoked_at = Instant::now();
    gateways[0].revoke(&fresh).await;
    loop {
        let r = gateways[1]
            .send_v1(&fresh, "POST", "/v1/payments", b"{}")
            .await;
        if r.status() == 401 {
            assert_problem(r, 401, "revoked_key").await;
            return revoked_at.elapsed();
        }
        assert_eq!(r.status(), 200);
        assert!(
            revoked_at.elapsed() < Duration::from_secs(2),
            "the other gateway still accepts a key revoked after the failover"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_on_sentinel_follows_a_primary_kill_without_a_false_refusal() {
    let test_started = Instant::now();
    let mut set = SentinelSet::start();
    let echo = Echo::start().await;
    let (gateways, key) = fleet(&echo, &set).await;
    let load = Load::start(&gateways, &key, 4);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let old_primary = set.primary_addr();
    let killed_at = Instant::now();
    set.kill_primary();
    let recovered = load.wait_recovered(killed_at).await;
    let seen = load.finish().await;
    let (refused_as_invalid, until_last_bad) =
        figures("sentinel failover (SIGKILL)", &seen, killed_at);
    assert_eq!(refused_as_invalid, 0, "valid requests refused as invalid");
    assert!(
        recovered,
        "the gateways did not serve again within 30 s of the kill"
    );
    assert!(
        until_last_bad < Duration::from_secs(10),
        "non-200 answers for {until_last_bad:?} after the kill"
    );
    assert_ne!(set.primary_addr(), old_primary, "no failover happened");
    let propagation = fresh_key_and_revocation_work(&gateways).await;
    eprintln!(
        "sentinel failover (SIGKILL): primary {old_primary} -> {}; a revocation after it \
         reached the other gateway in {:.1} ms; whole test {:.1} s",
        set.primary_addr(),
        propagation.as_secs_f64() * 1000.0,
        test_started.elapsed().as_secs_f64()
    );
    assert!(test_started.elapsed() < Duration::from_secs(60));
}

/// `SENTINEL FAILOVER` leaves the old primary alive as a replica: a gateway that kept writing
/// to it would get READONLY on every nonce (503 for ever). The fleet must move to the new
/// primary, with no valid request refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_on_sentinel_stops_writing_to_a_demoted_primary() {
    let set = SentinelSet::start();
    let echo = Echo::start().await;
    let (gateways, key) = fleet(&echo, &set).await;
    let load = Load::start(&gateways, &key, 4);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let old_port = set.primary.port;
    let switched_at = Instant::now();
    set.force_failover();
    // Sentinel promotes the replica at once but may reconfigure the old primary as its replica
    // only seconds later (about 8 s here): until then both answer as masters.
    let deadline = Instant::now() + Duration::from_secs(20);
    while set.role_of(old_port) != "slave" {
        assert!(Instant::now() < deadline, "the old primary was not demoted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let demoted_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seen = load.finish().await;
    let (refused_as_invalid, until_last_bad) =
        figures("sentinel failover (SENTINEL FAILOVER)", &seen, switched_at);
    assert_eq!(refused_as_invalid, 0, "valid requests refused as invalid");
    assert!(
        until_last_bad < Duration::from_secs(10),
        "{until_last_bad:?}"
    );
    assert_eq!(
        set.primary_addr(),
        format!("127.0.0.1:{}", set.replica.port)
    );
    // Once the old primary is a replica, writing to it would be answered READONLY (503): every
    // answer after its demotion is a 200, so the writes go to the new primary.
    let late: Vec<u16> = seen
        .iter()
        .filter(|(at, _)| *at > demoted_at)
        .map(|(_, s)| *s)
        .collect();
    assert!(
        late.len() > 50 && late.iter().all(|s| *s == 200),
        "{late:?}"
    );
    fresh_key_and_revocation_work(&gateways).await;
}

/// When the replica was promoted, and when each gateway logged its switch to it (polled every
/// 10 ms from `from`, for at most `within`).
fn promotion_and_switches(
    set_replica_port: u16,
    password: Option<String>,
    gateways: Arc<Vec<Gateway>>,
    within: Duration,
) -> std::thread::JoinHandle<(Option<Instant>, Vec<Option<Instant>>)> {
    std::thread::spawn(move || {
        let started = Instant::now();
        let mut promoted = None;
        let mut switched: Vec<Option<Instant>> = vec![None; gateways.len()];
        while started.elapsed() < within
            && (promoted.is_none() || switched.iter().any(Option::is_none))
        {
            if promoted.is_none() {
                let reply =
                    support::redis::resp_exchange(set_replica_port, password.as_deref(), &["ROLE"]);
                if reply.contains("\r\nmaster\r\n") {
                    promoted = Some(Instant::now());
                }
            }
            for (gw, at) in gateways.iter().zip(switched.iter_mut()) {
                if at.is_none() && gw.log().contains("switched to the new primary") {
                    *at = Some(Instant::now());
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        (promoted, switched)
    })
}

/// One signed request: when answered, to which gateway, its status, its headers (to replay).
type Shot = (Instant, usize, u16, Vec<(String, String)>);

/// `SENTINEL FAILOVER` under signed load while an admin revokes a fresh key every 200 ms for
/// about 13 s (past the old primary's demotion, about 8 s in): every revocation answered 200
/// holds after the failover (record and both gateways), and with `replicated` no request
/// accepted during the failover is accepted again.
async fn planned_failover_keeps_acknowledged_writes(more: &str, replicated: bool, guard: bool) {
    let test_started = Instant::now();
    let set = SentinelSet::start();
    if guard {
        // The operator's guard (docs/operations.md): a primary without a replica refuses
        // writes (NOREPLICAS), so the old one takes none once its replica is promoted.
        for port in [set.primary.port, set.replica.port] {
            for (k, v) in [
                ("min-replicas-to-write", "1"),
                ("min-replicas-max-lag", "2"),
            ] {
                let reply = support::redis::resp_exchange(
                    port,
                    set.password.as_deref(),
                    &["CONFIG", "SET", k, v],
                );
                assert!(reply.contains("+OK"), "CONFIG SET {k}: {reply}");
            }
        }
    }
    let echo = Echo::start().await;
    let gw1 = Gateway::start(on_sentinels(&echo, &set, more)).await;
    let mut opts = on_sentinels(&echo, &set, more);
    opts.master_key = Some(gw1.master_key.clone());
    let gw2 = Gateway::start(opts).await;
    let gateways = Arc::new(vec![gw1, gw2]);
    let mut keys = Vec::new();
    for i in 0..65 {
        keys.push(gateways[i % 2].mint(json!({})).await);
    }
    let load_key = gateways[0].mint(json!({})).await;
    // Signed load that keeps each request's headers, for the replays.
    let shots: Arc<Mutex<Vec<Shot>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|t| {
            let (gateways, key, shots, stop) = (
                Arc::clone(&gateways),
                load_key.clone(),
                Arc::clone(&shots),
                Arc::clone(&stop),
            );
            tokio::spawn(async move {
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    let g = i % 2;
                    i += 1;
                    let headers = support::v1_headers(
                        &key,
                        "POST",
                        "/v1/payments",
                        b"{}",
                        support::now(),
                        &uuid::Uuid::new_v4().to_string(),
                    );
                    let status = gateways[g]
                        .send("POST", "/v1/payments", &headers, b"{}")
                        .await
                        .status()
                        .as_u16();
                    shots
                        .lock()
                        .unwrap()
                        .push((Instant::now(), g, status, headers));
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let watcher = promotion_and_switches(
        set.replica.port,
        set.password.clone(),
        Arc::clone(&gateways),
        Duration::from_secs(15),
    );
    let failover_at = Instant::now();
    set.force_failover();
    // An admin revokes one key every 200 ms through the failover.
    let mut revoked_ok = Vec::new();
    let mut revoke_statuses = std::collections::BTreeMap::<u16, usize>::new();
    let client = reqwest::Client::new();
    for (i, key) in keys.iter().enumerate() {
        let r = client
            .post(gateways[i % 2].admin_url(&format!("/v1/keys/{}/revoke", key.id)))
            .bearer_auth(support::ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        *revoke_statuses.entry(status).or_default() += 1;
        if status == 200 {
            revoked_ok.push(key.clone());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (promoted, switched) = tokio::task::block_in_place(|| watcher.join().unwrap());
    // Wait for the old primary's demotion (its reset from the new primary) before checking.
    let deadline = Instant::now() + Duration::from_secs(20);
    while set.role_of(set.primary.port) != "slave" {
        assert!(Instant::now() < deadline, "the old primary was not demoted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let shots = std::mem::take(&mut *shots.lock().unwrap());

    // Every revocation answered 200 holds: in the record and on both gateways.
    let mut lost = Vec::new();
    for key in &revoked_ok {
        let record = gateways[0].key_record(&key.id).await;
        let refused: Vec<u16> = {
            let mut v = Vec::new();
            for gw in gateways.iter() {
                v.push(
                    gw.send_v1(key, "POST", "/v1/payments", b"{}")
                        .await
                        .status()
                        .as_u16(),
                );
            }
            v
        };
        if record["revoked_at"].is_null() || refused.iter().any(|s| *s != 401) {
            lost.push((key.id.clone(), record["revoked_at"].clone(), refused));
        }
    }
    // Replays of every request accepted from the failover on, to the other gateway.
    let accepted: Vec<&Shot> = shots
        .iter()
        .filter(|(at, _, s, _)| *at >= failover_at && *s == 200)
        .collect();
    let mut replay_ok = 0;
    let mut replays: Vec<_> = Vec::new();
    for (_, g, _, headers) in &accepted {
        replays.push((*g, headers.clone()));
    }
    for (g, headers) in &replays {
        let status = gateways[(g + 1) % 2]
            .send("POST", "/v1/payments", headers, b"{}")
            .await
            .status()
            .as_u16();
        if status == 200 {
            replay_ok += 1;
        }
    }
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for (at, _, s, _) in &shots {
        if *at >= failover_at {
            *statuses.entry(*s).or_default() += 1;
        }
    }
    let ms = |a: Option<Instant>, b: Option<Instant>| match (a, b) {
        (Some(a), Some(b)) if b >= a => format!("+{} ms", (b - a).as_millis()),
        (Some(a), Some(b)) => format!("-{} ms", (a - b).as_millis()),
        _ => "never".to_owned(),
    };
    eprintln!(
        "planned failover ({more:?}, min-replicas-to-write guard: {guard}): replica promoted {} after SENTINEL FAILOVER; gateways \
         switched {:?} after the promotion; revocations {revoke_statuses:?}, {} of the {} \
         answered 200 lost: {lost:?}; signed requests from the failover on: {statuses:?}; \
         replays of the {} accepted: {replay_ok} accepted again; whole test {:.1} s",
        ms(Some(failover_at), promoted),
        switched.iter().map(|s| ms(promoted, *s)).collect::<Vec<_>>(),
        lost.len(),
        revoked_ok.len(),
        replays.len(),
        test_started.elapsed().as_secs_f64(),
    );
    assert!(
        lost.is_empty(),
        "revocations answered 200 and lost: {lost:?}"
    );
    // Sentinel sees the promotion by polling the replica's INFO (every second during a
    // failover) and announces +promoted-slave then: the gateways follow within about that.
    for s in &switched {
        let late = match (promoted, s) {
            (Some(p), Some(s)) => s.saturating_duration_since(p),
            _ => Duration::MAX,
        };
        assert!(
            late < Duration::from_millis(1500),
            "a gateway switched {late:?} after the promotion"
        );
    }
    if replicated {
        assert_eq!(replay_ok, 0, "replays accepted after the failover");
    }
    assert!(test_started.elapsed() < Duration::from_secs(60));
}

/// Revocations acknowledged during a planned failover are not lost (the gateways move to the
/// promoted replica at its promotion, not seconds later at `+switch-master`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_planned_failover_loses_no_acknowledged_revocation() {
    planned_failover_keeps_acknowledged_writes("", false, true).await;
}

/// With "replicated", no revocation answered 200 and no request accepted during a planned
/// failover is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_replicated_durability_a_planned_failover_loses_no_write() {
    planned_failover_keeps_acknowledged_writes("nonce_durability = \"replicated\"", true, false)
        .await;
}

/// A config with `[store]` replaced by `store`, nothing else of note.
fn config_with_store(dir: &Path, store: &str) -> PathBuf {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:{}\"\nallow_no_routes = true\n[admin]\nlisten = \
         \"127.0.0.1:{}\"\n[metrics]\nlisten = \"127.0.0.1:{}\"\n{store}\n",
        free_port(),
        free_port(),
        free_port()
    );
    let path = dir.join("keygate.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn check_config(path: &Path) -> (i32, String) {
    run_output(
        Command::new(BIN)
            .arg("check-config")
            .arg(path)
            .env_remove("KEYGATE_MASTER_KEY")
            .env_remove("CREDENTIALS_DIRECTORY"),
    )
}

/// `keygate serve` until it exits (at most 10 s): its code and output.
fn serve_exit(path: &Path) -> (i32, String) {
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(path)
        .env("KEYGATE_MASTER_KEY", support::master_key())
        .env_remove("CREDENTIALS_DIRECTORY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("keygate serve did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    run_output_of(child)
}

fn run_output_of(child: std::process::Child) -> (i32, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn check_config_names_each_sentinel_mistake() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases = [
        (
            "url = \"redis://127.0.0.1:6390\"\nsentinels = [\"127.0.0.1:26379\"]\nsentinel_master = \"keygate\"",
            "store.sentinels: cannot be combined with store.url",
        ),
        (
            "sentinels = [\"127.0.0.1:26379\"]",
            "store.sentinel_master: required with store.sentinels",
        ),
        ("sentinels = []\nsentinel_master = \"keygate\"", "store.sentinels: is empty"),
        (
            "sentinels = [\"127.0.0.1\"]\nsentinel_master = \"keygate\"",
            "store.sentinels: \"127.0.0.1\": must be \"host:port\"",
        ),
        (
            "sentinels = [\"rediss://127.0.0.1:26379\"]\nsentinel_master = \"keygate\"",
            "TLS to sentinels is not supported",
        ),
        (
            "url = \"redis://127.0.0.1:6390\"\npassword_file = \"/nonexistent\"",
            "store.password_file: only used with store.sentinels",
        ),
    ];
    for (store, expected) in cases {
        let cfg = config_with_store(d, &format!("[store]\nkind = \"redis\"\n{store}"));
        let (code, text) = check_config(&cfg);
        assert_eq!(code, 64, "{store}: {text}");
        assert!(
            text.contains(expected),
            "{store}: want {expected:?} in {text}"
        );
    }

    // A password file others may read: check-config says so (64), serve refuses to start
    // (69), and neither prints the password.
    let loose = secret_file(d, "redis-password", "hunter2-data", 0o644);
    let tight = secret_file(d, "sentinel-password", "hunter2-sentinel", 0o600);
    let cfg = config_with_store(
        d,
        &format!(
            "[store]\nkind = \"redis\"\nsentinels = [\"127.0.0.1:{}\"]\nsentinel_master = \
             \"keygate\"\npassword_file = \"{}\"\nsentinel_password_file = \"{}\"",
            free_port(),
            loose.display(),
            tight.display()
        ),
    );
    let (code, text) = check_config(&cfg);
    assert_eq!(code, 64, "{text}");
    assert!(
        text.contains("store.password_file") && text.contains("mode 644"),
        "{text}"
    );
    assert!(!text.contains("store.sentinel_password_file"), "{text}");
    let (code, serve_text) = serve_exit(&cfg);
    assert_eq!(code, 69, "{serve_text}");
    assert!(serve_text.contains("mode 644"), "{serve_text}");
    for t in [&text, &serve_text] {
        assert!(!t.contains("hunter2"), "a password was printed: {t}");
    }

    // Both private: the config is fine (check-config does not connect).
    std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let (code, text) = check_config(&cfg);
    assert_eq!(code, 0, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_reads_the_data_and_sentinel_passwords_from_their_files() {
    let set = SentinelSet::start_with(Some("data-pw-1"), Some("sentinel-pw-1"));
    let dir = tempfile::tempdir().unwrap();
    let data = secret_file(dir.path(), "data", "data-pw-1\n", 0o600);
    let sentinel = secret_file(dir.path(), "sentinel", "sentinel-pw-1\n", 0o600);

    // Without the sentinels' password no primary can be asked for: serve exits 69, and says
    // why without a password in it.
    let cfg = config_with_store(
        dir.path(),
        &set.store_toml(&format!("password_file = \"{}\"", data.display())),
    );
    let (code, text) = serve_exit(&cfg);
    assert_eq!(code, 69, "{text}");
    assert!(text.contains("sentinel"), "{text}");
    assert!(!text.contains("pw-1"), "a password was printed: {text}");

    let echo = Echo::start().await;
    let gw = Gateway::start(on_sentinels(
        &echo,
        &set,
        &format!(
            "password_file = \"{}\"\nsentinel_password_file = \"{}\"",
            data.display(),
            sentinel.display()
        ),
    ))
    .await;
    let key = gw.mint(json!({})).await;
    assert_eq!(
        gw.send_v1(&key, "POST", "/v1/payments", b"{}")
            .await
            .status(),
        200
    );
    assert!(!gw.log().contains("pw-1"), "a password was logged");
    // The +switch-master follower authenticates to the sentinels too.
    assert!(
        !gw.log()
            .contains("cannot follow the sentinel's notifications"),
        "{}",
        gw.log()
    );

    // The CLI on the same config: health reaches the gateway, a backup reads the store
    // through the sentinels.
    let config = gw.dir.join("keygate.toml");
    let cli = |args: &[&str]| {
        run_output(
            Command::new(BIN)
                .arg("--config")
                .arg(&config)
                .args(args)
                .env("KEYGATE_MASTER_KEY", &gw.master_key)
                .env_remove("KEYGATE_ADMIN_TOKEN"),
        )
    };
    let (code, text) = cli(&["health"]);
    assert_eq!(code, 0, "{text}");
    let backup = dir.path().join("backup.jsonl");
    let (code, text) = cli(&["store", "backup", "--to", backup.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains(": 1 keys"), "{text}");
    assert!(!text.contains("pw-1"), "{text}");
}
