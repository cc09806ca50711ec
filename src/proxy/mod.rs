//! The pingora adapter: routing, body hold-back, authentication, forwarding, problem+json.
//!
//! No byte of an authenticated request reaches the upstream before it is verified. Checks 3–7
//! of SPEC §3.4 run on the headers alone, before a byte of the body is read, so unauthenticated
//! clients cannot make keygate buffer bodies; then the body is read whole (bounded by
//! `server.max_body_bytes` and `server.body_timeout`) and the signature verified.
//! Every verified body, whatever its size and protocol, is then replayed upstream by pingora
//! from its retry buffer (sized to `max_body_bytes`: vendor/README.md), so all requests leave
//! through pingora's one forwarding path. Public routes stream as usual.

pub mod guard;
pub mod health;
mod limit;
mod route;
pub mod routing;
mod self_service;
pub mod target;
pub mod tls;
pub mod trace;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::header::EXPECT;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::protocols::http::v1::common::is_expect_continue_req;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType, Result};
use sha2::Digest;

use crate::auth::{self, AuthError, Credentials, Policy, RequestParts};
use crate::cache::KeyCache;
use crate::clock::Clock;
use crate::config::{Config, Route};
use crate::keys::{ActiveKey, AuthKind};
use crate::limits::abuse::{AbuseStore, Blocks};
use crate::limits::credits::CreditStore;
use crate::limits::store::{Bucket, RateLimitStore};
use crate::metrics::{status_class, Metrics, RouteMetrics};
use crate::problem::{self, ErrorCode};
pub use route::Router;
pub use routing::Routing;

/// Where verifiers fetch the assertion keys (`assertion.jwks_on_proxy`).
const JWKS_PATH: &str = "/.well-known/jwks.json";

/// How long an idle pooled upstream connection is kept: below the 5 s keep-alive default of
/// Node.js servers, so keygate closes first and never writes into a connection being closed.
const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// The `ProxyHttp` implementation; shared by every request of the proxy service.
pub struct Gateway {
    /// Key lookups and nonce checks failed by the store, logged once a minute: every request
    /// of an outage fails the same way.
    store_error_log: crate::logging::QuietLog,
    /// Routes, upstreams, trusted proxies: swapped whole by a reload.
    routing: Arc<ArcSwap<Routing>>,
    /// Endpoint health across reloads.
    board: Arc<health::HealthBoard>,
    max_body_bytes: usize,
    /// Bounds draining an unread body after a refusal.
    body_timeout: Duration,
    policy: Policy,
    cache: Arc<KeyCache>,
    metrics: Metrics,
    /// The series of the self-service route's successful requests.
    self_service_metrics: RouteMetrics,
    clock: Arc<dyn Clock>,
    /// The key lifecycle, serving `/_keygate/v1/keys` to keys holding `keys.manage`.
    lifecycle: Option<Arc<crate::lifecycle::Lifecycle>>,
    self_service_route: Route,
    /// Requests per key, written to the store by the usage flusher.
    usage: Arc<crate::usage::UsageTally>,
    /// With `store.nonce_fallback = "local"`: nonces seen while the store was unreachable.
    local_nonces: Option<moka::sync::Cache<String, ()>>,
    /// Signs `x-keygate-assertion`.
    asserter: Arc<crate::assertion::Asserter>,
    /// `assertion.jwks_on_proxy`: answer `GET /.well-known/jwks.json` here too.
    jwks_on_proxy: bool,
    /// `log.access`: one line per request.
    access_log: bool,
    /// Span export (`[tracing]`); `None` when off.
    otlp: Option<Arc<crate::otlp::Otlp>>,
    /// Rate-limit state: the store's (shared by a fleet on Redis).
    limiter: Arc<dyn RateLimitStore>,
    /// The limiter's state could not be reached at the last check (logged once per outage).
    limits_down: AtomicBool,
    /// `[abuse]`; `None` when disabled.
    abuse: Option<AbuseGuard>,
    /// Metered keys' credits.
    credits: Arc<dyn CreditStore>,
}

/// Per-request state carried between pingora's phases.
pub struct Ctx {
    /// The routing snapshot this request uses from start to end.
    routing: Arc<Routing>,
    request_id: String,
    route: Option<usize>,
    key: Option<Arc<ActiveKey>>,
    client_ip: Option<IpAddr>,
    /// The TCP peer is in `server.trusted_proxies`: the forwarding headers it sent are its own.
    peer_trusted: bool,
    /// `None` while the request is on its way to success.
    outcome: Option<ErrorCode>,
    /// `Expect: 100-continue` was answered by keygate; the upstream must not see it.
    answered_expect: bool,
    /// Bytes of a public route's body seen so far (chunked bodies have no length up front).
    public_body_bytes: usize,
    upstream_started: Option<Instant>,
    /// A self-service call (metrics label), answered by keygate itself.
    self_service: bool,
    /// The `x-keygate-assertion` value, made once the request is verified.
    assertion: Option<String>,
    /// The `traceparent` sent upstream, and keygate's span when spans are exported.
    trace: trace::Trace,
    /// Time spent checking credentials, not waiting for the body (access log).
    auth_us: u64,
    /// From sending the request upstream to its response head.
    upstream_us: Option<u64>,
    /// The endpoint the request went to.
    upstream_addr: Option<std::net::SocketAddr>,
    /// The endpoint in use (its in-flight count is held until the request ends).
    endpoint: Option<Arc<health::EndpointHealth>>,
    /// Endpoints a connection failed to, not to be picked again for this request.
    tried: Vec<std::net::SocketAddr>,
    /// `RateLimit-Policy` and `RateLimit` for the response, when limits applied.
    rate_headers: Option<(String, String)>,
    /// Credits this request spent (0: none), given back if nothing reached the upstream, or
    /// it answered 503 and the route has `refund_on_5xx`.
    credits_spent: u64,
    /// Rate-limit units this request spent (0: none), given back if nothing reached the
    /// upstream.
    rate_spent: u64,
    /// The body did not arrive within `server.body_timeout` (access-log outcome
    /// `body_timeout`).
    body_timed_out: bool,
    /// The downstream read timeout before a public route's body bounded it, restored for the
    /// next request on the connection.
    read_timeout_before: Option<Option<Duration>>,
}

/// `[abuse]` at work: the blocks this gateway knows, and where failures are counted.
struct AbuseGuard {
    config: crate::config::AbuseConfig,
    never: auth::client_ip::AllowList,
    /// Shared with the change feed, which adds the blocks other gateways' failures set.
    blocks: Arc<Blocks>,
    store: Arc<dyn AbuseStore>,
}

impl AbuseGuard {
    /// Counts a request that failed authentication the way credential stuffing does.
    async fn failed(&self, ip: IpAddr, code: ErrorCode, metrics: &Metrics) {
        let counted = matches!(
            code,
            ErrorCode::UnknownKey
                | ErrorCode::BadSignature
                | ErrorCode::ReplayedNonce
                | ErrorCode::MalformedCredentials
        );
        if !counted || self.never.contains(ip) {
            return;
        }
        let c = &self.config;
        // Counted here before anything is awaited: the threshold blocks this gateway's next
        // request at once, not when the store's answer comes back (meanwhile every request
        // of the address would be evaluated).
        self.blocks.fail(ip, c.window, c.max_failures, c.block_for);
        match self
            .store
            .record_failure(
                &crate::limits::abuse::subject(ip),
                c.window,
                c.max_failures,
                c.block_for,
            )
            .await
        {
            Ok(recorded) => self.blocks.learn(ip, recorded),
            Err(e) => {
                metrics.store_error("abuse");
                tracing::debug!(error = %e, "failed authentication counted by this gateway only");
            }
        }
    }
}

