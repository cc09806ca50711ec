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
use crate::assertion::{Asserter, RefreshService, SigningKeys};
use crate::cache::KeyCache;
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, StoreConfig};
use crate::keys::{
    EmbeddedStore, KeyStore, MasterKey, RedisStore, SecretString, SigningKeyStore, StoreError,
};
use crate::lifecycle::Lifecycle;
use crate::limits::abuse::{AbuseStore, BlockFeed, Blocks};
use crate::limits::credits::CreditStore;
use crate::limits::store::RateLimitStore;
use crate::metrics::Metrics;
use crate::proxy::guard::{Guarded, Limits};
use crate::proxy::Gateway;
use crate::usage::{UsageFlusher, UsageTally};

pub const ENV_MASTER_KEY: &str = "KEYGATE_MASTER_KEY";
pub const ENV_ADMIN_TOKEN: &str = "KEYGATE_ADMIN_TOKEN";
/// Set by systemd for a unit with `LoadCredential=`: keygate reads `master-key` and
/// `admin-token` there.
pub const ENV_CREDENTIALS_DIRECTORY: &str = "CREDENTIALS_DIRECTORY";

/// A systemd credential named `name`, if the unit was given one.
pub(crate) fn credential(
    env: &dyn Fn(&str) -> Option<String>,
    name: &str,
) -> Option<std::path::PathBuf> {
    let dir = env(ENV_CREDENTIALS_DIRECTORY).filter(|d| !d.is_empty())?;
    let path = std::path::Path::new(&dir).join(name);
    path.exists().then_some(path)
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("no master key: set {ENV_MASTER_KEY} or secrets.master_key_file (make one with: head -c 32 /dev/urandom | base64 > data/master.key && chmod 600 data/master.key)")]
    NoMasterKey,
    #[error("secrets.master_key_file {0}: {1}")]
    MasterKeyFile(String, String),
    #[error("secrets.previous_master_key_file {0}: {1}")]
    PreviousMasterKeyFile(String, String),
    #[error("admin.token_file {0}: {1}")]
    AdminTokenFile(String, String),
    #[error("master key: {0}")]
    MasterKey(#[from] crate::keys::secret::SecretError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("store.tls_ca_file {0}: {1}")]
    TlsCaFile(String, std::io::Error),
    #[error("server.tls {0}")]
    Tls(#[from] crate::proxy::tls::TlsError),
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
    #[error("server.pid_file {0}: {1}")]
    PidFile(String, std::io::Error),
    #[error("server.upgrade_sock {0}: {1}")]
    UpgradeSock(String, std::io::Error),
    /// `serve --upgrade` received no listening socket within `server.upgrade_wait`.
    #[error(
        "serve --upgrade: no running keygate handed its listening socket over {0} within \
         {1} (server.upgrade_wait): start this process first, then send the running one SIGQUIT; \
         nothing was taken over, the running keygate (if any) still serves"
    )]
    UpgradeTimedOut(String, String),
    #[error("serve --upgrade: receiving the listening socket over {0} failed: {1}")]
    UpgradeFailed(String, std::io::Error),
    #[error("tracing.otlp_endpoint: {0}")]
    Otlp(#[from] crate::otlp::OtlpError),
}

