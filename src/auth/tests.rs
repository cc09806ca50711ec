//! Unit tests of the pure auth decision, including every case of the signing vectors.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use http::{HeaderMap, HeaderValue};
use time::OffsetDateTime;

use super::*;
use crate::keys::{build_record, Environment, MasterKey, NewKey, SecretString};

const VECTORS: &str = include_str!("../../tests/fixtures/signing.json");

fn vectors() -> Vec<serde_json::Value> {
    let doc: serde_json::Value = serde_json::from_str(VECTORS).unwrap_or_default();
    doc["cases"].as_array().cloned().unwrap_or_default()
}

fn s<'a>(case: &'a serde_json::Value, field: &str) -> &'a str {
    case[field].as_str().unwrap_or_default()
}

fn body_of(case: &serde_json::Value) -> Vec<u8> {
    B64.decode(s(case, "body_base64")).unwrap_or_default()
}

#[test]
fn every_signing_vector_passes() {
    let cases = vectors();
    assert_eq!(cases.len(), 8, "fixture lost cases");
    let mut checked = 0;
    for case in &cases {
        let secret = s(case, "secret").as_bytes();
        match s(case, "scheme") {
            "hmac-v1" => {
                let body = body_of(case);
                let (t, n, m, target) = (
                    s(case, "timestamp"),
                    s(case, "nonce"),
                    s(case, "method"),
                    s(case, "target"),
                );
                assert_eq!(
                    signing::string_to_sign_v1(t, n, m, target, &body),
                    s(case, "string_to_sign"),
                    "{}",
                    s(case, "note")
                );
                let mac = signing::mac_v1(secret, t, n, m, target, &body);
                assert_eq!(
                    hex::encode(mac),
                    s(case, "signature"),
                    "{}",
                    s(case, "note")
                );
            }
            "hmac-body" => {
                let mac = signing::mac_body(secret, &body_of(case));
                assert_eq!(
                    hex::encode(mac),
                    s(case, "signature"),
                    "{}",
                    s(case, "note")
                );
            }
            "bearer" => {
                let hash = SecretString::new(s(case, "secret").to_owned()).sha256();
                assert_eq!(hex::encode(hash), s(case, "sha256"));
            }
            other => panic!("unknown scheme {other}"),
        }
        checked += 1;
    }
    assert_eq!(checked, cases.len());
}

#[test]
fn hmac_body_vectors_yield_their_nonce() {
    let nonces: Vec<String> = vectors()
        .iter()
        .filter(|c| s(c, "scheme") == "hmac-body")
        .filter_map(|c| body_nonce(&body_of(c)).ok())
        .collect();
    assert_eq!(
        nonces,
        vec![
            "1643881172430".to_owned(),
            "6f1c2d7e-0a4b-4e2b-9d3c-1b2a3c4d5e6f".to_owned()
        ]
    );
}

// --- the decision, with a pinned clock ------------------------------------------------

const NOW: i64 = 1_767_225_600;
const POLICY: Policy = Policy {
    clock_skew: Duration::from_secs(300),
    body_nonce_retention: Duration::from_secs(86_400),
};

struct Fixture {
    key: ActiveKey,
    secret: SecretString,
}

fn fixture(auth: AuthKind, edit: impl FnOnce(&mut NewKey)) -> Fixture {
    let (mk, _) = MasterKey::generate();
    let mut new = NewKey {
        owner: "acme".into(),
        name: "test".into(),
        description: None,
        scopes: vec!["payments.*".into()],
        ip_allow_list: vec![],
        expires_at: None,
        environment: Environment::Test,
        auth,
        metadata: BTreeMap::new(),
        tls_client_cert_sha256: None,
        rate_limits: vec![],
        remaining: None,
        refill: None,
    };
    edit(&mut new);
    let secret = SecretString::new("sk_test_4eC39HqLyjWDarjtT1zdp7dc4eC39HqLyjWDarjtT1z".into());
    let record = build_record(
        &mk,
        new,
        "pk_test_aaaaaaaaaaaaaaaaaaaaaaaa".into(),
        &secret,
        now(),
    );
    let key = ActiveKey::open(&record, &mk).unwrap_or_else(|e| panic!("{e}"));
    Fixture { key, secret }
}

fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(NOW).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
}

fn v1_headers(secret: &SecretString, ts: i64, nonce: &str, target: &str, body: &[u8]) -> HeaderMap {
    let mac = signing::mac_v1(
        secret.expose().as_bytes(),
        &ts.to_string(),
        nonce,
        "POST",
        target,
        body,
    );
    let mut h = HeaderMap::new();
    h.insert(
        H_PUBLIC_KEY,
        HeaderValue::from_static("pk_test_aaaaaaaaaaaaaaaaaaaaaaaa"),
    );
    h.insert(H_TIMESTAMP, HeaderValue::from(ts));
    h.insert(
        H_NONCE,
        HeaderValue::from_str(nonce).unwrap_or(HeaderValue::from_static("x")),
    );
    h.insert(
        H_SIGNATURE,
        HeaderValue::from_str(&hex::encode(mac)).unwrap_or(HeaderValue::from_static("x")),
    );
    h
}

fn req<'a>(body: &'a [u8], client: &str) -> RequestParts<'a> {
    RequestParts {
        method: "POST",
        target: "/v1/payments",
        body,
        client_ip: ip(client),
        client_cert: None,
    }
}

fn run(
    f: &Fixture,
    headers: &HeaderMap,
    body: &[u8],
    client: &str,
) -> Result<Option<String>, AuthError> {
    let creds = parse_credentials(headers)?;
    check_key(
        &f.key,
        &creds,
        &req(body, client),
        AuthKinds::ALL,
        now(),
        &POLICY,
    )
    .map(|c| c.map(|c| c.value.into_owned()))
}

#[test]
fn valid_v1_request_yields_its_nonce() {
    let f = fixture(AuthKind::HmacV1, |_| {});
    let h = v1_headers(&f.secret, NOW, "n-1", "/v1/payments", b"{}");
    assert_eq!(run(&f, &h, b"{}", "1.2.3.4"), Ok(Some("n-1".into())));
}

#[test]
fn tampered_body_is_bad_signature() {
    let f = fixture(AuthKind::HmacV1, |_| {});
    let h = v1_headers(&f.secret, NOW, "n-1", "/v1/payments", b"{\"amount\":1}");
    assert_eq!(
        run(&f, &h, b"{\"amount\":9}", "1.2.3.4"),
        Err(AuthError::BadSignature)
    );
}

#[test]
fn timestamp_window_is_inclusive_and_both_ways() {
    let f = fixture(AuthKind::HmacV1, |_| {});
    for (offset, ok) in [(-300, true), (300, true), (-301, false), (301, false)] {
        let h = v1_headers(&f.secret, NOW + offset, "n", "/v1/payments", b"");
        let got = run(&f, &h, b"", "1.2.3.4");
        assert_eq!(got.is_ok(), ok, "offset {offset}: {got:?}");
        if !ok {
            assert_eq!(got, Err(AuthError::StaleTimestamp(300)));
        }
    }
}

#[test]
fn stale_timestamp_is_checked_before_the_signature() {
    let f = fixture(AuthKind::HmacV1, |_| {});
    let mut h = v1_headers(&f.secret, NOW - 1000, "n", "/v1/payments", b"");
    h.insert(
        H_SIGNATURE,
        HeaderValue::from_static(
            "00000000000000000000000000000000000000000000000000000000000000ff",
        ),
    );
    assert_eq!(
        run(&f, &h, b"", "1.2.3.4"),
        Err(AuthError::StaleTimestamp(300))
    );
}

