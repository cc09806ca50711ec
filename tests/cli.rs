//! `keygate keys …` against a running gateway: every subcommand, human and JSON output, and
//! the exit codes that tell usage errors, refusals and unreachable servers apart.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use std::process::{Command, Output};

use serde_json::Value;
use support::{free_port, Echo, Gateway, Options, ADMIN_TOKEN};

const BIN: &str = env!("CARGO_BIN_EXE_keygate");

fn keys(gw: &Gateway, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("keys")
        .args(["--admin-url", &format!("http://{}", gw.admin)])
        .args(args)
        .env("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)
        .env_remove("KEYGATE_SECRET")
        .output()
        .unwrap()
}

fn ok_json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_keys_subcommand_against_a_running_server() {
    let echo = Echo::start().await;
    let gw = Gateway::start(Options::new(&echo)).await;

    // create, human output: the secret once, with a warning.
    let text = stdout(&keys(
        &gw,
        &[
            "create",
            "--owner",
            "acme",
            "--name",
            "cli key",
            "--scope",
            "payments.create",
            "--scope",
            "payments.read",
            "--ip",
            "127.0.0.1",
            "--metadata",
            "team=pay",
            "--rate-limit",
            "burst=100/1s",
            "--rate-limit",
            "daily=50000/1d",
        ],
    ));
    assert!(text.contains("shown once"), "{text}");
    let secret = text
        .lines()
        .find_map(|l| l.strip_prefix("secret "))
        .unwrap()
        .trim()
        .to_owned();
    assert!(secret.starts_with("sk_test_"));
    let id = text
        .lines()
        .find_map(|l| l.strip_prefix("id "))
        .unwrap()
        .trim()
        .to_owned();
    assert!(text.contains("payments.create payments.read"), "{text}");

    // create, JSON output for scripts.
    let created = ok_json(&keys(
        &gw,
        &[
            "--json", "create", "--owner", "acme", "--name", "second", "--auth", "bearer",
        ],
    ));
    let second = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["auth"], "bearer");

    // list: a table holding both, newest first, no secrets.
    let table = stdout(&keys(&gw, &["list", "--owner", "acme"]));
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("PUBLIC KEY"),
        "{table}"
    );
    assert!(
        lines[1].starts_with(&second) && lines[2].starts_with(&id),
        "{table}"
    );
    assert!(!table.contains(&secret));
    let listed = ok_json(&keys(
        &gw,
        &["list", "--json", "--status", "active", "--limit", "1"],
    ));
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
    assert!(listed["next_cursor"].is_string());

    // get, update, rotate, revoke, delete.
    let got = ok_json(&keys(&gw, &["get", &id, "--json"]));
    assert_eq!(got["metadata"]["team"], "pay");
    assert_eq!(
        got["rate_limits"],
        serde_json::json!([
            {"name": "burst", "limit": 100, "window": "1s"},
            {"name": "daily", "limit": 50000, "window": "1d"}
        ])
    );
    assert!(got.get("secret").is_none());
    let updated = ok_json(&keys(
        &gw,
        &[
            "update",
            &id,
            "--name",
            "renamed",
            "--scope",
            "payments.read",
            "--clear-rate-limits",
            "--json",
        ],
    ));
    assert_eq!(updated["name"], "renamed");
    assert_eq!(updated["rate_limits"], serde_json::json!([]));
    assert_eq!(updated["scopes"], serde_json::json!(["payments.read"]));
    let metered = ok_json(&keys(
        &gw,
        &[
            "update",
            &id,
            "--remaining",
            "10",
            "--refill",
            "daily:10",
            "--json",
        ],
    ));
    assert_eq!(metered["remaining"], 10);
    assert_eq!(
        metered["refill"],
        serde_json::json!({"interval": "daily", "amount": 10})
    );
    let topped = ok_json(&keys(&gw, &["credits", &id, "--add", "5", "--json"]));
    assert_eq!(topped["remaining"], 15);
    let out = keys(&gw, &["credits", &id]);
    assert_eq!(out.status.code(), Some(64), "neither --add nor --set");
    let unmetered = ok_json(&keys(&gw, &["update", &id, "--clear-remaining", "--json"]));
    assert_eq!(unmetered["remaining"], serde_json::Value::Null);
    let rotated = ok_json(&keys(
        &gw,
        &["rotate", &id, "--grace-seconds", "30", "--json"],
    ));
    assert_ne!(rotated["secret"].as_str().unwrap(), secret);
    let revoked = stdout(&keys(&gw, &["revoke", &id]));
    assert!(
        revoked
            .lines()
            .any(|l| l.starts_with("status") && l.ends_with("revoked")),
        "{revoked}"
    );
    assert_eq!(
        stdout(&keys(&gw, &["delete", &second])).trim(),
        format!("deleted {second}")
    );

    // import: the secret from the environment, not the command line.
    let out = Command::new(BIN)
        .args([
            "keys",
            "--admin-url",
            &format!("http://{}", gw.admin),
            "--json",
            "import",
            "--public-key",
            "legacy_pk_1",
            "--owner",
            "acme",
            "--name",
            "legacy",
            "--auth",
            "hmac-body",
        ])
        .env("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("KEYGATE_SECRET", "legacy-secret-text")
        .output()
        .unwrap();
    let imported = ok_json(&out);
    assert_eq!(imported["public_key"], "legacy_pk_1");
    assert_eq!(imported["secret"], "legacy-secret-text");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_tell_usage_refusal_and_unreachable_apart() {
    let echo = Echo::start().await;
    let gw = Gateway::start(Options::new(&echo)).await;

    // Usage: a missing argument, an unknown flag, no token.
    assert_eq!(keys(&gw, &["get"]).status.code(), Some(64));
    assert_eq!(
        keys(&gw, &["list", "--colour", "red"]).status.code(),
        Some(64)
    );
    let no_token = Command::new(BIN)
        .args(["keys", "list"])
        .env_remove("KEYGATE_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert_eq!(no_token.status.code(), Some(64));

    // Refused: the server answered with an error, which is printed with its fields.
    let out = keys(
        &gw,
        &[
            "create",
            "--owner",
            "acme",
            "--name",
            "x",
            "--scope",
            "Not A Scope",
        ],
    );
    assert_eq!(out.status.code(), Some(65));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("422 validation_failed") && err.contains("scopes[0]"),
        "{err}"
    );
    assert_eq!(keys(&gw, &["get", "key_nope"]).status.code(), Some(65));
    let wrong_token = Command::new(BIN)
        .args([
            "keys",
            "--admin-url",
            &format!("http://{}", gw.admin),
            "list",
        ])
        .env("KEYGATE_ADMIN_TOKEN", "wrong")
        .output()
        .unwrap();
    assert_eq!(wrong_token.status.code(), Some(65));

    // Unreachable: nobody listens there.
    let out = Command::new(BIN)
        .args([
            "keys",
            "--admin-url",
            &format!("http://127.0.0.1:{}", free_port()),
            "list",
        ])
        .env("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(69),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_exits_0_on_a_2xx_and_1_otherwise() {
    let echo = Echo::start().await;
    let gw = Gateway::start(Options::new(&echo)).await;
    let health = |url: String| {
        Command::new(BIN)
            .args(["health", "--url", &url, "--timeout", "2s"])
            .output()
            .unwrap()
            .status
            .code()
    };
    assert_eq!(health(gw.admin_url("/healthz")), Some(0));
    assert_eq!(health(gw.admin_url("/readyz")), Some(0));
    // A 4xx answer (an admin call without a token), and nobody listening.
    assert_eq!(health(gw.admin_url("/v1/keys")), Some(1));
    let nobody = support::free_port();
    assert_eq!(
        health(format!("http://127.0.0.1:{nobody}/healthz")),
        Some(1)
    );
}

/// A config whose secret files are these (`None`: not named), on free ports in `dir`.
fn secrets_config(
    dir: &std::path::Path,
    master: &std::path::Path,
    previous: Option<&std::path::Path>,
    token: Option<&std::path::Path>,
) -> std::path::PathBuf {
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:{}\"\nallow_no_routes = true\n[admin]\nlisten = \"127.0.0.1:{}\"\n",
        free_port(),
        free_port()
    );
    if let Some(t) = token {
        text += &format!("token_file = \"{}\"\n", t.display());
    }
    text += &format!(
        "[metrics]\nlisten = \"127.0.0.1:{}\"\n[store]\npath = \"{}\"\n[secrets]\nmaster_key_file = \"{}\"\n",
        free_port(),
        dir.join("k.db").display(),
        master.display()
    );
    if let Some(p) = previous {
        text += &format!("previous_master_key_file = \"{}\"\n", p.display());
    }
    let cfg = dir.join("k.toml");
    std::fs::write(&cfg, text).unwrap();
    cfg
}

fn run_keygate(args: &[&str], cfg: &std::path::Path) -> Output {
    Command::new(BIN)
        .args(args)
        .arg(cfg)
        .env_remove("KEYGATE_MASTER_KEY")
        .env_remove("KEYGATE_ADMIN_TOKEN")
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap()
}

fn secret_file(dir: &std::path::Path, name: &str, text: &str, mode: u32) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

/// Issue 24: check-config said "ok" for a master key file of mode 644 that serve then refused
/// (exit 69). Both now run one rule: what serve refuses, check-config reports (exit 64).
#[test]
fn check_config_refuses_the_secret_files_serve_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = support::master_key();
    let good = secret_file(d, "master.key", &key, 0o600);
    let cfg = secrets_config(d, &good, None, None);
    let out = run_keygate(&["check-config"], &cfg);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    for mode in [0o644, 0o604, 0o660] {
        let loose = secret_file(d, &format!("loose-{mode:o}.key"), &key, mode);
        let cfg = secrets_config(d, &loose, None, None);
        let out = run_keygate(&["check-config"], &cfg);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "mode {mode:o}: {err}");
        assert!(
            err.contains(&format!(
                "secrets.master_key_file {}: mode {mode:o}",
                loose.display()
            )),
            "mode {mode:o}: {err}"
        );
        // The same file is what serve refuses, with the same words.
        if mode == 0o644 {
            let out = run_keygate(&["serve", "--config"], &cfg);
            assert_eq!(out.status.code(), Some(69));
            let served = String::from_utf8_lossy(&out.stderr);
            assert!(
                served.contains(&format!("mode {mode:o} lets other users read it")),
                "{served}"
            );
        }
        // --offline: a config checked away from its secrets does not read them.
        let out = run_keygate(&["check-config", "--offline"], &cfg);
        assert_eq!(out.status.code(), Some(0));
    }

    let missing = d.join("absent.key");
    let out = run_keygate(&["check-config"], &secrets_config(d, &missing, None, None));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("secrets.master_key_file") && err.contains("no such file"),
        "{err}"
    );

    let old = secret_file(d, "old.key", &support::master_key(), 0o644);
    let out = run_keygate(
        &["check-config"],
        &secrets_config(d, &good, Some(&old), None),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("secrets.previous_master_key_file"), "{err}");

    let token = secret_file(d, "admin-token", "tok", 0o604);
    let out = run_keygate(
        &["check-config"],
        &secrets_config(d, &good, None, Some(&token)),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("admin.token_file") && err.contains("mode 604"),
        "{err}"
    );
    let token = secret_file(d, "admin-token-ok", "tok", 0o600);
    let out = run_keygate(
        &["check-config"],
        &secrets_config(d, &good, None, Some(&token)),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Issue 24: with an upstream's assertion secret file, the master key file, the previous
/// master key file and the admin token file all readable by others, check-config named only
/// the assertion file (a config problem), and the secret files only on a second run once it
/// was fixed; two bad master key files also showed one at a time. One run names all four.
#[test]
fn check_config_reports_every_bad_secret_file_in_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let master = secret_file(d, "master.key", &support::master_key(), 0o644);
    let previous = secret_file(d, "old.key", &support::master_key(), 0o644);
    let token = secret_file(d, "admin-token", "tok", 0o644);
    let shared = secret_file(d, "payments.hs256", &"s".repeat(32), 0o644);
    let cfg = secrets_config(d, &master, Some(&previous), Some(&token));
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text += &format!(
        "[[upstreams]]\nname = \"payments\"\nendpoints = [\"127.0.0.1:{}\"]\n\
         assertion = \"hs256\"\nassertion_secret_file = \"{}\"\n",
        free_port(),
        shared.display()
    );
    std::fs::write(&cfg, text).unwrap();
    let out = run_keygate(&["check-config"], &cfg);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    for (key, file) in [
        ("upstreams[0].assertion_secret_file", &shared),
        ("secrets.master_key_file", &master),
        ("secrets.previous_master_key_file", &previous),
        ("admin.token_file", &token),
    ] {
        assert!(
            err.lines().any(|l| l.contains(key)
                && l.contains(&file.display().to_string())
                && l.contains("mode 644")),
            "{key} not reported: {err}"
        );
    }
    assert!(err.contains(": 4 problem(s)"), "{err}");
}

