//! `keygate sign`: the headers a client must send, for clients debugging their signing.

use crate::auth::signing;
use crate::keys::AuthKind;

/// What to sign.
#[derive(Debug, Clone)]
pub struct SignRequest {
    pub scheme: AuthKind,
    pub public_key: String,
    pub secret: String,
    pub method: String,
    pub target: String,
    pub body: Vec<u8>,
    pub timestamp: i64,
    pub nonce: String,
}

/// The credential headers for `req`, in the order a client would send them.
pub fn headers(req: &SignRequest) -> Vec<(&'static str, String)> {
    let secret = req.secret.as_bytes();
    match req.scheme {
        AuthKind::HmacV1 => {
            let ts = req.timestamp.to_string();
            let method = req.method.to_ascii_uppercase();
            let mac = signing::mac_v1(secret, &ts, &req.nonce, &method, &req.target, &req.body);
            vec![
                ("x-api-public-key", req.public_key.clone()),
                ("x-api-timestamp", ts),
                ("x-api-nonce", req.nonce.clone()),
                ("x-api-signature", hex::encode(mac)),
            ]
        }
        AuthKind::HmacBody => vec![
            ("x-api-public-key", req.public_key.clone()),
            (
                "x-api-signature",
                hex::encode(signing::mac_body(secret, &req.body)),
            ),
        ],
        AuthKind::Bearer => vec![("authorization", format!("Bearer {}", req.secret))],
    }
}

/// Quotes `s` for a POSIX shell.
fn sh(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A `curl` command line sending `req` to `base_url` (e.g. `http://127.0.0.1:8080`).
pub fn curl(base_url: &str, req: &SignRequest) -> String {
    let mut out = format!(
        "curl -sS -i -X {} {}",
        req.method.to_ascii_uppercase(),
        sh(&format!("{base_url}{}", req.target))
    );
    for (name, value) in headers(req) {
        out.push_str(&format!(" \\\n  -H {}", sh(&format!("{name}: {value}"))));
    }
    if !req.body.is_empty() {
        out.push_str(" \\\n  -H 'content-type: application/json'");
        out.push_str(&format!(
            " \\\n  --data-binary {}",
            sh(&String::from_utf8_lossy(&req.body))
        ));
    }
    out
}

/// `keygate sign`'s arguments.
#[derive(clap::Args, Debug)]
pub struct SignArgs {
    #[arg(long)]
    pub public_key: Option<String>,
    /// The key's secret (or KEYGATE_SECRET).
    #[arg(long, env = "KEYGATE_SECRET", hide_env_values = true)]
    pub secret: String,
    #[arg(long, default_value = "hmac-v1")]
    pub scheme: String,
    #[arg(long, default_value = "GET")]
    pub method: String,
    /// Path and query exactly as on the request line.
    #[arg(long, default_value = "/")]
    pub target: String,
    /// Body text; see also --body-file.
    #[arg(long, conflicts_with = "body_file")]
    pub body: Option<String>,
    #[arg(long)]
    pub body_file: Option<std::path::PathBuf>,
    /// Unix seconds; default now.
    #[arg(long)]
    pub timestamp: Option<i64>,
    /// Default: a random UUID.
    #[arg(long)]
    pub nonce: Option<String>,
    /// Also print a curl command for this base URL, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    pub url: Option<String>,
}

/// Prints the signature headers (and a curl command with `url`).
pub fn run(args: SignArgs) -> std::process::ExitCode {
    use super::EX_USAGE;
    use std::process::ExitCode;
    let SignArgs {
        public_key,
        secret,
        scheme,
        method,
        target,
        body,
        body_file,
        timestamp,
        nonce,
        url,
    } = args;
    let Some(scheme) = AuthKind::parse(&scheme) else {
        eprintln!("keygate sign: --scheme must be hmac-v1, hmac-body or bearer");
        return ExitCode::from(EX_USAGE);
    };
    if scheme != AuthKind::Bearer && public_key.is_none() {
        eprintln!(
            "keygate sign: --public-key is required for {}",
            scheme.as_str()
        );
        return ExitCode::from(EX_USAGE);
    }
    let body = match (body, body_file) {
        (Some(b), _) => b.into_bytes(),
        (None, Some(f)) => match std::fs::read(&f) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("keygate sign: {}: {e}", f.display());
                return ExitCode::from(EX_USAGE);
            }
        },
        (None, None) => Vec::new(),
    };
    let req = SignRequest {
        scheme,
        public_key: public_key.unwrap_or_default(),
        secret,
        method,
        target,
        body,
        timestamp: timestamp.unwrap_or_else(|| time::OffsetDateTime::now_utc().unix_timestamp()),
        nonce: nonce.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
    };
    for (name, value) in headers(&req) {
        println!("{name}: {value}");
    }
    if let Some(url) = url {
        println!("\n{}", curl(url.trim_end_matches('/'), &req));
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_headers_match_the_first_vector() {
        let req = SignRequest {
            scheme: AuthKind::HmacV1,
            public_key: "pk_test_aaaaaaaaaaaaaaaaaaaaaaaa".into(),
            secret: "sk_test_4eC39HqLyjWDarjtT1zdp7dc4eC39HqLyjWDarjtT1z".into(),
            method: "post".into(),
            target: "/v1/payments".into(),
            body: br#"{"amount":"10.00","currency":"USDT","order_id":"A-1001"}"#.to_vec(),
            timestamp: 1_767_225_600,
            nonce: "0b8f4a2e-6d1c-4c55-9a0e-3f1f2a9b7c11".into(),
        };
        let h = headers(&req);
        assert_eq!(
            h[3],
            (
                "x-api-signature",
                "7a4ea895dc62c35f01757bb9db856f25452fa4e94a512bbb46250950c4601977".into()
            )
        );
        let c = curl("http://127.0.0.1:8080", &req);
        assert!(
            c.contains("-X POST 'http://127.0.0.1:8080/v1/payments'"),
            "{c}"
        );
        assert!(c.contains("--data-binary '{\"amount\""), "{c}");
    }

    #[test]
    fn shell_quoting_survives_single_quotes() {
        assert_eq!(sh("it's"), r"'it'\''s'");
    }
}
