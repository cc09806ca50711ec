//! Secret newtypes, secret generation, and sealing of signing secrets at rest.
//!
//! A usable secret never reaches the store: `hmac-*` secrets are sealed with AES-256-GCM
//! under the master key (the blob names the master key's id so keys can be rotated), and
//! `bearer` secrets are kept only as their SHA-256.

use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rand::distributions::{Alphanumeric, DistString};
use rand::rngs::OsRng;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

/// An API secret or admin token as the client knows it. Redacted in `Debug`, wiped on drop,
/// never `Serialize`: the only way out is [`SecretString::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(Zeroizing<String>);

impl SecretString {
    pub fn new(value: String) -> Self {
        Self(Zeroizing::new(value))
    }

    /// The secret text, for signing and for the one response that shows it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The first 12 characters, safe to display (SPEC §2 `secret_prefix`).
    pub fn display_prefix(&self) -> String {
        self.0.chars().take(12).collect()
    }

    /// SHA-256 of the secret text: what a bearer key stores instead of the secret.
    pub fn sha256(&self) -> [u8; 32] {
        Sha256::digest(self.0.as_bytes()).into()
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretString(***)")
    }
}

/// Constant-time equality of two byte strings of equal length (MACs, hashes).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// Whether a secret file of `mode` owned by `uid` is private enough: no access for group or
/// others, or — owned by root — read access for its group and nothing more. The second is
/// how Kubernetes mounts a Secret for a non-root pod (root-owned, group `fsGroup`), and the
/// rule PostgreSQL applies to its key file.
pub fn private_mode(mode: u32, uid: u32) -> bool {
    mode & 0o077 == 0 || (uid == 0 && mode & 0o037 == 0)
}

/// Reads a secret file that only its owner may read (see [`private_mode`]); `Ok(None)` if
/// absent.
pub fn read_private_file(path: &std::path::Path) -> Result<Option<SecretString>, String> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let mode = meta.permissions().mode();
        if !private_mode(mode, meta.uid()) {
            return Err(format!(
                "mode {:o} lets other users read it; chmod 600 it (or 640, owned by root)",
                mode & 0o777
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = meta;
    std::fs::read_to_string(path)
        .map(|t| Some(SecretString::new(t.trim().to_owned())))
        .map_err(|e| e.to_string())
}

/// Whether a key is for production traffic or a sandbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    Live,
    Test,
}

impl Environment {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Test => "test",
        }
    }
}

/// Lengths of the random parts, from SPEC §2.
const PUBLIC_KEY_RANDOM_LEN: usize = 24;
const SECRET_RANDOM_LEN: usize = 43;

/// `pk_live_` / `pk_test_` + 24 base62 characters.
pub fn generate_public_key(env: Environment) -> String {
    format!(
        "pk_{}_{}",
        env.as_str(),
        Alphanumeric.sample_string(&mut OsRng, PUBLIC_KEY_RANDOM_LEN)
    )
}

/// `sk_live_` / `sk_test_` + 43 base62 characters (~256 bits of entropy).
pub fn generate_secret(env: Environment) -> SecretString {
    SecretString::new(format!(
        "sk_{}_{}",
        env.as_str(),
        Alphanumeric.sample_string(&mut OsRng, SECRET_RANDOM_LEN)
    ))
}

/// Whether `s` can be a public key at all: keygate mints `pk_…` keys, and imported keys keep
/// their own, so the accepted text is 1-128 characters of `A-Z a-z 0-9 _ -`.
pub fn is_valid_public_key(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Why a master key could not be loaded or a sealed secret opened. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("master key is not valid base64")]
    MasterKeyEncoding,
    #[error("master key must be 32 bytes, got {0}")]
    MasterKeyLength(usize),
    #[error("secret was sealed under master key {0}, which is not loaded")]
    UnknownMasterKey(String),
    #[error("sealed secret is corrupt or was sealed for another key record")]
    Corrupt,
}

