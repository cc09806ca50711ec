//! Error codes of the contract and their problem+json rendering (RFC 7807, SPEC §3.4).
//!
//! Every error the gateway answers with, on any listener, is one [`ErrorCode`]; this is the
//! one place that maps a code to its HTTP status and title.

use serde::Serialize;

/// Declares [`ErrorCode`] and its [`ErrorCode::ALL`] from one list, so no code can be left
/// out of the documentation check.
macro_rules! error_codes {
    ($($code:ident),* $(,)?) => {
        /// Every `code` a client or operator can receive.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($code),*
        }

        impl ErrorCode {
            /// Every code, in declaration order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$code),*];
        }
    };
}

error_codes! {
    NoRoute,
    BodyTooLarge,
    MissingCredentials,
    MalformedCredentials,
    UnknownKey,
    RevokedKey,
    ExpiredKey,
    IpNotAllowed,
    ClientCertRequired,
    StaleTimestamp,
    BadSignature,
    MissingNonce,
    ReplayedNonce,
    InsufficientScope,
    RateLimited,
    QuotaExhausted,
    TooManyFailures,
    StoreUnavailable,
    UpstreamUnavailable,
    UpstreamTimeout,
    BadRequest,
    Internal,
    // Admin API only.
    Unauthorized,
    NotFound,
    MethodNotAllowed,
    ValidationFailed,
    MalformedJson,
    Conflict,
    UnsupportedMediaType,
}

impl ErrorCode {
    /// HTTP status, machine code and human title.
    pub fn parts(self) -> (u16, &'static str, &'static str) {
        use ErrorCode::*;
        match self {
            NoRoute => (404, "no_route", "No route matches this request"),
            BodyTooLarge => (413, "body_too_large", "Request body is too large"),
            MissingCredentials => (401, "missing_credentials", "Credentials are missing"),
            MalformedCredentials => (400, "malformed_credentials", "Credentials are malformed"),
            UnknownKey => (401, "unknown_key", "Unknown API key"),
            RevokedKey => (401, "revoked_key", "API key has been revoked"),
            ExpiredKey => (401, "expired_key", "API key has expired"),
            IpNotAllowed => (
                403,
                "ip_not_allowed",
                "Client address is not allowed for this key",
            ),
            ClientCertRequired => (
                401,
                "client_cert_required",
                "This key needs the TLS client certificate it is bound to",
            ),
            StaleTimestamp => (
                401,
                "stale_timestamp",
                "Timestamp is outside the allowed window",
            ),
            BadSignature => (401, "bad_signature", "Signature does not match"),
            MissingNonce => (401, "missing_nonce", "Nonce is missing"),
            ReplayedNonce => (401, "replayed_nonce", "Nonce has already been used"),
            InsufficientScope => (
                403,
                "insufficient_scope",
                "API key lacks the required scope",
            ),
            RateLimited => (429, "rate_limited", "Rate limit exceeded"),
            QuotaExhausted => (429, "quota_exhausted", "No credits left"),
            TooManyFailures => (
                429,
                "too_many_failures",
                "Too many failed authentications from this address",
            ),
            StoreUnavailable => (503, "store_unavailable", "Key store is unavailable"),
            UpstreamUnavailable => (502, "upstream_unavailable", "Upstream is unavailable"),
            UpstreamTimeout => (504, "upstream_timeout", "Upstream timed out"),
            BadRequest => (400, "bad_request", "Malformed HTTP request"),
            Internal => (500, "internal", "Internal error"),
            Unauthorized => (401, "unauthorized", "Admin token missing or not accepted"),
            NotFound => (404, "not_found", "No such resource"),
            MethodNotAllowed => (
                405,
                "method_not_allowed",
                "Method not allowed on this resource",
            ),
            ValidationFailed => (422, "validation_failed", "Request fields are invalid"),
            MalformedJson => (400, "malformed_json", "Request body is not valid JSON"),
            UnsupportedMediaType => (
                415,
                "unsupported_media_type",
                "Request body must be application/json",
            ),
            Conflict => (
                409,
                "conflict",
                "Conflicts with the resource's current state",
            ),
        }
    }

    pub fn status(self) -> u16 {
        self.parts().0
    }

    pub fn as_str(self) -> &'static str {
        self.parts().1
    }
}

pub const CONTENT_TYPE: &str = "application/problem+json";

#[derive(Serialize)]
struct Body<'a> {
    #[serde(rename = "type")]
    kind: String,
    status: u16,
    code: &'static str,
    title: &'static str,
    detail: &'a str,
    request_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    errors: Option<&'a std::collections::BTreeMap<String, String>>,
}

/// The problem+json body for `code`. `detail` must never hold secrets or stored data.
pub fn render(
    code: ErrorCode,
    detail: &str,
    request_id: &str,
    errors: Option<&std::collections::BTreeMap<String, String>>,
) -> Vec<u8> {
    let (status, code_str, title) = code.parts();
    let body = Body {
        kind: format!("urn:keygate:error:{code_str}"),
        status,
        code: code_str,
        title,
        detail,
        request_id,
        errors,
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_contract_shape() {
        let body = render(ErrorCode::BadSignature, "nope", "req-1", None);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        assert_eq!(v["type"], "urn:keygate:error:bad_signature");
        assert_eq!(v["status"], 401);
        assert_eq!(v["code"], "bad_signature");
        assert_eq!(v["title"], "Signature does not match");
        assert_eq!(v["detail"], "nope");
        assert_eq!(v["request_id"], "req-1");
        assert!(v.get("errors").is_none());
    }

    /// docs/errors.md names every code with its status: a code added without its doc line
    /// fails here.
    #[test]
    fn every_code_is_documented() {
        let doc = include_str!("../docs/errors.md");
        for &code in ErrorCode::ALL {
            let row = doc
                .lines()
                .find(|l| l.contains(&format!("| `{}` |", code.as_str())));
            let row = row.unwrap_or_else(|| panic!("docs/errors.md lacks `{}`", code.as_str()));
            assert!(
                row.contains(&format!("| {} |", code.status())),
                "docs/errors.md gives `{}` another status: {row}",
                code.as_str()
            );
        }
    }
}
