//! The key cache: moka in front of a [`KeyStore`], with positive entries (`cache.ttl`),
//! negative entries for unknown credentials (`cache.negative_ttl`), and explicit
//! invalidation on every admin change.
//!
//! Entries hold an [`ActiveKey`], i.e. the secret already unsealed, so a cached key costs no
//! store I/O and no decryption. Two maps because a key is found either by public key or, for
//! bearer keys, by the SHA-256 of the presented secret.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;

use crate::config::CacheConfig;
use crate::keys::{ActiveKey, ChangeSink, KeyRecord, KeyStore, MasterKey, StoreError};
use crate::metrics::{CacheResult, Metrics};

/// A lookup result: the key, or `None` for "no such key".
type Entry = Option<Arc<ActiveKey>>;

/// A key the store gave, and when.
#[derive(Clone)]
struct Slot {
    key: Arc<ActiveKey>,
    /// `None`: a change was invalidated while this was being read, so it may predate the
    /// change; the request that read it uses it, the next one reads the store again.
    fetched: Option<Instant>,
}

/// Known keys live `ttl` fresh, then `stale_if_error` longer, served stale only while the store
/// cannot be asked. Unknown credentials live `negative_ttl` in a map of their own: one TTL per
/// map needs no per-entry timer (measured: less memory per entry), and a flood of unknown keys
/// cannot evict known ones.
struct Maps<K> {
    known: Cache<K, Slot>,
    unknown: Cache<K, ()>,
}

impl<K> Maps<K>
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
{
    fn new(cfg: &CacheConfig) -> Self {
        Self {
            known: Cache::builder()
                .max_capacity(cfg.capacity)
                .time_to_live(cfg.ttl.saturating_add(cfg.stale_if_error))
                .build(),
            unknown: Cache::builder()
                .max_capacity(cfg.capacity)
                .time_to_live(cfg.negative_ttl)
                .build(),
        }
    }

    async fn invalidate<Q>(&self, key: &Q)
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.known.invalidate(key).await;
        self.unknown.invalidate(key).await;
        // moka keeps a removed entry in its write log until housekeeping runs, which only
        // traffic triggers: run it now, so a changed key's unsealed secret is dropped (and
        // wiped) at once (tests/secret_hygiene.rs scans the process's memory for it).
        self.known.run_pending_tasks().await;
    }

    fn invalidate_all(&self) {
        self.known.invalidate_all();
        self.unknown.invalidate_all();
    }

    async fn entries(&self) -> u64 {
        self.known.run_pending_tasks().await;
        self.unknown.run_pending_tasks().await;
        self.known.entry_count() + self.unknown.entry_count()
    }
}

/// Why a lookup could not answer.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored record cannot be used: {0}")]
    Activate(#[from] crate::keys::ActivateError),
    /// Internal to a fill: the store has no such key (becomes `Ok(None)`).
    #[error("no such key")]
    Unknown,
}

/// Looks keys up through moka, filling from the store on a miss.
pub struct KeyCache {
    store: Arc<dyn KeyStore>,
    master: Arc<MasterKey>,
    metrics: Metrics,
    by_public: Maps<String>,
    by_hash: Maps<[u8; 32]>,
    /// How long a positive entry is trusted before the store is asked again.
    ttl: Duration,
    /// `cache.stale_if_error`: zero means the operator wants no serving from the cache while
    /// the store cannot answer.
    stale_if_error: Duration,
    /// Bumped by every invalidation. A fill that read the store before a change and inserts
    /// after its invalidation would otherwise hold the old record (a revoked key still
    /// working) for a whole `ttl`; fills compare it before and after their read.
    epoch: AtomicU64,
}

impl KeyCache {
    pub fn new(
        store: Arc<dyn KeyStore>,
        master: Arc<MasterKey>,
        metrics: Metrics,
        cfg: &CacheConfig,
    ) -> Self {
        Self {
            store,
            master,
            metrics,
            by_public: Maps::new(cfg),
            by_hash: Maps::new(cfg),
            ttl: cfg.ttl,
            stale_if_error: cfg.stale_if_error,
            epoch: AtomicU64::new(0),
        }
    }

