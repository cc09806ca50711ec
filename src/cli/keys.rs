//! `keygate keys …`: the admin API from the command line. Human output by default, `--json`
//! for scripts. Exit codes: 0 done, 64 usage, 65 the server refused the request, 69 the server
//! could not be reached.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{json, Map, Value};

/// Exit code when the server answered with an error.
pub const EX_REFUSED: u8 = 65;
/// Exit code when the server could not be reached.
pub const EX_UNAVAILABLE: u8 = 69;
/// Exit code for a bad command line.
pub const EX_USAGE: u8 = 64;

/// Fields of a key as given on the command line (create, import, update).
#[derive(Debug, Default, Clone)]
pub struct KeyFields {
    pub owner: Option<String>,
    pub name: Option<String>,
    pub description: Option<String>,
    pub scopes: Vec<String>,
    pub ip_allow_list: Vec<String>,
    pub expires_at: Option<String>,
    pub environment: Option<String>,
    pub auth: Option<String>,
    /// `key=value` pairs.
    pub metadata: Vec<String>,
    pub tls_client_cert_sha256: Option<String>,
    /// `name=limit/window` (`burst=100/1s`).
    pub rate_limits: Vec<String>,
    /// Credits: the key becomes metered.
    pub remaining: Option<u64>,
    /// `daily:N` or `monthly:N`.
    pub refill: Option<String>,
}

/// One `keys` subcommand.
#[derive(Debug, Clone)]
pub enum KeysCommand {
    Create(KeyFields),
    Import {
        public_key: String,
        secret: String,
        fields: KeyFields,
    },
    List {
        owner: Option<String>,
        environment: Option<String>,
        status: Option<String>,
        limit: Option<u32>,
        cursor: Option<String>,
    },
    Get {
        id: String,
    },
    Update {
        id: String,
        fields: KeyFields,
        clear_description: bool,
        clear_expires_at: bool,
        clear_tls_client_cert: bool,
        clear_rate_limits: bool,
        clear_remaining: bool,
    },
    Credits {
        id: String,
        add: Option<u64>,
        set: Option<u64>,
    },
    Rotate {
        id: String,
        grace_seconds: u64,
    },
    Revoke {
        id: String,
    },
    Delete {
        id: String,
    },
}

/// Why a `keys` command failed; each maps to one exit code.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("{0}")]
    Usage(String),
    #[error("{status} {code}: {detail}{errors}")]
    Refused {
        status: u16,
        code: String,
        detail: String,
        errors: String,
    },
    #[error("cannot reach the admin API at {url}: {reason}")]
    Unreachable { url: String, reason: String },
}

impl KeysError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => EX_USAGE,
            Self::Refused { .. } => EX_REFUSED,
            Self::Unreachable { .. } => EX_UNAVAILABLE,
        }
    }
}

fn metadata(pairs: &[String]) -> Result<BTreeMap<String, String>, KeysError> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| KeysError::Usage(format!("--metadata {p:?} must be key=value")))
        })
        .collect()
}

/// `name=limit/window` as the API's `{"name", "limit", "window"}`; the server checks the rest.
fn rate_limits(specs: &[String]) -> Result<Vec<Value>, KeysError> {
    specs
        .iter()
        .map(|spec| {
            let parsed = spec.split_once('=').and_then(|(name, rest)| {
                let (limit, window) = rest.split_once('/')?;
                Some(json!({"name": name, "limit": limit.parse::<u64>().ok()?, "window": window}))
            });
            parsed.ok_or_else(|| {
                KeysError::Usage(format!(
                    "--rate-limit {spec:?} must be name=limit/window, e.g. burst=100/1s"
                ))
            })
        })
        .collect()
}

/// The JSON body for the fields that were given.
fn fields_json(f: &KeyFields) -> Result<Map<String, Value>, KeysError> {
    let mut m = Map::new();
    let mut put = |k: &str, v: Option<&String>| {
        if let Some(v) = v {
            m.insert(k.to_owned(), Value::String(v.clone()));
        }
    };
    put("owner", f.owner.as_ref());
    put("name", f.name.as_ref());
    put("description", f.description.as_ref());
    put("expires_at", f.expires_at.as_ref());
    put("environment", f.environment.as_ref());
    put("auth", f.auth.as_ref());
    put("tls_client_cert_sha256", f.tls_client_cert_sha256.as_ref());
    if !f.scopes.is_empty() {
        m.insert("scopes".into(), json!(f.scopes));
    }
    if !f.ip_allow_list.is_empty() {
        m.insert("ip_allow_list".into(), json!(f.ip_allow_list));
    }
    if !f.metadata.is_empty() {
        m.insert("metadata".into(), json!(metadata(&f.metadata)?));
    }
    if !f.rate_limits.is_empty() {
        m.insert("rate_limits".into(), json!(rate_limits(&f.rate_limits)?));
    }
    if let Some(n) = f.remaining {
        m.insert("remaining".into(), json!(n));
    }
    if let Some(spec) = &f.refill {
        let refill = spec
            .split_once(':')
            .and_then(|(interval, amount)| {
                Some(json!({"interval": interval, "amount": amount.parse::<u64>().ok()?}))
            })
            .ok_or_else(|| {
                KeysError::Usage(format!("--refill {spec:?} must be daily:N or monthly:N"))
            })?;
        m.insert("refill".into(), refill);
    }
    Ok(m)
}

