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

/// Why a target the HTTP/1 parser had to percent-encode is refused: the client signed (and
/// meant) other bytes than keygate would check and forward. RFC 9112 §3.2 allows none of them
/// raw; the parser under keygate encodes them rather than refuse, so keygate refuses instead.
pub const ESCAPED_TARGET: &str = "the request target holds bytes that must be percent-encoded:      a raw space, control byte, '\"', '<', '>' or non-ASCII byte (RFC 9112 §3.2); encode them      (a space as %20) and sign the encoded target";

/// Why a target, as keygate received its bytes, is refused: one that RFC 9112 §3.2 allows no
/// byte of raw — a space, a control byte, DEL or non-ASCII — or a raw `#`.
pub fn check_target_bytes(target: &[u8]) -> Result<(), &'static str> {
    if target.contains(&b'#') {
        return Err("the request target must not contain a raw '#' (percent-encode it as %23)");
    }
    if target
        .iter()
        .any(|&b| b <= b' ' || b == 0x7F || !b.is_ascii())
    {
        return Err(ESCAPED_TARGET);
    }
    Ok(())
}

/// Why a request line, as the client sent its bytes, is refused: a raw `#` in the target.
/// The parser under keygate drops it and all that follows (a fragment is not part of a
/// request-target, RFC 9112 §3.2), so the signature would be checked, and the request
/// forwarded, with another target than the client sent.
/// Raw non-ASCII (UTF-8) is refused too: the parser lets it through unaltered, but RFC 9112
/// allows none, and the same target beside a raw space would be percent-encoded.
pub fn check_request_line(raw_head: &[u8]) -> Result<(), &'static str> {
    let line = raw_head.split(|&b| b == b'\n').next().unwrap_or_default();
    if line.contains(&b'#') {
        return Err("the request target must not contain a raw '#' (percent-encode it as %23)");
    }
    if !line.is_ascii() {
        return Err(ESCAPED_TARGET);
    }
    Ok(())
}

/// Why a request asking to switch protocols is refused, or `None` when it asks for nothing:
/// an `Upgrade` header (any HTTP version) or a `CONNECT` (HTTP/1 tunnel or HTTP/2 extended
/// CONNECT). After the switch the connection carries bytes keygate never reads, so whatever
/// a client sends next would reach the upstream unsigned, unlimited and unlogged.
pub fn upgrade_refusal(req: &http::request::Parts) -> Option<&'static str> {
    if req.method == http::Method::CONNECT {
        return Some("CONNECT is not served: keygate does not open tunnels");
    }
    req.headers.contains_key(http::header::UPGRADE).then_some(
        "Upgrade is refused: this route does not allow switching protocols \
         (a route opts in with upgrade = [\"websocket\"])",
    )
}

/// Whether the request asks for WebSocket and nothing else (`Upgrade: websocket`, one value).
pub fn is_websocket_upgrade(req: &http::request::Parts) -> bool {
    let mut values = req.headers.get_all(http::header::UPGRADE).iter();
    let first = values.next();
    values.next().is_none()
        && first.is_some_and(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket"))
}

/// Whether a request head, as the client sent its bytes, declares both `Content-Length` and
/// `Transfer-Encoding` (any case, order or count). The parsed head cannot tell: the HTTP/1
/// parser drops the length when both are there (RFC 9112 §6.3).
pub fn length_and_encoding(raw_head: &[u8]) -> bool {
    let (mut length, mut encoding) = (false, false);
    // The first line is the request line; a header name has no space before its colon.
    for line in raw_head.split(|&b| b == b'\n').skip(1) {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = &line[..colon];
        length |= name.eq_ignore_ascii_case(b"content-length");
        encoding |= name.eq_ignore_ascii_case(b"transfer-encoding");
    }
    length && encoding
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_beside_encoding_is_found_in_every_shape() {
        for head in [
            "POST / HTTP/1.1\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n",
            "POST / HTTP/1.1\r\nCONTENT-LENGTH: 2\r\nconnection: close\r\nTRANSFER-ENCODING: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.1\ncontent-length: 2\ncontent-length: 2\ntransfer-encoding: chunked\n\n",
        ] {
            assert!(length_and_encoding(head.as_bytes()), "{head:?}");
        }
        for head in [
            "POST / HTTP/1.1\r\ncontent-length: 2\r\n\r\n",
            "POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\nx-note: content-length: 2\r\n\r\n",
            "POST /content-length:2 HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
        ] {
            assert!(!length_and_encoding(head.as_bytes()), "{head:?}");
        }
    }

    #[test]
    fn only_a_single_websocket_upgrade_is_a_websocket_upgrade() {
        let req = |pairs: &[(&str, &str)]| {
            let mut b = http::Request::builder().method("GET").uri("/ws");
            for (k, v) in pairs {
                b = b.header(*k, *v);
            }
            b.body(()).unwrap_or_default().into_parts().0
        };
        assert!(upgrade_refusal(&req(&[])).is_none());
        assert!(upgrade_refusal(&req(&[("upgrade", "websocket")])).is_some());
        assert!(is_websocket_upgrade(&req(&[("upgrade", "WebSocket")])));
        assert!(!is_websocket_upgrade(&req(&[("upgrade", "h2c")])));
        assert!(!is_websocket_upgrade(&req(&[(
            "upgrade",
            "websocket, h2c"
        )])));
        assert!(!is_websocket_upgrade(&req(&[
            ("upgrade", "websocket"),
            ("upgrade", "h2c")
        ])));
    }

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
