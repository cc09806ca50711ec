//! The shared `KeyStore` suite. Every backend runs every case through [`backends`]: the
//! embedded store, and the Redis store on a private `redis-server` per case.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use keygate::keys::{
    mint, AuthKind, EmbeddedStore, Environment, KeyRecord, KeyStore, MasterKey, NewKey, RedisStore,
    SigningKeyStore, StoreError, Versioned,
};
use keygate::limits::credits::{CreditOp, CreditStore, RefillNow};
use keygate::limits::store::{bucket_key, Bucket, RateLimitStore};
use keygate::limits::RateLimit;
use time::OffsetDateTime;

#[path = "support/redis.rs"]
mod redis_server;

/// A backend under test, and how to reopen it (persistence cases).
struct Backend {
    name: &'static str,
    store: Arc<dyn KeyStore>,
    /// The same backend through its signing-keys trait.
    signing: Arc<dyn SigningKeyStore>,
    /// The same backend through its rate-limit trait.
    limits: Arc<dyn RateLimitStore>,
    /// The same backend through its credits trait.
    credits: Arc<dyn CreditStore>,
    reopen: Box<dyn Fn() -> Arc<dyn KeyStore> + Send>,
    _dir: Option<tempfile::TempDir>,
    /// Servers kept alive for the backend's lifetime.
    _servers: Option<Box<dyn std::any::Any + Send>>,
}

/// What keeps a reopened backend's directory and servers alive.
type Kept = (
    Option<tempfile::TempDir>,
    Option<Box<dyn std::any::Any + Send>>,
);

impl Backend {
    /// Writes what the store holds, lets go of every handle on it (redb locks its file) and
    /// opens it again: its name, the reopened store, and what must outlive it.
    async fn flushed_and_reopened(self) -> (&'static str, Arc<dyn KeyStore>, Kept) {
        self.store.flush().await.unwrap();
        let Backend {
            name,
            store,
            signing,
            limits,
            credits,
            reopen,
            _dir,
            _servers,
        } = self;
        drop((store, signing, limits, credits));
        (name, reopen(), (_dir, _servers))
    }
}

fn embedded() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.db");
    let both = Arc::new(EmbeddedStore::open(&path).unwrap());
    Backend {
        name: "embedded",
        store: both.clone(),
        signing: both.clone(),
        limits: both.clone(),
        credits: both,
        reopen: Box::new(move || Arc::new(EmbeddedStore::open(&path).unwrap())),
        _dir: Some(dir),
        _servers: None,
    }
}

fn redis() -> Backend {
    let server = redis_server::RedisServer::start();
    let url = server.url();
    let both = Arc::new(RedisStore::open(&url).unwrap());
    Backend {
        name: "redis",
        store: both.clone(),
        signing: both.clone(),
        limits: both.clone(),
        credits: both,
        reopen: Box::new(move || Arc::new(RedisStore::open(&url).unwrap())),
        _dir: None,
        _servers: Some(Box::new(server)),
    }
}

/// A 3-master Redis Cluster: same cases, so same behaviour, with scripts routed by hash tag.
fn redis_cluster() -> Backend {
    let cluster = redis_server::RedisCluster::start();
    let url = cluster.url();
    let both = Arc::new(RedisStore::open(&url).unwrap());
    Backend {
        name: "redis-cluster",
        store: both.clone(),
        signing: both.clone(),
        limits: both.clone(),
        credits: both,
        reopen: Box::new(move || Arc::new(RedisStore::open(&url).unwrap())),
        _dir: None,
        _servers: Some(Box::new(cluster)),
    }
}

fn backends() -> Vec<Backend> {
    vec![embedded(), redis(), redis_cluster()]
}

fn new_key(owner: &str, auth: AuthKind) -> NewKey {
    NewKey {
        owner: owner.into(),
        name: "suite".into(),
        description: None,
        scopes: vec!["payments.*".into()],
        ip_allow_list: vec![],
        expires_at: None,
        environment: Environment::Live,
        auth,
        metadata: BTreeMap::new(),
        tls_client_cert_sha256: None,
        rate_limits: vec![],
        remaining: None,
        refill: None,
    }
}

fn record(mk: &MasterKey, owner: &str, auth: AuthKind) -> KeyRecord {
    mint(mk, new_key(owner, auth), OffsetDateTime::now_utc()).0
}

#[tokio::test]
async fn records_are_found_by_id_public_key_and_bearer_hash() {
    let (mk, _) = MasterKey::generate();
    for b in backends() {
        let hmac = record(&mk, "acme", AuthKind::HmacV1);
        let (bearer, secret) = mint(
            &mk,
            new_key("acme", AuthKind::Bearer),
            OffsetDateTime::now_utc(),
        );
        b.store.insert(&hmac).await.unwrap();
        b.store.insert(&bearer).await.unwrap();
        assert_eq!(
            b.store.get_by_id(&hmac.id).await.unwrap().as_ref(),
            Some(&hmac),
            "{}",
            b.name
        );
        assert_eq!(
            b.store
                .get_by_public_key(&hmac.public_key)
                .await
                .unwrap()
                .as_ref(),
            Some(&hmac)
        );
        assert_eq!(
            b.store
                .get_by_secret_hash(&secret.sha256())
                .await
                .unwrap()
                .as_ref(),
            Some(&bearer)
        );
        assert_eq!(b.store.get_by_id("key_missing").await.unwrap(), None);
        assert_eq!(
            b.store.get_by_public_key("pk_live_nothere").await.unwrap(),
            None
        );
        assert_eq!(b.store.get_by_secret_hash(&[0u8; 32]).await.unwrap(), None);
    }
}

