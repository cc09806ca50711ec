//! The fleet's Ed25519 assertion keys: their sealed document in the store, rotation with
//! overlap, and which key signs and which are published at a given time.
//!
//! A key is *next* before its `active_from`, *active* from then until a newer key becomes
//! active, and *retiring* after that for an overlap (the assertion TTL plus the refresh
//! interval plus a minute of clock skew), during which assertions it signed may still be in
//! flight. Published in the JWKS: next, active and retiring keys. A rotation adds a key and
//! drops the ones whose overlap has ended; every write is compare-and-set on the document's
//! version, so gateways racing to create or rotate the keyring cannot both win.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use ed25519_dalek::SigningKey;
use rand::rngs::OsRng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::keys::secret::{SealedSecret, SecretError};
use crate::keys::{MasterKey, SecretString, SigningKeyStore, StoreError, Versioned};

/// More keys than this in the overlap means someone is rotating in a loop: refused.
pub const MAX_KEYS: usize = 8;
/// Compare-and-set attempts before a write gives up.
const CAS_ATTEMPTS: usize = 16;

/// Why the keyring could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("assertion key {kid}: {source}")]
    Seal { kid: String, source: SecretError },
    #[error("assertion keyring is corrupt: {0}")]
    Corrupt(String),
    #[error("{MAX_KEYS} assertion keys are already published; wait for the oldest to retire")]
    TooManyKeys,
    #[error("the assertion keyring kept changing under this write; try again")]
    Contended,
}

/// The document as stored: public facts in clear, the seed sealed under the master key.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Doc {
    keys: Vec<StoredKey>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredKey {
    kid: String,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    active_from: OffsetDateTime,
    /// base64 of the 32-byte Ed25519 seed, sealed with the kid as associated data.
    seed: SealedSecret,
}

/// The additional data a seed is sealed with: a blob moved to another kid does not open.
fn seal_label(kid: &str) -> String {
    format!("assertion-key:{kid}")
}

/// A key ready to sign.
pub struct LiveKey {
    pub kid: String,
    pub created_at: OffsetDateTime,
    pub active_from: OffsetDateTime,
    /// Wiped on drop (ed25519-dalek's `zeroize` feature).
    signing: SigningKey,
    /// `base64url(header) + "."`: the same for every assertion this key signs.
    pub(super) jws_prefix: String,
}

impl std::fmt::Debug for LiveKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveKey")
            .field("kid", &self.kid)
            .field("active_from", &self.active_from)
            .finish_non_exhaustive()
    }
}

impl LiveKey {
    fn new(
        kid: String,
        created_at: OffsetDateTime,
        active_from: OffsetDateTime,
        signing: SigningKey,
    ) -> Self {
        let header = json!({"alg": "EdDSA", "typ": "JWT", "kid": kid}).to_string();
        let mut jws_prefix = B64URL.encode(header);
        jws_prefix.push('.');
        Self {
            kid,
            created_at,
            active_from,
            signing,
            jws_prefix,
        }
    }

    pub(super) fn sign(&self, input: &[u8]) -> [u8; 64] {
        use ed25519_dalek::Signer;
        self.signing.sign(input).to_bytes()
    }

    /// The public key as a JWK (RFC 8037).
    fn jwk(&self) -> Value {
        json!({
            "kty": "OKP",
            "crv": "Ed25519",
            "x": B64URL.encode(self.signing.verifying_key().as_bytes()),
            "kid": self.kid,
            "alg": "EdDSA",
            "use": "sig",
        })
    }
}

/// The key id: derived from the public key, so it names that key and no other.
fn kid_of(signing: &SigningKey) -> String {
    let digest = Sha256::digest(signing.verifying_key().as_bytes());
    format!("kg-{}", &B64URL.encode(digest)[..16])
}

/// Where a key is in its life at some moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyState {
    Next,
    Active,
    Retiring,
    /// Past its overlap: no longer published, dropped at the next rotation.
    Retired,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Next => "next",
            Self::Active => "active",
            Self::Retiring => "retiring",
            Self::Retired => "retired",
        }
    }
}

