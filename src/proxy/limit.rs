//! A verified request's rate limits: which limits apply (the key's own, else its route's),
//! where their state lives, and how the answer reads on the wire — `RateLimit-Policy` and
//! `RateLimit` as draft-ietf-httpapi-ratelimit-headers-10 spells them, and `Retry-After`.

use std::fmt::Write as _;

use crate::config::Route;
use crate::keys::ActiveKey;
use crate::limits::store::{bucket_key, Bucket};
use crate::limits::{Decision, RateLimit};

/// The limits a request with `key` on `route` spends from, and their state keys. A key's own
/// limits are shared by all its routes; a route's defaults are counted per key and route; an
/// owner's (`owner`) by every key of the owner, on every route.
pub(super) fn buckets<'a>(
    key: &'a ActiveKey,
    route: &'a Route,
    owner: Option<&'a Vec<RateLimit>>,
) -> Vec<Bucket<'a>> {
    let (limits, subject) = if key.rate_limits.is_empty() {
        (
            &route.rate_limits,
            format!("k:{}:r:{}", key.id(), route.name),
        )
    } else {
        (&key.rate_limits, format!("k:{}", key.id()))
    };
    let own = limits.iter().map(|l| Bucket {
        key: bucket_key(key.owner(), &subject, &l.name),
        limit: l,
        owner_wide: false,
    });
    let shared = owner.into_iter().flatten().map(|l| Bucket {
        key: bucket_key(key.owner(), "o", &l.name),
        limit: l,
        owner_wide: true,
    });
    own.chain(shared).collect()
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
        let name = b.label();
        let _ = write!(
            policy,
            "{sep}\"{name}\";q={};w={}",
            l.limit,
            l.window.as_secs()
        );
        let _ = write!(
            state,
            "{sep}\"{name}\";r={};t={}",
            s.remaining, s.reset_secs
        );
    }
    (policy, state)
}

/// The problem detail of a refusal: which limit, and when to come back.
pub(super) fn refusal(buckets: &[Bucket<'_>], decision: &Decision, cost: u64) -> (String, u64) {
    let (i, wait) = decision.refused_by.unwrap_or((0, 1));
    let Some(b) = buckets.get(i) else {
        return ("rate limit exceeded".into(), wait);
    };
    let (l, name) = (b.limit, b.label());
    let window = crate::limits::window_string(l.window);
    let detail = if cost > l.limit {
        format!(
            "this route costs {cost} units and rate limit {name:?} allows {} per {window}: it can never pass",
            l.limit
        )
    } else {
        format!(
            "rate limit {name:?} ({} per {window}) is exhausted; retry in {wait} s",
            l.limit
        )
    };
    (detail, wait)
}
