//! Memory per cached key: fills keygate's own `KeyCache` with N distinct hmac-v1 keys and
//! prints the growth of this process's resident set. The keys come from a store that makes
//! each record on request (no Redis or redb file in the measurement), so what grows is the
//! cache as the gateway holds it: moka's entries, the unsealed `ActiveKey`s, their records.
//!
//! With `nonces`, it measures the embedded store's used-nonce set instead: N nonces through
//! `EmbeddedStore::use_nonce` (journal writes included), then, as the baseline in the same
//! run, the same N "id\nnonce" strings in a `HashMap<String, u64>` — how the set held them
//! before it kept keyed 128-bit hashes.
//!
//! ```text
//! cachemem [N] [unknown|nonces]   (default 1000000) -> one JSON line
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

/// The gateway's allocator: memory per key is measured as `keygate serve` would hold it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keygate::cache::KeyCache;
use keygate::config::CacheConfig;
use keygate::keys::{
    build_record, AuditEntry, AuditPage, AuthKind, Environment, KeyRecord, KeyStore, MasterKey,
    NewKey, Page, SecretString, StoreError, Usage, Write,
};
use keygate::metrics::Metrics;

/// Answers every public key with a freshly minted record, as a store holding them all would.
struct Synthetic {
    mk: MasterKey,
    /// Answer "no such key" instead: what a negative entry costs.
    unknown: bool,
}

#[async_trait]
impl KeyStore for Synthetic {
    async fn write(&self, _: Write<'_>, _: Option<&AuditEntry>) -> Result<bool, StoreError> {
        Ok(true)
    }
    async fn list_audit(
        &self,
        _: Option<&str>,
        _: Option<&str>,
        _: Option<&str>,
        _: usize,
    ) -> Result<AuditPage, StoreError> {
        Ok(AuditPage::default())
    }
    async fn import_audit(&self, _: &AuditEntry) -> Result<bool, StoreError> {
        Ok(true)
    }
    async fn was_revoked(&self, _: &str) -> Result<bool, StoreError> {
        Ok(false)
    }
    async fn tombstones(&self) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }
    async fn add_tombstone(&self, _: &str) -> Result<(), StoreError> {
        Ok(())
    }
    async fn secret_was_revoked(&self, _: &[u8; 32]) -> Result<bool, StoreError> {
        Ok(false)
    }
    async fn secret_tombstones(&self) -> Result<Vec<[u8; 32]>, StoreError> {
        Ok(Vec::new())
    }
    async fn add_secret_tombstone(&self, _: &[u8; 32]) -> Result<(), StoreError> {
        Ok(())
    }
    async fn get_by_id(&self, _: &str) -> Result<Option<KeyRecord>, StoreError> {
        Ok(None)
    }
    async fn get_by_public_key(&self, pk: &str) -> Result<Option<KeyRecord>, StoreError> {
        if self.unknown {
            return Ok(None);
        }
        let new = NewKey {
            owner: "merchant_0001".into(),
            name: "checkout server".into(),
            description: None,
            scopes: vec!["payments.create".into(), "payments.read".into()],
            ip_allow_list: vec![],
            expires_at: None,
            environment: Environment::Live,
            auth: AuthKind::HmacV1,
            metadata: BTreeMap::new(),
            tls_client_cert_sha256: None,
            rate_limits: vec![],
            remaining: None,
            refill: None,
        };
        let secret = SecretString::new(format!("sk_live_{}", "s".repeat(43)));
        Ok(Some(build_record(
            &self.mk,
            new,
            pk.to_owned(),
            &secret,
            time::OffsetDateTime::now_utc(),
        )))
    }
    async fn get_by_secret_hash(&self, _: &[u8; 32]) -> Result<Option<KeyRecord>, StoreError> {
        Ok(None)
    }
    async fn list(&self, _: Option<&str>, _: Option<&str>, _: usize) -> Result<Page, StoreError> {
        Ok(Page::default())
    }
    async fn use_nonce(&self, _: &str, _: &str, _: Duration) -> Result<bool, StoreError> {
        Ok(true)
    }
    async fn add_usage(&self, _: &[(String, Usage)]) -> Result<(), StoreError> {
        Ok(())
    }
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .map_or(1_000_000, |a| a.parse().expect("N"));
    let mode = std::env::args().nth(2);
    if mode.as_deref() == Some("nonces") {
        return nonces(n).await;
    }
    let unknown = mode.as_deref() == Some("unknown");
    let (mk, text) = MasterKey::generate();
    let cfg = CacheConfig {
        capacity: n,
        ttl: Duration::from_secs(3600),
        negative_ttl: Duration::from_secs(5),
        stale_if_error: Duration::from_secs(600),
    };
    let opener = Arc::new(MasterKey::from_base64(text.expose()).unwrap());
    let store: Arc<dyn KeyStore> = Arc::new(Synthetic { mk, unknown });
    let cache = KeyCache::new(store, opener, Metrics::new().unwrap(), &cfg);
    // Public keys made up front: they are the request's, not the cache's.
    let keys: Vec<String> = (0..n).map(|i| format!("pk_live_{i:024}")).collect();
    let before = rss_kib();
    for pk in &keys {
        assert_eq!(cache.by_public_key(pk).await.unwrap().is_some(), !unknown);
    }
    let entries = cache.entries().await;
    let after = rss_kib();
    assert_eq!(entries, n, "every key cached");
    // Each key used once more, as a forwarded request uses it (its identity headers cloned):
    // a cached key must not grow by serving.
    let mut sent = 0usize;
    for pk in &keys {
        if let Some(key) = cache.by_public_key(pk).await.unwrap() {
            let headers = [key.id.clone(), key.owner.clone(), key.scopes.clone()];
            sent += headers.iter().map(|h| h.len()).sum::<usize>();
        }
    }
    let used = rss_kib();
    println!(
        "{{\"keys\":{n},\"rss_before_kib\":{before},\"rss_after_kib\":{after},\"rss_after_use_kib\":{used},\"bytes_per_key\":{},\"header_bytes\":{sent}}}",
        (after - before) * 1024 / n
    );
}

/// Memory per used nonce in the embedded store, against the string map it replaced.
async fn nonces(n: u64) {
    use keygate::keys::EmbeddedStore;
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("keygate.db")).unwrap();
    // Ids as minted (a ULID after a prefix) and nonces as the CLI makes them (32 characters):
    // made up front, they are the requests', not the set's.
    let ids: Vec<String> = (0..1000)
        .map(|i| format!("key_01JDQ7Z8X4{i:016}"))
        .collect();
    let nonces: Vec<String> = (0..n).map(|i| format!("{i:032x}")).collect();
    let ttl = Duration::from_secs(600);
    let before = rss_kib();
    for (i, nonce) in nonces.iter().enumerate() {
        let id = &ids[i % ids.len()];
        assert!(store.use_nonce(id, nonce, ttl).await.unwrap());
    }
    store.flush().await.unwrap();
    let after = rss_kib();
    let baseline_before = rss_kib();
    let mut strings: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    for (i, nonce) in nonces.iter().enumerate() {
        strings.insert(format!("{}\n{nonce}", ids[i % ids.len()]), i as u64);
    }
    let baseline_after = rss_kib();
    assert_eq!(strings.len() as u64, n);
    println!(
        "{{\"nonces\":{n},\"rss_before_kib\":{before},\"rss_after_kib\":{after},\"bytes_per_nonce\":{},\"string_map_bytes_per_nonce\":{}}}",
        (after - before) * 1024 / n,
        (baseline_after - baseline_before) * 1024 / n
    );
}
