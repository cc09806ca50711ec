//! Configuration: the TOML file ([`file`]) validated into the typed [`Config`] the rest of
//! the gateway uses. Nothing past startup parses strings from config.

mod file;

use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use crate::auth::client_ip::parse_net;

use crate::keys::{AuthKind, AuthKinds, NonceDurability, RedisTarget};
use file::{FileConfig, RouteFile, UpstreamFile, UrlOrList};

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub metrics: MetricsConfig,
    pub store: StoreConfig,
    pub nonce_fallback: NonceFallback,
    /// `store.nonce_durability` (+ `store.replication_timeout`).
    pub nonce_durability: NonceDurability,
    pub cache: CacheConfig,
    pub signing: SigningConfig,
    pub secrets: SecretsConfig,
    pub assertion: AssertionConfig,
    pub log: LogConfig,
    pub tracing: TracingConfig,
    pub upstreams: Vec<Upstream>,
    pub routes: Vec<Route>,
    /// `[[owners]]`: limits shared by all keys of an owner, by owner.
    pub owner_limits: std::collections::HashMap<String, Vec<crate::limits::RateLimit>>,
    /// `[abuse]`; `None` when disabled.
    pub abuse: Option<AbuseConfig>,
    /// `[limits]`: `Some` (fraction, ttl) in lease mode.
    pub lease: Option<(f64, Duration)>,
}

/// `[abuse]`: addresses failing authentication too often are refused for a while.
#[derive(Debug, Clone)]
pub struct AbuseConfig {
    pub max_failures: u32,
    pub window: Duration,
    pub block_for: Duration,
    pub never_block: Vec<IpNet>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub threads: usize,
    pub max_body_bytes: usize,
    pub trusted_proxies: Vec<IpNet>,
    pub shutdown_grace: Duration,
    /// Total time to receive a request head (and the longest a kept-alive connection waits
    /// idle for its next request).
    pub header_timeout: Duration,
    /// Total time to receive a request body once its head is in.
    pub body_timeout: Duration,
    /// Client connections held at once; `None`: derived from the descriptor limit at start.
    pub max_connections: Option<usize>,
    /// Accept HTTP/2 with prior knowledge on a plain listener (`server.h2c`).
    pub h2c: bool,
    /// `server.pid_file`: written at start, removed at exit.
    pub pid_file: Option<PathBuf>,
    /// Idle keep-alive connections kept to upstreams (`server.upstream_pool_size`).
    pub upstream_pool_size: usize,
    /// The unix socket a binary upgrade hands the proxy listener over (`server.upgrade_sock`).
    pub upgrade_sock: PathBuf,
    /// How long `serve --upgrade` waits for the running keygate to hand its listening socket
    /// over (`server.upgrade_wait`) before it gives up (exit code 75).
    pub upgrade_wait: Duration,
    /// TLS on the proxy listener; `None`: plain HTTP (behind a load balancer).
    pub tls: Option<TlsConfig>,
}

/// A certificate chain and its key, PEM files, re-read on SIGHUP.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Client certificates are requested (optional) and verified against these CAs.
    pub client_ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// SHA-256 of each accepted admin token (from the file; the env token is added at start).
    pub token_sha256: Vec<[u8; 32]>,
    /// A file holding one admin token, read at start.
    pub token_file: Option<PathBuf>,
    /// `[admin.tls]`: HTTPS on the admin listener.
    pub tls: Option<TlsConfig>,
}

#[derive(Debug, Clone)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
    /// `[metrics.tls]`: HTTPS on the metrics listener.
    pub tls: Option<TlsConfig>,
}

#[derive(Debug, Clone)]
pub enum StoreConfig {
    Embedded {
        path: PathBuf,
    },
    Redis {
        target: RedisTarget,
        /// PEM CA certificates trusted for `rediss://` instead of the system's (extension).
        tls_ca_file: Option<PathBuf>,
    },
}

/// What a nonce check does when the store cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceFallback {
    /// Refuse with 503 `store_unavailable` (the default: replays stay impossible fleet-wide).
    Refuse,
    /// Check against this gateway's memory only: a nonce could then be replayed once on each
    /// other gateway during the outage. Weaker; for operators who prefer availability.
    Local,
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub capacity: u64,
    pub ttl: Duration,
    pub negative_ttl: Duration,
    pub stale_if_error: Duration,
}

#[derive(Debug, Clone, Copy)]
pub struct SigningConfig {
    pub clock_skew: Duration,
    pub body_nonce_retention: Duration,
}

#[derive(Debug, Clone)]
pub struct SecretsConfig {
    pub master_key_file: Option<PathBuf>,
    /// During a master-key rotation: the key being replaced, which still opens what it
    /// sealed (`keygate secrets reseal` moves everything off it).
    pub previous_master_key_file: Option<PathBuf>,
}

/// `[log]`.
#[derive(Debug, Clone)]
pub struct LogConfig {
    pub json: bool,
    /// A tracing `EnvFilter` directive; `RUST_LOG` takes precedence.
    pub level: String,
    /// One access-log line per request.
    pub access: bool,
}

/// `[tracing]`: span export.
#[derive(Debug, Clone)]
pub struct TracingConfig {
    /// `None`: no spans leave the process.
    pub otlp_endpoint: Option<String>,
    pub otlp_timeout: Duration,
    pub sample_ratio: f64,
}

/// `[assertion]` and `server.name`: fleet-wide settings of the upstream identity assertion.
#[derive(Debug, Clone)]
pub struct AssertionConfig {
    /// The `iss` claim: `server.name`, else "keygate".
    pub issuer: String,
    pub ttl: Duration,
    pub refresh_interval: Duration,
    pub jwks_on_proxy: bool,
}

