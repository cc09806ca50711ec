//! Wires config, store, cache and metrics into one pingora `Server` with three listeners:
//! the proxy, the admin API and the metrics endpoint.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::ServiceWithDependents;

use crate::admin::{self, AdminState};
use crate::cache::KeyCache;
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, StoreConfig};
use crate::keys::{EmbeddedStore, KeyStore, MasterKey, RedisStore, SecretString, StoreError};
use crate::metrics::Metrics;
use crate::proxy::Gateway;
use crate::usage::{UsageFlusher, UsageTally};

pub const ENV_MASTER_KEY: &str = "KEYGATE_MASTER_KEY";
pub const ENV_ADMIN_TOKEN: &str = "KEYGATE_ADMIN_TOKEN";

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("no master key: set {ENV_MASTER_KEY} or secrets.master_key_file (make one with: head -c 32 /dev/urandom | base64 > data/master.key && chmod 600 data/master.key)")]
    NoMasterKey,
    #[error("secrets.master_key_file {0}: {1}")]
    MasterKeyFile(String, String),
    #[error("master key: {0}")]
    MasterKey(#[from] crate::keys::secret::SecretError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("store.tls_ca_file {0}: {1}")]
    TlsCaFile(String, std::io::Error),
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
}

/// Reads the master key from the environment, else from `secrets.master_key_file`, which must
/// not be readable by group or others.
pub fn load_master_key(
    config: &Config,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<MasterKey, StartError> {
    if let Some(text) = env(ENV_MASTER_KEY).filter(|t| !t.trim().is_empty()) {
        return Ok(MasterKey::from_base64(&text)?);
    }
    let Some(path) = &config.secrets.master_key_file else {
        return Err(StartError::NoMasterKey);
    };
    let shown = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            StartError::NoMasterKey
        } else {
            StartError::MasterKeyFile(shown.clone(), e.to_string())
        }
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(StartError::MasterKeyFile(
                shown,
                format!(
                    "mode {:o} lets other users read it; chmod 600 it",
                    mode & 0o777
                ),
            ));
        }
    }
    let text = SecretString::new(
        std::fs::read_to_string(path)
            .map_err(|e| StartError::MasterKeyFile(shown.clone(), e.to_string()))?,
    );
    Ok(MasterKey::from_base64(text.expose())?)
}

/// Opens the configured store.
pub fn open_store(config: &Config) -> Result<Arc<dyn KeyStore>, StartError> {
    match &config.store {
        StoreConfig::Embedded { path } => Ok(Arc::new(EmbeddedStore::open(path)?)),
        StoreConfig::Redis {
            target,
            tls_ca_file,
        } => {
            let ca = tls_ca_file
                .as_ref()
                .map(|f| {
                    std::fs::read(f).map_err(|e| StartError::TlsCaFile(f.display().to_string(), e))
                })
                .transpose()?;
            Ok(Arc::new(RedisStore::connect(target, ca.as_deref())?))
        }
    }
}

/// Everything a running gateway is made of, built before any listener starts.
pub struct App {
    pub config: Config,
    pub store: Arc<dyn KeyStore>,
    pub master: Arc<MasterKey>,
    pub admin_token_hashes: Vec<[u8; 32]>,
    pub clock: Arc<dyn Clock>,
}

impl App {
    /// Opens the store and loads secrets for `config`, reading the process environment.
    pub fn from_config(config: Config) -> Result<Self, StartError> {
        let env = |k: &str| std::env::var(k).ok();
        let master = load_master_key(&config, &env)?;
        let mut admin_token_hashes = config.admin.token_sha256.clone();
        if let Some(token) = env(ENV_ADMIN_TOKEN).filter(|t| !t.is_empty()) {
            admin_token_hashes.push(SecretString::new(token).sha256());
        }
        if admin_token_hashes.is_empty() {
            tracing::warn!("no admin token configured: every /v1 admin call will be refused");
        }
        let store = open_store(&config)?;
        Ok(Self {
            config,
            store,
            master: Arc::new(master),
            admin_token_hashes,
            clock: Arc::new(SystemClock),
        })
    }

