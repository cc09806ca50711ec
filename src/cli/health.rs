//! `keygate health`: one GET of a health endpoint, for a container `HEALTHCHECK` or a probe
//! on a host without curl. Exit 0 on a 2xx answer, 1 otherwise.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

/// Where the probe goes and how far its TLS is checked.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Target {
    pub(super) url: String,
    /// Set only for a URL derived from a config's `[admin.tls]` with no `--ca-file`: the
    /// probe then checks that this host's own admin listener answers, as the kubelet's HTTPS
    /// probes do, without checking the certificate (whose names and issuer the config does
    /// not tell; nothing secret is sent).
    pub(super) skip_verify: bool,
}

/// The `/healthz` URL of the admin listener a config describes: loopback when it listens on
/// every address (a probe runs on the same host or in the same container), `https` under
/// `[admin.tls]`.
pub(super) fn target_of(config: &Path, ca_file: Option<&Path>) -> Result<Target, String> {
    let (config, problems) =
        crate::config::Config::load_for_check(config, crate::config::Lookup::ShapeOnly)
            .map_err(|e| format!("--config {}: {e}", config.display()))?;
    // Problems elsewhere in the file (a route, an upstream) do not move the admin listener;
    // one in [admin] would make the address below the default rather than the file's.
    if let Some(p) = problems.iter().find(|p| p.path.starts_with("admin")) {
        return Err(format!("--config: {p}"));
    }
    let tls = config.admin.tls.is_some();
    Ok(Target {
        url: format!(
            "{}://{}/healthz",
            if tls { "https" } else { "http" },
            super::reachable(config.admin.listen)
        ),
        skip_verify: tls && ca_file.is_none(),
    })
}

pub(super) fn run(target: &Target, ca_file: Option<&Path>, timeout: Duration) -> ExitCode {
    let url = &target.url;
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keygate health: runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(probe(target, ca_file, timeout)) {
        Ok(status) if (200..300).contains(&status) => {
            println!("{url}: {status}");
            ExitCode::SUCCESS
        }
        Ok(status) => {
            eprintln!("{url}: {status}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("{url}: {e}");
            ExitCode::from(1)
        }
    }
}

async fn probe(target: &Target, ca_file: Option<&Path>, timeout: Duration) -> Result<u16, String> {
    let client = super::client_trusting(ca_file)?
        .danger_accept_invalid_certs(target.skip_verify)
        .timeout(timeout)
        .build()
        .map_err(|e| e.to_string())?;
    let resp = client
        .get(&target.url)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    Ok(resp.status().as_u16())
}
