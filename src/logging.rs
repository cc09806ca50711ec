//! Logging: tracing to stdout, text or JSON lines, ANSI colour only on a terminal, and a level
//! a config reload can change (unless `RUST_LOG` set it). The HTTP libraries under keygate
//! are held at `info` whatever the level: at `debug` and `trace` they print whole request
//! headers — a bearer secret, a signature, the upstream assertion. Lines logged through the
//! `log` crate (pingora's, at every level) have any query string cut before they are written:
//! pingora prints request targets, and a payment API's query can hold a card number or a token.

use std::borrow::Cow;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
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
    let subscriber = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::filter::filter_fn(|meta| {
            *meta.level() <= tracing::Level::INFO || !prints_headers(meta.target())
        }))
        .with(text_layer)
        .with(json_layer);
    // Not `try_init`: that would install tracing-log's own bridge, which passes pingora's
    // request targets through whole.
    let started = tracing::subscriber::set_global_default(subscriber).is_ok()
        && log::set_boxed_logger(Box::new(RedactingBridge)).is_ok();
    if started {
        // Every level reaches the bridge, which asks the (reloadable) filter about each.
        log::set_max_level(log::LevelFilter::Trace);
    }
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

/// Forwards `log` records to tracing as tracing-log's `LogTracer` does, with every query
/// string redacted: pingora's error lines (`Fail to proxy: … GET /v1/x?pan=…`) carry the
/// request target, in messages keygate does not write and a future pingora may add to.
struct RedactingBridge;

impl log::Log for RedactingBridge {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        use tracing_log::AsTrace;
        metadata.level().as_trace() <= tracing::level_filters::LevelFilter::current()
            && tracing::dispatcher::get_default(|d| d.enabled(&metadata.as_trace()))
    }

    fn log(&self, record: &log::Record<'_>) {
        // The level may depend on the text (a client-caused pingora ERROR): format once, and
        // only when the record could be written at its own level.
        if !self.enabled(record.metadata()) {
            return;
        }
        let text = record.args().to_string();
        let metadata = log::Metadata::builder()
            .level(level_of(record.metadata(), &text))
            .target(record.target())
            .build();
        if !self.enabled(&metadata) {
            return;
        }
        let redacted = redact_queries(&text);
        // No file, line or module path: a dependency's file is a build-machine path
        // (`/root/.cargo/registry/src/…`), noise to an operator; the target names the place.
        let _ = tracing_log::format_trace(
            &log::Record::builder()
                .args(format_args!("{redacted}"))
                .metadata(metadata)
                .build(),
        );
    }

    fn flush(&self) {}
}

/// A log line that any client (or an outage, request by request) can cause, written at most
/// once a minute with a count of the occurrences it stands for.
#[derive(Debug, Default)]
pub(crate) struct QuietLog {
    /// Seconds since the Unix epoch of the last line written (0: never).
    last: AtomicU64,
    /// Occurrences since the last line written.
    since: AtomicU64,
}

impl QuietLog {
    const EVERY_SECS: u64 = 60;

    /// Counts one occurrence; `Some(occurrences since the last line)` when a line is due.
    pub(crate) fn due(&self) -> Option<u64> {
        self.since.fetch_add(1, Ordering::Relaxed);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < Self::EVERY_SECS {
            return None;
        }
        // One caller wins the minute; the others only count.
        self.last
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .ok()?;
        Some(self.since.swap(0, Ordering::Relaxed))
    }
}

/// The level a record is written at: ERROR is for what an operator must act on, so what any
/// client can cause goes to debug. rustls warns about what a peer sent — an IP address as SNI,
/// an unexpected message — once per handshake (failed handshakes are counted and logged once
/// a minute by the proxy's guard). pingora logs at ERROR a client that closed its connection or
/// stalled before its request was read (`Fail to proxy: Downstream …`) and a problem response
/// it could not write to a client already gone.
fn level_of(metadata: &log::Metadata<'_>, text: &str) -> log::Level {
    let target = metadata.target();
    let from_rustls = target == "rustls" || target.starts_with("rustls::");
    let from_pingora = target.starts_with("pingora");
    let client_caused = text.starts_with("Fail to proxy: Downstream")
        || text.starts_with("failed to send error response to downstream");
    // A failed upgrade hand-over: pingora's line repeats what keygate's own ERROR
    // (`upgrade hand-over failed … still serving`) says next.
    let handover_retries = text.starts_with("Max retry: ") && text.contains("sending socket");
    if from_rustls && metadata.level() == log::Level::Warn
        || from_pingora && metadata.level() <= log::Level::Warn && client_caused
    {
        log::Level::Debug
    } else if from_pingora && handover_retries {
        log::Level::Warn
    } else {
        metadata.level()
    }
}

