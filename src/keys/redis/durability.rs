//! `store.nonce_durability = "replicated"`: a nonce counts as used only once a replica holds
//! it, so a primary lost right after accepting a request cannot take the nonce with it and
//! let the promoted replica accept the same request again.
//!
//! The nonce's `SET … NX PX` and a `WAIT 1 <timeout>` go in one pipeline (one round trip).
//! `WAIT` blocks the connection that sent it until a replica acknowledges or the timeout
//! passes; on the store's one multiplexed connection every other call (key lookups, limits,
//! scripts) would queue behind it. So these pipelines use a small pool of their own
//! connections, [`POOL_SIZE`] of them, taken in turn. On a cluster the pipeline goes where its
//! first command's key lives (redis-rs routes a pipeline by its first keyed command, and a
//! bare `WAIT` — routed to every master, minimum taken — would not be the nonce's master).
//!
//! Admin writes (the key-record script, the signing-keys save) go through the same pool when
//! "replicated" is set (single server and Sentinel; not yet on a cluster), followed by `WAIT` on the connection that wrote: `WAIT` counts only
//! the writes its own connection sent, and on the store's main connection it would hold every
//! key lookup behind it for up to `replication_timeout`. No acknowledgement in time:
//! `store_unavailable` (the write may have landed; the admin API's writes are safe to retry).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::breaker::Guarded;
use super::{unavailable, Conn, RedisStore, RedisTarget};
use crate::keys::StoreError;

/// What a nonce check waits for before the request goes upstream (`store.nonce_durability`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NonceDurability {
    /// The primary's acknowledgement (replication is asynchronous): the default.
    #[default]
    Async,
    /// The primary's and at least one replica's, within `timeout`
    /// (`store.replication_timeout`); none in time: `store_unavailable`.
    Replicated { timeout: Duration },
}

/// The longest `store.replication_timeout`: below the store call timeout, so a `WAIT` that
/// runs out answers 503 on its own terms instead of tripping the call timeout.
pub const MAX_REPLICATION_TIMEOUT: Duration = Duration::from_millis(500);

/// Connections for nonce + `WAIT` pipelines. Each `WAIT` holds its connection for about one
/// replica acknowledgement (a loopback or LAN round trip): eight keep a busy gateway's nonce
/// checks from queueing behind each other (measured in docs/operations.md).
pub(super) const POOL_SIZE: usize = 8;

pub(super) struct NoncePool {
    conns: Vec<Guarded<Conn>>,
    next: AtomicUsize,
    timeout: Duration,
}

impl NoncePool {
    /// The next pool connection, for a write that [`Self::acknowledged`] then waits on.
    pub(super) fn next_conn(&self) -> Guarded<Conn> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        self.conns[i].clone()
    }

    /// `WAIT 1 <timeout>` on `conn`, after `what` was written on it: a replica holds it, or
    /// `store_unavailable`. Single server and Sentinel only (`RedisStore::admin_durability`).
    pub(super) async fn acknowledged(
        &self,
        conn: &mut Guarded<Conn>,
        what: &str,
    ) -> Result<(), StoreError> {
        let timeout_ms = u64::try_from(self.timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let acknowledged: u64 = redis::cmd("WAIT")
            .arg(1)
            .arg(timeout_ms)
            .query_async(conn)
            .await
            .map_err(|e| unavailable(&e))?;
        if acknowledged < 1 {
            return Err(StoreError::Unavailable(format!(
                "no replica acknowledged the {what} within {:?} \
                 (store.nonce_durability = \"replicated\"); it may have been written",
                self.timeout
            )));
        }
        Ok(())
    }

    /// Records `key` (`SET NX PX ttl_ms`) and waits for one replica. `Ok(false)`: already used.
    pub(super) async fn use_nonce(&self, key: &str, ttl_ms: u64) -> Result<bool, StoreError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        let mut conn = self.conns[i].clone();
        let timeout_ms = u64::try_from(self.timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let (set, acknowledged): (Option<String>, u64) = redis::pipe()
            .cmd("SET")
            .arg(key)
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms)
            .cmd("WAIT")
            .arg(1)
            .arg(timeout_ms)
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        if set.is_none() {
            return Ok(false);
        }
        if acknowledged < 1 {
            // The nonce stays written: the client retries with a new one.
            return Err(StoreError::Unavailable(format!(
                "no replica acknowledged the nonce within {:?} \
                 (store.nonce_durability = \"replicated\")",
                self.timeout
            )));
        }
        Ok(true)
    }
}

impl RedisStore {
    /// Applies `store.nonce_durability`: `Replicated` opens the nonce pool on `target` (the
    /// one this store was connected to, with the same CA certificates).
    pub fn with_nonce_durability(
        mut self,
        durability: NonceDurability,
        target: &RedisTarget,
        ca_pem: Option<&[u8]>,
    ) -> Result<Self, StoreError> {
        let NonceDurability::Replicated { timeout } = durability else {
            self.nonces = None;
            return Ok(self);
        };
        let Some(runtime) = &self.runtime else {
            return Err(StoreError::Unavailable("the Redis runtime is gone".into()));
        };
        let breaker = Arc::clone(&self.breaker);
        let feed = self.feed.clone();
        let connecting = async {
            let mut conns = Vec::with_capacity(POOL_SIZE);
            for _ in 0..POOL_SIZE {
                let inner = super::connect_conn(target, &feed, ca_pem).await?;
                conns.push(Guarded {
                    inner,
                    breaker: Arc::clone(&breaker),
                });
            }
            Ok::<_, StoreError>(conns)
        };
        let conns = std::thread::scope(|s| {
            // block_on must not run on a thread that is already inside a runtime.
            s.spawn(|| runtime.block_on(connecting))
                .join()
                .map_err(|_| StoreError::Unavailable("Redis connect panicked".into()))
        })??;
        self.nonces = Some(NoncePool {
            conns,
            next: AtomicUsize::new(0),
            timeout,
        });
        Ok(self)
    }
}
