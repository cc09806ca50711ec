//! Upstream endpoint health and the choice of endpoint: active checks (pingora's
//! `HttpHealthCheck`, so TLS upstreams are checked as they are proxied), passive failure
//! counting from real requests, round-robin or least-connections among the healthy, and
//! `keygate_upstream_healthy{upstream,endpoint}`. Health outlives reloads: it is kept per
//! (upstream name, address) in a [`HealthBoard`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::lb::health_check::{HealthCheck as _, HttpHealthCheck};
use pingora::lb::Backend;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use prometheus::IntGauge;

use crate::config::{Balance, Upstream};
use crate::metrics::Metrics;

use super::Routing;

/// Without active checks, an endpoint taken out by failed requests is tried again after this.
pub const PASSIVE_RETRY_AFTER: Duration = Duration::from_secs(10);
/// Consecutive failed requests that take an endpoint out when no `health_check` says otherwise.
const PASSIVE_FAILURES: u32 = 3;

/// One endpoint's state.
pub struct EndpointHealth {
    pub addr: SocketAddr,
    healthy: AtomicBool,
    /// Consecutive failures (checks and requests) and successful checks.
    failures: AtomicU32,
    successes: AtomicU32,
    /// When it was taken out, in ms since `epoch`; for the passive retry.
    down_at_ms: AtomicU64,
    epoch: Instant,
    /// Requests being proxied to it now (least-connections).
    pub in_flight: AtomicUsize,
    gauge: IntGauge,
}

impl EndpointHealth {
    fn set_healthy(&self, healthy: bool, upstream: &str, why: &str) {
        if self.healthy.swap(healthy, Ordering::AcqRel) != healthy {
            self.gauge.set(i64::from(healthy));
            if healthy {
                tracing::info!(upstream, endpoint = %self.addr, why, "upstream endpoint back in");
            } else {
                let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
                self.down_at_ms.store(ms, Ordering::Release);
                tracing::warn!(upstream, endpoint = %self.addr, why, "upstream endpoint taken out");
            }
        }
    }

    /// Whether requests may go to it: healthy, or (passive only) out long enough to retry.
    fn available(&self, active_checks: bool) -> bool {
        if self.healthy.load(Ordering::Acquire) {
            return true;
        }
        if active_checks {
            return false;
        }
        let down = Duration::from_millis(self.down_at_ms.load(Ordering::Acquire));
        self.epoch.elapsed() >= down + PASSIVE_RETRY_AFTER
    }

    /// A request to it failed before an answer (connect, timeout, broken connection).
    pub fn request_failed(&self, upstream: &Upstream) {
        self.successes.store(0, Ordering::Release);
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        let limit = upstream
            .health_check
            .as_ref()
            .map_or(PASSIVE_FAILURES, |h| h.unhealthy_after);
        if n >= limit {
            self.set_healthy(false, &upstream.name, "failed requests");
        }
    }

    /// A request to it got an answer.
    pub fn request_answered(&self, upstream: &Upstream) {
        self.failures.store(0, Ordering::Release);
        if upstream.health_check.is_none() {
            // Passive only: an answer is the only news that it is back.
            self.set_healthy(true, &upstream.name, "answered a request");
        }
    }

    fn check_result(&self, upstream: &Upstream, ok: bool) {
        let Some(hc) = &upstream.health_check else {
            return;
        };
        if ok {
            self.failures.store(0, Ordering::Release);
            let n = self.successes.fetch_add(1, Ordering::AcqRel) + 1;
            if n >= hc.healthy_after {
                self.set_healthy(true, &upstream.name, "health checks pass");
            }
        } else {
            self.successes.store(0, Ordering::Release);
            let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
            if n >= hc.unhealthy_after {
                self.set_healthy(false, &upstream.name, "health checks fail");
            }
        }
    }
}

/// Every endpoint's health by (upstream, address), across reloads.
pub struct HealthBoard {
    map: Mutex<HashMap<(String, SocketAddr), Arc<EndpointHealth>>>,
    metrics: Metrics,
}