/// The largest request head (target and headers) keygate serves. Pingora reads up to 1 MiB
/// and 256 headers before keygate sees the head; `server.max_connections` bounds what that
/// costs, and this keeps such heads from going any further.
const MAX_HEAD_BYTES: usize = 32 * 1024;

/// At most this much of a refused body is read and discarded before closing (lingering
/// close); a larger declared body is not read at all.
const LINGER_MAX_BYTES: u64 = 16 * 1024 * 1024;

/// A client-sent `x-request-id` is kept when it is short and plain, so traces join up.
fn usable_request_id(req: &RequestHeader) -> Option<String> {
    let v = req.headers.get("x-request-id")?.to_str().ok()?;
    ((1..=128).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)))
    .then(|| v.to_owned())
}

impl Gateway {
    pub fn new(
        config: &Config,
        cache: Arc<KeyCache>,
        metrics: Metrics,
        clock: Arc<dyn Clock>,
        lifecycle: Option<Arc<crate::lifecycle::Lifecycle>>,
        usage: Arc<crate::usage::UsageTally>,
        asserter: Arc<crate::assertion::Asserter>,
    ) -> Self {
        // pingora replays every verified body from its retry buffer, so the buffer must hold
        // the largest body keygate accepts (process-wide: one gateway per process).
        pingora::protocols::http::body_buffer::set_retry_buffer_limit(
            config.server.max_body_bytes.max(64 * 1024),
        );
        let self_service_route = self_service::route();
        let board = Arc::new(health::HealthBoard::new(metrics.clone()));
        Self {
            store_error_log: crate::logging::QuietLog::default(),
            routing: Arc::new(ArcSwap::from_pointee(Routing::new(
                config, &metrics, &board,
            ))),
            board,
            max_body_bytes: config.server.max_body_bytes,
            body_timeout: config.server.body_timeout,
            policy: Policy {
                clock_skew: config.signing.clock_skew,
                body_nonce_retention: config.signing.body_nonce_retention,
            },
            cache,
            self_service_metrics: metrics.route(&self_service_route.name),
            metrics,
            clock,
            lifecycle,
            self_service_route,
            usage,
            asserter,
            jwks_on_proxy: config.assertion.jwks_on_proxy,
            access_log: config.log.access,
            otlp: None,
            limiter: Arc::new(crate::limits::store::InProcessLimits::default()),
            limits_down: AtomicBool::new(false),
            abuse: None,
            credits: Arc::new(crate::limits::credits::NoCredits),
            local_nonces: (config.nonce_fallback == crate::config::NonceFallback::Local).then(
                || {
                    // Long enough for body nonces; memory is bounded by the outage's traffic.
                    moka::sync::Cache::builder()
                        .time_to_live(
                            config
                                .signing
                                .body_nonce_retention
                                .max(config.signing.clock_skew * 2),
                        )
                        .build()
                },
            ),
        }
    }

    /// Rate limits against `store` (the configured store's limiter).
    #[must_use]
    pub fn with_limiter(mut self, store: Arc<dyn RateLimitStore>) -> Self {
        self.limiter = store;
        self
    }

    /// Spends metered keys' credits in `store`.
    #[must_use]
    pub fn with_credits(mut self, store: Arc<dyn CreditStore>) -> Self {
        self.credits = store;
        self
    }

    /// Blocks addresses that keep failing authentication (`[abuse]`), counting in `store`;
    /// `blocks` also receives the blocks announced on the change feed.
    #[must_use]
    pub fn with_abuse(
        mut self,
        config: Option<&crate::config::AbuseConfig>,
        store: Arc<dyn AbuseStore>,
        blocks: Arc<Blocks>,
    ) -> Self {
        self.abuse = config.map(|c| AbuseGuard {
            blocks,
            never: auth::client_ip::AllowList::new(&c.never_block),
            config: c.clone(),
            store,
        });
        self
    }

    /// Exports a span per request (`[tracing]`).
    #[must_use]
    pub fn with_otlp(mut self, otlp: Option<Arc<crate::otlp::Otlp>>) -> Self {
        self.otlp = otlp;
        self
    }

    /// Where reloads put a new routing snapshot (taken before pingora owns the gateway).
    pub fn routing(&self) -> Arc<ArcSwap<Routing>> {
        Arc::clone(&self.routing)
    }

    /// Endpoint health, for reloads to build routing snapshots with.
    pub fn health_board(&self) -> Arc<health::HealthBoard> {
        Arc::clone(&self.board)
    }

    fn route<'a>(&'a self, ctx: &'a Ctx) -> Option<&'a Route> {
        if ctx.self_service {
            return Some(&self.self_service_route);
        }
        ctx.route.and_then(|i| ctx.routing.router.get(i))
    }

    /// The matched route's pre-made series.
    fn hot_metrics<'a>(&'a self, ctx: &'a Ctx) -> Option<&'a RouteMetrics> {
        if ctx.self_service {
            return Some(&self.self_service_metrics);
        }
        ctx.route.and_then(|i| ctx.routing.route_metrics.get(i))
    }

