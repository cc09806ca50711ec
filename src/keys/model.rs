//! The key record as stored, its credential at rest, and scope matching.

use std::collections::BTreeMap;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::secret::{Environment, SealedSecret};

/// How requests made with a key are authenticated (SPEC §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AuthKind {
    #[serde(rename = "hmac-v1")]
    HmacV1,
    #[serde(rename = "hmac-body")]
    HmacBody,
    #[serde(rename = "bearer")]
    Bearer,
}

impl AuthKind {
    pub const ALL: [AuthKind; 3] = [Self::HmacV1, Self::HmacBody, Self::Bearer];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::HmacV1 => "hmac-v1",
            Self::HmacBody => "hmac-body",
            Self::Bearer => "bearer",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    fn bit(self) -> u8 {
        match self {
            Self::HmacV1 => 1,
            Self::HmacBody => 2,
            Self::Bearer => 4,
        }
    }
}

/// A set of [`AuthKind`]s, e.g. the kinds a route accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuthKinds(u8);

impl AuthKinds {
    pub const ALL: AuthKinds = AuthKinds(7);

    pub fn from_kinds(kinds: impl IntoIterator<Item = AuthKind>) -> Self {
        Self(kinds.into_iter().fold(0, |acc, k| acc | k.bit()))
    }

    pub fn contains(self, kind: AuthKind) -> bool {
        self.0 & kind.bit() != 0
    }

    pub fn names(self) -> Vec<&'static str> {
        AuthKind::ALL
            .into_iter()
            .filter(|k| self.contains(*k))
            .map(AuthKind::as_str)
            .collect()
    }
}

/// What the store holds instead of the secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StoredCredential {
    /// `hmac-*`: the secret sealed under the master key.
    Sealed(SealedSecret),
    /// `bearer`: lowercase hex SHA-256 of the secret.
    Sha256 { hash: String },
}

/// A key as persisted by every [`KeyStore`](super::KeyStore). Never holds a usable secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: String,
    pub public_key: String,
    pub secret_prefix: String,
    pub owner: String,
    pub name: String,
    pub description: Option<String>,
    pub scopes: Vec<String>,
    pub ip_allow_list: Vec<IpNet>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    pub environment: Environment,
    pub auth: AuthKind,
    pub metadata: BTreeMap<String, String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_used_at: Option<OffsetDateTime>,
    pub total_requests: u64,
    pub credential: StoredCredential,
    /// The credential replaced by the last rotation, accepted until `until` (rotation grace).
    #[serde(default)]
    pub previous: Option<PreviousCredential>,
    /// Bumped by every change: a write names the version it replaces, and the store refuses it
    /// if the record moved on (compare-and-set), so no change is ever lost to a concurrent one.
    /// Records of earlier versions read as 0.
    #[serde(default)]
    pub version: u64,
    /// The key that minted this one through self-service, if any: a key may act on the keys
    /// it minted.
    #[serde(default)]
    pub created_by: Option<String>,
    /// Requests with this key must come over a TLS connection whose verified client
    /// certificate has this SHA-256 (lowercase hex of the DER), else `client_cert_required`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_client_cert_sha256: Option<String>,
    /// The key's own rate limits; empty: the route's defaults apply.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rate_limits: Vec<crate::limits::RateLimit>,
    /// Requests spend credits (`remaining`, kept in the store's credit counter).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub metered: bool,
    /// Sets `remaining` back to an amount every UTC day or month.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refill: Option<crate::limits::credits::Refill>,
}

/// A rotated-out credential and the end of its grace period.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviousCredential {
    pub credential: StoredCredential,
    #[serde(with = "time::serde::rfc3339")]
    pub until: OffsetDateTime,
}

impl StoredCredential {
    /// The SHA-256 of a bearer secret, if this is one.
    pub fn bearer_hash(&self) -> Option<[u8; 32]> {
        match self {
            Self::Sha256 { hash } => {
                let mut out = [0u8; 32];
                hex::decode_to_slice(hash, &mut out).ok().map(|()| out)
            }
            Self::Sealed(_) => None,
        }
    }
}

impl KeyRecord {
    /// Reads a record as both stores write it (JSON). A document that does not decode is
    /// `Corrupt`, never a panic: the bytes come from a store another process can write.
    pub fn decode(bytes: &[u8]) -> Result<Self, super::StoreError> {
        serde_json::from_slice(bytes).map_err(|e| super::StoreError::Corrupt(e.to_string()))
    }

