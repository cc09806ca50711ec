//! The circuit breaker in front of the store's Redis connections: once Redis is known
//! unreachable, calls fail at once instead of each waiting out the call timeout.
//!
//! Closed: every call goes through and its outcome is classified. A connection-class failure
//! (IO error, connection refused or dropped, a cluster without any reachable node) counts;
//! any answer from the server — even an error reply such as `NOSCRIPT` or `WRONGTYPE` — proves
//! it reachable and resets the count. The circuit opens on the first timeout (it already cost
//! a whole call timeout, and in an outage every call in flight pays it too), or on
//! [`TRIP_AFTER`] consecutive other connection failures: one dropped connection alone happens
//! on a benign server-side idle close or a failover, and the connection manager's reconnect
//! usually serves the next call. On a Redis Cluster only "no node reachable" counts (see
//! [`Outcome::of`]).
//!
//! Open: calls answer [`CIRCUIT_OPEN`] without touching the network. A probe task sends a
//! `PING` every [`PROBE_EVERY`], each bounded by [`PROBE_TIMEOUT`], and closes the circuit on
//! the first answer. No restart, no half-open trickle of real traffic: the probe is the trickle.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus::{IntCounter, IntGauge};
use redis::aio::ConnectionLike;
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, Value};
use tokio::sync::Notify;

use super::Conn;

/// Consecutive connection failures (timeouts aside) that open the circuit.
pub(super) const TRIP_AFTER: u32 = 2;
/// How often the open circuit's probe pings.
pub(super) const PROBE_EVERY: Duration = Duration::from_millis(250);
/// One probe's bound. Longer than a loopback or LAN round trip by far, shorter than the store
/// call timeout, so a frozen server costs the probe, never a request.
pub(super) const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// What a call answers while the circuit is open (the `detail` of `store_unavailable`).
pub(super) const CIRCUIT_OPEN: &str = "store unreachable (circuit open)";

/// What a call's outcome says about the store's reachability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// The server answered (a value or an error reply).
    Answered,
    /// The call timed out.
    TimedOut,
    /// Any other connection-class failure.
    Unreachable,
}

impl Outcome {
    /// On a `cluster`, only "no node reachable at all" counts: one master down is a partial
    /// outage that the cluster client's retries and redirections ride out, and failing every
    /// slot fast because of one would turn it into a whole one.
    pub(super) fn of<T>(result: &RedisResult<T>, cluster: bool) -> Self {
        match result {
            Ok(_) => Self::Answered,
            Err(e) if e.kind() == ErrorKind::ClusterConnectionNotFound => Self::Unreachable,
            Err(_) if cluster => Self::Answered,
            Err(e) if e.is_timeout() => Self::TimedOut,
            Err(e) if e.is_io_error() => Self::Unreachable,
            Err(_) => Self::Answered,
        }
    }
}

/// The circuit's state, shared by every connection of one store and its probe.
#[derive(Default)]
pub(super) struct Breaker {
    /// Classify as for a Redis Cluster ([`Outcome::of`]).
    cluster: bool,
    open: AtomicBool,
    failures: AtomicU32,
    /// Wakes the probe when the circuit opens.
    opened: Notify,
    metrics: OnceLock<CircuitMetrics>,
}

/// `keygate_store_circuit_open` and `keygate_store_fast_failures_total`.
struct CircuitMetrics {
    open: IntGauge,
    fast_failed: IntCounter,
}

impl Breaker {
    pub(super) fn new(cluster: bool) -> Self {
        Self {
            cluster,
            ..Self::default()
        }
    }

    /// Reports the state to `open` (0/1) and each fast-failed call to `fast_failed`, from now
    /// on. Only the first call counts.
    pub(super) fn report_to(&self, open: IntGauge, fast_failed: IntCounter) {
        open.set(i64::from(self.is_open()));
        let _ = self.metrics.set(CircuitMetrics { open, fast_failed });
    }

    pub(super) fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// `Err` at once while the circuit is open.
    pub(super) fn admit(&self) -> RedisResult<()> {
        if !self.is_open() {
            return Ok(());
        }
        if let Some(m) = self.metrics.get() {
            m.fast_failed.inc();
        }
        // `Other`, not a refusal: it must not read as a fresh connection failure anywhere.
        Err(RedisError::from(std::io::Error::other(CIRCUIT_OPEN)))
    }