#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    /// The endpoints as written (`host:port`); host names among them are resolved again
    /// every `resolve_interval`.
    pub endpoint_names: Vec<String>,
    pub resolve_interval: Duration,
    pub balance: Balance,
    /// Active health checks; `None`: passive failure counting only.
    pub health_check: Option<HealthCheck>,
    /// How requests to it are asserted.
    pub assertion: crate::assertion::Mode,
    pub endpoints: Vec<SocketAddr>,
    /// TLS to the upstream; `None`: plain HTTP.
    pub tls: Option<UpstreamTls>,
    pub forward_credentials: bool,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
}

/// How an upstream's next endpoint is picked among the healthy ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    LeastConnections,
}

/// `health_check` of an upstream: `GET path` on every endpoint every `interval`; a 200 within
/// `timeout` is a success.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    pub path: String,
    pub interval: Duration,
    /// Consecutive failures (checks or requests) that take an endpoint out.
    pub unhealthy_after: u32,
    /// Consecutive successful checks that put it back.
    pub healthy_after: u32,
    pub timeout: Duration,
}

/// TLS to one upstream.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    /// The server name sent and verified.
    pub sni: String,
    /// CA certificates trusted instead of the system's.
    pub ca: Option<std::sync::Arc<pingora::protocols::tls::CaType>>,
    /// `false`: the certificate is not verified at all.
    pub verify: bool,
    /// keygate's own certificate and key, for upstreams that require client certificates.
    pub client: Option<std::sync::Arc<pingora::utils::tls::CertKey>>,
}

/// How a route's path is matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    Exact(String),
    /// `"/v1/payments/*"` is stored as `"/v1/payments/"` and matches every longer path.
    Prefix(String),
}

impl PathPattern {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            Self::Exact(p) => p == path,
            Self::Prefix(p) => path.len() > p.len() && path.starts_with(p.as_str()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Route {
    /// Metrics and log label: the configured name, or the path pattern as written.
    pub name: String,
    /// Uppercase; empty means any method.
    pub methods: Vec<http::Method>,
    pub path: PathPattern,
    pub scope: Option<String>,
    /// Index into [`Config::upstreams`].
    pub upstream: usize,
    pub auth: AuthKinds,
    pub public: bool,
    /// Limits for keys without their own (per key and route).
    pub rate_limits: Vec<crate::limits::RateLimit>,
    pub cost: u64,
    /// Whether a request passes when its limits' state cannot be reached.
    pub limits_fail_open: bool,
    /// Credits come back when the upstream answers 5xx or fails.
    pub refund_on_5xx: bool,
    /// `upgrade = ["websocket"]`: a request may switch the connection to WebSocket. After
    /// the upstream's 101 the connection is a tunnel keygate no longer reads, so every other
    /// route refuses a request carrying `Upgrade`.
    pub upgrade_websocket: bool,
    /// Method and URL override headers (`X-HTTP-Method-Override`…) reach the upstream.
    pub forward_method_override: bool,
}

/// One problem in a config file, with the key path it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Collects problems while validating, so one run reports all of them.
struct Problems(Vec<ConfigError>);

impl Problems {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError {
            path: path.into(),
            message: message.into(),
        });
    }

    fn duration(&mut self, path: &str, text: &str) -> Duration {
        humantime::parse_duration(text).unwrap_or_else(|_| {
            self.add(
                path,
                format!("{text:?} is not a duration (use e.g. \"300s\", \"5m\", \"24h\")"),
            );
            Duration::ZERO
        })
    }

    fn socket(&mut self, path: &str, text: &str) -> SocketAddr {
        text.parse().unwrap_or_else(|_| {
            self.add(
                path,
                format!("{text:?} is not an address like \"127.0.0.1:8080\""),
            );
            SocketAddr::from(([0, 0, 0, 0], 0))
        })
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigErrors> {
        Self::load_with(path, Lookup::Now)
    }

    /// [`load`](Self::load), resolving upstream host names or not.
    pub fn load_with(path: &Path, lookup: Lookup) -> Result<Self, ConfigErrors> {
        let text = read(path)?;
        Self::parse(&text, lookup)
    }

    /// For `check-config` only: the config as far as it could be read, with every problem
    /// found in it, so the checks that need a config (the secret files it names) still run
    /// and one run reports everything. A config with problems is never served. `Err` only
    /// when the file cannot be read or is not TOML at all.
    pub fn load_for_check(
        path: &Path,
        lookup: Lookup,
    ) -> Result<(Self, Vec<ConfigError>), ConfigErrors> {
        let text = read(path)?;
        Self::parse_all(&text, lookup)
    }

    /// Parses and validates config text, reporting every problem of the file in one run:
    /// each section and each `[[upstreams]]`/`[[routes]]`/`[[owners]]` entry is read on its
    /// own, so an unknown key or a wrong type in one does not hide problems elsewhere; the
    /// rest is then validated with what could be read.
    pub fn from_toml(text: &str) -> Result<Self, ConfigErrors> {
        Self::parse(text, Lookup::Now)
    }

    fn parse(text: &str, lookup: Lookup) -> Result<Self, ConfigErrors> {
        let (config, problems) = Self::parse_all(text, lookup)?;
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(problems))
        }
    }

    /// What could be read, and every problem: the reader's, then validation's told in the
    /// file's own terms (validation's findings about what the reader already refused are
    /// left out).
    fn parse_all(text: &str, lookup: Lookup) -> Result<(Self, Vec<ConfigError>), ConfigErrors> {
        let table: toml::Table = toml::from_str(text).map_err(|e| {
            let where_ = e
                .span()
                .map(|s| format!(" (at byte {})", s.start))
                .unwrap_or_default();
            ConfigErrors(vec![ConfigError {
                path: String::new(),
                message: format!("{}{where_}", e.message()),
            }])
        })?;
        let mut reader = SectionReader::default();
        let file = reader.read(table);
        let (config, found) = validate(file, lookup);
        let told: Vec<ConfigError> = found
            .into_iter()
            .filter_map(|e| reader.original(e))
            .collect();
        let mut all = std::mem::take(&mut reader.problems);
        all.extend(told);
        Ok((config, all))
    }
}

