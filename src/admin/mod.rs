//! The admin API (SPEC §5) on its own listener: an axum adapter over [`crate::lifecycle`]
//! (parse, call, render), plus `/healthz`, `/readyz` and `/readyz/serving`. Every `/v1/` call
//! needs an admin bearer token.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Extension, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use serde_json::{json, Value};

use crate::assertion::{KeyringError, SigningKeys};
use crate::cache::KeyCache;
use crate::keys::{KeyStore, SecretString};
use crate::lifecycle::{self, input, Lifecycle, Principal};
use crate::problem::{self, ErrorCode};

/// What the admin handlers share.
pub struct AdminState {
    pub lifecycle: Arc<Lifecycle>,
    /// Probed by `/readyz`.
    pub store: Arc<dyn KeyStore>,
    /// SHA-256 of every accepted admin token.
    pub token_hashes: Vec<[u8; 32]>,
    /// The proxy listener, probed by `/readyz`.
    pub proxy_addr: SocketAddr,
    /// The assertion keyring: JWKS, status, rotation.
    pub signing_keys: Arc<SigningKeys>,
    /// Some upstream uses Ed25519 assertions: not ready until the keyring is loaded.
    pub needs_signing_keys: bool,
    /// `keygate_ready`, set by every readiness check.
    pub ready: prometheus::IntGauge,
    /// The key cache, asked by `/readyz/serving` whether it can serve with the store down.
    pub cache: Arc<KeyCache>,
    /// `store.nonce_fallback = "local"`: signed keys work from the cache during an outage too.
    pub nonces_checked_locally: bool,
    /// Set once shutdown (SIGTERM) begins: `/readyz/serving` fails so endpoints drain.
    pub shutting_down: AtomicBool,
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
    #[error("no such admin endpoint")]
    NoSuchEndpoint,
    #[error("this resource does not support this method")]
    MethodNotAllowed,
    #[error(transparent)]
    Lifecycle(#[from] lifecycle::Error),
    #[error("the body is not a JSON object")]
    MalformedJson,
    #[error("{0}")]
    Invalid(String),
    #[error("the assertion keyring is not loaded yet")]
    KeyringNotLoaded,
    #[error(transparent)]
    Keyring(#[from] KeyringError),
}

impl AdminError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Unauthorized => ErrorCode::Unauthorized,
            Self::NoSuchEndpoint => ErrorCode::NotFound,
            Self::MethodNotAllowed => ErrorCode::MethodNotAllowed,
            Self::Lifecycle(e) => e.code(),
            Self::MalformedJson => ErrorCode::MalformedJson,
            Self::Invalid(_) => ErrorCode::ValidationFailed,
            Self::KeyringNotLoaded => ErrorCode::StoreUnavailable,
            Self::Keyring(e) => match e {
                KeyringError::TooManyKeys | KeyringError::Contended => ErrorCode::Conflict,
                KeyringError::Store(_) => ErrorCode::StoreUnavailable,
                KeyringError::Seal { .. } | KeyringError::Corrupt(_) => ErrorCode::Internal,
            },
        }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let code = self.code();
        let request_id = REQUEST_ID.try_with(Clone::clone).unwrap_or_default();
        let errors = match &self {
            Self::Lifecycle(e) => e.errors(),
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
        ("/v1/keys/{id}/credits", post(key_credits)),
        ("/v1/audit", get(list_audit)),
        ("/v1/assertion/keys", get(assertion_keys)),
        ("/v1/assertion/rotate", post(rotate_assertion_key)),
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
        .route("/readyz/serving", get(serving_probe))
        .route("/.well-known/jwks.json", get(jwks))
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
) -> Result<Response> {
    // The scheme is case-insensitive (RFC 9110 §11.1), as the proxy reads it.
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(token)
        })
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
    req.extensions_mut().insert(Principal::Admin {
        token_id: hex::encode(&hash[..6]),
    });
    Ok(next.run(req).await)
}

/// Whether the proxy listener accepts a connection.
async fn proxy_accepting(state: &AdminState) -> bool {
    let probe = if state.proxy_addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], state.proxy_addr.port()))
    } else {
        state.proxy_addr
    };
    tokio::net::TcpStream::connect(probe).await.is_ok()
}

/// The longest `/readyz/serving` waits for the store: under the probe's `timeoutSeconds` (3 s
/// in deploy/kubernetes), so a frozen store reads as unreachable, not as a probe timeout.
const SERVING_STORE_WAIT: Duration = Duration::from_secs(2);