/// `text` with whatever follows each `?` up to the next whitespace replaced by `[redacted]`:
/// a request target's query ends at whitespace, since HTTP allows none in a target. A trailing
/// comma is kept (pingora's summaries go on with `, Host: …`).
pub(crate) fn redact_queries(text: &str) -> Cow<'_, str> {
    if !text.contains('?') {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('?') {
        out.push_str(&rest[..=at]);
        let after = &rest[at + 1..];
        let end = after.find(char::is_whitespace).unwrap_or(after.len());
        let query = &after[..end];
        let kept = if query.ends_with(',') { "," } else { "" };
        if query.len() > kept.len() {
            out.push_str("[redacted]");
        }
        out.push_str(kept);
        rest = &after[end..];
    }
    out.push_str(rest);
    Cow::Owned(out)
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::{redact_queries, RedactingBridge};

    #[test]
    fn a_quiet_log_writes_once_and_counts_the_rest() {
        let log = super::QuietLog::default();
        assert_eq!(log.due(), Some(1));
        for _ in 0..99 {
            assert_eq!(log.due(), None);
        }
        // A minute later the next line carries the 99 it stood for, plus itself.
        log.last.fetch_sub(
            super::QuietLog::EVERY_SECS,
            std::sync::atomic::Ordering::Relaxed,
        );
        assert_eq!(log.due(), Some(100));
    }

    #[test]
    fn queries_are_cut_and_the_rest_kept() {
        let line = "Fail to proxy: Upstream ConnectRefused, status: 502, tries: 1, retry: false, \
                    GET /v1/x?pan=4111111111111111&token=t0k, Host: gw";
        assert_eq!(
            redact_queries(line),
            "Fail to proxy: Upstream ConnectRefused, status: 502, tries: 1, retry: false, \
             GET /v1/x?[redacted], Host: gw"
        );
        assert_eq!(
            redact_queries("a ?b ?c\td?"),
            "a ?[redacted] ?[redacted]\td?"
        );
        assert_eq!(redact_queries("is it? yes"), "is it? yes");
        assert_eq!(redact_queries("GET /x?,"), "GET /x?,");
        assert!(matches!(
            redact_queries("no query"),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn what_a_peer_makes_rustls_warn_about_goes_to_debug() {
        let meta = |target, level| log::Metadata::builder().target(target).level(level).build();
        let level = |target, level| super::level_of(&meta(target, level), "a warning");
        assert_eq!(
            level("rustls::msgs::handshake", log::Level::Warn),
            log::Level::Debug
        );
        assert_eq!(level("rustls", log::Level::Warn), log::Level::Debug);
        assert_eq!(level("rustls::conn", log::Level::Error), log::Level::Error);
        assert_eq!(level("rustls_pemfile", log::Level::Warn), log::Level::Warn);
        assert_eq!(level("pingora_proxy", log::Level::Warn), log::Level::Warn);
    }

    /// pingora's ERROR lines for a client that went away become debug; its other ERRORs stay.
    #[test]
    fn what_a_client_makes_pingora_log_at_error_goes_to_debug() {
        let meta = |level| {
            log::Metadata::builder()
                .target("pingora_proxy")
                .level(level)
                .build()
        };
        let gone = "Fail to proxy: Downstream ReadError context: while reading request headers \
                    cause: Connection reset by peer, downstream session type: HTTP/1";
        assert_eq!(
            super::level_of(&meta(log::Level::Error), gone),
            log::Level::Debug
        );
        assert_eq!(
            super::level_of(
                &meta(log::Level::Error),
                "failed to send error response to downstream: Downstream WriteError"
            ),
            log::Level::Debug
        );
        let upstream = "Fail to proxy: Upstream ConnectRefused context: 127.0.0.1:9";
        assert_eq!(
            super::level_of(&meta(log::Level::Error), upstream),
            log::Level::Error
        );
        assert_eq!(
            super::level_of(
                &log::Metadata::builder()
                    .target("pingora_core::server::transfer_fd")
                    .level(log::Level::Error)
                    .build(),
                "Max retry: 5 reached. Giving up sending socket to: /run/keygate/upgrade.sock"
            ),
            log::Level::Warn
        );
        let other = log::Metadata::builder()
            .target("keygate::proxy")
            .level(log::Level::Error)
            .build();
        assert_eq!(super::level_of(&other, gone), log::Level::Error);
    }

    /// A pingora line through the bridge, into a subscriber writing to a buffer: the query is
    /// gone, the rest of the line and its target are there.
    #[test]
    fn the_bridge_redacts_what_pingora_logs() {
        use log::Log as _;
        let out = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = Arc::clone(&out);
        // As `init` writes JSON lines, which carry what the bridge passes on as fields.
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_ansi(false)
            .with_writer(move || Writer(Arc::clone(&sink)))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            RedactingBridge.log(
                &log::Record::builder()
                    .args(format_args!(
                        "Fail to proxy: status: 502, GET /v1/x?pan=4111111111111111, Host: gw"
                    ))
                    .level(log::Level::Error)
                    .target("pingora_proxy")
                    .file(Some(
                        "/root/.cargo/registry/src/index/pingora-proxy-0.9.1/src/lib.rs",
                    ))
                    .module_path(Some("pingora_proxy"))
                    .line(Some(1351))
                    .build(),
            );
        });
        let text = String::from_utf8(out.lock().map(|b| b.clone()).unwrap_or_default())
            .unwrap_or_default();
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_default();
        assert_eq!(line["level"], "ERROR", "{text}");
        assert_eq!(line["target"], "pingora_proxy", "{text}");
        assert_eq!(
            line["message"], "Fail to proxy: status: 502, GET /v1/x?[redacted], Host: gw",
            "{text}"
        );
        assert!(!text.contains("4111111111111111"), "{text}");
        assert!(!text.contains("/root/.cargo"), "a build path: {text}");
    }

    struct Writer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Writer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut b) = self.0.lock() {
                b.extend_from_slice(buf);
            }
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
