//! The upstream identity assertion: `x-keygate-assertion`, a compact JWS on every
//! authenticated request keygate forwards, so an upstream can tell a request that passed
//! through keygate from one that forged the `x-keygate-*` headers, and bind it to the exact
//! method, target and body. Signed with the fleet's Ed25519 key ([`keyring`], published as a
//! JWKS) or a per-upstream HS256 secret.

pub mod keyring;

use std::borrow::Cow;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use hmac::{Hmac, Mac};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::ser::SerializeSeq;
use serde::{Serialize, Serializer};
use sha2::Sha256;
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::clock::Clock;
use crate::keys::{ActiveKey, MasterKey, SigningKeyStore};
use crate::metrics::Metrics;
pub use keyring::{Keyring, KeyringError};

/// The header that carries the assertion upstream.
pub const HEADER: &str = "x-keygate-assertion";
/// Slack for clocks that disagree, added to how long a retired key stays published.
const CLOCK_SLACK: Duration = Duration::from_secs(60);

/// A per-upstream HS256 secret: redacted in `Debug`, wiped on drop.
#[derive(Clone)]
pub struct SharedSecret(Arc<Zeroizing<Vec<u8>>>);

impl SharedSecret {
    /// At least 32 bytes (RFC 7518 §3.2: the key must be as long as the hash).
    pub fn new(bytes: Vec<u8>) -> Result<Self, String> {
        let bytes = Zeroizing::new(bytes);
        if bytes.len() < 32 {
            return Err(format!(
                "an HS256 secret needs at least 32 bytes, this one has {}",
                bytes.len()
            ));
        }
        Ok(Self(Arc::new(bytes)))
    }
}

impl fmt::Debug for SharedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedSecret(***)")
    }
}

/// How one upstream's requests are asserted (`assertion` on the upstream).
#[derive(Clone, Debug, Default)]
pub enum Mode {
    /// Verifiable with the published public keys alone.
    #[default]
    Ed25519,
    /// A secret shared with the upstream: cheaper to sign and verify.
    Hs256(SharedSecret),
    Off,
}

/// The facts of one forwarded request that the assertion binds.
pub struct Facts<'a> {
    pub key: &'a ActiveKey,
    pub method: &'a str,
    /// The request target as sent: path and query.
    pub target: &'a str,
    pub body_sha256: &'a [u8; 32],
    /// SHA-256 of the verified TLS client certificate the request came with, if any: the
    /// `cnf` claim (RFC 8705 `x5t#S256`), binding the assertion to that certificate.
    pub client_cert: Option<&'a [u8]>,
}

/// `cnf`: `{"x5t#S256": base64url(SHA-256 of the client certificate)}` (RFC 8705 §3.1).
#[derive(Serialize)]
struct Confirmation {
    #[serde(rename = "x5t#S256")]
    x5t_s256: String,
}

/// The `scopes` claim: the key's space-separated scopes as a JSON array, without collecting.
struct Scopes<'a>(&'a str);

impl Serialize for Scopes<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(None)?;
        for scope in self.0.split_ascii_whitespace() {
            seq.serialize_element(scope)?;
        }
        seq.end()
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    aud: &'a str,
    iat: i64,
    exp: i64,
    jti: &'a str,
    sub: Cow<'a, str>,
    owner: Cow<'a, str>,
    scopes: Scopes<'a>,
    environment: &'a str,
    method: &'a str,
    target: &'a str,
    body_sha256: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    cnf: Option<Confirmation>,
}

/// Why a request could not be asserted.
#[derive(Debug, thiserror::Error)]
pub enum AssertionError {
    /// The keyring has not been read from the store yet (or could never be).
    #[error("the assertion signing key is not loaded yet")]
    NoSigningKey,
}

/// `base64url(header)` of every HS256 assertion.
fn hs256_prefix() -> String {
    let mut p = B64URL.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    p.push('.');
    p
}

/// Signs assertions; shared by every request of the proxy.
pub struct Asserter {
    issuer: String,
    ttl: Duration,
    /// How long a retired key stays published.
    overlap: Duration,
    keyring: RwLock<Option<Arc<Keyring>>>,
    hs256_prefix: String,
}