/// The checks of `/readyz`: store reachable, proxy listener accepting, assertion keys loaded
/// where an upstream needs them. Sets `keygate_ready`.
pub async fn readiness(state: &AdminState) -> (bool, Value) {
    let store_ok = state.store.ping().await.is_ok();
    let proxy_ok = proxy_accepting(state).await;
    let keys_ok = state.signing_keys.asserter.keyring().is_some();
    let ready = store_ok && proxy_ok && (keys_ok || !state.needs_signing_keys);
    state.ready.set(i64::from(ready));
    let checks = json!({
        "store": store_ok,
        "proxy_listener": proxy_ok,
        "assertion_keys": keys_ok,
    });
    (ready, checks)
}

/// The checks of `/readyz/serving` ("can this pod serve traffic?", the Kubernetes readiness
/// probe): not shutting down, proxy listener accepting, assertion keys loaded where an
/// upstream needs them, and either the store answers or the key cache can serve without it
/// ([`KeyCache::can_serve_without_store`]). A store outage hits every pod at once; failing
/// them all would take the whole Service down while cached keys could still be served, so
/// the store alone fails only a pod that has nothing to serve from.
pub async fn serving(state: &AdminState) -> (bool, Value) {
    let shutting_down = state.shutting_down.load(Ordering::Acquire);
    let proxy_ok = !shutting_down && proxy_accepting(state).await;
    let keys_ok = state.signing_keys.asserter.keyring().is_some();
    let store_ok = !shutting_down
        && matches!(
            tokio::time::timeout(SERVING_STORE_WAIT, state.store.ping()).await,
            Ok(Ok(()))
        );
    let cache_ok = !store_ok
        && state.cache.can_serve_without_store(
            state.nonces_checked_locally,
            time::OffsetDateTime::now_utc(),
        );
    let serving = !shutting_down
        && proxy_ok
        && (keys_ok || !state.needs_signing_keys)
        && (store_ok || cache_ok);
    let checks = json!({
        "shutting_down": shutting_down,
        "proxy_listener": proxy_ok,
        "assertion_keys": keys_ok,
        "store": store_ok,
        "cache_serves_without_store": cache_ok,
    });
    (serving, checks)
}

fn probe_answer(ok: bool, checks: Value) -> Response {
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(checks)).into_response()
}

async fn readyz(State(state): State<Arc<AdminState>>) -> Response {
    let (ready, checks) = readiness(&state).await;
    probe_answer(ready, checks)
}

async fn serving_probe(State(state): State<Arc<AdminState>>) -> Response {
    let (serving, checks) = serving(&state).await;
    probe_answer(serving, checks)
}

/// Evaluates readiness every 5 s, so `keygate_ready` is current whether or not anything
/// probes `/readyz`.
pub struct ReadinessService(pub Arc<AdminState>);

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for ReadinessService {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        loop {
            readiness(&self.0).await;
            tokio::select! {
                () = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
                _ = shutdown.changed() => {
                    self.0.shutting_down.store(true, Ordering::Release);
                    self.0.ready.set(0);
                    return;
                }
            }
        }
    }
}

type Result<T> = std::result::Result<T, AdminError>;

/// A request body that its Content-Type says is JSON (or an empty one): every handler that
/// reads a body takes it through this.
struct JsonBody(Bytes);

impl<S: Send + Sync> axum::extract::FromRequest<S> for JsonBody {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> std::result::Result<Self, Response> {
        let content_type = req.headers().get(header::CONTENT_TYPE).cloned();
        let body = <Bytes as axum::extract::FromRequest<S>>::from_request(req, state)
            .await
            .map_err(IntoResponse::into_response)?;
        input::require_json(content_type.as_ref().map(HeaderValue::as_bytes), &body)
            .map_err(|e| AdminError::from(e).into_response())?;
        Ok(Self(body))
    }
}

async fn create_key(
    State(state): State<Arc<AdminState>>,
    Extension(who): Extension<Principal>,
    JsonBody(body): JsonBody,
) -> Result<Response> {
    let lc = &state.lifecycle;
    let new = input::create_body(&body, lc.now(), &who.defaults())?;
    let (record, secret) = lc.mint(&who, new).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(lc.view(&record, Some(&secret)).await?),
    )
        .into_response())
}

