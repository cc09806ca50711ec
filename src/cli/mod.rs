//! The command line: every subcommand's arguments (clap) and the dispatch to its module.
//! `main.rs` only calls [`main`].

pub mod assertion;
pub mod demo;
mod health;
pub mod keys;
mod secrets;
mod serve;
pub mod sign;
mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use keys::{KeyFields, KeysCommand};

/// Exit code for a bad config or command line (sysexits EX_USAGE).
pub const EX_USAGE: u8 = 64;
/// Exit code when the gateway cannot start (EX_SOFTWARE would mislead; EX_UNAVAILABLE).
pub const EX_UNAVAILABLE: u8 = 69;
/// Exit code when the gateway refused what it was given: `keygate reload` of a file the
/// running gateway will not apply (sysexits EX_DATAERR, as the `keys` commands' refusals).
pub const EX_DATAERR: u8 = 65;
/// Exit code of `serve --upgrade` when no running keygate handed its listening socket over
/// within `server.upgrade_wait` (sysexits EX_TEMPFAIL: nothing changed, try again).
pub const EX_TEMPFAIL: u8 = 75;

#[derive(Parser)]
#[command(
    name = "keygate",
    version,
    about = "Authenticating reverse proxy for payment APIs"
)]
pub struct Cli {
    /// Config file; with no subcommand, runs the gateway with it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve {
        /// Zero-downtime binary upgrade: receive the listening proxy socket from the running
        /// keygate (over server.upgrade_sock), which is then told to stop with SIGQUIT.
        /// Waits up to server.upgrade_wait for it; exit 75 when nothing was handed over.
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate a config file; print every problem with its key path; exit 64 on error.
    CheckConfig {
        file: PathBuf,
        /// Check upstream host names for shape only, without looking them up, and do not read
        /// the secret files the config names: a config for another machine or network (a
        /// container, a cluster) whose names do not resolve and whose secrets are not here.
        #[arg(long)]
        offline: bool,
    },
    /// Zero-setup quickstart: embedded store, echo upstream, one demo key.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin_listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:9902")]
        metrics_listen: SocketAddr,
    },
    /// Manage keys through the admin API (token from KEYGATE_ADMIN_TOKEN).
    Keys {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        command: KeysCmd,
    },
    /// The keys that sign x-keygate-assertion, through the admin API (token from
    /// KEYGATE_ADMIN_TOKEN).
    Assertion {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        command: AssertionCmd,
    },
    /// Work on key stores directly (no running gateway needed).
    Store {
        #[command(subcommand)]
        command: StoreCmd,
    },
    /// Master-key rotation, on the --config store directly.
    Secrets {
        #[command(subcommand)]
        command: SecretsCmd,
    },
    /// Print the signature headers for a request.
    Sign(sign::SignArgs),
    /// GET a health endpoint (default the admin listener's /healthz): exit 0 on 2xx, else 1.
    /// For container HEALTHCHECKs; images need no curl. With --config and no --url, the
    /// admin listener's /healthz as that config has it (https under [admin.tls], on loopback
    /// when it listens on every address).
    Health {
        /// Default: from --config, else http://127.0.0.1:9901/healthz.
        #[arg(long)]
        url: Option<String>,
        /// PEM CA certificates to trust for an https:// URL, besides the system's.
        #[arg(long, env = "KEYGATE_ADMIN_CA_FILE")]
        ca_file: Option<PathBuf>,
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Make the running gateway read its config again: checks the file, sends SIGHUP to the
    /// pid in its server.pid_file, and waits for the gateway's answer
    /// (keygate_config_reloads_total on the file's metrics listener). Exit 0 reloaded, 65 the
    /// gateway refused the file (its log says why), 69 no answer, 64 the file check failed.
    Reload,
}

