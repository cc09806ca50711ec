//! Limits on client connections to the proxy listener, which pingora does not offer itself: at
//! most `server.max_connections` at once, and total deadlines for each request head
//! (`server.header_timeout`) and body (`server.body_timeout`). Pingora only bounds each read
//! (60 s), so a client trickling a byte at a time could hold a connection for ever.
//!
//! On a TLS listener the handshake runs here too, not in pingora's listener (which allows it
//! 60 s and counts nothing): it counts toward `max_connections` from the moment the connection
//! is accepted and must finish within `header_timeout`, so silent TLS clients cannot exhaust the
//! process's descriptors and take the admin and metrics listeners down with the proxy.
//!
//! [`Guarded`] wraps pingora's proxy app. Each connection runs inside a task-local
//! [`Deadline`] that the proxy's phases move as a request goes from head to body to upstream;
//! a watchdog beside the connection drops it when the deadline passes. Moving the deadline is
//! two atomic stores; the watchdog wakes only when a deadline may have passed.
//!
//! HTTP/2 runs each stream in a task of its own, outside the connection's task-local. An h2
//! connection owes its first stream within `header_timeout` (its streams find the deadline in
//! a registry by peer address); after that pingora's h2 idle timeout (set to `header_timeout`)
//! closes it when no stream is open, and each stream's body is bounded by the proxy itself.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::listeners::tls::Acceptor;
use pingora::listeners::ConnectionFilter;
use pingora::protocols::{Stream, ALPN};
use pingora::server::ShutdownWatch;

use crate::metrics::{ConnClosed, Metrics};

/// The limits, from `[server]`.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    /// HTTP/2 with prior knowledge is accepted on the plain listener (`server.h2c`).
    pub h2c: bool,
}

/// After the listener stops, how long a kept-alive connection may still send one more request
/// before it is closed idle: a client in a request loop sends it within milliseconds; one
/// idle this long is closed (the one race left is HTTP/1.1's own, a request sent at the very
/// moment an idle connection closes, RFC 9112 §9.6).
const IDLE_DRAIN: Duration = Duration::from_secs(1);

/// Open HTTP/2 connections by peer address, for their streams (see the module docs).
static H2_CONNECTIONS: LazyLock<Mutex<HashMap<SocketAddr, Arc<Deadline>>>> =
    LazyLock::new(Mutex::default);

/// Keeps an h2 connection in [`H2_CONNECTIONS`] while it lives.
struct H2Registered(SocketAddr);

impl H2Registered {
    fn new(peer: SocketAddr, deadline: Arc<Deadline>) -> Self {
        h2_connections().insert(peer, deadline);
        Self(peer)
    }
}

impl Drop for H2Registered {
    fn drop(&mut self) {
        h2_connections().remove(&self.0);
    }
}

fn h2_connections() -> std::sync::MutexGuard<'static, HashMap<SocketAddr, Arc<Deadline>>> {
    H2_CONNECTIONS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// HTTP/2's connection preface (RFC 9113 §3.4), which an h2c client sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

tokio::task_local! {
    /// The deadline of the connection this task serves (HTTP/1: one task per connection).
    static DEADLINE: Arc<Deadline>;
}

/// What the connection is waiting for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Stage {
    /// A request head: the first, or the next on a kept-alive connection.
    Head = 0,
    /// The body of a request whose head is in.
    Body = 1,
    /// Nothing the client owes: the upstream or keygate is working.
    Free = 2,
    /// The TLS handshake, before the first request head.
    Handshake = 3,
}

/// A connection's current deadline, moved by the proxy's phases, read by its watchdog.
#[derive(Debug)]
pub struct Deadline {
    /// Milliseconds after `start`; `u64::MAX` when there is none.
    at_ms: AtomicU64,
    stage: AtomicU8,
    /// tokio's clock, so tests can pause it.
    start: Instant,
    limits: Limits,
}

impl Deadline {
    fn new(limits: Limits) -> Self {
        let d = Self {
            at_ms: AtomicU64::new(u64::MAX),
            stage: AtomicU8::new(Stage::Free as u8),
            start: Instant::now(),
            limits,
        };
        d.set(Stage::Head, Some(limits.header_timeout));
        d
    }

