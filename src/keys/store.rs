//! The `KeyStore` trait every backend implements, and its error type.

use std::time::Duration;

use async_trait::async_trait;

use super::audit::{AuditEntry, AuditPage};
use super::model::KeyRecord;

/// Why a store operation failed. The details are for logs, never for clients.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("a key with this public key or secret already exists")]
    Conflict,
    /// The record is no longer at the version the write replaces: someone else changed it.
    #[error("the record was changed concurrently")]
    VersionConflict,
    /// The write would clear `revoked_at`: revocation is final.
    #[error("the key is revoked; revocation is final")]
    RevokedFinal,
    #[error("no such key")]
    NotFound,
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
}

/// Requests counted for one key since the last flush.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub requests: u64,
    pub last_used_at: time::OffsetDateTime,
}

/// One page of a newest-first listing.
#[derive(Debug, Default)]
pub struct Page {
    pub items: Vec<KeyRecord>,
    /// Pass back as `cursor` for the next page; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// One change to the key records, applied atomically together with its audit entry.
#[derive(Clone, Copy, Debug)]
pub enum Write<'a> {
    /// Adds a record; `Conflict` if its id, public key or a bearer hash is taken.
    Insert(&'a KeyRecord),
    /// Replaces the record with the same id, compare-and-set: the stored record must be at
    /// `version - 1` of the one given (`VersionConflict` otherwise), and a revoked record stays
    /// revoked (`RevokedFinal`). `NotFound` if there is none.
    Update(&'a KeyRecord),
    /// Removes a record and its indexes.
    Delete(&'a str),
}

/// Told about changes that other gateways sharing the store made to keys.
#[async_trait]
pub trait ChangeSink: Send + Sync + 'static {
    /// Anything cached for these public keys and bearer hashes may be stale.
    async fn changed(&self, public_keys: &[String], hashes: &[[u8; 32]]);
    /// Anything at all may be stale: the change feed was interrupted.
    fn everything_may_have_changed(&self);
    /// The change just handled was written `lag` ago (by the store's clock).
    fn delivered_after(&self, _lag: Duration) {}
    /// Another gateway's failures got `subject` (`crate::limits::abuse::subject`) blocked for
    /// `for_` (`[abuse]`).
    fn blocked(&self, _subject: &str, _for: Duration) {}
}

/// Where key records and used nonces live. Implementations: embedded (redb) now, Redis later.
///
/// A record is found by id, by public key, or (bearer keys) by the SHA-256 of its secret.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Applies `change` and appends `audit` (if any) in one transaction: a change is never
    /// stored without its audit entry. `Ok(false)`: a delete found nothing (nothing written).
    async fn write(
        &self,
        change: Write<'_>,
        audit: Option<&AuditEntry>,
    ) -> Result<bool, StoreError>;
    /// Audit entries, newest first, optionally only those of one key or one owner.
    async fn list_audit(
        &self,
        key_id: Option<&str>,
        owner: Option<&str>,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<AuditPage, StoreError>;

    /// Adds an audit entry recorded elsewhere (`keygate store copy`); `false` if an entry
    /// with its id is already here, which is then left as it is.
    async fn import_audit(&self, entry: &AuditEntry) -> Result<bool, StoreError>;

    /// Adds a new record without an audit entry (tools, tests).
    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
        self.write(Write::Insert(record), None).await.map(drop)
    }
    /// Replaces a record without an audit entry (tools, tests); compare-and-set as
    /// [`Write::Update`].
    async fn update(&self, record: &KeyRecord) -> Result<(), StoreError> {
        self.write(Write::Update(record), None).await.map(drop)
    }
    /// Removes a record without an audit entry; `false` if there was none.
    async fn delete(&self, id: &str) -> Result<bool, StoreError> {
        self.write(Write::Delete(id), None).await
    }
    /// Whether a key with this public key was ever revoked here. Every write of a revoked
    /// record, and every delete of one, leaves this mark, and nothing removes it: a revoked
    /// pair must not come back through an import after its record is deleted.
    async fn was_revoked(&self, public_key: &str) -> Result<bool, StoreError>;
    /// Every public key [`Self::was_revoked`] answers `true` for (backups, copies).
    async fn tombstones(&self) -> Result<Vec<String>, StoreError>;
    /// Marks a public key as revoked without a record (restores, copies).
    async fn add_tombstone(&self, public_key: &str) -> Result<(), StoreError>;
    /// Whether a bearer key whose secret (current or still in its rotation grace) has this
    /// SHA-256 was ever revoked here. Marked in the same writes as [`Self::was_revoked`]: a
    /// bearer secret authenticates alone, so a new public key around it must not revive it.
    async fn secret_was_revoked(&self, hash: &[u8; 32]) -> Result<bool, StoreError>;
    /// Every hash [`Self::secret_was_revoked`] answers `true` for (backups, copies).
    async fn secret_tombstones(&self) -> Result<Vec<[u8; 32]>, StoreError>;
    /// Marks a bearer secret's hash as revoked without a record (restores, copies).
    async fn add_secret_tombstone(&self, hash: &[u8; 32]) -> Result<(), StoreError>;
    async fn get_by_id(&self, id: &str) -> Result<Option<KeyRecord>, StoreError>;
    async fn get_by_public_key(&self, public_key: &str) -> Result<Option<KeyRecord>, StoreError>;
    async fn get_by_secret_hash(&self, hash: &[u8; 32]) -> Result<Option<KeyRecord>, StoreError>;
    /// Newest first; `cursor` is the `next_cursor` of the previous page.
    async fn list(
        &self,
        owner: Option<&str>,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page, StoreError>;
    /// Records `nonce` for `key_id` for `ttl`; `true` if it was unused, `false` if replayed.
    async fn use_nonce(&self, key_id: &str, nonce: &str, ttl: Duration)
        -> Result<bool, StoreError>;
    /// Adds counted requests to `total_requests` and moves `last_used_at` forward, in one
    /// transaction; unknown ids are skipped. Not a change to the key: `updated_at` stays.
    async fn add_usage(&self, usage: &[(String, Usage)]) -> Result<(), StoreError>;
    /// Cheap reachability check for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Makes everything accepted so far durable (called on shutdown).
    async fn flush(&self) -> Result<(), StoreError>;

    /// Starts telling `sink` about changes made by other processes. A store only one process
    /// can open (embedded) has none to report.
    fn watch(&self, _sink: std::sync::Arc<dyn ChangeSink>) {}

    /// Reports a circuit breaker's state (0/1) and the calls it failed at once, for a store
    /// that has one (Redis). The metrics exist, at 0, for every store.
    fn report_circuit(&self, _open: prometheus::IntGauge, _fast_failed: prometheus::IntCounter) {}
}

/// A small document stored whole, with the version it is at (1 for the first write).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned {
    pub version: u64,
    pub body: Vec<u8>,
}

/// Where the fleet's assertion signing keys live (sealed under the master key by the caller:
/// the store sees only ciphertext). One document, written compare-and-set, so two gateways
/// creating or rotating the keyring at once cannot both win.
#[async_trait]
pub trait SigningKeyStore: Send + Sync + 'static {
    /// The keyring document, `None` before the first write.
    async fn load_signing_keys(&self) -> Result<Option<Versioned>, StoreError>;
    /// Writes `doc.body` as `doc.version`; the stored document must be at `doc.version - 1`
    /// (absent counts as 0), else `VersionConflict` and nothing changes.
    async fn save_signing_keys(&self, doc: &Versioned) -> Result<(), StoreError>;
}