fn read(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            path: String::new(),
            message: format!("cannot read {}: {e}", path.display()),
        }])
    })
}

/// Reads a config table section by section and entry by entry, collecting problems; what
/// cannot be read is left at its default (sections) or out (entries), remembered so that
/// validation's findings can be told in the file's own terms.
#[derive(Default)]
struct SectionReader {
    problems: Vec<ConfigError>,
    /// Per array section, the file index of each entry kept.
    kept: std::collections::HashMap<&'static str, Vec<usize>>,
    /// Names of upstreams that could not be read: routes naming them are not told twice.
    unread_upstreams: Vec<String>,
}

impl SectionReader {
    fn one<T: serde::de::DeserializeOwned>(&mut self, at: &str, value: toml::Value) -> Option<T> {
        serde_path_to_error::deserialize::<_, T>(value)
            .map_err(|e| {
                let inner_path = e.path().to_string();
                let path = if inner_path == "." {
                    at.to_owned()
                } else {
                    format!("{at}.{inner_path}")
                };
                self.problems.push(ConfigError {
                    path,
                    message: e.into_inner().message().to_owned(),
                });
            })
            .ok()
    }

    fn section<T: serde::de::DeserializeOwned + Default>(
        &mut self,
        table: &mut toml::Table,
        name: &str,
    ) -> T {
        match table.remove(name) {
            Some(v) => self.one(name, v).unwrap_or_default(),
            None => T::default(),
        }
    }

    fn entries<T: serde::de::DeserializeOwned>(
        &mut self,
        table: &mut toml::Table,
        name: &'static str,
    ) -> Vec<T> {
        let values = match table.remove(name) {
            None => Vec::new(),
            Some(toml::Value::Array(a)) => a,
            Some(other) => {
                self.problems.push(ConfigError {
                    path: name.to_owned(),
                    message: format!("must be an array of tables, not a {}", other.type_str()),
                });
                Vec::new()
            }
        };
        let mut out = Vec::new();
        let mut kept = Vec::new();
        for (i, v) in values.into_iter().enumerate() {
            let name_field = v.get("name").and_then(|n| n.as_str()).map(str::to_owned);
            match self.one(&format!("{name}[{i}]"), v) {
                Some(entry) => {
                    out.push(entry);
                    kept.push(i);
                }
                None if name == "upstreams" => self.unread_upstreams.extend(name_field),
                None => {}
            }
        }
        self.kept.insert(name, kept);
        out
    }

    fn read(&mut self, mut table: toml::Table) -> FileConfig {
        let file = FileConfig {
            server: self.section(&mut table, "server"),
            admin: self.section(&mut table, "admin"),
            metrics: self.section(&mut table, "metrics"),
            store: self.section(&mut table, "store"),
            cache: self.section(&mut table, "cache"),
            signing: self.section(&mut table, "signing"),
            secrets: self.section(&mut table, "secrets"),
            assertion: self.section(&mut table, "assertion"),
            log: self.section(&mut table, "log"),
            tracing: self.section(&mut table, "tracing"),
            upstreams: self.entries(&mut table, "upstreams"),
            routes: self.entries(&mut table, "routes"),
            owners: self.entries(&mut table, "owners"),
            abuse: self.section(&mut table, "abuse"),
            limits: self.section(&mut table, "limits"),
        };
        for key in table.keys() {
            self.problems.push(ConfigError {
                path: key.clone(),
                message: "unknown section".into(),
            });
        }
        file
    }

    /// A validation finding with its entry index as in the file; `None` when it only
    /// repeats a problem already reported (a route naming an upstream that could not be read).
    fn original(&self, mut e: ConfigError) -> Option<ConfigError> {
        for (name, kept) in &self.kept {
            let Some(rest) = e.path.strip_prefix(&format!("{name}[")) else {
                continue;
            };
            let Some((index, tail)) = rest.split_once(']') else {
                continue;
            };
            if let Some(file_index) = index.parse::<usize>().ok().and_then(|i| kept.get(i)) {
                e.path = format!("{name}[{file_index}]{tail}");
            }
        }
        let repeats = e.path.ends_with(".upstream")
            && self
                .unread_upstreams
                .iter()
                .any(|u| e.message == format!("no upstream named {u:?}"));
        (!repeats).then_some(e)
    }
}

/// `[admin.tls]` / `[metrics.tls]`: a certificate and key, checked now; client certificates
/// and h2c are for the proxy listener only.
/// `store.sentinels` + `store.sentinel_master` (+ password files): every problem named, the
/// target built anyway (the caller only reports problems).
fn sentinel_target(p: &mut Problems, s: &file::StoreFile) -> RedisTarget {
    if s.url.is_some() {
        p.add(
            "store.sentinels",
            "cannot be combined with store.url: name the sentinels, or one server or cluster",
        );
    }
    if s.tls_ca_file.is_some() {
        p.add(
            "store.tls_ca_file",
            "TLS to Sentinel-managed Redis is not supported; use store.url with rediss:// or \
             keep Sentinel traffic on a private network",
        );
    }
    let sentinels =
        crate::keys::SentinelTarget::parse_addresses(s.sentinels.as_deref().unwrap_or_default())
            .unwrap_or_else(|e| {
                p.add("store.sentinels", e);
                Vec::new()
            });
    let master = match s.sentinel_master.as_deref().map(str::trim) {
        Some(m) if !m.is_empty() && !m.contains(char::is_whitespace) => m.to_owned(),
        Some(_) => {
            p.add("store.sentinel_master", "must be one name, without spaces");
            String::new()
        }
        None => {
            p.add(
                "store.sentinel_master",
                "required with store.sentinels: the name the sentinels monitor",
            );
            String::new()
        }
    };
    RedisTarget::Sentinel(crate::keys::SentinelTarget {
        sentinels,
        master,
        password_file: s.password_file.as_ref().map(PathBuf::from),
        sentinel_password_file: s.sentinel_password_file.as_ref().map(PathBuf::from),
    })
}

