//! HTTP/2 through the real binary, with a real h2 client (curl, built on nghttp2): over TLS by
//! ALPN, and h2c with prior knowledge when `server.h2c` is on. Same verification, same body
//! rule, same errors as HTTP/1.1; a stream whose body stalls is cut at `server.body_timeout`
//! while the connection's other streams go on.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;
use support::curl::curl;
use support::redis::TlsFiles;
use support::{now, Echo, Gateway, Key, Options};

fn signed(key: &Key, method: &str, target: &str, body: &[u8]) -> Vec<(String, String)> {
    support::v1_headers(
        key,
        method,
        target,
        body,
        now(),
        &uuid::Uuid::new_v4().to_string(),
    )
}

/// HTTP/2 carries each cookie as its own field; the HTTP/1.1 upstream gets one `cookie` line
/// with them joined by "; " in order (RFC 9113 §8.2.3), signed or public.
async fn cookies_arrive_as_one_line(echo: &Echo, gw: &Gateway, flags: &[String], base: &str) {
    let key = gw.mint(json!({})).await;
    let cookies = [
        ("cookie".to_owned(), "session=abc".to_owned()),
        ("cookie".to_owned(), "theme=dark".to_owned()),
        ("cookie".to_owned(), "lang=en".to_owned()),
    ];
    for (target, mut headers) in [
        ("/public/cookies", Vec::new()),
        (
            "/v1/payments/p_1",
            signed(&key, "GET", "/v1/payments/p_1", b""),
        ),
    ] {
        echo.clear();
        headers.extend(cookies.iter().cloned());
        let r = curl(flags, "GET", &format!("{base}{target}"), &headers, b"").await;
        assert_eq!((r.version.as_str(), r.status), ("2", 200), "{r:?}");
        let seen = echo.seen().pop().unwrap();
        let lines: Vec<&str> = seen
            .headers
            .get_all("cookie")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(lines, ["session=abc; theme=dark; lang=en"], "{target}");
    }
}