    /// The peer for the route's next endpoint (health and `balance` decide; `tried` are
    /// skipped), and that endpoint, whose in-flight count is now held.
    fn peer(
        routing: &Routing,
        route: &Route,
        tried: &[std::net::SocketAddr],
    ) -> Result<(HttpPeer, Arc<health::EndpointHealth>)> {
        let up = routing
            .upstream(route)
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "route names no upstream"))?;
        let endpoint = health::pick(routing, route.upstream, tried).ok_or_else(|| {
            Error::explain(ErrorType::ConnectRefused, "every upstream endpoint failed")
        })?;
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        let addr = &endpoint.addr;
        let mut peer = match &up.tls {
            Some(tls) => {
                let mut peer = HttpPeer::new(*addr, true, tls.sni.clone());
                peer.options.ca.clone_from(&tls.ca);
                peer.options.verify_cert = tls.verify;
                peer.options.verify_hostname = tls.verify;
                peer.client_cert_key.clone_from(&tls.client);
                peer
            }
            None => HttpPeer::new(*addr, false, String::new()),
        };
        peer.options.connection_timeout = Some(up.connect_timeout);
        peer.options.read_timeout = Some(up.read_timeout);
        peer.options.write_timeout = Some(up.read_timeout);
        peer.options.idle_timeout = Some(UPSTREAM_IDLE_TIMEOUT);
        Ok((peer, endpoint))
    }

    /// The request is done with its endpoint: release its in-flight count; `failed` counts a
    /// failure before an answer against it (passive health).
    fn release_endpoint(&self, ctx: &mut Ctx, failed: bool) {
        let Some(endpoint) = ctx.endpoint.take() else {
            return;
        };
        endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(up) = ctx
            .route
            .and_then(|i| ctx.routing.router.get(i))
            .and_then(|r| ctx.routing.upstream(r))
        {
            if failed {
                endpoint.request_failed(up);
            } else {
                endpoint.request_answered(up);
            }
        }
    }

    /// The client address of SPEC §3.5.
    fn client_ip(
        routing: &Routing,
        session: &Session,
    ) -> std::result::Result<IpAddr, auth::client_ip::BadForwardedFor> {
        let peer_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip());
        let xff = session
            .req_header()
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .map(http::HeaderValue::as_bytes);
        auth::client_ip::client_ip(peer_ip, xff, &routing.trusted_proxies)
    }

    /// Seconds `ip` stays blocked by `[abuse]`, if it is (never a `never_block` address).
    fn blocked(&self, ip: IpAddr) -> Option<u64> {
        self.abuse
            .as_ref()
            .filter(|a| !a.never.contains(ip))
            .and_then(|a| a.blocks.blocked(ip))
    }

    /// 429 `too_many_failures` with `Retry-After`.
    async fn refuse_blocked(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        wait: u64,
    ) -> Result<bool> {
        self.metrics.abuse_blocked.inc();
        ctx.outcome = Some(ErrorCode::TooManyFailures);
        if !session.is_body_done() {
            session.set_keepalive(None);
        }
        let detail = "too many failed authentications from this address; retry later";
        let wait = wait.to_string();
        write_problem_with(
            session,
            ErrorCode::TooManyFailures,
            detail,
            &ctx.request_id,
            &[("retry-after", wait.as_str())],
        )
        .await?;
        Ok(true)
    }

    /// Answers with problem+json and records the outcome. A body not yet read is drained by
    /// pingora after the answer (bounded by `server.body_timeout`), so the client reads the
    /// answer instead of a reset and the connection can serve another request.
    async fn refuse(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        code: ErrorCode,
        detail: &str,
    ) -> Result<bool> {
        ctx.outcome = Some(code);
        // Counted before answering: the client's next request already sees a block it caused.
        if let (Some(guard), Some(ip)) = (&self.abuse, ctx.client_ip) {
            guard.failed(ip, code, &self.metrics).await;
        }
        if !session.is_body_done() {
            // Pingora would close at once; drain instead (discarding, bounded in time), so the
            // client is not cut off mid-send and never reads a reset instead of the answer.
            session.set_close_on_response_before_downstream_finish(false);
            session.set_total_drain_timeout(Some(self.body_timeout));
        }
        write_problem(session, code, detail, &ctx.request_id).await?;
        self.drain_h2_stream(session).await;
        Ok(true)
    }

    /// Spends the request's credits, then its rate limits; `Ok(false)` when it was refused
    /// (and answered). A refusal by either spends nothing of the other.
    async fn check_limits(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        key: &ActiveKey,
        route: &Route,
    ) -> Result<bool> {
        if key.metered && !self.spend_credits(session, ctx, key, route).await? {
            return Ok(false);
        }
        let passed = self.check_rate_limits(session, ctx, key, route).await?;
        if !passed {
            self.refund_credits(ctx, key.id()).await;
        }
        Ok(passed)
    }

    /// Spends `route.cost` of a metered key's credits; `Ok(false)` when refused (answered).
    async fn spend_credits(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        key: &ActiveKey,
        route: &Route,
    ) -> Result<bool> {
        let refill = key.refill.map(|r| r.at(self.clock.now()));
        match self.credits.spend(key.id(), route.cost, refill).await {
            Ok(spent) if spent.ok => {
                self.store_back();
                ctx.credits_spent = route.cost;
                Ok(true)
            }
            Ok(spent) => {
                self.metrics
                    .quota_exhausted
                    .with_label_values(&[route.name.as_str()])
                    .inc();
                let detail = format!(
                    "this request costs {} credits and the key has {} left",
                    route.cost, spent.remaining
                );
                self.refuse(session, ctx, ErrorCode::QuotaExhausted, &detail)
                    .await?;
                Ok(false)
            }
            Err(e) => {
                self.limits_unreachable(session, ctx, route, "credits", &e)
                    .await
            }
        }
    }

    /// Gives back what a request that never reached the upstream spent, whoever refused it —
    /// keygate after its limits passed, pingora (a connection nomination it will not forward),
    /// or no endpoint taking the connection: credits and rate-limit units alike.
    async fn refund_unsent(&self, ctx: &mut Ctx) {
        let Some(key) = ctx.key.clone() else {
            return;
        };
        self.refund_credits(ctx, key.id()).await;
        let units = std::mem::take(&mut ctx.rate_spent);
        let Some(route) = self.route(ctx).filter(|_| units > 0) else {
            return;
        };
        let buckets = limit::buckets(&key, route, ctx.routing.owner_limits.get(key.owner()));
        if let Err(e) = self.limiter.release(&buckets, units).await {
            self.metrics.store_error("rate_limit");
            tracing::warn!(error = %e, key_id = key.id(), units, "rate-limit units not given back");
        }
    }

    /// Gives back a request's credits (refused by a rate limit, or `refund_on_5xx`).
    async fn refund_credits(&self, ctx: &mut Ctx, key_id: &str) {
        let cost = std::mem::take(&mut ctx.credits_spent);
        if cost == 0 {
            return;
        }
        if let Err(e) = self.credits.refund(key_id, cost).await {
            self.metrics.store_error("credits");
            tracing::warn!(error = %e, key_id, cost, "credits not refunded");
        }
    }

    /// The store answered again after an outage: say so once.
    fn store_back(&self) {
        if self.limits_down.swap(false, Ordering::Relaxed) {
            tracing::warn!("rate-limit and credit state reachable again");
        }
    }

    /// Limit or credit state unreachable: the route's `limits_on_store_error` decides;
    /// logged once per outage.
    async fn limits_unreachable(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        route: &Route,
        op: &'static str,
        e: &crate::keys::StoreError,
    ) -> Result<bool> {
        self.metrics.store_error(op);
        if !self.limits_down.swap(true, Ordering::Relaxed) {
            tracing::error!(error = %e, "rate-limit or credit state unreachable: routes with limits_on_store_error = \"open\" pass unchecked, the others are refused until it is back");
        }
        if route.limits_fail_open {
            self.metrics
                .rate_limit_unchecked
                .with_label_values(&[route.name.as_str()])
                .inc();
            return Ok(true);
        }
        let detail = "rate limits and credits cannot be checked right now; retry shortly";
        self.refuse(session, ctx, ErrorCode::StoreUnavailable, detail)
            .await?;
        Ok(false)
    }

    /// Spends the request's rate limits; `Ok(false)` when it was refused (and answered).
    async fn check_rate_limits(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        key: &ActiveKey,
        route: &Route,
    ) -> Result<bool> {
        let routing = Arc::clone(&ctx.routing);
        let buckets = limit::buckets(key, route, routing.owner_limits.get(key.owner()));
        if buckets.is_empty() {
            return Ok(true);
        }
        let decision = match self.limiter.acquire(&buckets, route.cost).await {
            Ok(d) => {
                self.store_back();
                d
            }
            Err(e) => {
                return self
                    .limits_unreachable(session, ctx, route, "rate_limit", &e)
                    .await
            }
        };
        let (policy, state) = limit::headers(&buckets, &decision);
        if decision.allowed {
            ctx.rate_spent = route.cost;
            ctx.rate_headers = Some((policy, state));
            return Ok(true);
        }
        let (detail, wait) = limit::refusal(&buckets, &decision, route.cost);
        let limit_name = decision
            .refused_by
            .and_then(|(i, _)| buckets.get(i))
            .map(Bucket::label)
            .unwrap_or_default();
        self.metrics
            .rate_limited
            .with_label_values(&[route.name.as_str(), &limit_name])
            .inc();
        ctx.outcome = Some(ErrorCode::RateLimited);
        let wait = wait.to_string();
        let extra = [
            ("retry-after", wait.as_str()),
            ("ratelimit-policy", policy.as_str()),
            ("ratelimit", state.as_str()),
        ];
        write_problem_with(
            session,
            ErrorCode::RateLimited,
            &detail,
            &ctx.request_id,
            &extra,
        )
        .await?;
        Ok(false)
    }

    /// 413 `body_too_large`. Over HTTP/1 the connection then closes, but only after the rest
    /// of the body is read and discarded (lingering close, as nginx does), up to
    /// [`LINGER_MAX_BYTES`] and `server.body_timeout`: a client still sending — Python's
    /// `http.client`, and so `requests`, sends the whole body before reading — reads the 413
    /// instead of a broken pipe. An HTTP/2 stream is drained: only the stream ends.
    async fn refuse_too_large(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        ctx.outcome = Some(ErrorCode::BodyTooLarge);
        session.set_keepalive(None);
        let detail = format!("the body is larger than {} bytes", self.max_body_bytes);
        write_problem(session, ErrorCode::BodyTooLarge, &detail, &ctx.request_id).await?;
        if session.as_downstream().is_http2() {
            self.drain_h2_stream(session).await;
        } else {
            self.linger(session).await;
        }
        Ok(true)
    }

    /// Reads and discards what is left of an HTTP/1 request body after an answer, until it
    /// ends, [`LINGER_MAX_BYTES`] have gone by, or `server.body_timeout` passes.
    async fn linger(&self, session: &mut Session) {
        let declared = target::content_length(&session.req_header().headers)
            .ok()
            .flatten();
        if declared.is_some_and(|n| n > LINGER_MAX_BYTES) {
            return;
        }
        let deadline = Instant::now() + self.body_timeout;
        let mut left = LINGER_MAX_BYTES;
        while !session.is_body_done() {
            let time = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(time, session.read_request_body()).await {
                Ok(Ok(Some(chunk))) if (chunk.len() as u64) <= left => {
                    left -= chunk.len() as u64;
                }
                _ => return,
            }
        }
    }

    /// After an answer sent before an HTTP/2 request body was read: reads and discards the
    /// rest (bounded by `server.body_timeout`), so the client sees the stream end cleanly
    /// rather than reset while it is still sending, and reads the answer.
    async fn drain_h2_stream(&self, session: &mut Session) {
        if !session.as_downstream().is_http2() || session.is_body_done() {
            return;
        }
        session.set_total_drain_timeout(Some(self.body_timeout));
        if let Err(e) = session.as_downstream_mut().drain_request_body().await {
            tracing::debug!(error = %e, "h2 request body not drained");
        }
    }

    /// Reads the whole body; `Ok(None)` once it passes `max_body_bytes`. A malformed body
    /// (a bad chunk size) is the client's error: 400, not 500.
    async fn read_body(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Option<Bytes>> {
        session.enable_retry_buffering();
        if is_expect_continue_req(session.req_header()) {
            session.write_continue_response().await?;
            ctx.answered_expect = true;
        }
        let max = self.max_body_bytes;
        let read = async {
            let mut first: Option<Bytes> = None;
            let mut rest = BytesMut::new();
            let mut total = 0usize;
            while let Some(chunk) = session.read_request_body().await.map_err(|mut e| {
                e.as_down();
                e
            })? {
                total += chunk.len();
                if total > max {
                    return Ok(None);
                }
                // The common case is one chunk: keep it without copying.
                match &first {
                    None if rest.is_empty() => first = Some(chunk),
                    _ => {
                        if let Some(f) = first.take() {
                            rest.extend_from_slice(&f);
                        }
                        rest.extend_from_slice(&chunk);
                    }
                }
            }
            Ok::<_, Box<Error>>(Some(first.unwrap_or_else(|| rest.freeze())))
        };
        // HTTP/1: what is left of the connection's body deadline; an HTTP/2 stream, which no
        // connection watchdog covers, gets the whole `body_timeout` here.
        let limit = guard::body_time_left().unwrap_or(self.body_timeout);
        let body = match tokio::time::timeout(limit, read).await {
            Ok(body) => body?,
            Err(_) => {
                ctx.body_timed_out = true;
                return Err(body_timeout_error());
            }
        };
        guard::body_received();
        Ok(body)
    }

    /// Steps 3–10 of SPEC §3.4 for a matched, non-public route: 3–7 on the headers, then the
    /// body is read, then 8–10. Refusals are answered here (`Ok(None)`); on success, the key
    /// and the body. Time spent checking, not waiting for the body, goes into
    /// `keygate_auth_duration_seconds{route}`.
    async fn authenticate(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        client_ip: IpAddr,
        route: &Route,
        metrics: &RouteMetrics,
    ) -> Result<Option<(Arc<ActiveKey>, Bytes)>> {
        let started = Instant::now();
        let now = self.clock.now();
        let client_cert = client_cert(session);
        let head = self
            .check_head(session.req_header(), client_ip, client_cert, route, now)
            .await;
        let mut spent = started.elapsed();
        let (key, signature) = match head {
            Ok(found) => found,
            Err(e) => {
                ctx.auth_us = u64::try_from(spent.as_micros()).unwrap_or(u64::MAX);
                metrics.auth_duration.observe(spent.as_secs_f64());
                return self
                    .refuse(session, ctx, e.code(), &e.to_string())
                    .await
                    .map(|_| None);
            }
        };
        let Some(body) = self.read_body(session, ctx).await? else {
            return self.refuse_too_large(session, ctx).await.map(|_| None);
        };
        // Checked again now that the awaits are behind: a block set while this request waited
        // for its key or body stops it before its signature is evaluated. From here to the
        // failure being counted nothing is awaited, so one worker thread evaluates at most
        // `max_failures` bad signatures of an address however many arrive at once.
        if signature.is_some() {
            if let Some(wait) = self.blocked(client_ip) {
                return self.refuse_blocked(session, ctx, wait).await.map(|_| None);
            }
        }
        let started = Instant::now();
        // Steps 8–10 now that the body is in (bearer secrets were checked on the head).
        let checked = match signature {
            Some(sig) => {
                self.check_signed(session.req_header(), &key, sig, &body, client_ip, now)
                    .await
            }
            None => Ok(()),
        }
        .and_then(|()| auth::check_scope(&key, route.scope.as_deref()));
        if checked.is_ok() {
            self.usage.record(key.id(), now);
        }
        spent += started.elapsed();
        ctx.auth_us = u64::try_from(spent.as_micros()).unwrap_or(u64::MAX);
        metrics.auth_duration.observe(spent.as_secs_f64());
        match checked {
            Ok(()) => Ok(Some((key, body))),
            Err(e) => self
                .refuse(session, ctx, e.code(), &e.to_string())
                .await
                .map(|_| None),
        }
    }

    /// Steps 3–7 (and 8 for bearer secrets): what the headers alone can decide. Returns the
    /// key and, for a signed request, its signature.
    async fn check_head(
        &self,
        req: &RequestHeader,
        client_ip: IpAddr,
        client_cert: Option<&[u8]>,
        route: &Route,
        now: time::OffsetDateTime,
    ) -> std::result::Result<(Arc<ActiveKey>, Option<[u8; 32]>), AuthError> {
        let creds = auth::parse_credentials(&req.headers)?;
        let found = match &creds {
            Credentials::Signed { public_key, .. } => self.cache.by_public_key(public_key).await,
            Credentials::Bearer { secret_hash } => {
                if !route.auth.contains(AuthKind::Bearer) {
                    return Err(AuthError::KindNotAccepted(AuthKind::Bearer.as_str()));
                }
                self.cache.by_secret_hash(secret_hash).await
            }
        };
        let key = match found {
            Ok(Some(key)) => key,
            Ok(None) => return Err(AuthError::UnknownKey),
            Err(e) => {
                // Every request during an outage fails the same way: one line a minute.
                if let Some(n) = self.store_error_log.due() {
                    tracing::error!(error = %e, failed = n, "key lookup failed: the store is unavailable (logged at most once a minute; keygate_store_errors_total counts each)");
                }
                return Err(AuthError::StoreUnavailable);
            }
        };
        auth::check_head(
            &key,
            &creds,
            client_ip,
            client_cert,
            route.auth,
            now,
            &self.policy,
        )?;
        let signature = match creds {
            Credentials::Signed { signature, .. } => Some(signature),
            Credentials::Bearer { .. } => None,
        };
        Ok((key, signature))
    }

    /// Steps 8 and 9 of a signed request.
    async fn check_signed(
        &self,
        req: &RequestHeader,
        key: &ActiveKey,
        signature: [u8; 32],
        body: &[u8],
        client_ip: IpAddr,
        now: time::OffsetDateTime,
    ) -> std::result::Result<(), AuthError> {
        // The head's other credentials, already checked by parse_credentials: a lookup each,
        // rather than hold a borrow of the request across reading the body.
        let text = |name| {
            req.headers
                .get(name)
                .and_then(|v: &http::HeaderValue| v.to_str().ok())
        };
        let creds = Credentials::Signed {
            public_key: "",
            signature,
            timestamp: text(&auth::H_TIMESTAMP),
            nonce: text(&auth::H_NONCE),
        };
        let target = String::from_utf8_lossy(req.raw_path());
        let parts = RequestParts {
            method: req.method.as_str(),
            target: &target,
            body,
            client_ip,
            client_cert: None,
        };
        let claim = auth::check_signature(key, &creds, &parts, now, &self.policy)?;
        if let Some(claim) = claim {
            match self
                .cache
                .store()
                .use_nonce(key.id(), &claim.value, claim.ttl)
                .await
            {
                Ok(true) => {}
                Ok(false) => return Err(AuthError::ReplayedNonce),
                Err(e) => {
                    self.metrics.store_error("use_nonce");
                    let Some(local) = &self.local_nonces else {
                        if let Some(n) = self.store_error_log.due() {
                            tracing::error!(error = %e, failed = n, "nonce check failed: the store is unavailable (logged at most once a minute; keygate_store_errors_total{{op=\"use_nonce\"}} counts each)");
                        }
                        return Err(AuthError::StoreUnavailable);
                    };
                    if let Some(n) = self.store_error_log.due() {
                        tracing::warn!(error = %e, checked = n, "store unreachable: checking nonces locally (logged at most once a minute)");
                    }
                    let entry = local
                        .entry(format!("{}\n{}", key.id(), claim.value))
                        .or_insert(());
                    if !entry.is_fresh() {
                        return Err(AuthError::ReplayedNonce);
                    }
                }
            }
        }
        Ok(())
    }

    /// The upstream request: identity added, spoofed identity and (by default) credentials
    /// removed, `x-request-id` and `X-Forwarded-For` set. Every request forwarded passes here.
    fn prepare_upstream_request(&self, req: &mut RequestHeader, ctx: &Ctx) -> Result<()> {
        let forward_credentials = self
            .route(ctx)
            .and_then(|r| ctx.routing.upstream(r))
            .is_some_and(|u| u.forward_credentials);
        // An upstream framework honouring an override header would run another method or path
        // than the route (and scope) keygate checked.
        let keep_overrides = self.route(ctx).is_some_and(|r| r.forward_method_override);
        let dropped: Vec<http::HeaderName> = req
            .headers
            .keys()
            .filter(|n| {
                let n = n.as_str();
                is_spoofed(n)
                    || (!keep_overrides && is_named(n, &OVERRIDE_HEADERS))
                    || (!ctx.peer_trusted && is_named(n, &PROXY_HEADERS))
            })
            .cloned()
            .collect();
        for name in dropped {
            req.remove_header(&name);
        }
        if !forward_credentials {
            for name in &auth::CREDENTIAL_HEADERS {
                req.remove_header(name);
            }
        }
        if ctx.answered_expect {
            req.remove_header(&EXPECT);
        }
        join_cookies(req)?;
        if !req.headers.contains_key(http::header::HOST) {
            // An HTTP/1.0 client's request goes upstream as HTTP/1.1, which needs one.
            if let Some(addr) = ctx.upstream_addr {
                req.insert_header(http::header::HOST, addr.to_string())?;
            }
        }
        if let Some(key) = &ctx.key {
            req.insert_header("x-keygate-key-id", key.id.clone())?;
            req.insert_header("x-keygate-owner", key.owner.clone())?;
            req.insert_header("x-keygate-scopes", key.scopes.clone())?;
            req.insert_header("x-keygate-environment", key.environment.as_str())?;
        }
        if let Some(assertion) = &ctx.assertion {
            req.insert_header(crate::assertion::HEADER, assertion.as_str())?;
        }
        req.insert_header("x-request-id", ctx.request_id.as_str())?;
        req.insert_header("traceparent", ctx.trace.traceparent.as_str())?;
        if !ctx.trace.client {
            // tracestate belongs to the traceparent it came with, which was not kept.
            req.remove_header("tracestate");
        }
        if let Some(ip) = ctx.client_ip {
            let prior: Vec<&str> = req
                .headers
                .get_all("x-forwarded-for")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            let xff = if prior.is_empty() {
                ip.to_string()
            } else {
                format!("{}, {ip}", prior.join(", "))
            };
            req.insert_header("x-forwarded-for", xff)?;
        }
        Ok(())
    }
}

