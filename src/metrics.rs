//! Prometheus metrics (SPEC §7): one struct built at startup, labels bounded by design —
//! route names from config, error codes, fixed enums; never key ids, owners or raw paths.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric keygate exports, registered in its own registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub requests_total: IntCounterVec,
    pub auth_duration: HistogramVec,
    pub upstream_duration: HistogramVec,
    pub cache_requests: IntCounterVec,
    pub store_errors: IntCounterVec,
    pub keys_changed: IntCounterVec,
    /// Client connections the proxy closed itself, by reason ([`ConnClosed`]).
    pub connections_closed: IntCounterVec,
    /// Client connections open on the proxy listener.
    pub open_connections: IntGauge,
    /// Config reloads by result (`ok`, `error`).
    pub config_reloads: IntCounterVec,
    /// 1 while an upstream endpoint takes requests, 0 while it is out.
    pub upstream_healthy: IntGaugeVec,
    /// Requests refused by a rate limit, by route and limit name.
    pub rate_limited: IntCounterVec,
    /// Requests passed without a limit check because the limiter's state was unreachable
    /// (`limits_on_store_error = "open"`), by route.
    pub rate_limit_unchecked: IntCounterVec,
    /// Requests refused with `quota_exhausted`, by route.
    pub quota_exhausted: IntCounterVec,
    /// Requests refused with `too_many_failures` (no address in any label).
    pub abuse_blocked: IntCounter,
    /// 1 while the gateway is ready (the same checks as `/readyz`), 0 while not.
    pub ready: IntGauge,
    /// The `notAfter` of each TLS listener's certificate, Unix seconds, by `listener`.
    pub tls_certificate_expiry: IntGaugeVec,
    /// From a key change written to Redis to this gateway evicting it (the change feed).
    pub change_feed_lag: Histogram,
    /// 1 while the store's circuit breaker is open (Redis unreachable), else 0.
    pub store_circuit_open: IntGauge,
    /// Store calls answered at once, unsent, because the circuit was open.
    pub store_fast_failures: IntCounter,
    /// `cache_requests` by [`CacheResult`], looked up once: a labelled lookup hashes the
    /// labels and takes a lock on every request.
    cache_counters: [IntCounter; 3],
}

/// One route's hot-path series, looked up once at startup.
#[derive(Clone)]
pub struct RouteMetrics {
    pub auth_duration: Histogram,
    pub upstream_2xx: Histogram,
    pub ok: IntCounter,
}

/// Cache lookup outcomes (`keygate_key_cache_requests_total{result}`).
#[derive(Clone, Copy, Debug)]
pub enum CacheResult {
    Hit,
    Miss,
    NegativeHit,
}

impl CacheResult {
    fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::NegativeHit => "negative_hit",
        }
    }
}

/// Admin changes (`keygate_keys_changed_total{change}`).
#[derive(Clone, Copy, Debug)]
pub enum KeyChange {
    Created,
    Rotated,
    Revoked,
    Deleted,
    Updated,
}

/// Every `op` of `keygate_store_errors_total`, exported at 0 from the start.
pub const STORE_OPS: [&str; 9] = [
    "use_nonce",
    "add_usage",
    "open_secret",
    "signing_keys",
    "rate_limit",
    "abuse",
    "credits",
    "get_by_public_key",
    "get_by_secret_hash",
];

impl KeyChange {
    const ALL: [KeyChange; 5] = [
        Self::Created,
        Self::Rotated,
        Self::Revoked,
        Self::Deleted,
        Self::Updated,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Rotated => "rotated",
            Self::Revoked => "revoked",
            Self::Deleted => "deleted",
            Self::Updated => "updated",
        }
    }
}

/// Why the proxy closed a client connection itself
/// (`keygate_connections_closed_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnClosed {
    /// The request head did not arrive within `server.header_timeout`.
    HeaderTimeout,
    /// The request body did not arrive within `server.body_timeout`.
    BodyTimeout,
    /// `server.max_connections` were already open.
    MaxConnections,
    /// The TLS handshake did not finish within `server.header_timeout`.
    HandshakeTimeout,
    /// The TLS handshake failed: cut short, not TLS, or refused by rustls.
    HandshakeFailed,
}

impl ConnClosed {
    pub const ALL: [ConnClosed; 5] = [
        Self::HeaderTimeout,
        Self::BodyTimeout,
        Self::MaxConnections,
        Self::HandshakeTimeout,
        Self::HandshakeFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::HeaderTimeout => "header_timeout",
            Self::BodyTimeout => "body_timeout",
            Self::MaxConnections => "max_connections",
            Self::HandshakeTimeout => "tls_handshake_timeout",
            Self::HandshakeFailed => "tls_handshake_failed",
        }
    }
}

