//! Forwarding of verified bodies larger than pingora's 64 KiB retry buffer.
//!
//! Pingora cannot replay such a body after `request_filter` consumed it, so keygate sends the
//! request itself through pingora's pooled connector and streams the response back.

use std::time::Instant;

use bytes::Bytes;
use http::header::TRANSFER_ENCODING;
use pingora::proxy::Session;
use pingora::Result;

use super::{error_code, write_problem, Ctx, Gateway, UPSTREAM_IDLE_TIMEOUT};
use crate::metrics::status_class;
use crate::problem::ErrorCode;

impl Gateway {
    /// Sends the verified request with `body` upstream and relays the response. Failures
    /// before the response starts are answered with problem+json; later ones abort.
    pub(super) async fn forward_direct(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        body: Bytes,
    ) -> Result<()> {
        let routing = std::sync::Arc::clone(&ctx.routing);
        let Some(route) = self.route(ctx) else {
            return write_problem(session, ErrorCode::Internal, "no route", &ctx.request_id).await;
        };
        let route_name = route.name.clone();
        let (peer, endpoint) = Self::peer(&routing, route, &[])?;
        ctx.upstream_addr = Some(endpoint.addr);
        ctx.endpoint = Some(endpoint);
        let mut req = session.req_header().clone();
        self.prepare_upstream_request(&mut req, ctx)?;
        req.remove_header(&TRANSFER_ENCODING);
        req.insert_header("content-length", body.len().to_string())?;

        let started = Instant::now();
        let exchange = async {
            let (mut up, _reused) = self.connector.get_http_session(&peer).await?;
            up.set_read_timeout(peer.options.read_timeout);
            up.set_write_timeout(peer.options.write_timeout);
            up.write_request_header(Box::new(req)).await?;
            up.write_request_body(body, true).await?;
            up.finish_request_body().await?;
            up.read_response_header().await?;
            Ok::<_, Box<pingora::Error>>(up)
        };
        let mut up = match exchange.await {
            Ok(up) => up,
            Err(e) => {
                let code = error_code(&e).unwrap_or(ErrorCode::UpstreamUnavailable);
                let code = if code == ErrorCode::BadRequest {
                    ErrorCode::UpstreamUnavailable
                } else {
                    code
                };
                tracing::warn!(request_id = %ctx.request_id, error = %e, "direct forward failed");
                ctx.outcome = Some(code);
                let detail = if code == ErrorCode::UpstreamTimeout {
                    "the upstream did not answer in time"
                } else {
                    "the upstream could not be reached"
                };
                return write_problem(session, code, detail, &ctx.request_id).await;
            }
        };
        let Some(mut resp) = up.response_header().cloned() else {
            ctx.outcome = Some(ErrorCode::UpstreamUnavailable);
            return write_problem(
                session,
                ErrorCode::UpstreamUnavailable,
                "no response header",
                &ctx.request_id,
            )
            .await;
        };
        ctx.upstream_us = Some(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
        self.release_endpoint(ctx, false);
        self.metrics
            .upstream_duration
            .with_label_values(&[route_name.as_str(), status_class(resp.status.as_u16())])
            .observe(started.elapsed().as_secs_f64());
        super::stamp(ctx, &mut resp)?;
        session.write_response_header(Box::new(resp), false).await?;
        while let Some(chunk) = up.read_response_body().await? {
            session.write_response_body(Some(chunk), false).await?;
        }
        session.write_response_body(None, true).await?;
        if up.response_done() {
            self.connector
                .release_http_session(up, &peer, Some(UPSTREAM_IDLE_TIMEOUT))
                .await;
        }
        Ok(())
    }
}