/// Headers some frameworks read as the request's real method or URL (Symfony, Laravel,
/// Rails, Express's method-override, IIS URL Rewrite): removed unless the route keeps them.
const OVERRIDE_HEADERS: [&str; 5] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-url",
    "x-rewrite-url",
];

/// What a proxy in front says about the client, other than the `X-Forwarded-For` keygate
/// reads and extends: believed only from `server.trusted_proxies`, as that is. Sent by the
/// client itself, an upstream reading `X-Real-IP` would take a forged address for the client's.
const PROXY_HEADERS: [&str; 5] = [
    "forwarded",
    "x-real-ip",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
];

/// Whether header `name` (lowercase) is one of `names`, or an underscore spelling of one
/// (`x_http_method_override`), which CGI/WSGI-style frameworks read as the dashed name.
fn is_named(name: &str, names: &[&str]) -> bool {
    names.contains(&name)
        || (name.contains('_') && names.contains(&name.replace('_', "-").as_str()))
}

/// HTTP/2 clients send each cookie as its own `cookie` field (RFC 9113 §8.2.3); an HTTP/1.1
/// upstream expects one line (RFC 6265 §5.4), and many read only the first. They are joined
/// with "; " in the order sent.
fn join_cookies(req: &mut RequestHeader) -> Result<()> {
    let mut values = req.headers.get_all(http::header::COOKIE).iter();
    let (Some(first), Some(_)) = (values.next(), values.next()) else {
        return Ok(());
    };
    let mut joined = first.as_bytes().to_vec();
    for v in req.headers.get_all(http::header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(v.as_bytes());
    }
    let joined = http::HeaderValue::from_bytes(&joined)
        .map_err(|e| Error::because(ErrorType::InvalidHTTPHeader, "joining cookies", e))?;
    req.insert_header(http::header::COOKIE, joined)
}