#[test]
fn revoked_beats_expired_beats_ip() {
    let f = fixture(AuthKind::HmacV1, |n| {
        n.expires_at = Some(now() - time::Duration::seconds(1));
        n.ip_allow_list = vec!["10.0.0.0/8".parse().unwrap_or_else(|_| unreachable!())];
    });
    let h = v1_headers(&f.secret, NOW, "n", "/v1/payments", b"");
    assert_eq!(run(&f, &h, b"", "1.2.3.4"), Err(AuthError::Expired));
    let mut revoked = fixture(AuthKind::HmacV1, |n| n.expires_at = Some(now()));
    revoked.key.revoked_at = Some(now());
    let h = v1_headers(&revoked.secret, NOW, "n", "/v1/payments", b"");
    assert_eq!(run(&revoked, &h, b"", "1.2.3.4"), Err(AuthError::Revoked));
}

#[test]
fn allow_list_admits_listed_and_refuses_others() {
    let f = fixture(AuthKind::HmacV1, |n| {
        n.ip_allow_list = ["10.0.0.0/8", "2001:db8::1/128"]
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect();
    });
    let h = v1_headers(&f.secret, NOW, "n", "/v1/payments", b"");
    assert!(run(&f, &h, b"", "10.1.2.3").is_ok());
    assert!(run(&f, &h, b"", "2001:db8::1").is_ok());
    assert_eq!(
        run(&f, &h, b"", "11.0.0.1"),
        Err(AuthError::IpNotAllowed(ip("11.0.0.1")))
    );
}

#[test]
fn v1_key_without_timestamp_or_nonce_is_missing_credentials() {
    let f = fixture(AuthKind::HmacV1, |_| {});
    let mut h = v1_headers(&f.secret, NOW, "n", "/v1/payments", b"");
    h.remove(H_NONCE);
    assert_eq!(
        run(&f, &h, b"", "1.2.3.4"),
        Err(AuthError::MissingCredentials("x-api-nonce is missing"))
    );
    h.remove(H_TIMESTAMP);
    assert_eq!(
        run(&f, &h, b"", "1.2.3.4"),
        Err(AuthError::MissingCredentials("x-api-timestamp is missing"))
    );
}

fn body_headers(secret: &SecretString, body: &[u8]) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        H_PUBLIC_KEY,
        HeaderValue::from_static("pk_test_aaaaaaaaaaaaaaaaaaaaaaaa"),
    );
    let mac = hex::encode(signing::mac_body(secret.expose().as_bytes(), body));
    h.insert(
        H_SIGNATURE,
        HeaderValue::from_str(&mac).unwrap_or(HeaderValue::from_static("x")),
    );
    h
}

#[test]
fn hmac_body_needs_a_nonce_only_after_the_signature() {
    let f = fixture(AuthKind::HmacBody, |_| {});
    let body = br#"{"amount":1,"nonce":42}"#;
    assert_eq!(
        run(&f, &body_headers(&f.secret, body), body, "1.2.3.4"),
        Ok(Some("42".into()))
    );
    let no_nonce = br#"{"amount":1}"#;
    assert_eq!(
        run(&f, &body_headers(&f.secret, no_nonce), no_nonce, "1.2.3.4"),
        Err(AuthError::MissingNonce("the body has no nonce field"))
    );
    // A forged request without a nonce is a bad signature, not a missing nonce.
    assert_eq!(
        run(&f, &body_headers(&f.secret, body), no_nonce, "1.2.3.4"),
        Err(AuthError::BadSignature)
    );
    assert!(matches!(
        run(&f, &body_headers(&f.secret, b""), b"", "1.2.3.4"),
        Err(AuthError::MissingNonce(_))
    ));
}

#[test]
fn bearer_key_matches_by_hash() {
    let f = fixture(AuthKind::Bearer, |_| {});
    let mut h = HeaderMap::new();
    let auth = format!("Bearer {}", f.secret.expose());
    h.insert(
        "authorization",
        HeaderValue::from_str(&auth).unwrap_or(HeaderValue::from_static("x")),
    );
    assert_eq!(run(&f, &h, b"", "1.2.3.4"), Ok(None));
    let mut h = HeaderMap::new();
    h.insert(H_API_KEY, HeaderValue::from_static("sk_test_wrong"));
    assert_eq!(run(&f, &h, b"", "1.2.3.4"), Err(AuthError::BadSignature));
}

