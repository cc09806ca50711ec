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
