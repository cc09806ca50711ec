//! Changing a running gateway: on SIGHUP (or `keygate reload`) the config file is read again
//! and, if valid, its routes, upstreams, trusted proxies, TLS files and log level take effect
//! for the next request — requests already running finish on what they started with. An
//! invalid file is refused whole (the old config keeps serving). Settings that need a restart
//! (listeners, store, limits…) are reported and keep their running values. Upstream host names
//! are resolved again every `resolve_interval`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::config::{Config, Upstream};
use crate::metrics::Metrics;
use crate::proxy::tls::Certificate;
use crate::proxy::Routing;

/// What a reload can change, and where.
pub struct Reloader {
    /// The config file; `None` (the demo) has nothing to re-read.
    pub path: Option<PathBuf>,
    /// The config in force.
    pub current: Mutex<Config>,
    pub routing: Arc<ArcSwap<Routing>>,
    pub board: Arc<crate::proxy::health::HealthBoard>,
    pub certificate: Option<Arc<Certificate>>,
    /// `[admin.tls]` and `[metrics.tls]`, reloaded like the proxy's.
    pub admin_certificate: Option<Arc<Certificate>>,
    pub metrics_certificate: Option<Arc<Certificate>>,
    pub metrics: Metrics,
}

/// Settings a running gateway cannot change, by config key, as text to compare.
fn restart_only(c: &Config) -> Vec<(&'static str, String)> {
    let s = &c.server;
    vec![
        ("server.listen", s.listen.to_string()),
        ("server.threads", s.threads.to_string()),
        ("server.max_body_bytes", s.max_body_bytes.to_string()),
        ("server.shutdown_grace", format!("{:?}", s.shutdown_grace)),
        ("server.header_timeout", format!("{:?}", s.header_timeout)),
        ("server.body_timeout", format!("{:?}", s.body_timeout)),
        ("server.max_connections", format!("{:?}", s.max_connections)),
        ("server.h2c", s.h2c.to_string()),
        ("server.pid_file", format!("{:?}", s.pid_file)),
        ("server.upgrade_sock", format!("{:?}", s.upgrade_sock)),
        ("server.upgrade_wait", format!("{:?}", s.upgrade_wait)),
        (
            "server.upstream_pool_size",
            s.upstream_pool_size.to_string(),
        ),
        ("server.tls", s.tls.is_some().to_string()),
        (
            "server.tls.client_ca_file",
            format!("{:?}", s.tls.as_ref().map(|t| &t.client_ca_file)),
        ),
        ("admin", format!("{:?}", c.admin)),
        ("metrics.listen", c.metrics.listen.to_string()),
        ("store", format!("{:?}", c.store)),
        ("store.nonce_fallback", format!("{:?}", c.nonce_fallback)),
        (
            "store.nonce_durability",
            format!("{:?}", c.nonce_durability),
        ),
        ("cache", format!("{:?}", c.cache)),
        ("signing", format!("{:?}", c.signing)),
        ("secrets", format!("{:?}", c.secrets)),
        ("assertion", format!("{:?}", c.assertion)),
        ("log.format", c.log.json.to_string()),
        ("log.access", c.log.access.to_string()),
        ("tracing", format!("{:?}", c.tracing)),
        ("abuse", format!("{:?}", c.abuse)),
        ("limits", format!("{:?}", c.lease)),
    ]
}

/// What makes a file another gateway's config rather than an edit of this one's: its
/// listeners, store or master keys. A reload refuses such a file whole, rather than apply its
/// routes to a gateway still bound and connected as the old file said.
fn identity(c: &Config) -> Vec<(&'static str, String)> {
    vec![
        ("server.listen", c.server.listen.to_string()),
        ("admin.listen", c.admin.listen.to_string()),
        ("metrics.listen", c.metrics.listen.to_string()),
        // HTTP or HTTPS is how those listeners were built; their certificate files reload.
        ("admin.tls", c.admin.tls.is_some().to_string()),
        ("metrics.tls", c.metrics.tls.is_some().to_string()),
        ("store", format!("{:?}", c.store)),
        ("secrets", format!("{:?}", c.secrets)),
    ]
}

