//! The JSON bodies and queries of key changes, as both the admin API and self-service take them,
//! validated into typed values: every bad field named in one 422.

use std::collections::{BTreeMap, HashMap};

use ipnet::IpNet;
use serde::Deserialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::Error;
use crate::keys::{is_valid_scope, AuthKind, Environment, KeyRecord, NewKey, SecretString};
use crate::limits::credits::{CreditOp, Refill, MAX_CREDITS};
use crate::limits::RateLimit;

const MAX_NAME: usize = 255;
const MAX_OWNER: usize = 255;
const MAX_DESCRIPTION: usize = 1000;
const MAX_SCOPES: usize = 100;
const MAX_ALLOW_LIST: usize = 1000;
const MAX_METADATA: usize = 32;
const MAX_METADATA_KEY: usize = 64;
const MAX_METADATA_VALUE: usize = 512;
pub const MAX_LIMIT: usize = 200;
const MAX_GRACE_SECONDS: i64 = 7 * 24 * 3600;
const DEFAULT_LIMIT: usize = 50;

/// `POST /v1/keys` as sent; strings kept raw so each field gets its own message.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKeyBody {
    owner: Option<String>,
    name: Option<String>,
    description: Option<String>,
    scopes: Option<Vec<String>>,
    ip_allow_list: Option<Vec<String>>,
    expires_at: Option<String>,
    environment: Option<String>,
    auth: Option<String>,
    metadata: Option<BTreeMap<String, String>>,
    tls_client_cert_sha256: Option<String>,
    rate_limits: Option<Vec<RateLimit>>,
    remaining: Option<u64>,
    refill: Option<Refill>,
}

/// `POST /v1/keys/import`: the create fields plus the pair from the other system.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportKeyBody {
    public_key: Option<String>,
    secret: Option<String>,
    owner: Option<String>,
    name: Option<String>,
    description: Option<String>,
    scopes: Option<Vec<String>>,
    ip_allow_list: Option<Vec<String>>,
    expires_at: Option<String>,
    environment: Option<String>,
    auth: Option<String>,
    metadata: Option<BTreeMap<String, String>>,
    tls_client_cert_sha256: Option<String>,
    rate_limits: Option<Vec<RateLimit>>,
    remaining: Option<u64>,
    refill: Option<Refill>,
    /// Imports a public key that was revoked here before (409 without it).
    force: Option<bool>,
}

/// `PATCH /v1/keys/{id}`: only these fields; `null` clears `description` and `expires_at`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchKeyBody {
    name: Option<String>,
    #[serde(default, deserialize_with = "present")]
    description: Option<Option<String>>,
    scopes: Option<Vec<String>>,
    ip_allow_list: Option<Vec<String>>,
    #[serde(default, deserialize_with = "present")]
    expires_at: Option<Option<String>>,
    metadata: Option<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "present")]
    tls_client_cert_sha256: Option<Option<String>>,
    /// `[]` drops the key's own limits: the route's apply again.
    rate_limits: Option<Vec<RateLimit>>,
    /// `null`: no longer metered.
    #[serde(default, deserialize_with = "present")]
    remaining: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present")]
    refill: Option<Option<Refill>>,
}

/// `POST /v1/keys/{id}/credits`: exactly one of `add` and `set`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreditsBody {
    #[serde(default, deserialize_with = "present")]
    add: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present")]
    set: Option<Option<u64>>,
}

/// Tells an absent field (`None`) from an explicit `null` (`Some(None)`).
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    /// A JSON number: JSON Schema counts `20.0` as an integer, so whole floats are accepted.
    grace_seconds: Option<serde_json::Number>,
}

/// Owners travel upstream in `x-keygate-owner`, so they must be valid header text.
fn is_header_safe(s: &str) -> bool {
    s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

fn parse_json<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, Error> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return Error::MalformedJson(format!("request body is not valid JSON: {inner}"));
        }
        let text = inner.to_string();
        // serde names an unknown field only in its message: "unknown field `x`, expected …".
        let unknown = text
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split('`').next())
            .map(|f| (f.to_owned(), "unknown field".to_owned()));
        let (field, msg) = unknown.unwrap_or_else(|| {
            let field = if path == "." { "body".to_owned() } else { path };
            (field, text)
        });
        Error::Validation(BTreeMap::from([(field, msg)]))
    })
}

