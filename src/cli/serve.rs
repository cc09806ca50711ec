//! `keygate serve` and `keygate check-config`: load the config, run the gateway.

use std::process::ExitCode;

use super::{EX_DATAERR, EX_TEMPFAIL, EX_UNAVAILABLE, EX_USAGE};
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

/// The running gateway's `keygate_config_reloads_total` (ok, error), read from the metrics
/// listener the config names (loopback for an unspecified address; under `[metrics.tls]`
/// without checking the certificate: it is this host's own listener and nothing secret is
/// sent). `None` when it cannot be read.
async fn reload_counts(config: &crate::Config) -> Option<(u64, u64)> {
    let addr = super::reachable(config.metrics.listen);
    let client = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .timeout(std::time::Duration::from_secs(2))
        .build()
        .ok()?;
    // The file's scheme first; the other too, since a file that adds or drops
    // `[metrics.tls]` is read by a gateway still serving the way it started.
    let tls = config.metrics.tls.is_some();
    let mut text = None;
    for https in [tls, !tls] {
        let url = format!(
            "{}://{}/metrics",
            if https { "https" } else { "http" },
            addr
        );
        if let Ok(resp) = client.get(url).send().await {
            text = resp.text().await.ok();
            break;
        }
    }
    let text = text?;
    let count = |result: &str| {
        let name = format!("keygate_config_reloads_total{{result=\"{result}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(name.as_str()))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    };
    text.contains("keygate_config_reloads_total")
        .then(|| (count("ok"), count("error")))
}

/// Whether `pid` is a `keygate serve` reading `config`: a pid file left by a gateway that was
/// killed may name another process by now (which SIGHUP would end), and the gateway re-reads
/// its own `--config`, not the file given here.
fn same_gateway(pid: i32, config: &std::path::Path) -> Result<(), String> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map_err(|e| format!("pid {pid} is not running ({e}); a stale pid file?"))?;
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let is_keygate =
        args.first().is_some_and(|a| a.ends_with("keygate")) && args.iter().any(|a| a == "serve");
    if !is_keygate {
        return Err(format!(
            "pid {pid} is not a keygate serve ({}): a stale pid file? nothing was signalled",
            args.join(" ").trim()
        ));
    }
    let theirs = args
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| args.get(i + 1))
        .map(std::path::PathBuf::from);
    if let Some(theirs) = theirs {
        // A relative path is the gateway's, from its own working directory.
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap_or_default();
        let theirs = std::fs::canonicalize(cwd.join(&theirs)).unwrap_or(theirs);
        let ours = std::fs::canonicalize(config).unwrap_or_else(|_| config.to_owned());
        if theirs != ours {
            return Err(format!(
                "keygate (pid {pid}) reads {}, not {}: a reload would apply that file; \
                 nothing was signalled",
                theirs.display(),
                ours.display()
            ));
        }
    }
    Ok(())
}

/// `keygate reload`: SIGHUP to the gateway whose pid is in the config's `server.pid_file`.
/// The file is checked first, so a broken edit is reported here, before the signal; then the
/// gateway's answer is read from its reload counter, since it also refuses what no file check
/// can know (listeners, `[store]` or `[secrets]` that differ from the running ones, a file it
/// cannot read as its own user).
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
    if let Err(e) = same_gateway(pid.as_raw_nonzero().get(), path) {
        eprintln!("keygate reload: {}: {e}", pid_file.display());
        return ExitCode::from(EX_UNAVAILABLE);
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keygate reload: runtime: {e}");
            return ExitCode::from(EX_UNAVAILABLE);
        }
    };
    let before = rt.block_on(reload_counts(&config));
    if let Err(e) = rustix::process::kill_process(pid, rustix::process::Signal::HUP) {
        eprintln!("keygate reload: pid {}: {e}", pid.as_raw_nonzero());
        return ExitCode::from(EX_UNAVAILABLE);
    }
    let pid = pid.as_raw_nonzero();
    let Some((ok, error)) = before else {
        eprintln!(
            "keygate reload: sent SIGHUP to keygate (pid {pid}), but its metrics listener ({}) \
             does not answer, so whether it applied the file is unknown: see its log (a file \
             that changes metrics.listen is refused: listeners change only on restart)",
            config.metrics.listen
        );
        return ExitCode::from(EX_UNAVAILABLE);
    };
    // A reload is read, checked and applied within milliseconds; 10 s covers a slow host
    // name lookup of a changed upstream.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        match rt.block_on(reload_counts(&config)) {
            Some((_, e)) if e > error => {
                eprintln!(
                    "keygate reload: keygate (pid {pid}) refused the file and keeps its running \
                     config; its log says why (\"config reload refused\")"
                );
                return ExitCode::from(EX_DATAERR);
            }
            Some((o, _)) if o > ok => {
                println!("keygate (pid {pid}) reloaded {}", path.display());
                return ExitCode::SUCCESS;
            }
            _ => {}
        }
    }
    eprintln!("keygate reload: sent SIGHUP to keygate (pid {pid}), which has not said in 10 s whether it applied the file: see its log");
    ExitCode::from(EX_UNAVAILABLE)
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
