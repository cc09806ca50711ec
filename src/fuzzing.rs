//! The fuzz targets' bodies: each takes arbitrary bytes, drives one parser or matcher that
//! sees untrusted input, and panics when an invariant breaks (a panic is what libFuzzer
//! reports). `fuzz/` (cargo-fuzz, libFuzzer) calls them; `tests/fuzz_smoke.rs` runs the same
//! functions over the seed corpora and their mutations on stable Rust, so a target that
//! cannot be built on a machine still has its invariants checked there.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use time::OffsetDateTime;

use crate::auth::{self, signing, AuthError, Credentials, Policy, RequestParts};
use crate::config::{Config, PathPattern};
use crate::keys::{
    build_record, ActiveKey, AuthKind, Environment, KeyRecord, MasterKey, NewKey, SecretString,
};
use crate::lifecycle::input;
use crate::proxy::target::check_path;
use crate::proxy::Router;

/// A target: arbitrary bytes in, a panic when an invariant breaks.
pub type Target = fn(&[u8]);

/// The targets by name, as `fuzz/fuzz_targets/<name>.rs` and `scripts/dev fuzz <name>` know
/// them.
pub const TARGETS: &[(&str, Target)] = &[
    ("credentials", credentials),
    ("string_to_sign", string_to_sign),
    ("body_nonce", body_nonce),
    ("route_matching", route_matching),
    ("config", config),
    ("admin_json", admin_json),
    ("store_record", store_record),
];

/// A fixed instant: the targets must be deterministic for a crash to reproduce.
const NOW: i64 = 1_790_000_000;

fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(NOW).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// Splits `data` into `N` fields at 0xFF bytes (which never occur in UTF-8), the last field
/// taking the rest. Missing fields are empty.
fn fields<const N: usize>(data: &[u8]) -> [&[u8]; N] {
    let mut out = [&[][..]; N];
    let mut rest = data;
    for (i, slot) in out.iter_mut().enumerate() {
        if i + 1 == N {
            *slot = rest;
            break;
        }
        match rest.iter().position(|&b| b == 0xFF) {
            Some(at) => {
                *slot = &rest[..at];
                rest = &rest[at + 1..];
            }
            None => {
                *slot = rest;
                rest = &[];
            }
        }
    }
    out
}

/// One master key for every execution: generating one per input costs more than most of
/// the targets' work, and which key seals a secret changes nothing they check.
fn master() -> &'static MasterKey {
    static MASTER: OnceLock<MasterKey> = OnceLock::new();
    MASTER.get_or_init(|| MasterKey::generate().0)
}

fn text(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(bytes)
}

/// Header lines `name: value` separated by `\n`, as a client could send them (lines that are
/// not a valid header are dropped, as the HTTP parser would refuse them before keygate).
fn header_map(data: &[u8]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            headers.append(n, v);
        }
    }
    headers
}

const CREDENTIAL_HEADERS: &[&str] = &[
    "x-api-public-key",
    "x-api-signature",
    "x-api-timestamp",
    "x-api-nonce",
    "x-api-key",
    "authorization",
];

fn is_nonce(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Credential headers (SPEC §3.4 step 3): a repeated credential header is always refused; an
/// accepted signed request has a well-formed key, timestamp and nonce.
pub fn credentials(data: &[u8]) {
    let headers = header_map(data);
    let result = auth::parse_credentials(&headers);
    let repeated = CREDENTIAL_HEADERS
        .iter()
        .any(|n| headers.get_all(*n).iter().count() > 1);
    match result {
        Ok(_) if repeated => panic!("a repeated credential header was accepted: {headers:?}"),
        Ok(Credentials::Signed {
            public_key,
            timestamp,
            nonce,
            ..
        }) => {
            assert!(crate::keys::secret::is_valid_public_key(public_key));
            assert!(timestamp.is_none_or(
                |t| (1..=12).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_digit())
            ));
            assert!(nonce.is_none_or(is_nonce), "nonce {nonce:?}");
            // The signature header is exactly 64 hex characters.
            let sig = headers
                .get("x-api-signature")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            assert!(sig.len() == 64 && sig.bytes().all(|b| b.is_ascii_hexdigit()));
        }
        Ok(Credentials::Bearer { .. }) => {
            assert!(headers.contains_key("authorization") || headers.contains_key("x-api-key"));
        }
        Err(e) => {
            // Every refusal here is one of step 3's two codes.
            assert!(
                matches!(
                    e,
                    AuthError::MissingCredentials(_) | AuthError::MalformedCredentials(_)
                ),
                "{e:?}"
            );
        }
    }
}