    /// Whether a request could still be authenticated from this cache with the store
    /// unreachable: `stale_if_error` is on and some cached key, not revoked or expired at
    /// `now`, needs no store write to be used. A signed key (`hmac-v1`, `hmac-body`) needs its
    /// nonce recorded, so it counts only when `nonces_checked_locally`
    /// (`store.nonce_fallback = "local"`); a bearer key always counts. Read by
    /// `/readyz/serving`, so a pod with nothing usable leaves the Service during an outage
    /// while the pods that can still serve stay in.
    pub fn can_serve_without_store(
        &self,
        nonces_checked_locally: bool,
        now: time::OffsetDateTime,
    ) -> bool {
        if self.stale_if_error.is_zero() {
            return false;
        }
        let usable = |slot: &Slot| {
            let key = &slot.key;
            key.revoked_at.is_none()
                && key.expires_at.is_none_or(|at| at > now)
                && (nonces_checked_locally || key.auth == crate::keys::AuthKind::Bearer)
        };
        // moka's iterators skip expired entries: past ttl + stale_if_error nothing counts.
        self.by_hash.known.iter().any(|(_, slot)| usable(&slot))
            || self.by_public.known.iter().any(|(_, slot)| usable(&slot))
    }

    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.store
    }

    /// Entries held, positive and negative, once moka has applied pending inserts.
    pub async fn entries(&self) -> u64 {
        self.by_public.entries().await + self.by_hash.entries().await
    }

    fn count(&self, result: CacheResult) {
        self.metrics.cache(result);
    }

    /// Reads the store and opens the secret: the miss path.
    async fn fetch<F>(&self, op: &'static str, load: F) -> Result<Slot, LookupError>
    where
        F: std::future::Future<Output = Result<Option<KeyRecord>, StoreError>>,
    {
        let epoch = self.epoch.load(Ordering::Acquire);
        let record = load
            .await
            .inspect_err(|_| self.metrics.store_error(op))?
            .ok_or(LookupError::Unknown)?;
        let key = ActiveKey::open(&record, &self.master)
            .inspect_err(|_| self.metrics.store_error("open_secret"))?;
        let unchanged = self.epoch.load(Ordering::Acquire) == epoch;
        Ok(Slot {
            key: Arc::new(key),
            fetched: unchanged.then(Instant::now),
        })
    }

    /// One lookup in `cache`, filled by `load` on a miss. Concurrent misses for one key share
    /// a single store read (moka's `try_get_with`). A positive entry older than `ttl` is read
    /// again; if the store cannot answer, the stale entry serves until `stale_if_error` ends.
    async fn lookup<K, Q, L, F>(
        &self,
        maps: &Maps<K>,
        key: &Q,
        op: &'static str,
        load: L,
    ) -> Result<Entry, LookupError>
    where
        K: std::borrow::Borrow<Q> + std::hash::Hash + Eq + Send + Sync + 'static,
        Q: ToOwned<Owned = K> + std::hash::Hash + Eq + ?Sized,
        // A closure, so a hit never builds (and boxes) the store's future.
        L: FnOnce() -> F,
        F: std::future::Future<Output = Result<Option<KeyRecord>, StoreError>>,
    {
        if let Some(slot) = maps.known.get(key).await {
            if slot.fetched.is_some_and(|f| f.elapsed() < self.ttl) {
                self.count(CacheResult::Hit);
                return Ok(Some(slot.key));
            }
            self.count(CacheResult::Miss);
            return match self.fetch(op, load()).await {
                Ok(fresh) => {
                    maps.known.insert(key.to_owned(), fresh.clone()).await;
                    Ok(Some(fresh.key))
                }
                Err(LookupError::Unknown) => {
                    maps.known.invalidate(key).await;
                    maps.unknown.insert(key.to_owned(), ()).await;
                    Ok(None)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "key store unavailable; serving a stale cached key");
                    Ok(Some(slot.key))
                }
            };
        }
        if maps.unknown.contains_key(key) {
            self.count(CacheResult::NegativeHit);
            return Ok(None);
        }
        self.count(CacheResult::Miss);
        match maps
            .known
            .try_get_with_by_ref(key, self.fetch(op, load()))
            .await
        {
            Ok(slot) => Ok(Some(slot.key)),
            Err(e) if matches!(*e, LookupError::Unknown) => {
                maps.unknown.insert(key.to_owned(), ()).await;
                Ok(None)
            }
            Err(e) => Err(unshare(&e)),
        }
    }

    /// The key with this public key; `Ok(None)` if there is none.
    pub async fn by_public_key(&self, public_key: &str) -> Result<Entry, LookupError> {
        let load = || self.store.get_by_public_key(public_key);
        self.lookup(&self.by_public, public_key, "get_by_public_key", load)
            .await
    }

    /// The bearer key whose secret hashes to `hash`; `Ok(None)` if there is none.
    pub async fn by_secret_hash(&self, hash: &[u8; 32]) -> Result<Entry, LookupError> {
        let load = || self.store.get_by_secret_hash(hash);
        self.lookup(&self.by_hash, hash, "get_by_secret_hash", load)
            .await
    }

    /// Drops every entry that could describe `record`, so the next request reads the store.
    pub async fn invalidate(&self, record: &KeyRecord) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.by_public.invalidate(record.public_key.as_str()).await;
        for hash in record.indexed_hashes() {
            self.by_hash.invalidate(&hash).await;
        }
    }
}

