//! Self-service on the proxy listener (SPEC §5): `/_keygate/v1/keys…`, signed as usual by a
//! key holding `keys.manage`. A thin adapter over [`crate::lifecycle`], which decides what the
//! key may do; never forwarded upstream.

use std::collections::HashMap;
use std::net::IpAddr;

use bytes::Bytes;
use http::Method;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;
use serde_json::{json, Value};

use super::{Ctx, Gateway};
use crate::config::{PathPattern, Route};
use crate::keys::AuthKinds;
use crate::lifecycle::{self, input, Lifecycle};
use crate::problem::{self, ErrorCode};

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
        // Managing keys is not metered: a key's limits are for the upstream's traffic.
        rate_limits: Vec::new(),
        cost: 1,
        limits_fail_open: true,
        refund_on_5xx: false,
        upgrade_websocket: false,
        forward_method_override: false,
    }
}

/// One self-service call by the key `key_id`: mint, list, get, rotate or revoke; anything
/// else is not there. Returns the status and JSON body of a success.
async fn call(
    lc: &Lifecycle,
    key_id: &str,
    method: &Method,
    path: &str,
    query: Option<&str>,
    body: &[u8],
) -> std::result::Result<(u16, Value), lifecycle::Error> {
    let who = lc.key_principal(key_id).await?;
    let Some(rest) = path.strip_prefix("/v1/keys") else {
        return Err(lifecycle::Error::NotFound);
    };
    let segments: Vec<&str> = rest.split('/').skip(1).collect();
    match (method, segments.as_slice()) {
        (&Method::POST, []) => {
            let new = input::create_body(body, lc.now(), &who.defaults())?;
            let (record, secret) = lc.mint(&who, new).await?;
            Ok((201, lc.view(&record, Some(&secret)).await?))
        }
        (&Method::GET, []) => {
            let pairs: HashMap<String, String> =
                form_urlencoded::parse(query.unwrap_or("").as_bytes())
                    .into_owned()
                    .collect();
            let q = input::list_query(&pairs)?;
            let (items, next_cursor) = lc.list(&who, &q).await?;
            let items = lc.views(&items).await?;
            Ok((200, json!({"items": items, "next_cursor": next_cursor})))
        }
        (&Method::GET, [id]) if !id.is_empty() => {
            Ok((200, lc.view(&lc.get(&who, id).await?, None).await?))
        }
        (&Method::POST, [id, "rotate"]) if !id.is_empty() => {
            let grace = input::rotate_body(body)?;
            let (record, secret) = lc.rotate(&who, id, grace).await?;
            Ok((200, lc.view(&record, Some(&secret)).await?))
        }
        (&Method::POST, [id, "revoke"]) if !id.is_empty() => {
            Ok((200, lc.view(&lc.revoke(&who, id).await?, None).await?))
        }
        _ => Err(lifecycle::Error::NotFound),
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
        let Some(lc) = &self.lifecycle else {
            return self
                .refuse(
                    session,
                    ctx,
                    ErrorCode::NoRoute,
                    "self-service is not enabled",
                )
                .await;
        };
        let route = &self.self_service_route;
        let Some((key, body)) = self
            .authenticate(session, ctx, client_ip, route, &self.self_service_metrics)
            .await?
        else {
            return Ok(true);
        };
        let req = session.req_header();
        let path = req.uri.path().strip_prefix(PREFIX).unwrap_or("/");
        let content_type = req.headers.get(http::header::CONTENT_TYPE);
        let outcome = match input::require_json(content_type.map(|v| v.as_bytes()), &body) {
            Ok(()) => call(lc, key.id(), &req.method, path, req.uri.query(), &body).await,
            Err(e) => Err(e),
        };
        let (status, bytes) = match outcome {
            Ok((status, v)) => (status, serde_json::to_vec(&v).unwrap_or_default()),
            Err(e) => {
                let code = e.code();
                ctx.outcome = Some(code);
                let body = problem::render(code, &e.to_string(), &ctx.request_id, e.errors());
                (code.status(), body)
            }
        };
        let content_type = if status < 400 {
            "application/json"
        } else {
            problem::CONTENT_TYPE
        };
        let mut h = ResponseHeader::build(status, Some(3))?;
        h.insert_header("content-type", content_type)?;
        h.insert_header("content-length", bytes.len().to_string())?;
        h.insert_header("x-request-id", ctx.request_id.as_str())?;
        session.write_response_header(Box::new(h), false).await?;
        session
            .write_response_body(Some(Bytes::from(bytes)), true)
            .await?;
        Ok(true)
    }
}