/// The `hmac-v1` string to sign: its printed form is exactly what the MAC is computed over,
/// six lines whose last is the body's SHA-256, whatever the fields hold.
pub fn string_to_sign(data: &[u8]) {
    let [timestamp, nonce, method, target, secret, body] = fields::<6>(data);
    let (timestamp, nonce, method, target) =
        (text(timestamp), text(nonce), text(method), text(target));
    let printed = signing::string_to_sign_v1(&timestamp, &nonce, &method, &target, body);
    let direct = signing::mac_v1(secret, &timestamp, &nonce, &method, &target, body);
    // The printed string, MACed as bytes, gives the same MAC as the streaming form.
    assert_eq!(signing::mac_body(secret, printed.as_bytes()), direct);
    if ![&timestamp, &nonce, &method, &target]
        .iter()
        .any(|f| f.contains('\n'))
    {
        let lines: Vec<&str> = printed.split('\n').collect();
        assert_eq!(lines.len(), 6, "{printed:?}");
        assert_eq!(lines[0], signing::V1_ALGORITHM);
        assert_eq!(lines[5].as_bytes(), signing::body_hash_hex(body));
    }
    // A different secret never gives the same MAC. (Not one with a NUL appended: HMAC pads
    // short keys with zeros, so those are the same key. Imported secrets refuse control
    // characters, so no two keygate secrets differ only so.)
    let mut other = secret.to_vec();
    other.push(1);
    assert_ne!(
        signing::mac_v1(&other, &timestamp, &nonce, &method, &target, body),
        direct
    );
}

struct BodyKey {
    key: ActiveKey,
    secret: SecretString,
}

fn hmac_body_key() -> &'static BodyKey {
    static KEY: OnceLock<BodyKey> = OnceLock::new();
    KEY.get_or_init(|| {
        let master = master();
        let secret = SecretString::new("sk_test_fuzzing_body_nonce".into());
        let new = NewKey {
            scopes: vec!["*".into()],
            ..NewKey::plain("fuzz", "fuzz", AuthKind::HmacBody)
        };
        let record = build_record(master, new, "pk_test_fuzz".into(), &secret, now());
        match ActiveKey::open(&record, master) {
            Ok(key) => BodyKey { key, secret },
            Err(e) => panic!("a freshly built record opens: {e}"),
        }
    })
}

/// The `hmac-body` nonce, read from a correctly signed JSON body: either a nonce of at most
/// 64 characters (what the nonce store keeps for `body_nonce_retention`) or `missing_nonce`;
/// a correctly signed body never reads as a bad signature.
pub fn body_nonce(data: &[u8]) {
    let BodyKey { key, secret } = hmac_body_key();
    let signature = signing::mac_body(secret.expose().as_bytes(), data);
    let creds = Credentials::Signed {
        public_key: "pk_test_fuzz",
        signature,
        timestamp: None,
        nonce: None,
    };
    let req = RequestParts {
        method: "POST",
        target: "/v1/payments",
        body: data,
        client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        client_cert: None,
    };
    let policy = Policy {
        clock_skew: Duration::from_secs(300),
        body_nonce_retention: Duration::from_secs(86_400),
    };
    match auth::check_signature(key, &creds, &req, now(), &policy) {
        Ok(Some(claim)) => {
            let v = claim.value.as_ref();
            assert!(
                is_nonce(v) || (v.len() <= 64 && !v.is_empty() && v.is_ascii()),
                "nonce {v:?}"
            );
            assert_eq!(claim.ttl, policy.body_nonce_retention);
        }
        Ok(None) => panic!("a signed request claims no nonce"),
        Err(AuthError::MissingNonce(_)) => {}
        Err(e) => panic!("a correctly signed body refused as {e:?}"),
    }
    // One flipped byte of the body is always a bad signature, never a nonce question.
    if let Some(first) = data.first() {
        let mut changed = data.to_vec();
        changed[0] = first ^ 1;
        let req = RequestParts {
            body: &changed,
            ..req
        };
        assert!(matches!(
            auth::check_signature(key, &creds, &req, now(), &policy),
            Err(AuthError::BadSignature)
        ));
    }
}

