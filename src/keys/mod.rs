//! API keys: the record, secrets and their sealing, the `KeyStore` trait and its backends
//! (embedded redb, Redis).

pub mod audit;
mod copy;
mod embedded;
mod model;
mod nonce_log;
mod redis;
pub mod secret;
mod store;

use std::collections::BTreeMap;

use ipnet::IpNet;

use http::HeaderValue;

use crate::auth::client_ip::AllowList;
use time::OffsetDateTime;

pub use self::redis::{NonceDurability, MAX_REPLICATION_TIMEOUT};
pub use self::redis::{RedisStore, RedisTarget, SentinelTarget};
pub use audit::{Action, Actor, AuditEntry, AuditPage};
pub use copy::{copy_audit, copy_key, copy_store, CopyReport, Walk};
pub use embedded::{EmbeddedStore, NONCE_BATCH_WINDOW};
pub use model::{
    is_valid_scope, new_key_id, scopes_grant, AuthKind, AuthKinds, KeyRecord, PreviousCredential,
    StoredCredential,
};
pub use secret::{Environment, MasterKey, SecretString};
pub use store::{ChangeSink, KeyStore, Page, SigningKeyStore, StoreError, Usage, Versioned, Write};

/// Restricts `path` to its owner (`mode`: 0o600 for files, 0o700 for directories), whatever
/// the umask made of it: store files hold sealed secrets and usage.
pub(crate) fn owner_only(path: &std::path::Path, mode: u32) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
    }
    #[cfg(not(unix))]
    {
        let _ = (path, mode);
        Ok(())
    }
}

/// Everything a new key is made from, already validated.
#[derive(Clone, Debug)]
pub struct NewKey {
    pub owner: String,
    pub name: String,
    pub description: Option<String>,
    pub scopes: Vec<String>,
    pub ip_allow_list: Vec<IpNet>,
    pub expires_at: Option<OffsetDateTime>,
    pub environment: Environment,
    pub auth: AuthKind,
    pub metadata: BTreeMap<String, String>,
    /// Lowercase hex SHA-256 of the client certificate (DER) requests must come with.
    pub tls_client_cert_sha256: Option<String>,
    pub rate_limits: Vec<crate::limits::RateLimit>,
    /// Credits to start with; `None` (and no refill): not metered.
    pub remaining: Option<u64>,
    pub refill: Option<crate::limits::credits::Refill>,
}

impl NewKey {
    /// A key of `owner` and `auth` with nothing else set: test environment, no scopes, no
    /// limits (tools, tests and fuzzing start from it and set what they need).
    pub fn plain(owner: &str, name: &str, auth: AuthKind) -> Self {
        Self {
            owner: owner.to_owned(),
            name: name.to_owned(),
            description: None,
            scopes: Vec::new(),
            ip_allow_list: Vec::new(),
            expires_at: None,
            environment: Environment::Test,
            auth,
            metadata: BTreeMap::new(),
            tls_client_cert_sha256: None,
            rate_limits: Vec::new(),
            remaining: None,
            refill: None,
        }
    }
}

/// Builds a record with fresh id, public key and secret. The secret is returned once, for the
/// response; the record holds it only sealed (hmac kinds) or hashed (bearer).
pub fn mint(master: &MasterKey, new: NewKey, now: OffsetDateTime) -> (KeyRecord, SecretString) {
    let public_key = secret::generate_public_key(new.environment);
    let secret = secret::generate_secret(new.environment);
    let record = build_record(master, new, public_key, &secret, now);
    (record, secret)
}

/// Builds a record around a given key pair (import, and [`mint`]).
pub fn build_record(
    master: &MasterKey,
    new: NewKey,
    public_key: String,
    secret: &SecretString,
    now: OffsetDateTime,
) -> KeyRecord {
    let id = new_key_id();
    let credential = match new.auth {
        AuthKind::Bearer => StoredCredential::Sha256 {
            hash: hex::encode(secret.sha256()),
        },
        AuthKind::HmacV1 | AuthKind::HmacBody => StoredCredential::Sealed(master.seal(secret, &id)),
    };
    KeyRecord {
        id,
        public_key,
        secret_prefix: secret.display_prefix(),
        owner: new.owner,
        name: new.name,
        description: new.description,
        scopes: new.scopes,
        ip_allow_list: new.ip_allow_list,
        expires_at: new.expires_at,
        environment: new.environment,
        auth: new.auth,
        metadata: new.metadata,
        tls_client_cert_sha256: new.tls_client_cert_sha256,
        rate_limits: new.rate_limits,
        metered: new.remaining.is_some() || new.refill.is_some(),
        refill: new.refill,
        created_at: now,
        updated_at: now,
        revoked_at: None,
        last_used_at: None,
        total_requests: 0,
        credential,
        previous: None,
        version: 1,
        created_by: None,
    }
}

/// Seals (hmac kinds) or hashes (bearer) `secret` for the record `record_id`.
pub fn store_credential(
    master: &MasterKey,
    auth: AuthKind,
    secret: &SecretString,
    record_id: &str,
) -> StoredCredential {
    match auth {
        AuthKind::Bearer => StoredCredential::Sha256 {
            hash: hex::encode(secret.sha256()),
        },
        AuthKind::HmacV1 | AuthKind::HmacBody => {
            StoredCredential::Sealed(master.seal(secret, record_id))
        }
    }
}

/// Gives `record` a fresh secret. With a `grace` period the old credential keeps working
/// until `now + grace`; a rotation always ends any earlier grace at once.
pub fn rotate(
    master: &MasterKey,
    record: &mut KeyRecord,
    grace: time::Duration,
    now: OffsetDateTime,
) -> SecretString {
    let secret = secret::generate_secret(record.environment);
    let fresh = store_credential(master, record.auth, &secret, &record.id);
    let old = std::mem::replace(&mut record.credential, fresh);
    record.previous = grace.is_positive().then(|| PreviousCredential {
        credential: old,
        until: now + grace,
    });
    record.secret_prefix = secret.display_prefix();
    record.updated_at = now;
    secret
}

