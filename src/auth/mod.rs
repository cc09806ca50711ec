//! Authentication of a request: credential parsing and the pure checks of SPEC §3.4.
//!
//! [`parse_credentials`] is step 3; [`check_head`] steps 5–7, which need only the headers, so
//! the proxy runs them before reading a byte of the body; [`check_signature`] step 8 plus
//! nonce extraction ([`check_key`] is both); [`check_scope`] step 10. None of them does I/O or
//! knows pingora: the proxy looks the key up (step 4) and records the nonce (step 9).

pub mod client_ip;
pub mod signing;

use std::borrow::Cow;
use std::net::IpAddr;
use std::time::Duration;

use http::header::{HeaderName, AUTHORIZATION};
use http::HeaderMap;
use serde::Deserialize;
use time::OffsetDateTime;

use crate::keys::secret::ct_eq;
use crate::keys::{scopes_grant, ActiveKey, AuthKind, AuthKinds};
use crate::problem::ErrorCode;

// Header names made once: a `&str` name is parsed and validated on every map lookup.
pub const H_PUBLIC_KEY: HeaderName = HeaderName::from_static("x-api-public-key");
pub const H_SIGNATURE: HeaderName = HeaderName::from_static("x-api-signature");
pub const H_TIMESTAMP: HeaderName = HeaderName::from_static("x-api-timestamp");
pub const H_NONCE: HeaderName = HeaderName::from_static("x-api-nonce");
pub const H_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// Every header that carries a credential; removed before forwarding by default.
pub const CREDENTIAL_HEADERS: [HeaderName; 6] = [
    H_PUBLIC_KEY,
    H_SIGNATURE,
    H_TIMESTAMP,
    H_NONCE,
    H_API_KEY,
    AUTHORIZATION,
];

/// Why a request was not authenticated. `Display` is the client-facing `detail`: it never
/// holds secrets, expected signatures or stored data.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("{0}")]
    MissingCredentials(&'static str),
    #[error("this route does not accept {0} keys")]
    KindNotAccepted(&'static str),
    #[error("{0}")]
    MalformedCredentials(&'static str),
    #[error("no key matches these credentials")]
    UnknownKey,
    #[error("this key has been revoked")]
    Revoked,
    #[error("this key has expired")]
    Expired,
    #[error("client address {0} is not in this key's allow-list")]
    IpNotAllowed(IpAddr),
    #[error(
        "this key is bound to a TLS client certificate, which this connection did not present"
    )]
    ClientCertRequired,
    #[error("x-api-timestamp is more than {0} s away from the gateway's clock")]
    StaleTimestamp(u64),
    #[error("the signature does not match the request")]
    BadSignature,
    #[error("{0}")]
    MissingNonce(&'static str),
    #[error("this nonce has already been used with this key")]
    ReplayedNonce,
    #[error("this route requires scope {0}")]
    InsufficientScope(String),
    #[error("the key store cannot be reached and this key is not cached")]
    StoreUnavailable,
}

impl AuthError {
    /// The contract's code for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::MissingCredentials(_) | Self::KindNotAccepted(_) => ErrorCode::MissingCredentials,
            Self::MalformedCredentials(_) => ErrorCode::MalformedCredentials,
            Self::UnknownKey => ErrorCode::UnknownKey,
            Self::Revoked => ErrorCode::RevokedKey,
            Self::Expired => ErrorCode::ExpiredKey,
            Self::IpNotAllowed(_) => ErrorCode::IpNotAllowed,
            Self::ClientCertRequired => ErrorCode::ClientCertRequired,
            Self::StaleTimestamp(_) => ErrorCode::StaleTimestamp,
            Self::BadSignature => ErrorCode::BadSignature,
            Self::MissingNonce(_) => ErrorCode::MissingNonce,
            Self::ReplayedNonce => ErrorCode::ReplayedNonce,
            Self::InsufficientScope(_) => ErrorCode::InsufficientScope,
            Self::StoreUnavailable => ErrorCode::StoreUnavailable,
        }
    }
}