impl fmt::Debug for Asserter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Asserter")
            .field("issuer", &self.issuer)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Asserter {
    /// `refresh` is how often gateways re-read the keyring: a retired key stays published
    /// for the TTL plus that, plus clock slack.
    pub fn new(issuer: String, ttl: Duration, refresh: Duration) -> Self {
        Self {
            issuer,
            ttl,
            overlap: ttl + refresh + CLOCK_SLACK,
            keyring: RwLock::new(None),
            hs256_prefix: hs256_prefix(),
        }
    }

    pub fn overlap(&self) -> Duration {
        self.overlap
    }

    /// The keyring in use, if loaded.
    pub fn keyring(&self) -> Option<Arc<Keyring>> {
        self.keyring
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Uses `ring` from now on, unless the one in use is newer.
    pub fn install(&self, ring: Keyring) {
        let mut slot = self
            .keyring
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.as_ref().is_none_or(|cur| cur.version < ring.version) {
            *slot = Some(Arc::new(ring));
        }
    }

    /// The header value for a request to `audience`; `Ok(None)` when the upstream has
    /// assertions off.
    pub fn assert(
        &self,
        mode: &Mode,
        audience: &str,
        facts: &Facts<'_>,
        now: OffsetDateTime,
    ) -> Result<Option<String>, AssertionError> {
        let ring;
        let (prefix, signer) = match mode {
            Mode::Off => return Ok(None),
            Mode::Hs256(_) => (self.hs256_prefix.as_str(), None),
            Mode::Ed25519 => {
                ring = self.keyring().ok_or(AssertionError::NoSigningKey)?;
                let key = ring.signer(now).ok_or(AssertionError::NoSigningKey)?;
                (key.jws_prefix.as_str(), Some(key))
            }
        };
        let iat = now.unix_timestamp();
        // Fresh per assertion, not the request id: a client chooses its `x-request-id`, and
        // could spend the `jti`s another client's requests would carry at an upstream that
        // refuses a `jti` it has seen.
        let jti = crate::ids::random();
        let body_hex = hex::encode(facts.body_sha256);
        let claims = Claims {
            iss: &self.issuer,
            aud: audience,
            iat,
            exp: iat.saturating_add(i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX)),
            jti: &jti,
            sub: String::from_utf8_lossy(facts.key.id.as_bytes()),
            owner: String::from_utf8_lossy(facts.key.owner.as_bytes()),
            scopes: Scopes(std::str::from_utf8(facts.key.scopes.as_bytes()).unwrap_or_default()),
            environment: facts.key.environment.as_str(),
            method: facts.method,
            target: facts.target,
            body_sha256: &body_hex,
            cnf: facts.client_cert.map(|c| Confirmation {
                x5t_s256: B64URL.encode(c),
            }),
        };
        // Serialising claims of plain strings and integers cannot fail.
        let payload = serde_json::to_vec(&claims).unwrap_or_default();
        let mut token = String::with_capacity(prefix.len() + payload.len() * 4 / 3 + 100);
        token.push_str(prefix);
        B64URL.encode_string(&payload, &mut token);
        let signature: Vec<u8> = match (mode, signer) {
            (Mode::Hs256(secret), _) => {
                // HMAC accepts keys of any length: this never fails.
                let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&secret.0) else {
                    return Err(AssertionError::NoSigningKey);
                };
                mac.update(token.as_bytes());
                mac.finalize().into_bytes().to_vec()
            }
            (_, Some(key)) => key.sign(token.as_bytes()).to_vec(),
            _ => return Err(AssertionError::NoSigningKey),
        };
        token.push('.');
        B64URL.encode_string(&signature, &mut token);
        Ok(Some(token))
    }

    /// The JWKS document; empty until the keyring is loaded.
    pub fn jwks(&self, now: OffsetDateTime) -> serde_json::Value {
        match self.keyring() {
            Some(ring) => ring.jwks(now, self.overlap),
            None => serde_json::json!({ "keys": [] }),
        }
    }
}

/// The life of the fleet's keyring on this gateway: loaded at start (created if the store
/// has none), re-read every `refresh` so a rotation made on any gateway reaches every other,
/// and rotated on an operator's request. Failures keep the keyring in use.
pub struct SigningKeys {
    pub asserter: Arc<Asserter>,
    pub store: Arc<dyn SigningKeyStore>,
    pub master: Arc<MasterKey>,
    pub clock: Arc<dyn Clock>,
    pub refresh: Duration,
    pub metrics: Metrics,
}