fn listener_tls(p: &mut Problems, at: &str, t: Option<&file::TlsFile>) -> Option<TlsConfig> {
    let t = t?;
    if t.client_ca_file.is_some() || t.h2c {
        p.add(at, "client_ca_file and h2c are for [server.tls] only");
    }
    let cfg = TlsConfig {
        cert_file: PathBuf::from(&t.cert_file),
        key_file: PathBuf::from(&t.key_file),
        client_ca_file: None,
    };
    if let Err(e) = crate::proxy::tls::load(&cfg) {
        p.add(at, e.to_string());
    }
    Some(cfg)
}

/// The directory, under the default [`ServerConfig::upgrade_sock`]'s base, that keygate creates
/// with mode 0700 for the socket alone.
pub const UPGRADE_SOCK_DIR: &str = "keygate-upgrade";

/// `server.upgrade_sock` when the file sets none: `keygate-upgrade/upgrade.sock` in systemd's
/// `$RUNTIME_DIRECTORY` (its first entry), else beside `server.pid_file`, else beside the
/// embedded store, else in the working directory. Never a world-writable directory such as
/// `/tmp`, where another user could take the name first or reach the socket.
pub fn default_upgrade_sock(
    runtime_directory: Option<&std::ffi::OsStr>,
    pid_file: Option<&Path>,
    embedded_store: Option<&Path>,
) -> PathBuf {
    let runtime = runtime_directory
        .and_then(|d| d.to_str())
        .and_then(|d| d.split(':').next())
        .filter(|d| !d.is_empty())
        .map(Path::new);
    let base = runtime
        .or_else(|| pid_file.and_then(Path::parent))
        .or_else(|| embedded_store.and_then(Path::parent))
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    base.join(UPGRADE_SOCK_DIR).join("upgrade.sock")
}