/// Credentials as presented, checked for shape only (step 3).
#[derive(Debug)]
pub enum Credentials<'a> {
    /// `x-api-public-key` + `x-api-signature` (+ timestamp and nonce for `hmac-v1`).
    Signed {
        public_key: &'a str,
        signature: [u8; 32],
        timestamp: Option<&'a str>,
        nonce: Option<&'a str>,
    },
    /// `Authorization: Bearer` or `x-api-key`: only the hash of the secret is kept.
    Bearer { secret_hash: [u8; 32] },
}

fn header<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Result<Option<&'a str>, AuthError> {
    headers
        .get(name)
        .map(|v| {
            v.to_str().map_err(|_| {
                AuthError::MalformedCredentials("credential headers must be visible ASCII")
            })
        })
        .transpose()
}

fn is_valid_nonce(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Credential headers of the signed schemes; any of them means the request is signed.
const SIGNED_HEADERS: [HeaderName; 4] = [H_PUBLIC_KEY, H_SIGNATURE, H_TIMESTAMP, H_NONCE];

/// Refuses what two parsers could read two ways: a credential header sent more than once, or
/// a signed scheme and a bearer secret in one request. Either could let keygate verify one
/// value while the upstream (with `forward_credentials`) acts on the other.
fn unambiguous(headers: &HeaderMap) -> Result<(), AuthError> {
    for name in &CREDENTIAL_HEADERS {
        let mut values = headers.get_all(name).iter();
        if values.next().is_some() && values.next().is_some() {
            return Err(AuthError::MalformedCredentials(
                "a credential header is sent more than once",
            ));
        }
    }
    let signed = SIGNED_HEADERS.iter().any(|n| headers.contains_key(n));
    let bearer = headers.contains_key(AUTHORIZATION) as u8 + headers.contains_key(H_API_KEY) as u8;
    if (signed && bearer > 0) || bearer > 1 {
        return Err(AuthError::MalformedCredentials(
            "send one kind of credentials: a signature, Authorization or x-api-key",
        ));
    }
    Ok(())
}

/// Step 3: finds the credentials and checks their shape, refusing ambiguous ones.
pub fn parse_credentials(headers: &HeaderMap) -> Result<Credentials<'_>, AuthError> {
    unambiguous(headers)?;
    if let Some(public_key) = header(headers, &H_PUBLIC_KEY)? {
        // Keys imported from other systems keep their own public keys: shape only.
        if !crate::keys::secret::is_valid_public_key(public_key) {
            return Err(AuthError::MalformedCredentials(
                "x-api-public-key must be 1-128 characters of A-Z a-z 0-9 _ -",
            ));
        }
        let Some(sig) = header(headers, &H_SIGNATURE)? else {
            return Err(AuthError::MissingCredentials("x-api-signature is missing"));
        };
        let signature = signing::parse_signature(sig).ok_or(AuthError::MalformedCredentials(
            "x-api-signature must be 64 hex characters",
        ))?;
        let timestamp = header(headers, &H_TIMESTAMP)?;
        if timestamp
            .is_some_and(|t| t.is_empty() || t.len() > 12 || !t.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(AuthError::MalformedCredentials(
                "x-api-timestamp must be Unix time in seconds, decimal",
            ));
        }
        let nonce = header(headers, &H_NONCE)?;
        if nonce.is_some_and(|n| !is_valid_nonce(n)) {
            return Err(AuthError::MalformedCredentials(
                "x-api-nonce must be 1-64 characters of A-Z a-z 0-9 _ -",
            ));
        }
        return Ok(Credentials::Signed {
            public_key,
            signature,
            timestamp,
            nonce,
        });
    }
    let bearer = match header(headers, &AUTHORIZATION)? {
        Some(value) => {
            let (scheme, token) = value
                .split_once(' ')
                .ok_or(AuthError::MalformedCredentials(
                    "Authorization must be \"Bearer <secret>\"",
                ))?;
            if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
                return Err(AuthError::MalformedCredentials(
                    "Authorization must be \"Bearer <secret>\"",
                ));
            }
            Some(token.trim())
        }
        None => header(headers, &H_API_KEY)?,
    };
    match bearer {
        Some(secret) if !secret.is_empty() => Ok(Credentials::Bearer {
            secret_hash: crate::keys::SecretString::new(secret.to_owned()).sha256(),
        }),
        Some(_) => Err(AuthError::MalformedCredentials("x-api-key is empty")),
        None if headers.contains_key(&H_SIGNATURE) => {
            Err(AuthError::MissingCredentials("x-api-public-key is missing"))
        }
        None => Err(AuthError::MissingCredentials(
            "send x-api-public-key and x-api-signature, or a bearer secret",
        )),
    }
}

