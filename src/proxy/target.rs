//! What a request's head must look like before keygate routes it: a path that every upstream
//! reads the way keygate's route matching does, and one unambiguous `Content-Length`.
//!
//! keygate forwards the target unchanged (it is what the client signed), so it cannot
//! normalise a path; it refuses the ones an upstream might normalise into another route.

use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::HeaderMap;

/// Why a path is refused (the client-facing `detail`). One pass over the bytes: every
/// request pays it before routing.
pub fn check_path(path: &str) -> Result<(), &'static str> {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return Err("the path must start with /");
    }
    let segment = |seg: &[u8]| match seg {
        b"" => Err("the path must not contain an empty segment (//)"),
        b"." | b".." => Err("the path must not contain . or .. segments"),
        _ => Ok(()),
    };
    let mut start = 1;
    for (i, &c) in b.iter().enumerate().skip(1) {
        match c {
            b'/' => {
                segment(&b[start..i])?;
                start = i + 1;
            }
            b'\\' => return Err("the path must not contain a backslash"),
            b';' => return Err("the path must not contain ';' parameters"),
            // Percent-encoded '/', '\' and NUL, and any character that needs no encoding
            // (RFC 3986's unreserved: `%61` is `a`): decoded by some upstreams, not by route
            // matching, so `/v1/p%61yments` would be checked against another route than the
            // one it reaches. Found by fuzzing (fuzz/regressions/route_matching).
            b'%' => {
                let decoded = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                if decoded.is_some_and(|c| {
                    c.is_ascii_alphanumeric()
                        || matches!(c, b'-' | b'.' | b'_' | b'~' | b'/' | b'\\' | 0)
                }) {
                    return Err(
                        "the path must not percent-encode /, \\, NUL or a character \
                                that needs no encoding (A-Z a-z 0-9 - . _ ~)",
                    );
                }
            }
            _ => {}
        }
    }
    // The last segment may be empty (a trailing slash), never a dot segment.
    match &b[start..] {
        b"." | b".." => Err("the path must not contain . or .. segments"),
        _ => Ok(()),
    }
}

/// The declared body length: one `Content-Length` of plain digits without a leading zero,
/// and never beside `Transfer-Encoding`. `Ok(None)` when none is declared.
pub fn content_length(headers: &HeaderMap) -> Result<Option<u64>, &'static str> {
    let mut values = headers.get_all(CONTENT_LENGTH).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err("Content-Length is sent more than once");
    }
    if headers.contains_key(TRANSFER_ENCODING) {
        return Err("Content-Length and Transfer-Encoding must not both be sent");
    }
    let v = value.as_bytes();
    let canonical = !v.is_empty()
        && v.len() <= 19
        && v.iter().all(u8::is_ascii_digit)
        && (v[0] != b'0' || v.len() == 1);
    if !canonical {
        return Err("Content-Length must be a plain decimal number");
    }
    std::str::from_utf8(v)
        .ok()
        .and_then(|t| t.parse().ok())
        .map(Some)
        .ok_or("Content-Length must be a plain decimal number")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_an_upstream_could_read_as_another_route_are_refused() {
        for bad in [
            "/v1/public/../admin/secret",
            "/v1/public/%2e%2e/admin/secret",
            "/v1/public/%2E%2E/admin",
            "/v1/public/..%2fadmin",
            "/v1/public/..%2Fadmin",
            "/v1/public/..;/admin",
            "/v1/public/..\\admin",
            "/v1/public/./../../admin",
            "/v1/public/..%5cadmin",
            "/v1/public/.",
            "/v1/public/..",
            "/v1//admin",
            "//v1/admin",
            "/v1/x;jsessionid=1",
            "/v1/a%00b",
            // Unreserved characters need no encoding; an upstream may decode them (fuzzing).
            "/v1/p%61yments",
            "/er/v1/payments/refunds/%20b%6Fc",
            "/v1/%41",
            "/v1/%7e",
            "/v1/%2D",
            "v1/no-slash",
            "",
        ] {
            assert!(check_path(bad).is_err(), "{bad:?} must be refused");
        }
        for ok in [
            "/",
            "/v1/payments",
            "/v1/payments/",
            "/v1/payments/p_1.json",
            "/v1/payments/...",
            "/v1/a%20b",
            "/v1/a.b/c..d",
            "/v1/caf%C3%A9",
            "/v1/%3F",
            "/v1/100%25",
            "/v1/%zz",
        ] {
            assert_eq!(check_path(ok), Ok(()), "{ok:?} must pass");
        }
    }

    #[test]
    fn content_length_is_one_plain_number() {
        let with = |pairs: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap_or(CONTENT_LENGTH),
                    http::HeaderValue::from_str(v).unwrap_or(http::HeaderValue::from_static("x")),
                );
            }
            content_length(&h)
        };
        assert_eq!(with(&[]), Ok(None));
        assert_eq!(with(&[("content-length", "7")]), Ok(Some(7)));
        assert_eq!(with(&[("content-length", "0")]), Ok(Some(0)));
        for bad in [
            "7, 7",
            "07",
            "",
            " 7",
            "+7",
            "7.0",
            "0x7",
            "99999999999999999999",
        ] {
            assert!(with(&[("content-length", bad)]).is_err(), "{bad:?}");
        }
        assert!(with(&[("content-length", "7"), ("content-length", "7")]).is_err());
        assert!(with(&[("content-length", "7"), ("transfer-encoding", "chunked")]).is_err());
    }
}