/// Issue 25 (outside test): `keygate secrets status` (or `store backup`) run as root on a
/// service's embedded store wrote a root-owned nonce-journal segment beside it, and the
/// service, another uid, then failed to start (exit 69, permission denied). keygate now
/// refuses a store file of another user, writes nothing, and says how to run it instead.
#[test]
fn a_store_of_another_user_is_refused_and_left_untouched() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if let Some(why) = support::unprivileged::cannot_switch() {
        println!("skipped: {why}");
        return;
    }
    const SERVICE: u32 = 62013;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let master = secret_file(dir.path(), "master.key", &support::master_key(), 0o600);
    let cfg = secrets_config(dir.path(), &master, None, None);
    let status = |cmd: &mut Command| {
        let out = cmd
            .args(["--config"])
            .arg(&cfg)
            .args(["secrets", "status"])
            .env_remove("KEYGATE_MASTER_KEY")
            .env_remove("CREDENTIALS_DIRECTORY")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code(), text)
    };
    // The service's store, made by the service's user.
    for path in [dir.path().to_path_buf(), master.clone()] {
        support::unprivileged::own(&path, SERVICE, SERVICE, 0o700);
    }
    support::unprivileged::own(&master, SERVICE, SERVICE, 0o600);
    let service = || support::unprivileged::command(SERVICE, SERVICE, std::path::Path::new(BIN));
    let (code, text) = status(&mut service());
    assert_eq!(code, Some(0), "{text}");
    let journal = dir.path().join("k.db.nonces");
    let files = |d: &std::path::Path| -> Vec<(std::path::PathBuf, u32)> {
        std::fs::read_dir(d)
            .unwrap()
            .map(|e| {
                let p = e.unwrap().path();
                let uid = std::fs::metadata(&p).unwrap().uid();
                (p, uid)
            })
            .collect()
    };
    let before = files(&journal);
    assert!(before.iter().all(|(_, uid)| *uid == SERVICE), "{before:?}");

    // root, as an operator's shell is: refused, with the way to do it.
    let (code, text) = status(&mut Command::new(BIN));
    assert_eq!(code, Some(69), "{text}");
    assert!(
        text.contains(&format!("belongs to uid {SERVICE}")) && text.contains("systemd-run"),
        "{text}"
    );
    assert_eq!(
        files(&journal),
        before,
        "root wrote beside the service's store"
    );
    assert!(
        files(dir.path())
            .iter()
            .all(|(p, uid)| *uid == SERVICE || p == &cfg),
        "{:?}",
        files(dir.path())
    );
    // A backup refused the same way leaves no directory behind.
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .args(["store", "backup", "--to"])
        .arg(dir.path().join("bk/b.jsonl"))
        .env_remove("KEYGATE_MASTER_KEY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "{out:?}");
    assert!(
        !dir.path().join("bk").exists(),
        "a refused backup made its directory"
    );
    // root creating a new store in the service's directory (a restore onto a fresh host) is
    // refused too: the service could not open it.
    let elsewhere = tempfile::tempdir().unwrap();
    let fresh = elsewhere.path().join("fresh.toml");
    std::fs::write(
        &fresh,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("k.db", "fresh.db"),
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&fresh)
        .args(["secrets", "status"])
        .env_remove("KEYGATE_MASTER_KEY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "{out:?}");
    assert!(!dir.path().join("fresh.db").exists());
    // And the service still opens its store.
    let (code, text) = status(&mut service());
    assert_eq!(code, Some(0), "{text}");
}

/// Issue 26: `store.nonce_durability` and `store.replication_timeout` are checked by
/// check-config as serve checks them: "replicated" on the embedded store (no replica to wait
/// for) and a replication timeout outside 1ms..500ms are refused, naming the key.
#[test]
fn check_config_checks_nonce_durability() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let master = secret_file(d, "master.key", &support::master_key(), 0o600);
    let cfg = secrets_config(d, &master, None, None);
    let base = std::fs::read_to_string(&cfg).unwrap();
    let with_store = |lines: &str| {
        std::fs::write(
            &cfg,
            base.replace("[secrets]", &format!("{lines}\n[secrets]")),
        )
        .unwrap();
        let out = run_keygate(&["check-config"], &cfg);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = with_store("nonce_durability = \"async\"");
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = with_store("nonce_durability = \"replicated\"");
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("store.nonce_durability"), "{err}");
    let (code, err) = with_store("replication_timeout = \"2s\"");
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("store.replication_timeout"), "{err}");
    let (code, err) = with_store("nonce_durability = \"eventually\"");
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("store.nonce_durability"), "{err}");
}