/// Field checks shared by create, import and update; each problem lands under its field.
#[derive(Default)]
struct Checks(BTreeMap<String, String>);

impl Checks {
    fn err(&mut self, field: &str, msg: &str) {
        self.0.insert(field.to_owned(), msg.to_owned());
    }

    fn finish(self) -> Result<(), Error> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Error::Validation(self.0))
        }
    }

    fn owner(&mut self, owner: Option<String>) -> String {
        let owner = owner.unwrap_or_default();
        if owner.trim().is_empty() {
            self.err("owner", "required");
        } else if owner.len() > MAX_OWNER || !is_header_safe(&owner) {
            self.err("owner", "must be 1-255 printable ASCII characters");
        }
        owner
    }

    fn name(&mut self, name: Option<String>) -> String {
        let name = name.unwrap_or_default();
        if name.trim().is_empty() {
            self.err("name", "required");
        } else if name.chars().count() > MAX_NAME || name.chars().any(char::is_control) {
            self.err(
                "name",
                "must be 1-255 characters without control characters",
            );
        }
        name
    }

    fn description(&mut self, d: Option<String>) -> Option<String> {
        if d.as_ref()
            .is_some_and(|d| d.chars().count() > MAX_DESCRIPTION)
        {
            self.err("description", "must be at most 1000 characters");
        }
        d
    }

    fn scopes(&mut self, scopes: Option<Vec<String>>) -> Vec<String> {
        let scopes = scopes.unwrap_or_default();
        if scopes.len() > MAX_SCOPES {
            self.err("scopes", "at most 100 scopes");
        }
        for (i, s) in scopes.iter().enumerate() {
            if !is_valid_scope(s) {
                self.err(
                    &format!("scopes[{i}]"),
                    "must be lowercase segments joined by '.', optionally ending in '.*', or '*'",
                );
            }
        }
        scopes
    }

    /// A SHA-256 fingerprint: 64 hex digits, optionally in `AA:BB:…` pairs as `openssl x509
    /// -fingerprint -sha256` prints it; stored as plain lowercase hex.
    fn client_cert_sha256(&mut self, raw: Option<String>) -> Option<String> {
        let raw = raw?;
        let plain: String = raw
            .chars()
            .filter(|c| *c != ':')
            .map(|c| c.to_ascii_lowercase())
            .collect();
        if plain.len() != 64 || !plain.bytes().all(|b| b.is_ascii_hexdigit()) {
            self.err(
                "tls_client_cert_sha256",
                "must be the SHA-256 of a certificate: 64 hex digits (colons allowed)",
            );
            return None;
        }
        Some(plain)
    }

    fn credits(&mut self, field: &str, n: u64) -> u64 {
        if n > MAX_CREDITS {
            self.err(field, "must be at most 10^15");
        }
        n
    }

    fn refill(&mut self, r: Refill) -> Refill {
        self.credits("refill.amount", r.amount);
        r
    }

    fn rate_limits(&mut self, limits: Vec<RateLimit>) -> Vec<RateLimit> {
        for (path, msg) in crate::limits::check(&limits) {
            self.err(&format!("rate_limits{path}"), &msg);
        }
        limits
    }

    fn ip_allow_list(&mut self, raw: Option<Vec<String>>) -> Vec<IpNet> {
        let raw = raw.unwrap_or_default();
        if raw.len() > MAX_ALLOW_LIST {
            self.err("ip_allow_list", "at most 1000 entries");
        }
        let mut out = Vec::with_capacity(raw.len());
        for (i, s) in raw.iter().enumerate() {
            match crate::auth::client_ip::parse_net(s) {
                Ok(n) => out.push(n),
                Err(crate::auth::client_ip::NetError::Invalid(_)) => self.err(
                    &format!("ip_allow_list[{i}]"),
                    "must be an IPv4/IPv6 address or CIDR",
                ),
                Err(e) => self.err(&format!("ip_allow_list[{i}]"), &e.to_string()),
            }
        }
        out
    }

    fn expires_at(&mut self, raw: Option<&str>, now: OffsetDateTime) -> Option<OffsetDateTime> {
        match OffsetDateTime::parse(raw?, &Rfc3339) {
            Ok(t) if t > now => Some(t),
            Ok(_) => {
                self.err("expires_at", "must be in the future");
                None
            }
            Err(_) => {
                self.err(
                    "expires_at",
                    "must be an RFC 3339 time like 2027-01-31T00:00:00Z",
                );
                None
            }
        }
    }

    fn environment(&mut self, raw: Option<&str>, default: Environment) -> Environment {
        match raw {
            None => default,
            Some("test") => Environment::Test,
            Some("live") => Environment::Live,
            Some(_) => {
                self.err("environment", "must be \"live\" or \"test\"");
                default
            }
        }
    }

    fn auth(&mut self, raw: Option<&str>) -> AuthKind {
        match raw {
            None => AuthKind::HmacV1,
            Some(s) => AuthKind::parse(s).unwrap_or_else(|| {
                self.err("auth", "must be \"hmac-v1\", \"hmac-body\" or \"bearer\"");
                AuthKind::HmacV1
            }),
        }
    }

    fn metadata(&mut self, m: Option<BTreeMap<String, String>>) -> BTreeMap<String, String> {
        let m = m.unwrap_or_default();
        if m.len() > MAX_METADATA {
            self.err("metadata", "at most 32 entries");
        }
        for (k, v) in &m {
            if k.is_empty() || k.chars().count() > MAX_METADATA_KEY {
                self.err(&format!("metadata.{k}"), "keys must be 1-64 characters");
            } else if v.chars().count() > MAX_METADATA_VALUE {
                self.err(
                    &format!("metadata.{k}"),
                    "values must be at most 512 characters",
                );
            }
        }
        m
    }
}

