//! The key lifecycle: mint, import, read, update, rotate, revoke and delete, with who may do
//! what, the audit entry, the compare-and-set write and cache invalidation — in one place and
//! with no HTTP in it. The admin API and self-service on the proxy are thin adapters: parse,
//! call, render.
//!
//! Rules, checked here once for every operation:
//! - an admin token may do anything;
//! - a key (self-service, scope `keys.manage`) sees keys of its own owner whose every power it
//!   holds itself — scopes within its own, same environment, an allow-list at least as narrow,
//!   an expiry no later, limits no looser — and keys it minted; anything else is "not found";
//! - it changes (rotates, revokes) only keys whose every power it holds *now*: a key it minted
//!   while it was broader, and that it no longer covers, is visible but refused ("forbidden"),
//!   or narrowing a key would leave it a way back to the powers it lost;
//! - a key mints only keys within its own powers, and only creates, reads, lists, rotates and
//!   revokes (import, update and delete are the operators');
//! - every change is a compare-and-set on the record's `version`, retried on conflict, and
//!   revocation is final.

pub mod input;
pub mod view;

use std::collections::BTreeMap;
use std::sync::Arc;

use ipnet::IpNet;
use time::OffsetDateTime;

use crate::auth::client_ip::AllowList;
use crate::cache::KeyCache;
use crate::clock::Clock;
use crate::keys::{
    self, scopes_grant, Action, Actor, AuditEntry, AuditPage, Environment, KeyRecord, KeyStore,
    MasterKey, NewKey, SecretString, StoreError, Write,
};
use crate::limits::credits::{CreditOp, CreditStore};
use crate::metrics::{KeyChange, Metrics};
use crate::problem::ErrorCode;

pub use input::{Defaults, ListQuery, Patch};

/// How many times a change is re-read and re-applied when another writer changed the record
/// between our read and our write. Writers on one gateway queue on a per-key lock first, so
/// this is spent only on writers of other gateways sharing the store.
const CAS_ATTEMPTS: u32 = 16;

/// Stripes of per-key write locks: one gateway's changes to one key queue up (fairly, so a
/// revocation is not starved by a client rotating in a loop) instead of racing each other.
const LOCK_STRIPES: usize = 64;

/// Why a lifecycle operation failed. `Display` is the client-facing detail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no key with this id or public key")]
    NotFound,
    #[error("{0}")]
    MalformedJson(String),
    #[error("send the body as Content-Type: application/json")]
    UnsupportedMediaType,
    #[error("one or more fields are invalid")]
    Validation(BTreeMap<String, String>),
    #[error("a key with this public key or secret already exists")]
    Conflict,
    #[error("the key is revoked; revocation is final")]
    Revoked,
    #[error("a key with this public key was revoked before; revocation is final (send \"force\": true to import it anyway)")]
    RevokedBefore,
    #[error("a bearer key with this secret was revoked before; revocation is final (send \"force\": true to import it anyway)")]
    SecretRevokedBefore,
    #[error("the key kept changing while this change was being made; try again")]
    Contended,
    #[error("the key store is unavailable")]
    StoreUnavailable,
    /// A key may see the target but not change it: it lacks some of the target's powers.
    #[error("your key does not hold every power of this key; ask an operator")]
    Forbidden(BTreeMap<String, String>),
}

impl Error {
    /// The contract's code for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::NotFound => ErrorCode::NotFound,
            Self::MalformedJson(_) => ErrorCode::MalformedJson,
            Self::UnsupportedMediaType => ErrorCode::UnsupportedMediaType,
            Self::Validation(_) => ErrorCode::ValidationFailed,
            Self::Conflict
            | Self::Revoked
            | Self::RevokedBefore
            | Self::SecretRevokedBefore
            | Self::Contended => ErrorCode::Conflict,
            Self::StoreUnavailable => ErrorCode::StoreUnavailable,
            // The code self-service already answers a key lacking what a call needs.
            Self::Forbidden(_) => ErrorCode::InsufficientScope,
        }
    }

    /// Field → message, for a validation failure or the powers a forbidden change lacks.
    pub fn errors(&self) -> Option<&BTreeMap<String, String>> {
        match self {
            Self::Validation(e) | Self::Forbidden(e) => Some(e),
            _ => None,
        }
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict => Self::Conflict,
            StoreError::NotFound => Self::NotFound,
            StoreError::RevokedFinal => Self::Revoked,
            StoreError::VersionConflict => Self::Contended,
            other => {
                tracing::error!(error = %other, "key store operation failed");
                Self::StoreUnavailable
            }
        }
    }
}

