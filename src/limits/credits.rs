//! Credits (quotas): a metered key's `remaining` units, spent by each request's route `cost`,
//! topped up atomically by operators, optionally refilled to a fixed amount every UTC day or
//! month. One small trait; the counter lives beside the key record, never in it, so a spend
//! is one counter operation and not a record write.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::keys::StoreError;

/// No key holds more than this many credits (exact in every store's arithmetic).
pub const MAX_CREDITS: u64 = 1_000_000_000_000_000;

/// How often `remaining` is set back to `amount`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RefillInterval {
    Daily,
    Monthly,
}

/// `{"interval": "daily" | "monthly", "amount": N}`: at the start of each UTC day or month,
/// `remaining` becomes `amount` (what was left is not carried over).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refill {
    pub interval: RefillInterval,
    pub amount: u64,
}

/// A refill as of now: the current period's number and the amount it starts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefillNow {
    pub period: u64,
    pub amount: u64,
}

impl Refill {
    pub fn at(&self, now: OffsetDateTime) -> RefillNow {
        let now = now.to_offset(time::UtcOffset::UTC);
        let period = match self.interval {
            RefillInterval::Daily => u64::try_from(now.unix_timestamp() / 86_400).unwrap_or(0),
            RefillInterval::Monthly => {
                u64::try_from(i64::from(now.year()) * 12 + i64::from(u8::from(now.month())) - 1)
                    .unwrap_or(0)
            }
        };
        RefillNow {
            period,
            amount: self.amount,
        }
    }
}

/// An operator's change to `remaining`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CreditOp {
    Add(u64),
    Set(u64),
}

/// What a spend did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spent {
    /// There were enough credits and they are spent; otherwise nothing changed.
    pub ok: bool,
    pub remaining: u64,
}

#[async_trait]
pub trait CreditStore: Send + Sync + 'static {
    /// Runs `op` on the key's counter (absent reads as 0) after a due refill, atomically;
    /// `remaining` after it, and whether it succeeded (a spend without enough changes nothing).
    async fn credit(
        &self,
        key_id: &str,
        refill: Option<RefillNow>,
        op: Op,
    ) -> Result<(u64, bool), StoreError>;

    /// Drops the counter (the key is deleted or no longer metered).
    async fn forget(&self, key_id: &str) -> Result<(), StoreError>;

    /// Spends `cost` if `remaining` holds it, else nothing.
    async fn spend(
        &self,
        key_id: &str,
        cost: u64,
        refill: Option<RefillNow>,
    ) -> Result<Spent, StoreError> {
        let (remaining, ok) = self.credit(key_id, refill, Op::Spend(cost)).await?;
        Ok(Spent { ok, remaining })
    }

    /// Gives back what a request spent (its upstream failed, `refund_on_5xx`).
    async fn refund(&self, key_id: &str, cost: u64) -> Result<(), StoreError> {
        self.credit(key_id, None, Op::Refund(cost)).await.map(drop)
    }

    /// Adds to or sets `remaining` (capped at [`MAX_CREDITS`]); the new value.
    async fn adjust(
        &self,
        key_id: &str,
        op: CreditOp,
        refill: Option<RefillNow>,
    ) -> Result<u64, StoreError> {
        self.credit(key_id, refill, Op::Adjust(op))
            .await
            .map(|(r, _)| r)
    }

    /// `remaining` now (0 for a key never given credits).
    async fn remaining(&self, key_id: &str, refill: Option<RefillNow>) -> Result<u64, StoreError> {
        self.credit(key_id, refill, Op::Read).await.map(|(r, _)| r)
    }
}

/// Until a store is given: every key has 0 credits, so a metered key is refused, never let
/// through uncounted.
pub struct NoCredits;

#[async_trait]
impl CreditStore for NoCredits {
    async fn credit(
        &self,
        _key_id: &str,
        _refill: Option<RefillNow>,
        op: Op,
    ) -> Result<(u64, bool), StoreError> {
        Ok((0, matches!(op, Op::Read)))
    }

    async fn forget(&self, _key_id: &str) -> Result<(), StoreError> {
        Ok(())
    }
}

/// The one credit rule both stores run: from the stored `(remaining, period)`, apply a due
/// refill, then the operation; the new state and whether it succeeded. The Redis script is
/// this function.
pub fn apply(stored: (u64, u64), refill: Option<RefillNow>, op: Op) -> ((u64, u64), bool) {
    let (mut remaining, mut period) = stored;
    if let Some(r) = refill {
        if period < r.period {
            remaining = r.amount;
            period = r.period;
        }
    }
    let ok = match op {
        Op::Spend(n) if remaining >= n => {
            remaining -= n;
            true
        }
        Op::Spend(_) => false,
        Op::Refund(n) | Op::Adjust(CreditOp::Add(n)) => {
            remaining = remaining.saturating_add(n).min(MAX_CREDITS);
            true
        }
        Op::Adjust(CreditOp::Set(n)) => {
            remaining = n.min(MAX_CREDITS);
            true
        }
        Op::Read => true,
    };
    ((remaining, period), ok)
}

/// One operation on a counter, as [`apply`] and the Redis script take it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Spend(u64),
    Refund(u64),
    Adjust(CreditOp),
    Read,
}

impl Op {
    /// The script's mode and amount.
    pub fn wire(self) -> (&'static str, u64) {
        match self {
            Self::Spend(n) => ("spend", n),
            Self::Refund(n) => ("add", n),
            Self::Adjust(CreditOp::Add(n)) => ("add", n),
            Self::Adjust(CreditOp::Set(n)) => ("set", n),
            Self::Read => ("get", 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spends_never_go_below_zero_and_refills_reset() {
        let ((r, _), ok) = apply((10, 0), None, Op::Spend(10));
        assert!(ok);
        assert_eq!(r, 0);
        let ((r, _), ok) = apply((3, 0), None, Op::Spend(4));
        assert!(!ok);
        assert_eq!(r, 3, "a refused spend takes nothing");
        let day = RefillNow {
            period: 20_000,
            amount: 100,
        };
        let ((r, p), ok) = apply((2, 19_999), Some(day), Op::Spend(5));
        assert!(ok);
        assert_eq!((r, p), (95, 20_000), "a new day starts at the amount");
        let ((r, _), _) = apply((95, 20_000), Some(day), Op::Spend(5));
        assert_eq!(r, 90, "the same day does not refill again");
        let ((r, _), _) = apply((1, 0), None, Op::Adjust(CreditOp::Add(u64::MAX)));
        assert_eq!(r, MAX_CREDITS);
        let ((r, _), _) = apply((1, 0), None, Op::Adjust(CreditOp::Set(7)));
        assert_eq!(r, 7);
    }

    #[test]
    fn periods_are_utc_days_and_months() {
        let t = time::macros::datetime!(2026-11-30 23:59:59 UTC);
        let daily = Refill {
            interval: RefillInterval::Daily,
            amount: 1,
        };
        let monthly = Refill {
            interval: RefillInterval::Monthly,
            amount: 1,
        };
        let next = t + time::Duration::seconds(1);
        assert_eq!(daily.at(next).period, daily.at(t).period + 1);
        assert_eq!(monthly.at(next).period, monthly.at(t).period + 1);
        assert_eq!(monthly.at(t).period, 2026 * 12 + 10);
        let offset = t.to_offset(time::macros::offset!(+2));
        assert_eq!(daily.at(offset), daily.at(t), "UTC whatever the offset");
    }
}
