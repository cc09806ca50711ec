//! Self-service on the proxy listener (SPEC §5): `/_keygate/v1/keys…`, signed as usual by a
//! key holding `keys.manage`, served in-process by the admin handlers, which confine the key
//! to its own owner. Never forwarded upstream.

use std::net::IpAddr;

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;
use tower::ServiceExt;

use super::{Ctx, Gateway};
use crate::admin::SelfService;
use crate::config::{PathPattern, Route};
use crate::keys::{Actor, AuthKinds};
use crate::problem::ErrorCode;

/// Requests under this prefix are self-service calls.
pub(super) const PREFIX: &str = "/_keygate";
/// The scope a key must hold to manage keys.
pub(super) const SCOPE: &str = "keys.manage";
/// Metrics label.
pub(super) const LABEL: &str = "self-service";

/// The built-in rule self-service requests are authenticated against.
pub(super) fn route() -> Route {
    Route {
        name: LABEL.to_owned(),
        methods: Vec::new(),
        path: PathPattern::Prefix(format!("{PREFIX}/")),
        scope: Some(SCOPE.to_owned()),
        upstream: 0,
        auth: AuthKinds::ALL,
        public: false,
    }
}

impl Gateway {
    /// Reads, authenticates and answers a self-service request; always answers itself.
    pub(super) async fn self_service(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        client_ip: IpAddr,
    ) -> Result<bool> {
        let Some(router) = &self.self_service else {
            return self
                .refuse(
                    session,
                    ctx,
                    ErrorCode::NoRoute,
                    "self-service is not enabled",
                    false,
                )
                .await;
        };
        let Ok(body) = self.read_body(session, ctx).await? else {
            return self.refuse_too_large(session, ctx).await;
        };
        let result = self
            .authenticate(
                session.req_header(),
                &body,
                client_ip,
                &self.self_service_route,
                &self.self_service_metrics,
            )
            .await;
        let key = match result {
            Ok(key) => key,
            Err(e) => {
                return self
                    .refuse(session, ctx, e.code(), &e.to_string(), true)
                    .await
            }
        };

        let req = session.req_header();
        let target = req
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .strip_prefix(PREFIX)
            .unwrap_or("/")
            .to_owned();
        let mut inner = http::Request::builder()
            .method(req.method.clone())
            .uri(target)
            .header("x-request-id", ctx.request_id.as_str());
        if let Some(ct) = req.headers.get(http::header::CONTENT_TYPE) {
            inner = inner.header(http::header::CONTENT_TYPE, ct);
        }
        let Ok(mut inner) = inner.body(axum::body::Body::from(body)) else {
            return self
                .refuse(
                    session,
                    ctx,
                    ErrorCode::BadRequest,
                    "request target is not valid",
                    true,
                )
                .await;
        };
        inner.extensions_mut().insert(Actor::Key {
            key_id: key.id().to_owned(),
        });
        inner.extensions_mut().insert(SelfService {
            owner: key.owner().to_owned(),
            scopes: key.scopes().map(str::to_owned).collect(),
        });
        let Ok(resp) = router.clone().oneshot(inner).await;
        let (parts, body) = resp.into_parts();
        let bytes: Bytes = axum::body::to_bytes(body, usize::MAX)
            .await
            .unwrap_or_default();
        let mut h = ResponseHeader::build(parts.status.as_u16(), Some(parts.headers.len() + 1))?;
        for (name, value) in &parts.headers {
            h.append_header(name.clone(), value.clone())?;
        }
        h.insert_header("content-length", bytes.len().to_string())?;
        session.write_response_header(Box::new(h), false).await?;
        session.write_response_body(Some(bytes), true).await?;
        Ok(true)
    }
}