    pub fn encode(&self) -> Result<Vec<u8>, super::StoreError> {
        serde_json::to_vec(self).map_err(|e| super::StoreError::Corrupt(e.to_string()))
    }

    /// Sets the usage counters Redis keeps beside the record (decimal text: the total, and
    /// the last use in Unix microseconds); what does not parse reads as none.
    pub fn set_usage(&mut self, total: &str, last_micros: &str) {
        self.total_requests = total.parse().unwrap_or(0);
        self.last_used_at = last_micros
            .parse::<i64>()
            .ok()
            .and_then(|us| OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000).ok());
    }

    /// The SHA-256 index entry of a bearer key, if this is one.
    pub fn bearer_hash(&self) -> Option<[u8; 32]> {
        self.credential.bearer_hash()
    }

    /// Every bearer hash the `by_hash` index must hold for this record: the current one and,
    /// while a rotation's grace may still run, the previous one.
    pub fn indexed_hashes(&self) -> impl Iterator<Item = [u8; 32]> + '_ {
        self.bearer_hash().into_iter().chain(
            self.previous
                .as_ref()
                .and_then(|p| p.credential.bearer_hash()),
        )
    }
}

/// `key_` + UUIDv7: sortable by creation time, so newest-first listing is a reverse scan.
pub fn new_key_id() -> String {
    format!("key_{}", uuid::Uuid::now_v7())
}

/// Whether the scopes a key holds grant `wanted`: exact match, `prefix.*`, or `*`.
pub fn scopes_grant<I, S>(held: I, wanted: &str) -> bool
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    held.into_iter().any(|h| scope_grants(h.as_ref(), wanted))
}

fn scope_grants(held: &str, wanted: &str) -> bool {
    if held == "*" || held == wanted {
        return true;
    }
    // "payments.*" grants "payments.create" and "payments.refunds.create", not "payments".
    held.strip_suffix('*')
        .filter(|p| p.ends_with('.'))
        .is_some_and(|prefix| wanted.starts_with(prefix) && wanted.len() > prefix.len())
}

/// Scope syntax: `[a-z0-9_]+` segments joined by `.`, optionally ending in `.*`, or `*`.
pub fn is_valid_scope(s: &str) -> bool {
    if s == "*" {
        return true;
    }
    let body = s.strip_suffix(".*").unwrap_or(s);
    !body.is_empty()
        && body.split('.').all(|seg| {
            !seg.is_empty()
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_wildcards() {
        assert!(scopes_grant(["payments.create"], "payments.create"));
        assert!(scopes_grant(["payments.*"], "payments.create"));
        assert!(scopes_grant(["payments.*"], "payments.refunds.create"));
        assert!(!scopes_grant(["payments.*"], "payments"));
        assert!(!scopes_grant(["payments.*"], "payouts.create"));
        assert!(!scopes_grant(["payments"], "payments.create"));
        assert!(scopes_grant(["*"], "anything.at_all"));
        assert!(!scopes_grant(Vec::<&str>::new(), "payments.create"));
    }

    #[test]
    fn scope_syntax() {
        for ok in [
            "*",
            "payments.create",
            "payments.*",
            "keys.manage",
            "a_1.b2",
        ] {
            assert!(is_valid_scope(ok), "{ok}");
        }
        for bad in [
            "",
            "Payments.create",
            "payments..create",
            "payments.",
            ".x",
            "pay*",
            "a.*.b",
        ] {
            assert!(!is_valid_scope(bad), "{bad}");
        }
    }

    #[test]
    fn auth_kinds_set() {
        let set = AuthKinds::from_kinds([AuthKind::HmacV1, AuthKind::Bearer]);
        assert!(set.contains(AuthKind::HmacV1));
        assert!(!set.contains(AuthKind::HmacBody));
        assert_eq!(set.names(), vec!["hmac-v1", "bearer"]);
        assert!(AuthKinds::ALL.contains(AuthKind::HmacBody));
    }

    #[test]
    fn key_ids_sort_by_creation() {
        let a = new_key_id();
        let b = new_key_id();
        assert!(a.starts_with("key_"));
        assert!(a < b, "{a} < {b}");
    }
}