    /// Counts one call's result.
    pub(super) fn observe<T>(&self, result: &RedisResult<T>) {
        self.record(Outcome::of(result, self.cluster));
    }

    fn record(&self, outcome: Outcome) {
        match outcome {
            Outcome::Answered => self.failures.store(0, Ordering::Release),
            Outcome::TimedOut => self.trip(),
            Outcome::Unreachable => {
                if self.failures.fetch_add(1, Ordering::AcqRel) + 1 >= TRIP_AFTER {
                    self.trip();
                }
            }
        }
    }

    fn trip(&self) {
        if !self.open.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                "Redis unreachable: store calls fail at once until a probe gets an answer \
                 (circuit open)"
            );
            if let Some(m) = self.metrics.get() {
                m.open.set(1);
            }
            self.opened.notify_one();
        }
    }

    fn close(&self) {
        self.failures.store(0, Ordering::Release);
        if self.open.swap(false, Ordering::AcqRel) {
            tracing::info!("Redis answers again (circuit closed)");
            if let Some(m) = self.metrics.get() {
                m.open.set(0);
            }
        }
    }

    /// Until the circuit opens.
    async fn until_open(&self) {
        loop {
            let notified = self.opened.notified();
            if self.is_open() {
                return;
            }
            notified.await;
        }
    }
}