#[test]
fn route_kinds_are_enforced() {
    let f = fixture(AuthKind::Bearer, |_| {});
    let mut h = HeaderMap::new();
    h.insert(
        H_API_KEY,
        HeaderValue::from_str(f.secret.expose()).unwrap_or(HeaderValue::from_static("x")),
    );
    let creds = parse_credentials(&h).unwrap_or_else(|e| panic!("{e}"));
    let only_v1 = AuthKinds::from_kinds([AuthKind::HmacV1]);
    assert_eq!(
        check_key(
            &f.key,
            &creds,
            &req(b"", "1.2.3.4"),
            only_v1,
            now(),
            &POLICY
        ),
        Err(AuthError::KindNotAccepted("bearer"))
    );
}

#[test]
fn credential_shapes() {
    let mut h = HeaderMap::new();
    assert!(matches!(
        parse_credentials(&h),
        Err(AuthError::MissingCredentials(_))
    ));
    h.insert(
        H_PUBLIC_KEY,
        HeaderValue::from_static("pk_test_aaaaaaaaaaaaaaaaaaaaaaaa"),
    );
    assert!(matches!(
        parse_credentials(&h),
        Err(AuthError::MissingCredentials(_))
    ));
    h.insert(H_SIGNATURE, HeaderValue::from_static("abc"));
    assert!(matches!(
        parse_credentials(&h),
        Err(AuthError::MalformedCredentials(_))
    ));
    h.insert(
        H_SIGNATURE,
        HeaderValue::from_static(
            "00000000000000000000000000000000000000000000000000000000000000ff",
        ),
    );
    h.insert(H_NONCE, HeaderValue::from_static("has space"));
    assert!(matches!(
        parse_credentials(&h),
        Err(AuthError::MalformedCredentials(_))
    ));
    h.insert(H_NONCE, HeaderValue::from_static("ok"));
    h.insert(H_TIMESTAMP, HeaderValue::from_static("12a"));
    assert!(matches!(
        parse_credentials(&h),
        Err(AuthError::MalformedCredentials(_))
    ));
    h.insert(H_TIMESTAMP, HeaderValue::from_static("12"));
    assert!(parse_credentials(&h).is_ok());
    h.insert(H_PUBLIC_KEY, HeaderValue::from_static("pk test oops"));
    assert!(matches!(
        parse_credentials(&h),
        Err(AuthError::MalformedCredentials(_))
    ));
    let mut b = HeaderMap::new();
    b.insert("authorization", HeaderValue::from_static("Basic abc"));
    assert!(matches!(
        parse_credentials(&b),
        Err(AuthError::MalformedCredentials(_))
    ));
}

#[test]
fn scope_check() {
    let f = fixture(AuthKind::HmacV1, |_| {});
    assert_eq!(check_scope(&f.key, Some("payments.create")), Ok(()));
    assert_eq!(check_scope(&f.key, None), Ok(()));
    assert_eq!(
        check_scope(&f.key, Some("payouts.create")),
        Err(AuthError::InsufficientScope("payouts.create".into()))
    );
}

// --- rotation grace, with the clock pinned -------------------------------------------

fn rotated(auth: AuthKind, grace_secs: i64) -> (Fixture, SecretString, SecretString) {
    let (mk, _) = MasterKey::generate();
    let old = SecretString::new("sk_test_oldoldoldoldoldoldoldoldoldoldoldoldold1234".into());
    let new = NewKey {
        owner: "acme".into(),
        name: "rot".into(),
        description: None,
        scopes: vec![],
        ip_allow_list: vec![],
        expires_at: None,
        environment: Environment::Test,
        auth,
        metadata: BTreeMap::new(),
        tls_client_cert_sha256: None,
        rate_limits: vec![],
        remaining: None,
        refill: None,
    };
    let mut record = build_record(
        &mk,
        new,
        "pk_test_aaaaaaaaaaaaaaaaaaaaaaaa".into(),
        &old,
        now(),
    );
    let fresh = crate::keys::rotate(&mk, &mut record, time::Duration::seconds(grace_secs), now());
    let key = ActiveKey::open(&record, &mk).unwrap();
    (
        Fixture {
            key,
            secret: fresh.clone(),
        },
        old,
        fresh,
    )
}