/// Where and how to reach the admin API.
#[derive(Debug, Clone)]
pub struct Admin {
    /// `http://…` or `https://…`.
    pub url: String,
    pub token: String,
    /// PEM CA certificates to trust for `https://` besides the system's.
    pub ca_file: Option<std::path::PathBuf>,
}

/// Runs one command against the admin API; returns what to print.
pub async fn run(cmd: &KeysCommand, admin: &Admin, as_json: bool) -> Result<String, KeysError> {
    let (method, path, body): (reqwest::Method, String, Option<Value>) = match cmd {
        KeysCommand::Create(f) => (
            reqwest::Method::POST,
            "/v1/keys".into(),
            Some(Value::Object(fields_json(f)?)),
        ),
        KeysCommand::Import {
            public_key,
            secret,
            fields,
        } => {
            let mut m = fields_json(fields)?;
            m.insert("public_key".into(), json!(public_key));
            m.insert("secret".into(), json!(secret));
            (
                reqwest::Method::POST,
                "/v1/keys/import".into(),
                Some(Value::Object(m)),
            )
        }
        KeysCommand::List {
            owner,
            environment,
            status,
            limit,
            cursor,
        } => {
            let mut q = Vec::new();
            for (k, v) in [
                ("owner", owner),
                ("environment", environment),
                ("status", status),
                ("cursor", cursor),
            ] {
                if let Some(v) = v {
                    q.push(format!("{k}={}", encode(v)));
                }
            }
            if let Some(l) = limit {
                q.push(format!("limit={l}"));
            }
            let query = if q.is_empty() {
                String::new()
            } else {
                format!("?{}", q.join("&"))
            };
            (reqwest::Method::GET, format!("/v1/keys{query}"), None)
        }
        KeysCommand::Get { id } => (
            reqwest::Method::GET,
            format!("/v1/keys/{}", encode(id)),
            None,
        ),
        KeysCommand::Update {
            id,
            fields,
            clear_description,
            clear_expires_at,
            clear_tls_client_cert,
            clear_rate_limits,
            clear_remaining,
        } => {
            if fields.owner.is_some() || fields.environment.is_some() || fields.auth.is_some() {
                return Err(KeysError::Usage(
                    "update cannot change owner, environment or auth".into(),
                ));
            }
            let mut m = fields_json(fields)?;
            if *clear_description {
                m.insert("description".into(), Value::Null);
            }
            if *clear_expires_at {
                m.insert("expires_at".into(), Value::Null);
            }
            if *clear_tls_client_cert {
                m.insert("tls_client_cert_sha256".into(), Value::Null);
            }
            if *clear_rate_limits {
                m.insert("rate_limits".into(), json!([]));
            }
            if *clear_remaining {
                m.insert("remaining".into(), Value::Null);
            }
            if m.is_empty() {
                return Err(KeysError::Usage(
                    "update needs at least one field to change".into(),
                ));
            }
            (
                reqwest::Method::PATCH,
                format!("/v1/keys/{}", encode(id)),
                Some(Value::Object(m)),
            )
        }
        KeysCommand::Rotate { id, grace_seconds } => (
            reqwest::Method::POST,
            format!("/v1/keys/{}/rotate", encode(id)),
            Some(json!({"grace_seconds": grace_seconds})),
        ),
        KeysCommand::Credits { id, add, set } => {
            let body = match (add, set) {
                (Some(n), None) => json!({"add": n}),
                (None, Some(n)) => json!({"set": n}),
                _ => {
                    return Err(KeysError::Usage(
                        "credits needs exactly one of --add N and --set N".into(),
                    ))
                }
            };
            (
                reqwest::Method::POST,
                format!("/v1/keys/{}/credits", encode(id)),
                Some(body),
            )
        }
        KeysCommand::Revoke { id } => (
            reqwest::Method::POST,
            format!("/v1/keys/{}/revoke", encode(id)),
            None,
        ),
        KeysCommand::Delete { id } => (
            reqwest::Method::DELETE,
            format!("/v1/keys/{}", encode(id)),
            None,
        ),
    };
    let (status, text, value) = admin_call(admin, method, &path, body.as_ref()).await?;
    if as_json {
        return Ok(if status == 204 { "{}".into() } else { text });
    }
    Ok(match cmd {
        KeysCommand::Delete { id } => format!("deleted {id}"),
        KeysCommand::List { .. } => table(&value),
        _ => record(&value),
    })
}

