//! A key record as the admin API and self-service show it (JSON); the secret only when minted.

use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::keys::{KeyRecord, SecretString};

fn rfc3339(t: Option<OffsetDateTime>) -> Value {
    t.and_then(|t| t.format(&Rfc3339).ok())
        .map_or(Value::Null, Value::String)
}

/// The record as JSON; `secret` only in the create, import and rotate responses.
pub fn key_json(r: &KeyRecord, secret: Option<&SecretString>) -> Value {
    let mut v = json!({
        "id": r.id,
        "public_key": r.public_key,
        "secret_prefix": r.secret_prefix,
        "owner": r.owner,
        "name": r.name,
        "description": r.description,
        "scopes": r.scopes,
        "ip_allow_list": r.ip_allow_list.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "tls_client_cert_sha256": r.tls_client_cert_sha256,
        "rate_limits": r.rate_limits,
        "refill": r.refill,
        "expires_at": rfc3339(r.expires_at),
        "environment": r.environment.as_str(),
        "auth": r.auth.as_str(),
        "metadata": r.metadata,
        "created_at": rfc3339(Some(r.created_at)),
        "updated_at": rfc3339(Some(r.updated_at)),
        "revoked_at": rfc3339(r.revoked_at),
        "last_used_at": rfc3339(r.last_used_at),
        "total_requests": r.total_requests,
        "version": r.version,
        "created_by": r.created_by,
    });
    if let (Some(s), Some(obj)) = (secret, v.as_object_mut()) {
        obj.insert("secret".into(), Value::String(s.expose().to_owned()));
    }
    v
}

/// `status` of a key as the list filter sees it.
pub fn status_of(r: &KeyRecord, now: OffsetDateTime) -> &'static str {
    if r.revoked_at.is_some() {
        "revoked"
    } else if r.expires_at.is_some_and(|e| e <= now) {
        "expired"
    } else {
        "active"
    }
}
