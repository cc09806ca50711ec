//! Criterion micro-benchmarks of the hot path: one verification per scheme and body size, a
//! cached key lookup, the nonce check, route matching (10 and 1,000 routes), the IP
//! allow-list (1 and 1,000 CIDRs), the checks of a request head before routing (path,
//! `Content-Length`, credential parsing with its ambiguity checks) against route matching as
//! their in-run baseline, and a SHA-256 of the same body as the in-run baseline of
//! verification (the irreducible cost: every v1 verification hashes the body once).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

/// The gateway's allocator, so allocation on the measured paths costs what it does in `serve`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use keygate::auth::client_ip::AllowList;
use keygate::auth::{check_key, parse_credentials, signing, Policy, RequestParts};
use keygate::cache::KeyCache;
use keygate::config::CacheConfig;
use keygate::keys::{
    build_record, ActiveKey, AuthKind, AuthKinds, EmbeddedStore, Environment, KeyStore, MasterKey,
    NewKey, SecretString,
};
use keygate::metrics::Metrics;
use keygate::proxy::Router;
use keygate::Config;
use sha2::Digest;
use time::OffsetDateTime;

const SECRET: &str = "sk_test_4eC39HqLyjWDarjtT1zdp7dc4eC39HqLyjWDarjtT1z";
const PK: &str = "pk_test_aaaaaaaaaaaaaaaaaaaaaaaa";
const POLICY: Policy = Policy {
    clock_skew: Duration::from_secs(300),
    body_nonce_retention: Duration::from_secs(86_400),
};

fn key(auth: AuthKind) -> (ActiveKey, MasterKey) {
    let (record, mk) = key_record(auth);
    (ActiveKey::open(&record, &mk).unwrap(), mk)
}

fn key_record(auth: AuthKind) -> (keygate::keys::KeyRecord, MasterKey) {
    let (mk, _) = MasterKey::generate();
    let new = NewKey {
        owner: "acme".into(),
        name: "bench".into(),
        description: None,
        scopes: vec!["payments.*".into()],
        ip_allow_list: vec![
            "10.0.0.0/8".parse().unwrap(),
            "127.0.0.0/8".parse().unwrap(),
        ],
        expires_at: None,
        environment: Environment::Test,
        auth,
        metadata: BTreeMap::new(),
        tls_client_cert_sha256: None,
        rate_limits: vec![],
        remaining: None,
        refill: None,
    };
    let record = build_record(
        &mk,
        new,
        PK.into(),
        &SecretString::new(SECRET.into()),
        OffsetDateTime::now_utc(),
    );
    (record, mk)
}

