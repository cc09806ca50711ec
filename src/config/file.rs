//! The config file as written (SPEC §6): serde structs, unknown keys refused, named defaults.
//! Nothing here is trusted; [`super::validate`] turns it into the runtime config.

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileConfig {
    #[serde(default)]
    pub(crate) server: ServerFile,
    #[serde(default)]
    pub(crate) admin: AdminFile,
    #[serde(default)]
    pub(crate) metrics: MetricsFile,
    #[serde(default)]
    pub(crate) store: StoreFile,
    #[serde(default)]
    pub(crate) cache: CacheFile,
    #[serde(default)]
    pub(crate) signing: SigningFile,
    #[serde(default)]
    pub(crate) secrets: SecretsFile,
    #[serde(default)]
    pub(crate) assertion: AssertionFile,
    #[serde(default)]
    pub(crate) log: LogFile,
    #[serde(default)]
    pub(crate) tracing: TracingFile,
    #[serde(default)]
    pub(crate) upstreams: Vec<UpstreamFile>,
    #[serde(default)]
    pub(crate) routes: Vec<RouteFile>,
    #[serde(default)]
    pub(crate) owners: Vec<OwnerFile>,
    #[serde(default)]
    pub(crate) abuse: AbuseFile,
    #[serde(default)]
    pub(crate) limits: LimitsFile,
}

/// `[limits]`: how rate limits use a shared (Redis) store.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LimitsFile {
    /// `exact` (one store round trip per limited request) or `lease`.
    #[serde(default = "default_limits_mode")]
    pub(crate) mode: String,
    /// Share of a limit one gateway takes at a time in lease mode.
    #[serde(default = "default_lease_fraction")]
    pub(crate) lease_fraction: f64,
    /// How long a leased slice may be spent before it is given back.
    #[serde(default = "default_lease_ttl")]
    pub(crate) lease_ttl: String,
}

impl Default for LimitsFile {
    fn default() -> Self {
        Self {
            mode: default_limits_mode(),
            lease_fraction: default_lease_fraction(),
            lease_ttl: default_lease_ttl(),
        }
    }
}

fn default_limits_mode() -> String {
    "lease".into()
}
fn default_lease_fraction() -> f64 {
    0.01
}
fn default_lease_ttl() -> String {
    "250ms".into()
}

/// `[abuse]`: blocking addresses that keep failing authentication.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AbuseFile {
    #[serde(default = "default_true")]
    pub(crate) enabled: bool,
    #[serde(default = "default_max_failures")]
    pub(crate) max_failures: u32,
    #[serde(default = "default_abuse_window")]
    pub(crate) window: String,
    #[serde(default = "default_block_for")]
    pub(crate) block_for: String,
    /// Addresses never blocked (monitors); default loopback.
    #[serde(default = "default_never_block")]
    pub(crate) never_block: Vec<String>,
}

impl Default for AbuseFile {
    fn default() -> Self {
        Self {
            enabled: true,
            max_failures: default_max_failures(),
            window: default_abuse_window(),
            block_for: default_block_for(),
            never_block: default_never_block(),
        }
    }
}

fn default_max_failures() -> u32 {
    20
}
fn default_abuse_window() -> String {
    "1m".into()
}
fn default_block_for() -> String {
    "5m".into()
}
fn default_never_block() -> Vec<String> {
    vec!["127.0.0.0/8".into(), "::1/128".into()]
}

/// `[[owners]]`: limits shared by every key of one owner.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OwnerFile {
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) rate_limits: Vec<crate::limits::RateLimit>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServerFile {
    #[serde(default = "default_listen")]
    pub(crate) listen: String,
    #[serde(default = "default_threads")]
    pub(crate) threads: usize,
    #[serde(default = "default_max_body_bytes")]
    pub(crate) max_body_bytes: u64,
    #[serde(default)]
    pub(crate) trusted_proxies: Vec<String>,
    #[serde(default = "default_shutdown_grace")]
    pub(crate) shutdown_grace: String,
    /// Total time to receive a request head, counted from the connection's start or the end
    /// of its previous request.
    #[serde(default = "default_header_timeout")]
    pub(crate) header_timeout: String,
    /// Total time to receive a request body once its head is in.
    #[serde(default = "default_body_timeout")]
    pub(crate) body_timeout: String,
    /// Client connections held at once; absent: half the descriptor limit, less a reserve.
    pub(crate) max_connections: Option<u64>,
    /// TLS on the proxy listener; absent: plain HTTP.
    pub(crate) tls: Option<TlsFile>,
    /// This gateway fleet's name: the `iss` of its assertions (default "keygate").
    pub(crate) name: Option<String>,
    /// HTTP/2 without TLS (prior knowledge), for a plain listener behind a load balancer.
    #[serde(default)]
    pub(crate) h2c: bool,
    /// Where keygate writes its process id (for `keygate reload`).
    pub(crate) pid_file: Option<String>,
    /// Where a new keygate started with `--upgrade` receives the listening socket; absent:
    /// a private directory under the runtime or state directory (see `config::upgrade_sock`).
    pub(crate) upgrade_sock: Option<String>,
    /// How long `serve --upgrade` waits for the running keygate to hand its sockets over.
    #[serde(default = "default_upgrade_wait")]
    pub(crate) upgrade_wait: String,
    /// Idle keep-alive connections kept to upstreams, all endpoints together.
    #[serde(default = "default_upstream_pool_size")]
    pub(crate) upstream_pool_size: usize,
    /// A config without `[[routes]]` is refused unless this says it is meant: an empty or
    /// cut-short file would otherwise answer every request `no_route`.
    #[serde(default)]
    pub(crate) allow_no_routes: bool,
}