/// What a create request gets for the fields it leaves out: for an admin, `test`, any address
/// and no expiry; for a key minting through self-service, its own owner, environment,
/// allow-list and expiry ([`super::Principal::defaults`]).
#[derive(Clone, Debug)]
pub struct Defaults {
    pub owner: Option<String>,
    pub environment: Environment,
    pub ip_allow_list: Vec<IpNet>,
    pub expires_at: Option<OffsetDateTime>,
    pub tls_client_cert_sha256: Option<String>,
    pub rate_limits: Vec<RateLimit>,
}

impl Default for Defaults {
    fn default() -> Self {
        Self {
            owner: None,
            environment: Environment::Test,
            ip_allow_list: Vec::new(),
            expires_at: None,
            tls_client_cert_sha256: None,
            rate_limits: Vec::new(),
        }
    }
}

/// Validates a create request into a [`NewKey`], absent fields taken from `defaults`.
pub fn create_body(body: &[u8], now: OffsetDateTime, defaults: &Defaults) -> Result<NewKey, Error> {
    let b: CreateKeyBody = parse_json(body)?;
    let mut c = Checks::default();
    let new = NewKey {
        owner: c.owner(b.owner.or_else(|| defaults.owner.clone())),
        name: c.name(b.name),
        description: c.description(b.description),
        scopes: c.scopes(b.scopes),
        ip_allow_list: match b.ip_allow_list {
            Some(raw) => c.ip_allow_list(Some(raw)),
            None => defaults.ip_allow_list.clone(),
        },
        expires_at: match b.expires_at.as_deref() {
            Some(raw) => c.expires_at(Some(raw), now),
            None => defaults.expires_at,
        },
        environment: c.environment(b.environment.as_deref(), defaults.environment),
        auth: c.auth(b.auth.as_deref()),
        metadata: c.metadata(b.metadata),
        tls_client_cert_sha256: match b.tls_client_cert_sha256 {
            Some(raw) => c.client_cert_sha256(Some(raw)),
            None => defaults.tls_client_cert_sha256.clone(),
        },
        rate_limits: match b.rate_limits {
            Some(l) => c.rate_limits(l),
            None => defaults.rate_limits.clone(),
        },
        remaining: b.remaining.map(|n| c.credits("remaining", n)),
        refill: b.refill.map(|r| c.refill(r)),
    };
    c.finish().map(|()| new)
}

