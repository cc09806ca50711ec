//! `keygate assertion …`: the upstream assertion keys through the admin API — their state,
//! and rotation with a publish-ahead period.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{json, Value};

use super::keys::{admin_call, Admin, KeysError};

/// One `assertion` subcommand.
#[derive(Debug, Clone, Copy)]
pub enum AssertionCommand {
    Keys,
    Rotate { publish_ahead: Duration },
}

/// Runs `cmd` against the admin API; returns what to print.
pub async fn run(cmd: AssertionCommand, admin: &Admin, as_json: bool) -> Result<String, KeysError> {
    let (_, text, value) = match cmd {
        AssertionCommand::Keys => {
            admin_call(admin, reqwest::Method::GET, "/v1/assertion/keys", None).await?
        }
        AssertionCommand::Rotate { publish_ahead } => {
            let body = json!({ "publish_ahead_seconds": publish_ahead.as_secs() });
            admin_call(
                admin,
                reqwest::Method::POST,
                "/v1/assertion/rotate",
                Some(&body),
            )
            .await?
        }
    };
    Ok(if as_json { text } else { table(&value) })
}

fn table(ring: &Value) -> String {
    let mut out = format!(
        "{:<22} {:<9} {:<21} {}\n",
        "KID", "STATE", "ACTIVE FROM", "CREATED"
    );
    for k in ring["keys"].as_array().into_iter().flatten() {
        let field = |name: &str| k[name].as_str().unwrap_or("-").to_owned();
        let _ = writeln!(
            out,
            "{:<22} {:<9} {:<21} {}",
            field("kid"),
            field("state"),
            field("active_from"),
            field("created_at")
        );
    }
    out.trim_end().to_owned()
}