#[tokio::test]
async fn duplicate_public_key_is_a_conflict_and_changes_nothing() {
    let (mk, _) = MasterKey::generate();
    for b in backends() {
        let first = record(&mk, "acme", AuthKind::HmacV1);
        b.store.insert(&first).await.unwrap();
        let mut clash = record(&mk, "other", AuthKind::HmacV1);
        clash.public_key = first.public_key.clone();
        assert!(
            matches!(b.store.insert(&clash).await, Err(StoreError::Conflict)),
            "{}",
            b.name
        );
        assert_eq!(
            b.store.get_by_id(&clash.id).await.unwrap(),
            None,
            "a failed insert left a record"
        );
        assert_eq!(
            b.store
                .get_by_public_key(&first.public_key)
                .await
                .unwrap()
                .unwrap()
                .id,
            first.id
        );
        assert!(b
            .store
            .list(Some("other"), None, 10)
            .await
            .unwrap()
            .items
            .is_empty());
    }
}

#[tokio::test]
async fn update_replaces_the_record_and_its_indexes() {
    let (mk, _) = MasterKey::generate();
    for b in backends() {
        let mut r = record(&mk, "acme", AuthKind::HmacV1);
        b.store.insert(&r).await.unwrap();
        r.owner = "globex".into();
        r.revoked_at = Some(OffsetDateTime::now_utc());
        r.version += 1;
        b.store.update(&r).await.unwrap();
        assert_eq!(
            b.store.get_by_id(&r.id).await.unwrap().as_ref(),
            Some(&r),
            "{}",
            b.name
        );
        assert!(b
            .store
            .list(Some("acme"), None, 10)
            .await
            .unwrap()
            .items
            .is_empty());
        assert_eq!(
            b.store
                .list(Some("globex"), None, 10)
                .await
                .unwrap()
                .items
                .len(),
            1
        );
        let ghost = record(&mk, "acme", AuthKind::HmacV1);
        assert!(matches!(
            b.store.update(&ghost).await,
            Err(StoreError::NotFound)
        ));
    }
}

/// Every write names the version it replaces; a stale one changes nothing.
#[tokio::test]
async fn an_update_from_a_stale_read_is_refused_and_changes_nothing() {
    let (mk, _) = MasterKey::generate();
    for b in backends() {
        let r = record(&mk, "acme", AuthKind::HmacV1);
        b.store.insert(&r).await.unwrap();
        let mut first = r.clone();
        first.name = "first".into();
        first.version += 1;
        b.store.update(&first).await.unwrap();
        // A second writer that read `r` before the first wrote.
        let mut late = r.clone();
        late.name = "late".into();
        late.version += 1;
        assert!(
            matches!(
                b.store.update(&late).await,
                Err(StoreError::VersionConflict)
            ),
            "{}",
            b.name
        );
        let mut skipping = first.clone();
        skipping.version += 2;
        assert!(matches!(
            b.store.update(&skipping).await,
            Err(StoreError::VersionConflict)
        ));
        let now = b.store.get_by_id(&r.id).await.unwrap().unwrap();
        assert_eq!((now.name.as_str(), now.version), ("first", 2), "{}", b.name);
    }
}

#[tokio::test]
async fn the_signing_keys_document_is_written_compare_and_set() {
    for b in backends() {
        let s = &b.signing;
        assert_eq!(s.load_signing_keys().await.unwrap(), None, "{}", b.name);
        let doc = |version: u64, body: &str| Versioned {
            version,
            body: body.as_bytes().to_vec(),
        };
        // The first write must be version 1; a writer skipping ahead is refused.
        assert!(matches!(
            s.save_signing_keys(&doc(2, "skip")).await,
            Err(StoreError::VersionConflict)
        ));
        s.save_signing_keys(&doc(1, "first")).await.unwrap();
        // Two writers that both read version 1: one wins, the other changes nothing.
        let (da, db) = (doc(2, "a"), doc(2, "b"));
        let (a, b2) = tokio::join!(s.save_signing_keys(&da), s.save_signing_keys(&db));
        let won: Vec<bool> = [&a, &b2].iter().map(|r| r.is_ok()).collect();
        assert_eq!(
            won.iter().filter(|w| **w).count(),
            1,
            "{}: {a:?} {b2:?}",
            b.name
        );
        let loser = if a.is_ok() { &b2 } else { &a };
        assert!(
            matches!(loser, Err(StoreError::VersionConflict)),
            "{}",
            b.name
        );
        let stored = s.load_signing_keys().await.unwrap().unwrap();
        assert_eq!(stored.version, 2, "{}", b.name);
        let winner = if a.is_ok() { "a" } else { "b" };
        assert_eq!(stored.body, winner.as_bytes(), "{}", b.name);
        // Binary-safe, large enough for a keyring of several keys.
        let big: Vec<u8> = (0..=255u8).cycle().take(8192).collect();
        s.save_signing_keys(&Versioned {
            version: 3,
            body: big.clone(),
        })
        .await
        .unwrap();
        assert_eq!(
            s.load_signing_keys().await.unwrap().unwrap().body,
            big,
            "{}",
            b.name
        );
    }
}