/// A key ready for verification, as the cache holds it: what a request needs and nothing else
/// (no sealed blobs, names, metadata or counters), so a cached key stays small; the secret
/// is already unsealed (hmac kinds) or its hash known (bearer). Built once per cache fill,
/// shared by every request that uses the key.
#[derive(Debug)]
pub struct ActiveKey {
    /// `x-keygate-key-id`, `x-keygate-owner` and `x-keygate-scopes` (space-separated) as sent
    /// upstream, made once: cloning a `HeaderValue` shares its bytes.
    pub id: HeaderValue,
    pub owner: HeaderValue,
    pub scopes: HeaderValue,
    pub environment: Environment,
    pub auth: AuthKind,
    pub revoked_at: Option<OffsetDateTime>,
    pub expires_at: Option<OffsetDateTime>,
    pub secret: Option<SecretString>,
    pub bearer_hash: Option<[u8; 32]>,
    /// The rotated-out secret or hash and the end of its grace, if a grace may still run.
    pub previous: Option<Box<PreviousActive>>,
    /// SHA-256 of the client certificate the key is bound to (`tls_client_cert_sha256`).
    pub client_cert_sha256: Option<[u8; 32]>,
    /// The record's `ip_allow_list` as ranges.
    pub allow: AllowList,
    /// The key's own rate limits (empty: the route's apply).
    pub rate_limits: Vec<crate::limits::RateLimit>,
    /// Requests spend credits; refilled so.
    pub metered: bool,
    pub refill: Option<crate::limits::credits::Refill>,
}

/// Why a stored record cannot become an [`ActiveKey`].
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error(transparent)]
    Seal(#[from] secret::SecretError),
    #[error("the record's {0} cannot be sent in a header")]
    Header(&'static str),
    #[error("the record's {0} is malformed")]
    Malformed(&'static str),
}

/// The previous credential of a key in its rotation grace, ready for verification.
#[derive(Debug)]
pub struct PreviousActive {
    pub secret: Option<SecretString>,
    pub bearer_hash: Option<[u8; 32]>,
    pub until: OffsetDateTime,
}

fn open_credential(
    credential: &StoredCredential,
    master: &MasterKey,
    record_id: &str,
) -> Result<Option<SecretString>, secret::SecretError> {
    match credential {
        StoredCredential::Sealed(sealed) => master.open(sealed, record_id).map(Some),
        StoredCredential::Sha256 { .. } => Ok(None),
    }
}

impl ActiveKey {
    /// Opens the record's sealed secret(s) with the master key and keeps what requests need.
    pub fn open(record: &KeyRecord, master: &MasterKey) -> Result<Self, ActivateError> {
        let secret = open_credential(&record.credential, master, &record.id)?;
        let previous = match &record.previous {
            Some(p) => Some(Box::new(PreviousActive {
                secret: open_credential(&p.credential, master, &record.id)?,
                bearer_hash: p.credential.bearer_hash(),
                until: p.until,
            })),
            None => None,
        };
        // One buffer for the three header values: one allocation, shared by their slices, so
        // a request's clone is a reference count and never allocates.
        let scopes = record.scopes.join(" ");
        let mut text = String::with_capacity(record.id.len() + record.owner.len() + scopes.len());
        let mut ranges = [0..0, 0..0, 0..0];
        for (range, part) in ranges.iter_mut().zip([&record.id, &record.owner, &scopes]) {
            let start = text.len();
            text.push_str(part);
            *range = start..text.len();
        }
        let buffer = bytes::Bytes::from(text);
        let [id, owner, scopes] = ranges;
        // Visible ASCII only: a header value may also hold bytes above 0x7F, which `id()`
        // and `owner()` could not read back, so a record with such an id (only a damaged or
        // hostile store holds one; the admin API refuses it) would share the empty id's
        // nonces and counters. Found by fuzzing (fuzz/regressions/store_record).
        let header = |range: std::ops::Range<usize>, field| {
            HeaderValue::from_maybe_shared(buffer.slice(range))
                .ok()
                .filter(|v| v.to_str().is_ok())
                .ok_or(ActivateError::Header(field))
        };
        Ok(Self {
            id: header(id, "id")?,
            owner: header(owner, "owner")?,
            scopes: header(scopes, "scopes")?,
            environment: record.environment,
            auth: record.auth,
            revoked_at: record.revoked_at,
            expires_at: record.expires_at,
            secret,
            bearer_hash: record.bearer_hash(),
            previous,
            allow: AllowList::new(&record.ip_allow_list),
            rate_limits: record.rate_limits.clone(),
            metered: record.metered,
            refill: record.refill,
            client_cert_sha256: match &record.tls_client_cert_sha256 {
                None => None,
                Some(h) => {
                    let mut out = [0u8; 32];
                    hex::decode_to_slice(h, &mut out)
                        .map_err(|_| ActivateError::Malformed("tls_client_cert_sha256"))?;
                    Some(out)
                }
            },
        })
    }

    /// The key's id (`key_…`).
    pub fn id(&self) -> &str {
        // Built from a &str in `open`, so always visible ASCII.
        self.id.to_str().unwrap_or_default()
    }

    pub fn owner(&self) -> &str {
        self.owner.to_str().unwrap_or_default()
    }

    pub fn scopes(&self) -> impl Iterator<Item = &str> {
        self.scopes
            .to_str()
            .unwrap_or_default()
            .split(' ')
            .filter(|s| !s.is_empty())
    }
}
