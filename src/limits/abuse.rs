//! Credential-stuffing defence: failed authentications counted per client address (IPv6 per
//! /64), and an address past `[abuse] max_failures` in `window` refused for `block_for` before
//! any key lookup or HMAC. The count lives in the store (shared by a fleet on Redis), which
//! counts and blocks in one atomic call and announces each block on the change feed; each
//! gateway also counts its own failures synchronously, so it blocks at the threshold without
//! waiting for the store's answer, and keeps the blocks it knows in memory, so a blocked
//! request costs no store call.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::keys::{ChangeSink, StoreError};

/// The store's answer to one failure.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recorded {
    /// How long the subject stays blocked (zero: not blocked).
    pub blocked_for: Duration,
    /// What is left of the store's counting window this failure fell in.
    pub window_left: Duration,
}

/// Where failure counts and blocks live.
#[async_trait]
pub trait AbuseStore: Send + Sync + 'static {
    /// Counts one failure of `subject` in the current `window`; when the count reaches `max`,
    /// blocks the subject for `block_for`, atomically with the count (a shared store also
    /// announces the block to every gateway).
    async fn record_failure(
        &self,
        subject: &str,
        window: Duration,
        max: u32,
        block_for: Duration,
    ) -> Result<Recorded, StoreError>;
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

/// [`subject`] read back (a block announced on the change feed): the address it counts by.
pub fn parse_subject(text: &str) -> Option<IpAddr> {
    let ip: IpAddr = match text.strip_suffix("/64") {
        Some(v6) => IpAddr::V6(v6.parse().ok()?),
        None => IpAddr::V4(text.parse().ok()?),
    };
    Some(counted(ip))
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
    ) -> Recorded {
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
        Recorded {
            blocked_for: entry
                .2
                .map_or(Duration::ZERO, |u| u.saturating_duration_since(now)),
            window_left: (entry.0 + window).saturating_duration_since(now),
        }
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
    ) -> Result<Recorded, StoreError> {
        Ok(self.record_at(subject, window, max, block_for, Instant::now()))
    }
}