impl Reloader {
    /// Reads the file again and applies what can change. `Err`: nothing changed.
    pub fn reload(&self) -> Result<(), String> {
        let Some(path) = &self.path else {
            return Err("no config file to read (keygate demo)".into());
        };
        let fresh = Config::load(path).map_err(|e| e.to_string())?;
        {
            let current = self
                .current
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let differ: Vec<&str> = identity(&current)
                .into_iter()
                .zip(identity(&fresh))
                .filter(|(old, new)| old != new)
                .map(|(old, _)| old.0)
                .collect();
            if !differ.is_empty() {
                return Err(format!(
                    "{} differ from the running gateway's: a reload cannot change them, so the \
                     file is refused whole (restart with it, or put the running values back)",
                    differ.join(", ")
                ));
            }
        }
        for (cert, tls, at) in [
            (&self.certificate, &fresh.server.tls, "server.tls"),
            (&self.admin_certificate, &fresh.admin.tls, "admin.tls"),
            (&self.metrics_certificate, &fresh.metrics.tls, "metrics.tls"),
        ] {
            if let (Some(cert), Some(tls)) = (cert, tls) {
                cert.reload(tls).map_err(|e| format!("{at} {e}"))?;
            }
        }
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let tls_toggled = current.server.tls.is_some() != fresh.server.tls.is_some();
        let kept: Vec<&str> = restart_only(&current)
            .into_iter()
            .zip(restart_only(&fresh))
            .filter(|(old, new)| old != new)
            .map(|(old, _)| old.0)
            // Turning TLS on or off is the change; its CA file was not edited.
            .filter(|name| !(tls_toggled && *name == "server.tls.client_ca_file"))
            .collect();
        // The listener was built with or without TLS at start and stays so: said plainly,
        // since "config reloaded" alone reads as if the proxy now spoke what the file says.
        match (current.server.tls.is_some(), fresh.server.tls.is_some()) {
            (true, false) => tracing::warn!(
                "server.tls was removed, but the proxy listener keeps speaking TLS with its \
                 certificate until a restart"
            ),
            (false, true) => tracing::warn!(
                "server.tls was added, but the proxy listener keeps speaking plain HTTP until a \
                 restart"
            ),
            _ => {}
        }
        if !kept.is_empty() {
            tracing::warn!(
                settings = kept.join(", "),
                "config reloaded, but these settings need a restart: they keep their running values"
            );
        }
        match crate::logging::set_level(&fresh.log.level) {
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "log.level not changed"),
        }
        // What a reload changes; everything else keeps its running value.
        let mut applied = current.clone();
        applied.routes = fresh.routes;
        applied.upstreams = fresh.upstreams;
        applied.server.trusted_proxies = fresh.server.trusted_proxies;
        if let (Some(tls), Some(new)) = (applied.server.tls.as_mut(), fresh.server.tls) {
            tls.cert_file = new.cert_file;
            tls.key_file = new.key_file;
        }
        applied.log.level = fresh.log.level;
        self.routing
            .store(Arc::new(Routing::new(&applied, &self.metrics, &self.board)));
        *current = applied;
        Ok(())
    }

    /// Runs [`Self::reload`], logs and counts the result.
    pub fn reload_and_report(&self) {
        match self.reload() {
            Ok(()) => {
                self.metrics.config_reloads.with_label_values(&["ok"]).inc();
                tracing::info!("config reloaded");
            }
            Err(e) => {
                self.metrics
                    .config_reloads
                    .with_label_values(&["error"])
                    .inc();
                tracing::error!(error = %e, "config reload refused; the running config stays");
            }
        }
    }

    /// Resolves host-name endpoints again; swaps the routing when an address changed.
    pub async fn resolve_again(&self) {
        let (config, upstreams) = {
            let current = self
                .current
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            (current.clone(), self.routing.load().upstreams().to_vec())
        };
        let mut changed = false;
        let mut fresh: Vec<Upstream> = Vec::with_capacity(upstreams.len());
        for up in upstreams {
            if !up.has_host_names() {
                fresh.push(up);
                continue;
            }
            match resolve_all(&up.endpoint_names).await {
                Ok(addrs) if addrs != up.endpoints => {
                    tracing::info!(upstream = %up.name, endpoints = ?addrs, "upstream host names resolved to new addresses");
                    changed = true;
                    fresh.push(Upstream {
                        endpoints: addrs,
                        ..up
                    });
                }
                Ok(_) => fresh.push(up),
                Err(e) => {
                    tracing::warn!(upstream = %up.name, error = %e, "cannot resolve upstream host names; keeping the addresses in use");
                    fresh.push(up);
                }
            }
        }
        if changed {
            self.routing.store(Arc::new(Routing::with_upstreams(
                &config,
                fresh,
                &self.metrics,
                &self.board,
            )));
        }
    }

    /// How often to resolve again: the shortest `resolve_interval` of upstreams with host
    /// names; `None` when every endpoint is an address.
    fn resolve_every(&self) -> Option<Duration> {
        self.routing
            .load()
            .upstreams()
            .iter()
            .filter(|u| u.has_host_names())
            .map(|u| u.resolve_interval)
            .min()
            .map(|d| d.max(Duration::from_secs(1)))
    }
}

async fn resolve_all(names: &[String]) -> Result<Vec<std::net::SocketAddr>, String> {
    let mut out = Vec::new();
    for name in names {
        let addrs = tokio::net::lookup_host(name.as_str())
            .await
            .map_err(|e| format!("{name}: {e}"))?;
        out.extend(crate::config::same_family_as_first(addrs.collect())?);
    }
    out.dedup();
    if out.is_empty() {
        return Err("no address".into());
    }
    Ok(out)
}

/// SIGHUP reloads; a timer resolves host names again. Without this service a SIGHUP would end
/// the process (its default action).
pub struct ReloadService(pub Arc<Reloader>);

#[async_trait]
impl BackgroundService for ReloadService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP: the config will not reload");
                return;
            }
        };
        loop {
            let every = self.0.resolve_every().unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                _ = hup.recv() => {
                    let reloader = Arc::clone(&self.0);
                    // Reading files and resolving names blocks: off the async threads.
                    let _ = tokio::task::spawn_blocking(move || reloader.reload_and_report()).await;
                }
                () = tokio::time::sleep(every) => {
                    if self.0.resolve_every().is_some() {
                        self.0.resolve_again().await;
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}
