//! The admin API (SPEC §5) on its own listener: mint, read, list and revoke keys, plus
//! `/healthz` and `/readyz`. Every `/v1/` call needs an admin bearer token.

mod validate;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Extension, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::Duration;
use time::OffsetDateTime;

use crate::cache::KeyCache;
use crate::clock::Clock;
use crate::keys::{
    build_record, mint, rotate, Action, Actor, AuditEntry, KeyRecord, KeyStore, MasterKey,
    SecretString, StoreError, Write,
};
use crate::metrics::{KeyChange, Metrics};
use crate::problem::{self, ErrorCode};

/// What the admin handlers share.
pub struct AdminState {
    pub store: Arc<dyn KeyStore>,
    pub cache: Arc<KeyCache>,
    pub master: Arc<MasterKey>,
    pub metrics: Metrics,
    pub clock: Arc<dyn Clock>,
    /// SHA-256 of every accepted admin token.
    pub token_hashes: Vec<[u8; 32]>,
    /// The proxy listener, probed by `/readyz`.
    pub proxy_addr: SocketAddr,
}

tokio::task_local! {
    /// The request id of the admin request being served, for error bodies.
    static REQUEST_ID: String;
}

/// An admin API failure; rendered as problem+json by [`IntoResponse`].
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("send Authorization: Bearer <admin token>")]
    Unauthorized,
    #[error("no key with this id or public key")]
    NotFound,
    #[error("no such admin endpoint")]
    NoSuchEndpoint,
    #[error("this resource does not support this method")]
    MethodNotAllowed,
    #[error("{0}")]
    MalformedJson(String),
    #[error("one or more fields are invalid")]
    Validation(std::collections::BTreeMap<String, String>),
    #[error("a key with this public key or secret already exists")]
    Conflict,
    #[error("the key store is unavailable")]
    StoreUnavailable,
}

impl AdminError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Unauthorized => ErrorCode::Unauthorized,
            Self::NotFound | Self::NoSuchEndpoint => ErrorCode::NotFound,
            Self::MethodNotAllowed => ErrorCode::MethodNotAllowed,
            Self::MalformedJson(_) => ErrorCode::MalformedJson,
            Self::Validation(_) => ErrorCode::ValidationFailed,
            Self::Conflict => ErrorCode::Conflict,
            Self::StoreUnavailable => ErrorCode::StoreUnavailable,
        }
    }
}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict => Self::Conflict,
            StoreError::NotFound => Self::NotFound,
            other => {
                tracing::error!(error = %other, "admin store operation failed");
                Self::StoreUnavailable
            }
        }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let code = self.code();
        let request_id = REQUEST_ID.try_with(Clone::clone).unwrap_or_default();
        let errors = match &self {
            Self::Validation(e) => Some(e),
            _ => None,
        };
        let body = problem::render(code, &self.to_string(), &request_id, errors);
        let status =
            StatusCode::from_u16(code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, body).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(problem::CONTENT_TYPE),
        );
        if matches!(self, Self::Unauthorized) {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// The OpenAPI 3.1 document of this API, checked in at `docs/openapi.json`.
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

/// Every `/v1` route: one table, so a test can hold it against the OpenAPI document.
fn v1_routes() -> Vec<(&'static str, MethodRouter<Arc<AdminState>>)> {
    vec![
        ("/v1/keys", post(create_key).get(list_keys)),
        ("/v1/keys/import", post(import_key)),
        (
            "/v1/keys/{id}",
            get(get_key).patch(patch_key).delete(delete_key),
        ),
        ("/v1/keys/{id}/rotate", post(rotate_key)),
        ("/v1/keys/{id}/revoke", post(revoke_key)),
        ("/v1/audit", get(list_audit)),
        (
            "/v1/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        ),
    ]
}

/// The admin router; tests can drive it with `oneshot` without a socket.
pub fn router(state: Arc<AdminState>) -> Router {
    let v1 = v1_routes()
        .into_iter()
        .fold(Router::new(), |r, (path, methods)| r.route(path, methods))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            require_admin,
        ));
    Router::new()
        .route(
            "/healthz",
            get(|| async { axum::Json(json!({"status": "ok"})) }),
        )
        .route("/readyz", get(readyz))
        .merge(v1)
        .fallback(|| async { AdminError::NoSuchEndpoint })
        .method_not_allowed_fallback(|| async { AdminError::MethodNotAllowed })
        .layer(middleware::from_fn(with_request_id))
        .with_state(state)
}

