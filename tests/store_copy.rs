//! `keygate store copy`: an embedded node's keys, audit log and live nonces moved into Redis by
//! the real binary, then served by a gateway on Redis; re-running copies nothing twice.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use keygate::keys::{
    mint, Action, Actor, AuditEntry, AuthKind, EmbeddedStore, Environment, KeyStore, MasterKey,
    NewKey, RedisStore, Usage, Write,
};
use serde_json::Value;
use support::redis::RedisServer;
use support::{assert_problem, now, v1_headers, Echo, Gateway, Key, Options};
use time::OffsetDateTime;

const BIN: &str = env!("CARGO_BIN_EXE_keygate");

fn new_key(auth: AuthKind) -> NewKey {
    NewKey {
        owner: "acme".into(),
        name: "node".into(),
        description: None,
        scopes: vec!["payments.*".into()],
        ip_allow_list: vec![],
        expires_at: None,
        environment: Environment::Test,
        auth,
        metadata: BTreeMap::new(),
        tls_client_cert_sha256: None,
        rate_limits: vec![],
        remaining: None,
        refill: None,
    }
}

fn copy(from: &std::path::Path, to: &str) -> (i32, String) {
    support::run_output(
        Command::new(BIN)
            .args(["store", "copy", "--from"])
            .arg(from)
            .args(["--to", to]),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_node_grows_into_a_redis_fleet() {
    let (mk, mk_text) = MasterKey::generate();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keygate.db");
    let now_t = OffsetDateTime::now_utc();

    // One node's history: three keys of each kind, audited, one used 7 times, two nonces.
    let mut minted = Vec::new();
    {
        let node = EmbeddedStore::open(&path).unwrap();
        for auth in [AuthKind::HmacV1, AuthKind::HmacBody, AuthKind::Bearer] {
            let (record, secret) = mint(&mk, new_key(auth), now_t);
            let entry = AuditEntry::new(
                now_t,
                Actor::Admin {
                    token_id: "0123456789ab".into(),
                },
                Action::Create,
                &record.id,
                &record.owner,
                vec![],
            );
            node.write(Write::Insert(&record), Some(&entry))
                .await
                .unwrap();
            minted.push((record, secret));
        }
        // Redis keeps last_used_at in whole microseconds.
        let micros = now_t
            .replace_nanosecond(now_t.nanosecond() / 1000 * 1000)
            .unwrap();
        let used = Usage {
            requests: 7,
            last_used_at: micros,
        };
        node.add_usage(&[(minted[0].0.id.clone(), used)])
            .await
            .unwrap();
        for n in ["copied-nonce-1", "copied-nonce-2"] {
            assert!(node
                .use_nonce(&minted[0].0.id, n, Duration::from_secs(600))
                .await
                .unwrap());
        }
        node.flush().await.unwrap();
    }

    let redis = RedisServer::start();
    let (code, out) = copy(&path, &redis.url());
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("keys: 3 copied, 0 already there; audit entries: 3 copied, 0 already there; live nonces: 2"),
        "{out}"
    );

    let node = EmbeddedStore::open(&path).unwrap();
    let fleet = RedisStore::open(&redis.url()).unwrap();
    for (record, _) in &minted {
        let on_node = node.get_by_id(&record.id).await.unwrap().unwrap();
        let on_fleet = fleet.get_by_id(&record.id).await.unwrap().unwrap();
        // Everything, the sealed secret and the usage counters included.
        assert_eq!(on_fleet, on_node);
    }
    assert_eq!(
        fleet
            .get_by_id(&minted[0].0.id)
            .await
            .unwrap()
            .unwrap()
            .total_requests,
        7
    );
    let audit_node = node.list_audit(None, None, None, 100).await.unwrap().items;
    let audit_fleet = fleet.list_audit(None, None, None, 100).await.unwrap().items;
    assert_eq!(audit_fleet, audit_node);
    assert!(
        !fleet
            .use_nonce(&minted[0].0.id, "copied-nonce-1", Duration::from_secs(600))
            .await
            .unwrap(),
        "a nonce used on the node must stay used in the fleet"
    );
    drop(node);

    // Safe to re-run: nothing twice, counters not doubled.
    let (code, out) = copy(&path, &redis.url());
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("keys: 0 copied, 3 already there; audit entries: 0 copied, 3 already there"),
        "{out}"
    );
    assert_eq!(
        fleet
            .get_by_id(&minted[0].0.id)
            .await
            .unwrap()
            .unwrap()
            .total_requests,
        7
    );

    // A gateway on the fleet's Redis, with the node's master key, verifies the copied secrets.
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    opts.master_key = Some(mk_text.expose().to_owned());
    opts.store_toml = Some(format!(
        "[store]\nkind = \"redis\"\nurl = \"{}\"",
        redis.url()
    ));
    let gw = Gateway::start(opts).await;
    let (record, secret) = &minted[0];
    let key = Key {
        id: record.id.clone(),
        public_key: record.public_key.clone(),
        secret: secret.expose().to_owned(),
        record: Value::Null,
    };
    assert_eq!(
        gw.send_v1(&key, "POST", "/v1/payments", b"{}")
            .await
            .status(),
        200
    );
    let replay = v1_headers(&key, "POST", "/v1/payments", b"{}", now(), "copied-nonce-2");
    assert_problem(
        gw.send("POST", "/v1/payments", &replay, b"{}").await,
        401,
        "replayed_nonce",
    )
    .await;

    // Changed on the fleet since the first copy: a re-run keeps the fleet's version.
    gw.revoke(&key).await;
    let (code, out) = copy(&path, &redis.url());
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("kept the target's version of {}", record.id)),
        "{out}"
    );
    assert_problem(
        gw.send_v1(&key, "POST", "/v1/payments", b"{}").await,
        401,
        "revoked_key",
    )
    .await;
}

#[test]
fn bad_arguments_and_an_unreachable_redis_are_told_apart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keygate.db");
    drop(EmbeddedStore::open(&path).unwrap());
    let (code, out) = copy(&path, "http://:pw@example");
    assert_eq!(code, 64, "{out}");
    assert!(!out.contains(":pw@"), "password echoed: {out}");
    let (code, out) = copy(&dir.path().join("missing.db"), "redis://127.0.0.1:1");
    assert_eq!(code, 64, "{out}");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (code, out) = copy(&path, &format!("redis://127.0.0.1:{port}"));
    assert_eq!(code, 69, "{out}");
}
