//! The signing algorithms of SPEC §3.1–3.2: the `hmac-v1` string to sign and the MACs.
//!
//! The canonical layout is written once ([`feed_v1`]) and used both to build the printable
//! string (for `keygate sign` and debugging) and to feed the MAC directly on the hot path,
//! so the two can never disagree.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// First line of the `hmac-v1` string to sign.
pub const V1_ALGORITHM: &str = "KG1-HMAC-SHA256";

/// Lowercase hex SHA-256 of the raw body bytes.
pub fn body_hash_hex(body: &[u8]) -> [u8; 64] {
    let mut out = [0u8; 64];
    // Cannot fail: the output buffer is exactly twice the digest length.
    let _ = hex::encode_to_slice(Sha256::digest(body), &mut out);
    out
}

/// Writes the six lines of the string to sign, LF-joined, no trailing newline.
fn feed_v1(
    mut put: impl FnMut(&[u8]),
    timestamp: &str,
    nonce: &str,
    method: &str,
    target: &str,
    body: &[u8],
) {
    put(V1_ALGORITHM.as_bytes());
    put(b"\n");
    put(timestamp.as_bytes());
    put(b"\n");
    put(nonce.as_bytes());
    put(b"\n");
    put(method.as_bytes());
    put(b"\n");
    put(target.as_bytes());
    put(b"\n");
    put(&body_hash_hex(body));
}

/// The `hmac-v1` string to sign, as text.
pub fn string_to_sign_v1(
    timestamp: &str,
    nonce: &str,
    method: &str,
    target: &str,
    body: &[u8],
) -> String {
    let mut out = Vec::with_capacity(V1_ALGORITHM.len() + target.len() + 128);
    feed_v1(
        |b| out.extend_from_slice(b),
        timestamp,
        nonce,
        method,
        target,
        body,
    );
    String::from_utf8_lossy(&out).into_owned()
}

fn keyed(secret: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    <HmacSha256 as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!())
}

/// HMAC-SHA256 over the `hmac-v1` string to sign. `method` must already be uppercase.
pub fn mac_v1(
    secret: &[u8],
    timestamp: &str,
    nonce: &str,
    method: &str,
    target: &str,
    body: &[u8],
) -> [u8; 32] {
    let mut mac = keyed(secret);
    feed_v1(|b| mac.update(b), timestamp, nonce, method, target, body);
    mac.finalize().into_bytes().into()
}

/// HMAC-SHA256 over the raw body bytes (`hmac-body`).
pub fn mac_body(secret: &[u8], body: &[u8]) -> [u8; 32] {
    let mut mac = keyed(secret);
    mac.update(body);
    mac.finalize().into_bytes().into()
}

/// Parses a 64-character hex signature.
pub fn parse_signature(hex_text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    (hex_text.len() == 64)
        .then(|| hex::decode_to_slice(hex_text, &mut out).ok())
        .flatten()
        .map(|()| out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_body_hash_is_the_well_known_one() {
        assert_eq!(
            &body_hash_hex(b""),
            b"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn signature_parsing() {
        assert!(parse_signature(&"ab".repeat(32)).is_some());
        assert!(parse_signature(&"ab".repeat(31)).is_none());
        assert!(parse_signature(&"zz".repeat(32)).is_none());
    }
}