/// The opened keyring: every key of the document, oldest `active_from` first.
#[derive(Debug)]
pub struct Keyring {
    pub version: u64,
    keys: Vec<LiveKey>,
}

impl Keyring {
    /// Opens every seed of `doc` with `master`.
    pub fn open(doc: &Versioned, master: &MasterKey) -> Result<Self, KeyringError> {
        let parsed: Doc =
            serde_json::from_slice(&doc.body).map_err(|e| KeyringError::Corrupt(e.to_string()))?;
        let mut keys = Vec::with_capacity(parsed.keys.len());
        for k in parsed.keys {
            let seal = |source| KeyringError::Seal {
                kid: k.kid.clone(),
                source,
            };
            let text = master.open(&k.seed, &seal_label(&k.kid)).map_err(seal)?;
            let bytes = Zeroizing::new(
                B64URL
                    .decode(text.expose())
                    .map_err(|_| seal(SecretError::Corrupt))?,
            );
            let seed: &[u8; 32] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| seal(SecretError::Corrupt))?;
            let signing = SigningKey::from_bytes(seed);
            if kid_of(&signing) != k.kid {
                return Err(seal(SecretError::Corrupt));
            }
            keys.push(LiveKey::new(k.kid, k.created_at, k.active_from, signing));
        }
        keys.sort_by_key(|k| k.active_from);
        Ok(Self {
            version: doc.version,
            keys,
        })
    }

    /// The state of the key at `i` at `now`, given the overlap.
    fn state(&self, i: usize, now: OffsetDateTime, overlap: Duration) -> KeyState {
        let Some(key) = self.keys.get(i) else {
            return KeyState::Retired;
        };
        if key.active_from > now {
            return KeyState::Next;
        }
        // The newest key already active after this one, if any, ended this one's turn.
        let successor = self.keys[i + 1..]
            .iter()
            .filter(|k| k.active_from <= now)
            .map(|k| k.active_from)
            .next();
        match successor {
            None => KeyState::Active,
            Some(at) if now < at + overlap => KeyState::Retiring,
            Some(_) => KeyState::Retired,
        }
    }

    /// The key that signs at `now`: the newest already active.
    pub fn signer(&self, now: OffsetDateTime) -> Option<&LiveKey> {
        self.keys.iter().rev().find(|k| k.active_from <= now)
    }

    /// The JWKS document: every key not yet past its overlap.
    pub fn jwks(&self, now: OffsetDateTime, overlap: Duration) -> Value {
        let keys: Vec<Value> = (0..self.keys.len())
            .filter(|&i| self.state(i, now, overlap) != KeyState::Retired)
            .map(|i| self.keys[i].jwk())
            .collect();
        json!({ "keys": keys })
    }

    /// Each key's public facts and state, for operators.
    pub fn status(&self, now: OffsetDateTime, overlap: Duration) -> Value {
        let rfc = |t: OffsetDateTime| {
            t.format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default()
        };
        let keys: Vec<Value> = self
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                json!({
                    "kid": k.kid,
                    "alg": "EdDSA",
                    "created_at": rfc(k.created_at),
                    "active_from": rfc(k.active_from),
                    "state": self.state(i, now, overlap).as_str(),
                })
            })
            .collect();
        json!({ "version": self.version, "keys": keys })
    }
}

/// A fresh key, sealed for the document.
fn new_stored_key(
    master: &MasterKey,
    now: OffsetDateTime,
    active_from: OffsetDateTime,
) -> StoredKey {
    let signing = SigningKey::generate(&mut OsRng);
    let kid = kid_of(&signing);
    let seed = SecretString::new(B64URL.encode(signing.to_bytes()));
    StoredKey {
        seed: master.seal(&seed, &seal_label(&kid)),
        kid,
        created_at: now,
        active_from,
    }
}

fn parse(doc: Option<&Versioned>) -> Result<(u64, Doc), KeyringError> {
    match doc {
        None => Ok((0, Doc::default())),
        Some(d) => serde_json::from_slice(&d.body)
            .map(|parsed| (d.version, parsed))
            .map_err(|e| KeyringError::Corrupt(e.to_string())),
    }
}

