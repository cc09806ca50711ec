//! One forwarding path: every verified request leaves through pingora's proxy, whatever its
//! body size and protocol. Each header rule of the upstream request is checked at 1 KiB,
//! 64 KiB, 64 KiB + 1 and 1 MiB, over HTTP/1.1 (plain and TLS), h2c and h2 over TLS — bodies
//! above pingora's old 64 KiB retry buffer once took a path of their own that forwarded
//! hop-by-hop headers and wrote `HTTP/2` request lines to HTTP/1.1 upstreams.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use serde_json::json;
use sha2::Digest;
use support::curl::curl;
use support::redis::TlsFiles;
use support::{now, Echo, Gateway, Key, Options};

const SIZES: [usize; 4] = [1024, 64 * 1024, 64 * 1024 + 1, 1024 * 1024];

/// A protocol to reach the gateway with: curl's flags and the base URL.
struct Client {
    name: &'static str,
    flags: Vec<String>,
    base: String,
    /// HTTP/2 carries no connection-specific headers (curl drops them; RFC 9113 §8.2.2).
    h2: bool,
}

/// A body of `size` bytes that is not one repeated byte, so a shifted or cut body shows.
fn body_of(size: usize) -> Vec<u8> {
    (0..size).map(|i| b"0123456789abcdef"[i % 16]).collect()
}