/// The config built from `f`, and every problem found in it (none: it may be served).
fn validate(f: FileConfig, lookup: Lookup) -> (Config, Vec<ConfigError>) {
    let mut p = Problems(Vec::new());

    let server = ServerConfig {
        listen: p.socket("server.listen", &f.server.listen),
        threads: f.server.threads,
        max_body_bytes: usize::try_from(f.server.max_body_bytes).unwrap_or(usize::MAX),
        trusted_proxies: f
            .server
            .trusted_proxies
            .iter()
            .enumerate()
            .filter_map(|(i, t)| {
                parse_net(t)
                    .map_err(|e| p.add(format!("server.trusted_proxies[{i}]"), e.to_string()))
                    .ok()
            })
            .collect(),
        shutdown_grace: p.duration("server.shutdown_grace", &f.server.shutdown_grace),
        header_timeout: p.duration("server.header_timeout", &f.server.header_timeout),
        body_timeout: p.duration("server.body_timeout", &f.server.body_timeout),
        max_connections: f
            .server
            .max_connections
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
        h2c: f.server.h2c || f.server.tls.as_ref().is_some_and(|t| t.h2c),
        pid_file: f.server.pid_file.as_ref().map(PathBuf::from),
        upstream_pool_size: f.server.upstream_pool_size,
        upgrade_sock: f.server.upgrade_sock.as_ref().map_or_else(
            || {
                default_upgrade_sock(
                    std::env::var_os("RUNTIME_DIRECTORY").as_deref(),
                    f.server.pid_file.as_deref().map(Path::new),
                    (f.store.kind == "embedded").then(|| Path::new(f.store.path.as_str())),
                )
            },
            PathBuf::from,
        ),
        upgrade_wait: p.duration("server.upgrade_wait", &f.server.upgrade_wait),
        tls: f.server.tls.as_ref().map(|t| TlsConfig {
            cert_file: PathBuf::from(&t.cert_file),
            key_file: PathBuf::from(&t.key_file),
            client_ca_file: t.client_ca_file.as_ref().map(PathBuf::from),
        }),
    };
    if let Some(tls) = &server.tls {
        if let Err(e) = crate::proxy::tls::load(tls) {
            p.add("server.tls", e.to_string());
        }
    }
    for (key, d) in [
        ("server.header_timeout", server.header_timeout),
        ("server.body_timeout", server.body_timeout),
    ] {
        if d < Duration::from_millis(100) {
            p.add(key, "must be at least 100ms");
        }
    }
    if server.max_connections == Some(0) {
        p.add("server.max_connections", "must be at least 1");
    }
    if server.threads == 0 {
        p.add("server.threads", "must be at least 1");
    }
    if server.max_body_bytes == 0 {
        p.add("server.max_body_bytes", "must be at least 1");
    }

    let mut token_sha256 = Vec::new();
    for (i, t) in f.admin.token_sha256.iter().enumerate() {
        let mut h = [0u8; 32];
        if t.len() == 64 && hex::decode_to_slice(t, &mut h).is_ok() {
            token_sha256.push(h);
        } else {
            p.add(
                format!("admin.token_sha256[{i}]"),
                "must be 64 hex characters (SHA-256 of a token)",
            );
        }
    }
    let admin = AdminConfig {
        listen: p.socket("admin.listen", &f.admin.listen),
        token_sha256,
        token_file: f.admin.token_file.map(PathBuf::from),
        tls: listener_tls(&mut p, "admin.tls", f.admin.tls.as_ref()),
    };
    let metrics = MetricsConfig {
        listen: p.socket("metrics.listen", &f.metrics.listen),
        tls: listener_tls(&mut p, "metrics.tls", f.metrics.tls.as_ref()),
    };

    let store = match f.store.kind.as_str() {
        "embedded" => StoreConfig::Embedded {
            path: PathBuf::from(&f.store.path),
        },
        "redis" if f.store.sentinels.is_some() => StoreConfig::Redis {
            target: sentinel_target(&mut p, &f.store),
            tls_ca_file: None,
        },
        "redis" => {
            for (key, set) in [
                ("store.sentinel_master", f.store.sentinel_master.is_some()),
                ("store.password_file", f.store.password_file.is_some()),
                (
                    "store.sentinel_password_file",
                    f.store.sentinel_password_file.is_some(),
                ),
            ] {
                if set {
                    p.add(
                        key,
                        "only used with store.sentinels (a store.url carries its own password)",
                    );
                }
            }
            let urls = match f.store.url {
                Some(UrlOrList::One(u)) => vec![u],
                Some(UrlOrList::Many(us)) => us,
                None => Vec::new(),
            };
            let target = if urls.is_empty() {
                p.add("store.url", "required when store.kind = \"redis\"");
                None
            } else {
                RedisTarget::parse(&urls)
                    .map_err(|e| p.add("store.url", e))
                    .ok()
            };
            if f.store.tls_ca_file.is_some() && !target.as_ref().is_some_and(RedisTarget::uses_tls)
            {
                p.add("store.tls_ca_file", "only used with rediss:// URLs");
            }
            StoreConfig::Redis {
                target: target.unwrap_or_else(|| RedisTarget::Single(String::new())),
                tls_ca_file: f.store.tls_ca_file.map(PathBuf::from),
            }
        }
        other => {
            p.add(
                "store.kind",
                format!("{other:?} is not \"embedded\" or \"redis\""),
            );
            StoreConfig::Embedded {
                path: PathBuf::from(&f.store.path),
            }
        }
    };

    let nonce_fallback = match f.store.nonce_fallback.as_str() {
        "refuse" => NonceFallback::Refuse,
        "local" => NonceFallback::Local,
        other => {
            p.add(
                "store.nonce_fallback",
                format!("{other:?} is not \"refuse\" or \"local\""),
            );
            NonceFallback::Refuse
        }
    };
    let replication_timeout = p.duration("store.replication_timeout", &f.store.replication_timeout);
    if replication_timeout.is_zero() || replication_timeout > crate::keys::MAX_REPLICATION_TIMEOUT {
        p.add(
            "store.replication_timeout",
            format!(
                "must be between 1ms and {:?} (below the store call timeout)",
                crate::keys::MAX_REPLICATION_TIMEOUT
            ),
        );
    }
    let nonce_durability = match f.store.nonce_durability.as_str() {
        "async" => NonceDurability::Async,
        "replicated" => {
            if !matches!(store, StoreConfig::Redis { .. }) {
                p.add(
                    "store.nonce_durability",
                    "\"replicated\" needs store.kind = \"redis\": the embedded store has no \
                     replica to wait for",
                );
            }
            NonceDurability::Replicated {
                timeout: replication_timeout,
            }
        }
        other => {
            p.add(
                "store.nonce_durability",
                format!("{other:?} is not \"async\" or \"replicated\""),
            );
            NonceDurability::Async
        }
    };
    let cache = CacheConfig {
        capacity: f.cache.capacity,
        ttl: p.duration("cache.ttl", &f.cache.ttl),
        negative_ttl: p.duration("cache.negative_ttl", &f.cache.negative_ttl),
        stale_if_error: p.duration("cache.stale_if_error", &f.cache.stale_if_error),
    };
    let signing = SigningConfig {
        clock_skew: p.duration("signing.clock_skew", &f.signing.clock_skew),
        body_nonce_retention: p.duration(
            "signing.body_nonce_retention",
            &f.signing.body_nonce_retention,
        ),
    };
    if signing.clock_skew.is_zero() {
        p.add("signing.clock_skew", "must be more than 0s");
    }
    let secrets = SecretsConfig {
        master_key_file: f.secrets.master_key_file.map(PathBuf::from),
        previous_master_key_file: f.secrets.previous_master_key_file.map(PathBuf::from),
    };
    let assertion = AssertionConfig {
        issuer: match &f.server.name {
            Some(n) if n.trim().is_empty() => {
                p.add("server.name", "must not be empty");
                String::new()
            }
            Some(n) => n.clone(),
            None => "keygate".into(),
        },
        ttl: p.duration("assertion.ttl", &f.assertion.ttl),
        refresh_interval: p.duration("assertion.refresh_interval", &f.assertion.refresh_interval),
        jwks_on_proxy: f.assertion.jwks_on_proxy,
    };
    let log = LogConfig {
        json: match f.log.format.as_str() {
            "json" => true,
            "text" => false,
            other => {
                p.add(
                    "log.format",
                    format!("{other:?} is not \"text\" or \"json\""),
                );
                false
            }
        },
        level: f.log.level.clone(),
        access: f.log.access,
    };
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log.level) {
        p.add("log.level", format!("{:?}: {e}", log.level));
    }
    let tracing = TracingConfig {
        otlp_endpoint: f.tracing.otlp_endpoint.clone(),
        otlp_timeout: p.duration("tracing.otlp_timeout", &f.tracing.otlp_timeout),
        sample_ratio: f.tracing.sample_ratio,
    };
    if let Some(url) = &tracing.otlp_endpoint {
        let ok = url
            .parse::<http::Uri>()
            .is_ok_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
        if !ok {
            p.add(
                "tracing.otlp_endpoint",
                format!("{url:?} is not an http:// or https:// URL"),
            );
        }
    }
    if !(0.0..=1.0).contains(&tracing.sample_ratio) {
        p.add("tracing.sample_ratio", "must be between 0.0 and 1.0");
    }
    if assertion.ttl < Duration::from_secs(1) {
        p.add("assertion.ttl", "must be at least 1s");
    }
    if assertion.refresh_interval < Duration::from_secs(1) {
        p.add("assertion.refresh_interval", "must be at least 1s");
    }

    let upstreams: Vec<Upstream> = f
        .upstreams
        .iter()
        .enumerate()
        .map(|(i, u)| validate_upstream(&mut p, i, u, lookup))
        .collect();
    for (i, u) in upstreams.iter().enumerate() {
        if upstreams[..i].iter().any(|o| o.name == u.name) {
            p.add(
                format!("upstreams[{i}].name"),
                format!("upstream {:?} is defined twice", u.name),
            );
        }
    }

    let routes: Vec<Route> = f
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| validate_route(&mut p, i, r, &upstreams))
        .collect();
    if f.routes.is_empty() && !f.server.allow_no_routes {
        // An empty or cut-short file (an editor's half-written save, `: > keygate.toml`)
        // would turn every request into 404 no_route, on reload too.
        p.add(
            "routes",
            "no [[routes]]: every request would be answered 404 no_route (set \
             server.allow_no_routes = true if that is meant)",
        );
    }

    let mut owner_limits = std::collections::HashMap::new();
    for (i, o) in f.owners.iter().enumerate() {
        let at = format!("owners[{i}]");
        if o.name.trim().is_empty() {
            p.add(format!("{at}.name"), "must not be empty");
        }
        for (path, msg) in crate::limits::check(&o.rate_limits) {
            p.add(format!("{at}.rate_limits{path}"), msg);
        }
        if owner_limits
            .insert(o.name.clone(), o.rate_limits.clone())
            .is_some()
        {
            p.add(
                format!("{at}.name"),
                format!("owner {:?} is listed twice", o.name),
            );
        }
    }
    let never_block: Vec<IpNet> = f
        .abuse
        .never_block
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            parse_net(s)
                .map_err(|e| p.add(format!("abuse.never_block[{i}]"), e.to_string()))
                .ok()
        })
        .collect();
    let abuse = AbuseConfig {
        max_failures: f.abuse.max_failures,
        window: p.duration("abuse.window", &f.abuse.window),
        block_for: p.duration("abuse.block_for", &f.abuse.block_for),
        never_block,
    };
    if abuse.max_failures == 0 {
        p.add("abuse.max_failures", "must be at least 1");
    }
    if abuse.window.is_zero() || abuse.block_for.is_zero() {
        p.add("abuse", "window and block_for must be more than 0s");
    }
    let abuse = f.abuse.enabled.then_some(abuse);
    let lease_ttl = p.duration("limits.lease_ttl", &f.limits.lease_ttl);
    if !(0.0..=0.05).contains(&f.limits.lease_fraction) {
        p.add(
            "limits.lease_fraction",
            "must be between 0.0 and 0.05 (a slice larger than 5% of a limit costs accuracy)",
        );
    }
    if lease_ttl.is_zero() {
        p.add("limits.lease_ttl", "must be more than 0s");
    }
    let lease = match f.limits.mode.as_str() {
        "lease" => Some((f.limits.lease_fraction, lease_ttl)),
        "exact" => None,
        other => {
            p.add(
                "limits.mode",
                format!("{other:?} is not \"exact\" or \"lease\""),
            );
            None
        }
    };
    (
        Config {
            server,
            admin,
            metrics,
            store,
            nonce_fallback,
            nonce_durability,
            cache,
            signing,
            secrets,
            assertion,
            log,
            tracing,
            upstreams,
            routes,
            owner_limits,
            abuse,
            lease,
        },
        p.0,
    )
}

