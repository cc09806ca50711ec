//! `keygate serve` and `keygate check-config`: load the config, run the gateway.

use std::process::ExitCode;

use super::{EX_TEMPFAIL, EX_UNAVAILABLE, EX_USAGE};
use crate::{App, Config};

pub(super) fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    load_with(path, crate::config::Lookup::Now)
}

pub(super) fn load_with(
    path: &std::path::Path,
    lookup: crate::config::Lookup,
) -> Result<Config, ExitCode> {
    Config::load_with(path, lookup).map_err(|errors| {
        eprintln!("{}: {} problem(s)", path.display(), errors.0.len());
        for e in &errors.0 {
            eprintln!("  {e}");
        }
        ExitCode::from(EX_USAGE)
    })
}

/// `keygate check-config`: the config's own problems and those of the secret files it names,
/// checked as `serve` reads them (with this process's environment), all in one run — the
/// files are checked even when the config has problems elsewhere. `offline`: the files are
/// not read (a config checked away from where it runs, whose files live there).
pub(super) fn check_config(
    path: &std::path::Path,
    lookup: crate::config::Lookup,
    offline: bool,
) -> ExitCode {
    let (config, found) = match Config::load_for_check(path, lookup) {
        Ok(read) => read,
        Err(errors) => {
            eprintln!("{}: {} problem(s)", path.display(), errors.0.len());
            for e in &errors.0 {
                eprintln!("  {e}");
            }
            return ExitCode::from(EX_USAGE);
        }
    };
    let mut problems: Vec<String> = found.iter().map(ToString::to_string).collect();
    if !offline {
        problems.extend(crate::server::check_secret_files(&config, &|k| {
            std::env::var(k).ok()
        }));
    }
    if problems.is_empty() {
        println!("{}: ok", path.display());
        return ExitCode::SUCCESS;
    }
    eprintln!("{}: {} problem(s)", path.display(), problems.len());
    for p in &problems {
        eprintln!("  {p}");
    }
    ExitCode::from(EX_USAGE)
}

/// `keygate reload`: SIGHUP to the gateway whose pid is in the config's `server.pid_file`.
/// The file is checked first, so a broken edit is reported here, before the signal.
pub(super) fn reload(path: &std::path::Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(pid_file) = &config.server.pid_file else {
        eprintln!("keygate reload: {} sets no server.pid_file", path.display());
        return ExitCode::from(EX_USAGE);
    };
    let pid = std::fs::read_to_string(pid_file)
        .map_err(|e| e.to_string())
        .and_then(|t| t.trim().parse::<i32>().map_err(|e| e.to_string()))
        .and_then(|n| rustix::process::Pid::from_raw(n).ok_or_else(|| "not a pid".to_owned()));
    let pid = match pid {
        Ok(p) => p,
        Err(e) => {
            eprintln!("keygate reload: {}: {e}", pid_file.display());
            return ExitCode::from(EX_UNAVAILABLE);
        }
    };
    match rustix::process::kill_process(pid, rustix::process::Signal::HUP) {
        Ok(()) => {
            println!("sent SIGHUP to keygate (pid {})", pid.as_raw_nonzero());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("keygate reload: pid {}: {e}", pid.as_raw_nonzero());
            ExitCode::from(EX_UNAVAILABLE)
        }
    }
}

pub(super) fn serve(path: &std::path::Path, upgrade: bool) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    crate::logging::init(Some(&config.log));
    let result = App::from_config(config).and_then(|mut app| {
        app.config_path = Some(path.to_path_buf());
        app.upgrade = upgrade;
        app.run(Vec::new(), None)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ crate::server::StartError::UpgradeTimedOut(..)) => {
            tracing::error!(error = %e, "upgrade not done");
            eprintln!("keygate: {e}");
            ExitCode::from(EX_TEMPFAIL)
        }
        Err(e) => {
            eprintln!("keygate: {e}");
            ExitCode::from(EX_UNAVAILABLE)
        }
    }
}
