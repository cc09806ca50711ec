//! `keygate serve` and `keygate check-config`: load the config, run the gateway.

use std::process::ExitCode;

use super::{EX_UNAVAILABLE, EX_USAGE};
use crate::{App, Config};

/// Logs to stdout: `RUST_LOG` if set, else `level`; JSON lines or text; ANSI colour only
/// when stdout is a terminal (never in files or a journal).
pub(super) fn init_logging(log: Option<&crate::config::LogConfig>) {
    use std::io::IsTerminal;
    let level = log.map_or("info", |l| l.level.as_str());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .with_ansi(std::io::stdout().is_terminal());
    let _ = if log.is_some_and(|l| l.json) {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()
    } else {
        builder.try_init()
    };
}

pub(super) fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|errors| {
        eprintln!("{}: {} problem(s)", path.display(), errors.0.len());
        for e in &errors.0 {
            eprintln!("  {e}");
        }
        ExitCode::from(EX_USAGE)
    })
}

pub(super) fn serve(path: &std::path::Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logging(Some(&config.log));
    let result = App::from_config(config).and_then(|app| app.run(Vec::new(), None));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keygate: {e}");
            ExitCode::from(EX_UNAVAILABLE)
        }
    }
}