/// Gives every response an `x-request-id` (the client's, if sent) and error bodies the same id.
pub async fn with_request_id(req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| (1..=128).contains(&v.len()))
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
    let mut resp = REQUEST_ID.scope(id.clone(), next.run(req)).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

async fn require_admin(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
    mut req: Request,
    next: Next,
) -> Result<Response, AdminError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or(AdminError::Unauthorized)?;
    let hash = SecretString::new(token.to_owned()).sha256();
    // Check every accepted hash so the time taken does not say which one matched.
    let accepted = state
        .token_hashes
        .iter()
        .fold(false, |ok, h| crate::keys::secret::ct_eq(h, &hash) | ok);
    if !accepted {
        return Err(AdminError::Unauthorized);
    }
    req.extensions_mut().insert(Actor::Admin {
        token_id: hex::encode(&hash[..6]),
    });
    Ok(next.run(req).await)
}

async fn readyz(State(state): State<Arc<AdminState>>) -> Response {
    let store_ok = state.store.ping().await.is_ok();
    let probe = if state.proxy_addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], state.proxy_addr.port()))
    } else {
        state.proxy_addr
    };
    let proxy_ok = tokio::net::TcpStream::connect(probe).await.is_ok();
    let status = if store_ok && proxy_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(json!({"store": store_ok, "proxy_listener": proxy_ok})),
    )
        .into_response()
}

fn rfc3339(t: Option<OffsetDateTime>) -> Value {
    t.and_then(|t| t.format(&Rfc3339).ok())
        .map_or(Value::Null, Value::String)
}

/// A record as the admin API shows it; the secret only when just minted.
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
        "expires_at": rfc3339(r.expires_at),
        "environment": r.environment.as_str(),
        "auth": r.auth.as_str(),
        "metadata": r.metadata,
        "created_at": rfc3339(Some(r.created_at)),
        "updated_at": rfc3339(Some(r.updated_at)),
        "revoked_at": rfc3339(r.revoked_at),
        "last_used_at": rfc3339(r.last_used_at),
        "total_requests": r.total_requests,
    });
    if let (Some(s), Some(obj)) = (secret, v.as_object_mut()) {
        obj.insert("secret".into(), Value::String(s.expose().to_owned()));
    }
    v
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

fn entry(
    state: &AdminState,
    actor: &Actor,
    action: Action,
    r: &KeyRecord,
    fields: Vec<String>,
) -> AuditEntry {
    AuditEntry::new(
        state.clock.now(),
        actor.clone(),
        action,
        &r.id,
        &r.owner,
        fields,
    )
}

async fn create_key(
    State(state): State<Arc<AdminState>>,
    Extension(actor): Extension<Actor>,
    caller: Caller,
    body: Bytes,
) -> Result<Response, AdminError> {
    let now = state.clock.now();
    let own_owner = caller.as_ref().map(|Extension(c)| c.owner.as_str());
    let new = validate::create_body(&body, now, own_owner)?;
    if let Some(Extension(c)) = &caller {
        validate::within_caller(&new, c)?;
    }
    let (record, secret) = mint(&state.master, new, now);
    let audit = entry(&state, &actor, Action::Create, &record, set_fields(&record));
    state
        .store
        .write(Write::Insert(&record), Some(&audit))
        .await?;
    // A negative entry for this public key (or bearer hash) must not outlive its creation.
    state.cache.invalidate(&record).await;
    state.metrics.key_changed(KeyChange::Created);
    tracing::info!(key_id = %record.id, owner = %record.owner, "key created");
    Ok((
        StatusCode::CREATED,
        axum::Json(key_json(&record, Some(&secret))),
    )
        .into_response())
}