/// Whether a client-sent header must never reach the upstream whatever the upstream's
/// settings: an `x-keygate-*` identity header, or an underscore spelling of one or of a
/// credential header (`x_keygate_owner`, `x_api_key`), which CGI/WSGI-style frameworks read
/// as the dashed name.
fn is_spoofed(name: &str) -> bool {
    if name.starts_with("x-keygate-") {
        return true;
    }
    if !name.contains('_') {
        return false;
    }
    let dashed = name.replace('_', "-");
    dashed.starts_with("x-keygate-")
        || auth::CREDENTIAL_HEADERS
            .iter()
            .any(|c| c == dashed.as_str())
}

/// Whether an HTTP/1 request came with both `Content-Length` and `Transfer-Encoding`.
/// Pingora drops the length before keygate sees the parsed head (RFC 9112 §6.3), so this
/// reads the head's bytes as the client sent them (keep-alive state cannot tell: a client's
/// own `Connection: close` turns it off too). keygate refuses such a request, as nginx and
/// Envoy do, rather than forward a message two parsers could frame two ways.
fn sent_length_and_encoding(session: &Session) -> bool {
    match session.as_downstream() {
        pingora::protocols::http::server::Session::H1(h1) => {
            target::length_and_encoding(&h1.get_headers_raw_bytes())
        }
        // HTTP/2 has no Transfer-Encoding: the h2 layer refuses a stream that sends one.
        _ => false,
    }
}