/// Headers a client (or something between it and keygate) may add that must never reach the
/// upstream: hop-by-hop fields, connection-nominated fields, spoofed identity.
fn hostile_headers(h2: bool) -> Vec<(String, String)> {
    let mut h = vec![
        ("x-keygate-owner", "forged-owner"),
        ("x-keygate-scopes", "*"),
        ("proxy-authorization", "Basic Zm9vOmJhcg=="),
    ];
    if !h2 {
        h.extend([
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "nominated"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("expect", "100-continue"),
        ]);
    }
    h.into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Sends one signed POST of `size` bytes over `client` and checks every rule on what the
/// upstream received.
async fn forwards_one(echo: &Echo, key: &Key, client: &Client, size: usize) {
    let body = body_of(size);
    let nonce = uuid::Uuid::new_v4().to_string();
    let mut headers = support::v1_headers(key, "POST", "/v1/payments", &body, now(), &nonce);
    headers.extend(hostile_headers(client.h2));
    echo.clear();
    let url = format!("{}/v1/payments", client.base);
    let r = curl(&client.flags, "POST", &url, &headers, &body).await;
    let case = format!("{} {size} B", client.name);
    let version = if client.h2 { "2" } else { "1.1" };
    assert_eq!(
        (r.version.as_str(), r.status),
        (version, 200),
        "{case}: {r:?}"
    );
    let seen = echo.seen();
    assert_eq!(seen.len(), 1, "{case}: one request upstream");
    let up = &seen[0];
    assert_eq!(up.version, http::Version::HTTP_11, "{case}");
    assert_eq!(
        (up.method.as_str(), up.target.as_str()),
        ("POST", "/v1/payments"),
        "{case}"
    );
    assert_eq!(up.body.len(), size, "{case}");
    assert_eq!(
        sha2::Sha256::digest(&up.body),
        sha2::Sha256::digest(&body),
        "{case}: the exact bytes"
    );
    let h = &up.headers;
    let value = |name: &str| h.get(name).map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(
        value("x-keygate-key-id").as_deref(),
        Some(key.id.as_str()),
        "{case}"
    );
    assert_eq!(value("x-keygate-owner").as_deref(), Some("acme"), "{case}");
    assert_eq!(h.get_all("x-keygate-owner").iter().count(), 1, "{case}");
    assert_eq!(
        value("x-keygate-scopes").as_deref(),
        Some("payments.create"),
        "{case}"
    );
    assert_eq!(
        value("x-forwarded-for").as_deref(),
        Some("127.0.0.1"),
        "{case}"
    );
    assert_eq!(
        value("x-request-id").as_deref(),
        r.header("x-request-id"),
        "{case}: the upstream and the client see one request id"
    );
    assert!(value("x-request-id").is_some(), "{case}");
    assert!(value("host").is_some(), "{case}: HTTP/1.1 needs Host");
    assert!(value("x-keygate-assertion").is_some(), "{case}");
    for gone in [
        "x-api-public-key",
        "x-api-signature",
        "x-api-timestamp",
        "x-api-nonce",
        "proxy-authorization",
        "x-hop",
        "keep-alive",
        "proxy-connection",
        "te",
        "expect",
        "upgrade",
        "transfer-encoding",
    ] {
        assert!(
            !h.contains_key(gone),
            "{case}: {gone} reached the upstream: {h:?}"
        );
    }
    // Only keep-alive or close may remain of Connection (pingora's own framing).
    for v in h.get_all("connection") {
        let v = v.to_str().unwrap().to_ascii_lowercase();
        assert!(v == "keep-alive" || v == "close", "{case}: connection: {v}");
    }
    assert_eq!(
        value("content-length").as_deref(),
        Some(size.to_string().as_str()),
        "{case}: a known length is sent as such"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_body_size_and_protocol_takes_the_same_path() {
    let echo = Echo::start().await;
    let dir = tempfile::tempdir().unwrap();
    let files = TlsFiles::generate(dir.path());

    let mut plain = Options::new(&echo);
    plain.server_extra = "h2c = true".into();
    let plain = Gateway::start(plain).await;
    let mut tls = Options::new(&echo);
    tls.server_extra = format!(
        "\n[server.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        files.cert.display().to_string(),
        files.key.display().to_string()
    );
    let tls = Gateway::start(tls).await;

    let ca = files.ca.display().to_string();
    let resolve = format!("localhost:{}:127.0.0.1", tls.proxy.port());
    let https = format!("https://localhost:{}", tls.proxy.port());
    let trust = |proto: &str| -> Vec<String> {
        [proto, "--cacert", &ca, "--resolve", &resolve]
            .map(String::from)
            .to_vec()
    };
    let clients = [
        Client {
            name: "HTTP/1.1",
            flags: vec!["--http1.1".into()],
            base: format!("http://{}", plain.proxy),
            h2: false,
        },
        Client {
            name: "h2c",
            flags: vec!["--http2-prior-knowledge".into()],
            base: format!("http://{}", plain.proxy),
            h2: true,
        },
        Client {
            name: "HTTP/1.1 over TLS",
            flags: trust("--http1.1"),
            base: https.clone(),
            h2: false,
        },
        Client {
            name: "h2 over TLS",
            flags: trust("--http2"),
            base: https,
            h2: true,
        },
    ];
    let owner = json!({"owner": "acme", "scopes": ["payments.create"]});
    let plain_key = plain.mint(owner.clone()).await;
    let tls_key = tls.mint(owner).await;
    for client in &clients {
        let key = if client.base.starts_with("https") {
            &tls_key
        } else {
            &plain_key
        };
        for size in SIZES {
            forwards_one(&echo, key, client, size).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_over_64_kib_is_forwarded_whole_with_its_length() {
    let echo = Echo::start().await;
    let gw = Gateway::start(Options::new(&echo)).await;
    let key = gw
        .mint(json!({"owner": "acme", "scopes": ["payments.create"]}))
        .await;
    for size in SIZES {
        let body = body_of(size);
        let nonce = uuid::Uuid::new_v4().to_string();
        let mut headers = support::v1_headers(&key, "POST", "/v1/payments", &body, now(), &nonce);
        headers.push(("transfer-encoding".into(), "chunked".into()));
        echo.clear();
        let url = format!("http://{}/v1/payments", gw.proxy);
        let r = curl(&["--http1.1".into()], "POST", &url, &headers, &body).await;
        assert_eq!(r.status, 200, "{size} B chunked: {r:?}");
        let seen = echo.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].body.len(), size, "{size} B chunked");
        assert_eq!(&seen[0].body[..], &body[..], "{size} B chunked");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_idempotent_request_is_retried_on_the_next_endpoint() {
    // Retries on a connect failure need the body replayed: once only pingora's 64 KiB copy
    // could be, so a large PUT to an upstream with a dead endpoint failed outright.
    let echo = Echo::start().await;
    let dead = support::free_port();
    let mut opts = Options::new(&echo);
    opts.routes = support::routes(echo.addr).replace(
        "[[upstreams]]\nname = \"echo\"\nendpoints = [\"",
        &format!("[[upstreams]]\nname = \"echo\"\nendpoints = [\"127.0.0.1:{dead}\", \""),
    );
    let gw = Gateway::start(opts).await;
    let key = gw.mint(json!({"owner": "acme", "scopes": ["*"]})).await;
    let body = body_of(256 * 1024);
    for _ in 0..4 {
        echo.clear();
        let r = gw.send_v1(&key, "PUT", "/v1/anything", &body).await;
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        let seen = echo.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(&seen[0].body[..], &body[..]);
    }
}