impl SigningKeys {
    /// One load; `true` when a keyring is in use afterwards.
    pub async fn load_once(&self) -> bool {
        let in_use = self.asserter.keyring();
        let result = match &in_use {
            None => keyring::ensure(self.store.as_ref(), &self.master, self.clock.now()).await,
            Some(current) => match self.store.load_signing_keys().await {
                Ok(Some(doc)) if doc.version == current.version => return true,
                Ok(Some(doc)) => Keyring::open(&doc, &self.master),
                Ok(None) => {
                    keyring::ensure(self.store.as_ref(), &self.master, self.clock.now()).await
                }
                Err(e) => Err(e.into()),
            },
        };
        match result {
            Ok(ring) => {
                self.asserter.install(ring);
                true
            }
            Err(e) => {
                if matches!(e, KeyringError::Store(_)) {
                    self.metrics.store_error("signing_keys");
                }
                tracing::error!(error = %e, "cannot load the assertion keyring; the one in use stays");
                in_use.is_some()
            }
        }
    }

    /// Adds a key active `publish_ahead` from now; returns the keyring's status.
    pub async fn rotate(&self, publish_ahead: Duration) -> Result<serde_json::Value, KeyringError> {
        let now = self.clock.now();
        let ring = keyring::rotate(
            self.store.as_ref(),
            &self.master,
            now,
            publish_ahead,
            self.asserter.overlap(),
        )
        .await?;
        let status = ring.status(now, self.asserter.overlap());
        self.asserter.install(ring);
        Ok(status)
    }

    /// Each key's public facts and state; `None` until loaded.
    pub fn status(&self) -> Option<serde_json::Value> {
        self.asserter
            .keyring()
            .map(|ring| ring.status(self.clock.now(), self.asserter.overlap()))
    }

    /// The JWKS document at this moment.
    pub fn jwks(&self) -> serde_json::Value {
        self.asserter.jwks(self.clock.now())
    }
}

/// Runs [`SigningKeys::load_once`] every `refresh` (every second while none is loaded).
pub struct RefreshService(pub Arc<SigningKeys>);

#[async_trait]
impl BackgroundService for RefreshService {
    /// Ready once the keys are loaded, or after 10 s without them (a store down at start: the
    /// gateway serves what it can, as before). An upgrading process's proxy listener waits for
    /// this: it takes over from a process that stops accepting at once, and would otherwise
    /// answer its first requests 503 `store_unavailable` ("cannot sign for the upstream yet").
    async fn start_with_ready_notifier(
        &self,
        mut shutdown: ShutdownWatch,
        ready: pingora::services::ServiceReadyNotifier,
    ) {
        const READY_WITHIN: Duration = Duration::from_secs(10);
        let started = tokio::time::Instant::now();
        let mut ready = Some(ready);
        loop {
            let loaded = self.0.load_once().await;
            if loaded || started.elapsed() >= READY_WITHIN {
                if let Some(r) = ready.take() {
                    r.notify_ready();
                }
            }
            let wait = if loaded {
                self.0.refresh
            } else {
                Duration::from_secs(1)
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{build_record, AuthKind, NewKey, SecretString};

    /// The `jti` of an HS256 assertion, read from its payload.
    fn jti(token: &str) -> String {
        let payload = token.split('.').nth(1).unwrap_or_default();
        let claims: serde_json::Value =
            serde_json::from_slice(&B64URL.decode(payload).unwrap_or_default()).unwrap_or_default();
        claims["jti"].as_str().unwrap_or_default().to_owned()
    }

    /// Two assertions of the very same request facts carry different, 128-bit random `jti`s:
    /// nothing a client sends (its `x-request-id`) decides one.
    #[test]
    fn every_assertion_has_its_own_random_jti() {
        let (master, _) = MasterKey::generate();
        let now = OffsetDateTime::now_utc();
        let record = build_record(
            &master,
            NewKey::plain("acme", "jti", AuthKind::HmacV1),
            "pk_test_jti".into(),
            &SecretString::new("s".repeat(32)),
            now,
        );
        let key = ActiveKey::open(&record, &master).unwrap_or_else(|e| panic!("{e}"));
        let asserter = Asserter::new(
            "keygate".into(),
            Duration::from_secs(60),
            Duration::from_secs(10),
        );
        let mode = Mode::Hs256(SharedSecret::new(vec![7; 32]).unwrap_or_else(|e| panic!("{e}")));
        let facts = Facts {
            key: &key,
            method: "POST",
            target: "/v1/payments",
            body_sha256: &[0; 32],
            client_cert: None,
        };
        let jtis: Vec<String> = (0..100)
            .map(|_| match asserter.assert(&mode, "payments", &facts, now) {
                Ok(Some(token)) => jti(&token),
                other => panic!("{other:?}"),
            })
            .collect();
        assert!(jtis
            .iter()
            .all(|j| j.len() == 32 && j.bytes().all(|b| b.is_ascii_hexdigit())));
        let distinct: std::collections::HashSet<&String> = jtis.iter().collect();
        assert_eq!(distinct.len(), jtis.len());
    }
}