/// Who is acting.
#[derive(Clone, Debug)]
pub enum Principal {
    /// An admin token, by its non-secret id (first 12 hex characters of its SHA-256).
    Admin { token_id: String },
    /// A key holding `keys.manage`, through self-service.
    Key(Box<KeyPowers>),
}

/// What a key may do, read from its record when it acts.
#[derive(Clone, Debug)]
pub struct KeyPowers {
    pub key_id: String,
    pub owner: String,
    pub scopes: Vec<String>,
    pub environment: Environment,
    pub ip_allow_list: Vec<IpNet>,
    /// `ip_allow_list` as ranges, for containment checks.
    allow: AllowList,
    pub expires_at: Option<OffsetDateTime>,
    pub tls_client_cert_sha256: Option<String>,
    pub rate_limits: Vec<crate::limits::RateLimit>,
    pub metered: bool,
}

/// The powers of a key (or of one about to be minted), as [`KeyPowers::lacks`] compares them.
#[derive(Clone, Copy)]
struct Powers<'a> {
    scopes: &'a [String],
    environment: Environment,
    ip_allow_list: &'a [IpNet],
    expires_at: Option<OffsetDateTime>,
    client_cert: Option<&'a str>,
    rate_limits: &'a [crate::limits::RateLimit],
    metered: bool,
}

impl<'a> Powers<'a> {
    fn of_record(r: &'a KeyRecord) -> Self {
        Self {
            scopes: &r.scopes,
            environment: r.environment,
            ip_allow_list: &r.ip_allow_list,
            expires_at: r.expires_at,
            client_cert: r.tls_client_cert_sha256.as_deref(),
            rate_limits: &r.rate_limits,
            metered: r.metered,
        }
    }
}

impl KeyPowers {
    pub fn of(record: &KeyRecord) -> Self {
        Self {
            key_id: record.id.clone(),
            owner: record.owner.clone(),
            scopes: record.scopes.clone(),
            environment: record.environment,
            ip_allow_list: record.ip_allow_list.clone(),
            allow: AllowList::new(&record.ip_allow_list),
            expires_at: record.expires_at,
            tls_client_cert_sha256: record.tls_client_cert_sha256.clone(),
            rate_limits: record.rate_limits.clone(),
            metered: record.metered,
        }
    }

    /// Every power of a key with these fields that this key lacks, as field → message;
    /// empty when this key holds them all.
    fn lacks(&self, other: &Powers<'_>) -> BTreeMap<String, String> {
        let Powers {
            scopes,
            environment,
            ip_allow_list,
            expires_at,
            client_cert,
            rate_limits,
            metered,
        } = *other;
        let mut out = BTreeMap::new();
        // A metered key's requests spend credits: one that spends none is more than it has.
        if self.metered && !metered {
            out.insert(
                "remaining".into(),
                "must be metered (have credits) like your key".into(),
            );
        }
        for (i, s) in scopes.iter().enumerate() {
            if !scopes_grant(&self.scopes, s) {
                out.insert(
                    format!("scopes[{i}]"),
                    "you can only grant scopes you hold".into(),
                );
            }
        }
        if environment != self.environment {
            out.insert(
                "environment".into(),
                format!(
                    "must be {}, the environment of your key",
                    self.environment.as_str()
                ),
            );
        }
        // An empty list means any address: only a key without an allow-list can grant that.
        if !self.allow.is_empty() {
            if ip_allow_list.is_empty() {
                out.insert(
                    "ip_allow_list".into(),
                    "must be within your key's allow-list".into(),
                );
            }
            for (i, net) in ip_allow_list.iter().enumerate() {
                if !self.allow.covers(net) {
                    out.insert(
                        format!("ip_allow_list[{i}]"),
                        "must be within your key's allow-list".into(),
                    );
                }
            }
        }
        // A key bound to a client certificate can only mint keys bound to the same one.
        if let Some(mine) = &self.tls_client_cert_sha256 {
            if client_cert != Some(mine.as_str()) {
                out.insert(
                    "tls_client_cert_sha256".into(),
                    "must be your key's client certificate".into(),
                );
            }
        }
        // Each of this key's limits must be matched, by name, by one no more generous.
        for mine in &self.rate_limits {
            if !rate_limits
                .iter()
                .any(|l| l.name == mine.name && l.within(mine))
            {
                out.insert(
                    "rate_limits".into(),
                    format!(
                        "must include {:?} at no more than {} per {}, your key's limit",
                        mine.name,
                        mine.limit,
                        crate::limits::window_string(mine.window)
                    ),
                );
            }
        }
        if let Some(mine) = self.expires_at {
            if expires_at.is_none_or(|theirs| theirs > mine) {
                out.insert(
                    "expires_at".into(),
                    "must be no later than your key's expiry".into(),
                );
            }
        }
        out
    }

