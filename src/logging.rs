//! Logging: tracing to stdout, text or JSON lines, ANSI colour only on a terminal, and a level
//! a config reload can change (unless `RUST_LOG` set it). The HTTP libraries under keygate
//! are held at `info` whatever the level: at `debug` and `trace` they print whole request
//! headers — a bearer secret, a signature, the upstream assertion.

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

use crate::config::LogConfig;

/// Changes the filter in force; set once logging is up and `RUST_LOG` does not rule.
static LEVEL: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Starts logging: `RUST_LOG` if set, else `log.level` (`info` without a config).
pub fn init(log: Option<&LogConfig>) {
    let from_env = EnvFilter::try_from_default_env().ok();
    let env_rules = from_env.is_some();
    let level = log.map_or("info", |l| l.level.as_str());
    let filter = from_env
        .or_else(|| EnvFilter::try_new(level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::stdout().is_terminal();
    let json = log.is_some_and(|l| l.json);
    let text_layer = (!json).then(|| fmt::layer().with_writer(std::io::stdout).with_ansi(ansi));
    let json_layer = json.then(|| {
        fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_writer(std::io::stdout)
            .with_ansi(false)
    });
    let started = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::filter::filter_fn(|meta| {
            *meta.level() <= tracing::Level::INFO || !prints_headers(meta.target())
        }))
        .with(text_layer)
        .with(json_layer)
        .try_init()
        .is_ok();
    if started && !env_rules {
        let _ = LEVEL.set(handle);
    }
}

/// Crates that log request or response headers, values included, below `info`.
const PRINT_HEADERS: &[&str] = &[
    "pingora",
    "h2",
    "hyper",
    "reqwest",
    "rustls",
    "tokio_rustls",
    "opentelemetry",
];

fn prints_headers(target: &str) -> bool {
    PRINT_HEADERS.iter().any(|c| {
        target
            .strip_prefix(c)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::") || rest.starts_with('_'))
    })
}

/// Applies a reloaded `log.level`; `Ok(false)` when `RUST_LOG` rules (nothing changes).
pub fn set_level(level: &str) -> Result<bool, String> {
    let Some(handle) = LEVEL.get() else {
        return Ok(false);
    };
    let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
    handle.reload(filter).map_err(|e| e.to_string())?;
    Ok(true)
}
