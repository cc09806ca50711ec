//! Validation of admin request bodies and queries: every bad field named in one 422.

use std::collections::{BTreeMap, HashMap};

use ipnet::IpNet;
use serde::Deserialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::AdminError;
use crate::keys::{is_valid_scope, AuthKind, Environment, NewKey};

const MAX_NAME: usize = 255;
const MAX_OWNER: usize = 255;
const MAX_DESCRIPTION: usize = 1000;
const MAX_SCOPES: usize = 100;
const MAX_ALLOW_LIST: usize = 1000;
const MAX_METADATA: usize = 32;
const MAX_METADATA_KEY: usize = 64;
const MAX_METADATA_VALUE: usize = 512;
pub(super) const MAX_LIMIT: usize = 200;
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
}

/// Owners travel upstream in `x-keygate-owner`, so they must be valid header text.
fn is_header_safe(s: &str) -> bool {
    s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

fn parse_json<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, AdminError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            AdminError::MalformedJson(format!("request body is not valid JSON: {inner}"))
        } else {
            let field = if path == "." { "body".to_owned() } else { path };
            AdminError::Validation(BTreeMap::from([(field, inner.to_string())]))
        }
    })
}

/// Validates a create request into a [`NewKey`].
pub(super) fn create_body(body: &[u8], now: OffsetDateTime) -> Result<NewKey, AdminError> {
    let b: CreateKeyBody = parse_json(body)?;
    let mut errors = BTreeMap::new();
    let mut err = |field: &str, msg: &str| {
        errors.insert(field.to_owned(), msg.to_owned());
    };

    let owner = b.owner.unwrap_or_default();
    if owner.trim().is_empty() {
        err("owner", "required");
    } else if owner.len() > MAX_OWNER || !is_header_safe(&owner) {
        err("owner", "must be 1-255 printable ASCII characters");
    }
    let name = b.name.unwrap_or_default();
    let name_len = name.chars().count();
    if name.trim().is_empty() {
        err("name", "required");
    } else if name_len > MAX_NAME || name.chars().any(char::is_control) {
        err(
            "name",
            "must be 1-255 characters without control characters",
        );
    }
    if b.description
        .as_ref()
        .is_some_and(|d| d.chars().count() > MAX_DESCRIPTION)
    {
        err("description", "must be at most 1000 characters");
    }
    let scopes = b.scopes.unwrap_or_default();
    if scopes.len() > MAX_SCOPES {
        err("scopes", "at most 100 scopes");
    }
    for (i, s) in scopes.iter().enumerate() {
        if !is_valid_scope(s) {
            err(
                &format!("scopes[{i}]"),
                "must be lowercase segments joined by '.', optionally ending in '.*', or '*'",
            );
        }
    }
    let raw_ips = b.ip_allow_list.unwrap_or_default();
    if raw_ips.len() > MAX_ALLOW_LIST {
        err("ip_allow_list", "at most 1000 entries");
    }
    let mut ip_allow_list = Vec::with_capacity(raw_ips.len());
    for (i, s) in raw_ips.iter().enumerate() {
        match s
            .parse::<IpNet>()
            .ok()
            .or_else(|| s.parse::<std::net::IpAddr>().ok().map(IpNet::from))
        {
            Some(n) => ip_allow_list.push(n.trunc()),
            None => err(
                &format!("ip_allow_list[{i}]"),
                "must be an IPv4/IPv6 address or CIDR",
            ),
        }
    }
    let expires_at = match b.expires_at.as_deref() {
        None => None,
        Some(s) => match OffsetDateTime::parse(s, &Rfc3339) {
            Ok(t) if t > now => Some(t),
            Ok(_) => {
                err("expires_at", "must be in the future");
                None
            }
            Err(_) => {
                err(
                    "expires_at",
                    "must be an RFC 3339 time like 2027-01-31T00:00:00Z",
                );
                None
            }
        },
    };
    let environment = match b.environment.as_deref() {
        None | Some("test") => Environment::Test,
        Some("live") => Environment::Live,
        Some(_) => {
            err("environment", "must be \"live\" or \"test\"");
            Environment::Test
        }
    };
    let auth = match b.auth.as_deref() {
        None => AuthKind::HmacV1,
        Some(s) => AuthKind::parse(s).unwrap_or_else(|| {
            err("auth", "must be \"hmac-v1\", \"hmac-body\" or \"bearer\"");
            AuthKind::HmacV1
        }),
    };
    let metadata = b.metadata.unwrap_or_default();
    if metadata.len() > MAX_METADATA {
        err("metadata", "at most 32 entries");
    }
    for (k, v) in &metadata {
        if k.is_empty() || k.chars().count() > MAX_METADATA_KEY {
            err(&format!("metadata.{k}"), "keys must be 1-64 characters");
        } else if v.chars().count() > MAX_METADATA_VALUE {
            err(
                &format!("metadata.{k}"),
                "values must be at most 512 characters",
            );
        }
    }

    if !errors.is_empty() {
        return Err(AdminError::Validation(errors));
    }
    Ok(NewKey {
        owner,
        name,
        description: b.description,
        scopes,
        ip_allow_list,
        expires_at,
        environment,
        auth,
        metadata,
    })
}

/// `owner`, `cursor`, `limit` (1–200, default 50) of `GET /v1/keys`.
pub(super) fn list_query(
    q: &HashMap<String, String>,
) -> Result<(Option<&str>, Option<&str>, usize), AdminError> {
    let mut errors = BTreeMap::new();
    for k in q.keys() {
        if !["owner", "cursor", "limit"].contains(&k.as_str()) {
            errors.insert(k.clone(), "unknown query parameter".to_owned());
        }
    }
    let limit = match q.get("limit") {
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
    };
    if !errors.is_empty() {
        return Err(AdminError::Validation(errors));
    }
    let owner = q.get("owner").map(String::as_str).filter(|s| !s.is_empty());
    let cursor = q
        .get("cursor")
        .map(String::as_str)
        .filter(|s| !s.is_empty());
    Ok((owner, cursor, limit))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_767_225_600).unwrap()
    }

    #[test]
    fn minimal_body_gets_defaults() {
        let k = create_body(br#"{"owner":"acme","name":"checkout"}"#, now()).unwrap();
        assert_eq!(k.environment, Environment::Test);
        assert_eq!(k.auth, AuthKind::HmacV1);
        assert!(k.scopes.is_empty());
    }

    #[test]
    fn every_bad_field_is_named() {
        let body = br#"{"name":"","scopes":["ok.scope","Bad"],"ip_allow_list":["10.0.0.0/33"],
            "expires_at":"2020-01-01T00:00:00Z","environment":"prod","auth":"hmac-v9"}"#;
        let Err(AdminError::Validation(errors)) = create_body(body, now()) else {
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
            create_body(b"{\"owner\":", now()),
            Err(AdminError::MalformedJson(_))
        ));
        assert!(matches!(
            create_body(br#"{"owner":"a","name":"b","colour":"red"}"#, now()),
            Err(AdminError::Validation(_))
        ));
        assert!(matches!(
            create_body(br#"{"owner":"a","name":"b","scopes":"x"}"#, now()),
            Err(AdminError::Validation(e)) if e.contains_key("scopes")
        ));
    }
}