/// SHA-256 of the verified TLS client certificate the connection presented, if any.
fn client_cert(session: &Session) -> Option<&[u8]> {
    session
        .digest()
        .and_then(|d| d.ssl_digest.as_ref())
        .map(|s| s.cert_digest.as_slice())
        .filter(|d| !d.is_empty())
}

/// One line per request (`keygate::access`): what an operator needs to follow a request, and
/// nothing a client keeps secret — no query string, header value, body, signature or nonce.
fn access_log(session: &Session, ctx: &Ctx, route: &str, outcome: &str, status: u16) {
    let req = session.req_header();
    let tls = session
        .digest()
        .and_then(|d| d.ssl_digest.as_ref())
        .map(|s| s.version.as_ref());
    let http = http_version(req.version);
    let key = ctx.key.as_deref();
    tracing::info!(
        target: "keygate::access",
        request_id = %ctx.request_id,
        trace_id = trace::trace_id(&ctx.trace.traceparent),
        route,
        method = req.method.as_str(),
        path = req.uri.path(),
        status,
        outcome,
        key_id = key.map(ActiveKey::id),
        owner = key.map(ActiveKey::owner),
        client_ip = ctx.client_ip.map(tracing::field::display),
        upstream = ctx.upstream_addr.map(tracing::field::display),
        auth_us = ctx.auth_us,
        upstream_us = ctx.upstream_us,
        bytes_in = session.body_bytes_read(),
        bytes_out = session.body_bytes_sent(),
        tls,
        http,
        "request"
    );
}

/// keygate's headers on a response relayed from the upstream: the request id, and the
/// request's rate-limit state when limits applied.
fn stamp(ctx: &Ctx, resp: &mut ResponseHeader) -> Result<()> {
    resp.insert_header("x-request-id", ctx.request_id.as_str())?;
    if let Some((policy, state)) = &ctx.rate_headers {
        resp.insert_header("ratelimit-policy", policy.as_str())?;
        resp.insert_header("ratelimit", state.as_str())?;
    }
    Ok(())
}

fn http_version(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_2 => "2",
        http::Version::HTTP_10 => "1.0",
        _ => "1.1",
    }
}

/// Writes a complete problem+json response.
async fn write_problem(
    session: &mut Session,
    code: ErrorCode,
    detail: &str,
    request_id: &str,
) -> Result<()> {
    write_problem_with(session, code, detail, request_id, &[]).await
}