/// Validates an import: the pair as given (the secret is used as text, exactly), plus the
/// create fields. `environment` defaults from a `pk_live_`/`pk_test_` prefix, else `test`.
/// A validated import: the key's fields, its pair, and whether the operator forces the import
/// of a public key revoked before.
pub struct Import {
    pub new: NewKey,
    pub public_key: String,
    pub secret: SecretString,
    pub force: bool,
}

pub fn import_body(body: &[u8], now: OffsetDateTime) -> Result<Import, Error> {
    let b: ImportKeyBody = parse_json(body)?;
    let mut c = Checks::default();
    let public_key = b.public_key.unwrap_or_default();
    if !crate::keys::secret::is_valid_public_key(&public_key) {
        c.err(
            "public_key",
            "required: 1-128 characters of A-Z a-z 0-9 _ -",
        );
    }
    let secret = SecretString::new(b.secret.unwrap_or_default());
    if secret.expose().is_empty()
        || secret.expose().len() > 1024
        || secret.expose().chars().any(char::is_control)
    {
        c.err(
            "secret",
            "required: 1-1024 characters without control characters",
        );
    }
    let default_env = if public_key.starts_with("pk_live_") {
        Environment::Live
    } else {
        Environment::Test
    };
    let new = NewKey {
        owner: c.owner(b.owner),
        name: c.name(b.name),
        description: c.description(b.description),
        scopes: c.scopes(b.scopes),
        ip_allow_list: c.ip_allow_list(b.ip_allow_list),
        expires_at: c.expires_at(b.expires_at.as_deref(), now),
        environment: c.environment(b.environment.as_deref(), default_env),
        auth: c.auth(b.auth.as_deref()),
        metadata: c.metadata(b.metadata),
        tls_client_cert_sha256: c.client_cert_sha256(b.tls_client_cert_sha256),
        rate_limits: c.rate_limits(b.rate_limits.unwrap_or_default()),
        remaining: b.remaining.map(|n| c.credits("remaining", n)),
        refill: b.refill.map(|r| c.refill(r)),
    };
    c.finish().map(|()| Import {
        new,
        public_key,
        secret,
        force: b.force.unwrap_or(false),
    })
}

/// A validated `PATCH`: each field present is replaced; `Some(None)` clears it.
#[derive(Clone, Debug, Default)]
pub struct Patch {
    pub name: Option<String>,
    pub description: Option<Option<String>>,
    pub scopes: Option<Vec<String>>,
    pub ip_allow_list: Option<Vec<IpNet>>,
    pub expires_at: Option<Option<OffsetDateTime>>,
    pub metadata: Option<BTreeMap<String, String>>,
    /// `Some(None)` unbinds the key from its client certificate.
    pub tls_client_cert_sha256: Option<Option<String>>,
    pub rate_limits: Option<Vec<RateLimit>>,
    /// `Some(None)`: no longer metered; `Some(Some(n))`: metered, `remaining` set to `n`.
    pub remaining: Option<Option<u64>>,
    pub refill: Option<Option<Refill>>,
}

/// Validates a `PATCH` body.
pub fn patch_body(body: &[u8], now: OffsetDateTime) -> Result<Patch, Error> {
    let b: PatchKeyBody = parse_json(body)?;
    let mut c = Checks::default();
    let patch = Patch {
        name: b.name.map(|n| c.name(Some(n))),
        description: b.description.map(|d| c.description(d)),
        scopes: b.scopes.map(|s| c.scopes(Some(s))),
        ip_allow_list: b.ip_allow_list.map(|ips| c.ip_allow_list(Some(ips))),
        expires_at: b
            .expires_at
            .map(|e| e.and_then(|raw| c.expires_at(Some(&raw), now))),
        metadata: b.metadata.map(|m| c.metadata(Some(m))),
        tls_client_cert_sha256: b
            .tls_client_cert_sha256
            .map(|h| h.and_then(|raw| c.client_cert_sha256(Some(raw)))),
        rate_limits: b.rate_limits.map(|l| c.rate_limits(l)),
        remaining: b.remaining.map(|r| r.map(|n| c.credits("remaining", n))),
        refill: b.refill.map(|r| r.map(|r| c.refill(r))),
    };
    c.finish().map(|()| patch)
}

