//! Lease mode (`[limits] mode = "lease"`): a gateway takes a slice of a request's limits from
//! the shared store along with one request, and spends it locally until the slice is gone or
//! `lease_ttl` passes, giving back what it did not spend. A key far below its limits then
//! costs one round trip per slice instead of one per request. Exactness holds because every
//! unit spent locally was taken from the shared state first, and the store grants a slice
//! only while every limit keeps half its burst after it: near a limit, every request goes to
//! the store, as in exact mode.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use super::store::{Bucket, RateLimitStore};
use super::{Decision, LimitState, RateLimit};
use crate::keys::StoreError;

/// Units of one request's limits held locally.
struct Lease {
    units: u64,
    until: Instant,
    /// What the limits had left when the slice was taken, less what was spent since (for the
    /// `RateLimit` header).
    states: Vec<LimitState>,
    /// The limits, to give units back when the lease ends unspent.
    buckets: Vec<(String, RateLimit, bool)>,
}

/// A [`RateLimitStore`] that leases from another.
pub struct Leased {
    inner: Arc<dyn RateLimitStore>,
    fraction: f64,
    ttl: Duration,
    leases: Mutex<HashMap<String, Lease>>,
}

impl Leased {
    pub fn new(inner: Arc<dyn RateLimitStore>, fraction: f64, ttl: Duration) -> Self {
        Self {
            inner,
            fraction,
            ttl,
            leases: Mutex::new(HashMap::new()),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Lease>> {
        self.leases
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Units a slice holds: `fraction` of the smallest limit, in whole requests of `cost`.
    fn slice(&self, buckets: &[Bucket<'_>], cost: u64) -> u64 {
        let smallest = buckets.iter().map(|b| b.limit.limit).min().unwrap_or(0);
        let units = (smallest as f64 * self.fraction).floor() as u64;
        // A slice for fewer than two requests saves nothing.
        if units >= 2 * cost.max(1) {
            units - units % cost.max(1)
        } else {
            0
        }
    }

    /// Returns what is left of an ended lease to the shared state.
    async fn give_back(&self, lease: Lease) {
        let units = lease.units;
        if units == 0 {
            return;
        }
        let buckets: Vec<Bucket<'_>> = lease
            .buckets
            .iter()
            .map(|(key, limit, owner_wide)| Bucket {
                key: key.clone(),
                limit,
                owner_wide: *owner_wide,
            })
            .collect();
        if let Err(e) = self.inner.release(&buckets, units).await {
            // Unreturned units are spent, never granted twice: the limit errs on the strict side.
            tracing::debug!(error = %e, units, "leased units not given back");
        }
    }

    /// Gives back every lease past its time (idle keys' slices).
    pub async fn sweep(&self) {
        let now = Instant::now();
        let expired: Vec<Lease> = {
            let mut table = self.table();
            let ids: Vec<String> = table
                .iter()
                .filter(|(_, l)| l.until <= now)
                .map(|(id, _)| id.clone())
                .collect();
            ids.iter().filter_map(|id| table.remove(id)).collect()
        };
        for lease in expired {
            self.give_back(lease).await;
        }
    }
}

/// The lease table's key for a request's set of limits.
fn lease_id(buckets: &[Bucket<'_>]) -> String {
    let mut id = String::new();
    for b in buckets {
        id.push_str(&b.key);
        id.push('\n');
    }
    id
}

#[async_trait]
impl RateLimitStore for Leased {
    async fn acquire_lease(
        &self,
        buckets: &[Bucket<'_>],
        cost: u64,
        _lease: u64,
    ) -> Result<(Decision, u64), StoreError> {
        let id = lease_id(buckets);
        let now = Instant::now();
        let ended = {
            let mut table = self.table();
            match table.get_mut(&id) {
                Some(l) if l.until > now && l.units >= cost => {
                    l.units -= cost;
                    for s in &mut l.states {
                        s.remaining = s.remaining.saturating_sub(cost);
                    }
                    let decision = Decision {
                        allowed: true,
                        states: l.states.clone(),
                        refused_by: None,
                    };
                    return Ok((decision, 0));
                }
                Some(_) => table.remove(&id),
                None => None,
            }
        };
        if let Some(ended) = ended {
            self.give_back(ended).await;
        }
        let (mut decision, granted) = self
            .inner
            .acquire_lease(buckets, cost, self.slice(buckets, cost))
            .await?;
        if granted > 0 {
            // The slice is this client's to spend: it counts as remaining.
            for (s, b) in decision.states.iter_mut().zip(buckets) {
                s.remaining = (s.remaining + granted).min(b.limit.limit);
            }
            let mut table = self.table();
            let lease = table.entry(id).or_insert_with(|| Lease {
                units: 0,
                until: now,
                states: Vec::new(),
                buckets: buckets
                    .iter()
                    .map(|b| (b.key.clone(), b.limit.clone(), b.owner_wide))
                    .collect(),
            });
            // Two requests may have taken slices at once: both are kept, none lost.
            lease.units += granted;
            lease.until = now + self.ttl;
            lease.states.clone_from(&decision.states);
        }
        Ok((decision, 0))
    }

    async fn release(&self, buckets: &[Bucket<'_>], units: u64) -> Result<(), StoreError> {
        self.inner.release(buckets, units).await
    }
}

/// Gives back idle slices every `lease_ttl`.
pub struct LeaseSweeper(pub Arc<Leased>);

#[async_trait]
impl BackgroundService for LeaseSweeper {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(self.0.ttl.max(Duration::from_millis(10)));
        loop {
            tokio::select! {
                _ = tick.tick() => self.0.sweep().await,
                _ = shutdown.changed() => {
                    // Hand every slice back before going: the fleet gets its units.
                    let all: Vec<Lease> = self.0.table().drain().map(|(_, l)| l).collect();
                    for lease in all {
                        self.0.give_back(lease).await;
                    }
                    return;
                }
            }
        }
    }
}