async fn get_key(
    State(state): State<Arc<AdminState>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response> {
    let lc = &state.lifecycle;
    let record = lc.get(&who, &id).await?;
    Ok(axum::Json(lc.view(&record, None).await?).into_response())
}

async fn list_keys(
    State(state): State<Arc<AdminState>>,
    Extension(who): Extension<Principal>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Result<Response> {
    let query = input::list_query(&q)?;
    let lc = &state.lifecycle;
    let (items, next_cursor) = lc.list(&who, &query).await?;
    let items = lc.views(&items).await?;
    Ok(axum::Json(json!({"items": items, "next_cursor": next_cursor})).into_response())
}

async fn patch_key(
    State(state): State<Arc<AdminState>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Response> {
    let lc = &state.lifecycle;
    let patch = input::patch_body(&body, lc.now())?;
    let record = lc.update(&who, &id, &patch).await?;
    Ok(axum::Json(lc.view(&record, None).await?).into_response())
}

async fn rotate_key(
    State(state): State<Arc<AdminState>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Response> {
    let grace = input::rotate_body(&body)?;
    let lc = &state.lifecycle;
    let (record, secret) = lc.rotate(&who, &id, grace).await?;
    Ok(axum::Json(lc.view(&record, Some(&secret)).await?).into_response())
}

async fn revoke_key(
    State(state): State<Arc<AdminState>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response> {
    let lc = &state.lifecycle;
    let record = lc.revoke(&who, &id).await?;
    Ok(axum::Json(lc.view(&record, None).await?).into_response())
}

async fn key_credits(
    State(state): State<Arc<AdminState>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Response> {
    let lc = &state.lifecycle;
    let op = input::credits_body(&body)?;
    let (record, _) = lc.credits(&who, &id, op).await?;
    Ok(axum::Json(lc.view(&record, None).await?).into_response())
}

async fn delete_key(
    State(state): State<Arc<AdminState>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response> {
    state.lifecycle.delete(&who, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn import_key(
    State(state): State<Arc<AdminState>>,
    Extension(who): Extension<Principal>,
    JsonBody(body): JsonBody,
) -> Result<Response> {
    let lc = &state.lifecycle;
    let input::Import {
        new,
        public_key,
        secret,
        force,
    } = input::import_body(&body, lc.now())?;
    let record = lc.import(&who, new, public_key, &secret, force).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(lc.view(&record, Some(&secret)).await?),
    )
        .into_response())
}

async fn list_audit(
    State(state): State<Arc<AdminState>>,
    Extension(who): Extension<Principal>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Result<Response> {
    let query = input::audit_query(&q)?;
    let page = state.lifecycle.audit_log(&who, &query).await?;
    Ok(axum::Json(json!({"items": page.items, "next_cursor": page.next_cursor})).into_response())
}

/// The public keys that verify assertions (RFC 7517); no token: they are public.
async fn jwks(State(state): State<Arc<AdminState>>) -> Response {
    jwks_response(&state.signing_keys.jwks())
}

/// A JWKS answer, cacheable for a minute (rotations publish keys ahead of use).
pub fn jwks_response(doc: &Value) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/jwk-set+json"),
            (header::CACHE_CONTROL, "public, max-age=60"),
        ],
        doc.to_string(),
    )
        .into_response()
}

async fn assertion_keys(State(state): State<Arc<AdminState>>) -> Result<Response> {
    let status = state
        .signing_keys
        .status()
        .ok_or(AdminError::KeyringNotLoaded)?;
    Ok(axum::Json(status).into_response())
}

/// `{"publish_ahead_seconds": N}` (optional, default 600): the new key is published at once
/// and signs from N seconds on, so verifiers caching the JWKS see it before it is used.
async fn rotate_assertion_key(
    State(state): State<Arc<AdminState>>,
    Extension(who): Extension<Principal>,
    JsonBody(body): JsonBody,
) -> Result<Response> {
    const DEFAULT_AHEAD: u64 = 600;
    const MAX_AHEAD: u64 = 7 * 24 * 3600;
    let ahead = if body.iter().all(u8::is_ascii_whitespace) {
        DEFAULT_AHEAD
    } else {
        let v: Value = serde_json::from_slice(&body).map_err(|_| AdminError::MalformedJson)?;
        let obj = v.as_object().ok_or(AdminError::MalformedJson)?;
        if let Some(k) = obj.keys().find(|k| *k != "publish_ahead_seconds") {
            return Err(AdminError::Invalid(format!("unknown field {k:?}")));
        }
        match obj.get("publish_ahead_seconds") {
            None => DEFAULT_AHEAD,
            Some(n) => n.as_u64().filter(|n| *n <= MAX_AHEAD).ok_or_else(|| {
                AdminError::Invalid(format!(
                    "publish_ahead_seconds must be an integer from 0 to {MAX_AHEAD}"
                ))
            })?,
        }
    };
    let status = state
        .signing_keys
        .rotate(std::time::Duration::from_secs(ahead))
        .await?;
    tracing::info!(by = ?who, publish_ahead_seconds = ahead, "assertion key rotated");
    Ok(axum::Json(status).into_response())
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