/// For as long as the store lives: while the circuit is open, `ping` every [`PROBE_EVERY`]
/// (each bounded by [`PROBE_TIMEOUT`]) and close it on the first success.
pub(super) async fn probe<F, Fut>(breaker: Arc<Breaker>, mut ping: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    loop {
        breaker.until_open().await;
        // Ticks, not sleeps between pings: a slow failing ping (a reconnect in backoff) does
        // not push the next one a whole period further.
        let mut every =
            tokio::time::interval_at(tokio::time::Instant::now() + PROBE_EVERY, PROBE_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while breaker.is_open() {
            every.tick().await;
            if tokio::time::timeout(PROBE_TIMEOUT, ping())
                .await
                .unwrap_or(false)
            {
                breaker.close();
            }
        }
    }
}

/// The circuit breaker's probe: one `PING`, straight to the connection (not through the
/// breaker). On a cluster, to any one node: the circuit opens only when none answers.
pub(super) async fn ping(mut conn: Conn) -> bool {
    let ping = redis::cmd("PING");
    match &mut conn {
        Conn::Single(c) => ping.query_async::<String>(c).await.is_ok(),
        Conn::Cluster(c) => c
            .route_command(
                &ping,
                redis::cluster_routing::RoutingInfo::SingleNode(
                    redis::cluster_routing::SingleNodeRoutingInfo::Random,
                ),
            )
            .await
            .is_ok(),
        // To the primary the sentinels name now (the resolver follows failovers on its own).
        Conn::Sentinel(c) => ping.query_async::<String>(c).await.is_ok(),
    }
}

/// A connection whose calls pass the breaker: refused at once while it is open, counted
/// while it is closed.
#[derive(Clone)]
pub(super) struct Guarded<C> {
    pub(super) inner: C,
    pub(super) breaker: Arc<Breaker>,
}

impl<C: ConnectionLike + Send> ConnectionLike for Guarded<C> {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            self.breaker.admit()?;
            let result = self.inner.req_packed_command(cmd).await;
            self.breaker.observe(&result);
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            self.breaker.admit()?;
            let result = self.inner.req_packed_commands(cmd, offset, count).await;
            self.breaker.observe(&result);
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn io(kind: std::io::ErrorKind) -> RedisResult<()> {
        Err(RedisError::from(std::io::Error::from(kind)))
    }

    #[test]
    fn outcomes_tell_connection_failures_from_server_answers() {
        use std::io::ErrorKind as Io;
        assert_eq!(
            Outcome::of(&Ok::<_, RedisError>(()), false),
            Outcome::Answered
        );
        assert_eq!(Outcome::of(&io(Io::TimedOut), false), Outcome::TimedOut);
        assert_eq!(
            Outcome::of(&io(Io::ConnectionRefused), false),
            Outcome::Unreachable
        );
        assert_eq!(
            Outcome::of(&io(Io::BrokenPipe), false),
            Outcome::Unreachable
        );
        let no_node: RedisResult<()> = Err((
            ErrorKind::ClusterConnectionNotFound,
            "all connections failed",
        )
            .into());
        assert_eq!(Outcome::of(&no_node, false), Outcome::Unreachable);
        // A cluster: one node's failure is its slots' business; none reachable opens.
        assert_eq!(Outcome::of(&no_node, true), Outcome::Unreachable);
        assert_eq!(Outcome::of(&io(Io::TimedOut), true), Outcome::Answered);
        assert_eq!(
            Outcome::of(&io(Io::ConnectionRefused), true),
            Outcome::Answered
        );
        // Script and data errors come from a server that answered.
        for kind in [
            ErrorKind::NoScriptError,
            ErrorKind::TypeError,
            ErrorKind::ResponseError,
        ] {
            let e: RedisResult<()> = Err((kind, "server said no").into());
            assert_eq!(Outcome::of(&e, false), Outcome::Answered, "{kind:?}");
        }
    }

    #[test]
    fn one_timeout_or_two_consecutive_failures_open_the_circuit() {
        let b = Breaker::default();
        b.record(Outcome::Unreachable);
        b.record(Outcome::Answered);
        b.record(Outcome::Unreachable);
        assert!(b.admit().is_ok(), "not consecutive");
        b.record(Outcome::Unreachable);
        assert!(b.is_open());
        let err = b.admit().unwrap_err();
        assert!(err.to_string().contains(CIRCUIT_OPEN), "{err}");

        let b = Breaker::default();
        b.record(Outcome::TimedOut);
        assert!(b.is_open());
    }

    #[tokio::test(start_paused = true)]
    async fn the_probe_closes_the_circuit_on_its_first_answer() {
        let breaker = Arc::new(Breaker::default());
        let open = IntGauge::new("open", "test").unwrap();
        let fast = IntCounter::new("fast", "test").unwrap();
        breaker.report_to(open.clone(), fast.clone());
        let pings = Arc::new(AtomicUsize::new(0));
        let answers_from = Arc::new(AtomicUsize::new(usize::MAX));
        let task = tokio::spawn(probe(Arc::clone(&breaker), {
            let (pings, answers_from) = (Arc::clone(&pings), Arc::clone(&answers_from));
            move || {
                let n = pings.fetch_add(1, Ordering::SeqCst) + 1;
                let answers = n >= answers_from.load(Ordering::SeqCst);
                async move {
                    if n == 2 {
                        // A frozen server: the probe's own bound ends it, not the call timeout.
                        std::future::pending::<()>().await;
                    }
                    answers
                }
            }
        }));
        // Closed: the probe sleeps, pings nothing.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(pings.load(Ordering::SeqCst), 0);

        breaker.record(Outcome::TimedOut);
        assert_eq!(open.get(), 1);
        assert!(breaker.admit().is_err());
        assert!(breaker.admit().is_err());
        assert_eq!(fast.get(), 2);
        // Pings 1 (fails at once), 2 (hangs: bounded), 3 (fails); the 4th answers.
        answers_from.store(4, Ordering::SeqCst);
        let started = tokio::time::Instant::now();
        while breaker.is_open() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let took = started.elapsed();
        assert_eq!(pings.load(Ordering::SeqCst), 4);
        // 1 at 250 ms, 2 at 500 ms until its bound at 1 s, 3 at once, 4 a period later.
        let expected = 3 * PROBE_EVERY + PROBE_TIMEOUT;
        assert!(
            took >= expected && took <= expected + Duration::from_millis(10),
            "{took:?}"
        );
        assert_eq!(open.get(), 0);
        assert!(breaker.admit().is_ok());

        // It opens again, and the probe wakes again.
        breaker.record(Outcome::Unreachable);
        breaker.record(Outcome::Unreachable);
        assert_eq!(open.get(), 1);
        tokio::time::sleep(PROBE_EVERY + Duration::from_millis(10)).await;
        assert!(!breaker.is_open());
        assert_eq!(pings.load(Ordering::SeqCst), 5);
        task.abort();
    }
}