fn default_upstream_pool_size() -> usize {
    128
}

/// `[server.tls]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsFile {
    pub(crate) cert_file: String,
    pub(crate) key_file: String,
    /// PEM CA certificates: ask clients for a certificate and verify it against these.
    pub(crate) client_ca_file: Option<String>,
    /// SPEC §8 spells `h2c` here; accepted, with the same meaning as `server.h2c`.
    #[serde(default)]
    pub(crate) h2c: bool,
}

impl Default for ServerFile {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            threads: default_threads(),
            max_body_bytes: default_max_body_bytes(),
            trusted_proxies: Vec::new(),
            shutdown_grace: default_shutdown_grace(),
            header_timeout: default_header_timeout(),
            body_timeout: default_body_timeout(),
            max_connections: None,
            tls: None,
            name: None,
            h2c: false,
            pid_file: None,
            upstream_pool_size: default_upstream_pool_size(),
            upgrade_sock: None,
            upgrade_wait: default_upgrade_wait(),
            allow_no_routes: false,
        }
    }
}

fn default_header_timeout() -> String {
    "10s".into()
}
fn default_body_timeout() -> String {
    "30s".into()
}

fn default_listen() -> String {
    "0.0.0.0:8080".into()
}
fn default_threads() -> usize {
    2
}
fn default_max_body_bytes() -> u64 {
    1024 * 1024
}
fn default_shutdown_grace() -> String {
    "10s".into()
}
fn default_upgrade_wait() -> String {
    "60s".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AdminFile {
    #[serde(default = "default_admin_listen")]
    pub(crate) listen: String,
    #[serde(default)]
    pub(crate) token_sha256: Vec<String>,
    /// A file holding one admin token (mode 0600), instead of `KEYGATE_ADMIN_TOKEN`.
    pub(crate) token_file: Option<String>,
    /// TLS on the admin listener.
    pub(crate) tls: Option<TlsFile>,
}

impl Default for AdminFile {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            token_sha256: Vec::new(),
            token_file: None,
            tls: None,
        }
    }
}