/// How `keys` and `assertion` reach the admin API.
#[derive(clap::Args, Debug, Clone)]
pub struct AdminArgs {
    /// The admin listener (https:// with [admin.tls]).
    #[arg(long, default_value = "http://127.0.0.1:9901", global = true)]
    admin_url: String,
    /// PEM CA certificates to trust for an https:// admin URL, besides the system's.
    #[arg(long, env = "KEYGATE_ADMIN_CA_FILE", global = true)]
    ca_file: Option<PathBuf>,
    /// Print the server's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
pub enum AssertionCmd {
    /// Each signing key's id, state (next, active, retiring) and dates.
    Keys,
    /// Add a new signing key. It is published in the JWKS at once and signs after
    /// --publish-ahead, so verifiers caching the JWKS know it first; the current key stays
    /// published until the assertions it signed have expired.
    Rotate {
        /// e.g. 10m, 0s.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        publish_ahead: std::time::Duration,
    },
}

#[derive(Subcommand)]
pub enum StoreCmd {
    /// Copy every key (sealed secrets unchanged), audit entry and live nonce of an embedded
    /// store into a Redis store. Safe to re-run: nothing is copied twice, and keys already in
    /// the target are left as they are.
    Copy {
        /// The embedded store file (stop the gateway using it first).
        #[arg(long)]
        from: PathBuf,
        /// redis://, rediss:// or redis+cluster:// URL (password in the URL).
        #[arg(long)]
        to: String,
        /// PEM CA certificates to trust for rediss:// instead of the system's.
        #[arg(long)]
        tls_ca_file: Option<PathBuf>,
    },
    /// Write the --config store (keys with sealed secrets, audit, usage, credits, the
    /// assertion keyring) to a new file, mode 0600. An embedded store must not be open in a
    /// running gateway; Redis can be backed up while the fleet serves.
    Backup {
        #[arg(long)]
        to: PathBuf,
    },
    /// Load a backup into the --config store. The whole file is checked first; keys already
    /// in the store are kept as they are, so a stopped restore can be run again.
    Restore {
        #[arg(long)]
        from: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum SecretsCmd {
    /// How many secrets are sealed under which master key id (and which ids the --config
    /// loads).
    Status,
    /// Re-seal every secret under a new master key while the fleet serves: start every
    /// gateway with the new key as secrets.master_key_file and the old one as
    /// secrets.previous_master_key_file first. Resumable and idempotent.
    Reseal {
        /// The new master key (base64 of 32 bytes, mode 0600). Default: the systemd
        /// credential `new-master-key` (systemd-run -p LoadCredential=new-master-key:FILE).
        #[arg(long)]
        new_master_key_file: Option<PathBuf>,
    },
}

/// Fields shared by `keys create`, `keys import` and `keys update`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct FieldArgs {
    #[arg(long)]
    owner: Option<String>,
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    description: Option<String>,
    /// Repeat for several scopes.
    #[arg(long = "scope")]
    scopes: Vec<String>,
    /// An address or CIDR; repeat for several.
    #[arg(long = "ip")]
    ip_allow_list: Vec<String>,
    /// RFC 3339, e.g. 2027-01-31T00:00:00Z.
    #[arg(long)]
    expires_at: Option<String>,
    /// live or test.
    #[arg(long)]
    environment: Option<String>,
    /// hmac-v1, hmac-body or bearer.
    #[arg(long)]
    auth: Option<String>,
    /// key=value; repeat for several.
    #[arg(long = "metadata")]
    metadata: Vec<String>,
    /// Bind the key to a TLS client certificate: its SHA-256 fingerprint (hex, colons allowed).
    #[arg(long)]
    tls_client_cert_sha256: Option<String>,
    /// A rate limit, name=limit/window (burst=100/1s, daily=50000/1d); repeat for several.
    #[arg(long = "rate-limit")]
    rate_limits: Vec<String>,
    /// Meter the key: it starts with this many credits, each request spending its route's cost.
    #[arg(long)]
    remaining: Option<u64>,
    /// Set remaining back to N every UTC day or month: daily:N or monthly:N.
    #[arg(long)]
    refill: Option<String>,
}

impl From<FieldArgs> for KeyFields {
    fn from(a: FieldArgs) -> Self {
        Self {
            owner: a.owner,
            name: a.name,
            description: a.description,
            scopes: a.scopes,
            ip_allow_list: a.ip_allow_list,
            expires_at: a.expires_at,
            environment: a.environment,
            auth: a.auth,
            metadata: a.metadata,
            tls_client_cert_sha256: a.tls_client_cert_sha256,
            rate_limits: a.rate_limits,
            remaining: a.remaining,
            refill: a.refill,
        }
    }
}

#[derive(Subcommand)]
pub enum KeysCmd {
    /// Mint a key; its secret is printed once.
    Create(FieldArgs),
    /// Bring an existing key pair from another system.
    Import {
        #[arg(long)]
        public_key: String,
        /// The secret as the other system issued it (or KEYGATE_SECRET).
        #[arg(long, env = "KEYGATE_SECRET", hide_env_values = true)]
        secret: String,
        #[command(flatten)]
        fields: FieldArgs,
    },
    /// List keys, newest first.
    List {
        #[arg(long)]
        owner: Option<String>,
        #[arg(long)]
        environment: Option<String>,
        /// active, revoked or expired.
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        limit: Option<u32>,
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Show one key (by id or public key).
    Get { id: String },
    /// Change name, description, scopes, allow-list, expiry or metadata.
    Update {
        id: String,
        #[command(flatten)]
        fields: FieldArgs,
        #[arg(long)]
        clear_description: bool,
        #[arg(long)]
        clear_expires_at: bool,
        /// Unbind the key from its TLS client certificate.
        #[arg(long)]
        clear_tls_client_cert: bool,
        /// Drop the key's own rate limits (its routes' defaults apply again).
        #[arg(long)]
        clear_rate_limits: bool,
        /// Stop metering the key (its credits and refill go).
        #[arg(long)]
        clear_remaining: bool,
    },
    /// Add to or set a metered key's credits, atomically.
    Credits {
        id: String,
        #[arg(long, conflicts_with = "set")]
        add: Option<u64>,
        #[arg(long)]
        set: Option<u64>,
    },
    /// Give a key a new secret; the old one keeps working for --grace-seconds.
    Rotate {
        id: String,
        #[arg(long, default_value_t = 0)]
        grace_seconds: u64,
    },
    /// Refuse a key from now on.
    Revoke { id: String },
    /// Remove a key.
    Delete { id: String },
}

impl From<KeysCmd> for KeysCommand {
    fn from(c: KeysCmd) -> Self {
        match c {
            KeysCmd::Create(f) => Self::Create(f.into()),
            KeysCmd::Import {
                public_key,
                secret,
                fields,
            } => Self::Import {
                public_key,
                secret,
                fields: fields.into(),
            },
            KeysCmd::List {
                owner,
                environment,
                status,
                limit,
                cursor,
            } => Self::List {
                owner,
                environment,
                status,
                limit,
                cursor,
            },
            KeysCmd::Get { id } => Self::Get { id },
            KeysCmd::Update {
                id,
                fields,
                clear_description,
                clear_expires_at,
                clear_tls_client_cert,
                clear_rate_limits,
                clear_remaining,
            } => Self::Update {
                id,
                fields: fields.into(),
                clear_description,
                clear_expires_at,
                clear_tls_client_cert,
                clear_rate_limits,
                clear_remaining,
            },
            KeysCmd::Credits { id, add, set } => Self::Credits { id, add, set },
            KeysCmd::Rotate { id, grace_seconds } => Self::Rotate { id, grace_seconds },
            KeysCmd::Revoke { id } => Self::Revoke { id },
            KeysCmd::Delete { id } => Self::Delete { id },
        }
    }
}

/// An HTTP client builder that also trusts the PEM CA certificates of `--ca-file`.
/// Where a probe on this host reaches a listener bound to `listen`: loopback for an
/// unspecified address (0.0.0.0, [::]), the address itself otherwise.
fn reachable(listen: std::net::SocketAddr) -> std::net::SocketAddr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    std::net::SocketAddr::new(ip, listen.port())
}

fn client_trusting(ca_file: Option<&std::path::Path>) -> Result<reqwest::ClientBuilder, String> {
    let builder = reqwest::Client::builder();
    let Some(ca) = ca_file else {
        return Ok(builder);
    };
    let shown = |e: &dyn std::fmt::Display| format!("--ca-file {}: {e}", ca.display());
    let pem = std::fs::read(ca).map_err(|e| shown(&e))?;
    let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| shown(&e))?;
    Ok(builder.add_root_certificate(cert))
}

/// Runs `f` with the config named by `--config`, which `what` needs.
fn with_config(
    path: Option<PathBuf>,
    what: &str,
    f: impl FnOnce(&crate::Config) -> ExitCode,
) -> ExitCode {
    let Some(path) = path else {
        eprintln!("keygate {what}: --config FILE is required (its [store] is the one used)");
        return ExitCode::from(EX_USAGE);
    };
    match serve::load(&path) {
        Ok(config) => f(&config),
        Err(code) => code,
    }
}

/// Parses the command line and runs the subcommand; the process's exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not errors; anything else is a usage error (64).
            return if e.use_stderr() {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        None | Some(Command::Serve { .. }) => {
            let upgrade = matches!(cli.command, Some(Command::Serve { upgrade: true }));
            let Some(path) = cli.config else {
                eprintln!("keygate: --config FILE is required (or try `keygate demo`)");
                return ExitCode::from(EX_USAGE);
            };
            serve::serve(&path, upgrade)
        }
        Some(Command::Store {
            command:
                StoreCmd::Copy {
                    from,
                    to,
                    tls_ca_file,
                },
        }) => store::copy(&from, &to, tls_ca_file.as_deref()),
        Some(Command::Store {
            command: StoreCmd::Backup { to },
        }) => with_config(cli.config, "store backup", |c| store::backup(c, &to)),
        Some(Command::Store {
            command: StoreCmd::Restore { from },
        }) => with_config(cli.config, "store restore", |c| store::restore(c, &from)),
        Some(Command::Secrets { command }) => {
            with_config(cli.config, "secrets", |c| secrets::run(c, &command))
        }
        Some(Command::CheckConfig { file, offline }) => serve::check_config(
            &file,
            if offline {
                crate::config::Lookup::ShapeOnly
            } else {
                crate::config::Lookup::Now
            },
            offline,
        ),
        Some(Command::Demo {
            listen,
            admin_listen,
            metrics_listen,
        }) => {
            crate::logging::init(None);
            let opts = demo::DemoOptions {
                listen,
                admin_listen,
                metrics_listen,
            };
            match demo::run(&opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("keygate demo: {e}");
                    ExitCode::from(EX_UNAVAILABLE)
                }
            }
        }
        Some(Command::Keys { admin, command }) => {
            keys::run_command(&admin.admin_url, admin.ca_file, admin.json, &command.into())
        }
        Some(Command::Sign(args)) => sign::run(args),
        Some(Command::Health {
            url,
            ca_file,
            timeout,
        }) => {
            let target = match (url, cli.config) {
                (Some(url), _) => health::Target {
                    url,
                    skip_verify: false,
                },
                (None, Some(config)) => match health::target_of(&config, ca_file.as_deref()) {
                    Ok(t) => t,
                    Err(e) => {
                        eprintln!("keygate health: {e}");
                        return ExitCode::from(1);
                    }
                },
                (None, None) => health::Target {
                    url: "http://127.0.0.1:9901/healthz".to_owned(),
                    skip_verify: false,
                },
            };
            health::run(&target, ca_file.as_deref(), timeout)
        }
        Some(Command::Reload) => {
            let Some(path) = cli.config else {
                eprintln!("keygate reload: --config FILE is required (its server.pid_file names the gateway)");
                return ExitCode::from(EX_USAGE);
            };
            serve::reload(&path)
        }
        Some(Command::Assertion { admin, command }) => {
            let AdminArgs {
                admin_url,
                ca_file,
                json,
            } = admin;
            let cmd = match command {
                AssertionCmd::Keys => assertion::AssertionCommand::Keys,
                AssertionCmd::Rotate { publish_ahead } => {
                    assertion::AssertionCommand::Rotate { publish_ahead }
                }
            };
            keys::with_admin_token("assertion", |token| async move {
                let admin = keys::Admin {
                    url: admin_url,
                    token,
                    ca_file,
                };
                assertion::run(cmd, &admin, json).await
            })
        }
    }
}