const ROUTES_TOML: &str = r#"
[[upstreams]]
name = "up"
endpoints = ["127.0.0.1:9"]

[[routes]]
path = "/public/*"
upstream = "up"
public = true

[[routes]]
methods = ["POST"]
path = "/v1/payments"
upstream = "up"
scope = "payments.write"

[[routes]]
methods = ["GET"]
path = "/v1/payments/*"
upstream = "up"
scope = "payments.read"

[[routes]]
path = "/v1/payments/refunds/*"
upstream = "up"
scope = "refunds.write"

[[routes]]
path = "/v1/*"
upstream = "up"
scope = "admin.all"

[[routes]]
methods = ["DELETE"]
path = "/v1/keys"
upstream = "up"
scope = "keys.delete"
"#;

fn routes() -> &'static (Router, Vec<crate::config::Route>) {
    static ROUTES: OnceLock<(Router, Vec<crate::config::Route>)> = OnceLock::new();
    ROUTES.get_or_init(|| match Config::from_toml(ROUTES_TOML) {
        Ok(c) => (Router::new(c.routes.clone()), c.routes),
        Err(e) => panic!("the fuzz routes parse: {e}"),
    })
}

/// What an upstream that normalises paths would route (RFC 3986 §6.2.2, plus the habits of
/// common servers): percent-escapes of unreserved characters, `.`, `/` and `\` decoded, `\`
/// read as `/`, empty and `.` segments dropped, `..` taking the segment before it away.
fn normalised(path: &str) -> String {
    let b = path.as_bytes();
    let mut bytes = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let escaped = (b[i] == b'%')
            .then(|| b.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok())
            .filter(|c| c.is_ascii_alphanumeric() || b"-._~/\\".contains(c));
        let c = match escaped {
            Some(c) => {
                i += 3;
                c
            }
            None => {
                i += 1;
                b[i - 1]
            }
        };
        bytes.push(if c == b'\\' { b'/' } else { c });
    }
    let decoded = String::from_utf8_lossy(&bytes);
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => {}
            ".." => {
                out.pop();
            }
            "" if i + 1 < segments.len() => {}
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

/// Route matching: the indexed router agrees with a plain first-match scan in config order,
/// and a path keygate accepts reads the same to an upstream that normalises it — so no
/// spelling reaches a route other than the one whose scope keygate checked.
pub fn route_matching(data: &[u8]) {
    let (router, list) = routes();
    let [method, path] = fields::<2>(data);
    let method = match method.first().map(|b| b % 5) {
        Some(0) => Method::POST,
        Some(1) => Method::DELETE,
        Some(2) => Method::PUT,
        Some(3) => Method::PATCH,
        _ => Method::GET,
    };
    let path = text(path);
    let path = path.split('?').next().unwrap_or_default();
    let expected = list.iter().position(|r| {
        r.path.matches(path) && (r.methods.is_empty() || r.methods.contains(&method))
    });
    assert_eq!(router.find(&method, path), expected, "{method} {path:?}");
    if check_path(path).is_ok() {
        let seen = normalised(path);
        // A trailing slash is kept by keygate; normalisation may drop it.
        let trimmed = |p: &str| p.trim_end_matches('/').to_owned();
        assert_eq!(
            trimmed(&seen),
            trimmed(path),
            "{path:?} reads as {seen:?} upstream"
        );
    }
    // A prefix route never matches its own prefix exactly (`/v1/*` is not `/v1/`).
    for r in list {
        if let PathPattern::Prefix(p) = &r.path {
            assert!(!r.path.matches(p));
        }
    }
}

/// The config parser: any text either loads or gives at least one problem, each with a
/// message, never a panic.
pub fn config(data: &[u8]) {
    match Config::from_toml(&text(data)) {
        Ok(c) => {
            for r in &c.routes {
                assert!(
                    r.upstream < c.upstreams.len(),
                    "route {} has no upstream",
                    r.name
                );
            }
        }
        Err(errors) => {
            assert!(!errors.0.is_empty());
            assert!(errors.0.iter().all(|e| !e.message.is_empty()));
        }
    }
}