fn encode(version: u64, doc: &Doc) -> Result<Versioned, KeyringError> {
    Ok(Versioned {
        version,
        body: serde_json::to_vec(doc).map_err(|e| KeyringError::Corrupt(e.to_string()))?,
    })
}

/// Reads, changes and writes the document until the compare-and-set holds.
async fn change<F>(
    store: &dyn SigningKeyStore,
    master: &MasterKey,
    mut edit: F,
) -> Result<Keyring, KeyringError>
where
    F: FnMut(u64, Doc) -> Result<Option<Doc>, KeyringError>,
{
    for _ in 0..CAS_ATTEMPTS {
        let current = store.load_signing_keys().await?;
        let (version, doc) = parse(current.as_ref())?;
        let Some(next) = edit(version, doc)? else {
            // Nothing to change: what is stored is the answer.
            let stored = current.ok_or_else(|| KeyringError::Corrupt("no keyring".into()))?;
            return Keyring::open(&stored, master);
        };
        let written = encode(version + 1, &next)?;
        match store.save_signing_keys(&written).await {
            Ok(()) => return Keyring::open(&written, master),
            Err(StoreError::VersionConflict) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(KeyringError::Contended)
}

/// The stored keyring, created with one active key if there is none (or none left).
pub async fn ensure(
    store: &dyn SigningKeyStore,
    master: &MasterKey,
    now: OffsetDateTime,
) -> Result<Keyring, KeyringError> {
    change(store, master, |_, mut doc| {
        if !doc.keys.is_empty() {
            return Ok(None);
        }
        doc.keys.push(new_stored_key(master, now, now));
        Ok(Some(doc))
    })
    .await
}

/// The master key id each stored seed is sealed under (`keygate secrets status`).
pub fn sealed_under(doc: &Versioned) -> Result<Vec<String>, KeyringError> {
    let (_, parsed) = parse(Some(doc))?;
    Ok(parsed
        .keys
        .into_iter()
        .map(|k| k.seed.master_key_id)
        .collect())
}

/// Re-seals every seed not sealed under `master`'s current key (master-key rotation); the
/// number of seeds moved. Compare-and-set like every keyring write, so a gateway rotating the
/// keyring at the same time loses nothing.
pub async fn reseal(
    store: &dyn SigningKeyStore,
    master: &MasterKey,
) -> Result<usize, KeyringError> {
    let mut moved = 0;
    if store.load_signing_keys().await?.is_none() {
        return Ok(0);
    }
    change(store, master, |_, mut doc| {
        moved = 0;
        for k in &mut doc.keys {
            if k.seed.master_key_id == master.id() {
                continue;
            }
            let label = seal_label(&k.kid);
            let seed = master
                .open(&k.seed, &label)
                .map_err(|source| KeyringError::Seal {
                    kid: k.kid.clone(),
                    source,
                })?;
            k.seed = master.seal(&seed, &label);
            moved += 1;
        }
        Ok((moved > 0).then_some(doc))
    })
    .await?;
    Ok(moved)
}

/// Adds a key that becomes active `publish_ahead` from now (published at once, so verifiers
/// caching the JWKS can fetch it before it signs), and drops keys past their overlap and any
/// key an earlier rotation scheduled that is not active yet.
pub async fn rotate(
    store: &dyn SigningKeyStore,
    master: &MasterKey,
    now: OffsetDateTime,
    publish_ahead: Duration,
    overlap: Duration,
) -> Result<Keyring, KeyringError> {
    change(store, master, |version, mut doc| {
        // Judge states on the opened form, which has the ordering rules.
        let opened = Keyring::open(&encode(version, &doc)?, master)?;
        let keep: Vec<String> = (0..opened.keys.len())
            .filter(|&i| opened.state(i, now, overlap) != KeyState::Retired)
            .map(|i| opened.keys[i].kid.clone())
            .collect();
        // A key still waiting to become active never signed: a new rotation replaces it.
        doc.keys
            .retain(|k| keep.contains(&k.kid) && k.active_from <= now);
        if doc.keys.len() >= MAX_KEYS {
            return Err(KeyringError::TooManyKeys);
        }
        doc.keys
            .push(new_stored_key(master, now, now + publish_ahead));
        Ok(Some(doc))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::EmbeddedStore;

    const OVERLAP: Duration = Duration::from_secs(120);

    #[tokio::test]
    async fn rotation_publishes_ahead_signs_after_and_retires_after_the_overlap() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = EmbeddedStore::open(&dir.path().join("k.db")).unwrap_or_else(|e| panic!("{e}"));
        let (master, _) = MasterKey::generate();
        let t0 =
            OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap_or_else(|e| panic!("{e}"));

        let first = ensure(&store, &master, t0)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let again = ensure(&store, &master, t0)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(first.version, 1);
        assert_eq!(again.version, 1, "an existing keyring is not replaced");
        let old = first.signer(t0).map(|k| k.kid.clone());
        assert!(old.is_some());

        let ahead = Duration::from_secs(60);
        let ring = rotate(&store, &master, t0, ahead, OVERLAP)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let new = ring.keys.last().map(|k| k.kid.clone());
        assert_ne!(new, old);
        let kids = |at: OffsetDateTime, r: &Keyring| -> Vec<String> {
            r.jwks(at, OVERLAP)["keys"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|k| k["kid"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        // Published at once, signing only from active_from on.
        assert_eq!(kids(t0, &ring).len(), 2);
        assert_eq!(ring.signer(t0).map(|k| k.kid.clone()), old);
        let t1 = t0 + ahead;
        assert_eq!(ring.signer(t1).map(|k| k.kid.clone()), new);
        // The old key stays published through the overlap, then goes.
        assert_eq!(kids(t1 + OVERLAP - Duration::from_secs(1), &ring).len(), 2);
        assert_eq!(
            kids(t1 + OVERLAP, &ring),
            new.iter().cloned().collect::<Vec<_>>()
        );
        // A second rotation before the scheduled key activates replaces that key.
        let replaced = rotate(&store, &master, t0, Duration::ZERO, OVERLAP)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(replaced.keys.len(), 2);
        assert!(replaced.keys.iter().all(|k| Some(&k.kid) != new.as_ref()));
        let new = replaced.keys.last().map(|k| k.kid.clone());
        assert_eq!(replaced.signer(t0).map(|k| k.kid.clone()), new);
        let t1 = t0;
        // A rotation after the overlap drops it from the document too.
        let later = rotate(&store, &master, t1 + OVERLAP, Duration::ZERO, OVERLAP)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(later.keys.len(), 2);
        assert!(later.keys.iter().all(|k| Some(&k.kid) != old.as_ref()));
    }

    #[tokio::test]
    async fn a_seed_opens_only_under_its_master_key_and_rotation_loops_are_bounded() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = EmbeddedStore::open(&dir.path().join("k.db")).unwrap_or_else(|e| panic!("{e}"));
        let (master, _) = MasterKey::generate();
        let now = OffsetDateTime::now_utc();
        ensure(&store, &master, now)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let stored = store
            .load_signing_keys()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("no document"));
        let text = String::from_utf8_lossy(&stored.body).to_string();
        let ring = Keyring::open(&stored, &master).unwrap_or_else(|e| panic!("{e}"));
        let seed = ring.keys[0].signing.to_bytes();
        assert!(
            !text.contains(&B64URL.encode(seed)),
            "the seed is stored sealed"
        );
        let (other, _) = MasterKey::generate();
        assert!(matches!(
            Keyring::open(&stored, &other),
            Err(KeyringError::Seal { .. })
        ));
        for _ in 1..MAX_KEYS {
            rotate(&store, &master, now, Duration::ZERO, OVERLAP)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        assert!(matches!(
            rotate(&store, &master, now, Duration::ZERO, OVERLAP).await,
            Err(KeyringError::TooManyKeys)
        ));
    }
}