/// The 32-byte AES-256-GCM key that seals signing secrets. The cipher wipes its key schedule
/// on drop (aes-gcm's `zeroize` feature); the raw bytes are wiped right after loading.
///
/// During a master-key rotation it also holds the keys it replaces: they open what they
/// sealed, and only the current key seals.
pub struct MasterKey {
    id: String,
    cipher: Aes256Gcm,
    previous: Vec<MasterKey>,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey")
            .field("id", &self.id)
            .field("previous", &self.previous_ids().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl MasterKey {
    /// Parses base64 text (surrounding whitespace ignored) holding exactly 32 bytes.
    pub fn from_base64(text: &str) -> Result<Self, SecretError> {
        let mut bytes = Zeroizing::new(
            B64.decode(text.trim())
                .map_err(|_| SecretError::MasterKeyEncoding)?,
        );
        if bytes.len() != 32 {
            let n = bytes.len();
            bytes.zeroize();
            return Err(SecretError::MasterKeyLength(n));
        }
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(&bytes);
        Ok(Self::from_bytes(&key))
    }

    fn from_bytes(bytes: &[u8; 32]) -> Self {
        // The id is a hash of the key under a fixed label: stable, reveals nothing usable.
        let mut h = Sha256::new();
        h.update(b"keygate master key id v1\0");
        h.update(bytes);
        let id = format!("mk_{}", &hex::encode(h.finalize())[..16]);
        let mut key = aes_gcm::Key::<Aes256Gcm>::from(*bytes);
        let cipher = Aes256Gcm::new(&key);
        key.zeroize();
        Self {
            id,
            cipher,
            previous: Vec::new(),
        }
    }

    /// This key, also able to open what `older` (and the keys `older` replaces) sealed. A key
    /// given twice is kept once.
    pub fn with_previous(mut self, older: MasterKey) -> Self {
        let MasterKey {
            id,
            cipher,
            previous,
        } = older;
        let flat = std::iter::once(MasterKey {
            id,
            cipher,
            previous: Vec::new(),
        })
        .chain(previous);
        for key in flat {
            if key.id != self.id && !self.previous_ids().any(|p| p == key.id) {
                self.previous.push(key);
            }
        }
        self
    }

    /// The ids of the replaced keys this one can still open for.
    pub fn previous_ids(&self) -> impl Iterator<Item = &str> {
        self.previous.iter().map(|k| k.id.as_str())
    }

    /// Whether a secret sealed under `master_key_id` opens with this key (or a previous one).
    pub fn can_open(&self, master_key_id: &str) -> bool {
        self.id == master_key_id || self.previous_ids().any(|p| p == master_key_id)
    }

    /// A fresh random key and its base64 text (for `keygate demo` and first setup).
    pub fn generate() -> (Self, SecretString) {
        let mut bytes = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(bytes.as_mut());
        let text = SecretString::new(B64.encode(bytes.as_ref()));
        (Self::from_bytes(&bytes), text)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Seals `secret` for the record `record_id`: the id is authenticated data, so a blob
    /// copied onto another record does not open.
    pub fn seal(&self, secret: &SecretString, record_id: &str) -> SealedSecret {
        let mut nonce = [0u8; 12];
        OsRng.fill_bytes(&mut nonce);
        let ciphertext = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: secret.expose().as_bytes(),
                    aad: record_id.as_bytes(),
                },
            )
            // AES-GCM encryption fails only for messages beyond 64 GiB.
            .unwrap_or_default();
        SealedSecret {
            master_key_id: self.id.clone(),
            nonce: B64.encode(nonce),
            ciphertext: B64.encode(ciphertext),
        }
    }

    pub fn open(
        &self,
        sealed: &SealedSecret,
        record_id: &str,
    ) -> Result<SecretString, SecretError> {
        if sealed.master_key_id != self.id {
            return match self.previous.iter().find(|k| k.id == sealed.master_key_id) {
                Some(older) => older.open(sealed, record_id),
                None => Err(SecretError::UnknownMasterKey(sealed.master_key_id.clone())),
            };
        }
        let nonce = B64
            .decode(&sealed.nonce)
            .map_err(|_| SecretError::Corrupt)?;
        let ciphertext = B64
            .decode(&sealed.ciphertext)
            .map_err(|_| SecretError::Corrupt)?;
        if nonce.len() != 12 {
            return Err(SecretError::Corrupt);
        }
        let plain = Zeroizing::new(
            self.cipher
                .decrypt(
                    Nonce::from_slice(&nonce),
                    Payload {
                        msg: &ciphertext,
                        aad: record_id.as_bytes(),
                    },
                )
                .map_err(|_| SecretError::Corrupt)?,
        );
        let text = std::str::from_utf8(&plain).map_err(|_| SecretError::Corrupt)?;
        Ok(SecretString::new(text.to_owned()))
    }
}

/// An `hmac-*` secret encrypted at rest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedSecret {
    pub master_key_id: String,
    /// base64 of the 96-bit GCM nonce.
    pub nonce: String,
    /// base64 of ciphertext ‖ tag.
    pub ciphertext: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `s` has the shape of a public key this gateway mints.
    fn is_public_key_shaped(s: &str) -> bool {
        let rest = s
            .strip_prefix("pk_live_")
            .or_else(|| s.strip_prefix("pk_test_"));
        rest.is_some_and(|r| {
            r.len() == PUBLIC_KEY_RANDOM_LEN && r.bytes().all(|b| b.is_ascii_alphanumeric())
        })
    }