/// Whether upstream host names are looked up while validating.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Resolve them now (starting, reloading, `check-config`).
    Now,
    /// Check only their `host:port` shape: a config for another network (a container, a
    /// cluster) whose names do not resolve here (`check-config --offline`).
    ShapeOnly,
}

fn validate_upstream(p: &mut Problems, i: usize, u: &UpstreamFile, lookup: Lookup) -> Upstream {
    let at = format!("upstreams[{i}]");
    if u.name.is_empty() {
        p.add(format!("{at}.name"), "must not be empty");
    }
    if u.endpoints.is_empty() {
        p.add(
            format!("{at}.endpoints"),
            "needs at least one \"host:port\"",
        );
    }
    let mut endpoints = Vec::new();
    for (j, e) in u.endpoints.iter().enumerate() {
        let found = match lookup {
            Lookup::Now => resolve_endpoint(e),
            Lookup::ShapeOnly => endpoint_shape(e),
        };
        match found {
            Ok(addrs) => endpoints.extend(addrs),
            Err(why) => p.add(
                format!("{at}.endpoints[{j}]"),
                format!("{e:?} is not a reachable \"host:port\": {why}"),
            ),
        }
    }
    endpoints.dedup();
    let tls = u.tls.then(|| upstream_tls(p, &at, u));
    if !u.tls && (u.sni.is_some() || u.ca_file.is_some() || !u.verify) {
        p.add(
            format!("{at}.tls"),
            "sni, ca_file and verify need tls = true",
        );
    }
    let assertion = match (u.assertion.as_str(), &u.assertion_secret_file) {
        ("ed25519", None) => crate::assertion::Mode::Ed25519,
        ("off", None) => crate::assertion::Mode::Off,
        ("hs256", Some(file)) => {
            match crate::keys::secret::read_private_file(Path::new(file)).and_then(|secret| {
                let secret = secret.ok_or_else(|| "no such file".to_owned())?;
                crate::assertion::SharedSecret::new(secret.expose().as_bytes().to_vec())
            }) {
                Ok(secret) => crate::assertion::Mode::Hs256(secret),
                Err(e) => {
                    p.add(
                        format!("{at}.assertion_secret_file"),
                        format!("{file}: {e}"),
                    );
                    crate::assertion::Mode::Off
                }
            }
        }
        ("hs256", None) => {
            p.add(
                format!("{at}.assertion_secret_file"),
                "required with assertion = \"hs256\"",
            );
            crate::assertion::Mode::Off
        }
        ("ed25519" | "off", Some(_)) => {
            p.add(
                format!("{at}.assertion_secret_file"),
                "only used with assertion = \"hs256\"",
            );
            crate::assertion::Mode::Off
        }
        (other, _) => {
            p.add(
                format!("{at}.assertion"),
                format!("{other:?} is not \"ed25519\", \"hs256\" or \"off\""),
            );
            crate::assertion::Mode::Off
        }
    };
    let balance = match u.balance.as_str() {
        "round_robin" => Balance::RoundRobin,
        "least_connections" => Balance::LeastConnections,
        other => {
            p.add(
                format!("{at}.balance"),
                format!("{other:?} is not \"round_robin\" or \"least_connections\""),
            );
            Balance::RoundRobin
        }
    };
    let health_check = u.health_check.as_ref().map(|h| {
        let hc = HealthCheck {
            path: h.path.clone(),
            interval: p.duration(&format!("{at}.health_check.interval"), &h.interval),
            unhealthy_after: h.unhealthy_after,
            healthy_after: h.healthy_after,
            timeout: p.duration(&format!("{at}.health_check.timeout"), &h.timeout),
        };
        if !hc.path.starts_with('/') {
            p.add(format!("{at}.health_check.path"), "must start with /");
        }
        if hc.unhealthy_after == 0 || hc.healthy_after == 0 {
            p.add(
                format!("{at}.health_check"),
                "unhealthy_after and healthy_after must be at least 1",
            );
        }
        if hc.interval < Duration::from_millis(100) {
            p.add(
                format!("{at}.health_check.interval"),
                "must be at least 100ms",
            );
        }
        hc
    });
    Upstream {
        name: u.name.clone(),
        endpoint_names: u.endpoints.clone(),
        balance,
        health_check,
        resolve_interval: p.duration(&format!("{at}.resolve_interval"), &u.resolve_interval),
        assertion,
        endpoints,
        tls,
        forward_credentials: u.forward_credentials,
        connect_timeout: p.duration(&format!("{at}.connect_timeout"), &u.connect_timeout),
        read_timeout: p.duration(&format!("{at}.read_timeout"), &u.read_timeout),
    }
}

