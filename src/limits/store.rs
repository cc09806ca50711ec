//! Where rate-limit state lives: one small trait, GCRA state per (subject, limit), checked and
//! moved for all of a request's limits at once. In process for the embedded store; one Lua
//! script (one round trip) on Redis, so a fleet shares each limit exactly.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

use super::{gcra, Decision, LimitState, RateLimit, SLACK_US};
use crate::keys::StoreError;

/// keygate's epoch for limit state: 2026-01-01T00:00:00Z. Times are µs since then, so the
/// doubles both stores compute in keep sub-µs precision for decades.
pub const EPOCH_SECS: i64 = 1_767_225_600;

/// One limit of a request: where its state lives, and the limit.
#[derive(Clone, Debug)]
pub struct Bucket<'a> {
    /// The state's key; [`bucket_key`] makes it.
    pub key: String,
    pub limit: &'a RateLimit,
    /// Shared by all keys of the owner (`[[owners]]`), not the key's own.
    pub owner_wide: bool,
}

impl Bucket<'_> {
    /// The limit's name on the wire: an owner's limits read `owner:<name>`.
    pub fn label(&self) -> std::borrow::Cow<'_, str> {
        if self.owner_wide {
            format!("owner:{}", self.limit.name).into()
        } else {
            self.limit.name.as_str().into()
        }
    }
}

/// A request's limit state key. Every key of one owner shares a Redis Cluster hash slot, so
/// one script can check a key's limits and (later) its owner's together.
pub fn bucket_key(owner: &str, subject: &str, name: &str) -> String {
    format!("{{kgrl:{owner}}}:{subject}:{name}")
}

#[async_trait]
pub trait RateLimitStore: Send + Sync + 'static {
    /// Checks every bucket for room for `cost` units and, only when all have it, spends them.
    async fn acquire(&self, buckets: &[Bucket<'_>], cost: u64) -> Result<Decision, StoreError> {
        self.acquire_lease(buckets, cost, 0).await.map(|(d, _)| d)
    }

    /// [`Self::acquire`], and when it passes, up to `lease` more units of every bucket for
    /// the caller to spend locally ([`super::gcra_lease`] decides); the units leased.
    async fn acquire_lease(
        &self,
        buckets: &[Bucket<'_>],
        cost: u64,
        lease: u64,
    ) -> Result<(Decision, u64), StoreError>;

    /// Gives back `units` of a lease that were not spent.
    async fn release(&self, buckets: &[Bucket<'_>], units: u64) -> Result<(), StoreError>;
}

/// What each limit has left, from the TATs after a check (shared by both stores).
pub fn states(limits: &[&RateLimit], tats: &[f64], now_us: f64) -> Vec<LimitState> {
    limits
        .iter()
        .zip(tats)
        .map(|(l, tat)| {
            let used = (tat.max(now_us) - now_us).max(0.0);
            let remaining = ((l.window_us() - used + SLACK_US) / l.interval_us())
                .floor()
                .max(0.0) as u64;
            LimitState {
                remaining: remaining.min(l.limit),
                reset_secs: (used / 1e6).ceil() as u64,
            }
        })
        .collect()
}

/// The embedded store's limits: GCRA state in memory, under one lock (a check is a few
/// float operations). State does not survive a restart: a restarted gateway starts every
/// limit with its burst available.
#[derive(Default)]
pub struct InProcessLimits {
    tats: Mutex<HashMap<String, f64>>,
}

/// Past this many entries, idle ones are swept (an idle entry reads the same as none).
const SWEEP_AT: usize = 100_000;

impl InProcessLimits {
    /// In process a lease saves nothing: none is ever granted.
    pub fn acquire_at(&self, buckets: &[Bucket<'_>], cost: u64, now_us: f64) -> Decision {
        let limits: Vec<&RateLimit> = buckets.iter().map(|b| b.limit).collect();
        let mut map = self
            .tats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut tats: Vec<f64> = buckets
            .iter()
            .map(|b| map.get(&b.key).copied().unwrap_or(0.0))
            .collect();
        let decision = gcra(&limits, &mut tats, cost, now_us);
        if decision.allowed {
            if map.len() >= SWEEP_AT {
                map.retain(|_, tat| *tat > now_us);
            }
            for (b, tat) in buckets.iter().zip(tats) {
                map.insert(b.key.clone(), tat);
            }
        }
        decision
    }
}

/// Now, in µs since [`EPOCH_SECS`].
pub fn now_us() -> f64 {
    let now = time::OffsetDateTime::now_utc();
    let since = now - time::OffsetDateTime::from_unix_timestamp(EPOCH_SECS).unwrap_or(now);
    since.whole_microseconds() as f64
}

#[async_trait]
impl RateLimitStore for InProcessLimits {
    async fn acquire_lease(
        &self,
        buckets: &[Bucket<'_>],
        cost: u64,
        _lease: u64,
    ) -> Result<(Decision, u64), StoreError> {
        Ok((self.acquire_at(buckets, cost, now_us()), 0))
    }

    /// Every limit's TAT moves back by `units` intervals, as the Redis store's release does.
    async fn release(&self, buckets: &[Bucket<'_>], units: u64) -> Result<(), StoreError> {
        let mut map = self
            .tats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for b in buckets {
            if let Some(tat) = map.get_mut(&b.key) {
                *tat -= units as f64 * b.limit.interval_us();
            }
        }
        Ok(())
    }
}