    #[test]
    fn secret_files_are_private_to_their_owner_or_root_and_its_group() {
        assert!(private_mode(0o100600, 1000));
        assert!(private_mode(0o100400, 1000));
        assert!(!private_mode(0o100640, 1000), "group-readable, not root's");
        assert!(private_mode(0o100640, 0));
        assert!(private_mode(0o100440, 0));
        assert!(!private_mode(0o100660, 0), "group-writable");
        assert!(!private_mode(0o100644, 0), "world-readable");
        assert!(!private_mode(0o100604, 1000));
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let s = SecretString::new("sk_live_abc".into());
        assert_eq!(format!("{s:?}"), "SecretString(***)");
    }

    #[test]
    fn generated_keys_have_the_contract_shape() {
        let pk = generate_public_key(Environment::Live);
        assert!(is_public_key_shaped(&pk), "{pk}");
        assert!(pk.starts_with("pk_live_"));
        let sk = generate_secret(Environment::Test);
        assert!(sk.expose().starts_with("sk_test_"));
        assert_eq!(sk.expose().len(), "sk_test_".len() + 43);
        assert!(sk.expose()[8..].bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_eq!(sk.display_prefix().len(), 12);
    }

    #[test]
    fn public_key_shape_is_strict() {
        assert!(!is_public_key_shaped("pk_live_short"));
        assert!(!is_public_key_shaped("pk_prod_aaaaaaaaaaaaaaaaaaaaaaaa"));
        assert!(!is_public_key_shaped("pk_live_aaaaaaaaaaaaaaaaaaaaaaa-"));
        assert!(is_public_key_shaped("pk_test_aaaaaaaaaaaaaaaaaaaaaaaa"));
    }

    #[test]
    fn seal_round_trips_and_is_bound_to_the_record() {
        let (mk, _) = MasterKey::generate();
        let secret = SecretString::new("sk_test_secret".into());
        let sealed = mk.seal(&secret, "key_1");
        assert_eq!(mk.open(&sealed, "key_1").ok(), Some(secret));
        assert!(matches!(
            mk.open(&sealed, "key_2"),
            Err(SecretError::Corrupt)
        ));
        let (other, _) = MasterKey::generate();
        assert!(matches!(
            other.open(&sealed, "key_1"),
            Err(SecretError::UnknownMasterKey(_))
        ));
    }

    #[test]
    fn a_previous_key_opens_what_it_sealed_and_only_the_current_one_seals() {
        let (old, old_text) = MasterKey::generate();
        let (new, _) = MasterKey::generate();
        let secret = SecretString::new("sk_test_secret".into());
        let under_old = old.seal(&secret, "key_1");
        let old_id = old.id().to_owned();
        let both = new.with_previous(old);
        assert_eq!(both.open(&under_old, "key_1").ok(), Some(secret.clone()));
        let resealed = both.seal(&secret, "key_1");
        assert_eq!(resealed.master_key_id, both.id());
        assert!(both.can_open(&old_id) && both.can_open(both.id()));
        // The old key alone cannot open what the new one sealed.
        let old_again = MasterKey::from_base64(old_text.expose()).ok();
        assert!(matches!(
            old_again.map(|k| k.open(&resealed, "key_1")),
            Some(Err(SecretError::UnknownMasterKey(_)))
        ));
        // Given twice, or given itself, a key is kept once.
        let (third, _) = MasterKey::generate();
        let third_id = third.id().to_owned();
        let again = MasterKey::from_base64(old_text.expose()).ok();
        let mut chained = third.with_previous(both);
        if let Some(k) = again {
            chained = chained.with_previous(k);
        }
        let ids: Vec<_> = chained.previous_ids().collect();
        assert_eq!(ids.len(), 2, "{ids:?}");
        assert!(!ids.contains(&third_id.as_str()));
        assert_eq!(chained.open(&under_old, "key_1").ok(), Some(secret));
    }

    #[test]
    fn master_key_must_be_32_bytes_of_base64() {
        assert!(matches!(
            MasterKey::from_base64("not base64!"),
            Err(SecretError::MasterKeyEncoding)
        ));
        assert!(matches!(
            MasterKey::from_base64(&B64.encode([0u8; 16])),
            Err(SecretError::MasterKeyLength(16))
        ));
        let (mk, text) = MasterKey::generate();
        let again = MasterKey::from_base64(text.expose()).ok();
        assert_eq!(again.map(|k| k.id().to_owned()), Some(mk.id().to_owned()));
    }
}
