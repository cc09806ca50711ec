//! Property tests (proptest): a request verifies if and only if it was signed with the key's
//! secret over exactly these bytes — any change to method, target, timestamp, nonce or body,
//! or another secret, flips it; scope wildcards and IP allow-lists against reference models.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::net::IpAddr;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;
use keygate::auth::client_ip::AllowList;
use keygate::auth::{check_key, parse_credentials, Policy, RequestParts};
use keygate::cli::sign::{self, SignRequest};
use keygate::keys::{
    build_record, scopes_grant, ActiveKey, AuthKind, AuthKinds, MasterKey, NewKey, SecretString,
};
use proptest::prelude::*;
use time::OffsetDateTime;

const NOW: i64 = 1_790_000_000;

fn active_key(secret: &str) -> ActiveKey {
    let (master, _) = MasterKey::generate();
    let new = NewKey {
        scopes: vec!["*".into()],
        ..NewKey::plain("acme", "prop", AuthKind::HmacV1)
    };
    let now = OffsetDateTime::from_unix_timestamp(NOW).unwrap();
    let record = build_record(
        &master,
        new,
        "pk_test_prop".into(),
        &SecretString::new(secret.into()),
        now,
    );
    ActiveKey::open(&record, &master).unwrap()
}

/// What a client signs, and one way the request that arrives may differ from it.
#[derive(Debug, Clone)]
struct Case {
    method: String,
    target: String,
    body: Vec<u8>,
    nonce: String,
    skew: i64,
    change: usize,
    byte: u8,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::sample::select(vec!["GET", "POST", "PUT", "PATCH", "DELETE"]),
        "/[a-z0-9/._-]{0,24}(\\?[a-z0-9=&%]{0,16})?",
        prop::collection::vec(any::<u8>(), 0..512),
        "[A-Za-z0-9_-]{1,64}",
        -250i64..250,
        0usize..7,
        any::<u8>(),
    )
        .prop_map(|(method, target, body, nonce, skew, change, byte)| Case {
            method: method.into(),
            target,
            body,
            nonce,
            skew,
            change,
            byte,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn a_request_verifies_iff_signed_over_exactly_these_bytes(c in case()) {
        let secret = "sk_test_property_secret_0123456789";
        let key = active_key(secret);
        let ts = NOW + c.skew;
        let signed = sign::headers(&SignRequest {
            scheme: AuthKind::HmacV1,
            public_key: "pk_test_prop".into(),
            secret: if c.change == 6 { format!("{secret}x") } else { secret.into() },
            method: c.method.clone(),
            target: c.target.clone(),
            body: c.body.clone(),
            timestamp: ts,
            nonce: c.nonce.clone(),
        });
        // The request as it arrives: one field changed (or none).
        let (mut method, mut target, mut body) = (c.method.clone(), c.target.clone(), c.body.clone());
        let mut headers = HeaderMap::new();
        for (name, value) in signed {
            let value = match (name, c.change) {
                ("x-api-timestamp", 3) => (ts + 1).to_string(),
                ("x-api-nonce", 4) => {
                    // Same length, one character different.
                    let first = if value.starts_with('Z') { "Y" } else { "Z" };
                    format!("{first}{}", &value[1..])
                }
                _ => value,
            };
            headers.insert(HeaderName::from_static(name), HeaderValue::from_str(&value).unwrap());
        }
        match c.change {
            1 => method = if method == "GET" { "HEAD".into() } else { "GET".into() },
            2 => target.push(char::from(b'a' + c.byte % 26)),
            5 if body.is_empty() => body.push(c.byte),
            5 => {
                let i = usize::from(c.byte) % body.len();
                body[i] ^= 1 | c.byte;
            }
            _ => {}
        }
        let creds = parse_credentials(&headers).unwrap();
        let req = RequestParts {
            method: &method,
            target: &target,
            body: &body,
            client_ip: IpAddr::from([192, 0, 2, 1]),
            client_cert: None,
        };
        let policy = Policy {
            clock_skew: Duration::from_secs(300),
            body_nonce_retention: Duration::from_secs(86_400),
        };
        let now = OffsetDateTime::from_unix_timestamp(NOW).unwrap();
        let verified = check_key(&key, &creds, &req, AuthKinds::ALL, now, &policy);
        prop_assert_eq!(verified.is_ok(), c.change == 0, "{:?}: {:?}", c, verified.err());
    }

    #[test]
    fn scope_wildcards_match_the_reference(
        held in prop::collection::vec(scope(true), 0..4),
        wanted in scope(false),
    ) {
        let reference = held.iter().any(|h| {
            h == "*" || *h == wanted || h.strip_suffix(".*").is_some_and(|prefix| {
                wanted.split('.').count() > prefix.split('.').count()
                    && wanted.split('.').zip(prefix.split('.')).all(|(w, p)| w == p)
            })
        });
        prop_assert_eq!(scopes_grant(&held, &wanted), reference, "{:?} wanted {}", held, wanted);
    }

    #[test]
    fn allow_lists_match_ipnet(
        nets in prop::collection::vec(net(), 0..6),
        ip in address(),
    ) {
        let list = AllowList::new(&nets);
        // Documented: v4 and v6 apart, a v4-mapped v6 address checked as v4.
        let reference = nets.iter().any(|n| n.contains(&ip.to_canonical()));
        prop_assert_eq!(list.contains(ip), reference, "{:?} {}", nets, ip);
    }
}

/// Scopes of up to three segments from a small alphabet (so matches happen), optionally a
/// wildcard.
fn scope(wildcard: bool) -> impl Strategy<Value = String> {
    let segs = prop::collection::vec(prop::sample::select(vec!["a", "b", "ab"]), 1..4);
    (segs, any::<bool>(), any::<bool>()).prop_map(move |(segs, star, all)| {
        if wildcard && all {
            "*".into()
        } else if wildcard && star {
            format!("{}.*", segs.join("."))
        } else {
            segs.join(".")
        }
    })
}

/// Addresses near each other (so nets catch them), v4, v6 and v4-mapped v6.
fn address() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        (0u8..4, any::<u8>()).prop_map(|(c, d)| IpAddr::from([10, 0, c, d])),
        (0u16..4, any::<u16>()).prop_map(|(g, h)| IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, g, h])),
        (0u8..4, any::<u8>()).prop_map(|(c, d)| {
            IpAddr::V6(std::net::Ipv4Addr::new(10, 0, c, d).to_ipv6_mapped())
        }),
    ]
}

fn net() -> impl Strategy<Value = IpNet> {
    (address(), 0u8..129).prop_map(|(ip, len)| {
        let max = if ip.is_ipv4() { 32 } else { 128 };
        IpNet::new(ip, len.min(max)).unwrap().trunc()
    })
}
