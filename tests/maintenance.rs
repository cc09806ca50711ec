//! Operator maintenance through the real binary: master-key rotation while a Redis fleet
//! serves (`keygate secrets status|reseal`), and backup → wipe → restore on both stores
//! (`keygate store backup|restore`), after which the old keys verify.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use support::redis::{RedisCluster, RedisServer};
use support::{
    assert_problem, body_headers, master_key, routes, Echo, Gateway, Key, Options, ADMIN_TOKEN,
};

const BIN: &str = env!("CARGO_BIN_EXE_keygate");

/// Runs `keygate --config CONFIG ARGS…` with `KEYGATE_MASTER_KEY`; exit code and output.
fn keygate(config: &Path, master: &str, args: &[&str]) -> (i32, String) {
    support::run_output(
        Command::new(BIN)
            .arg("--config")
            .arg(config)
            .args(args)
            .env("KEYGATE_MASTER_KEY", master)
            .env_remove("KEYGATE_ADMIN_TOKEN"),
    )
}

/// Writes `text` to a new file of mode 0600.
fn private_file(path: &Path, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.to_path_buf()
}

/// The id `keygate` derives for a base64 master key, read back from `secrets status`.
fn current_id(status: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix("everything is sealed under the current key "))
        .unwrap_or_else(|| panic!("no current key in:\n{status}"))
        .trim()
        .to_owned()
}

fn redis_opts(echo: &Echo, redis: &RedisServer, master: &str, extra_toml: &str) -> Options {
    url_opts(echo, &redis.url(), master, extra_toml)
}

fn url_opts(echo: &Echo, url: &str, master: &str, extra_toml: &str) -> Options {
    let mut opts = Options::new(echo);
    opts.master_key = Some(master.to_owned());
    opts.store_toml = Some(format!("[store]\nkind = \"redis\"\nurl = \"{url}\""));
    opts.routes = format!("{}\n{extra_toml}", routes(echo.addr));
    opts
}

/// One signed request per kind of credential; the statuses.
async fn statuses(gw: &Gateway, keys: &[(&str, &Key)]) -> Vec<(String, u16)> {
    let mut out = Vec::new();
    for (label, key) in keys {
        let status = match key.record["auth"].as_str() {
            Some("bearer") => {
                let h = vec![("authorization".to_owned(), format!("Bearer {}", key.secret))];
                gw.send("POST", "/v1/payments", &h, b"{}").await.status()
            }
            Some("hmac-body") => {
                let nonce = body_nonce();
                let body = format!(r#"{{"amount":"1.00","nonce":{nonce}}}"#);
                let h = body_headers(key, body.as_bytes());
                gw.send("POST", "/v1/payments", &h, body.as_bytes())
                    .await
                    .status()
            }
            _ => gw.post(key, "/v1/payments").await.status(),
        };
        out.push(((*label).to_owned(), status.as_u16()));
    }
    out
}

/// `hmac-body` nonces must grow per key, across gateways sharing the store.
fn body_nonce() -> i64 {
    static LAST: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
    let now_ms = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    let prev = LAST
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
            Some(now_ms.max(last + 1))
        })
        .unwrap();
    now_ms.max(prev + 1)
}

fn all_ok(got: &[(String, u16)]) -> bool {
    got.iter().all(|(_, s)| *s == 200)
}