    fn set(&self, stage: Stage, within: Option<Duration>) {
        let at = within.map_or(u64::MAX, |w| {
            u64::try_from((self.start.elapsed() + w).as_millis()).unwrap_or(u64::MAX)
        });
        self.at_ms.store(at, Ordering::Release);
        self.stage.store(stage as u8, Ordering::Release);
    }

    fn current(&self) -> (Option<Instant>, Stage) {
        let at = self.at_ms.load(Ordering::Acquire);
        let stage = match self.stage.load(Ordering::Acquire) {
            0 => Stage::Head,
            1 => Stage::Body,
            3 => Stage::Handshake,
            _ => Stage::Free,
        };
        let at = (at != u64::MAX).then(|| self.start + Duration::from_millis(at));
        (at, stage)
    }
}

fn with_deadline(f: impl FnOnce(&Deadline)) {
    // Absent outside a guarded connection (HTTP/2 streams run in tasks of their own).
    let _ = DEADLINE.try_with(|d| f(d));
}

/// How long after `server.body_timeout` the watchdog drops a connection whose body is late.
/// The proxy's own reads time out at `body_timeout` ([`body_time_left`]) and end the request
/// through pingora's error path — an access-log line, metrics, refunds, the endpoint released;
/// the watchdog, which drops the connection mid-flight and skips all that, is only the
/// backstop for a read that was not bounded.
const BODY_BACKSTOP: Duration = Duration::from_secs(1);

/// The request head is in: the client now owes its body, within `server.body_timeout`. An
/// HTTP/2 stream (from `peer`) instead frees its connection of the first-stream deadline.
pub fn head_received(peer: Option<SocketAddr>) {
    if DEADLINE
        .try_with(|d| d.set(Stage::Body, Some(d.limits.body_timeout + BODY_BACKSTOP)))
        .is_err()
    {
        if let Some(d) = peer.and_then(|p| h2_connections().get(&p).cloned()) {
            d.set(Stage::Free, None);
        }
    }
}

/// Time left for this HTTP/1 connection's request body (`server.body_timeout` from its head);
/// `None` outside a guarded connection (an HTTP/2 stream) or when no body is owed.
pub fn body_time_left() -> Option<Duration> {
    DEADLINE
        .try_with(|d| match d.current() {
            (Some(at), Stage::Body) => Some(
                at.saturating_duration_since(Instant::now())
                    .saturating_sub(BODY_BACKSTOP),
            ),
            _ => None,
        })
        .ok()
        .flatten()
}

/// Whether this task serves one HTTP/1 connection, whose deadlines the watchdog enforces;
/// `false` for an HTTP/2 stream, whose body the caller must bound itself.
pub fn deadlines_enforced() -> bool {
    DEADLINE.try_with(|_| ()).is_ok()
}

/// The body is in (or there is none): nothing is owed until the response is sent.
pub fn body_received() {
    with_deadline(|d| d.set(Stage::Free, None));
}

/// The response is sent: the next request head is owed within `server.header_timeout`
/// (this also bounds how long a kept-alive connection may sit idle).
pub fn request_done() {
    with_deadline(|d| d.set(Stage::Head, Some(d.limits.header_timeout)));
}

/// Resolves when the connection's deadline has passed, with the stage it passed in. Wakes at
/// the deadline it knows, or after `tick` when there is none or it moved, and looks again.
async fn expired(d: &Deadline, tick: Duration) -> Stage {
    loop {
        let (at, stage) = d.current();
        let now = Instant::now();
        match at {
            Some(at) if at <= now => return stage,
            Some(at) => tokio::time::sleep_until(at.min(now + tick)).await,
            None => tokio::time::sleep(tick).await,
        }
    }
}

