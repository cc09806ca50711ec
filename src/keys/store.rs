//! The `KeyStore` trait every backend implements, and its error type.

use std::time::Duration;

use async_trait::async_trait;

use super::model::KeyRecord;

/// Why a store operation failed. The details are for logs, never for clients.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("a key with this public key or secret already exists")]
    Conflict,
    #[error("no such key")]
    NotFound,
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
}

/// One page of a newest-first listing.
#[derive(Debug, Default)]
pub struct Page {
    pub items: Vec<KeyRecord>,
    /// Pass back as `cursor` for the next page; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// Where key records and used nonces live. Implementations: embedded (redb) now, Redis later.
///
/// A record is found by id, by public key, or (bearer keys) by the SHA-256 of its secret.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Adds a new record; `Conflict` if its id, public key or bearer hash is taken.
    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError>;
    /// Replaces the record with the same id; `NotFound` if there is none.
    async fn update(&self, record: &KeyRecord) -> Result<(), StoreError>;
    /// Removes a record and its indexes; `false` if there was none.
    async fn delete(&self, id: &str) -> Result<bool, StoreError>;
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
    /// Cheap reachability check for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Makes everything accepted so far durable (called on shutdown).
    async fn flush(&self) -> Result<(), StoreError>;
}