impl Patch {
    /// Applies the patch to `record`; returns the names of the fields it sets.
    pub fn apply(&self, record: &mut KeyRecord) -> Vec<String> {
        let mut changed = Vec::new();
        let mut set = |field: &str| changed.push(field.to_owned());
        if let Some(name) = &self.name {
            record.name.clone_from(name);
            set("name");
        }
        if let Some(d) = &self.description {
            record.description.clone_from(d);
            set("description");
        }
        if let Some(s) = &self.scopes {
            record.scopes.clone_from(s);
            set("scopes");
        }
        if let Some(ips) = &self.ip_allow_list {
            record.ip_allow_list.clone_from(ips);
            set("ip_allow_list");
        }
        if let Some(e) = self.expires_at {
            record.expires_at = e;
            set("expires_at");
        }
        if let Some(m) = &self.metadata {
            record.metadata.clone_from(m);
            set("metadata");
        }
        if let Some(h) = &self.tls_client_cert_sha256 {
            record.tls_client_cert_sha256.clone_from(h);
            set("tls_client_cert_sha256");
        }
        if let Some(l) = &self.rate_limits {
            record.rate_limits.clone_from(l);
            set("rate_limits");
        }
        if let Some(r) = self.refill {
            record.refill = r;
            record.metered |= r.is_some();
            set("refill");
        }
        if let Some(r) = self.remaining {
            record.metered = r.is_some();
            if r.is_none() {
                record.refill = None;
            }
            set("remaining");
        }
        changed
    }
}

/// Validates a credits change.
pub fn credits_body(body: &[u8]) -> Result<CreditOp, Error> {
    let b: CreditsBody = parse_json(body)?;
    let mut c = Checks::default();
    let op = match (b.add, b.set) {
        (Some(Some(n)), None) => CreditOp::Add(c.credits("add", n)),
        (None, Some(Some(n))) => CreditOp::Set(c.credits("set", n)),
        _ => {
            c.err("body", "give exactly one of \"add\" and \"set\"");
            CreditOp::Add(0)
        }
    };
    c.finish().map(|()| op)
}

/// `grace_seconds` of a rotation: 0 (the default) to 7 days. An empty body means 0.
/// A body must say it is JSON: without this, a browser's "simple" cross-site form post
/// (`text/plain`) carrying JSON would be read like any other. A request without a body needs
/// no Content-Type.
pub fn require_json(content_type: Option<&[u8]>, body: &[u8]) -> Result<(), Error> {
    if body.is_empty() {
        return Ok(());
    }
    let essence = content_type
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.split(';').next())
        .map(str::trim);
    match essence {
        Some(t) if t.eq_ignore_ascii_case("application/json") => Ok(()),
        _ => Err(Error::UnsupportedMediaType),
    }
}

pub fn rotate_body(body: &[u8]) -> Result<time::Duration, Error> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(time::Duration::ZERO);
    }
    let b: RotateBody = parse_json(body)?;
    let secs = match b.grace_seconds {
        None => Some(0),
        Some(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && (0.0..=MAX_GRACE_SECONDS as f64).contains(f))
                .map(|f| f as i64)
        }),
    };
    let Some(secs) = secs.filter(|s| (0..=MAX_GRACE_SECONDS).contains(s)) else {
        return Err(Error::Validation(BTreeMap::from([(
            "grace_seconds".to_owned(),
            "must be a whole number of seconds from 0 to 604800 (7 days)".to_owned(),
        )])));
    };
    Ok(time::Duration::seconds(secs))
}

/// The query of `GET /v1/keys`.
pub struct ListQuery<'a> {
    pub owner: Option<&'a str>,
    pub cursor: Option<&'a str>,
    pub limit: usize,
    pub environment: Option<&'a str>,
    pub status: Option<&'a str>,
}

