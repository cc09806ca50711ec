//! The audit log: one entry per change to a key, kept in the same store as the keys.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Who made a change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Actor {
    /// An admin token, by a non-secret id: the first 12 hex characters of its SHA-256, which
    /// is what operators configure in `admin.token_sha256`.
    Admin { token_id: String },
    /// A key with `keys.manage` acting on its own owner's keys (self-service).
    Key { key_id: String },
}

/// What was done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Create,
    Import,
    Update,
    Rotate,
    Revoke,
    Delete,
    /// `remaining` credits added or set (`POST /v1/keys/{id}/credits`).
    Credits,
}

/// One recorded change. Never holds a secret: `fields` names what changed, not its value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// `aud_` + UUIDv7: time-ordered, so newest-first listing is a reverse scan.
    pub id: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub actor: Actor,
    pub action: Action,
    pub key_id: String,
    pub owner: String,
    pub fields: Vec<String>,
}

impl AuditEntry {
    pub fn new(
        at: OffsetDateTime,
        actor: Actor,
        action: Action,
        key_id: &str,
        owner: &str,
        fields: Vec<String>,
    ) -> Self {
        Self {
            id: format!("aud_{}", uuid::Uuid::now_v7()),
            at,
            actor,
            action,
            key_id: key_id.to_owned(),
            owner: owner.to_owned(),
            fields,
        }
    }
}

/// One page of a newest-first audit listing.
#[derive(Debug, Default)]
pub struct AuditPage {
    pub items: Vec<AuditEntry>,
    pub next_cursor: Option<String>,
}