/// Open connections on the proxy listener, counted from `accept()`: pingora's accept loop asks
/// [`ConnectionFilter::should_accept`] before it spawns anything, so a connection over
/// `max_connections` is closed there and then, and a burst of connects cannot pile up accepted
/// descriptors in tasks not yet run.
pub struct Connections {
    open: AtomicUsize,
    max: usize,
    metrics: Metrics,
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections")
            .field("open", &self.open)
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl ConnectionFilter for Connections {
    async fn should_accept(&self, _peer: Option<&SocketAddr>) -> bool {
        let open = self.open.fetch_add(1, Ordering::AcqRel) + 1;
        if open > self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            // Closed at once, so descriptors stay free for the admin and metrics listeners.
            self.metrics.connection_closed(ConnClosed::MaxConnections);
            tracing::debug!(open, "server.max_connections reached; connection closed");
            return false;
        }
        self.metrics.open_connections.inc();
        true
    }
}

/// An accepted connection's place in [`Connections`], given back when its serving ends.
struct Slot<'a>(&'a Connections);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.open_connections.dec();
    }
}

/// Pingora's proxy app with keygate's connection limits around each connection.
pub struct Guarded<A> {
    inner: Arc<A>,
    limits: Limits,
    /// Shared with pingora's accept loop as its connection filter.
    connections: Arc<Connections>,
    metrics: Metrics,
    /// How often a watchdog looks again when its deadline moved or there is none.
    tick: Duration,
    /// `[server.tls]`: the handshake each connection owes first.
    tls: Option<Acceptor>,
    /// Failed handshakes are logged at most once a minute: any client can cause one.
    handshake_log: crate::logging::QuietLog,
}

impl<A> Guarded<A> {
    pub fn new(inner: A, limits: Limits, metrics: Metrics) -> Self {
        let tick = (limits.header_timeout.min(limits.body_timeout) / 2)
            .clamp(Duration::from_millis(50), Duration::from_secs(1));
        Self {
            inner: Arc::new(inner),
            limits,
            connections: Arc::new(Connections {
                open: AtomicUsize::new(0),
                max: limits.max_connections,
                metrics: metrics.clone(),
            }),
            metrics,
            tick,
            tls: None,
            handshake_log: crate::logging::QuietLog::default(),
        }
    }

    /// The filter to give pingora's listener ([`Connections`]): without it nothing is counted.
    pub fn connection_filter(&self) -> Arc<dyn ConnectionFilter> {
        Arc::clone(&self.connections) as Arc<dyn ConnectionFilter>
    }

    /// Serves TLS: every connection owes a handshake with `acceptor` first.
    #[must_use]
    pub fn with_tls(mut self, acceptor: Option<Acceptor>) -> Self {
        self.tls = acceptor;
        self
    }
}

/// The TLS handshake on an accepted TCP connection; `Ok(None)` when the client closed before
/// sending a byte — a TCP health check (a load balancer's, or `/readyz`'s own), not a failure.
async fn handshake(acceptor: &Acceptor, stream: Stream) -> pingora::Result<Option<Stream>> {
    use pingora::protocols::Peek;
    let mut tcp = *stream
        .into_any()
        .downcast::<pingora::protocols::l4::stream::Stream>()
        .map_err(|_| {
            pingora::Error::explain(
                pingora::ErrorType::InternalError,
                "the proxy listener handed over a stream that is not TCP",
            )
        })?;
    // The byte is put back: the handshake reads it.
    if tcp.try_peek(&mut [0u8; 1]).await.is_err() {
        return Ok(None);
    }
    let tls = acceptor.tls_handshake(tcp).await?;
    Ok(Some(Box::new(tls)))
}

