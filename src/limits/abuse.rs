//! Credential-stuffing defence: failed authentications counted per client address (IPv6 per
//! /64), and an address past `[abuse] max_failures` in `window` refused for `block_for` before
//! any key lookup or HMAC. The count lives in the store (shared by a fleet on Redis); each
//! gateway keeps the blocks it has learnt in memory, so a blocked request costs no store call.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::keys::StoreError;

/// Where failure counts and blocks live.
#[async_trait]
pub trait AbuseStore: Send + Sync + 'static {
    /// Counts one failure of `subject` in the current `window`; when the count reaches `max`,
    /// blocks the subject for `block_for`. Returns how long the subject stays blocked (zero:
    /// not blocked).
    async fn record_failure(
        &self,
        subject: &str,
        window: Duration,
        max: u32,
        block_for: Duration,
    ) -> Result<Duration, StoreError>;
}

/// The address failures are counted against: IPv4 as is, IPv6 by its /64 (one subscriber's
/// allocation: counting single v6 addresses would let one host rotate through 2^64 of them).
pub fn counted(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
    }
}

/// [`counted`] as the store's subject text (`2001:db8:1:2::/64`).
pub fn subject(ip: IpAddr) -> String {
    match counted(ip) {
        IpAddr::V4(v4) => v4.to_string(),
        v6 => format!("{v6}/64"),
    }
}

/// The in-process store (embedded): fixed windows per subject, swept as they expire.
#[derive(Default)]
pub struct InProcessAbuse {
    state: Mutex<HashMap<String, Count>>,
}

/// One subject's window start, failures in it, and block end.
type Count = (Instant, u32, Option<Instant>);

const SWEEP_AT: usize = 100_000;

impl InProcessAbuse {
    pub fn record_at(
        &self,
        subject: &str,
        window: Duration,
        max: u32,
        block_for: Duration,
        now: Instant,
    ) -> Duration {
        let mut map = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= SWEEP_AT {
            map.retain(|_, (start, _, until)| {
                now.duration_since(*start) < window || until.is_some_and(|u| u > now)
            });
        }
        let entry = map.entry(subject.to_owned()).or_insert((now, 0, None));
        if now.duration_since(entry.0) >= window {
            entry.0 = now;
            entry.1 = 0;
        }
        entry.1 = entry.1.saturating_add(1);
        if entry.1 >= max && entry.2.is_none_or(|u| u <= now) {
            entry.2 = Some(now + block_for);
        }
        entry
            .2
            .map_or(Duration::ZERO, |u| u.saturating_duration_since(now))
    }
}

#[async_trait]
impl AbuseStore for InProcessAbuse {
    async fn record_failure(
        &self,
        subject: &str,
        window: Duration,
        max: u32,
        block_for: Duration,
    ) -> Result<Duration, StoreError> {
        Ok(self.record_at(subject, window, max, block_for, Instant::now()))
    }
}

/// The blocks this gateway knows of, by counted address: checked on every request without
/// I/O or allocation.
pub struct Blocks {
    until: moka::sync::Cache<IpAddr, Instant>,
}

impl Blocks {
    pub fn new(block_for: Duration) -> Self {
        Self {
            until: moka::sync::Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(block_for.max(Duration::from_secs(1)))
                .build(),
        }
    }

    /// Seconds the address stays blocked, if it is.
    pub fn blocked(&self, ip: IpAddr) -> Option<u64> {
        let until = self.until.get(&counted(ip))?;
        let left = until.saturating_duration_since(Instant::now());
        (!left.is_zero()).then(|| left.as_secs().max(1))
    }

    pub fn block(&self, ip: IpAddr, for_: Duration) {
        self.until.insert(counted(ip), Instant::now() + for_);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v6_addresses_count_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1"
            .parse()
            .unwrap_or(IpAddr::from([0; 16]));
        let b: IpAddr = "2001:db8:1:2:ffff::9"
            .parse()
            .unwrap_or(IpAddr::from([0; 16]));
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap_or(IpAddr::from([0; 16]));
        assert_eq!(subject(a), subject(b));
        assert_eq!(subject(a), "2001:db8:1:2::/64");
        assert_ne!(subject(a), subject(c));
        assert_eq!(subject(IpAddr::from([10, 0, 0, 1])), "10.0.0.1");
        let blocks = Blocks::new(Duration::from_secs(60));
        blocks.block(a, Duration::from_secs(30));
        assert!(blocks.blocked(b).is_some_and(|s| (29..=30).contains(&s)));
        assert_eq!(blocks.blocked(c), None);
    }

    #[test]
    fn the_block_starts_at_the_threshold_and_windows_reset() {
        let s = InProcessAbuse::default();
        let (w, b) = (Duration::from_secs(60), Duration::from_secs(300));
        let t0 = Instant::now();
        for i in 1..5 {
            assert_eq!(s.record_at("x", w, 5, b, t0), Duration::ZERO, "failure {i}");
        }
        assert_eq!(s.record_at("x", w, 5, b, t0), b, "the fifth blocks");
        assert_eq!(
            s.record_at("y", w, 5, b, t0),
            Duration::ZERO,
            "another address"
        );
        // A new window starts the count again (the block itself runs its course).
        let later = t0 + Duration::from_secs(400);
        assert_eq!(s.record_at("x", w, 5, b, later), Duration::ZERO);
        // Four failures in one window and one in the next never block.
        let z0 = t0 + Duration::from_secs(1000);
        for _ in 0..4 {
            s.record_at("z", w, 5, b, z0);
        }
        assert_eq!(
            s.record_at("z", w, 5, b, z0 + Duration::from_secs(61)),
            Duration::ZERO
        );
    }
}