/// `owner`, `cursor`, `limit` (1–200, default 50), `environment`, `status`.
pub fn list_query(q: &HashMap<String, String>) -> Result<ListQuery<'_>, Error> {
    let mut errors = BTreeMap::new();
    for k in q.keys() {
        if !["owner", "cursor", "limit", "environment", "status"].contains(&k.as_str()) {
            errors.insert(k.clone(), "unknown query parameter".to_owned());
        }
    }
    let limit = parse_limit(q, &mut errors);
    let get = |k: &str| q.get(k).map(String::as_str).filter(|s| !s.is_empty());
    // Present but empty is not "absent" for an enumerated filter.
    let environment = q.get("environment").map(String::as_str);
    if environment.is_some_and(|e| !["live", "test"].contains(&e)) {
        errors.insert("environment".into(), "must be live or test".into());
    }
    let status = q.get("status").map(String::as_str);
    if status.is_some_and(|s| !["active", "revoked", "expired"].contains(&s)) {
        errors.insert("status".into(), "must be active, revoked or expired".into());
    }
    if !errors.is_empty() {
        return Err(Error::Validation(errors));
    }
    Ok(ListQuery {
        owner: get("owner"),
        cursor: get("cursor"),
        limit,
        environment,
        status,
    })
}

/// The query of `GET /v1/audit`.
pub struct AuditQuery<'a> {
    pub key_id: Option<&'a str>,
    pub owner: Option<&'a str>,
    pub cursor: Option<&'a str>,
    pub limit: usize,
}

/// `key_id`, `owner`, `cursor`, `limit` (1–200, default 50).
pub fn audit_query(q: &HashMap<String, String>) -> Result<AuditQuery<'_>, Error> {
    let mut errors = BTreeMap::new();
    for k in q.keys() {
        if !["key_id", "owner", "cursor", "limit"].contains(&k.as_str()) {
            errors.insert(k.clone(), "unknown query parameter".to_owned());
        }
    }
    let limit = parse_limit(q, &mut errors);
    if !errors.is_empty() {
        return Err(Error::Validation(errors));
    }
    let get = |k: &str| q.get(k).map(String::as_str).filter(|s| !s.is_empty());
    Ok(AuditQuery {
        key_id: get("key_id"),
        owner: get("owner"),
        cursor: get("cursor"),
        limit,
    })
}

fn parse_limit(q: &HashMap<String, String>, errors: &mut BTreeMap<String, String>) -> usize {
    match q.get("limit") {
        None => DEFAULT_LIMIT,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => {
                errors.insert(
                    "limit".into(),
                    "must be a whole number from 1 to 200".into(),
                );
                DEFAULT_LIMIT
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create_body_t(body: &[u8], now: OffsetDateTime) -> Result<NewKey, Error> {
        create_body(body, now, &Defaults::default())
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_767_225_600).unwrap()
    }

    #[test]
    fn minimal_body_gets_defaults() {
        let k = create_body_t(br#"{"owner":"acme","name":"checkout"}"#, now()).unwrap();
        assert_eq!(k.environment, Environment::Test);
        assert_eq!(k.auth, AuthKind::HmacV1);
        assert!(k.scopes.is_empty());
    }

    #[test]
    fn every_bad_field_is_named() {
        let body = br#"{"name":"","scopes":["ok.scope","Bad"],"ip_allow_list":["10.0.0.0/33"],
            "expires_at":"2020-01-01T00:00:00Z","environment":"prod","auth":"hmac-v9"}"#;
        let Err(Error::Validation(errors)) = create_body_t(body, now()) else {
            panic!("expected validation errors");
        };
        let fields: Vec<&str> = errors.keys().map(String::as_str).collect();
        assert_eq!(
            fields,
            vec![
                "auth",
                "environment",
                "expires_at",
                "ip_allow_list[0]",
                "name",
                "owner",
                "scopes[1]"
            ]
        );
    }

    #[test]
    fn malformed_json_is_not_a_validation_error() {
        assert!(matches!(
            create_body_t(b"{\"owner\":", now()),
            Err(Error::MalformedJson(_))
        ));
        assert!(matches!(
            create_body_t(br#"{"owner":"a","name":"b","colour":"red"}"#, now()),
            Err(Error::Validation(_))
        ));
        assert!(matches!(
            create_body_t(br#"{"owner":"a","name":"b","scopes":"x"}"#, now()),
            Err(Error::Validation(e)) if e.contains_key("scopes")
        ));
    }
}
