//! Rate limits: what a limit is (`{name, limit, window}`), how a list of them is validated,
//! and GCRA — the one algorithm both stores run, here as a pure function of time so it is
//! tested without a clock and mirrored line for line by the Redis script.
//!
//! GCRA (the generic cell rate algorithm, as in redis-cell) keeps one number per limit: the
//! theoretical arrival time (TAT) of the next request. A limit of `L` per `W` spaces requests
//! `T = W / L` apart and tolerates a burst of `L` after idleness: a request of cost `c` passes
//! when `max(TAT, now) + c·T - now <= W`, and then moves TAT there. Over any interval of
//! length `t` at most `L + L·t/W` requests pass (the burst plus the rate), whatever the number
//! of gateways, because every gateway moves the same TAT atomically.

pub mod abuse;
pub mod credits;
pub mod lease;
pub mod store;

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// At most this many limits on one key, route or owner.
pub const MAX_LIMITS: usize = 8;
const MAX_LIMIT: u64 = 1_000_000_000;
const MIN_WINDOW: Duration = Duration::from_secs(1);
const MAX_WINDOW: Duration = Duration::from_secs(366 * 86_400);

/// One limit: at most `limit` units per `window` (a unit is a request of cost 1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub name: String,
    pub limit: u64,
    #[serde(with = "window_text")]
    pub window: Duration,
}

impl RateLimit {
    /// Microseconds between two units at the sustained rate.
    pub fn interval_us(&self) -> f64 {
        self.window.as_micros() as f64 / self.limit.max(1) as f64
    }

    pub fn window_us(&self) -> f64 {
        self.window.as_micros() as f64
    }

    /// Whether this limit is no more generous than `other`: no larger burst and no faster rate.
    pub fn within(&self, other: &Self) -> bool {
        let rate = u128::from(self.limit) * other.window.as_millis();
        let theirs = u128::from(other.limit) * self.window.as_millis();
        self.limit <= other.limit && rate <= theirs
    }
}

/// `1s`, `5m`, `1h`, `1d` — the largest whole unit, as people write windows.
pub fn window_string(d: Duration) -> String {
    let s = d.as_secs();
    if d.subsec_nanos() != 0 {
        format!("{}ms", d.as_millis())
    } else if s % 86_400 == 0 {
        format!("{}d", s / 86_400)
    } else if s % 3600 == 0 {
        format!("{}h", s / 3600)
    } else if s % 60 == 0 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

mod window_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::window_string(*d))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|_| {
            serde::de::Error::custom(format!(
                "{text:?} is not a duration like \"1s\", \"10m\" or \"1d\""
            ))
        })
    }
}

/// Every problem of a list of limits, as (path under `at`, message).
pub fn check(limits: &[RateLimit]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if limits.len() > MAX_LIMITS {
        out.push((String::new(), format!("at most {MAX_LIMITS} limits")));
    }
    for (i, l) in limits.iter().enumerate() {
        let valid_name = !l.name.is_empty()
            && l.name.len() <= 32
            && l.name
                .bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'));
        if !valid_name {
            out.push((
                format!("[{i}].name"),
                "must be 1-32 characters of a-z 0-9 _ -".into(),
            ));
        } else if limits[..i].iter().any(|o| o.name == l.name) {
            out.push((format!("[{i}].name"), "names must be unique".into()));
        }
        if !(1..=MAX_LIMIT).contains(&l.limit) {
            out.push((format!("[{i}].limit"), format!("must be 1 to {MAX_LIMIT}")));
        }
        if !(MIN_WINDOW..=MAX_WINDOW).contains(&l.window) {
            out.push((format!("[{i}].window"), "must be from 1s to 366d".into()));
        }
    }
    out
}

/// Rounding allowance of the floating-point TAT arithmetic (µs), here and in the script: a
/// burst's last request must not be refused for the sum of its intervals' rounding errors.
pub const SLACK_US: f64 = 1.0;

/// One limit's state after a check.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LimitState {
    /// Units that could still pass now.
    pub remaining: u64,
    /// Seconds until the bucket is full again (the draft's `t` for `RateLimit`).
    pub reset_secs: u64,
}