    /// Whether this key may see `target`: same owner, and it minted the target or holds
    /// every power the target has.
    pub fn may_see(&self, target: &KeyRecord) -> bool {
        target.owner == self.owner
            && (target.created_by.as_deref() == Some(self.key_id.as_str())
                || self.lacks(&Powers::of_record(target)).is_empty())
    }

    /// Whether this key may change `target`: same owner and every power the target has,
    /// held now. Having minted it is not enough: the minter may have been narrowed since.
    pub fn may_change(&self, target: &KeyRecord) -> Result<(), Error> {
        if target.owner != self.owner {
            return Err(Error::NotFound);
        }
        let lacks = self.lacks(&Powers::of_record(target));
        if lacks.is_empty() {
            Ok(())
        } else {
            Err(Error::Forbidden(lacks))
        }
    }
}

impl Principal {
    /// The audit log's name for this principal.
    pub fn actor(&self) -> Actor {
        match self {
            Self::Admin { token_id } => Actor::Admin {
                token_id: token_id.clone(),
            },
            Self::Key(p) => Actor::Key {
                key_id: p.key_id.clone(),
            },
        }
    }

    /// What a create request gets for the fields it leaves out: a key's own owner,
    /// environment, allow-list and expiry.
    pub fn defaults(&self) -> Defaults {
        match self {
            Self::Admin { .. } => Defaults::default(),
            Self::Key(p) => Defaults {
                owner: Some(p.owner.clone()),
                environment: p.environment,
                ip_allow_list: p.ip_allow_list.clone(),
                expires_at: p.expires_at,
                tls_client_cert_sha256: p.tls_client_cert_sha256.clone(),
                rate_limits: p.rate_limits.clone(),
            },
        }
    }

    fn key(&self) -> Option<&KeyPowers> {
        match self {
            Self::Admin { .. } => None,
            Self::Key(p) => Some(p),
        }
    }

    /// Operators only: a key asking is told there is nothing there.
    fn admin_only(&self) -> Result<(), Error> {
        match self {
            Self::Admin { .. } => Ok(()),
            Self::Key(_) => Err(Error::NotFound),
        }
    }
}

/// The lifecycle operations over one store, shared by every adapter.
pub struct Lifecycle {
    store: Arc<dyn KeyStore>,
    cache: Arc<KeyCache>,
    master: Arc<MasterKey>,
    metrics: Metrics,
    clock: Arc<dyn Clock>,
    /// Metered keys' `remaining`.
    credits: Arc<dyn CreditStore>,
    /// Per-key write locks, by a hash of the key id.
    locks: Box<[tokio::sync::Mutex<()>]>,
}