#[async_trait::async_trait]
impl ChangeSink for KeyCache {
    async fn changed(&self, public_keys: &[String], hashes: &[[u8; 32]]) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        for pk in public_keys {
            self.by_public.invalidate(pk.as_str()).await;
        }
        for h in hashes {
            self.by_hash.invalidate(h).await;
        }
    }

    fn everything_may_have_changed(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.by_public.invalidate_all();
        self.by_hash.invalidate_all();
    }

    fn delivered_after(&self, lag: std::time::Duration) {
        self.metrics.change_feed_lag.observe(lag.as_secs_f64());
    }
}

/// moka shares one init error between concurrent callers; rebuild an owned one.
fn unshare(e: &Arc<LookupError>) -> LookupError {
    match &**e {
        LookupError::Store(StoreError::Corrupt(m)) => {
            LookupError::Store(StoreError::Corrupt(m.clone()))
        }
        LookupError::Store(other) => LookupError::Store(StoreError::Unavailable(other.to_string())),
        LookupError::Activate(s) => LookupError::Store(StoreError::Corrupt(s.to_string())),
        LookupError::Unknown => LookupError::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{mint, AuthKind, EmbeddedStore, Environment, NewKey};
    use time::OffsetDateTime;

    fn cfg() -> CacheConfig {
        CacheConfig {
            capacity: 100,
            ttl: Duration::from_secs(30),
            negative_ttl: Duration::from_secs(5),
            stale_if_error: Duration::from_secs(600),
        }
    }

    fn new_key() -> NewKey {
        NewKey {
            owner: "acme".into(),
            name: "k".into(),
            description: None,
            scopes: vec![],
            ip_allow_list: vec![],
            expires_at: None,
            environment: Environment::Test,
            auth: AuthKind::HmacV1,
            metadata: Default::default(),
            tls_client_cert_sha256: None,
            rate_limits: vec![],
            remaining: None,
            refill: None,
        }
    }

    // moka keeps its own clock (tokio's paused time does not move it): short real TTLs.
    #[tokio::test]
    async fn positive_and_negative_entries_expire_after_their_own_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn KeyStore> =
            Arc::new(EmbeddedStore::open(&dir.path().join("k.db")).unwrap());
        let (mk, _) = MasterKey::generate();
        let mk = Arc::new(mk);
        let cfg = CacheConfig {
            ttl: Duration::from_millis(2000),
            negative_ttl: Duration::from_millis(700),
            ..cfg()
        };
        let cache = KeyCache::new(
            Arc::clone(&store),
            Arc::clone(&mk),
            Metrics::new().unwrap(),
            &cfg,
        );
        let (record, _) = mint(&mk, new_key(), OffsetDateTime::now_utc());
        // Unknown now: remembered as unknown for negative_ttl, even once it exists.
        assert!(cache
            .by_public_key(&record.public_key)
            .await
            .unwrap()
            .is_none());
        store.insert(&record).await.unwrap();
        assert!(
            cache
                .by_public_key(&record.public_key)
                .await
                .unwrap()
                .is_none(),
            "negative entry still held"
        );
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert!(
            cache
                .by_public_key(&record.public_key)
                .await
                .unwrap()
                .is_some(),
            "negative entry outlived negative_ttl"
        );

        // Known: trusted for ttl, even once deleted behind the cache's back.
        store.delete(&record.id).await.unwrap();
        assert!(
            cache
                .by_public_key(&record.public_key)
                .await
                .unwrap()
                .is_some(),
            "positive entry still held"
        );
        tokio::time::sleep(Duration::from_millis(2300)).await;
        assert!(
            cache
                .by_public_key(&record.public_key)
                .await
                .unwrap()
                .is_none(),
            "positive entry outlived ttl"
        );
    }

    #[tokio::test]
    async fn hits_misses_negatives_and_invalidation() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn KeyStore> =
            Arc::new(EmbeddedStore::open(&dir.path().join("k.db")).unwrap());
        let (mk, _) = MasterKey::generate();
        let mk = Arc::new(mk);
        let metrics = Metrics::new().unwrap();
        let cache = KeyCache::new(Arc::clone(&store), Arc::clone(&mk), metrics.clone(), &cfg());
        let count = |r: &str| metrics.cache_requests.with_label_values(&[r]).get();

        let (record, secret) = mint(&mk, new_key(), OffsetDateTime::now_utc());
        store.insert(&record).await.unwrap();

        let got = cache
            .by_public_key(&record.public_key)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            got.secret.as_ref(),
            Some(&secret),
            "secret unsealed on fill"
        );
        assert_eq!((count("miss"), count("hit")), (1, 0));
        cache.by_public_key(&record.public_key).await.unwrap();
        assert_eq!((count("miss"), count("hit")), (1, 1));

        assert!(cache
            .by_public_key("pk_test_nobodynobodynobodynob")
            .await
            .unwrap()
            .is_none());
        assert!(cache
            .by_public_key("pk_test_nobodynobodynobodynob")
            .await
            .unwrap()
            .is_none());
        assert_eq!(count("negative_hit"), 1);

        // A change made through the store is seen only after invalidation.
        let mut revoked = record.clone();
        revoked.revoked_at = Some(OffsetDateTime::now_utc());
        revoked.version += 1;
        store.update(&revoked).await.unwrap();
        let stale = cache
            .by_public_key(&record.public_key)
            .await
            .unwrap()
            .unwrap();
        assert!(stale.revoked_at.is_none());
        cache.invalidate(&record).await;
        let fresh = cache
            .by_public_key(&record.public_key)
            .await
            .unwrap()
            .unwrap();
        assert!(fresh.revoked_at.is_some());
    }

    /// A store whose public-key reads wait for a go-ahead, to interleave a fill with a change.
    struct Paused {
        inner: Arc<dyn KeyStore>,
        reading: tokio::sync::Notify,
        go: tokio::sync::Notify,
    }

    #[async_trait::async_trait]
    impl KeyStore for Paused {
        async fn write(
            &self,
            change: crate::keys::Write<'_>,
            audit: Option<&crate::keys::AuditEntry>,
        ) -> Result<bool, StoreError> {
            self.inner.write(change, audit).await
        }
        async fn list_audit(
            &self,
            k: Option<&str>,
            o: Option<&str>,
            c: Option<&str>,
            l: usize,
        ) -> Result<crate::keys::AuditPage, StoreError> {
            self.inner.list_audit(k, o, c, l).await
        }
        async fn import_audit(&self, e: &crate::keys::AuditEntry) -> Result<bool, StoreError> {
            self.inner.import_audit(e).await
        }
        async fn was_revoked(&self, pk: &str) -> Result<bool, StoreError> {
            self.inner.was_revoked(pk).await
        }
        async fn tombstones(&self) -> Result<Vec<String>, StoreError> {
            self.inner.tombstones().await
        }
        async fn add_tombstone(&self, pk: &str) -> Result<(), StoreError> {
            self.inner.add_tombstone(pk).await
        }
        async fn secret_was_revoked(&self, h: &[u8; 32]) -> Result<bool, StoreError> {
            self.inner.secret_was_revoked(h).await
        }
        async fn secret_tombstones(&self) -> Result<Vec<[u8; 32]>, StoreError> {
            self.inner.secret_tombstones().await
        }
        async fn add_secret_tombstone(&self, h: &[u8; 32]) -> Result<(), StoreError> {
            self.inner.add_secret_tombstone(h).await
        }
        async fn get_by_id(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
            self.inner.get_by_id(id).await
        }
        async fn get_by_public_key(&self, pk: &str) -> Result<Option<KeyRecord>, StoreError> {
            let read = self.inner.get_by_public_key(pk).await;
            self.reading.notify_one();
            self.go.notified().await;
            read
        }
        async fn get_by_secret_hash(&self, h: &[u8; 32]) -> Result<Option<KeyRecord>, StoreError> {
            self.inner.get_by_secret_hash(h).await
        }
        async fn list(
            &self,
            o: Option<&str>,
            c: Option<&str>,
            l: usize,
        ) -> Result<crate::keys::Page, StoreError> {
            self.inner.list(o, c, l).await
        }
        async fn use_nonce(&self, k: &str, n: &str, t: Duration) -> Result<bool, StoreError> {
            self.inner.use_nonce(k, n, t).await
        }
        async fn add_usage(&self, u: &[(String, crate::keys::Usage)]) -> Result<(), StoreError> {
            self.inner.add_usage(u).await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            self.inner.ping().await
        }
        async fn flush(&self) -> Result<(), StoreError> {
            self.inner.flush().await
        }
    }

    /// A fill that read the record before a revocation and lands after its invalidation must
    /// not keep the revoked key working for a whole TTL.
    #[tokio::test]
    async fn a_fill_that_straddles_an_invalidation_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let inner: Arc<dyn KeyStore> =
            Arc::new(EmbeddedStore::open(&dir.path().join("k.db")).unwrap());
        let paused = Arc::new(Paused {
            inner: Arc::clone(&inner),
            reading: tokio::sync::Notify::new(),
            go: tokio::sync::Notify::new(),
        });
        let (mk, _) = MasterKey::generate();
        let mk = Arc::new(mk);
        let store: Arc<dyn KeyStore> = paused.clone();
        let cache = Arc::new(KeyCache::new(
            store,
            mk.clone(),
            Metrics::new().unwrap(),
            &cfg(),
        ));
        let (record, _) = mint(&mk, new_key(), OffsetDateTime::now_utc());
        inner.insert(&record).await.unwrap();

        let filling = {
            let cache = Arc::clone(&cache);
            let pk = record.public_key.clone();
            tokio::spawn(async move { cache.by_public_key(&pk).await.unwrap() })
        };
        // The fill has read the live record; now the key is revoked and invalidated.
        paused.reading.notified().await;
        let mut revoked = record.clone();
        revoked.revoked_at = Some(OffsetDateTime::now_utc());
        revoked.version += 1;
        inner.update(&revoked).await.unwrap();
        cache.invalidate(&record).await;
        paused.go.notify_one();
        let during = filling.await.unwrap().unwrap();
        assert!(
            during.revoked_at.is_none(),
            "the request in flight saw the old record"
        );

        // The next request reads the store again instead of trusting that fill (the read may
        // go ahead at once).
        paused.go.notify_one();
        let after = cache
            .by_public_key(&record.public_key)
            .await
            .unwrap()
            .unwrap();
        assert!(after.revoked_at.is_some());
    }
}