async fn rotate_with_grace(gw: &Gateway, key: &Key) -> Key {
    let r = gw
        .http
        .post(gw.admin_url(&format!("/v1/keys/{}/rotate", key.id)))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"grace_seconds": 3600}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let record: Value = r.json().await.unwrap();
    Key {
        secret: record["secret"].as_str().unwrap().to_owned(),
        record,
        ..key.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_master_key_rotates_while_a_redis_fleet_serves() {
    let echo = Echo::start().await;
    let redis = RedisServer::start();
    let old = master_key();
    let new = master_key();
    let dir = tempfile::tempdir().unwrap();
    let old_file = private_file(&dir.path().join("old.key"), &old);
    let new_file = private_file(&dir.path().join("new.key"), &new);

    // Keys sealed under the old master key, one of them rotated with a grace period (two
    // sealed secrets on one record), and the assertion keyring.
    let gw_old = Gateway::start(redis_opts(&echo, &redis, &old, "")).await;
    let v1 = gw_old.mint(json!({})).await;
    let rotated = rotate_with_grace(&gw_old, &v1).await;
    let body = gw_old.mint(json!({"auth": "hmac-body"})).await;
    let bearer = gw_old.mint(json!({"auth": "bearer"})).await;
    let keys = [
        ("hmac-v1 new secret", &rotated),
        ("hmac-v1 in grace", &v1),
        ("hmac-body", &body),
        ("bearer", &bearer),
    ];
    assert!(all_ok(&statuses(&gw_old, &keys).await));
    drop(gw_old);

    // Step 1: the fleet restarts with the new key current and the old one previous.
    let previous = format!(
        "[secrets]\nprevious_master_key_file = \"{}\"",
        old_file.display()
    );
    let gw = Arc::new(Gateway::start(redis_opts(&echo, &redis, &new, &previous)).await);
    let got = statuses(&gw, &keys).await;
    assert!(all_ok(&got), "{got:?}");
    let config = gw.dir.join("keygate.toml");

    let (code, before) = keygate(&config, &new, &["secrets", "status"]);
    assert_eq!(code, 0, "{before}");
    let old_line = before
        .lines()
        .find(|l| l.contains("(previous)"))
        .unwrap_or_else(|| panic!("{before}"));
    assert!(
        old_line.contains(": 2 key secrets, 1 in rotation grace"),
        "{before}"
    );
    assert!(before.contains("bearer keys (hashed, no master key): 1"));
    assert!(before.contains("1 other master key id(s) still hold secrets"));

    // Step 2: reseal while signed traffic keeps flowing through the gateway.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let traffic = {
        let (gw, stop, sent, failed) = (gw.clone(), stop.clone(), sent.clone(), failed.clone());
        let key = rotated.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let s = gw.post(&key, "/v1/payments").await.status();
                sent.fetch_add(1, Ordering::Relaxed);
                if s != 200 {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let arg = new_file.display().to_string();
    let reseal = ["secrets", "reseal", "--new-master-key-file", arg.as_str()];
    let (code, out) = tokio::task::spawn_blocking({
        let (config, new, arg) = (config.clone(), new.clone(), arg.clone());
        move || {
            keygate(
                &config,
                &new,
                &["secrets", "reseal", "--new-master-key-file", &arg],
            )
        }
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("2 key records re-sealed, 1 already there; 1 assertion keys re-sealed"),
        "{out}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    let (sent, failed) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("signed requests during the reseal: {sent}, refused: {failed}");
    assert!(sent >= 10, "only {sent} requests during the reseal");
    assert_eq!(failed, 0, "{failed} of {sent} refused during the reseal");

    // Idempotent: a second run moves nothing.
    let (code, again) = keygate(&config, &new, &reseal);
    assert_eq!(code, 0, "{again}");
    assert!(
        again.contains("0 key records re-sealed, 3 already there; 0 assertion keys"),
        "{again}"
    );
    let (_, after) = keygate(&config, &new, &["secrets", "status"]);
    assert!(!after.contains("(previous)"), "{after}");
    let current = current_id(&after);
    assert!(
        after.contains(&format!(
            "{current} (current): 2 key secrets, 1 in rotation grace"
        )),
        "{after}"
    );
    let got = statuses(&gw, &keys).await;
    assert!(all_ok(&got), "{got:?}");
    Arc::try_unwrap(gw).ok().expect("traffic task ended");

    // Step 3: the old key leaves the fleet; every secret still opens.
    let gw = Gateway::start(redis_opts(&echo, &redis, &new, "")).await;
    let got = statuses(&gw, &keys).await;
    assert!(all_ok(&got), "{got:?}");

    // Only the new key opens anything now: seen with the old key alone, every id is one
    // this config does not load (and such a gateway never reports ready: its keyring
    // does not open).
    let config = gw.dir.join("keygate.toml");
    let (code, with_old) = keygate(&config, &old, &["secrets", "status"]);
    assert_eq!(code, 0, "{with_old}");
    assert!(
        with_old.contains(&format!(
            "{current} (NOT LOADED): 2 key secrets, 1 in rotation grace, 1 assertion keys"
        )),
        "{with_old}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reseal_refuses_a_key_file_others_can_read_and_a_missing_previous_key_stops_start() {
    let echo = Echo::start().await;
    let redis = RedisServer::start();
    let mk = master_key();
    let gw = Gateway::start(redis_opts(&echo, &redis, &mk, "")).await;
    let config = gw.dir.join("keygate.toml");
    let open = gw.dir.join("open.key");
    std::fs::write(&open, master_key()).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let arg = open.display().to_string();
    let (code, out) = keygate(
        &config,
        &mk,
        &["secrets", "reseal", "--new-master-key-file", &arg],
    );
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("chmod 600"), "{out}");

    // A configured previous key that is not there is a start failure, not a quiet start
    // that would refuse every key sealed under it.
    let toml = std::fs::read_to_string(&config).unwrap()
        + "\n[secrets]\nprevious_master_key_file = \"/nonexistent/old.key\"\n";
    let broken = gw.dir.join("broken.toml");
    std::fs::write(&broken, toml).unwrap();
    let (code, out) = keygate(&broken, &mk, &["serve"]);
    assert_eq!(code, 69, "{out}");
    assert!(
        out.contains("secrets.previous_master_key_file /nonexistent/old.key"),
        "{out}"
    );
}

/// Backs a store up, wipes it with `wipe`, restores it, and checks the old keys.
async fn backup_wipe_restore(opts: impl Fn() -> Options, wipe: impl FnOnce(&Path)) {
    let mut gw = Gateway::start(opts()).await;
    let v1 = gw.mint(json!({"metadata": {"team": "billing"}})).await;
    let bearer = gw.mint(json!({"auth": "bearer"})).await;
    let metered = gw.mint(json!({"remaining": 10})).await;
    let keys = [("hmac-v1", &v1), ("bearer", &bearer), ("metered", &metered)];
    for _ in 0..2 {
        assert!(all_ok(&statuses(&gw, &keys).await));
    }
    let used = gw
        .key_record_with_usage(&v1.id, 2, Duration::from_secs(10))
        .await;
    assert_eq!(used["total_requests"], 2, "{used}");
    assert_eq!(gw.key_record(&metered.id).await["remaining"], 8);
    // A revoked and deleted bearer key: only its tombstones are left to back up, its public
    // key's and its secret's (issue 24).
    let gone = gw.mint(json!({"auth": "bearer"})).await;
    gw.revoke(&gone).await;
    let r = gw
        .http
        .delete(gw.admin_url(&format!("/v1/keys/{}", gone.id)))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let config = gw.dir.join("keygate.toml");
    let master = gw.master_key.clone();
    // Into a directory that does not exist yet, as a dated path would (issue 25).
    let backup = gw.dir.join("backups/2026-12-03/backup.jsonl");
    let backup_arg = backup.display().to_string();

    // Embedded: the store opens in one process, so the gateway stops first.
    let embedded = std::fs::read_to_string(&config)
        .unwrap()
        .contains("kind = \"embedded\"");
    if embedded {
        let (code, out) = keygate(&config, &master, &["store", "backup", "--to", &backup_arg]);
        assert_eq!(code, 69, "{out}");
        assert!(out.contains("stop the gateway"), "{out}");
        gw.signal_and_wait("TERM", Duration::from_secs(10)).unwrap();
    }
    let (code, out) = keygate(&config, &master, &["store", "backup", "--to", &backup_arg]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(": 3 keys, 6 audit entries, 1 credit counters")
            && out.contains(", 1 revoked public keys, 1 revoked bearer secrets"),
        "{out}"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&backup).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir = std::fs::metadata(backup.parent().unwrap()).unwrap();
        assert_eq!(dir.permissions().mode() & 0o777, 0o700);
    }
    let text = std::fs::read_to_string(&backup).unwrap();
    for key in [&v1, &metered] {
        assert!(!text.contains(&key.secret), "a usable secret in the backup");
    }
    let (code, out) = keygate(&config, &master, &["store", "backup", "--to", &backup_arg]);
    assert_eq!(code, 64, "an old backup is never overwritten: {out}");

    if !embedded {
        gw.signal_and_wait("TERM", Duration::from_secs(10)).unwrap();
    }
    let dir = gw.dir.clone();
    wipe(&dir);

    // A backup cut short restores nothing.
    let cut = dir.join("cut.jsonl");
    let lines: Vec<&str> = text.lines().collect();
    std::fs::write(&cut, lines[..lines.len() - 1].join("\n") + "\n").unwrap();
    let (code, out) = keygate(
        &config,
        &master,
        &["store", "restore", "--from", &cut.display().to_string()],
    );
    assert_eq!(code, 65, "{out}");
    assert!(out.contains("cut short; nothing restored"), "{out}");

    let restore = ["store", "restore", "--from", backup_arg.as_str()];
    let (code, out) = keygate(&config, &master, &restore);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("keys: 3 restored, 0 already there; audit entries: 6 restored, 0 already there; credit counters: 1")
            && out.contains("revoked public keys: 1; revoked bearer secrets: 1"),
        "{out}"
    );
    let (code, out) = keygate(&config, &master, &restore);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("keys: 0 restored, 3 already there; audit entries: 0 restored, 6 already there; credit counters: 0"),
        "{out}"
    );

    let mut again = opts();
    again.dir = Some(dir);
    again.master_key = Some(master);
    let gw2 = Gateway::start(again).await;
    let got = statuses(&gw2, &keys).await;
    assert!(all_ok(&got), "{got:?}");
    let v1_now = gw2.key_record(&v1.id).await;
    assert_eq!(v1_now["metadata"]["team"], "billing");
    assert!(v1_now["total_requests"].as_u64().unwrap() >= 2, "{v1_now}");
    assert_eq!(gw2.key_record(&metered.id).await["remaining"], 7);
    let audit: Value = gw2
        .admin_get(&format!("/v1/audit?key_id={}", v1.id), ADMIN_TOKEN)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(audit["items"][0]["action"], "create", "{audit}");
    // The deleted key's revocation came back with the backup: its pair is not imported again.
    let r = gw2
        .http
        .post(gw2.admin_url("/v1/keys/import"))
        .bearer_auth(ADMIN_TOKEN)
        .json(
            &json!({"public_key": gone.public_key, "secret": gone.secret,
                      "owner": "acme", "name": "back", "auth": "bearer"}),
        )
        .send()
        .await
        .unwrap();
    assert_problem(r, 409, "conflict").await;
    // Nor is its secret, under a new public key: a bearer secret authenticates alone.
    let r = gw2
        .http
        .post(gw2.admin_url("/v1/keys/import"))
        .bearer_auth(ADMIN_TOKEN)
        .json(
            &json!({"public_key": "pk_live_newhome01", "secret": gone.secret,
                      "owner": "acme", "name": "back", "auth": "bearer"}),
        )
        .send()
        .await
        .unwrap();
    let problem = assert_problem(r, 409, "conflict").await;
    assert!(
        problem["detail"].as_str().unwrap_or("").contains("secret"),
        "{problem}"
    );
    drop(gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_store_is_backed_up_wiped_and_restored() {
    let echo = Echo::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    backup_wipe_restore(
        || {
            let mut o = Options::new(&echo);
            o.dir = Some(path.clone());
            o
        },
        |d| {
            std::fs::remove_file(d.join("keygate.db")).unwrap();
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_store_is_backed_up_while_serving_wiped_and_restored() {
    let echo = Echo::start().await;
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let mk = master_key();
    backup_wipe_restore(
        || {
            let mut o = redis_opts(&echo, &redis, &mk, "");
            o.dir = Some(path.clone());
            o
        },
        |_| {
            assert_eq!(redis.cli(&["FLUSHALL"]).trim(), "+OK");
            assert_eq!(redis.cli(&["DBSIZE"]).trim(), ":0");
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_is_backed_up_wiped_and_restored() {
    let echo = Echo::start().await;
    let cluster = RedisCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let mk = master_key();
    backup_wipe_restore(
        || {
            let mut o = url_opts(&echo, &cluster.url(), &mk, "");
            o.dir = Some(path.clone());
            o
        },
        |_| {
            for node in &cluster.nodes {
                assert_eq!(node.cli(&["FLUSHALL"]).trim(), "+OK");
            }
        },
    )
    .await;
}

/// On the embedded store the rotation needs a short stop: the store opens in one process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_master_key_rotates_on_an_embedded_node_during_a_short_stop() {
    let echo = Echo::start().await;
    let old = master_key();
    let new = master_key();
    let dir = tempfile::tempdir().unwrap();
    let new_file = private_file(&dir.path().join("new.key"), &new);
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let opts = |master: &str| {
        let mut o = Options::new(&echo);
        o.dir = Some(data.clone());
        o.master_key = Some(master.to_owned());
        o
    };
    let mut gw = Gateway::start(opts(&old)).await;
    let v1 = gw.mint(json!({})).await;
    let rotated = rotate_with_grace(&gw, &v1).await;
    let body = gw.mint(json!({"auth": "hmac-body"})).await;
    let bearer = gw.mint(json!({"auth": "bearer"})).await;
    let keys = [
        ("hmac-v1 new secret", &rotated),
        ("hmac-v1 in grace", &v1),
        ("hmac-body", &body),
        ("bearer", &bearer),
    ];
    assert!(all_ok(&statuses(&gw, &keys).await));
    let config = data.join("keygate.toml");
    let arg = new_file.display().to_string();
    let reseal = ["secrets", "reseal", "--new-master-key-file", arg.as_str()];
    // While the gateway runs, the store is not the tool's to open: it says so and stops.
    let (code, out) = keygate(&config, &old, &reseal);
    assert_eq!(code, 69, "{out}");
    assert!(out.contains("stop the gateway"), "{out}");
    gw.signal_and_wait("TERM", Duration::from_secs(10)).unwrap();
    let (code, out) = keygate(&config, &old, &reseal);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("2 key records re-sealed, 1 already there; 1 assertion keys re-sealed"),
        "{out}"
    );
    // Back with the new key alone: every key verifies.
    let gw = Gateway::start(opts(&new)).await;
    let got = statuses(&gw, &keys).await;
    assert!(all_ok(&got), "{got:?}");
}

/// A reseal that stopped half way (here: 7 of 20 records moved by hand, as a run would have
/// left them) is finished by the next run, which moves only the other 13; every record then
/// opens with the new key alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_reseal_is_finished_by_the_next_run() {
    use keygate::keys::{
        mint, AuthKind, EmbeddedStore, KeyStore, MasterKey, NewKey, StoredCredential,
    };
    use keygate::maintenance::reseal;

    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("keygate.db")).unwrap();
    let (old, old_text) = MasterKey::generate();
    let (new, new_text) = MasterKey::generate();
    let now = time::OffsetDateTime::now_utc();
    let mut ids = Vec::new();
    for i in 0..20 {
        let (record, _) = mint(
            &old,
            NewKey::plain("acme", &format!("k{i}"), AuthKind::HmacV1),
            now,
        );
        store.insert(&record).await.unwrap();
        ids.push(record.id);
    }
    // The first run's work on 7 records: opened with the old key, sealed with the new.
    for id in &ids[..7] {
        let mut r = store.get_by_id(id).await.unwrap().unwrap();
        let StoredCredential::Sealed(sealed) = &r.credential else {
            unreachable!()
        };
        let secret = old.open(sealed, id).unwrap();
        r.credential = StoredCredential::Sealed(new.seal(&secret, id));
        r.version += 1;
        store.update(&r).await.unwrap();
    }
    let before = reseal::status(&store, &store).await.unwrap();
    assert_eq!(before.by_master_key[old.id()].key_secrets, 13);
    assert_eq!(before.by_master_key[new.id()].key_secrets, 7);

    let both = MasterKey::from_base64(new_text.expose())
        .unwrap()
        .with_previous(MasterKey::from_base64(old_text.expose()).unwrap());
    let report = reseal::reseal(&store, &store, &both).await.unwrap();
    assert_eq!((report.keys_resealed, report.keys_already), (13, 7));
    assert!(report.keys_failed.is_empty());
    let after = reseal::status(&store, &store).await.unwrap();
    assert_eq!(after.by_master_key.len(), 1);
    assert_eq!(after.by_master_key[new.id()].key_secrets, 20);
    for id in &ids {
        let r = store.get_by_id(id).await.unwrap().unwrap();
        assert!(keygate::keys::ActiveKey::open(&r, &new).is_ok(), "{id}");
    }
}
