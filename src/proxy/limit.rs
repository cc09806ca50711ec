//! A verified request's rate limits: which limits apply (the key's own, else its route's),
//! where their state lives, and how the answer reads on the wire — `RateLimit-Policy` and
//! `RateLimit` as draft-ietf-httpapi-ratelimit-headers-10 spells them, and `Retry-After`.

use std::fmt::Write as _;

use crate::config::Route;
use crate::keys::ActiveKey;
use crate::limits::store::{bucket_key, Bucket};
use crate::limits::{Decision, RateLimit};

/// The limits a request with `key` on `route` spends from, and their state keys. A key's own
/// limits are shared by all its routes; a route's defaults are counted per key and route.
pub(super) fn buckets<'a>(key: &'a ActiveKey, route: &'a Route) -> Vec<Bucket<'a>> {
    let (limits, subject) = if key.rate_limits.is_empty() {
        (
            &route.rate_limits,
            format!("k:{}:r:{}", key.id(), route.name),
        )
    } else {
        (&key.rate_limits, format!("k:{}", key.id()))
    };
    limits
        .iter()
        .map(|l| Bucket {
            key: bucket_key(key.owner(), &subject, &l.name),
            limit: l,
        })
        .collect()
}

/// `RateLimit-Policy` and `RateLimit` for a checked request: each limit as a quota policy
/// (`q` units per `w` seconds), and what is left of it now (`r`) and when it is whole again
/// (`t`, seconds).
pub(super) fn headers(buckets: &[Bucket<'_>], decision: &Decision) -> (String, String) {
    let mut policy = String::new();
    let mut state = String::new();
    for (b, s) in buckets.iter().zip(&decision.states) {
        let sep = if policy.is_empty() { "" } else { ", " };
        let l: &RateLimit = b.limit;
        // Writing to a String cannot fail.
        let _ = write!(
            policy,
            "{sep}\"{}\";q={};w={}",
            l.name,
            l.limit,
            l.window.as_secs()
        );
        let _ = write!(
            state,
            "{sep}\"{}\";r={};t={}",
            l.name, s.remaining, s.reset_secs
        );
    }
    (policy, state)
}

/// The problem detail of a refusal: which limit, and when to come back.
pub(super) fn refusal(buckets: &[Bucket<'_>], decision: &Decision, cost: u64) -> (String, u64) {
    let (i, wait) = decision.refused_by.unwrap_or((0, 1));
    let Some(l) = buckets.get(i).map(|b| b.limit) else {
        return ("rate limit exceeded".into(), wait);
    };
    let window = crate::limits::window_string(l.window);
    let detail = if cost > l.limit {
        format!(
            "this route costs {cost} units and rate limit {:?} allows {} per {window}: it can never pass",
            l.name, l.limit
        )
    } else {
        format!(
            "rate limit {:?} ({} per {window}) is exhausted; retry in {wait} s",
            l.name, l.limit
        )
    };
    (detail, wait)
}
