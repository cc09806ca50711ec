//! What a config reload replaces whole: routes, upstreams (with their resolved endpoints) and
//! trusted proxies. Each request holds the snapshot it started with, so a reload never changes
//! a request midway, and requests already running finish on the old one.

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use crate::auth::client_ip::AllowList;
use crate::config::{Config, Route, Upstream};
use crate::limits::RateLimit;
use crate::metrics::{Metrics, RouteMetrics};

use super::health::{EndpointHealth, HealthBoard};
use super::Router;

/// One consistent view of the routing config.
pub struct Routing {
    pub(super) router: Router,
    pub(super) upstreams: Vec<Upstream>,
    /// Round-robin position per upstream.
    pub(super) next_endpoint: Vec<AtomicUsize>,
    /// Per route index, the series of its successful requests.
    pub(super) route_metrics: Vec<RouteMetrics>,
    pub(super) trusted_proxies: AllowList,
    /// Per upstream, per endpoint (as in `upstreams[i].endpoints`), its health.
    pub(super) health: Vec<Vec<Arc<EndpointHealth>>>,
    /// `[[owners]]` limits, by owner.
    pub(super) owner_limits: HashMap<String, Vec<RateLimit>>,
}

impl Routing {
    pub fn new(config: &Config, metrics: &Metrics, board: &HealthBoard) -> Self {
        Self::with_upstreams(config, config.upstreams.clone(), metrics, board)
    }

    /// The same routes with other upstream endpoints (host names resolved again).
    pub fn with_upstreams(
        config: &Config,
        upstreams: Vec<Upstream>,
        metrics: &Metrics,
        board: &HealthBoard,
    ) -> Self {
        board.retain(&upstreams);
        let health = upstreams
            .iter()
            .map(|u| {
                u.endpoints
                    .iter()
                    .map(|a| board.endpoint(&u.name, *a))
                    .collect()
            })
            .collect();
        Self {
            health,
            router: Router::new(config.routes.clone()),
            next_endpoint: upstreams.iter().map(|_| AtomicUsize::new(0)).collect(),
            upstreams,
            route_metrics: config
                .routes
                .iter()
                .map(|r| metrics.route(&r.name))
                .collect(),
            trusted_proxies: AllowList::new(&config.server.trusted_proxies),
            owner_limits: config.owner_limits.clone(),
        }
    }

    pub(super) fn upstream(&self, route: &Route) -> Option<&Upstream> {
        self.upstreams.get(route.upstream)
    }

    /// The upstreams in use (to compare resolved endpoints).
    pub fn upstreams(&self) -> &[Upstream] {
        &self.upstreams
    }
}