fn check_at(f: &Fixture, h: &HeaderMap, at: i64) -> Result<Option<String>, AuthError> {
    let creds = parse_credentials(h)?;
    let when = OffsetDateTime::from_unix_timestamp(at).unwrap();
    check_key(
        &f.key,
        &creds,
        &req(b"", "1.2.3.4"),
        AuthKinds::ALL,
        when,
        &POLICY,
    )
    .map(|c| c.map(|c| c.value.into_owned()))
}

#[test]
fn both_secrets_verify_during_grace_and_only_the_new_one_after() {
    let (f, old, fresh) = rotated(AuthKind::HmacV1, 60);
    for (at, old_ok) in [
        (NOW, true),
        (NOW + 59, true),
        (NOW + 60, false),
        (NOW + 3600, false),
    ] {
        let h_old = v1_headers(&old, at, "n", "/v1/payments", b"");
        let h_new = v1_headers(&fresh, at, "n", "/v1/payments", b"");
        assert!(
            check_at(&f, &h_new, at).is_ok(),
            "new secret at +{}",
            at - NOW
        );
        assert_eq!(
            check_at(&f, &h_old, at).is_ok(),
            old_ok,
            "old secret at +{}",
            at - NOW
        );
    }
}

#[test]
fn rotation_without_grace_drops_the_old_secret_at_once() {
    let (f, old, _) = rotated(AuthKind::HmacV1, 0);
    assert!(f.key.previous.is_none());
    let h = v1_headers(&old, NOW, "n", "/v1/payments", b"");
    assert_eq!(check_at(&f, &h, NOW), Err(AuthError::BadSignature));
}

#[test]
fn bearer_rotation_grace_uses_the_previous_hash() {
    let (f, old, fresh) = rotated(AuthKind::Bearer, 30);
    let bearer = |s: &SecretString| {
        let mut h = HeaderMap::new();
        h.insert(H_API_KEY, HeaderValue::from_str(s.expose()).unwrap());
        h
    };
    assert!(check_at(&f, &bearer(&old), NOW + 29).is_ok());
    assert_eq!(
        check_at(&f, &bearer(&old), NOW + 30),
        Err(AuthError::BadSignature)
    );
    assert!(check_at(&f, &bearer(&fresh), NOW + 30).is_ok());
}

#[test]
fn a_second_rotation_ends_the_first_grace() {
    let (mk, _) = MasterKey::generate();
    let first = SecretString::new("sk_test_firstfirstfirstfirstfirstfirstfirstfirst12".into());
    let new = NewKey {
        owner: "acme".into(),
        name: "rot".into(),
        description: None,
        scopes: vec![],
        ip_allow_list: vec![],
        expires_at: None,
        environment: Environment::Test,
        auth: AuthKind::HmacV1,
        metadata: BTreeMap::new(),
        tls_client_cert_sha256: None,
        rate_limits: vec![],
        remaining: None,
        refill: None,
    };
    let mut record = build_record(
        &mk,
        new,
        "pk_test_aaaaaaaaaaaaaaaaaaaaaaaa".into(),
        &first,
        now(),
    );
    let second = crate::keys::rotate(&mk, &mut record, time::Duration::hours(1), now());
    let third = crate::keys::rotate(&mk, &mut record, time::Duration::hours(1), now());
    let f = Fixture {
        key: ActiveKey::open(&record, &mk).unwrap(),
        secret: third.clone(),
    };
    let at = NOW + 10;
    assert!(check_at(&f, &v1_headers(&third, at, "n", "/v1/payments", b""), at).is_ok());
    assert!(check_at(&f, &v1_headers(&second, at, "n", "/v1/payments", b""), at).is_ok());
    assert_eq!(
        check_at(&f, &v1_headers(&first, at, "n", "/v1/payments", b""), at),
        Err(AuthError::BadSignature),
        "the first secret's grace must end with the second rotation"
    );
}