#[async_trait]
impl<A> ServerApp for Guarded<A>
where
    A: ServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // Taken by the connection filter at accept. pingora serves a kept-alive HTTP/1
        // connection inside one call, so the call's end is the connection's.
        let _slot = Slot(&self.connections);
        let deadline = Arc::new(Deadline::new(self.limits));
        let peer = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied());
        if self.tls.is_some() {
            deadline.set(Stage::Handshake, Some(self.limits.header_timeout));
        }
        let served = async {
            let mut stream = match &self.tls {
                None => stream,
                Some(acceptor) => match handshake(acceptor, stream).await {
                    Ok(None) => return None,
                    Ok(Some(tls)) => {
                        // The first request head is owed from here, in a window of its own.
                        deadline.set(Stage::Head, Some(self.limits.header_timeout));
                        tls
                    }
                    Err(e) => {
                        self.metrics.connection_closed(ConnClosed::HandshakeFailed);
                        if let Some(n) = self.handshake_log.due() {
                            tracing::warn!(error = %e, failed = n, "TLS handshakes failed (logged at most once a minute; keygate_connections_closed_total{{reason=\"tls_handshake_failed\"}} counts each)");
                        }
                        return None;
                    }
                },
            };
            let h2 = match stream.selected_alpn_proto() {
                Some(ALPN::H2) => true,
                // pingora peeks the same way; a peek consumes nothing.
                None if self.limits.h2c => {
                    let mut buf = [0u8; H2_PREFACE.len()];
                    stream.try_peek(&mut buf).await.unwrap_or(false) && buf == H2_PREFACE
                }
                _ => false,
            };
            let _registered = h2
                .then_some(peer)
                .flatten()
                .map(|p| H2Registered::new(p, Arc::clone(&deadline)));
            DEADLINE
                .scope(
                    Arc::clone(&deadline),
                    self.inner.process_new(stream, shutdown),
                )
                .await
        };
        tokio::select! {
            biased;
            reused = served => reused,
            stage = expired(&deadline, self.tick) => {
                let why = match stage {
                    Stage::Body => ConnClosed::BodyTimeout,
                    Stage::Handshake => ConnClosed::HandshakeTimeout,
                    Stage::Head | Stage::Free => ConnClosed::HeaderTimeout,
                };
                self.metrics.connection_closed(why);
                tracing::debug!(reason = why.as_str(), "slow client; connection closed");
                None
            }
        }
    }

    /// Called once the listener has stopped accepting (an upgrade's hand-over, or SIGTERM).
    /// pingora's own cleanup drops every kept-alive connection waiting for its next request
    /// at once, which races a client sending that request (the request is lost: reset or EOF
    /// without answer). So connections first get [`IDLE_DRAIN`] to send it — answered with
    /// `Connection: close`, as pingora does for any request read once shutdown has begun (h2:
    /// GOAWAY) — and only those still idle then are dropped. Then this waits for requests in
    /// flight, so the service (and the process, after an upgrade) ends when the last one has
    /// its response; pingora's grace period bounds it all.
    async fn cleanup(&self) {
        let open = || self.connections.open.load(Ordering::Acquire);
        let drained = |until: Instant| async move {
            while open() > 0 && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        drained(Instant::now() + IDLE_DRAIN).await;
        self.inner.cleanup().await;
        // No bound of its own: a request in flight may run as long as its upstream allows, and
        // pingora stops waiting for this service at the end of `shutdown_grace` (a bound here
        // of header + body timeout cut requests that the grace still allowed).
        while open() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_connections: 1,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            h2c: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_fires_in_the_stage_it_was_set_for() {
        let d = Deadline::new(limits());
        let fired = expired(&d, Duration::from_secs(1)).await;
        assert_eq!(fired, Stage::Head);
        assert!(d.start.elapsed() >= Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn moving_the_deadline_moves_the_watchdog() {
        let d = Arc::new(Deadline::new(limits()));
        let watched = Arc::clone(&d);
        let watchdog = tokio::spawn(async move { expired(&watched, Duration::from_secs(1)).await });
        tokio::time::sleep(Duration::from_secs(9)).await;
        DEADLINE.sync_scope(Arc::clone(&d), || head_received(None));
        tokio::time::sleep(Duration::from_secs(20)).await;
        DEADLINE.sync_scope(Arc::clone(&d), body_received);
        // Nothing is owed while the upstream works, however long.
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(!watchdog.is_finished());
        DEADLINE.sync_scope(Arc::clone(&d), request_done);
        let stage = watchdog.await.unwrap_or(Stage::Free);
        assert_eq!(stage, Stage::Head);
        assert!(d.start.elapsed() >= Duration::from_secs(629));
    }
}