    /// Runs until SIGTERM (graceful, `server.shutdown_grace`) or SIGINT (at once), or until
    /// `shutdown` fires. `extra` services run beside the gateway (the demo's echo upstream).
    pub fn run(
        self,
        extra: Vec<Box<dyn ServiceWithDependents>>,
        shutdown: Option<Box<dyn ShutdownSignalWatch>>,
    ) -> Result<(), StartError> {
        let cfg = &self.config;
        let metrics = Metrics::new()?;
        let cache = Arc::new(KeyCache::new(
            Arc::clone(&self.store),
            Arc::clone(&self.master),
            metrics.clone(),
            &cfg.cache,
        ));
        // Other gateways' changes to keys evict them here too (Redis; a no-op when embedded).
        self.store
            .watch(Arc::clone(&cache) as Arc<dyn crate::keys::ChangeSink>);

        // Bind what we can now, so a taken port fails at once instead of pingora's 30 retries.
        let admin_listener = bind(cfg.admin.listen)?;
        let metrics_listener = bind(cfg.metrics.listen)?;
        drop(bind(cfg.server.listen)?);

        let mut conf = ServerConf {
            threads: cfg.server.threads,
            grace_period_seconds: Some(cfg.server.shutdown_grace.as_secs()),
            graceful_shutdown_timeout_seconds: Some(1),
            ..ServerConf::default()
        };
        conf.daemon = false;
        let mut server = Server::new_with_opt_and_conf(None, conf);
        server.bootstrap();

        let admin_state = Arc::new(AdminState {
            store: Arc::clone(&self.store),
            cache: Arc::clone(&cache),
            master: Arc::clone(&self.master),
            metrics: metrics.clone(),
            clock: Arc::clone(&self.clock),
            token_hashes: self.admin_token_hashes.clone(),
            proxy_addr: cfg.server.listen,
        });
        let usage = Arc::new(UsageTally::default());
        let gateway = Gateway::new(
            cfg,
            cache,
            metrics.clone(),
            Arc::clone(&self.clock),
            Some(admin::self_service_router(Arc::clone(&admin_state))),
            Arc::clone(&usage),
        );
        server.add_service(background_service(
            "keygate usage",
            UsageFlusher {
                tally: Arc::clone(&usage),
                store: Arc::clone(&self.store),
                metrics: metrics.clone(),
            },
        ));
        let mut proxy = pingora::proxy::http_proxy_service_with_name(
            &server.configuration,
            gateway,
            "keygate proxy",
        );
        proxy.add_tcp(&cfg.server.listen.to_string());
        server.add_service(proxy);

        server.add_service(background_service(
            "keygate admin",
            AxumService::new(admin_listener, admin::router(admin_state)),
        ));
        let metrics_router = axum::Router::new()
            .route(
                "/metrics",
                axum::routing::get(move || {
                    let m = metrics.clone();
                    async move {
                        (
                            [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                            m.render(),
                        )
                    }
                }),
            )
            .layer(axum::middleware::from_fn(admin::with_request_id));
        server.add_service(background_service(
            "keygate metrics",
            AxumService::new(metrics_listener, metrics_router),
        ));
        for svc in extra {
            server.add_boxed_service(svc);
        }

        tracing::info!(
            proxy = %cfg.server.listen,
            admin = %cfg.admin.listen,
            metrics = %cfg.metrics.listen,
            "keygate started"
        );
        let run_args = match shutdown {
            Some(shutdown_signal) => RunArgs { shutdown_signal },
            None => RunArgs::default(),
        };
        server.run(run_args);

        // Pingora's runtimes are gone; a small one writes the last usage counts and makes the
        // pending nonces durable.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(StartError::Runtime)?;
        if let Err(e) = rt.block_on(usage.flush(self.store.as_ref())) {
            tracing::error!(error = %e, "final usage flush failed");
        }
        rt.block_on(self.store.flush())?;
        tracing::info!("keygate stopped");
        Ok(())
    }
}

fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    let l = TcpListener::bind(addr).map_err(|e| StartError::Listen(addr, e))?;
    l.set_nonblocking(true)
        .map_err(|e| StartError::Listen(addr, e))?;
    Ok(l)
}

/// An axum app served inside a pingora background service, stopping on pingora's shutdown.
pub struct AxumService {
    /// Bound before the server starts; taken once when the service starts.
    listener: Mutex<Option<TcpListener>>,
    router: axum::Router,
}

impl AxumService {
    pub fn new(listener: TcpListener, router: axum::Router) -> Self {
        Self {
            listener: Mutex::new(Some(listener)),
            router,
        }
    }
}

#[async_trait]
impl BackgroundService for AxumService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(std_listener) = self.listener.lock().ok().and_then(|mut l| l.take()) else {
            return;
        };
        let listener = match tokio::net::TcpListener::from_std(std_listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot start listener");
                return;
            }
        };
        let served = axum::serve(listener, self.router.clone())
            .with_graceful_shutdown(async move {
                let _ = shutdown.changed().await;
            })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "listener stopped");
        }
    }
}

/// Checks a config file; prints every problem with its key path (used by `check-config`).
pub fn check_config(path: &Path) -> Result<Config, crate::config::ConfigErrors> {
    Config::load(path)
}