impl HealthBoard {
    pub fn new(metrics: Metrics) -> Self {
        Self {
            map: Mutex::default(),
            metrics,
        }
    }

    /// The endpoint's state, new endpoints starting healthy.
    pub fn endpoint(&self, upstream: &str, addr: SocketAddr) -> Arc<EndpointHealth> {
        let mut map = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(map.entry((upstream.to_owned(), addr)).or_insert_with(|| {
            let gauge = self
                .metrics
                .upstream_healthy
                .with_label_values(&[upstream, &addr.to_string()]);
            gauge.set(1);
            Arc::new(EndpointHealth {
                addr,
                healthy: AtomicBool::new(true),
                failures: AtomicU32::new(0),
                successes: AtomicU32::new(0),
                down_at_ms: AtomicU64::new(0),
                epoch: Instant::now(),
                in_flight: AtomicUsize::new(0),
                gauge,
            })
        }))
    }

    /// Forgets endpoints no upstream has any more (after a reload or a new DNS answer), and
    /// their gauges.
    pub fn retain(&self, upstreams: &[Upstream]) {
        let mut map = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.retain(|(name, addr), _| {
            let kept = upstreams
                .iter()
                .any(|u| &u.name == name && u.endpoints.contains(addr));
            if !kept {
                let _ = self
                    .metrics
                    .upstream_healthy
                    .remove_label_values(&[name, &addr.to_string()]);
            }
            kept
        });
    }
}

/// Picks the next endpoint of `upstream` (index `index` in `routing`) not in `tried`: among
/// the available ones if any, else among all (when every endpoint is out, trying beats
/// refusing). `None` when every endpoint was tried.
pub fn pick(routing: &Routing, index: usize, tried: &[SocketAddr]) -> Option<Arc<EndpointHealth>> {
    let up = routing.upstreams.get(index)?;
    let all = routing.health.get(index)?;
    let active = up.health_check.is_some();
    let fresh = |e: &&Arc<EndpointHealth>| !tried.contains(&e.addr);
    let mut candidates: Vec<&Arc<EndpointHealth>> = all
        .iter()
        .filter(fresh)
        .filter(|e| e.available(active))
        .collect();
    if candidates.is_empty() {
        candidates = all.iter().filter(fresh).collect();
    }
    if candidates.is_empty() {
        return None;
    }
    let turn = routing
        .next_endpoint
        .get(index)
        .map_or(0, |n| n.fetch_add(1, Ordering::Relaxed));
    let start = turn % candidates.len();
    let chosen = match up.balance {
        Balance::RoundRobin => candidates[start],
        Balance::LeastConnections => (0..candidates.len())
            .map(|i| candidates[(start + i) % candidates.len()])
            .min_by_key(|e| e.in_flight.load(Ordering::Relaxed))
            .unwrap_or(candidates[start]),
    };
    Some(Arc::clone(chosen))
}

/// Runs every upstream's active checks on its own interval, against the routing in force.
pub struct HealthChecker {
    pub routing: Arc<ArcSwap<Routing>>,
}

impl HealthChecker {
    /// One round of checks for `up`.
    async fn check_upstream(up: &Upstream, endpoints: &[Arc<EndpointHealth>]) {
        let Some(hc) = &up.health_check else {
            return;
        };
        let host = up.tls.as_ref().map_or_else(
            || up.endpoint_names.first().cloned().unwrap_or_default(),
            |t| t.sni.clone(),
        );
        let mut check = HttpHealthCheck::new(&host, up.tls.is_some());
        if let Some(tls) = &up.tls {
            check.peer_template.options.ca.clone_from(&tls.ca);
            check.peer_template.options.verify_cert = tls.verify;
            check.peer_template.options.verify_hostname = tls.verify;
            check.peer_template.client_cert_key.clone_from(&tls.client);
        }
        check.peer_template.options.connection_timeout = Some(hc.timeout);
        check.peer_template.options.read_timeout = Some(hc.timeout);
        check.peer_template.options.total_connection_timeout = Some(hc.timeout);
        if let Ok(req) = pingora::http::RequestHeader::build("GET", hc.path.as_bytes(), None)
            .and_then(|mut r| {
                r.insert_header("host", host.as_str())?;
                r.insert_header("user-agent", "keygate-health-check")?;
                Ok(r)
            })
        {
            check.req = req;
        }
        let checks = endpoints.iter().map(|e| {
            let check = &check;
            async move {
                let ok = match Backend::new(&e.addr.to_string()) {
                    Ok(backend) => matches!(
                        tokio::time::timeout(hc.timeout, check.check(&backend)).await,
                        Ok(Ok(()))
                    ),
                    Err(_) => false,
                };
                e.check_result(up, ok);
            }
        });
        futures_util::future::join_all(checks).await;
    }
}