/// The contract, checked over one protocol: a signed request passes with the caller's
/// identity and assertion; unsigned, badly signed, replayed, oversized and unrouted requests
/// get the same problem+json as over HTTP/1.1.
async fn the_contract_holds(echo: &Echo, gw: &Gateway, flags: &[String], base: &str) {
    let key = gw.mint(json!({})).await;
    let body = br#"{"amount":"10.00"}"#;
    echo.clear();
    let headers = signed(&key, "POST", "/v1/payments", body);
    let ok = curl(
        flags,
        "POST",
        &format!("{base}/v1/payments"),
        &headers,
        body,
    )
    .await;
    assert_eq!((ok.version.as_str(), ok.status), ("2", 200), "{ok:?}");
    let seen = echo.seen().pop().unwrap();
    assert_eq!(&seen.body[..], body);
    assert_eq!(seen.headers["x-keygate-key-id"], key.id.as_str());
    assert!(seen.headers.contains_key("x-keygate-assertion"));
    // The same headers again: the nonce is spent.
    curl(
        flags,
        "POST",
        &format!("{base}/v1/payments"),
        &headers,
        body,
    )
    .await
    .assert_problem(401, "replayed_nonce");
    curl(flags, "POST", &format!("{base}/v1/payments"), &[], body)
        .await
        .assert_problem(401, "missing_credentials");
    let mut bad = signed(&key, "POST", "/v1/payments", body);
    for (k, v) in &mut bad {
        if k == "x-api-signature" {
            *v = "00".repeat(32);
        }
    }
    curl(flags, "POST", &format!("{base}/v1/payments"), &bad, body)
        .await
        .assert_problem(401, "bad_signature");
    // The body rule: the signature covers the exact bytes sent.
    let other = signed(&key, "POST", "/v1/payments", b"{}");
    curl(flags, "POST", &format!("{base}/v1/payments"), &other, body)
        .await
        .assert_problem(401, "bad_signature");
    let big = vec![b'x'; 2 * 1024 * 1024];
    let h = signed(&key, "POST", "/v1/payments", &big);
    curl(flags, "POST", &format!("{base}/v1/payments"), &h, &big)
        .await
        .assert_problem(413, "body_too_large");
    curl(flags, "GET", &format!("{base}/nowhere"), &[], b"")
        .await
        .assert_problem(404, "no_route");
    assert_eq!(
        echo.count(),
        1,
        "only the good request reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_over_tls_by_alpn_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let files = TlsFiles::generate(dir.path());
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    opts.server_extra = format!(
        "\n[server.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        files.cert.display().to_string(),
        files.key.display().to_string()
    );
    let gw = Gateway::start(opts).await;
    let ca = files.ca.display().to_string();
    let base = format!("https://localhost:{}", gw.proxy.port());
    let resolve = format!("localhost:{}:127.0.0.1", gw.proxy.port());
    let h2: Vec<String> = ["--http2", "--cacert", &ca, "--resolve", &resolve]
        .map(String::from)
        .to_vec();
    the_contract_holds(&echo, &gw, &h2, &base).await;
    cookies_arrive_as_one_line(&echo, &gw, &h2, &base).await;
    // HTTP/1.1 on the same listener still works.
    let h1: Vec<String> = ["--http1.1", "--cacert", &ca, "--resolve", &resolve]
        .map(String::from)
        .to_vec();
    let r = curl(&h1, "GET", &format!("{base}/public/x"), &[], b"").await;
    assert_eq!((r.version.as_str(), r.status), ("1.1", 200), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_with_prior_knowledge_only_when_enabled() {
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    opts.server_extra = "h2c = true".into();
    let gw = Gateway::start(opts).await;
    let base = format!("http://{}", gw.proxy);
    let h2c = vec!["--http2-prior-knowledge".to_owned()];
    the_contract_holds(&echo, &gw, &h2c, &base).await;
    cookies_arrive_as_one_line(&echo, &gw, &h2c, &base).await;
    let r = curl(
        &["--http1.1".into()],
        "GET",
        &format!("{base}/public/x"),
        &[],
        b"",
    )
    .await;
    assert_eq!((r.version.as_str(), r.status), ("1.1", 200), "{r:?}");

    // Without server.h2c, the h2 preface is not HTTP/1.1 either: no answer is a 200.
    let plain = Gateway::start(Options::new(&echo)).await;
    let r = curl(
        &h2c,
        "GET",
        &format!("http://{}/public/x", plain.proxy),
        &[],
        b"",
    )
    .await;
    assert_ne!(r.status, 200, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_h2_body_is_cut_at_body_timeout_and_other_streams_go_on() {
    use http_body_util::{BodyExt, Full};
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    opts.server_extra = "h2c = true\nbody_timeout = \"1s\"\nheader_timeout = \"1s\"".into();
    let gw = Gateway::start(opts).await;
    let key = gw.mint(json!({})).await;

    let mut sender = h2c_sender(&gw).await;

    // Announces 100 bytes, sends 10, then nothing.
    let body = vec![b'x'; 100];
    let (tx, stalled_body) = stalled_after_10_bytes().await;
    let mut stalled = http::Request::post(format!("http://{}/v1/payments", gw.proxy))
        .header("content-length", "100")
        .body(stalled_body)
        .unwrap();
    for (k, v) in signed(&key, "POST", "/v1/payments", &body) {
        stalled.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let started = Instant::now();
    let stalled = tokio::spawn(sender.send_request(stalled));

    // Meanwhile another stream on the same connection is served.
    let (mut sender2, ok_body) = (sender.clone(), br#"{"amount":"1.00"}"#);
    let mut ok = http::Request::post(format!("http://{}/v1/payments", gw.proxy))
        .body(
            Full::new(Bytes::from_static(ok_body))
                .map_err(|e| match e {})
                .boxed(),
        )
        .unwrap();
    for (k, v) in signed(&key, "POST", "/v1/payments", ok_body) {
        ok.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let resp = sender2.send_request(ok).await.unwrap();
    assert_eq!(resp.status(), 200);

    let outcome = tokio::time::timeout(Duration::from_secs(10), stalled)
        .await
        .expect("the stalled stream was never cut")
        .unwrap();
    let waited = started.elapsed();
    assert!(
        outcome.is_err() || outcome.as_ref().is_ok_and(|r| r.status() != 200),
        "{outcome:?}"
    );
    assert!(
        waited >= Duration::from_millis(900),
        "cut too early: {waited:?}"
    );
    drop(tx);
    assert_eq!(
        echo.count(),
        1,
        "the stalled request never reached the upstream"
    );

    // A connection in use outlives header_timeout (1 s): requests for 2.5 s all pass.
    let until = Instant::now() + Duration::from_millis(2500);
    let mut served = 0;
    while Instant::now() < until {
        let mut req = http::Request::get(format!("http://{}/v1/payments/p1", gw.proxy))
            .body(Full::new(Bytes::new()).map_err(|e| match e {}).boxed())
            .unwrap();
        for (k, v) in signed(&key, "GET", "/v1/payments/p1", b"") {
            req.headers_mut().insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        served += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(served >= 10, "{served}");

    // A client that opens h2 and never sends a request is closed after header_timeout.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut idle = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    idle.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let opened = Instant::now();
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), idle.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "an idle h2 connection was kept open");
    let lived = opened.elapsed();
    assert!(
        lived >= Duration::from_millis(900) && lived < Duration::from_secs(5),
        "{lived:?}"
    );
}

/// A stream of the channel's items, for a streaming request body.
/// An h2c (prior knowledge) connection to the proxy, driven in the background.
async fn h2c_sender(
    gw: &Gateway,
) -> hyper::client::conn::http2::SendRequest<
    http_body_util::combinators::BoxBody<Bytes, std::io::Error>,
> {
    let sender = support::h2c_connect(gw.proxy).await;
    sender
}

/// A request body that sends 10 bytes, then nothing until the sender is dropped.
async fn stalled_after_10_bytes() -> (
    tokio::sync::mpsc::Sender<Result<hyper::body::Frame<Bytes>, std::io::Error>>,
    http_body_util::combinators::BoxBody<Bytes, std::io::Error>,
) {
    use http_body_util::{BodyExt, StreamBody};
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(Ok(hyper::body::Frame::data(Bytes::from_static(
        &[b'x'; 10],
    ))))
    .await
    .unwrap();
    (tx, StreamBody::new(tokio_stream_from(rx)).boxed())
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Raw non-ASCII in `:path` (UTF-8 `é`): the h2 layer lets it through, so keygate refuses it
/// as it does over HTTP/1.1 — 400 `bad_request` before any key lookup — instead of checking the
/// signature over it and forwarding it raw (RFC 9112 allows no raw non-ASCII in the HTTP/1.1
/// request line the upstream gets).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_utf8_in_an_h2_path_is_400() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    opts.server_extra = "h2c = true".into();
    let gw = Gateway::start(opts).await;
    // One HEADERS frame, HPACK literals without indexing or Huffman, so the bytes go as they are.
    let mut block = Vec::new();
    for (name, value) in [
        (&b":method"[..], &b"GET"[..]),
        (b":scheme", b"http"),
        (b":path", "/public/caf\u{e9}".as_bytes()),
        (b":authority", b"127.0.0.1"),
    ] {
        block.push(0x00);
        block.push(u8::try_from(name.len()).unwrap());
        block.extend_from_slice(name);
        block.push(u8::try_from(value.len()).unwrap());
        block.extend_from_slice(value);
    }
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend_from_slice(&[0, 0, 0, 0x04, 0, 0, 0, 0, 0]); // SETTINGS, empty
    let len = u32::try_from(block.len()).unwrap().to_be_bytes();
    // HEADERS, END_STREAM | END_HEADERS, stream 1.
    bytes.extend_from_slice(&[len[1], len[2], len[3], 0x01, 0x05, 0, 0, 0, 1]);
    bytes.extend_from_slice(&block);
    let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(&bytes).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(3);
    // Read until the answer's DATA frame holds the problem's code, or the time is up.
    while Instant::now() < deadline && !String::from_utf8_lossy(&got).contains("\"code\"") {
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("\"code\":\"bad_request\""), "{text}");
    assert!(text.contains("percent-encoded"), "{text}");
    assert_eq!(echo.count(), 0, "nothing reached the upstream");
}

/// A public route streams its body; over HTTP/2 pingora's reads of a stream have no timeout to
/// move, so a stalled public body ran until the client gave up (outside test, issue 25). It is
/// cut at `server.body_timeout` and counted as `body_timeout`, like a signed one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_h2_body_on_a_public_route_is_cut_at_body_timeout() {
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    opts.server_extra = "h2c = true\nbody_timeout = \"1s\"".into();
    let gw = Gateway::start(opts).await;
    let mut sender = h2c_sender(&gw).await;
    let (tx, stalled_body) = stalled_after_10_bytes().await;
    let stalled = http::Request::post(format!("http://{}/public/upload", gw.proxy))
        .header("content-length", "100")
        .body(stalled_body)
        .unwrap();
    let started = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(10), sender.send_request(stalled))
        .await
        .expect("the stalled public stream was never cut");
    println!(
        "public h2 stream cut after {:?}: {outcome:?}",
        started.elapsed()
    );
    assert!(
        outcome.is_err() || outcome.as_ref().is_ok_and(|r| r.status() != 200),
        "{outcome:?}"
    );
    drop(tx);
    let counted = "keygate_requests_total{outcome=\"body_timeout\",route=\"public\"}";
    let deadline = Instant::now() + Duration::from_secs(3);
    while gw.metric(counted).await < 1.0 {
        assert!(Instant::now() < deadline, "not counted as body_timeout");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A whole public body over HTTP/2 still goes through, bytes intact.
    let r = curl(
        &["--http2-prior-knowledge".to_owned()],
        "POST",
        &format!("http://{}/public/upload", gw.proxy),
        &[],
        &[b'y'; 100_000],
    )
    .await;
    assert_eq!((r.version.as_str(), r.status), ("2", 200), "{r:?}");
    let seen = echo.seen().pop().unwrap();
    assert_eq!(seen.body.len(), 100_000);
}
