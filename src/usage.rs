//! Usage counters (`total_requests`, `last_used_at`): tallied in memory on the request path,
//! written to the store in one batch a second, and once more after shutdown.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use time::OffsetDateTime;

use crate::keys::{KeyStore, StoreError, Usage};
use crate::metrics::Metrics;

/// Shards keep the two proxy threads from queueing on one lock.
const SHARDS: usize = 16;
/// How often tallies are written.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Per-key request counts since the last flush.
pub struct UsageTally {
    shards: Vec<Mutex<HashMap<String, Usage>>>,
    hasher: RandomState,
}

impl Default for UsageTally {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
        }
    }
}

impl UsageTally {
    /// Counts one authenticated request for `key_id`.
    pub fn record(&self, key_id: &str, at: OffsetDateTime) {
        self.add(
            key_id,
            Usage {
                requests: 1,
                last_used_at: at,
            },
        );
    }

    fn add(&self, key_id: &str, usage: Usage) {
        let shard = &self.shards[(self.hasher.hash_one(key_id) as usize) % SHARDS];
        let Ok(mut map) = shard.lock() else { return };
        // The key is allocated once per flush interval, not per request.
        match map.get_mut(key_id) {
            Some(u) => {
                u.requests += usage.requests;
                u.last_used_at = u.last_used_at.max(usage.last_used_at);
            }
            None => {
                map.insert(key_id.to_owned(), usage);
            }
        }
    }

    /// Takes every tally, leaving zero behind.
    fn drain(&self) -> Vec<(String, Usage)> {
        let mut out = Vec::new();
        for shard in &self.shards {
            if let Ok(mut map) = shard.lock() {
                out.extend(map.drain());
            }
        }
        out
    }

    /// Writes what has been tallied. On failure the counts go back, to be retried next time.
    pub async fn flush(&self, store: &dyn KeyStore) -> Result<usize, StoreError> {
        let batch = self.drain();
        if batch.is_empty() {
            return Ok(0);
        }
        match store.add_usage(&batch).await {
            Ok(()) => Ok(batch.len()),
            Err(e) => {
                for (id, u) in batch {
                    self.add(&id, u);
                }
                Err(e)
            }
        }
    }
}

/// Flushes the tally every [`FLUSH_EVERY`] until shutdown; the final flush happens after the
/// server has stopped, so requests finishing during the grace period are counted too.
pub struct UsageFlusher {
    pub tally: Arc<UsageTally>,
    pub store: Arc<dyn KeyStore>,
    pub metrics: Metrics,
}

#[async_trait]
impl BackgroundService for UsageFlusher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            if let Err(e) = self.tally.flush(self.store.as_ref()).await {
                self.metrics.store_error("add_usage");
                tracing::warn!(error = %e, "writing usage counters failed; will retry");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{mint, AuthKind, EmbeddedStore, Environment, MasterKey, NewKey};

    #[tokio::test]
    async fn tallies_reach_the_store_in_one_flush_and_only_once() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn KeyStore> =
            Arc::new(EmbeddedStore::open(&dir.path().join("u.db")).unwrap());
        let (mk, _) = MasterKey::generate();
        let new = NewKey {
            owner: "acme".into(),
            name: "u".into(),
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
        };
        let t0 = OffsetDateTime::from_unix_timestamp(1_767_225_600).unwrap();
        let (record, _) = mint(&mk, new, t0);
        store.insert(&record).await.unwrap();
        let tally = UsageTally::default();
        for i in 0..5 {
            tally.record(&record.id, t0 + time::Duration::seconds(i));
        }
        tally.record("key_gone", t0);
        assert_eq!(tally.flush(store.as_ref()).await.unwrap(), 2);
        assert_eq!(
            tally.flush(store.as_ref()).await.unwrap(),
            0,
            "a flush drains the tally"
        );
        let got = store.get_by_id(&record.id).await.unwrap().unwrap();
        assert_eq!(got.total_requests, 5);
        assert_eq!(got.last_used_at, Some(t0 + time::Duration::seconds(4)));
        assert_eq!(
            got.updated_at, record.updated_at,
            "usage is not a change to the key"
        );
    }
}