#[async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut last: HashMap<String, Instant> = HashMap::new();
        loop {
            let routing = self.routing.load_full();
            for (i, up) in routing.upstreams.iter().enumerate() {
                let Some(hc) = &up.health_check else { continue };
                if last
                    .get(&up.name)
                    .is_some_and(|t| t.elapsed() < hc.interval)
                {
                    continue;
                }
                last.insert(up.name.clone(), Instant::now());
                if let Some(endpoints) = routing.health.get(i) {
                    Self::check_upstream(up, endpoints).await;
                }
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn routing(balance: &str) -> (Routing, Config) {
        let config = Config::from_toml(&format!(
            "[server]\nallow_no_routes = true\n[[upstreams]]\nname = \"u\"\nendpoints = [\"127.0.0.1:1\", \"127.0.0.1:2\", \"127.0.0.1:3\"]\nbalance = \"{balance}\"\n"
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let metrics = Metrics::new().unwrap_or_else(|e| panic!("{e}"));
        let board = HealthBoard::new(metrics.clone());
        (Routing::new(&config, &metrics, &board), config)
    }

    fn port(e: &Arc<EndpointHealth>) -> u16 {
        e.addr.port()
    }

    #[test]
    fn least_connections_picks_the_idlest_healthy_untried_endpoint() {
        let (r, config) = routing("least_connections");
        let up = &config.upstreams[0];
        let eps = &r.health[0];
        eps[0].in_flight.store(5, Ordering::Relaxed);
        eps[1].in_flight.store(1, Ordering::Relaxed);
        eps[2].in_flight.store(3, Ordering::Relaxed);
        for _ in 0..4 {
            assert_eq!(pick(&r, 0, &[]).map(|e| port(&e)), Some(2));
        }
        // Three failed requests take port 2 out (passive counting).
        for _ in 0..3 {
            eps[1].request_failed(up);
        }
        assert_eq!(pick(&r, 0, &[]).map(|e| port(&e)), Some(3));
        // Tried endpoints are skipped; when only unhealthy ones are left, they are tried.
        let tried = [eps[2].addr, eps[0].addr];
        assert_eq!(pick(&r, 0, &tried).map(|e| port(&e)), Some(2));
        let all: Vec<SocketAddr> = eps.iter().map(|e| e.addr).collect();
        assert!(pick(&r, 0, &all).is_none());
        // An answer brings it back when there are no active checks.
        eps[1].request_answered(up);
        assert_eq!(pick(&r, 0, &[]).map(|e| port(&e)), Some(2));
    }

    #[test]
    fn round_robin_takes_turns_among_the_healthy() {
        let (r, config) = routing("round_robin");
        let picks: Vec<u16> = (0..6)
            .filter_map(|_| pick(&r, 0, &[]))
            .map(|e| port(&e))
            .collect();
        assert_eq!(picks, [1, 2, 3, 1, 2, 3]);
        for _ in 0..3 {
            r.health[0][0].request_failed(&config.upstreams[0]);
        }
        let picks: Vec<u16> = (0..4)
            .filter_map(|_| pick(&r, 0, &[]))
            .map(|e| port(&e))
            .collect();
        assert!(picks.iter().all(|p| *p != 1), "{picks:?}");
    }
}