/// The answer for all of a request's limits at once.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// All limits had room: every TAT moved. Otherwise none did.
    pub allowed: bool,
    /// Per limit, in the order asked.
    pub states: Vec<LimitState>,
    /// When refused: the limit that refused (index) and the seconds until it would pass.
    pub refused_by: Option<(usize, u64)>,
}

/// GCRA over several limits, all or nothing: `tats` (µs, 0 for none yet) are read and, when
/// every limit has room for `cost`, replaced. The Redis script is this function.
pub fn gcra(limits: &[&RateLimit], tats: &mut [f64], cost: u64, now_us: f64) -> Decision {
    gcra_lease(limits, tats, cost, 0, now_us).0
}

/// [`gcra`], and when the request passes, a lease: `lease` more units taken from every limit
/// at once for the caller to spend locally — granted only if each limit keeps at least half
/// its burst after it, so leases never stand between a client and its last units. Returns
/// the decision and the units leased (0 or `lease`). The Redis script is this function.
pub fn gcra_lease(
    limits: &[&RateLimit],
    tats: &mut [f64],
    cost: u64,
    lease: u64,
    now_us: f64,
) -> (Decision, u64) {
    let mut refused_by: Option<(usize, u64)> = None;
    let mut next = Vec::with_capacity(limits.len());
    for (i, (l, tat)) in limits.iter().zip(tats.iter()).enumerate() {
        let t = l.interval_us();
        let new_tat = tat.max(now_us) + cost as f64 * t;
        let over = new_tat - now_us - l.window_us();
        if over > SLACK_US {
            let wait = (over / 1e6).ceil() as u64;
            if refused_by.is_none_or(|(_, w0)| wait > w0) {
                refused_by = Some((i, wait.max(1)));
            }
        }
        next.push(new_tat);
    }
    let allowed = refused_by.is_none();
    let mut granted = 0;
    if allowed {
        let leased = |(l, tat): (&&RateLimit, &f64)| tat + lease as f64 * l.interval_us();
        let room = limits
            .iter()
            .zip(&next)
            .all(|(l, tat)| leased((l, tat)) - now_us <= l.window_us() / 2.0);
        if lease > 0 && room {
            for (i, l) in limits.iter().enumerate() {
                next[i] = leased((l, &next[i]));
            }
            granted = lease;
        }
        tats.copy_from_slice(&next);
    }
    let states = store::states(limits, tats, now_us);
    (
        Decision {
            allowed,
            states,
            refused_by,
        },
        granted,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(l: &[RateLimit], tats: &mut [f64], cost: u64, now: f64) -> Decision {
        gcra(&l.iter().collect::<Vec<_>>(), tats, cost, now)
    }

    fn limit(name: &str, limit: u64, secs: u64) -> RateLimit {
        RateLimit {
            name: name.into(),
            limit,
            window: Duration::from_secs(secs),
        }
    }

    #[test]
    fn a_burst_of_limit_passes_then_one_per_interval() {
        let l = [limit("burst", 10, 1)];
        let mut tat = [0.0];
        let now = 1_000_000_000.0;
        for i in 0..10 {
            let d = run(&l, &mut tat, 1, now);
            assert!(d.allowed, "request {i}");
            assert_eq!(d.states[0].remaining, 9 - i);
        }
        let d = run(&l, &mut tat, 1, now);
        assert!(!d.allowed);
        assert_eq!(d.refused_by, Some((0, 1)));
        // 100 ms later exactly one more unit has been earned.
        assert!(run(&l, &mut tat, 1, now + 100_000.0).allowed);
        assert!(!run(&l, &mut tat, 1, now + 100_000.0).allowed);
        // A full window later the burst is back.
        let d = run(&l, &mut tat, 1, now + 1_100_000.0);
        assert!(d.allowed);
        assert_eq!(d.states[0].remaining, 9);
    }

    #[test]
    fn over_a_long_run_the_rate_holds_to_one_unit() {
        // 100/s offered 1000/s for 60 s: 100 (burst) + 6000 pass, never more.
        let l = [limit("rate", 100, 1)];
        let mut tat = [0.0];
        let mut passed = 0u64;
        for ms in 0..60_000u64 {
            if run(&l, &mut tat, 1, 5e12 + ms as f64 * 1000.0).allowed {
                passed += 1;
            }
        }
        assert!((6000..=6100).contains(&passed), "{passed}");
    }

    #[test]
    fn all_or_nothing_across_limits_and_cost() {
        let l = [limit("burst", 100, 1), limit("daily", 15, 86_400)];
        let mut tat = [0.0, 0.0];
        let now = 7e12;
        assert!(run(&l, &mut tat, 10, now).allowed);
        // 10 more would pass the burst limit but not the daily one: nothing is spent.
        let before = tat;
        let d = run(&l, &mut tat, 10, now);
        assert!(!d.allowed);
        assert_eq!(tat, before);
        assert_eq!(d.refused_by.map(|r| r.0), Some(1));
        assert_eq!(d.states[1].remaining, 5);
        assert!(run(&l, &mut tat, 5, now).allowed);
        // A cost larger than the limit never passes.
        let mut fresh = [0.0];
        assert!(!run(&[limit("small", 3, 1)], &mut fresh, 4, now).allowed);
    }

    #[test]
    fn a_lease_is_granted_only_while_half_the_burst_stays() {
        let l = limit("rate", 100, 1);
        let refs = [&l];
        let mut tat = [0.0];
        let now = 9e12;
        // 1 + 10 leased: 89 left, more than half.
        let (d, granted) = gcra_lease(&refs, &mut tat, 1, 10, now);
        assert!(d.allowed);
        assert_eq!((granted, d.states[0].remaining), (10, 89));
        // Spend to 55 left: another lease of 10 would leave 44 < 50, so none.
        let (d, _) = gcra_lease(&refs, &mut tat, 34, 0, now);
        assert_eq!(d.states[0].remaining, 55);
        let (d, granted) = gcra_lease(&refs, &mut tat, 1, 10, now);
        assert!(d.allowed);
        assert_eq!((granted, d.states[0].remaining), (0, 54));
        // Refused requests never lease.
        let mut full = [now + 1e6];
        let (d, granted) = gcra_lease(&refs, &mut full, 1, 10, now);
        assert!(!d.allowed);
        assert_eq!(granted, 0);
    }

    #[test]
    fn lists_are_checked_field_by_field() {
        let bad = vec![
            limit("Burst", 0, 1),
            RateLimit {
                name: "ok".into(),
                limit: 5,
                window: Duration::from_millis(10),
            },
            limit("ok", 5, 1),
        ];
        let problems = check(&bad);
        let paths: Vec<&str> = problems.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            ["[0].name", "[0].limit", "[1].window", "[2].name"],
            "{problems:?}"
        );
        assert!(check(&[limit("burst", 100, 1), limit("daily", 50_000, 86_400)]).is_empty());
    }

    #[test]
    fn windows_read_and_print_as_written() {
        let l: RateLimit =
            serde_json::from_str(r#"{"name":"daily","limit":5,"window":"1d"}"#).unwrap();
        assert_eq!(l.window, Duration::from_secs(86_400));
        assert_eq!(
            serde_json::to_string(&l).unwrap(),
            r#"{"name":"daily","limit":5,"window":"1d"}"#
        );
        assert_eq!(window_string(Duration::from_secs(90)), "90s");
        assert_eq!(window_string(Duration::from_secs(120)), "2m");
        assert!(
            serde_json::from_str::<RateLimit>(r#"{"name":"x","limit":5,"window":"soon"}"#).is_err()
        );
    }

    #[test]
    fn within_compares_burst_and_rate() {
        let mine = limit("burst", 100, 1);
        assert!(limit("burst", 50, 1).within(&mine));
        assert!(!limit("burst", 101, 1).within(&mine));
        assert!(
            limit("burst", 100, 86_400).within(&mine),
            "same burst, slower"
        );
        assert!(!limit("burst", 60, 1).within(&limit("burst", 100, 86_400)));
    }
}