/// The request as verification sees it.
#[derive(Debug, Clone, Copy)]
pub struct RequestParts<'a> {
    /// Uppercase HTTP method.
    pub method: &'a str,
    /// Path and query exactly as on the request line.
    pub target: &'a str,
    pub body: &'a [u8],
    pub client_ip: IpAddr,
    /// SHA-256 of the verified TLS client certificate the connection presented, if any.
    pub client_cert: Option<&'a [u8]>,
}

/// Time windows from `[signing]`.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub clock_skew: Duration,
    pub body_nonce_retention: Duration,
}

/// A nonce to record once the signature has verified (step 9), and for how long.
#[derive(Debug, PartialEq, Eq)]
pub struct NonceClaim<'a> {
    pub value: Cow<'a, str>,
    pub ttl: Duration,
}

#[derive(Deserialize)]
struct BodyNonce {
    nonce: Option<serde_json::Value>,
}

fn body_nonce(body: &[u8]) -> Result<String, AuthError> {
    if body.is_empty() {
        return Err(AuthError::MissingNonce(
            "hmac-body requests need a JSON body with a nonce",
        ));
    }
    let parsed: BodyNonce = serde_json::from_slice(body).map_err(|_| {
        AuthError::MissingNonce("the body must be a JSON object with a nonce field")
    })?;
    match parsed.nonce {
        // A JSON number is read as an integer or a double: its text is short, whatever was sent.
        Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
        // The x-api-nonce rule: a nonce is kept for `body_nonce_retention`, so its size is
        // bounded like the header's.
        Some(serde_json::Value::String(s)) if is_valid_nonce(&s) => Ok(s),
        Some(_) => Err(AuthError::MissingNonce(
            "nonce must be a number or 1-64 characters of A-Z a-z 0-9 _ -",
        )),
        None => Err(AuthError::MissingNonce("the body has no nonce field")),
    }
}

/// Steps 4½–7 for a key that was found, on the headers alone: kind, revocation, expiry,
/// allow-list, timestamp — and, for a bearer secret, step 8 too, which needs no body.
pub fn check_head(
    key: &ActiveKey,
    creds: &Credentials<'_>,
    client_ip: IpAddr,
    client_cert: Option<&[u8]>,
    accepted: AuthKinds,
    now: OffsetDateTime,
    policy: &Policy,
) -> Result<(), AuthError> {
    if !accepted.contains(key.auth) {
        return Err(AuthError::KindNotAccepted(key.auth.as_str()));
    }
    let timestamp = match (key.auth, creds) {
        (AuthKind::Bearer, Credentials::Bearer { .. }) => None,
        (AuthKind::Bearer, Credentials::Signed { .. }) => {
            return Err(AuthError::MissingCredentials(
                "this key authenticates with a bearer secret, not a signature",
            ))
        }
        (
            AuthKind::HmacV1,
            Credentials::Signed {
                timestamp, nonce, ..
            },
        ) => {
            let t = timestamp.ok_or(AuthError::MissingCredentials("x-api-timestamp is missing"))?;
            nonce.ok_or(AuthError::MissingCredentials("x-api-nonce is missing"))?;
            Some(t)
        }
        (AuthKind::HmacBody, Credentials::Signed { .. }) => None,
        // The bearer index holds only bearer keys; a signed key reached by hash is a bug.
        (_, Credentials::Bearer { .. }) => return Err(AuthError::UnknownKey),
    };

    // Step 5.
    if key.revoked_at.is_some() {
        return Err(AuthError::Revoked);
    }
    if key.expires_at.is_some_and(|exp| exp <= now) {
        return Err(AuthError::Expired);
    }
    // Step 6.
    if !key.allow.is_empty() && !key.allow.contains(client_ip) {
        return Err(AuthError::IpNotAllowed(client_ip.to_canonical()));
    }
    // Step 6½ (SPEC §8): a key bound to a client certificate needs that certificate.
    if let Some(bound) = &key.client_cert_sha256 {
        if !client_cert.is_some_and(|presented| ct_eq(presented, bound)) {
            return Err(AuthError::ClientCertRequired);
        }
    }
    // Step 7.
    if let Some(t) = timestamp {
        let skew = policy.clock_skew.as_secs();
        let sent: i64 = t.parse().unwrap_or(i64::MAX);
        if sent.abs_diff(now.unix_timestamp()) > skew {
            return Err(AuthError::StaleTimestamp(skew));
        }
    }
    // Step 8 for bearer secrets: the current hash, or the previous one while its grace runs.
    if let Credentials::Bearer { secret_hash } = creds {
        let previous = key.previous.as_deref().filter(|p| now < p.until);
        let matches = |h: Option<[u8; 32]>| h.is_some_and(|h| ct_eq(&h, secret_hash));
        if !(matches(key.bearer_hash) || matches(previous.and_then(|p| p.bearer_hash))) {
            return Err(AuthError::BadSignature);
        }
    }
    Ok(())
}