/// The blocks this gateway knows of, by counted address, checked on every request without
/// I/O or allocation; and this gateway's own failures per counted address, counted the
/// moment a request fails, so the block starts at the threshold here even while the store's
/// answers are still on their way.
pub struct Blocks {
    until: moka::sync::Cache<IpAddr, Instant>,
    /// Per counted address: when its local window ends, and the failures in it. Each was
    /// also sent to the store, so this is a lower bound of the store's count (its window never
    /// outlives the store's, see [`Self::learn`]): a local block never comes earlier than the
    /// store's would.
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl Blocks {
    pub fn new(block_for: Duration) -> Self {
        Self {
            until: moka::sync::Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(block_for.max(Duration::from_secs(1)))
                .build(),
            failures: Mutex::default(),
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

    /// Counts one failure of `ip` here, synchronously; at `max` failures in `window` the
    /// address is blocked for `block_for` at once (unless it already is: failures during a
    /// block do not extend it, as in the store). Returns whether the threshold is reached.
    pub fn fail(&self, ip: IpAddr, window: Duration, max: u32, block_for: Duration) -> bool {
        self.fail_at(ip, window, max, block_for, Instant::now())
    }

    fn fail_at(
        &self,
        ip: IpAddr,
        window: Duration,
        max: u32,
        block_for: Duration,
        now: Instant,
    ) -> bool {
        let ip = counted(ip);
        let reached = {
            let mut map = self
                .failures
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if map.len() >= SWEEP_AT {
                map.retain(|_, (ends, _)| *ends > now);
            }
            let entry = map.entry(ip).or_insert((now + window, 0));
            if now >= entry.0 {
                *entry = (now + window, 0);
            }
            entry.1 = entry.1.saturating_add(1);
            entry.1 >= max
        };
        if reached && self.blocked(ip).is_none() {
            self.block(ip, block_for);
        }
        reached
    }

    /// The store's answer to a failure of `ip`: its block, if any, and how much is left of
    /// the store's window that failure fell in. The local window ends no later (the store's
    /// started at or before the local one), so local failures from two store windows never
    /// add up to a block the store would not set.
    pub fn learn(&self, ip: IpAddr, recorded: Recorded) {
        let now = Instant::now();
        if !recorded.blocked_for.is_zero() {
            self.block(ip, recorded.blocked_for);
        }
        if recorded.window_left.is_zero() {
            return;
        }
        let mut map = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(entry) = map.get_mut(&counted(ip)) {
            entry.0 = entry.0.min(now + recorded.window_left);
        }
    }
}

/// The change feed's sink with this gateway's [`Blocks`] beside it: key changes go to the
/// key cache, and a block another gateway's failure set (announced by the store) is known
/// here within the feed's delay, before that address fails here.
pub struct BlockFeed {
    pub keys: Arc<dyn ChangeSink>,
    pub blocks: Arc<Blocks>,
}

#[async_trait]
impl ChangeSink for BlockFeed {
    async fn changed(&self, public_keys: &[String], hashes: &[[u8; 32]]) {
        self.keys.changed(public_keys, hashes).await;
    }

    fn everything_may_have_changed(&self) {
        self.keys.everything_may_have_changed();
    }

    fn delivered_after(&self, lag: Duration) {
        self.keys.delivered_after(lag);
    }

    fn blocked(&self, subject: &str, for_: Duration) {
        match parse_subject(subject) {
            Some(ip) => self.blocks.block(ip, for_),
            None => tracing::debug!(subject, "unreadable block on the change feed skipped"),
        }
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
        let blocked = |r: Recorded| r.blocked_for;
        for i in 1..5 {
            let r = s.record_at("x", w, 5, b, t0);
            assert_eq!(r.blocked_for, Duration::ZERO, "failure {i}");
            assert_eq!(r.window_left, w, "failure {i}");
        }
        assert_eq!(
            blocked(s.record_at("x", w, 5, b, t0)),
            b,
            "the fifth blocks"
        );
        assert_eq!(
            blocked(s.record_at("y", w, 5, b, t0)),
            Duration::ZERO,
            "another address"
        );
        // A new window starts the count again (the block itself runs its course).
        let later = t0 + Duration::from_secs(400);
        assert_eq!(blocked(s.record_at("x", w, 5, b, later)), Duration::ZERO);
        // Four failures in one window and one in the next never block.
        let z0 = t0 + Duration::from_secs(1000);
        for _ in 0..4 {
            s.record_at("z", w, 5, b, z0);
        }
        let r = s.record_at("z", w, 5, b, z0 + Duration::from_secs(61));
        assert_eq!(blocked(r), Duration::ZERO);
        assert_eq!(r.window_left, w);
    }

    #[test]
    fn a_gateway_blocks_at_its_own_threshold_and_never_across_the_stores_windows() {
        let ip = IpAddr::from([203, 0, 113, 7]);
        let (w, b) = (Duration::from_secs(60), Duration::from_secs(300));
        let blocks = Blocks::new(b);
        let t0 = Instant::now();
        for i in 1..5 {
            assert!(!blocks.fail_at(ip, w, 5, b, t0), "failure {i}");
            assert_eq!(blocks.blocked(ip), None, "failure {i}");
        }
        // The fifth blocks at once, before any store answer.
        assert!(blocks.fail_at(ip, w, 5, b, t0));
        assert!(blocks.blocked(ip).is_some_and(|s| (299..=300).contains(&s)));

        // The store's window began before this gateway's first failure: once its answer says
        // so, the local window ends with the store's, and four failures on each side of that
        // end do not add up to a block.
        let other = IpAddr::from([203, 0, 113, 8]);
        for _ in 0..4 {
            blocks.fail_at(other, w, 5, b, t0);
        }
        blocks.learn(
            other,
            Recorded {
                blocked_for: Duration::ZERO,
                window_left: Duration::from_millis(50),
            },
        );
        let after = Instant::now() + Duration::from_millis(100);
        assert!(!blocks.fail_at(other, w, 5, b, after));
        assert_eq!(blocks.blocked(other), None);
        // The store's block is taken as is (a block it announced, too).
        blocks.learn(
            other,
            Recorded {
                blocked_for: Duration::from_secs(30),
                window_left: w,
            },
        );
        assert!(blocks
            .blocked(other)
            .is_some_and(|s| (29..=30).contains(&s)));
        assert_eq!(
            parse_subject("2001:db8:1:2::/64"),
            Some(counted("2001:db8:1:2::9".parse().unwrap_or(ip)))
        );
        assert_eq!(parse_subject("203.0.113.7"), Some(ip));
        assert_eq!(parse_subject("2001:db8::1"), None, "v6 only as a /64");
        assert_eq!(parse_subject("junk/64"), None);
    }
}