fn default_admin_listen() -> String {
    "127.0.0.1:9901".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MetricsFile {
    #[serde(default = "default_metrics_listen")]
    pub(crate) listen: String,
    /// TLS on the metrics listener.
    pub(crate) tls: Option<TlsFile>,
}

impl Default for MetricsFile {
    fn default() -> Self {
        Self {
            listen: default_metrics_listen(),
            tls: None,
        }
    }
}

fn default_metrics_listen() -> String {
    "127.0.0.1:9902".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StoreFile {
    #[serde(default = "default_store_kind")]
    pub(crate) kind: String,
    #[serde(default = "default_store_path")]
    pub(crate) path: String,
    /// One URL, or several for a cluster.
    pub(crate) url: Option<UrlOrList>,
    /// keygate extension (README): PEM CA certificates for `rediss://`, instead of the system's.
    pub(crate) tls_ca_file: Option<String>,
    /// keygate extension (README): what a nonce check does when the store cannot be reached.
    #[serde(default = "default_nonce_fallback")]
    pub(crate) nonce_fallback: String,
    /// Redis Sentinel (SPEC §9): the sentinels' `host:port`, instead of `url`.
    pub(crate) sentinels: Option<Vec<String>>,
    /// The name the sentinels monitor.
    pub(crate) sentinel_master: Option<String>,
    /// The data nodes' password (mode 0600), with `sentinels`.
    pub(crate) password_file: Option<String>,
    /// The sentinels' password (mode 0600).
    pub(crate) sentinel_password_file: Option<String>,
    /// SPEC §9: `async` or `replicated` (a replica acknowledges each nonce).
    #[serde(default = "default_nonce_durability")]
    pub(crate) nonce_durability: String,
    /// SPEC §9: how long `replicated` waits for a replica.
    #[serde(default = "default_replication_timeout")]
    pub(crate) replication_timeout: String,
}

fn default_nonce_durability() -> String {
    "async".into()
}

fn default_replication_timeout() -> String {
    "50ms".into()
}

fn default_nonce_fallback() -> String {
    "refuse".into()
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum UrlOrList {
    One(String),
    Many(Vec<String>),
}

impl Default for StoreFile {
    fn default() -> Self {
        Self {
            kind: default_store_kind(),
            path: default_store_path(),
            url: None,
            tls_ca_file: None,
            nonce_fallback: default_nonce_fallback(),
            sentinels: None,
            sentinel_master: None,
            password_file: None,
            sentinel_password_file: None,
            nonce_durability: default_nonce_durability(),
            replication_timeout: default_replication_timeout(),
        }
    }
}

fn default_store_kind() -> String {
    "embedded".into()
}
fn default_store_path() -> String {
    "data/keygate.db".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CacheFile {
    #[serde(default = "default_capacity")]
    pub(crate) capacity: u64,
    #[serde(default = "default_ttl")]
    pub(crate) ttl: String,
    #[serde(default = "default_negative_ttl")]
    pub(crate) negative_ttl: String,
    #[serde(default = "default_stale_if_error")]
    pub(crate) stale_if_error: String,
}

impl Default for CacheFile {
    fn default() -> Self {
        Self {
            capacity: default_capacity(),
            ttl: default_ttl(),
            negative_ttl: default_negative_ttl(),
            stale_if_error: default_stale_if_error(),
        }
    }
}

fn default_capacity() -> u64 {
    100_000
}
fn default_ttl() -> String {
    "30s".into()
}
fn default_negative_ttl() -> String {
    "5s".into()
}
fn default_stale_if_error() -> String {
    "10m".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SigningFile {
    #[serde(default = "default_clock_skew")]
    pub(crate) clock_skew: String,
    #[serde(default = "default_body_nonce_retention")]
    pub(crate) body_nonce_retention: String,
}

impl Default for SigningFile {
    fn default() -> Self {
        Self {
            clock_skew: default_clock_skew(),
            body_nonce_retention: default_body_nonce_retention(),
        }
    }
}

fn default_clock_skew() -> String {
    "300s".into()
}
fn default_body_nonce_retention() -> String {
    "24h".into()
}

/// `[log]`: where and how keygate says what it does.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogFile {
    /// `text` or `json` (one object per line).
    #[serde(default = "default_log_format")]
    pub(crate) format: String,
    /// A tracing filter (`info`, `warn,keygate=debug`); `RUST_LOG` overrides it.
    #[serde(default = "default_log_level")]
    pub(crate) level: String,
    /// One line per request (`keygate::access`).
    #[serde(default = "default_true")]
    pub(crate) access: bool,
}

impl Default for LogFile {
    fn default() -> Self {
        Self {
            format: default_log_format(),
            level: default_log_level(),
            access: true,
        }
    }
}

fn default_log_format() -> String {
    "text".into()
}
fn default_log_level() -> String {
    "info".into()
}

/// `[tracing]`: OpenTelemetry span export, off unless an endpoint is set.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TracingFile {
    /// The collector's OTLP/HTTP traces URL, whole (`http://collector:4318/v1/traces`).
    pub(crate) otlp_endpoint: Option<String>,
    /// How long one export may take before its spans are dropped.
    #[serde(default = "default_otlp_timeout")]
    pub(crate) otlp_timeout: String,
    /// Share of the traces keygate starts that are exported; a client's sampled flag rules
    /// for the traces it starts.
    #[serde(default = "default_sample_ratio")]
    pub(crate) sample_ratio: f64,
}

impl Default for TracingFile {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            otlp_timeout: default_otlp_timeout(),
            sample_ratio: default_sample_ratio(),
        }
    }
}

fn default_otlp_timeout() -> String {
    "10s".into()
}
fn default_sample_ratio() -> f64 {
    1.0
}

/// `[assertion]`: the upstream identity assertion, fleet-wide settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AssertionFile {
    /// `exp - iat` of every assertion.
    #[serde(default = "default_assertion_ttl")]
    pub(crate) ttl: String,
    /// How often the signing keys are re-read from the store (rotations reach the fleet).
    #[serde(default = "default_assertion_refresh")]
    pub(crate) refresh_interval: String,
    /// Also answer `GET /.well-known/jwks.json` on the proxy listener.
    #[serde(default)]
    pub(crate) jwks_on_proxy: bool,
}