/// Step 8 for signed keys, once the body is read: the signature over the request with the
/// current secret, or the previous one while its rotation grace runs. Returns the nonce to
/// record; `None` for bearer secrets, already checked by [`check_head`].
pub fn check_signature<'a>(
    key: &ActiveKey,
    creds: &Credentials<'a>,
    req: &RequestParts<'a>,
    now: OffsetDateTime,
    policy: &Policy,
) -> Result<Option<NonceClaim<'a>>, AuthError> {
    let Credentials::Signed {
        signature,
        timestamp,
        nonce,
        ..
    } = creds
    else {
        return Ok(None);
    };
    let (timestamp, nonce) = match key.auth {
        AuthKind::HmacV1 => (*timestamp, *nonce),
        _ => (None, None),
    };
    let previous = key.previous.as_deref().filter(|p| now < p.until);
    let verifies = |secret: Option<&crate::keys::SecretString>| {
        secret.is_some_and(|s| {
            let s = s.expose().as_bytes();
            let expected = match (timestamp, nonce) {
                (Some(t), Some(n)) => signing::mac_v1(s, t, n, req.method, req.target, req.body),
                _ => signing::mac_body(s, req.body),
            };
            ct_eq(&expected, signature)
        })
    };
    if !(verifies(key.secret.as_ref()) || verifies(previous.and_then(|p| p.secret.as_ref()))) {
        return Err(AuthError::BadSignature);
    }
    // Step 9's input; recorded by the caller only now that the signature verified.
    let claim = match nonce {
        Some(n) => NonceClaim {
            value: Cow::Borrowed(n),
            ttl: policy.clock_skew * 2,
        },
        None => NonceClaim {
            value: Cow::Owned(body_nonce(req.body)?),
            ttl: policy.body_nonce_retention,
        },
    };
    Ok(Some(claim))
}

/// Steps 4½–8 for a key that was found: [`check_head`] then [`check_signature`].
pub fn check_key<'a>(
    key: &ActiveKey,
    creds: &Credentials<'a>,
    req: &RequestParts<'a>,
    accepted: AuthKinds,
    now: OffsetDateTime,
    policy: &Policy,
) -> Result<Option<NonceClaim<'a>>, AuthError> {
    check_head(
        key,
        creds,
        req.client_ip,
        req.client_cert,
        accepted,
        now,
        policy,
    )?;
    check_signature(key, creds, req, now, policy)
}

/// Step 10: the key's scopes grant the route's scope (a route without a scope needs none).
pub fn check_scope(key: &ActiveKey, route_scope: Option<&str>) -> Result<(), AuthError> {
    match route_scope {
        Some(s) if !scopes_grant(key.scopes(), s) => {
            Err(AuthError::InsufficientScope(s.to_owned()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests;