fn record_for(new: NewKey, public_key: &str, secret: &SecretString) -> KeyRecord {
    build_record(master(), new, public_key.into(), secret, now())
}

/// A stored record becomes an [`ActiveKey`] whose identity headers say exactly what the record
/// says — never an empty or altered id, owner or scope.
fn assert_opens_faithfully(record: &KeyRecord) {
    match ActiveKey::open(record, master()) {
        Ok(key) => {
            assert_eq!(key.id(), record.id);
            assert_eq!(key.owner(), record.owner);
            assert_eq!(key.scopes().collect::<Vec<_>>(), record.scopes);
        }
        Err(e) => panic!("a record the admin API accepted does not open: {e}"),
    }
}

/// The admin API's JSON bodies: whatever is sent, validation answers (never panics), and what
/// it accepts becomes a record that opens into a key forwarding exactly its identity.
pub fn admin_json(data: &[u8]) {
    let at = now();
    if let Ok(new) = input::create_body(data, at, &input::Defaults::default()) {
        let secret = crate::keys::secret::generate_secret(new.environment);
        let record = record_for(new, "pk_test_fuzz", &secret);
        assert_opens_faithfully(&record);
    }
    if let Ok(input::Import {
        new,
        public_key,
        secret,
        ..
    }) = input::import_body(data, at)
    {
        assert!(crate::keys::secret::is_valid_public_key(&public_key));
        let record = record_for(new, &public_key, &secret);
        assert_opens_faithfully(&record);
        assert_eq!(record.public_key, public_key);
    }
    if let Ok(patch) = input::patch_body(data, at) {
        let secret = SecretString::new("sk_test_fuzz".into());
        let base = NewKey::plain("fuzz", "fuzz", AuthKind::HmacV1);
        let mut record = record_for(base, "pk_test_fuzz", &secret);
        patch.apply(&mut record);
        assert_opens_faithfully(&record);
    }
    let _ = input::credits_body(data);
    if let Ok(grace) = input::rotate_body(data) {
        assert!(grace >= time::Duration::ZERO && grace <= time::Duration::days(7));
    }
}

/// The record decoder (both stores write JSON; Redis keeps the usage counters beside it): a
/// document either decodes or is `Corrupt`; a decoded record encodes back to itself, and
/// opening it into a key fails cleanly or forwards exactly its identity.
pub fn store_record(data: &[u8]) {
    let [json, total, last] = fields::<3>(data);
    let Ok(mut record) = KeyRecord::decode(json) else {
        return;
    };
    record.set_usage(&text(total), &text(last));
    let again = record.encode().and_then(|bytes| KeyRecord::decode(&bytes));
    match again {
        Ok(again) => assert_eq!(again, record),
        Err(e) => panic!("a decoded record does not round-trip: {e}"),
    }
    if let Ok(key) = ActiveKey::open(&record, master()) {
        assert_eq!(key.id(), record.id);
        assert_eq!(key.owner(), record.owner);
    }
}