/// Auth checks are microseconds; upstream calls are milliseconds to seconds.
const AUTH_BUCKETS: &[f64] = &[
    0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005,
    0.01, 0.025, 0.05,
];
const UPSTREAM_BUCKETS: &[f64] = &[
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests_total = IntCounterVec::new(
            Opts::new(
                "keygate_requests_total",
                "Requests by route and outcome (ok or an error code)",
            ),
            &["route", "outcome"],
        )?;
        let auth_duration = HistogramVec::new(
            HistogramOpts::new(
                "keygate_auth_duration_seconds",
                "Time spent authenticating a request",
            )
            .buckets(AUTH_BUCKETS.to_vec()),
            &["route"],
        )?;
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new(
                "keygate_upstream_duration_seconds",
                "Time from forwarding to the upstream's response",
            )
            .buckets(UPSTREAM_BUCKETS.to_vec()),
            &["route", "status_class"],
        )?;
        let cache_requests = IntCounterVec::new(
            Opts::new(
                "keygate_key_cache_requests_total",
                "Key cache lookups by result",
            ),
            &["result"],
        )?;
        let store_errors = IntCounterVec::new(
            Opts::new(
                "keygate_store_errors_total",
                "Key store errors by operation",
            ),
            &["op"],
        )?;
        let keys_changed = IntCounterVec::new(
            Opts::new(
                "keygate_keys_changed_total",
                "Key changes made through the admin API",
            ),
            &["change"],
        )?;
        let connections_closed = IntCounterVec::new(
            Opts::new(
                "keygate_connections_closed_total",
                "Client connections the proxy closed itself, by reason",
            ),
            &["reason"],
        )?;
        let open_connections = IntGauge::new(
            "keygate_open_connections",
            "Client connections open on the proxy listener",
        )?;
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "keygate_config_reloads_total",
                "Config reloads (SIGHUP, keygate reload), by result",
            ),
            &["result"],
        )?;
        registry.register(Box::new(config_reloads.clone()))?;
        let upstream_healthy = IntGaugeVec::new(
            Opts::new(
                "keygate_upstream_healthy",
                "1 while an upstream endpoint takes requests, 0 while health checks or failed \
                 requests keep it out",
            ),
            &["upstream", "endpoint"],
        )?;
        registry.register(Box::new(upstream_healthy.clone()))?;
        let rate_limited = IntCounterVec::new(
            Opts::new(
                "keygate_rate_limited_total",
                "Requests refused with rate_limited, by route and limit name",
            ),
            &["route", "limit"],
        )?;
        registry.register(Box::new(rate_limited.clone()))?;
        let rate_limit_unchecked = IntCounterVec::new(
            Opts::new(
                "keygate_rate_limit_unchecked_total",
                "Requests passed without a rate-limit check while the limiter's state was \
                 unreachable (limits_on_store_error = \"open\"), by route",
            ),
            &["route"],
        )?;
        registry.register(Box::new(rate_limit_unchecked.clone()))?;
        let quota_exhausted = IntCounterVec::new(
            Opts::new(
                "keygate_quota_exhausted_total",
                "Requests refused with quota_exhausted (a metered key without enough credits), by route",
            ),
            &["route"],
        )?;
        registry.register(Box::new(quota_exhausted.clone()))?;
        let abuse_blocked = IntCounter::new(
            "keygate_abuse_blocked_total",
            "Requests refused with too_many_failures: their address failed authentication \
             too often ([abuse])",
        )?;
        registry.register(Box::new(abuse_blocked.clone()))?;
        let ready = IntGauge::new(
            "keygate_ready",
            "1 while the gateway is ready (store reachable, proxy listening, assertion keys \
             loaded where needed: the checks of /readyz), else 0",
        )?;
        registry.register(Box::new(ready.clone()))?;
        let tls_certificate_expiry = IntGaugeVec::new(
            Opts::new(
                "keygate_tls_certificate_expiry_timestamp_seconds",
                "notAfter of the certificate each TLS listener serves, Unix seconds",
            ),
            &["listener"],
        )?;
        registry.register(Box::new(tls_certificate_expiry.clone()))?;
        let change_feed_lag = Histogram::with_opts(
            HistogramOpts::new(
                "keygate_change_feed_lag_seconds",
                "From a key change written to Redis to this gateway evicting the key from its \
                 cache (Redis clock to gateway clock)",
            )
            .buckets(UPSTREAM_BUCKETS.to_vec()),
        )?;
        registry.register(Box::new(change_feed_lag.clone()))?;
        let store_circuit_open = IntGauge::new(
            "keygate_store_circuit_open",
            "1 while the store's circuit breaker is open (Redis unreachable: store calls fail \
             at once until a probe gets an answer), else 0",
        )?;
        registry.register(Box::new(store_circuit_open.clone()))?;
        let store_fast_failures = IntCounter::new(
            "keygate_store_fast_failures_total",
            "Store calls answered store_unavailable at once, without a network round trip, \
             because the circuit breaker was open",
        )?;
        registry.register(Box::new(store_fast_failures.clone()))?;
        for result in ["ok", "error"] {
            config_reloads.with_label_values(&[result]);
        }
        registry.register(Box::new(connections_closed.clone()))?;
        registry.register(Box::new(open_connections.clone()))?;
        for reason in ConnClosed::ALL {
            connections_closed.with_label_values(&[reason.as_str()]);
        }
        registry.register(Box::new(requests_total.clone()))?;
        registry.register(Box::new(auth_duration.clone()))?;
        registry.register(Box::new(upstream_duration.clone()))?;
        registry.register(Box::new(cache_requests.clone()))?;
        registry.register(Box::new(store_errors.clone()))?;
        registry.register(Box::new(keys_changed.clone()))?;
        for op in STORE_OPS {
            store_errors.with_label_values(&[op]);
        }
        for change in KeyChange::ALL {
            keys_changed.with_label_values(&[change.as_str()]);
        }
        let cache_counters = [
            CacheResult::Hit,
            CacheResult::Miss,
            CacheResult::NegativeHit,
        ]
        .map(|r| cache_requests.with_label_values(&[r.as_str()]));
        Ok(Self {
            registry,
            requests_total,
            auth_duration,
            upstream_duration,
            cache_requests,
            store_errors,
            keys_changed,
            connections_closed,
            open_connections,
            config_reloads,
            upstream_healthy,
            rate_limited,
            rate_limit_unchecked,
            abuse_blocked,
            quota_exhausted,
            ready,
            tls_certificate_expiry,
            change_feed_lag,
            store_circuit_open,
            store_fast_failures,
            cache_counters,
        })
    }

    pub fn cache(&self, result: CacheResult) {
        self.cache_counters[result as usize].inc();
    }

    /// The series a route's successful requests touch. Its refusal counters start at 0 too,
    /// so a rate over them exists before the first refusal (alerts, dashboards).
    pub fn route(&self, route: &str) -> RouteMetrics {
        self.quota_exhausted.with_label_values(&[route]);
        self.rate_limit_unchecked.with_label_values(&[route]);
        RouteMetrics {
            auth_duration: self.auth_duration.with_label_values(&[route]),
            upstream_2xx: self.upstream_duration.with_label_values(&[route, "2xx"]),
            ok: self.requests_total.with_label_values(&[route, "ok"]),
        }
    }

    pub fn key_changed(&self, change: KeyChange) {
        self.keys_changed
            .with_label_values(&[change.as_str()])
            .inc();
    }

    pub fn connection_closed(&self, why: ConnClosed) {
        self.connections_closed
            .with_label_values(&[why.as_str()])
            .inc();
    }

    pub fn store_error(&self, op: &'static str) {
        debug_assert!(STORE_OPS.contains(&op), "{op} missing from STORE_OPS");
        self.store_errors.with_label_values(&[op]).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// `2xx`, `4xx`, … for `keygate_upstream_duration_seconds{status_class}`.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::core::Collector;

    /// docs/metrics.md names every metric: one added without its doc line fails here.
    #[test]
    fn every_metric_is_documented() {
        let doc = include_str!("../docs/metrics.md");
        let m = Metrics::new().unwrap_or_else(|e| panic!("{e}"));
        let collectors: [&dyn Collector; 12] = [
            &m.requests_total,
            &m.auth_duration,
            &m.upstream_duration,
            &m.cache_requests,
            &m.store_errors,
            &m.keys_changed,
            &m.connections_closed,
            &m.open_connections,
            &m.config_reloads,
            &m.upstream_healthy,
            &m.store_circuit_open,
            &m.store_fast_failures,
        ];
        let names: Vec<String> = collectors
            .iter()
            .flat_map(|c| c.desc().into_iter().map(|d| d.fq_name.clone()))
            .collect();
        assert_eq!(names.len(), 12);
        for name in names {
            assert!(
                doc.contains(&format!("| `{name}` |")),
                "docs/metrics.md lacks {name}"
            );
        }
    }
}