/// A key acting through `/_keygate/v1/keys` on the proxy: confined to its own owner, and
/// able to grant only scopes it holds itself.
#[derive(Clone, Debug)]
pub struct SelfService {
    pub owner: String,
    pub scopes: Vec<String>,
}

/// Present only on self-service requests.
type Caller = Option<Extension<SelfService>>;

/// A key by id or public key. Another owner's key is "not found" to a self-service caller, so
/// it cannot even learn that the key exists.
async fn find(state: &AdminState, id: &str, caller: &Caller) -> Result<KeyRecord, AdminError> {
    let found = match state.store.get_by_id(id).await? {
        Some(r) => Some(r),
        None => state.store.get_by_public_key(id).await?,
    };
    found
        .filter(|r| {
            caller
                .as_ref()
                .is_none_or(|Extension(c)| c.owner == r.owner)
        })
        .ok_or(AdminError::NotFound)
}

/// The routes a key holding `keys.manage` may call on the proxy listener. The proxy
/// authenticates the request and attaches the [`Actor`] and [`SelfService`] extensions.
pub fn self_service_router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/v1/keys", post(create_key).get(list_keys))
        .route("/v1/keys/{id}", get(get_key))
        .route("/v1/keys/{id}/rotate", post(rotate_key))
        .route("/v1/keys/{id}/revoke", post(revoke_key))
        // An operation self-service does not offer is simply not there.
        .fallback(|| async { AdminError::NoSuchEndpoint })
        .method_not_allowed_fallback(|| async { AdminError::NoSuchEndpoint })
        .layer(middleware::from_fn(with_request_id))
        .with_state(state)
}

async fn get_key(
    State(state): State<Arc<AdminState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, AdminError> {
    let record = find(&state, &id, &caller).await?;
    Ok(axum::Json(key_json(&record, None)).into_response())
}

/// `status` of a key as the list filter sees it.
fn status_of(r: &KeyRecord, now: OffsetDateTime) -> &'static str {
    if r.revoked_at.is_some() {
        "revoked"
    } else if r.expires_at.is_some_and(|e| e <= now) {
        "expired"
    } else {
        "active"
    }
}