/// Readies `server.upgrade_sock` for pingora to bind during an upgrade: its directory is
/// created with mode 0700 when missing (pingora's bind fails without it), and the socket is
/// set to 0600 as soon as it appears — pingora makes it 0666 for a server that changes user,
/// which keygate never does. The directory already keeps other users from reaching it; the
/// mode is the second lock. Returns the flag that ends the watch once bootstrap is over.
fn private_upgrade_sock(
    path: &std::path::Path,
    wait: std::time::Duration,
) -> Result<Arc<std::sync::atomic::AtomicBool>, StartError> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
    let fail = |e| StartError::UpgradeSock(path.display().to_string(), e);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(fail)?;
        }
    }
    // A socket left by an earlier upgrade must not be taken for the new one.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e)),
    }
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watch = Arc::clone(&done);
    let path = path.to_path_buf();
    std::thread::Builder::new()
        .name("keygate-upgrade-sock".into())
        .spawn(move || {
            // Watched until bootstrap is over: pingora binds, then chmods, then waits for the
            // old process (server.upgrade_wait), so a mode set between its bind and chmod is
            // undone.
            let until = std::time::Instant::now() + wait + std::time::Duration::from_secs(5);
            while !watch.load(std::sync::atomic::Ordering::Relaxed)
                && std::time::Instant::now() < until
            {
                let open = std::fs::symlink_metadata(&path).is_ok_and(|m| {
                    m.file_type().is_socket() && m.permissions().mode() & 0o777 != 0o600
                });
                if open {
                    if let Err(e) =
                        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    {
                        tracing::warn!(path = %path.display(), error = %e, "cannot make the upgrade socket private");
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        })
        .map_err(fail)?;
    Ok(done)
}

/// Reads the master key from `KEYGATE_MASTER_KEY`, else the systemd credential `master-key`,
/// else `secrets.master_key_file`, and the key it replaces (during a rotation) from the
/// credential `previous-master-key`, else `secrets.previous_master_key_file`; a file must not
/// be readable by group or others.
pub fn load_master_key(
    config: &Config,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<MasterKey, StartError> {
    let master = current_master_key(config, env)?;
    Ok(match previous_master_key(config, env)? {
        Some(previous) => master.with_previous(previous),
        None => master,
    })
}

/// The previous master key (systemd credential or `secrets.previous_master_key_file`), if one
/// is configured.
fn previous_master_key(
    config: &Config,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<MasterKey>, StartError> {
    let previous = credential(env, "previous-master-key");
    let Some(path) = previous
        .as_ref()
        .or(config.secrets.previous_master_key_file.as_ref())
    else {
        return Ok(None);
    };
    // A missing previous key is an error, not a quiet start: the secrets sealed under it
    // would not open, and every key of theirs would be refused.
    let shown = path.display().to_string();
    let text = crate::keys::secret::read_private_file(path)
        .map_err(|e| StartError::PreviousMasterKeyFile(shown.clone(), e))?
        .ok_or_else(|| StartError::PreviousMasterKeyFile(shown, "no such file".into()))?;
    Ok(Some(MasterKey::from_base64(text.expose())?))
}

fn current_master_key(
    config: &Config,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<MasterKey, StartError> {
    if let Some(text) = env(ENV_MASTER_KEY).filter(|t| !t.trim().is_empty()) {
        return Ok(MasterKey::from_base64(&text)?);
    }
    let from_systemd = credential(env, "master-key");
    let Some(path) = from_systemd
        .as_ref()
        .or(config.secrets.master_key_file.as_ref())
    else {
        return Err(StartError::NoMasterKey);
    };
    let shown = path.display().to_string();
    let text = crate::keys::secret::read_private_file(path)
        .map_err(|e| StartError::MasterKeyFile(shown.clone(), e))?
        .ok_or_else(|| StartError::MasterKeyFile(shown, "no such file".into()))?;
    Ok(MasterKey::from_base64(text.expose())?)
}

/// What `serve` would refuse about the secret files this config names, given `env`: the
/// very readers `serve`'s loaders ([`load_master_key`], [`load_admin_tokens`]) run, so
/// `check-config` and `serve` cannot disagree — each file on its own, so one run names every
/// bad one where `serve` stops at the first. No master key source at all is left out: the key
/// may come from the environment or a systemd credential only where the gateway runs.
pub fn check_secret_files(config: &Config, env: &dyn Fn(&str) -> Option<String>) -> Vec<String> {
    let mut problems = Vec::new();
    match current_master_key(config, env) {
        Ok(_) | Err(StartError::NoMasterKey) => {}
        Err(e) => problems.push(e.to_string()),
    }
    if let Err(e) = previous_master_key(config, env) {
        problems.push(e.to_string());
    }
    for path in admin_token_files(config, env) {
        if let Err(e) = admin_token_file(&path) {
            problems.push(e.to_string());
        }
    }
    if let StoreConfig::Redis {
        target: crate::keys::RedisTarget::Sentinel(s),
        ..
    } = &config.store
    {
        // The very reader `serve` runs when it connects (`RedisStore::connect`).
        problems.extend(s.check_password_files());
    }
    problems
}

/// The SHA-256 of every accepted admin token: `admin.token_sha256`, the token in
/// `admin.token_file` (mode 0600), the systemd credential `admin-token` and
/// `KEYGATE_ADMIN_TOKEN`.
pub fn load_admin_tokens(
    config: &Config,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<[u8; 32]>, StartError> {
    let mut hashes = config.admin.token_sha256.clone();
    for path in admin_token_files(config, env) {
        hashes.push(admin_token_file(&path)?);
    }
    if let Some(token) = env(ENV_ADMIN_TOKEN).filter(|t| !t.is_empty()) {
        hashes.push(SecretString::new(token).sha256());
    }
    Ok(hashes)
}

/// `admin.token_file` and the systemd credential `admin-token`, those that are set.
fn admin_token_files(
    config: &Config,
    env: &dyn Fn(&str) -> Option<String>,
) -> Vec<std::path::PathBuf> {
    let from_systemd = credential(env, "admin-token");
    config
        .admin
        .token_file
        .iter()
        .cloned()
        .chain(from_systemd)
        .collect()
}

/// The SHA-256 of the token in `path` (mode 0600, not empty).
fn admin_token_file(path: &std::path::Path) -> Result<[u8; 32], StartError> {
    let shown = path.display().to_string();
    let token = crate::keys::secret::read_private_file(path)
        .map_err(|e| StartError::AdminTokenFile(shown.clone(), e))?
        .filter(|t| !t.expose().is_empty())
        .ok_or_else(|| StartError::AdminTokenFile(shown, "missing or empty".into()))?;
    Ok(token.sha256())
}

/// Secrets in the environment stay readable in `/proc/<pid>/environ` for the life of the
/// process; files (or systemd credentials) do not. Said once at start, outside the demo.
fn warn_about_env_secrets(env: &dyn Fn(&str) -> Option<String>) {
    for (var, instead) in [
        (ENV_MASTER_KEY, "secrets.master_key_file"),
        (ENV_ADMIN_TOKEN, "admin.token_file or admin.token_sha256"),
    ] {
        if env(var).is_some_and(|v| !v.is_empty()) {
            tracing::warn!(
                "{var} is set: it stays readable in /proc/<pid>/environ for the life of the \
                 process; prefer {instead}"
            );
        }
    }
}

/// Raises the soft descriptor limit to the hard one where allowed, and derives the default
/// `server.max_connections` from it and from the cgroup memory limit ([`crate::sizing`]): each
/// proxied request can hold an upstream connection too, and each client connection costs
/// ~103 KiB, so a memory-limited container would be OOM-killed long before its descriptors ran
/// out.
fn connection_limit(configured: Option<usize>, cache_capacity: u64) -> usize {
    let nofile = rlimit::increase_nofile_limit(u64::MAX)
        .inspect_err(|e| tracing::warn!(error = %e, "cannot raise the descriptor limit"))
        .unwrap_or(1024);
    let memory = crate::sizing::read_memory_limit();
    let (derived, source) = crate::sizing::default_max_connections(nofile, memory, cache_capacity);
    match configured {
        Some(n) => {
            if n > derived {
                tracing::warn!(
                    max_connections = n,
                    descriptors = nofile,
                    memory_limit = memory,
                    allowed = derived,
                    bound = source.as_str(),
                    "server.max_connections is above what the {} allows: a flood could leave \
                     no descriptors for upstreams and the admin listener, or exhaust memory",
                    source.as_str()
                );
            }
            n
        }
        None => {
            tracing::info!(
                max_connections = derived,
                source = source.as_str(),
                descriptors = nofile,
                memory_limit = memory,
                "server.max_connections not set: derived from the {}",
                source.as_str()
            );
            derived
        }
    }
}

/// The configured store, seen through each of its small traits.
pub struct Stores {
    pub keys: Arc<dyn KeyStore>,
    pub signing_keys: Arc<dyn SigningKeyStore>,
    pub rate_limits: Arc<dyn RateLimitStore>,
    pub abuse: Arc<dyn AbuseStore>,
    pub credits: Arc<dyn CreditStore>,
}

impl Stores {
    /// One backend serving every concern.
    pub fn of<S>(store: S) -> Self
    where
        S: KeyStore + SigningKeyStore + RateLimitStore + AbuseStore + CreditStore,
    {
        let store = Arc::new(store);
        Self {
            keys: Arc::clone(&store) as Arc<dyn KeyStore>,
            signing_keys: Arc::clone(&store) as Arc<dyn SigningKeyStore>,
            rate_limits: Arc::clone(&store) as Arc<dyn RateLimitStore>,
            abuse: Arc::clone(&store) as Arc<dyn AbuseStore>,
            credits: store,
        }
    }
}

/// Opens the configured store.
pub fn open_store(config: &Config) -> Result<Stores, StartError> {
    match &config.store {
        StoreConfig::Embedded { path } => Ok(Stores::of(EmbeddedStore::open(path)?)),
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
            Ok(Stores::of(
                RedisStore::connect(target, ca.as_deref())?.with_nonce_durability(
                    config.nonce_durability,
                    target,
                    ca.as_deref(),
                )?,
            ))
        }
    }
}

/// Everything a running gateway is made of, built before any listener starts.
pub struct App {
    pub config: Config,
    /// The file `config` came from: SIGHUP reads it again. `None`: nothing to reload.
    pub config_path: Option<std::path::PathBuf>,
    /// Take the listening proxy socket over from a running keygate (`serve --upgrade`).
    pub upgrade: bool,
    pub store: Arc<dyn KeyStore>,
    pub signing_keys: Arc<dyn SigningKeyStore>,
    pub rate_limits: Arc<dyn RateLimitStore>,
    pub abuse: Arc<dyn AbuseStore>,
    pub credits: Arc<dyn CreditStore>,
    pub master: Arc<MasterKey>,
    pub admin_token_hashes: Vec<[u8; 32]>,
    pub clock: Arc<dyn Clock>,
}

impl App {
    /// Opens the store and loads secrets for `config`, reading the process environment.
    pub fn from_config(config: Config) -> Result<Self, StartError> {
        let env = |k: &str| std::env::var(k).ok();
        let master = load_master_key(&config, &env)?;
        let admin_token_hashes = load_admin_tokens(&config, &env)?;
        warn_about_env_secrets(&env);
        if admin_token_hashes.is_empty() {
            tracing::warn!("no admin token configured: every /v1 admin call will be refused");
        }
        let stores = open_store(&config)?;
        Ok(Self {
            config,
            config_path: None,
            upgrade: false,
            store: stores.keys,
            signing_keys: stores.signing_keys,
            rate_limits: stores.rate_limits,
            abuse: stores.abuse,
            credits: stores.credits,
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
        self.store.report_circuit(
            metrics.store_circuit_open.clone(),
            metrics.store_fast_failures.clone(),
        );
        let cache = Arc::new(KeyCache::new(
            Arc::clone(&self.store),
            Arc::clone(&self.master),
            metrics.clone(),
            &cfg.cache,
        ));
        // Other gateways' changes to keys evict them here too, and the `[abuse]` blocks their
        // failures set are known here (Redis; a no-op when embedded).
        let abuse_blocks = Arc::new(Blocks::new(
            cfg.abuse
                .as_ref()
                .map_or(std::time::Duration::from_secs(1), |a| a.block_for),
        ));
        self.store.watch(Arc::new(BlockFeed {
            keys: Arc::clone(&cache) as Arc<dyn crate::keys::ChangeSink>,
            blocks: Arc::clone(&abuse_blocks),
        }));

        // Bind what we can now, so a taken port fails at once instead of pingora's 30 retries.
        // Bind what we can now, so a taken port fails at once instead of pingora's 30 retries.
        // During an upgrade the old process still holds every port: pingora hands the proxy's
        // over, and the admin and metrics listeners are bound once the old process lets go.
        let (admin_listener, metrics_listener) = if self.upgrade {
            (None, None)
        } else {
            drop(bind(cfg.server.listen)?);
            (
                Some(bind(cfg.admin.listen)?),
                Some(bind(cfg.metrics.listen)?),
            )
        };

        let mut conf = ServerConf {
            upgrade_sock: cfg.server.upgrade_sock.display().to_string(),
            threads: cfg.server.threads,
            grace_period_seconds: Some(cfg.server.shutdown_grace.as_secs()),
            upstream_keepalive_pool_size: cfg.server.upstream_pool_size,
            graceful_shutdown_timeout_seconds: Some(1),
            ..ServerConf::default()
        };
        conf.daemon = false;
        let opt = pingora::server::configuration::Opt {
            upgrade: self.upgrade,
            ..Default::default()
        };
        let mut server = Server::new_with_opt_and_conf(Some(opt), conf);

        let lifecycle = Arc::new(Lifecycle::new(
            Arc::clone(&self.store),
            Arc::clone(&cache),
            Arc::clone(&self.master),
            metrics.clone(),
            Arc::clone(&self.clock),
            Arc::clone(&self.credits),
        ));
        let asserter = Arc::new(Asserter::new(
            cfg.assertion.issuer.clone(),
            cfg.assertion.ttl,
            cfg.assertion.refresh_interval,
        ));
        let signing_keys = Arc::new(SigningKeys {
            asserter: Arc::clone(&asserter),
            store: Arc::clone(&self.signing_keys),
            master: Arc::clone(&self.master),
            clock: Arc::clone(&self.clock),
            refresh: cfg.assertion.refresh_interval,
            metrics: metrics.clone(),
        });
        let signing_keys_loaded = server.add_service(background_service(
            "keygate assertion keys",
            RefreshService(Arc::clone(&signing_keys)),
        ));
        let admin_state = Arc::new(AdminState {
            lifecycle: Arc::clone(&lifecycle),
            store: Arc::clone(&self.store),
            token_hashes: self.admin_token_hashes.clone(),
            proxy_addr: cfg.server.listen,
            signing_keys: Arc::clone(&signing_keys),
            needs_signing_keys: cfg
                .upstreams
                .iter()
                .any(|u| matches!(u.assertion, crate::assertion::Mode::Ed25519)),
            ready: metrics.ready.clone(),
            cache: Arc::clone(&cache),
            nonces_checked_locally: cfg.nonce_fallback == crate::config::NonceFallback::Local,
            shutting_down: std::sync::atomic::AtomicBool::new(false),
        });
        server.add_service(background_service(
            "keygate readiness",
            admin::ReadinessService(Arc::clone(&admin_state)),
        ));
        let usage = Arc::new(UsageTally::default());
        let otlp = crate::otlp::Otlp::start(&cfg.tracing, &cfg.assertion.issuer)?.map(Arc::new);
        // Leases save round trips to a shared store; in process there are none to save.
        let limiter: Arc<dyn RateLimitStore> = match (cfg.lease, &cfg.store) {
            (Some((fraction, ttl)), StoreConfig::Redis { .. }) => {
                let leased = Arc::new(crate::limits::lease::Leased::new(
                    Arc::clone(&self.rate_limits),
                    fraction,
                    ttl,
                ));
                server.add_service(background_service(
                    "keygate limit leases",
                    crate::limits::lease::LeaseSweeper(Arc::clone(&leased)),
                ));
                leased
            }
            _ => Arc::clone(&self.rate_limits),
        };
        let gateway = Gateway::new(
            cfg,
            cache,
            metrics.clone(),
            Arc::clone(&self.clock),
            Some(lifecycle),
            Arc::clone(&usage),
            asserter,
        )
        .with_otlp(otlp.clone())
        .with_limiter(limiter)
        .with_abuse(cfg.abuse.as_ref(), Arc::clone(&self.abuse), abuse_blocks)
        .with_credits(Arc::clone(&self.credits));
        server.add_service(background_service(
            "keygate usage",
            UsageFlusher {
                tally: Arc::clone(&usage),
                store: Arc::clone(&self.store),
                metrics: metrics.clone(),
            },
        ));
        let limits = Limits {
            max_connections: connection_limit(cfg.server.max_connections, cfg.cache.capacity),
            header_timeout: cfg.server.header_timeout,
            body_timeout: cfg.server.body_timeout,
            h2c: cfg.server.h2c,
        };
        let routing = gateway.routing();
        let board = gateway.health_board();
        let mut http = pingora::proxy::http_proxy(&server.configuration, gateway);
        let mut options = pingora::apps::HttpServerOptions::default();
        options.h2c = cfg.server.h2c;
        // An h2 connection with no open stream is closed like an idle HTTP/1 keep-alive.
        options.h2_idle_timeout = Some(cfg.server.header_timeout);
        http.server_options = Some(options);
        let certificate = cfg
            .server
            .tls
            .as_ref()
            .map(crate::proxy::tls::Certificate::new)
            .transpose()?;
        let acceptor = certificate
            .as_ref()
            .map(crate::proxy::tls::Certificate::acceptor)
            .transpose()?;
        let guarded = Guarded::new(http, limits, metrics.clone()).with_tls(acceptor);
        let filter = guarded.connection_filter();
        let mut proxy =
            pingora::services::listening::Service::new("keygate proxy".to_owned(), guarded);
        proxy.set_connection_filter(filter);
        let admin_certificate = cfg
            .admin
            .tls
            .as_ref()
            .map(crate::proxy::tls::Certificate::new)
            .transpose()?;
        let metrics_certificate = cfg
            .metrics
            .tls
            .as_ref()
            .map(crate::proxy::tls::Certificate::new)
            .transpose()?;
        for (cert, listener) in [
            (&certificate, "proxy"),
            (&admin_certificate, "admin"),
            (&metrics_certificate, "metrics"),
        ] {
            if let Some(cert) = cert {
                cert.report_expiry(
                    metrics
                        .tls_certificate_expiry
                        .with_label_values(&[listener]),
                );
            }
        }
        // A plain TCP listener either way: the TLS handshake runs inside Guarded, so it counts
        // toward max_connections and must finish within header_timeout.
        proxy.add_tcp(&cfg.server.listen.to_string());
        let proxy_service = server.add_service(proxy);
        if self.upgrade {
            // The old process stops accepting the moment the socket is taken: the new one
            // accepts only once it can sign for upstreams (connections wait in the backlog).
            proxy_service.add_dependency(&signing_keys_loaded);
        }
        server.add_service(background_service(
            "keygate reload",
            crate::reload::ReloadService(Arc::new(crate::reload::Reloader {
                path: self.config_path.clone(),
                current: Mutex::new(cfg.clone()),
                routing: Arc::clone(&routing),
                board,
                certificate,
                admin_certificate: admin_certificate.clone(),
                metrics_certificate: metrics_certificate.clone(),
                metrics: metrics.clone(),
            })),
        ));

        server.add_service(background_service(
            "keygate health checks",
            crate::proxy::health::HealthChecker { routing },
        ));
        let mut admin_service =
            AxumService::on(cfg.admin.listen, admin_listener, admin::router(admin_state));
        if let Some(cert) = &admin_certificate {
            admin_service = admin_service.with_tls(Arc::clone(cert));
        }
        server.add_service(background_service("keygate admin", admin_service));
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
        let mut metrics_service =
            AxumService::on(cfg.metrics.listen, metrics_listener, metrics_router);
        if let Some(cert) = &metrics_certificate {
            metrics_service = metrics_service.with_tls(Arc::clone(cert));
        }
        server.add_service(background_service("keygate metrics", metrics_service));
        for svc in extra {
            server.add_boxed_service(svc);
        }

        for up in &cfg.upstreams {
            if up.tls.as_ref().is_some_and(|t| !t.verify) {
                tracing::warn!(
                    upstream = %up.name,
                    "TLS certificate verification is OFF for this upstream (verify = false): \
                     anyone on the path can impersonate it and read every forwarded request"
                );
            }
        }
        tracing::info!(
            max_connections = limits.max_connections,
            proxy = %cfg.server.listen,
            admin = %cfg.admin.listen,
            metrics = %cfg.metrics.listen,
            "keygate started"
        );
        // Taken over last, once everything that can fail has been built: from the moment the
        // old process sees the sockets taken it stops accepting, so this one must not then
        // fail to start.
        self.take_over_listeners(&mut server)?;
        if let Some(pid_file) = &cfg.server.pid_file {
            std::fs::write(pid_file, format!("{}\n", std::process::id()))
                .map_err(|e| StartError::PidFile(pid_file.display().to_string(), e))?;
        }
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
        if let Some(otlp) = otlp {
            otlp.shutdown();
        }
        if let Some(pid_file) = &self.config.server.pid_file {
            // After an upgrade the file names the new process: leave it.
            let ours = std::fs::read_to_string(pid_file)
                .is_ok_and(|t| t.trim() == std::process::id().to_string());
            if ours {
                let _ = std::fs::remove_file(pid_file);
            }
        }
        tracing::info!("keygate stopped");
        Ok(())
    }
}

impl App {
    /// During an upgrade, receives the listening proxy socket from the running keygate,
    /// waiting up to `server.upgrade_wait` for it (a no-op otherwise).
    fn take_over_listeners(&self, server: &mut Server) -> Result<(), StartError> {
        if !self.upgrade {
            return Ok(());
        }
        let server_cfg = &self.config.server;
        let sock = server_cfg.upgrade_sock.display().to_string();
        pingora::server::set_upgrade_wait(server_cfg.upgrade_wait);
        // Only the new process of an upgrade creates the socket (the old one connects to it).
        let made_private = private_upgrade_sock(&server_cfg.upgrade_sock, server_cfg.upgrade_wait)?;
        let taken = server.try_bootstrap();
        made_private.store(true, std::sync::atomic::Ordering::Relaxed);
        match taken {
            Ok(()) => {
                tracing::info!(upgrade_sock = %sock, "listening socket taken over from the running keygate");
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Err(StartError::UpgradeTimedOut(
                sock,
                humantime::format_duration(server_cfg.upgrade_wait).to_string(),
            )),
            Err(e) => Err(StartError::UpgradeFailed(sock, e)),
        }
    }
}

fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    let l = TcpListener::bind(addr).map_err(|e| StartError::Listen(addr, e))?;
    l.set_nonblocking(true)
        .map_err(|e| StartError::Listen(addr, e))?;
    Ok(l)
}

/// An axum app served inside a pingora background service, stopping on pingora's shutdown;
/// over HTTPS when given a certificate.
pub struct AxumService {
    /// Bound before the server starts; taken once when the service starts.
    listener: Mutex<Option<TcpListener>>,
    /// Where to bind when no listener was given (an upgrade: once the old process lets go).
    addr: Option<SocketAddr>,
    router: axum::Router,
    tls: Option<Arc<crate::proxy::tls::Certificate>>,
}

impl AxumService {
    pub fn new(listener: TcpListener, router: axum::Router) -> Self {
        Self {
            listener: Mutex::new(Some(listener)),
            addr: None,
            router,
            tls: None,
        }
    }

    /// With `listener` when bound already, else binding `addr` when the service starts,
    /// retrying while another process (the keygate being upgraded) still holds it.
    pub fn on(addr: SocketAddr, listener: Option<TcpListener>, router: axum::Router) -> Self {
        let mut s = match listener {
            Some(l) => Self::new(l, router),
            None => Self {
                listener: Mutex::new(None),
                addr: None,
                router,
                tls: None,
            },
        };
        s.addr = Some(addr);
        s
    }

    /// Binds `addr`, waiting (up to a minute) for the process that holds it to let go.
    async fn bind_when_free(addr: SocketAddr) -> Option<TcpListener> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            match bind(addr) {
                Ok(l) => return Some(l),
                Err(e) if std::time::Instant::now() > deadline => {
                    tracing::error!(error = %e, "listener not started");
                    return None;
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(25)).await,
            }
        }
    }

    /// Serves HTTPS (TLS 1.2 and 1.3, HTTP/1.1) with `cert`, which a reload can replace.
    pub fn with_tls(mut self, cert: Arc<crate::proxy::tls::Certificate>) -> Self {
        self.tls = Some(cert);
        self
    }

    /// The accept loop for HTTPS: a handshake and the request head each get 10 s, so a
    /// silent client cannot hold a connection.
    async fn serve_tls(
        &self,
        listener: tokio::net::TcpListener,
        cert: Arc<crate::proxy::tls::Certificate>,
        mut shutdown: ShutdownWatch,
    ) {
        const HANDSHAKE: std::time::Duration = std::time::Duration::from_secs(10);
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map(|b| {
            b.with_no_client_auth()
                .with_cert_resolver(cert as Arc<dyn rustls::server::ResolvesServerCert>)
        });
        let mut config = match config {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot set up TLS; listener not started");
                return;
            }
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        loop {
            let (tcp, _) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors, typically: give others the time to free one
                        // rather than spin on accept().
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = shutdown.changed() => return,
            };
            let (acceptor, router) = (acceptor.clone(), self.router.clone());
            tokio::spawn(async move {
                let Ok(Ok(stream)) = tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await
                else {
                    return;
                };
                let service = hyper_util::service::TowerToHyperService::new(router);
                let served = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HANDSHAKE)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                if let Err(e) = served {
                    tracing::debug!(error = %e, "HTTPS connection ended with an error");
                }
            });
        }
    }
}

#[async_trait]
impl BackgroundService for AxumService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let given = self.listener.lock().ok().and_then(|mut l| l.take());
        let std_listener = match (given, self.addr) {
            (Some(l), _) => l,
            (None, Some(addr)) => match Self::bind_when_free(addr).await {
                Some(l) => l,
                None => return,
            },
            (None, None) => return,
        };
        let listener = match tokio::net::TcpListener::from_std(std_listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot start listener");
                return;
            }
        };
        if let Some(cert) = &self.tls {
            return self.serve_tls(listener, Arc::clone(cert), shutdown).await;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn write_private(path: &std::path::Path, text: &str) {
        std::fs::write(path, text).unwrap_or_else(|e| panic!("{e}"));
        crate::keys::owner_only(path, 0o600).unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn secrets_come_from_systemd_credentials() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (_, b64) = MasterKey::generate();
        write_private(
            &dir.path().join("master-key"),
            &format!("{}\n", b64.expose()),
        );
        write_private(&dir.path().join("admin-token"), "tok-from-systemd\n");
        let creds = dir.path().display().to_string();
        let env = move |k: &str| (k == ENV_CREDENTIALS_DIRECTORY).then(|| creds.clone());
        let config =
            Config::from_toml("[server]\nallow_no_routes = true").unwrap_or_else(|e| panic!("{e}"));
        assert!(load_master_key(&config, &env).is_ok());
        let tokens = load_admin_tokens(&config, &env).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            tokens,
            vec![SecretString::new("tok-from-systemd".into()).sha256()]
        );
        // Without the credential, the file named is missing: refused, and named.
        let none = |_: &str| None;
        let config = Config::from_toml(
            "[server]\nallow_no_routes = true\n[secrets]\nmaster_key_file = \"/nonexistent/k\"",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            load_master_key(&config, &none),
            Err(StartError::MasterKeyFile(_, ref why)) if why == "no such file"
        ));
    }
}