/// A key's own `burst` limit and its owner's `daily` one, as a request spends them.
fn pair<'a>(owner: &str, burst: &'a RateLimit, daily: &'a RateLimit) -> Vec<Bucket<'a>> {
    vec![
        Bucket {
            key: bucket_key(owner, "k:key1", "burst"),
            limit: burst,
            owner_wide: false,
        },
        Bucket {
            key: bucket_key(owner, "o", "daily"),
            limit: daily,
            owner_wide: true,
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limits_spend_all_or_nothing_and_hold_under_concurrency() {
    let limit = |name: &str, limit: u64, secs: u64| RateLimit {
        name: name.into(),
        limit,
        window: Duration::from_secs(secs),
    };
    // Windows of an hour: nothing is earned back while the case runs.
    let burst = limit("burst", 20, 3600);
    let daily = limit("daily", 25, 86_400);
    for b in backends() {
        let s = &b.limits;
        let buckets = |owner: &str| pair(owner, &burst, &daily);
        let acme = buckets("acme");
        let d = s.acquire(&acme, 10).await.unwrap();
        assert!(d.allowed, "{}", b.name);
        assert_eq!(
            d.states.iter().map(|x| x.remaining).collect::<Vec<_>>(),
            [10, 15],
            "{}",
            b.name
        );
        // 11 more fit neither the burst: refused by it, and nothing is spent anywhere.
        let d = s.acquire(&acme, 11).await.unwrap();
        assert!(!d.allowed, "{}", b.name);
        assert_eq!(d.refused_by.map(|r| r.0), Some(0), "{}", b.name);
        assert!(d.refused_by.is_some_and(|r| r.1 >= 1), "{}", b.name);
        assert_eq!(d.states[0].remaining, 10, "{}", b.name);
        assert_eq!(d.states[1].remaining, 15, "{}", b.name);
        // Another owner's buckets are its own.
        assert!(
            s.acquire(&buckets("other"), 20).await.unwrap().allowed,
            "{}",
            b.name
        );

        // 40 concurrent spenders of 1 on the remaining 10: exactly 10 pass.
        let passed = futures_util::future::join_all((0..40).map(|_| {
            let s = Arc::clone(s);
            let burst = burst.clone();
            let daily = daily.clone();
            async move {
                s.acquire(&pair("acme", &burst, &daily), 1)
                    .await
                    .unwrap()
                    .allowed
            }
        }))
        .await
        .into_iter()
        .filter(|a| *a)
        .count();
        assert_eq!(passed, 10, "{}", b.name);
        let d = s.acquire(&acme, 1).await.unwrap();
        assert!(!d.allowed, "{}", b.name);
        assert_eq!(d.states[1].remaining, 5, "{}: daily spent 20 of 25", b.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn credits_are_never_double_spent_nor_below_zero() {
    for b in backends() {
        let c = &b.credits;
        assert_eq!(c.remaining("key_c", None).await.unwrap(), 0, "{}", b.name);
        assert_eq!(
            c.adjust("key_c", CreditOp::Set(100), None).await.unwrap(),
            100
        );
        // 64 concurrent spenders of 3 on 100: exactly 33 succeed, 1 left.
        let ok = futures_util::future::join_all((0..64).map(|_| {
            let c = Arc::clone(c);
            async move { c.spend("key_c", 3, None).await.unwrap().ok }
        }))
        .await
        .into_iter()
        .filter(|ok| *ok)
        .count();
        assert_eq!(ok, 33, "{}", b.name);
        assert_eq!(c.remaining("key_c", None).await.unwrap(), 1, "{}", b.name);
        let refused = c.spend("key_c", 2, None).await.unwrap();
        assert!(!refused.ok && refused.remaining == 1, "{}", b.name);
        c.refund("key_c", 3).await.unwrap();
        assert_eq!(c.adjust("key_c", CreditOp::Add(6), None).await.unwrap(), 10);
        // A refill period that starts resets to its amount, once.
        let day = RefillNow {
            period: 20_000,
            amount: 50,
        };
        assert_eq!(c.spend("key_c", 5, Some(day)).await.unwrap().remaining, 45);
        assert_eq!(c.spend("key_c", 5, Some(day)).await.unwrap().remaining, 40);
        c.forget("key_c").await.unwrap();
        assert_eq!(c.remaining("key_c", None).await.unwrap(), 0, "{}", b.name);
    }
}

#[tokio::test]
async fn revocation_is_final() {
    let (mk, _) = MasterKey::generate();
    for b in backends() {
        let mut r = record(&mk, "acme", AuthKind::HmacV1);
        b.store.insert(&r).await.unwrap();
        r.revoked_at = Some(OffsetDateTime::now_utc());
        r.version += 1;
        b.store.update(&r).await.unwrap();
        let mut undone = r.clone();
        undone.revoked_at = None;
        undone.version += 1;
        assert!(
            matches!(b.store.update(&undone).await, Err(StoreError::RevokedFinal)),
            "{}",
            b.name
        );
        // Other changes to a revoked key are still possible.
        let mut renamed = r.clone();
        renamed.name = "renamed".into();
        renamed.version += 1;
        b.store.update(&renamed).await.unwrap();
        let now = b.store.get_by_id(&r.id).await.unwrap().unwrap();
        assert!(now.revoked_at.is_some(), "{}", b.name);
    }
}

/// Issue 24: a revoked key's public key leaves a tombstone with the revocation, in the same
/// write, that survives the record's delete and a reopen; a key deleted without being revoked
/// leaves none; a record revoked before tombstones existed leaves one when it is deleted.
#[tokio::test]
async fn a_revoked_public_key_is_remembered_after_its_record_is_deleted() {
    let (mk, _) = MasterKey::generate();
    for b in backends() {
        let mut revoked = record(&mk, "acme", AuthKind::HmacV1);
        let plain = record(&mk, "acme", AuthKind::HmacV1);
        let bearer = record(&mk, "acme", AuthKind::Bearer);
        for r in [&revoked, &plain, &bearer] {
            b.store.insert(r).await.unwrap();
            assert!(
                !b.store.was_revoked(&r.public_key).await.unwrap(),
                "{}",
                b.name
            );
        }
        revoked.revoked_at = Some(OffsetDateTime::now_utc());
        revoked.version += 1;
        b.store.update(&revoked).await.unwrap();
        assert!(
            b.store.was_revoked(&revoked.public_key).await.unwrap(),
            "{}",
            b.name
        );
        assert!(b.store.delete(&revoked.id).await.unwrap());
        assert!(b.store.delete(&plain.id).await.unwrap());
        let (name, store, _kept) = b.flushed_and_reopened().await;
        assert!(
            store.was_revoked(&revoked.public_key).await.unwrap(),
            "{name}: the tombstone outlives the delete and a reopen"
        );
        assert!(
            !store.was_revoked(&plain.public_key).await.unwrap(),
            "{name}"
        );
        // A revoked record written whole (a copy, a restore) marks its key too, and its
        // delete keeps the mark; a tombstone can be added alone (restore), once.
        let mut copied = record(&mk, "acme", AuthKind::HmacV1);
        copied.revoked_at = Some(OffsetDateTime::now_utc());
        store.insert(&copied).await.unwrap();
        assert!(
            store.was_revoked(&copied.public_key).await.unwrap(),
            "{name}"
        );
        store.add_tombstone("pk_live_from_a_backup").await.unwrap();
        store.add_tombstone("pk_live_from_a_backup").await.unwrap();
        let mut all = store.tombstones().await.unwrap();
        all.sort();
        let mut want = vec![
            revoked.public_key.clone(),
            copied.public_key.clone(),
            "pk_live_from_a_backup".to_owned(),
        ];
        want.sort();
        assert_eq!(all, want, "{name}");
        assert!(store.delete(&copied.id).await.unwrap());
        assert!(
            store.was_revoked(&copied.public_key).await.unwrap(),
            "{name}"
        );
        assert!(
            !store.was_revoked(&bearer.public_key).await.unwrap(),
            "{name}"
        );
    }
}

/// Issue 24: a bearer key authenticates with its secret alone, so revoking one tombstones the
/// SHA-256 of its secret, and of the one still in its rotation grace, in the same write; the
/// marks survive the delete and a reopen. Revoked hmac keys and deleted unrevoked bearer keys
/// leave no secret mark; a revoked record written whole (copy, restore) leaves one; a secret
/// tombstone can be added alone (restore), once.
#[tokio::test]
async fn a_revoked_bearer_secret_is_remembered_after_its_record_is_deleted() {
    let (mk, _) = MasterKey::generate();
    for b in backends() {
        let now = OffsetDateTime::now_utc();
        let (mut revoked, first) = mint(&mk, new_key("acme", AuthKind::Bearer), now);
        let (plain, plain_secret) = mint(&mk, new_key("acme", AuthKind::Bearer), now);
        let mut hmac = record(&mk, "acme", AuthKind::HmacV1);
        for r in [&revoked, &plain, &hmac] {
            b.store.insert(r).await.unwrap();
        }
        // The first secret stays in its grace: it still authenticates, so it is marked too.
        let second = keygate::keys::rotate(&mk, &mut revoked, time::Duration::minutes(5), now);
        revoked.version += 1;
        b.store.update(&revoked).await.unwrap();
        assert!(
            !b.store.secret_was_revoked(&first.sha256()).await.unwrap(),
            "{}: not revoked yet",
            b.name
        );
        revoked.revoked_at = Some(now);
        revoked.version += 1;
        b.store.update(&revoked).await.unwrap();
        hmac.revoked_at = Some(now);
        hmac.version += 1;
        b.store.update(&hmac).await.unwrap();
        for s in [&first, &second] {
            assert!(
                b.store.secret_was_revoked(&s.sha256()).await.unwrap(),
                "{}: marked with the revocation",
                b.name
            );
        }
        assert!(b.store.delete(&revoked.id).await.unwrap());
        assert!(b.store.delete(&plain.id).await.unwrap());
        assert!(b.store.delete(&hmac.id).await.unwrap());
        let (name, store, _kept) = b.flushed_and_reopened().await;
        for s in [&first, &second] {
            assert!(
                store.secret_was_revoked(&s.sha256()).await.unwrap(),
                "{name}: the secret tombstone outlives the delete and a reopen"
            );
        }
        assert!(
            !store
                .secret_was_revoked(&plain_secret.sha256())
                .await
                .unwrap(),
            "{name}: deleted, never revoked"
        );
        let (mut copied, copied_secret) = mint(&mk, new_key("acme", AuthKind::Bearer), now);
        copied.revoked_at = Some(now);
        store.insert(&copied).await.unwrap();
        assert!(
            store
                .secret_was_revoked(&copied_secret.sha256())
                .await
                .unwrap(),
            "{name}"
        );
        store.add_secret_tombstone(&[7; 32]).await.unwrap();
        store.add_secret_tombstone(&[7; 32]).await.unwrap();
        let mut all = store.secret_tombstones().await.unwrap();
        all.sort();
        let mut want = vec![
            first.sha256(),
            second.sha256(),
            copied_secret.sha256(),
            [7; 32],
        ];
        want.sort();
        assert_eq!(all, want, "{name}: no hmac secret, each hash once");
    }
}

/// Concurrent read-modify-write loops that retry on `VersionConflict` lose no change.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_lose_no_change() {
    const WRITERS: usize = 8;
    const EACH: usize = 10;
    let (mk, _) = MasterKey::generate();
    for b in backends() {
        let r = record(&mk, "acme", AuthKind::HmacV1);
        b.store.insert(&r).await.unwrap();
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let store = Arc::clone(&b.store);
            let id = r.id.clone();
            tasks.push(tokio::spawn(async move {
                let mut conflicts = 0u32;
                for i in 0..EACH {
                    loop {
                        let mut cur = store.get_by_id(&id).await.unwrap().unwrap();
                        cur.metadata.insert(format!("w{w}-{i}"), "1".into());
                        cur.version += 1;
                        match store.update(&cur).await {
                            Ok(()) => break,
                            Err(StoreError::VersionConflict) => conflicts += 1,
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
                conflicts
            }));
        }
        let mut conflicts = 0;
        for t in tasks {
            conflicts += t.await.unwrap();
        }
        let end = b.store.get_by_id(&r.id).await.unwrap().unwrap();
        assert_eq!(
            end.metadata.len(),
            WRITERS * EACH,
            "{}: lost changes",
            b.name
        );
        assert_eq!(end.version, 1 + (WRITERS * EACH) as u64, "{}", b.name);
        println!("{}: {conflicts} conflicts retried", b.name);
    }
}

#[tokio::test]
async fn delete_removes_the_record_and_every_index() {
    let (mk, _) = MasterKey::generate();
    for b in backends() {
        let (r, secret) = mint(
            &mk,
            new_key("acme", AuthKind::Bearer),
            OffsetDateTime::now_utc(),
        );
        b.store.insert(&r).await.unwrap();
        assert!(b.store.delete(&r.id).await.unwrap(), "{}", b.name);
        assert!(!b.store.delete(&r.id).await.unwrap());
        assert_eq!(b.store.get_by_id(&r.id).await.unwrap(), None);
        assert_eq!(
            b.store.get_by_public_key(&r.public_key).await.unwrap(),
            None
        );
        assert_eq!(
            b.store.get_by_secret_hash(&secret.sha256()).await.unwrap(),
            None
        );
        assert!(b
            .store
            .list(Some("acme"), None, 10)
            .await
            .unwrap()
            .items
            .is_empty());
    }
}

#[tokio::test]
async fn listing_is_newest_first_paginated_and_filtered_by_owner() {
    let (mk, _) = MasterKey::generate();
    for b in backends() {
        let mut acme = Vec::new();
        for i in 0..5 {
            let r = record(&mk, "acme", AuthKind::HmacV1);
            b.store.insert(&r).await.unwrap();
            acme.push(r.id.clone());
            if i == 2 {
                b.store
                    .insert(&record(&mk, "globex", AuthKind::HmacV1))
                    .await
                    .unwrap();
            }
        }
        acme.reverse();
        let mut got = Vec::new();
        let mut cursor = None;
        loop {
            let page = b
                .store
                .list(Some("acme"), cursor.as_deref(), 2)
                .await
                .unwrap();
            assert!(page.items.len() <= 2);
            got.extend(page.items.iter().map(|r| r.id.clone()));
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(got, acme, "{}: newest first, every key once", b.name);
        let all = b.store.list(None, None, 100).await.unwrap();
        assert_eq!(all.items.len(), 6);
        assert!(all.next_cursor.is_none());
    }
}

#[tokio::test]
async fn a_nonce_is_used_once_per_key_until_it_expires() {
    for b in backends() {
        let ttl = Duration::from_millis(1500);
        assert!(
            b.store.use_nonce("key_a", "n1", ttl).await.unwrap(),
            "{}",
            b.name
        );
        assert!(!b.store.use_nonce("key_a", "n1", ttl).await.unwrap());
        assert!(
            b.store.use_nonce("key_b", "n1", ttl).await.unwrap(),
            "nonces are per key"
        );
        assert!(b.store.use_nonce("key_a", "n2", ttl).await.unwrap());
        tokio::time::sleep(Duration::from_millis(1800)).await;
        assert!(
            b.store.use_nonce("key_a", "n1", ttl).await.unwrap(),
            "an expired nonce is free again"
        );
    }
}

#[tokio::test]
async fn concurrent_uses_of_one_nonce_admit_exactly_one() {
    for b in backends() {
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let s = Arc::clone(&b.store);
            tasks.push(tokio::spawn(async move {
                s.use_nonce("key_c", "race", Duration::from_secs(60))
                    .await
                    .unwrap()
            }));
        }
        let mut admitted = 0;
        for t in tasks {
            admitted += usize::from(t.await.unwrap());
        }
        assert_eq!(admitted, 1, "{}", b.name);
    }
}

#[tokio::test]
async fn records_and_live_nonces_survive_reopening() {
    let (mk, _) = MasterKey::generate();
    for b in backends() {
        let r = record(&mk, "acme", AuthKind::HmacV1);
        b.store.insert(&r).await.unwrap();
        assert!(b
            .store
            .use_nonce(&r.id, "kept", Duration::from_secs(600))
            .await
            .unwrap());
        assert!(b
            .store
            .use_nonce(&r.id, "short", Duration::from_secs(1))
            .await
            .unwrap());
        let Backend {
            store,
            signing,
            limits,
            credits,
            reopen,
            name,
            _dir,
            _servers,
        } = b;
        // Dropping the store is the process going away: no explicit flush first.
        drop((store, signing, limits, credits));
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let again = reopen();
        assert_eq!(
            again.get_by_id(&r.id).await.unwrap().as_ref(),
            Some(&r),
            "{name}"
        );
        assert!(
            !again
                .use_nonce(&r.id, "kept", Duration::from_secs(600))
                .await
                .unwrap(),
            "{name}: nonce lost"
        );
        assert!(
            again
                .use_nonce(&r.id, "short", Duration::from_secs(600))
                .await
                .unwrap(),
            "{name}: expired nonce kept"
        );
    }
}

fn file_contains(path: &Path, needle: &[u8]) -> bool {
    let bytes = std::fs::read(path).unwrap();
    bytes.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn the_store_file_holds_no_usable_secret() {
    let (mk, _) = MasterKey::generate();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.db");
    let store = EmbeddedStore::open(&path).unwrap();
    let mut secrets = Vec::new();
    let mut public_keys = Vec::new();
    for auth in [AuthKind::HmacV1, AuthKind::HmacBody, AuthKind::Bearer] {
        let (r, s) = mint(&mk, new_key("acme", auth), OffsetDateTime::now_utc());
        store.insert(&r).await.unwrap();
        public_keys.push(r.public_key.clone());
        secrets.push(s);
    }
    store.flush().await.unwrap();
    drop(store);
    // The file is real: the public keys are in it.
    for pk in &public_keys {
        assert!(
            file_contains(&path, pk.as_bytes()),
            "store file does not hold the records"
        );
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    for s in &secrets {
        let text = s.expose();
        let random_part = &text[8..];
        for needle in [
            text.to_owned(),
            random_part.to_owned(),
            b64.encode(text),
            b64.encode(random_part),
            hex::encode(text),
            hex::encode(random_part),
        ] {
            assert!(
                !file_contains(&path, needle.as_bytes()),
                "secret found in store file as {needle}"
            );
        }
    }
}

#[tokio::test]
async fn a_rotated_bearer_key_is_indexed_by_both_hashes_until_the_next_rotation() {
    let (mk, _) = MasterKey::generate();
    for b in backends() {
        let now = OffsetDateTime::now_utc();
        let (mut r, first) = mint(&mk, new_key("acme", AuthKind::Bearer), now);
        b.store.insert(&r).await.unwrap();
        let second = keygate::keys::rotate(&mk, &mut r, time::Duration::minutes(5), now);
        r.version += 1;
        b.store.update(&r).await.unwrap();
        for s in [&first, &second] {
            let found = b.store.get_by_secret_hash(&s.sha256()).await.unwrap();
            assert_eq!(found.map(|f| f.id), Some(r.id.clone()), "{}", b.name);
        }
        let third = keygate::keys::rotate(&mk, &mut r, time::Duration::ZERO, now);
        r.version += 1;
        b.store.update(&r).await.unwrap();
        assert_eq!(
            b.store.get_by_secret_hash(&first.sha256()).await.unwrap(),
            None,
            "{}",
            b.name
        );
        assert_eq!(
            b.store.get_by_secret_hash(&second.sha256()).await.unwrap(),
            None,
            "{}",
            b.name
        );
        assert!(b
            .store
            .get_by_secret_hash(&third.sha256())
            .await
            .unwrap()
            .is_some());
    }
}

#[tokio::test]
async fn audit_entries_commit_with_their_change_and_list_newest_first() {
    use keygate::keys::{Action, Actor, AuditEntry, Write};
    let (mk, _) = MasterKey::generate();
    let actor = Actor::Admin {
        token_id: "0123456789ab".into(),
    };
    for b in backends() {
        let now = OffsetDateTime::now_utc();
        let a = record(&mk, "acme", AuthKind::HmacV1);
        let c = record(&mk, "globex", AuthKind::HmacV1);
        let mut expected_a = Vec::new();
        for (r, action) in [(&a, Action::Create), (&c, Action::Create)] {
            let e = AuditEntry::new(
                now,
                actor.clone(),
                action,
                &r.id,
                &r.owner,
                vec!["owner".into()],
            );
            assert!(b.store.write(Write::Insert(r), Some(&e)).await.unwrap());
            if r.id == a.id {
                expected_a.push(e.id.clone());
            }
        }
        let e = AuditEntry::new(
            now,
            actor.clone(),
            Action::Update,
            &a.id,
            &a.owner,
            vec!["name".into()],
        );
        let mut a2 = a.clone();
        a2.version += 1;
        b.store.write(Write::Update(&a2), Some(&e)).await.unwrap();
        expected_a.push(e.id.clone());

        // A refused change writes no entry: inserting the same record again conflicts.
        let refused = AuditEntry::new(now, actor.clone(), Action::Create, &a.id, &a.owner, vec![]);
        assert!(matches!(
            b.store.write(Write::Insert(&a), Some(&refused)).await,
            Err(StoreError::Conflict)
        ));
        // A delete that finds nothing writes no entry either.
        let nothing = AuditEntry::new(
            now,
            actor.clone(),
            Action::Delete,
            "key_none",
            "acme",
            vec![],
        );
        assert!(!b
            .store
            .write(Write::Delete("key_none"), Some(&nothing))
            .await
            .unwrap());

        expected_a.reverse();
        let by_key = b
            .store
            .list_audit(Some(&a.id), None, None, 10)
            .await
            .unwrap();
        assert_eq!(
            by_key
                .items
                .iter()
                .map(|e| e.id.clone())
                .collect::<Vec<_>>(),
            expected_a,
            "{}",
            b.name
        );
        assert_eq!(by_key.items[0].action, Action::Update);
        let by_owner = b
            .store
            .list_audit(None, Some("globex"), None, 10)
            .await
            .unwrap();
        assert_eq!(by_owner.items.len(), 1);
        assert_eq!(by_owner.items[0].key_id, c.id);
        assert!(b
            .store
            .list_audit(Some(&a.id), Some("globex"), None, 10)
            .await
            .unwrap()
            .items
            .is_empty());
        let first = b.store.list_audit(None, None, None, 2).await.unwrap();
        assert_eq!(first.items.len(), 2);
        let rest = b
            .store
            .list_audit(None, None, first.next_cursor.as_deref(), 2)
            .await
            .unwrap();
        assert_eq!(rest.items.len(), 1, "{}", b.name);
        assert!(rest.next_cursor.is_none());
    }
}

#[tokio::test]
async fn pagination_is_stable_while_keys_are_inserted() {
    let (mk, _) = MasterKey::generate();
    for b in backends() {
        let mut older = Vec::new();
        for _ in 0..10 {
            let r = record(&mk, "acme", AuthKind::HmacV1);
            b.store.insert(&r).await.unwrap();
            older.push(r.id.clone());
        }
        older.reverse();
        let first = b.store.list(Some("acme"), None, 3).await.unwrap();
        let mut seen: Vec<String> = first.items.iter().map(|r| r.id.clone()).collect();
        let mut cursor = first.next_cursor;
        // New keys arrive between every page; they are newer than any cursor, so the walk
        // neither repeats nor skips a key that existed when it began.
        while let Some(c) = cursor {
            for _ in 0..2 {
                b.store
                    .insert(&record(&mk, "acme", AuthKind::HmacV1))
                    .await
                    .unwrap();
            }
            let page = b.store.list(Some("acme"), Some(&c), 3).await.unwrap();
            seen.extend(page.items.iter().map(|r| r.id.clone()));
            cursor = page.next_cursor;
        }
        assert_eq!(seen, older, "{}", b.name);
    }
}

/// Property: a cursor walk over an owner's keys, while another task inserts and deletes keys
/// of that owner, returns newest first, never repeats a key, never returns one that never
/// existed, and returns every key that existed for the whole walk. Random page sizes, key
/// counts and schedules of inserts and deletes (proptest), on every backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pagination_returns_every_key_once_under_concurrent_inserts_and_deletes() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let mk = Arc::new(MasterKey::generate().0);
    let handle = tokio::runtime::Handle::current();
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    for b in backends() {
        let mut runner = TestRunner::new(Config::with_cases(cases));
        let case = std::sync::atomic::AtomicUsize::new(0);
        // (keys at the start, page size, the other task's ops: insert, or delete key i).
        let strategy = (
            0usize..40,
            1usize..8,
            proptest::collection::vec(prop_oneof![Just(None), (0usize..40).prop_map(Some)], 0..30),
        );
        let outcome = runner.run(&strategy, |(start, page, ops)| {
            let owner = format!(
                "walk-{}",
                case.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            );
            tokio::task::block_in_place(|| {
                handle.block_on(async {
                    let mut initial = Vec::new();
                    for _ in 0..start {
                        let r = record(&mk, &owner, AuthKind::HmacV1);
                        b.store.insert(&r).await.unwrap();
                        initial.push(r.id.clone());
                    }
                    let store = b.store.clone();
                    let (mk2, owner2, ids) = (mk.clone(), owner.clone(), initial.clone());
                    let writer = tokio::spawn(async move {
                        let (mut inserted, mut deleted) = (Vec::new(), Vec::new());
                        for op in ops {
                            match op {
                                None => {
                                    let r = record(&mk2, &owner2, AuthKind::HmacV1);
                                    store.insert(&r).await.unwrap();
                                    inserted.push(r.id);
                                }
                                Some(i) if !ids.is_empty() => {
                                    let id = &ids[i % ids.len()];
                                    store.delete(id).await.unwrap();
                                    deleted.push(id.clone());
                                }
                                Some(_) => {}
                            }
                            tokio::task::yield_now().await;
                        }
                        (inserted, deleted)
                    });
                    let mut seen = Vec::new();
                    let mut cursor: Option<String> = None;
                    loop {
                        let p = b
                            .store
                            .list(Some(&owner), cursor.as_deref(), page)
                            .await
                            .unwrap();
                        assert!(p.items.len() <= page);
                        seen.extend(p.items.into_iter().map(|r| r.id));
                        cursor = p.next_cursor;
                        if cursor.is_none() {
                            break;
                        }
                        tokio::task::yield_now().await;
                    }
                    let (inserted, deleted) = writer.await.unwrap();
                    let mut unique = seen.clone();
                    unique.sort();
                    unique.dedup();
                    prop_assert_eq!(unique.len(), seen.len(), "a key came twice: {:?}", seen);
                    prop_assert!(
                        seen.windows(2).all(|w| w[0] > w[1]),
                        "not newest first: {:?}",
                        seen
                    );
                    for id in &seen {
                        prop_assert!(initial.contains(id) || inserted.contains(id), "{}", id);
                    }
                    for id in initial.iter().filter(|id| !deleted.contains(id)) {
                        prop_assert!(seen.contains(id), "{} existed throughout, not listed", id);
                    }
                    Ok(())
                })
            })
        });
        if let Err(e) = outcome {
            panic!("{}: {e}", b.name);
        }
    }
}

#[tokio::test]
async fn usage_adds_up_moves_last_used_forward_and_leaves_updated_at() {
    use keygate::keys::Usage;
    let (mk, _) = MasterKey::generate();
    for b in backends() {
        let r = record(&mk, "acme", AuthKind::HmacV1);
        b.store.insert(&r).await.unwrap();
        let t = |s: i64| OffsetDateTime::from_unix_timestamp(1_767_225_600 + s).unwrap();
        let batch = |n, at| {
            vec![
                (
                    r.id.clone(),
                    Usage {
                        requests: n,
                        last_used_at: at,
                    },
                ),
                (
                    "key_unknown".to_owned(),
                    Usage {
                        requests: 1,
                        last_used_at: at,
                    },
                ),
            ]
        };
        b.store.add_usage(&batch(3, t(10))).await.unwrap();
        b.store.add_usage(&batch(2, t(5))).await.unwrap();
        let got = b.store.get_by_id(&r.id).await.unwrap().unwrap();
        assert_eq!(got.total_requests, 5, "{}", b.name);
        assert_eq!(
            got.last_used_at,
            Some(t(10)),
            "{}: last_used_at never moves back",
            b.name
        );
        assert_eq!(got.updated_at, r.updated_at);
        assert_eq!(
            b.store.get_by_id("key_unknown").await.unwrap(),
            None,
            "{}: usage must not create keys",
            b.name
        );
        // An admin change keeps the counts.
        let mut renamed = got.clone();
        renamed.name = "renamed".into();
        renamed.version += 1;
        b.store.update(&renamed).await.unwrap();
        assert_eq!(
            b.store
                .get_by_id(&r.id)
                .await
                .unwrap()
                .unwrap()
                .total_requests,
            5,
            "{}",
            b.name
        );
    }
}

#[tokio::test]
async fn redis_holds_no_usable_secret() {
    let (mk, _) = MasterKey::generate();
    let server = redis_server::RedisServer::start();
    let store = RedisStore::open(&server.url()).unwrap();
    let mut secrets = Vec::new();
    for auth in [AuthKind::HmacV1, AuthKind::HmacBody, AuthKind::Bearer] {
        let (r, s) = mint(&mk, new_key("acme", auth), OffsetDateTime::now_utc());
        store.insert(&r).await.unwrap();
        secrets.push(s);
    }
    // Dump every value Redis holds, whatever its type.
    let keys_reply = server.cli(&["KEYS", "*"]);
    let keys: Vec<&str> = keys_reply
        .lines()
        .filter(|l| l.starts_with("{kg}:") || l.starts_with("kg:"))
        .collect();
    assert!(
        keys.len() >= 9,
        "expected records and indexes, got {keys:?}"
    );
    let mut dump = String::new();
    for k in keys {
        let kind = server.cli(&["TYPE", k]);
        let value = match kind.trim() {
            "+string" => server.cli(&["GET", k]),
            "+zset" => server.cli(&["ZRANGE", k, "0", "-1"]),
            "+hash" => server.cli(&["HGETALL", k]),
            other => panic!("unexpected type {other} for {k}"),
        };
        dump.push_str(k);
        dump.push_str(&value);
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    for s in &secrets {
        let text = s.expose();
        for needle in [
            text.to_owned(),
            text[8..].to_owned(),
            b64.encode(text),
            hex::encode(text),
        ] {
            assert!(!dump.contains(&needle), "secret found in Redis as {needle}");
        }
    }
    assert!(
        dump.contains("\"sealed\"") && dump.contains("\"sha256\""),
        "the dump holds the records"
    );
}

#[tokio::test]
async fn on_a_cluster_a_record_stays_on_one_slot_and_nonces_spread() {
    let (mk, _) = MasterKey::generate();
    let cluster = redis_server::RedisCluster::start();
    let store = RedisStore::open(&cluster.url()).unwrap();
    let r = record(&mk, "acme", AuthKind::Bearer);
    store.insert(&r).await.unwrap();
    for i in 0..60 {
        assert!(store
            .use_nonce(&r.id, &format!("n{i}"), Duration::from_secs(60))
            .await
            .unwrap());
    }
    let home = cluster.node_for("{kg}");
    let keys_on = |node: &redis_server::RedisServer| -> Vec<String> {
        node.cli(&["KEYS", "*"])
            .lines()
            .filter(|l| l.starts_with("{kg}:") || l.starts_with("kg:"))
            .map(str::to_owned)
            .collect()
    };
    let home_keys = keys_on(home);
    for k in ["k", "pk", "h"] {
        assert!(
            home_keys
                .iter()
                .any(|h| h.starts_with(&format!("{{kg}}:{k}:"))),
            "{k} index not on the {{kg}} node: {home_keys:?}"
        );
    }
    let mut nodes_with_nonces = 0;
    for node in &cluster.nodes {
        let keys = keys_on(node);
        if node.port != home.port {
            assert!(
                keys.iter().all(|k| k.starts_with("kg:n:")),
                "record keys off the {{kg}} slot: {keys:?}"
            );
        }
        if keys.iter().any(|k| k.starts_with("kg:n:")) {
            nodes_with_nonces += 1;
        }
    }
    assert_eq!(nodes_with_nonces, 3, "60 nonces should reach all 3 masters");
}

#[tokio::test]
async fn redis_with_a_password_and_over_tls() {
    use redis_server::{Mode, RedisServer, TlsFiles};
    let (mk, _) = MasterKey::generate();
    let r = record(&mk, "acme", AuthKind::HmacV1);

    let server = RedisServer::start_mode(&Mode::Password("s3cret-pw".into()));
    let store = RedisStore::open(&server.url()).unwrap();
    store.insert(&r).await.unwrap();
    assert_eq!(store.get_by_id(&r.id).await.unwrap().as_ref(), Some(&r));
    let wrong = format!("redis://:not-it@127.0.0.1:{}", server.port);
    let err = RedisStore::open(&wrong)
        .err()
        .expect("a wrong password is refused");
    assert!(!err.to_string().contains("not-it"), "password in {err}");

    let dir = tempfile::tempdir().unwrap();
    let tls = TlsFiles::generate(dir.path());
    let server = RedisServer::start_mode(&Mode::Tls(tls.clone()));
    let target = keygate::keys::RedisTarget::parse(&[server.url()]).unwrap();
    let ca = std::fs::read(&tls.ca).unwrap();
    let store = RedisStore::connect(&target, Some(&ca)).unwrap();
    store.insert(&r).await.unwrap();
    assert_eq!(
        store
            .get_by_public_key(&r.public_key)
            .await
            .unwrap()
            .as_ref(),
        Some(&r)
    );
    // The system's CAs do not vouch for the test CA: the handshake must fail.
    assert!(
        RedisStore::connect(&target, None).is_err(),
        "an untrusted certificate was accepted"
    );
}