/// Seed inputs for every target, built from the signing test vectors (the JSON text of
/// `tests/fixtures/signing.json`), the example config and one of each admin body.
pub fn seeds(vectors_json: &str) -> Vec<(&'static str, Vec<u8>)> {
    use base64::Engine as _;
    let mut out: Vec<(&'static str, Vec<u8>)> = Vec::new();
    let join = |parts: &[&[u8]]| parts.join(&0xFF);
    let cases = serde_json::from_str::<serde_json::Value>(vectors_json)
        .ok()
        .and_then(|v| v.get("cases").and_then(|c| c.as_array()).cloned())
        .unwrap_or_default();
    for case in &cases {
        let field = |name: &str| case.get(name).and_then(|v| v.as_str()).unwrap_or_default();
        let body = base64::engine::general_purpose::STANDARD
            .decode(field("body_base64"))
            .unwrap_or_default();
        let (ts, nonce, method, target) = (
            field("timestamp"),
            field("nonce"),
            field("method"),
            field("target"),
        );
        out.push((
            "credentials",
            format!(
                "x-api-public-key: pk_test_vector\nx-api-signature: {}\nx-api-timestamp: {ts}\n\
                 x-api-nonce: {nonce}",
                field("signature")
            )
            .into_bytes(),
        ));
        out.push((
            "string_to_sign",
            join(&[
                ts.as_bytes(),
                nonce.as_bytes(),
                method.as_bytes(),
                target.as_bytes(),
                field("secret").as_bytes(),
                &body,
            ]),
        ));
        if !body.is_empty() {
            out.push(("body_nonce", body.clone()));
        }
        out.push((
            "route_matching",
            join(&[method.as_bytes(), target.as_bytes()]),
        ));
    }
    for headers in [
        "authorization: Bearer sk_test_abc",
        "x-api-key: sk_test_abc",
        "x-api-key: a\nx-api-key: b",
        "x-api-public-key: pk_test_a\nauthorization: Bearer x",
    ] {
        out.push(("credentials", headers.as_bytes().to_vec()));
    }
    for body in [
        r#"{"nonce": "n-1", "amount": "10.00"}"#,
        r#"{"nonce": 12345678901234567890}"#,
        r#"{"nonce": 1e308}"#,
    ] {
        out.push(("body_nonce", body.as_bytes().to_vec()));
    }
    for path in [
        "/public/x",
        "/v1/payments/../keys",
        "/v1/%2e%2e/x",
        "/v1//payments",
        "/V1/x",
    ] {
        out.push(("route_matching", join(&[b"GET", path.as_bytes()])));
    }
    out.push((
        "config",
        include_str!("../config/keygate.toml").as_bytes().to_vec(),
    ));
    out.push(("config", ROUTES_TOML.as_bytes().to_vec()));
    for body in [
        r#"{"owner":"acme","name":"checkout","description":"d","scopes":["payments.*","refunds.read"],
           "ip_allow_list":["10.0.0.0/8","2001:db8::/32","192.0.2.7"],"expires_at":"2030-01-01T00:00:00Z",
           "environment":"live","auth":"hmac-v1","metadata":{"team":"pay"},
           "rate_limits":[{"name":"burst","limit":100,"window":"1s"}],"remaining":100,
           "refill":{"interval":"daily","amount":10}}"#,
        r#"{"public_key":"pk_live_imported","secret":"s3cr3t","owner":"acme","name":"old","auth":"bearer"}"#,
        r#"{"name":"renamed","description":null,"scopes":[],"expires_at":null,"remaining":null}"#,
        r#"{"add": 5}"#,
        r#"{"grace_seconds": 3600}"#,
    ] {
        out.push(("admin_json", body.as_bytes().to_vec()));
    }
    for auth in [AuthKind::HmacV1, AuthKind::Bearer] {
        let new = NewKey {
            description: Some("seed".into()),
            scopes: vec!["payments.*".into()],
            ip_allow_list: "10.0.0.0/8".parse().into_iter().collect(),
            environment: Environment::Live,
            metadata: BTreeMap::from([("k".to_owned(), "v".to_owned())]),
            ..NewKey::plain("acme", "seed", auth)
        };
        let secret = SecretString::new("sk_live_seed".into());
        let record = record_for(new, "pk_live_seed", &secret);
        if let Ok(json) = record.encode() {
            out.push(("store_record", join(&[&json, b"12", b"1790000000000000"])));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_split_at_ff_and_the_last_takes_the_rest() {
        assert_eq!(
            fields::<3>(b"a\xFFb\xFFc\xFFd"),
            [&b"a"[..], b"b", b"c\xFFd"]
        );
        assert_eq!(fields::<3>(b"a"), [&b"a"[..], b"", b""]);
    }

    #[test]
    fn normalisation_model() {
        assert_eq!(normalised("/v1/a/../b"), "/v1/b");
        assert_eq!(normalised("/v1/%2E%2e/x"), "/x");
        assert_eq!(normalised("/v1//x"), "/v1/x");
        assert_eq!(normalised("/v1\\x"), "/v1/x");
        assert_eq!(normalised("/v1/x/"), "/v1/x/");
        assert_eq!(normalised("/v1/p%61yments"), "/v1/payments");
        assert_eq!(normalised("/v1/caf%C3%A9"), "/v1/caf%C3%A9");
    }
}