/// One admin API call: the status, the body text and the body as JSON (null if not JSON).
/// An error answer becomes [`KeysError::Refused`] with the problem's code and details.
pub async fn admin_call(
    admin: &Admin,
    method: reqwest::Method,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, String, Value), KeysError> {
    let base = admin.url.trim_end_matches('/');
    let url = format!("{base}{path}");
    let client = super::client_trusting(admin.ca_file.as_deref())
        .map_err(KeysError::Usage)?
        .build()
        .map_err(|e| KeysError::Unreachable {
            url: base.to_owned(),
            reason: e.to_string(),
        })?;
    let mut req = client.request(method, &url).bearer_auth(&admin.token);
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = req.send().await.map_err(|e| KeysError::Unreachable {
        url: base.to_owned(),
        reason: e.to_string(),
    })?;
    let status = resp.status().as_u16();
    let text = resp.text().await.map_err(|e| KeysError::Unreachable {
        url: base.to_owned(),
        reason: e.to_string(),
    })?;
    let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    if status >= 400 {
        let errors = value["errors"]
            .as_object()
            .map(|e| {
                e.iter().fold(String::new(), |mut out, (k, v)| {
                    let _ = write!(out, "\n  {k}: {}", v.as_str().unwrap_or_default());
                    out
                })
            })
            .unwrap_or_default();
        return Err(KeysError::Refused {
            status,
            code: value["code"].as_str().unwrap_or("error").to_owned(),
            detail: value["detail"].as_str().unwrap_or(&text).to_owned(),
            errors,
        });
    }
    Ok((status, text, value))
}

/// Percent-encodes a path segment or query value.
fn encode(s: &str) -> String {
    s.bytes().fold(String::new(), |mut out, b| {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
        out
    })
}

fn status_of(k: &Value) -> &'static str {
    if !k["revoked_at"].is_null() {
        "revoked"
    } else if k["expires_at"]
        .as_str()
        .and_then(|e| {
            time::OffsetDateTime::parse(e, &time::format_description::well_known::Rfc3339).ok()
        })
        .is_some_and(|e| e <= time::OffsetDateTime::now_utc())
    {
        "expired"
    } else {
        "active"
    }
}

/// One key, one field a line; the secret last, with a warning, when the server sent it.
fn record(k: &Value) -> String {
    let mut out = String::new();
    for f in [
        "id",
        "public_key",
        "secret_prefix",
        "owner",
        "name",
        "description",
        "environment",
        "auth",
        "expires_at",
        "created_at",
        "updated_at",
        "revoked_at",
        "last_used_at",
        "total_requests",
    ] {
        let v = &k[f];
        let shown = match v {
            Value::Null => "-".to_owned(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let _ = writeln!(out, "{f:<15} {shown}");
    }
    let _ = writeln!(out, "{:<15} {}", "status", status_of(k));
    let join = |f: &str| {
        k[f].as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default()
    };
    let _ = writeln!(out, "{:<15} {}", "scopes", join("scopes"));
    let _ = writeln!(out, "{:<15} {}", "ip_allow_list", join("ip_allow_list"));
    if let Some(secret) = k["secret"].as_str() {
        let _ = write!(out, "\nsecret          {secret}\n\nThis secret is shown once and cannot be recovered: store it now.");
    }
    out.trim_end().to_owned()
}

/// A list page as an aligned table.
fn table(page: &Value) -> String {
    let items = page["items"].as_array().cloned().unwrap_or_default();
    let rows: Vec<[String; 6]> = items
        .iter()
        .map(|k| {
            let s = |f: &str| k[f].as_str().unwrap_or("-").to_owned();
            let scopes = k["scopes"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            [
                s("id"),
                s("public_key"),
                s("owner"),
                s("name"),
                status_of(k).to_owned(),
                scopes,
            ]
        })
        .collect();
    let header = ["ID", "PUBLIC KEY", "OWNER", "NAME", "STATUS", "SCOPES"].map(str::to_owned);
    let mut widths = header.clone().map(|h| h.chars().count());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    if let Some(next) = page["next_cursor"].as_str() {
        let _ = write!(out, "\nmore: --cursor {next}");
    }
    out.trim_end().to_owned()
}

/// `keygate keys …`: one admin API call, printed; the exit code says how it went.
pub fn run_command(
    admin_url: &str,
    ca_file: Option<std::path::PathBuf>,
    as_json: bool,
    command: &KeysCommand,
) -> std::process::ExitCode {
    with_admin_token("keys", |token| async move {
        let admin = Admin {
            url: admin_url.to_owned(),
            token,
            ca_file,
        };
        run(command, &admin, as_json).await
    })
}

/// Runs one admin call made by `call` with the token from `KEYGATE_ADMIN_TOKEN`, prints what
/// it returns, and turns failures into the exit codes above.
pub fn with_admin_token<F, Fut>(what: &str, call: F) -> std::process::ExitCode
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = Result<String, KeysError>>,
{
    use super::EX_UNAVAILABLE;
    use std::process::ExitCode;
    let Some(token) = std::env::var("KEYGATE_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
    else {
        eprintln!("keygate {what}: set KEYGATE_ADMIN_TOKEN to an admin token");
        return ExitCode::from(EX_USAGE);
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keygate {what}: {e}");
            return ExitCode::from(EX_UNAVAILABLE);
        }
    };
    match rt.block_on(call(token)) {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("keygate {what}: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