/// An IP literal's address, or nothing for a well-formed `host:port` with a name (not looked
/// up).
fn endpoint_shape(endpoint: &str) -> Result<Vec<SocketAddr>, String> {
    if let Ok(addr) = endpoint.parse::<SocketAddr>() {
        return Ok(vec![addr]);
    }
    match endpoint.rsplit_once(':') {
        Some((host, port))
            if port.parse::<u16>().is_ok()
                && !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.') =>
        {
            Ok(Vec::new())
        }
        _ => Err("not host:port".into()),
    }
}

/// The addresses of `host:port` (an IP literal is its own); a name is looked up now.
pub fn resolve_endpoint(endpoint: &str) -> Result<Vec<SocketAddr>, String> {
    let addrs: Vec<SocketAddr> = endpoint
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .collect();
    same_family_as_first(addrs)
}

/// Every address of the family the resolver prefers (its first answer): a name with both
/// IPv4 and IPv6 addresses (`localhost`) often serves on one family only, and without health
/// checks round-robin over both would fail half the requests.
pub fn same_family_as_first(addrs: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, String> {
    let first = addrs.first().ok_or("no address")?;
    let v4 = first.is_ipv4();
    let mut out: Vec<SocketAddr> = addrs.into_iter().filter(|a| a.is_ipv4() == v4).collect();
    out.dedup();
    Ok(out)
}

impl Upstream {
    /// Whether any endpoint is a host name (not an IP literal), to be resolved again.
    pub fn has_host_names(&self) -> bool {
        self.endpoint_names
            .iter()
            .any(|e| e.parse::<SocketAddr>().is_err())
    }
}

/// The TLS settings of an upstream: its server name (the endpoints' host name unless `sni`
/// says otherwise; an IP literal needs `sni`, or pingora would skip verification) and CAs.
fn upstream_tls(p: &mut Problems, at: &str, u: &UpstreamFile) -> UpstreamTls {
    let hosts: Vec<&str> = u
        .endpoints
        .iter()
        .map(|e| e.rsplit_once(':').map_or(e.as_str(), |(h, _)| h))
        .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
        .collect();
    let sni = match &u.sni {
        Some(s) if !s.is_empty() => s.clone(),
        _ => match hosts.first() {
            Some(h) if h.parse::<IpAddr>().is_err() && hosts.iter().all(|o| o == h) => {
                (*h).to_owned()
            }
            // Unverified, the name only has to be one rustls can put in a handshake: with no
            // name at all, pingora's connector cannot connect.
            Some(h) if !u.verify => (*h).to_owned(),
            _ => {
                p.add(
                    format!("{at}.sni"),
                    "required when the endpoints are IP addresses or different hosts",
                );
                String::new()
            }
        },
    };
    let ca = u
        .ca_file
        .as_ref()
        .and_then(|f| match load_ca(Path::new(f)) {
            Ok(ca) => Some(ca),
            Err(e) => {
                p.add(format!("{at}.ca_file"), e);
                None
            }
        });
    let client = match (&u.client_cert_file, &u.client_key_file) {
        (None, None) => None,
        (Some(cert), Some(key)) => match load_client_cert(Path::new(cert), Path::new(key)) {
            Ok(ck) => Some(ck),
            Err(e) => {
                p.add(format!("{at}.client_cert_file"), e);
                None
            }
        },
        _ => {
            p.add(
                format!("{at}.client_cert_file"),
                "client_cert_file and client_key_file go together",
            );
            None
        }
    };
    UpstreamTls {
        sni,
        ca,
        verify: u.verify,
        client,
    }
}

/// A client certificate chain and key for mTLS, checked by rustls (chain parses, key matches
/// the leaf) before pingora, which panics on bad input, takes them.
fn load_client_cert(
    cert: &Path,
    key: &Path,
) -> Result<std::sync::Arc<pingora::utils::tls::CertKey>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", cert.display()));
    }
    let mut check = rustls::RootCertStore::empty();
    for c in &certs {
        check
            .add(c.clone())
            .map_err(|e| format!("{}: {e}", cert.display()))?;
    }
    let key_der =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key_der)
        .map_err(|e| format!("{}: {e}", key.display()))?;
    rustls::sign::CertifiedKey::new(certs.clone(), signing)
        .keys_match()
        .map_err(|e| format!("{}: does not match the certificate: {e}", key.display()))?;
    let raw_key = key_der.secret_der().to_vec();
    Ok(std::sync::Arc::new(pingora::utils::tls::CertKey::new(
        certs.iter().map(|c| c.as_ref().to_vec()).collect(),
        raw_key,
    )))
}

