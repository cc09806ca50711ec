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
use support::{assert_problem, free_port, run_output, Echo, Gateway, Options};

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

/// What the load saw: each answer's status, with when it came.
type Answers = Arc<Mutex<Vec<(Instant, u16)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_on_sentinel_follows_a_primary_kill_without_a_false_refusal() {
    let test_started = Instant::now();
    let mut set = SentinelSet::start();
    let echo = Echo::start().await;
    let gw1 = Gateway::start(on_sentinels(&echo, &set, "")).await;
    let mut opts = on_sentinels(&echo, &set, "");
    opts.master_key = Some(gw1.master_key.clone());
    let gw2 = Gateway::start(opts).await;
    let gateways = Arc::new([gw1, gw2]);
    let key = gateways[0].mint(json!({})).await;
    for gw in gateways.iter() {
        assert_eq!(
            gw.send_v1(&key, "POST", "/v1/payments", b"{}")
                .await
                .status(),
            200
        );
    }

    // Signed load from several tasks, each request valid with a fresh nonce, on both gateways.
    let answers: Answers = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..4usize {
        let (gateways, key, answers, stop) = (
            Arc::clone(&gateways),
            key.clone(),
            Arc::clone(&answers),
            Arc::clone(&stop),
        );
        tasks.push(tokio::spawn(async move {
            let mut i = t;
            while !stop.load(Ordering::Relaxed) {
                let gw = &gateways[i % 2];
                i += 1;
                let status = gw
                    .send_v1(&key, "POST", "/v1/payments", b"{}")
                    .await
                    .status()
                    .as_u16();
                answers.lock().unwrap().push((Instant::now(), status));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let old_primary = set.primary_addr();
    let killed_at = Instant::now();
    set.kill_primary();

    // Until both gateways have answered only 200s for 2 s, within 30 s of the kill.
    let recovered = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let seen = answers.lock().unwrap().clone();
        let last_bad = seen
            .iter()
            .filter(|(at, s)| *at > killed_at && *s != 200)
            .map(|(at, _)| *at)
            .max();
        let quiet_since = last_bad.unwrap_or(killed_at);
        if quiet_since.elapsed() > Duration::from_secs(2) && last_bad.is_some() {
            break true;
        }
        if killed_at.elapsed() > Duration::from_secs(30) {
            break false;
        }
    };
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let seen = answers.lock().unwrap().clone();
    let after: Vec<&(Instant, u16)> = seen.iter().filter(|(at, _)| *at > killed_at).collect();
    let refused_as_invalid = seen.iter().filter(|(_, s)| *s == 401 || *s == 403).count();
    let bad: Vec<&&(Instant, u16)> = after.iter().filter(|(_, s)| *s != 200).collect();
    let first_bad = bad.iter().map(|(at, _)| *at).min();
    let last_bad = bad.iter().map(|(at, _)| *at).max();
    let window = match (first_bad, last_bad) {
        (Some(a), Some(b)) => b - a,
        _ => Duration::ZERO,
    };
    let until_last_bad = last_bad.map_or(Duration::ZERO, |b| b - killed_at);
    let mut statuses = std::collections::BTreeMap::new();
    for (_, s) in &after {
        *statuses.entry(*s).or_insert(0u32) += 1;
    }
    eprintln!(
        "sentinel failover: {} requests ({} before the kill, {} after); valid requests answered \
         401/403: {refused_as_invalid}; non-200 window {:.2} s (first to last), {:.2} s from the \
         kill to the last non-200; statuses after the kill: {statuses:?}; primary {old_primary} \
         -> {}",
        seen.len(),
        seen.len() - after.len(),
        after.len(),
        window.as_secs_f64(),
        until_last_bad.as_secs_f64(),
        set.primary_addr()
    );
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

    // A key minted after the failover works on both gateways, and its revocation on one
    // reaches the other over the change feed, now on the new primary.
    let fresh = gateways[1].mint(json!({})).await;
    for gw in gateways.iter() {
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
            break;
        }
        assert_eq!(r.status(), 200);
        assert!(
            revoked_at.elapsed() < Duration::from_secs(2),
            "the other gateway still accepts a key revoked after the failover"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!(
        "sentinel failover: revocation after the failover reached the other gateway in {:.1} ms; \
         whole test {:.1} s",
        revoked_at.elapsed().as_secs_f64() * 1000.0,
        test_started.elapsed().as_secs_f64()
    );
    assert!(test_started.elapsed() < Duration::from_secs(60));
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
}