fn headers(pairs: &[(&'static str, String)]) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    for (k, v) in pairs {
        h.insert(*k, v.parse().unwrap());
    }
    h
}

fn bench_verify(c: &mut Criterion) {
    let now = OffsetDateTime::now_utc();
    let ts = now.unix_timestamp().to_string();
    let ip: IpAddr = "127.0.0.1".parse().unwrap();
    let (v1, _) = key(AuthKind::HmacV1);
    let mut g = c.benchmark_group("verify");
    for size in [0usize, 1024, 64 * 1024] {
        let body = vec![b'a'; size];
        let mac = signing::mac_v1(
            SECRET.as_bytes(),
            &ts,
            "nonce-1",
            "POST",
            "/v1/payments",
            &body,
        );
        let h = headers(&[
            ("x-api-public-key", PK.into()),
            ("x-api-timestamp", ts.clone()),
            ("x-api-nonce", "nonce-1".into()),
            ("x-api-signature", hex::encode(mac)),
        ]);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(
            BenchmarkId::new("baseline_sha256", size),
            &body,
            |b, body| {
                b.iter(|| black_box(sha2::Sha256::digest(black_box(body))));
            },
        );
        g.bench_with_input(BenchmarkId::new("hmac_v1", size), &body, |b, body| {
            b.iter(|| {
                let creds = parse_credentials(black_box(&h)).unwrap();
                let req = RequestParts {
                    method: "POST",
                    target: "/v1/payments",
                    body,
                    client_ip: ip,
                    client_cert: None,
                };
                black_box(check_key(&v1, &creds, &req, AuthKinds::ALL, now, &POLICY).unwrap());
            });
        });
    }
    let (hb, _) = key(AuthKind::HmacBody);
    let body = format!(
        "{{\"amount\":\"10.00\",\"pad\":\"{}\",\"nonce\":1643881172430}}",
        "x".repeat(990)
    )
    .into_bytes();
    let h = headers(&[
        ("x-api-public-key", PK.into()),
        (
            "x-api-signature",
            hex::encode(signing::mac_body(SECRET.as_bytes(), &body)),
        ),
    ]);
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("hmac_body/1KiB", |b| {
        b.iter(|| {
            let creds = parse_credentials(black_box(&h)).unwrap();
            let req = RequestParts {
                method: "POST",
                target: "/v1/payments",
                body: &body,
                client_ip: ip,
                client_cert: None,
            };
            black_box(check_key(&hb, &creds, &req, AuthKinds::ALL, now, &POLICY).unwrap());
        });
    });
    let (bearer, _) = key(AuthKind::Bearer);
    let h = headers(&[("authorization", format!("Bearer {SECRET}"))]);
    g.throughput(Throughput::Elements(1));
    g.bench_function("bearer", |b| {
        b.iter(|| {
            let creds = parse_credentials(black_box(&h)).unwrap();
            let req = RequestParts {
                method: "POST",
                target: "/v1/payments",
                body: b"",
                client_ip: ip,
                client_cert: None,
            };
            black_box(check_key(&bearer, &creds, &req, AuthKinds::ALL, now, &POLICY).unwrap());
        });
    });
    g.finish();
}

fn bench_lookups(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn KeyStore> =
        Arc::new(EmbeddedStore::open(&dir.path().join("bench.db")).unwrap());
    let (record, mk) = key_record(AuthKind::HmacV1);
    rt.block_on(store.insert(&record)).unwrap();
    let cfg = CacheConfig {
        capacity: 1000,
        ttl: Duration::from_secs(3600),
        negative_ttl: Duration::from_secs(5),
        stale_if_error: Duration::from_secs(600),
    };
    let cache = KeyCache::new(
        Arc::clone(&store),
        Arc::new(mk),
        Metrics::new().unwrap(),
        &cfg,
    );
    rt.block_on(cache.by_public_key(PK)).unwrap().unwrap();
    let mut g = c.benchmark_group("lookup");
    g.bench_function("baseline_block_on_noop", |b| {
        b.iter(|| rt.block_on(async { black_box(1) }))
    });
    g.bench_function("cached_key", |b| {
        b.iter(|| black_box(rt.block_on(cache.by_public_key(black_box(PK))).unwrap()))
    });
    let mut n = 0u64;
    g.bench_function("embedded_nonce_check", |b| {
        b.iter(|| {
            n += 1;
            let nonce = format!("n-{n}");
            black_box(
                rt.block_on(store.use_nonce("key_bench", &nonce, Duration::from_secs(600)))
                    .unwrap(),
            )
        });
    });
    g.finish();
}

/// A config with `n` routes, alternating exact and prefix patterns, all on one upstream.
fn routes(n: usize) -> Vec<keygate::config::Route> {
    let mut toml = String::from("[[upstreams]]\nname = \"u\"\nendpoints = [\"127.0.0.1:1\"]\n");
    for i in 0..n {
        let path = if i % 2 == 0 {
            format!("/v1/r{i}")
        } else {
            format!("/v1/p{i}/*")
        };
        toml.push_str(&format!(
            "[[routes]]\npath = \"{path}\"\nmethods = [\"POST\"]\nscope = \"s\"\nupstream = \"u\"\n"
        ));
    }
    Config::from_toml(&toml).unwrap().routes
}

fn bench_routes(c: &mut Criterion) {
    let mut g = c.benchmark_group("route");
    for n in [10usize, 1000] {
        let list = routes(n);
        let r = Router::new(list.clone());
        // Baseline: the plain first-match scan in config order that the index replaces.
        let scan = |m: &http::Method, path: &str| {
            list.iter().position(|r| {
                r.path.matches(path) && (r.methods.is_empty() || r.methods.contains(m))
            })
        };
        // The worst cases of a first-match scan: the last route, and no route at all.
        let last = format!("/v1/p{}/x/y", n - 1);
        assert_eq!(r.find(&http::Method::POST, &last), Some(n - 1));
        g.bench_function(BenchmarkId::new("last_route", n), |b| {
            b.iter(|| black_box(r.find(&http::Method::POST, black_box(&last))))
        });
        g.bench_function(BenchmarkId::new("baseline_scan_last_route", n), |b| {
            b.iter(|| black_box(scan(&http::Method::POST, black_box(&last))))
        });
        g.bench_function(BenchmarkId::new("no_route", n), |b| {
            b.iter(|| black_box(r.find(&http::Method::POST, black_box("/v2/none/at/all"))))
        });
    }
    g.finish();
}

fn bench_allow_list(c: &mut Criterion) {
    let mut g = c.benchmark_group("ip_allow_list");
    for n in [1usize, 1000] {
        // n /24s from 10.0.0.0 with a gap after each, so none merge; the client sits in the
        // last one.
        let net = |i: usize| format!("10.{}.{}", i / 128, (i % 128) * 2);
        let nets: Vec<ipnet::IpNet> = (0..n)
            .map(|i| format!("{}.0/24", net(i)).parse().unwrap())
            .collect();
        let ip: IpAddr = format!("{}.7", net(n - 1)).parse().unwrap();
        let allow = AllowList::new(&nets);
        assert!(allow.contains(ip));
        assert_eq!(allow.ranges(), n, "the bench needs {n} separate ranges");
        g.bench_function(BenchmarkId::new("last_cidr", n), |b| {
            b.iter(|| black_box(allow.contains(black_box(ip))))
        });
        // Baseline: the scan of `IpNet::contains` that the ranges replace.
        g.bench_function(BenchmarkId::new("baseline_scan_last_cidr", n), |b| {
            b.iter(|| black_box(nets.iter().any(|net| net.contains(&black_box(ip)))))
        });
        let outside: IpAddr = "192.0.2.1".parse().unwrap();
        g.bench_function(BenchmarkId::new("outside", n), |b| {
            b.iter(|| black_box(allow.contains(black_box(outside))))
        });
    }
    g.finish();
}

/// What every request pays before routing since the security fixes, beside the route lookup
/// it sits next to (10 routes).
fn bench_request_head(c: &mut Criterion) {
    let mut toml = String::from("[[upstreams]]\nname = \"u\"\nendpoints = [\"127.0.0.1:1\"]\n");
    for i in 0..10 {
        toml.push_str(&format!(
            "[[routes]]\npath = \"/v1/r{i}/*\"\nupstream = \"u\"\n"
        ));
    }
    let router = Router::new(Config::from_toml(&toml).unwrap().routes);
    let path = "/v1/r9/pay_01HZX3M5ZKQ2Y7/refunds";
    let h = headers(&[
        ("x-api-public-key", PK.into()),
        ("x-api-timestamp", "1764460800".into()),
        ("x-api-nonce", "0b6a4f2e-7c1d-4e5a-9b3f-2d8c6e1a0f47".into()),
        ("x-api-signature", "ab".repeat(32)),
        ("content-length", "1024".into()),
        ("content-type", "application/json".into()),
        ("host", "api.example.com".into()),
    ]);
    let mut g = c.benchmark_group("request_head");
    g.bench_function("baseline_route_find_10", |b| {
        b.iter(|| black_box(router.find(&http::Method::POST, black_box(path))))
    });
    g.bench_function("check_path", |b| {
        b.iter(|| black_box(keygate::proxy::target::check_path(black_box(path))))
    });
    g.bench_function("content_length", |b| {
        b.iter(|| black_box(keygate::proxy::target::content_length(black_box(&h))))
    });
    g.bench_function("parse_credentials", |b| {
        b.iter(|| black_box(parse_credentials(black_box(&h)).is_ok()))
    });
    g.finish();
}

/// The cost of `x-keygate-assertion` per request: Ed25519 and HS256, beside the SHA-256 of
/// a 1 KiB body that both include (the baseline).
fn bench_assertion(c: &mut Criterion) {
    use keygate::assertion::{keyring, Asserter, Facts, Mode, SharedSecret};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("bench.db")).unwrap();
    let (key, mk) = key(AuthKind::HmacV1);
    let now = time::OffsetDateTime::now_utc();
    let asserter = Asserter::new(
        "keygate".into(),
        Duration::from_secs(60),
        Duration::from_secs(10),
    );
    asserter.install(rt.block_on(keyring::ensure(&store, &mk, now)).unwrap());
    let hs = Mode::Hs256(SharedSecret::new(vec![7u8; 48]).unwrap());
    let body = vec![b'x'; 1024];
    let target = "/v1/payments?idempotency=7";
    let mut g = c.benchmark_group("assertion");
    let digest = |body: &[u8]| -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(body).into()
    };
    g.bench_function("baseline_body_sha256_1k", |b| {
        b.iter(|| black_box(digest(black_box(&body))))
    });
    for (name, mode) in [("ed25519", Mode::Ed25519), ("hs256", hs)] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let sha = digest(black_box(&body));
                let facts = Facts {
                    key: &key,
                    method: "POST",
                    target,
                    body_sha256: &sha,
                    client_cert: None,
                };
                black_box(asserter.assert(&mode, "payments", &facts, now).unwrap())
            })
        });
    }
    g.finish();
}