/// The names of the fields a new record sets, for its audit entry.
fn set_fields(r: &KeyRecord) -> Vec<String> {
    let optional = [
        ("description", r.description.is_some()),
        ("scopes", !r.scopes.is_empty()),
        ("ip_allow_list", !r.ip_allow_list.is_empty()),
        ("expires_at", r.expires_at.is_some()),
        ("metadata", !r.metadata.is_empty()),
    ];
    ["owner", "name", "environment", "auth"]
        .into_iter()
        .chain(optional.into_iter().filter(|(_, set)| *set).map(|(f, _)| f))
        .map(str::to_owned)
        .collect()
}

impl Lifecycle {
    pub fn new(
        store: Arc<dyn KeyStore>,
        cache: Arc<KeyCache>,
        master: Arc<MasterKey>,
        metrics: Metrics,
        clock: Arc<dyn Clock>,
        credits: Arc<dyn CreditStore>,
    ) -> Self {
        Self {
            store,
            cache,
            master,
            metrics,
            clock,
            credits,
            locks: (0..LOCK_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        }
    }

    fn lock_for(&self, id: &str) -> &tokio::sync::Mutex<()> {
        use std::hash::BuildHasher;
        let h = foldhash::fast::FixedState::default().hash_one(id);
        let i = usize::try_from(h).unwrap_or(0) % self.locks.len();
        &self.locks[i]
    }

    pub fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }

    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.store
    }

    /// The principal of a key acting through self-service, from its current record.
    pub async fn key_principal(&self, key_id: &str) -> Result<Principal, Error> {
        let record = self.store.get_by_id(key_id).await?.ok_or(Error::NotFound)?;
        Ok(Principal::Key(Box::new(KeyPowers::of(&record))))
    }

    fn audit(
        &self,
        who: &Principal,
        action: Action,
        r: &KeyRecord,
        fields: Vec<String>,
    ) -> AuditEntry {
        AuditEntry::new(
            self.clock.now(),
            who.actor(),
            action,
            &r.id,
            &r.owner,
            fields,
        )
    }

    /// Adds a new record with its audit entry; forgets any negative cache entry for it.
    async fn insert(
        &self,
        who: &Principal,
        action: Action,
        record: &KeyRecord,
    ) -> Result<(), Error> {
        let audit = self.audit(who, action, record, set_fields(record));
        self.store
            .write(Write::Insert(record), Some(&audit))
            .await?;
        // A negative entry for this public key (or bearer hash) must not outlive its creation.
        self.cache.invalidate(record).await;
        self.metrics.key_changed(KeyChange::Created);
        Ok(())
    }

    /// Mints a key. A key minting through self-service gets a child within its own powers,
    /// recorded as minted by it.
    pub async fn mint(
        &self,
        who: &Principal,
        new: NewKey,
    ) -> Result<(KeyRecord, SecretString), Error> {
        if let Some(p) = who.key() {
            let mut problems = p.lacks(&Powers {
                scopes: &new.scopes,
                environment: new.environment,
                ip_allow_list: &new.ip_allow_list,
                expires_at: new.expires_at,
                client_cert: new.tls_client_cert_sha256.as_deref(),
                rate_limits: &new.rate_limits,
                metered: new.remaining.is_some() || new.refill.is_some(),
            });
            if p.metered {
                // Credits cannot be handed on: a child's would come from nowhere.
                problems.insert(
                    "remaining".into(),
                    "a metered key cannot mint keys; ask an operator".into(),
                );
            }
            if new.owner != p.owner {
                problems.insert(
                    "owner".into(),
                    "you can only mint keys for your own owner".into(),
                );
            }
            if !problems.is_empty() {
                return Err(Error::Validation(problems));
            }
        }
        let start = new.remaining.or(new.refill.map(|r| r.amount));
        let (mut record, secret) = keys::mint(&self.master, new, self.clock.now());
        record.created_by = who.key().map(|p| p.key_id.clone());
        self.start_credits(&record, start).await?;
        self.insert(who, Action::Create, &record).await?;
        tracing::info!(key_id = %record.id, owner = %record.owner, "key created");
        Ok((record, secret))
    }

    /// Brings an existing key pair from another system (operators only). A public key revoked
    /// here before, even one whose record was deleted since, comes back only when `force`d:
    /// otherwise a leaked pair, revoked and cleaned up, could be brought back by mistake.
    pub async fn import(
        &self,
        who: &Principal,
        new: NewKey,
        public_key: String,
        secret: &SecretString,
        force: bool,
    ) -> Result<KeyRecord, Error> {
        who.admin_only()?;
        if !force && self.store.was_revoked(&public_key).await? {
            return Err(Error::RevokedBefore);
        }
        // A bearer secret authenticates alone: a new public key around a revoked one would
        // revive it. An hmac secret needs its public key, whose tombstone is checked above.
        if !force
            && new.auth == keys::AuthKind::Bearer
            && self.store.secret_was_revoked(&secret.sha256()).await?
        {
            return Err(Error::SecretRevokedBefore);
        }
        let start = new.remaining.or(new.refill.map(|r| r.amount));
        let record = keys::build_record(&self.master, new, public_key, secret, self.clock.now());
        self.start_credits(&record, start).await?;
        self.insert(who, Action::Import, &record).await?;
        tracing::info!(key_id = %record.id, owner = %record.owner, "key imported");
        Ok(record)
    }

    /// A metered key's counter, set before its record is written (a counter without a record
    /// is harmless; a metered record without a counter would refuse every request).
    async fn start_credits(&self, record: &KeyRecord, start: Option<u64>) -> Result<(), Error> {
        if record.metered {
            let refill = record.refill.map(|r| r.at(self.clock.now()));
            self.credits
                .adjust(&record.id, CreditOp::Set(start.unwrap_or(0)), refill)
                .await?;
        }
        Ok(())
    }

    /// A metered key's `remaining` now; `None` for a key that is not metered.
    pub async fn remaining(&self, record: &KeyRecord) -> Result<Option<u64>, Error> {
        if !record.metered {
            return Ok(None);
        }
        let refill = record.refill.map(|r| r.at(self.clock.now()));
        Ok(Some(self.credits.remaining(&record.id, refill).await?))
    }

    /// The record as the API shows it, with `remaining` read from the credit counter.
    pub async fn view(
        &self,
        record: &KeyRecord,
        secret: Option<&SecretString>,
    ) -> Result<serde_json::Value, Error> {
        let mut v = view::key_json(record, secret);
        if let Some(obj) = v.as_object_mut() {
            obj.insert("remaining".into(), self.remaining(record).await?.into());
        }
        Ok(v)
    }

    /// [`Self::view`] of each record, without secrets.
    pub async fn views(&self, records: &[KeyRecord]) -> Result<Vec<serde_json::Value>, Error> {
        let mut out = Vec::with_capacity(records.len());
        for r in records {
            out.push(self.view(r, None).await?);
        }
        Ok(out)
    }

    /// Adds to or sets a metered key's credits, atomically (operators only); the record and
    /// the new `remaining`.
    pub async fn credits(
        &self,
        who: &Principal,
        id: &str,
        op: CreditOp,
    ) -> Result<(KeyRecord, u64), Error> {
        who.admin_only()?;
        let record = self.get(who, id).await?;
        if !record.metered {
            return Err(Error::Validation(BTreeMap::from([(
                "remaining".to_owned(),
                "the key is not metered: give it credits with PATCH {\"remaining\": N} first"
                    .to_owned(),
            )])));
        }
        let refill = record.refill.map(|r| r.at(self.clock.now()));
        let remaining = self.credits.adjust(&record.id, op, refill).await?;
        let audit = self.audit(who, Action::Credits, &record, vec!["remaining".into()]);
        self.store.import_audit(&audit).await?;
        tracing::info!(key_id = %record.id, remaining, "credits changed");
        Ok((record, remaining))
    }

    /// A key by id or public key, if `who` may see it.
    pub async fn get(&self, who: &Principal, id: &str) -> Result<KeyRecord, Error> {
        let found = match self.store.get_by_id(id).await? {
            Some(r) => Some(r),
            None => self.store.get_by_public_key(id).await?,
        };
        found
            .filter(|r| who.key().is_none_or(|p| p.may_see(r)))
            .ok_or(Error::NotFound)
    }

    /// One page of the keys `who` may see, newest first, filtered by `q`.
    pub async fn list(
        &self,
        who: &Principal,
        q: &ListQuery<'_>,
    ) -> Result<(Vec<KeyRecord>, Option<String>), Error> {
        let owner = who.key().map_or(q.owner, |p| Some(p.owner.as_str()));
        let now = self.clock.now();
        let wanted = |r: &KeyRecord| {
            q.environment.is_none_or(|e| r.environment.as_str() == e)
                && q.status.is_none_or(|s| view::status_of(r, now) == s)
                && who.key().is_none_or(|p| p.may_see(r))
        };
        // Filters apply after the store's page, so keep reading pages until this one is full.
        let mut items = Vec::with_capacity(q.limit);
        let mut cursor = q.cursor.map(str::to_owned);
        let next_cursor = loop {
            let page = self.store.list(owner, cursor.as_deref(), q.limit).await?;
            let mut full_at = None;
            for r in page.items {
                if wanted(&r) {
                    items.push(r);
                    if items.len() == q.limit {
                        full_at = items.last().map(|r: &KeyRecord| r.id.clone());
                        break;
                    }
                }
            }
            match (full_at, page.next_cursor) {
                (Some(id), _) => break Some(id),
                (None, Some(c)) => cursor = Some(c),
                (None, None) => break None,
            }
        };
        Ok((items, next_cursor))
    }

    /// Changes `name`, `description`, `scopes`, `ip_allow_list`, `expires_at`, `metadata`
    /// (operators only).
    pub async fn update(
        &self,
        who: &Principal,
        id: &str,
        patch: &Patch,
    ) -> Result<KeyRecord, Error> {
        who.admin_only()?;
        if let Some(Some(n)) = patch.remaining {
            // Before the record says metered, so no request sees a metered key without credits.
            let refill = patch.refill.flatten().map(|r| r.at(self.clock.now()));
            self.credits
                .adjust(&self.get(who, id).await?.id, CreditOp::Set(n), refill)
                .await?;
        }
        let (record, _) = self
            .change(who, id, Action::Update, KeyChange::Updated, |r, _| {
                let fields = patch.apply(r);
                Ok((!fields.is_empty()).then_some((fields, ())))
            })
            .await?;
        if patch.remaining == Some(None) {
            self.credits.forget(&record.id).await?;
        }
        Ok(record)
    }

    /// Gives the key a new secret; the old one keeps working for `grace`. A revoked key is
    /// not rotated (409): revocation is final.
    pub async fn rotate(
        &self,
        who: &Principal,
        id: &str,
        grace: time::Duration,
    ) -> Result<(KeyRecord, SecretString), Error> {
        let master = &self.master;
        let (record, secret) = self
            .change(who, id, Action::Rotate, KeyChange::Rotated, |r, now| {
                if r.revoked_at.is_some() {
                    return Err(Error::Revoked);
                }
                let secret = keys::rotate(master, r, grace, now);
                Ok(Some((vec!["secret".to_owned()], secret)))
            })
            .await?;
        let secret = secret.ok_or(Error::Contended)?;
        tracing::info!(key_id = %record.id, grace_seconds = grace.whole_seconds(), "key rotated");
        Ok((record, secret))
    }

    /// Refuses the key from now on, everywhere. Revoking a revoked key changes nothing.
    pub async fn revoke(&self, who: &Principal, id: &str) -> Result<KeyRecord, Error> {
        let (record, done) = self
            .change(who, id, Action::Revoke, KeyChange::Revoked, |r, now| {
                if r.revoked_at.is_some() {
                    return Ok(None);
                }
                r.revoked_at = Some(now);
                Ok(Some((vec!["revoked_at".to_owned()], ())))
            })
            .await?;
        if done.is_some() {
            tracing::info!(key_id = %record.id, "key revoked");
        }
        Ok(record)
    }

    /// Removes the key (operators only).
    pub async fn delete(&self, who: &Principal, id: &str) -> Result<(), Error> {
        who.admin_only()?;
        let record = self.get(who, id).await?;
        if let Some(p) = who.key() {
            p.may_change(&record)?;
        }
        let audit = self.audit(who, Action::Delete, &record, Vec::new());
        if !self
            .store
            .write(Write::Delete(&record.id), Some(&audit))
            .await?
        {
            return Err(Error::NotFound);
        }
        self.cache.invalidate(&record).await;
        if record.metered {
            self.credits.forget(&record.id).await?;
        }
        self.metrics.key_changed(KeyChange::Deleted);
        tracing::info!(key_id = %record.id, "key deleted");
        Ok(())
    }

    /// Audit entries, newest first (operators only).
    pub async fn audit_log(
        &self,
        who: &Principal,
        q: &input::AuditQuery<'_>,
    ) -> Result<AuditPage, Error> {
        who.admin_only()?;
        Ok(self
            .store
            .list_audit(q.key_id, q.owner, q.cursor, q.limit)
            .await?)
    }

    /// Read, check, change, write with compare-and-set on `version`; re-read and re-applied
    /// when another writer got there first. `apply` returns the changed field names and its
    /// output, or `None` when there is nothing to change (then nothing is written).
    async fn change<T>(
        &self,
        who: &Principal,
        id: &str,
        action: Action,
        change: KeyChange,
        apply: impl Fn(&mut KeyRecord, OffsetDateTime) -> Result<Option<(Vec<String>, T)>, Error>,
    ) -> Result<(KeyRecord, Option<T>), Error> {
        // Resolve a public key to the id first, so both spellings take the same lock.
        let key_id = self.get(who, id).await?.id;
        let _queued = self.lock_for(&key_id).lock().await;
        for attempt in 0..CAS_ATTEMPTS {
            if attempt > 0 {
                // Another gateway wrote between our read and write: step aside a little,
                // at random, so two gateways do not collide again in lockstep.
                let ms = rand::random::<u64>() % (1 << attempt.min(6));
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            }
            let before = self.get(who, &key_id).await?;
            // Checked on every read: the record (or the acting key) may have changed since.
            if let Some(p) = who.key() {
                p.may_change(&before)?;
            }
            let mut after = before.clone();
            let now = self.clock.now();
            let Some((fields, out)) = apply(&mut after, now)? else {
                // A stale cache entry must never outlive this call, even when nothing changed.
                self.cache.invalidate(&before).await;
                return Ok((before, None));
            };
            after.updated_at = now;
            after.version = before.version.saturating_add(1);
            let audit = self.audit(who, action, &after, fields);
            match self.store.write(Write::Update(&after), Some(&audit)).await {
                Ok(_) => {
                    self.cache.invalidate(&before).await;
                    self.cache.invalidate(&after).await;
                    self.metrics.key_changed(change);
                    return Ok((after, Some(out)));
                }
                Err(StoreError::VersionConflict) => {
                    tracing::debug!(key_id = %before.id, "record changed under us; retrying");
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Contended)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(scopes: &[&str], env: Environment, allow: &[&str], exp: Option<i64>) -> KeyRecord {
        let (mk, _) = MasterKey::generate();
        let new = NewKey {
            owner: "acme".into(),
            name: "k".into(),
            description: None,
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            ip_allow_list: allow.iter().filter_map(|a| a.parse().ok()).collect(),
            expires_at: exp.and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok()),
            environment: env,
            auth: keys::AuthKind::HmacV1,
            metadata: BTreeMap::new(),
            tls_client_cert_sha256: None,
            rate_limits: vec![],
            remaining: None,
            refill: None,
        };
        keys::mint(&mk, new, OffsetDateTime::UNIX_EPOCH).0
    }

    #[test]
    fn a_key_acts_only_on_keys_within_its_powers_or_minted_by_it() {
        let t = Environment::Test;
        let me = KeyPowers::of(&record(
            &["keys.manage", "payments.*"],
            t,
            &["10.0.0.0/8"],
            Some(2_000_000_000),
        ));
        let within = record(&["payments.read"], t, &["10.1.0.0/16"], Some(1_900_000_000));
        assert!(me.may_see(&within));
        assert!(me.may_change(&within).is_ok());
        for (why, other) in [
            ("wider scope", record(&["*"], t, &["10.1.0.0/16"], Some(1))),
            (
                "other environment",
                record(&[], Environment::Live, &["10.0.0.1/32"], Some(1)),
            ),
            ("any address", record(&[], t, &[], Some(1))),
            ("address outside", record(&[], t, &["11.0.0.0/8"], Some(1))),
            ("never expires", record(&[], t, &["10.0.0.1/32"], None)),
            (
                "expires later",
                record(&[], t, &["10.0.0.1/32"], Some(2_000_000_001)),
            ),
        ] {
            assert!(!me.may_see(&other), "{why}");
            let mut minted = other.clone();
            minted.created_by = Some(me.key_id.clone());
            assert!(me.may_see(&minted), "{why}, but minted by me");
            // Seen, but not changed: the minter no longer holds what the key holds.
            assert!(
                matches!(me.may_change(&minted), Err(Error::Forbidden(ref e)) if !e.is_empty()),
                "{why}: a minted key beyond my powers is not mine to change"
            );
            let mut elsewhere = minted;
            elsewhere.owner = "globex".into();
            assert!(!me.may_see(&elsewhere), "{why}, another owner");
        }
    }

    #[test]
    fn a_key_without_limits_holds_every_narrower_power() {
        let t = Environment::Test;
        let me = KeyPowers::of(&record(&["*"], t, &[], None));
        assert!(me.may_see(&record(&["*"], t, &[], None)));
        assert!(me.may_see(&record(&["a.b"], t, &["1.2.3.4/32"], Some(5))));
        assert!(!me.may_see(&record(&["a.b"], Environment::Live, &[], None)));
    }

    #[test]
    fn a_key_with_limits_grants_only_limits_within_them() {
        use crate::limits::RateLimit;
        let l = |name: &str, limit: u64, secs: u64| RateLimit {
            name: name.into(),
            limit,
            window: std::time::Duration::from_secs(secs),
        };
        let t = Environment::Test;
        let mut mine = record(&["*"], t, &[], None);
        mine.rate_limits = vec![l("burst", 100, 1), l("daily", 1000, 86_400)];
        let me = KeyPowers::of(&mine);
        let who = Principal::Key(Box::new(me.clone()));
        assert_eq!(who.defaults().rate_limits, mine.rate_limits, "inherited");
        let with = |limits: Vec<RateLimit>| {
            let mut r = record(&["a.b"], t, &[], None);
            r.rate_limits = limits;
            r
        };
        assert!(me.may_see(&with(mine.rate_limits)));
        assert!(me.may_see(&with(vec![
            l("burst", 10, 1),
            l("daily", 1000, 86_400),
            l("extra", 1, 1)
        ])));
        for (why, limits) in [
            ("none: unlimited", vec![]),
            ("daily missing", vec![l("burst", 100, 1)]),
            (
                "larger burst",
                vec![l("burst", 101, 1), l("daily", 1000, 86_400)],
            ),
            (
                "faster rate",
                vec![l("burst", 100, 1), l("daily", 1000, 3600)],
            ),
            ("renamed", vec![l("b", 100, 1), l("daily", 1000, 86_400)]),
        ] {
            assert!(!me.may_see(&with(limits)), "{why}");
        }
    }

    #[test]
    fn a_key_bound_to_a_client_certificate_binds_what_it_mints() {
        let t = Environment::Test;
        let mut mine = record(&["*"], t, &[], None);
        mine.tls_client_cert_sha256 = Some("ab".repeat(32));
        let me = KeyPowers::of(&mine);
        let who = Principal::Key(Box::new(me.clone()));
        assert_eq!(who.defaults().tls_client_cert_sha256, Some("ab".repeat(32)));
        let mut same = record(&["a.b"], t, &[], None);
        same.tls_client_cert_sha256 = Some("ab".repeat(32));
        assert!(me.may_see(&same));
        let unbound = record(&["a.b"], t, &[], None);
        assert!(!me.may_see(&unbound), "unbound is more than I have");
        let mut other = unbound;
        other.tls_client_cert_sha256 = Some("cd".repeat(32));
        assert!(!me.may_see(&other));
    }
}
