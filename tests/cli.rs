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
