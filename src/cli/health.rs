//! `keygate health`: one GET of a health endpoint, for a container `HEALTHCHECK` or a probe
//! on a host without curl. Exit 0 on a 2xx answer, 1 otherwise.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

pub(super) fn run(url: &str, ca_file: Option<&Path>, timeout: Duration) -> ExitCode {
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
    match rt.block_on(probe(url, ca_file, timeout)) {
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

async fn probe(url: &str, ca_file: Option<&Path>, timeout: Duration) -> Result<u16, String> {
    let client = super::client_trusting(ca_file)?
        .timeout(timeout)
        .build()
        .map_err(|e| e.to_string())?;
    let resp = client.get(url).send().await.map_err(|e| e.to_string())?;
    Ok(resp.status().as_u16())
}