impl Default for AssertionFile {
    fn default() -> Self {
        Self {
            ttl: default_assertion_ttl(),
            refresh_interval: default_assertion_refresh(),
            jwks_on_proxy: false,
        }
    }
}

fn default_assertion_ttl() -> String {
    "60s".into()
}
fn default_assertion_refresh() -> String {
    "10s".into()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SecretsFile {
    pub(crate) master_key_file: Option<String>,
    pub(crate) previous_master_key_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpstreamFile {
    pub(crate) name: String,
    pub(crate) endpoints: Vec<String>,
    #[serde(default)]
    pub(crate) tls: bool,
    /// TLS server name; default: the endpoints' host name.
    pub(crate) sni: Option<String>,
    /// PEM CA certificates to trust instead of the system's.
    pub(crate) ca_file: Option<String>,
    /// `false` skips certificate verification (warned about at start).
    #[serde(default = "default_true")]
    pub(crate) verify: bool,
    /// A client certificate chain (PEM) for mTLS to the upstream, with its key.
    pub(crate) client_cert_file: Option<String>,
    pub(crate) client_key_file: Option<String>,
    #[serde(default)]
    pub(crate) forward_credentials: bool,
    /// `ed25519` (default), `hs256` or `off`.
    #[serde(default = "default_assertion")]
    pub(crate) assertion: String,
    /// With `assertion = "hs256"`: a file (mode 0600) holding the shared secret.
    pub(crate) assertion_secret_file: Option<String>,
    /// `round_robin` (default) or `least_connections`.
    #[serde(default = "default_balance")]
    pub(crate) balance: String,
    /// Active health checks; absent: passive failure counting only.
    pub(crate) health_check: Option<HealthCheckFile>,
    /// How often host names among the endpoints are resolved again.
    #[serde(default = "default_resolve_interval")]
    pub(crate) resolve_interval: String,
    /// keygate extension (README): TCP connect timeout.
    #[serde(default = "default_connect_timeout")]
    pub(crate) connect_timeout: String,
    /// keygate extension (README): how long to wait for each read of the response.
    #[serde(default = "default_read_timeout")]
    pub(crate) read_timeout: String,
}

/// `health_check = { path, interval, unhealthy_after, healthy_after, timeout }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HealthCheckFile {
    pub(crate) path: String,
    #[serde(default = "default_hc_interval")]
    pub(crate) interval: String,
    #[serde(default = "default_unhealthy_after")]
    pub(crate) unhealthy_after: u32,
    #[serde(default = "default_healthy_after")]
    pub(crate) healthy_after: u32,
    #[serde(default = "default_hc_timeout")]
    pub(crate) timeout: String,
}

fn default_balance() -> String {
    "round_robin".into()
}
fn default_hc_interval() -> String {
    "5s".into()
}
fn default_unhealthy_after() -> u32 {
    3
}
fn default_healthy_after() -> u32 {
    2
}
fn default_hc_timeout() -> String {
    "2s".into()
}

fn default_resolve_interval() -> String {
    "30s".into()
}

fn default_assertion() -> String {
    "ed25519".into()
}

fn default_true() -> bool {
    true
}

fn default_connect_timeout() -> String {
    "5s".into()
}
fn default_read_timeout() -> String {
    "30s".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RouteFile {
    pub(crate) name: Option<String>,
    #[serde(default)]
    pub(crate) methods: Vec<String>,
    pub(crate) path: String,
    pub(crate) scope: Option<String>,
    pub(crate) upstream: String,
    pub(crate) auth: Option<Vec<String>>,
    #[serde(default)]
    pub(crate) public: bool,
    /// Limits for keys that carry none of their own.
    #[serde(default)]
    pub(crate) rate_limits: Vec<crate::limits::RateLimit>,
    /// Units a request spends of each limit.
    #[serde(default = "default_cost")]
    pub(crate) cost: u64,
    /// Money moves here: limits fail closed when their state cannot be reached.
    #[serde(default)]
    pub(crate) sensitive: bool,
    /// `open` or `closed`; default `closed` when `sensitive`, else `open`.
    pub(crate) limits_on_store_error: Option<String>,
    /// Give a metered key its credits back when the upstream answers 5xx (or fails).
    #[serde(default)]
    pub(crate) refund_on_5xx: bool,
    /// Protocols a request may switch the connection to (`Upgrade`); only `"websocket"`.
    #[serde(default)]
    pub(crate) upgrade: Vec<String>,
    /// Forward `X-HTTP-Method-Override` and the other method and URL override headers.
    #[serde(default)]
    pub(crate) forward_method_override: bool,
}

fn default_cost() -> u64 {
    1
}