/// [`write_problem`] with more response headers.
async fn write_problem_with(
    session: &mut Session,
    code: ErrorCode,
    detail: &str,
    request_id: &str,
    extra: &[(&'static str, &str)],
) -> Result<()> {
    let body = problem::render(code, detail, request_id, None);
    let mut h = ResponseHeader::build(code.status(), Some(4 + extra.len()))?;
    h.insert_header("content-type", problem::CONTENT_TYPE)?;
    h.insert_header("content-length", body.len().to_string())?;
    h.insert_header("x-request-id", request_id)?;
    for (name, value) in extra {
        h.insert_header(*name, *value)?;
    }
    session.write_response_header(Box::new(h), false).await?;
    session
        .write_response_body(Some(Bytes::from(body)), true)
        .await?;
    Ok(())
}

/// The contract's code for a pingora error, or `None` when the client is gone.
/// Bounds pingora's next read of a public route's streamed HTTP/1 body by what is left of
/// `server.body_timeout`, so a late body ends the request through the error path (logged,
/// counted) rather than by the connection watchdog. Per read: a client trickling bytes gets
/// no more than the deadline in all.
fn bound_body_read(session: &mut Session, ctx: &mut Ctx) {
    let Some(left) = guard::body_time_left() else {
        return;
    };
    if ctx.read_timeout_before.is_none() {
        ctx.read_timeout_before = Some(session.get_read_timeout());
    }
    // A zero timeout would not time out at all in pingora's reads: keep a millisecond.
    session.set_read_timeout(Some(left.max(Duration::from_millis(1))));
}

/// Gives the connection its own read timeout back once the body is in (the next request
/// head on it is bounded by `server.header_timeout`, not by this body's deadline).
fn restore_read_timeout(session: &mut Session, ctx: &mut Ctx) {
    if let Some(before) = ctx.read_timeout_before.take() {
        session.set_read_timeout(before);
    }
}

/// The client did not send its body within `server.body_timeout`.
fn body_timeout_error() -> Box<Error> {
    let mut e = Error::explain(ErrorType::ReadTimedout, "server.body_timeout");
    e.as_down();
    e
}

fn error_code(e: &Error) -> Option<ErrorCode> {
    use ErrorType::*;
    match e.etype() {
        HTTPStatus(413) => Some(ErrorCode::BodyTooLarge),
        HTTPStatus(400) => Some(ErrorCode::BadRequest),
        ReadTimedout | WriteTimedout if e.esource() != &ErrorSource::Downstream => {
            Some(ErrorCode::UpstreamTimeout)
        }
        _ => match e.esource() {
            ErrorSource::Upstream => Some(ErrorCode::UpstreamUnavailable),
            ErrorSource::Downstream => match e.etype() {
                WriteError | ReadError | ConnectionClosed | ReadTimedout | WriteTimedout => None,
                _ => Some(ErrorCode::BadRequest),
            },
            ErrorSource::Internal | ErrorSource::Unset => match e.etype() {
                ConnectTimedout | ConnectRefused | ConnectNoRoute | ConnectError
                | ConnectProxyFailure | ConnectionClosed | ReadError | WriteError
                | InvalidHTTPHeader => Some(ErrorCode::UpstreamUnavailable),
                _ => Some(ErrorCode::Internal),
            },
        },
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            routing: self.routing.load_full(),
            request_id: String::new(),
            route: None,
            key: None,
            client_ip: None,
            peer_trusted: false,
            outcome: None,
            answered_expect: false,
            public_body_bytes: 0,
            upstream_started: None,
            body_timed_out: false,
            read_timeout_before: None,
            self_service: false,
            assertion: None,
            trace: trace::Trace {
                traceparent: String::new(),
                client: false,
                span: None,
            },
            auth_us: 0,
            upstream_us: None,
            upstream_addr: None,
            endpoint: None,
            tried: Vec::new(),
            rate_headers: None,
            credits_spent: 0,
            rate_spent: 0,
        }
    }

    /// Routes, bounds and reads the body, authenticates; answers refusals itself.
    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        guard::head_received(session.client_addr().and_then(|a| a.as_inet()).copied());
        // A client that pipelines gets its requests answered in order (RFC 9112 §9.3.2),
        // one after the other, instead of the second dropped with the connection.
        session.as_downstream_mut().set_pipelining_enabled(true);
        let req = session.req_header();
        ctx.request_id = usable_request_id(req).unwrap_or_else(crate::ids::random);
        ctx.trace = trace::begin(
            req.headers.get("traceparent"),
            self.otlp.as_deref(),
            req.method.as_str(),
        );
        // Before routing: a path an upstream could read as another route, or a length two
        // parsers could read two ways, is refused whatever the route.
        let line = match session.as_downstream() {
            pingora::protocols::http::server::Session::H1(h1) if h1.request_target_escaped() => {
                Err(target::ESCAPED_TARGET)
            }
            pingora::protocols::http::server::Session::H1(h1) => {
                target::check_request_line(&h1.get_headers_raw_bytes())
            }
            // HTTP/2: `:path` reaches keygate as sent (the h2 layer resets a stream whose
            // `:path` holds a space or control byte), but raw non-ASCII passes.
            _ => target::check_target_bytes(req.raw_path()),
        };
        // RFC 9112 §3.2: an HTTP/1.1 request without Host is refused. (HTTP/1.0 may omit it:
        // the upstream gets the endpoint's; HTTP/2's `:authority` becomes one.)
        let host = if req.version == http::Version::HTTP_11
            && !req.headers.contains_key(http::header::HOST)
        {
            Err("the request has no Host header (RFC 9112 §3.2 requires one)")
        } else {
            Ok(())
        };
        if let Err(detail) = line
            .and(host)
            .and_then(|()| target::check_path(req.uri.path()))
        {
            return self
                .refuse(session, ctx, ErrorCode::BadRequest, detail)
                .await;
        }
        // A head this large is never a payment API call; refused before any lookup.
        let head_bytes: usize = req.uri.path_and_query().map_or(0, |p| p.as_str().len())
            + req
                .headers
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len() + 4)
                .sum::<usize>();
        if head_bytes > MAX_HEAD_BYTES {
            session.set_keepalive(None);
            let detail = "the request head is larger than 32 KiB";
            return self
                .refuse(session, ctx, ErrorCode::BadRequest, detail)
                .await;
        }
        let framing = if sent_length_and_encoding(session) {
            Err("Content-Length and Transfer-Encoding must not both be sent")
        } else {
            target::content_length(&req.headers)
        };
        let declared = match framing {
            Ok(n) => n,
            Err(detail) => {
                // The body's extent is unknown: it cannot be drained, only closed on.
                session.set_keepalive(None);
                return self
                    .refuse(session, ctx, ErrorCode::BadRequest, detail)
                    .await;
            }
        };
        if self.jwks_on_proxy
            && req.uri.path() == JWKS_PATH
            && matches!(req.method, http::Method::GET | http::Method::HEAD)
        {
            let doc = self.asserter.jwks(self.clock.now()).to_string();
            let mut h = ResponseHeader::build(200, Some(4))?;
            h.insert_header("content-type", "application/jwk-set+json")?;
            h.insert_header("cache-control", "public, max-age=60")?;
            h.insert_header("content-length", doc.len().to_string())?;
            h.insert_header("x-request-id", ctx.request_id.as_str())?;
            let head_only = req.method == http::Method::HEAD;
            session
                .write_response_header(Box::new(h), head_only)
                .await?;
            if !head_only {
                session
                    .write_response_body(Some(Bytes::from(doc)), true)
                    .await?;
            }
            return Ok(true);
        }
        let routing = Arc::clone(&ctx.routing);
        let is_self_service = req
            .uri
            .path()
            .strip_prefix(self_service::PREFIX)
            .is_some_and(|rest| rest.starts_with("/v1/keys"));
        // Step 1.
        let route_index = if is_self_service {
            ctx.self_service = true;
            None
        } else {
            routing.router.find(&req.method, req.uri.path())
        };
        // After a 101 the connection is a tunnel keygate no longer reads: only a route that
        // opts in (`upgrade = ["websocket"]`, never public) may open one.
        if let Some(detail) = target::upgrade_refusal(req) {
            let allowed = route_index
                .and_then(|i| routing.router.get(i))
                .is_some_and(|r| r.upgrade_websocket && target::is_websocket_upgrade(req));
            if !allowed {
                session.set_keepalive(None);
                return self
                    .refuse(session, ctx, ErrorCode::BadRequest, detail)
                    .await;
            }
        }
        let route_index = match route_index {
            Some(i) => {
                ctx.route = Some(i);
                Some(i)
            }
            None if ctx.self_service => None,
            None => {
                let detail = "no route matches this method and path";
                return self.refuse(session, ctx, ErrorCode::NoRoute, detail).await;
            }
        };
        // Step 2, before reading a byte when the length is declared.
        if declared.is_some_and(|n| n > self.max_body_bytes as u64) {
            return self.refuse_too_large(session, ctx).await;
        }
        let client_ip = match Self::client_ip(&routing, session) {
            Ok(ip) => ip,
            Err(e) => {
                return self
                    .refuse(session, ctx, ErrorCode::BadRequest, &e.to_string())
                    .await
            }
        };
        ctx.client_ip = Some(client_ip);
        ctx.peer_trusted = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .is_some_and(|a| routing.trusted_proxies.contains(a.ip().to_canonical()));
        // Step 2½: an address that keeps failing is refused before any key lookup or HMAC.
        if let Some(wait) = self.blocked(client_ip) {
            return self.refuse_blocked(session, ctx, wait).await;
        }
        let Some(route_index) = route_index else {
            return self.self_service(session, ctx, client_ip).await;
        };
        let (Some(route), Some(route_metrics)) = (
            routing.router.get(route_index),
            routing.route_metrics.get(route_index),
        ) else {
            return Err(Error::explain(
                ErrorType::InternalError,
                "route index out of range",
            ));
        };
        if route.public {
            if session.is_body_empty() {
                guard::body_received();
            } else if guard::deadlines_enforced() {
                bound_body_read(session, ctx);
            } else {
                // An HTTP/2 stream: pingora's reads of it have no timeout to move, so the body
                // is read here within `server.body_timeout` (and `max_body_bytes`) and replayed
                // upstream from the retry buffer, as a signed request's is.
                if self.read_body(session, ctx).await?.is_none() {
                    return self.refuse_too_large(session, ctx).await;
                }
            }
            return Ok(false);
        }

        let Some((key, body)) = self
            .authenticate(session, ctx, client_ip, route, route_metrics)
            .await?
        else {
            return Ok(true);
        };
        // Step 11: the request's limits, spent only now that it is known good.
        if !self.check_limits(session, ctx, &key, route).await? {
            return Ok(true);
        }
        if let Some(up) = routing
            .upstream(route)
            .filter(|u| !matches!(u.assertion, crate::assertion::Mode::Off))
        {
            let req = session.req_header();
            let target = String::from_utf8_lossy(req.raw_path());
            let body_sha256: [u8; 32] = sha2::Sha256::digest(&body).into();
            let facts = crate::assertion::Facts {
                key: &key,
                method: req.method.as_str(),
                target: &target,
                body_sha256: &body_sha256,
                client_cert: client_cert(session),
            };
            match self
                .asserter
                .assert(&up.assertion, &up.name, &facts, self.clock.now())
            {
                Ok(assertion) => ctx.assertion = assertion,
                Err(e) => {
                    tracing::error!(error = %e, "cannot sign the upstream assertion");
                    let detail = "the gateway cannot sign for the upstream yet; retry shortly";
                    return self
                        .refuse(session, ctx, ErrorCode::StoreUnavailable, detail)
                        .await;
                }
            }
        }
        ctx.key = Some(key);
        if session.as_downstream().retry_buffer_truncated() {
            // Cannot happen: the retry buffer holds max_body_bytes, and a larger body was
            // refused above. Never forward a body pingora could not replay whole.
            return Err(Error::explain(
                ErrorType::InternalError,
                "verified body larger than the retry buffer",
            ));
        }
        Ok(false)
    }

    /// Public routes stream their body; cap it as it passes (chunked bodies declare no length).
    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if ctx.key.is_none() {
            ctx.public_body_bytes += body.as_ref().map_or(0, Bytes::len);
            if ctx.public_body_bytes > self.max_body_bytes {
                return Error::e_explain(ErrorType::HTTPStatus(413), "public route body too large");
            }
            if end_of_stream {
                guard::body_received();
                restore_read_timeout(session, ctx);
            } else {
                bound_body_read(session, ctx);
            }
        }
        Ok(())
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let route = self
            .route(ctx)
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no route in context"))?;
        let (peer, endpoint) = Self::peer(&ctx.routing, route, &ctx.tried)?;
        ctx.upstream_addr = Some(endpoint.addr);
        ctx.endpoint = Some(endpoint);
        Ok(Box::new(peer))
    }

    /// A connection to the endpoint failed, so nothing was sent: counted against it, and an
    /// idempotent request (GET, HEAD, PUT, DELETE, OPTIONS, TRACE) is tried on another
    /// endpoint. Never a POST or PATCH, and never a body keygate forwards itself.
    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let Some(addr) = ctx.endpoint.as_ref().map(|ep| ep.addr) {
            ctx.tried.push(addr);
        }
        self.release_endpoint(ctx, true);
        let untried = ctx
            .route
            .and_then(|i| ctx.routing.router.get(i))
            .and_then(|r| ctx.routing.upstream(r))
            .is_some_and(|u| u.endpoints.iter().any(|a| !ctx.tried.contains(a)));
        let idempotent = session.req_header().method.is_idempotent();
        e.set_retry(idempotent && untried && !session.as_ref().retry_buffer_truncated());
        e
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        self.prepare_upstream_request(upstream_request, ctx)?;
        // From here the upstream may receive the request: what it spent stays spent.
        ctx.upstream_started = Some(Instant::now());
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(started) = ctx.upstream_started {
            ctx.upstream_us =
                Some(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
        }
        self.release_endpoint(ctx, false);
        if let (Some(started), Some(route)) = (ctx.upstream_started, self.route(ctx)) {
            let elapsed = started.elapsed().as_secs_f64();
            let class = status_class(upstream_response.status.as_u16());
            match self.hot_metrics(ctx) {
                Some(m) if class == "2xx" => m.upstream_2xx.observe(elapsed),
                _ => self
                    .metrics
                    .upstream_duration
                    .with_label_values(&[route.name.as_str(), class])
                    .observe(elapsed),
            }
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        stamp(ctx, upstream_response)
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let code = error_code(e);
        if let Some(code) = code {
            ctx.outcome = Some(code);
            if ctx.request_id.is_empty() {
                ctx.request_id = crate::ids::random();
            }
            let detail = match code {
                ErrorCode::UpstreamTimeout => "the upstream did not answer in time",
                ErrorCode::UpstreamUnavailable => "the upstream could not be reached",
                ErrorCode::BodyTooLarge => "the body is larger than the limit",
                _ => "the request could not be processed",
            };
            if let Err(we) = write_problem(session, code, detail, &ctx.request_id).await {
                tracing::debug!(error = %we, "could not write error response");
            }
        }
        FailToProxy {
            error_code: code.map_or(0, ErrorCode::status),
            can_reuse_downstream: false,
        }
    }

    /// pingora writes each request's final error at ERROR; keygate writes it instead, at the
    /// level of who must act. ERROR is for an operator: a client that went away or sent
    /// something unreadable is not (debug: its access-log line and `client_closed` /
    /// `bad_request` count it); an upstream that failed is seen in metrics and alerts (warn);
    /// only keygate's own failures stay at ERROR.
    fn suppress_error_log(&self, session: &Session, ctx: &Ctx, e: &Error) -> bool {
        let error = e.to_string();
        let error = crate::logging::redact_queries(&error);
        let request = self.request_summary(session, ctx);
        match error_code(e) {
            None | Some(ErrorCode::BadRequest | ErrorCode::BodyTooLarge) => {
                tracing::debug!(%error, %request, "request failed on the client's side");
            }
            Some(ErrorCode::UpstreamTimeout | ErrorCode::UpstreamUnavailable) => {
                tracing::warn!(%error, %request, "upstream failed");
            }
            Some(_) => tracing::error!(%error, %request, "request failed in keygate"),
        }
        true
    }

    /// What pingora's own error and warning lines name the request by. Its default prints the
    /// whole target, query included (a card number, a token), and the Host: here the method,
    /// the path and keygate's request id, which joins the line to the access log's.
    fn request_summary(&self, session: &Session, ctx: &Ctx) -> String {
        let req = session.req_header();
        format!(
            "{} {}, request_id: {}",
            req.method,
            req.uri.path(),
            ctx.request_id
        )
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        guard::request_done();
        // A streamed public body whose bounded read timed out (`bound_body_read`).
        let body_late = ctx.body_timed_out
            || ctx.read_timeout_before.is_some()
                && e.is_some_and(|e| {
                    e.etype() == &ErrorType::ReadTimedout && e.esource() == &ErrorSource::Downstream
                });
        restore_read_timeout(session, ctx);
        if body_late {
            self.metrics
                .connection_closed(crate::metrics::ConnClosed::BodyTimeout);
        }
        // Still held: the upstream failed before answering (a timeout, a broken connection).
        let upstream_failed = e.is_some_and(|e| e.esource() == &ErrorSource::Upstream)
            || matches!(
                ctx.outcome,
                Some(ErrorCode::UpstreamTimeout | ErrorCode::UpstreamUnavailable)
            );
        self.release_endpoint(ctx, upstream_failed);
        let span = ctx.trace.span.take();
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        if ctx.upstream_started.is_none() {
            self.refund_unsent(ctx).await;
        } else if status == 503 && self.route(ctx).is_some_and(|r| r.refund_on_5xx) {
            // The upstream said it did not act. Any other 5xx (a 504, a 500, a reset) may
            // come after it acted on the payment, so the credits stay spent.
            if let Some(key) = ctx.key.clone() {
                self.refund_credits(ctx, key.id()).await;
            }
        }
        let route = self.route(ctx).map_or("unmatched", |r| r.name.as_str());
        let outcome = match (ctx.outcome, e) {
            (Some(code), _) => code.as_str(),
            (None, Some(_)) if body_late => "body_timeout",
            (None, Some(_)) => "client_closed",
            (None, None) => "ok",
        };
        match self.hot_metrics(ctx) {
            Some(m) if outcome == "ok" => m.ok.inc(),
            _ => self
                .metrics
                .requests_total
                .with_label_values(&[route, outcome])
                .inc(),
        }

        if self.access_log {
            access_log(session, ctx, route, outcome, status);
        }
        if let Some(span) = span {
            let req = session.req_header();
            let key = ctx.key.as_deref();
            span.end(
                req.method.as_str(),
                &crate::otlp::Finished {
                    route,
                    path: req.uri.path(),
                    status,
                    outcome,
                    request_id: &ctx.request_id,
                    key_id: key.map(ActiveKey::id),
                    owner: key.map(ActiveKey::owner),
                    client_ip: ctx.client_ip,
                    upstream: ctx.upstream_addr,
                    http_version: http_version(req.version),
                },
            );
        }
    }
}