async fn list_keys(
    State(state): State<Arc<AdminState>>,
    caller: Caller,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Result<Response, AdminError> {
    let mut query = validate::list_query(&q)?;
    if let Some(Extension(c)) = &caller {
        query.owner = Some(c.owner.as_str());
    }
    let now = state.clock.now();
    let wanted = |r: &KeyRecord| {
        query
            .environment
            .is_none_or(|e| r.environment.as_str() == e)
            && query.status.is_none_or(|s| status_of(r, now) == s)
    };
    // Filters apply after the store's page, so keep reading pages until this one is full.
    let mut items = Vec::with_capacity(query.limit);
    let mut cursor = query.cursor.map(str::to_owned);
    let next_cursor = loop {
        let page = state
            .store
            .list(query.owner, cursor.as_deref(), query.limit)
            .await?;
        let mut full_at = None;
        for r in page.items {
            if wanted(&r) {
                items.push(key_json(&r, None));
                if items.len() == query.limit {
                    full_at = Some(r.id);
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
    Ok(axum::Json(json!({"items": items, "next_cursor": next_cursor})).into_response())
}

/// Writes `record` and makes every gateway cache forget the old one.
async fn save(
    state: &AdminState,
    before: &KeyRecord,
    after: &KeyRecord,
    change: KeyChange,
    audit: &AuditEntry,
) -> Result<(), AdminError> {
    state.store.write(Write::Update(after), Some(audit)).await?;
    state.cache.invalidate(before).await;
    state.cache.invalidate(after).await;
    state.metrics.key_changed(change);
    Ok(())
}

async fn patch_key(
    State(state): State<Arc<AdminState>>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, AdminError> {
    let before = find(&state, &id, &None).await?;
    let mut record = before.clone();
    let changed = validate::apply_patch(&mut record, &body, state.clock.now())?;
    if !changed.is_empty() {
        let fields = changed.iter().map(|f| (*f).to_owned()).collect();
        let audit = entry(&state, &actor, Action::Update, &record, fields);
        save(&state, &before, &record, KeyChange::Updated, &audit).await?;
        tracing::info!(key_id = %record.id, fields = ?changed, "key updated");
    }
    Ok(axum::Json(key_json(&record, None)).into_response())
}

async fn rotate_key(
    State(state): State<Arc<AdminState>>,
    Extension(actor): Extension<Actor>,
    caller: Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, AdminError> {
    let grace: Duration = validate::rotate_body(&body)?;
    let before = find(&state, &id, &caller).await?;
    let mut record = before.clone();
    let secret = rotate(&state.master, &mut record, grace, state.clock.now());
    let audit = entry(
        &state,
        &actor,
        Action::Rotate,
        &record,
        vec!["secret".into()],
    );
    save(&state, &before, &record, KeyChange::Rotated, &audit).await?;
    tracing::info!(key_id = %record.id, grace_seconds = grace.whole_seconds(), "key rotated");
    Ok(axum::Json(key_json(&record, Some(&secret))).into_response())
}

async fn delete_key(
    State(state): State<Arc<AdminState>>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<String>,
) -> Result<Response, AdminError> {
    let record = find(&state, &id, &None).await?;
    let audit = entry(&state, &actor, Action::Delete, &record, Vec::new());
    if !state
        .store
        .write(Write::Delete(&record.id), Some(&audit))
        .await?
    {
        return Err(AdminError::NotFound);
    }
    state.cache.invalidate(&record).await;
    state.metrics.key_changed(KeyChange::Deleted);
    tracing::info!(key_id = %record.id, "key deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn import_key(
    State(state): State<Arc<AdminState>>,
    Extension(actor): Extension<Actor>,
    body: Bytes,
) -> Result<Response, AdminError> {
    let now = state.clock.now();
    let (new, public_key, secret) = validate::import_body(&body, now)?;
    let record = build_record(&state.master, new, public_key, &secret, now);
    let audit = entry(&state, &actor, Action::Import, &record, set_fields(&record));
    state
        .store
        .write(Write::Insert(&record), Some(&audit))
        .await?;
    state.cache.invalidate(&record).await;
    state.metrics.key_changed(KeyChange::Created);
    tracing::info!(key_id = %record.id, owner = %record.owner, "key imported");
    Ok((
        StatusCode::CREATED,
        axum::Json(key_json(&record, Some(&secret))),
    )
        .into_response())
}

async fn revoke_key(
    State(state): State<Arc<AdminState>>,
    Extension(actor): Extension<Actor>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, AdminError> {
    let mut record = find(&state, &id, &caller).await?;
    if record.revoked_at.is_none() {
        let now = state.clock.now();
        record.revoked_at = Some(now);
        record.updated_at = now;
        let audit = entry(
            &state,
            &actor,
            Action::Revoke,
            &record,
            vec!["revoked_at".into()],
        );
        state
            .store
            .write(Write::Update(&record), Some(&audit))
            .await?;
        state.metrics.key_changed(KeyChange::Revoked);
        tracing::info!(key_id = %record.id, "key revoked");
    }
    // Invalidate even when it was already revoked: a stale entry must never outlive this call.
    state.cache.invalidate(&record).await;
    Ok(axum::Json(key_json(&record, None)).into_response())
}

async fn list_audit(
    State(state): State<Arc<AdminState>>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Result<Response, AdminError> {
    let query = validate::audit_query(&q)?;
    let page = state
        .store
        .list_audit(query.key_id, query.owner, query.cursor, query.limit)
        .await?;
    Ok(axum::Json(json!({"items": page.items, "next_cursor": page.next_cursor})).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The document and the router must name the same `/v1` paths (methods are checked
    /// against the running server in tests/admin.rs).
    #[test]
    fn openapi_paths_are_the_routed_paths() {
        let doc: Value = serde_json::from_str(OPENAPI).unwrap();
        let mut documented: Vec<&str> = doc["paths"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .filter(|p| p.starts_with("/v1/"))
            .collect();
        let mut routed: Vec<&str> = v1_routes().into_iter().map(|(p, _)| p).collect();
        documented.sort_unstable();
        routed.sort_unstable();
        assert_eq!(documented, routed);
        assert_eq!(doc["openapi"], "3.1.0");
    }
}