/// The in-process rate-limit check (embedded store) of a key with two limits: the pure GCRA,
/// then the whole check (state keys, lock, table); a SHA-256 of a 1 KiB body as baseline.
fn bench_limits(c: &mut Criterion) {
    use keygate::limits::store::{bucket_key, now_us, Bucket, InProcessLimits};
    use keygate::limits::{gcra, RateLimit};
    let limits = [
        RateLimit {
            name: "burst".into(),
            limit: 1_000_000_000,
            window: Duration::from_secs(1),
        },
        RateLimit {
            name: "daily".into(),
            limit: 1_000_000_000,
            window: Duration::from_secs(86_400),
        },
    ];
    let refs: Vec<&RateLimit> = limits.iter().collect();
    let body = vec![b'x'; 1024];
    let mut g = c.benchmark_group("limits");
    g.bench_function("baseline_body_sha256_1k", |b| {
        b.iter(|| {
            use sha2::Digest;
            let d: [u8; 32] = sha2::Sha256::digest(black_box(&body)).into();
            black_box(d)
        })
    });
    let mut tats = [0.0, 0.0];
    g.bench_function("gcra_two_limits", |b| {
        b.iter(|| black_box(gcra(black_box(&refs), &mut tats, 1, now_us())))
    });
    let store = InProcessLimits::default();
    g.bench_function("in_process_check_two_limits", |b| {
        b.iter(|| {
            let buckets: Vec<Bucket<'_>> = limits
                .iter()
                .map(|l| Bucket {
                    key: bucket_key("acme", "k:key_0190a1b2c3d4", &l.name),
                    limit: l,
                    owner_wide: false,
                })
                .collect();
            black_box(store.acquire_at(&buckets, 1, now_us()))
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_limits,
    bench_assertion,
    bench_verify,
    bench_lookups,
    bench_routes,
    bench_allow_list,
    bench_request_head
);
criterion_main!(benches);