/// PEM CA certificates, each checked by rustls before pingora takes it.
fn load_ca(path: &Path) -> Result<std::sync::Arc<pingora::protocols::tls::CaType>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let ders = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if ders.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    let mut check = rustls::RootCertStore::empty();
    let mut out = Vec::with_capacity(ders.len());
    for der in ders {
        check
            .add(der.clone())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        out.push(pingora::utils::tls::WrappedX509::new(
            der.as_ref().to_vec(),
            pingora::utils::tls::parse_x509,
        ));
    }
    Ok(std::sync::Arc::from(out.into_boxed_slice()))
}

fn validate_route(p: &mut Problems, i: usize, r: &RouteFile, upstreams: &[Upstream]) -> Route {
    let at = format!("routes[{i}]");
    let path = if !r.path.starts_with('/') {
        p.add(
            format!("{at}.path"),
            format!("{:?} must start with /", r.path),
        );
        PathPattern::Exact(r.path.clone())
    } else if let Some(prefix) = r.path.strip_suffix("/*") {
        PathPattern::Prefix(format!("{prefix}/"))
    } else if r.path.contains('*') {
        p.add(
            format!("{at}.path"),
            "only a trailing \"/*\" wildcard is supported",
        );
        PathPattern::Exact(r.path.clone())
    } else {
        PathPattern::Exact(r.path.clone())
    };
    let methods = r
        .methods
        .iter()
        .enumerate()
        .filter_map(|(j, m)| {
            let upper = m.to_ascii_uppercase();
            let parsed = http::Method::from_bytes(upper.as_bytes()).ok();
            if parsed.is_none() {
                p.add(
                    format!("{at}.methods[{j}]"),
                    format!("{m:?} is not an HTTP method"),
                );
            }
            parsed
        })
        .collect();
    let upstream = upstreams
        .iter()
        .position(|u| u.name == r.upstream)
        .unwrap_or_else(|| {
            p.add(
                format!("{at}.upstream"),
                format!("no upstream named {:?}", r.upstream),
            );
            0
        });
    let auth = match &r.auth {
        None => AuthKinds::ALL,
        Some(kinds) => {
            if kinds.is_empty() {
                p.add(
                    format!("{at}.auth"),
                    "must list at least one of hmac-v1, hmac-body, bearer",
                );
            }
            AuthKinds::from_kinds(kinds.iter().enumerate().filter_map(|(j, k)| {
                let kind = AuthKind::parse(k);
                if kind.is_none() {
                    p.add(
                        format!("{at}.auth[{j}]"),
                        format!("{k:?} is not hmac-v1, hmac-body or bearer"),
                    );
                }
                kind
            }))
        }
    };
    if let Some(scope) = &r.scope {
        if !crate::keys::is_valid_scope(scope) {
            p.add(
                format!("{at}.scope"),
                format!("{scope:?} is not a scope like \"payments.create\""),
            );
        }
    }
    if r.public && (r.scope.is_some() || r.auth.is_some()) {
        p.add(
            format!("{at}.public"),
            "a public route takes no scope and no auth",
        );
    }
    for (path, msg) in crate::limits::check(&r.rate_limits) {
        p.add(format!("{at}.rate_limits{path}"), msg);
    }
    if r.public && !r.rate_limits.is_empty() {
        p.add(
            format!("{at}.rate_limits"),
            "a public route has no key to limit",
        );
    }
    if !(1..=1_000_000).contains(&r.cost) {
        p.add(format!("{at}.cost"), "must be 1 to 1000000");
    }
    let mut upgrade_websocket = false;
    for (j, proto) in r.upgrade.iter().enumerate() {
        if proto == "websocket" {
            upgrade_websocket = true;
        } else {
            p.add(
                format!("{at}.upgrade[{j}]"),
                format!("{proto:?} is not \"websocket\""),
            );
        }
    }
    if r.public && !r.upgrade.is_empty() {
        // After the upstream's 101 nothing is checked: only a verified key may open one.
        p.add(
            format!("{at}.upgrade"),
            "a public route may not set upgrade: the tunnel it opens would be unauthenticated",
        );
    }
    let limits_fail_open = match r.limits_on_store_error.as_deref() {
        None => !r.sensitive,
        Some("open") => true,
        Some("closed") => false,
        Some(other) => {
            p.add(
                format!("{at}.limits_on_store_error"),
                format!("{other:?} is not \"open\" or \"closed\""),
            );
            false
        }
    };
    Route {
        name: r.name.clone().unwrap_or_else(|| r.path.clone()),
        methods,
        path,
        scope: r.scope.clone(),
        upstream,
        auth,
        public: r.public,
        rate_limits: r.rate_limits.clone(),
        cost: r.cost,
        limits_fail_open,
        refund_on_5xx: r.refund_on_5xx,
        upgrade_websocket,
        forward_method_override: r.forward_method_override,
    }
}

#[cfg(test)]
mod tests;
