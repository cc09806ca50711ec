//! Requests of the wrong shape through the real binary (issue 24): a protocol switch that
//! would turn the connection into an unchecked tunnel, `Content-Length` beside
//! `Transfer-Encoding` in every spelling, method and URL override headers, and raw bytes in
//! the request target that the HTTP/1 parser would rewrite before the signature is checked.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use support::{now, raw_exchange, routes_with, status_of, v1_lines, Echo, Gateway, Options};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An upstream that answers any request head with `101 Switching Protocols`, then echoes
/// every byte it reads back; it records every byte it received.
struct Switcher {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<u8>>>,
}

impl Switcher {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received: Arc<Mutex<Vec<u8>>> = Arc::default();
        let record = Arc::clone(&received);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let record = Arc::clone(&record);
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut switched = false;
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        record.lock().unwrap().extend_from_slice(&buf[..n]);
                        if switched {
                            let _ = s.write_all(&buf[..n]).await;
                            continue;
                        }
                        head.extend_from_slice(&buf[..n]);
                        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                            switched = true;
                            let _ = s
                                .write_all(
                                    b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\
                                      connection: Upgrade\r\n\r\n",
                                )
                                .await;
                            let rest = head.split_off(end + 4);
                            if !rest.is_empty() {
                                let _ = s.write_all(&rest).await;
                            }
                        }
                    }
                });
            }
        });
        Self { addr, received }
    }

    fn received(&self) -> String {
        String::from_utf8_lossy(&self.received.lock().unwrap()).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_is_refused_unless_an_authenticated_route_allows_websocket() {
    let echo = Echo::start().await;
    let up = Switcher::start().await;
    let extra = format!(
        r#"
[[upstreams]]
name = "switcher"
endpoints = ["{}"]

[[routes]]
name = "health"
methods = ["GET"]
path = "/health"
upstream = "switcher"
public = true

[[routes]]
name = "ws"
methods = ["GET"]
path = "/ws/*"
upstream = "switcher"
upgrade = ["websocket"]

[[routes]]
name = "no-ws"
methods = ["GET"]
path = "/plain/*"
upstream = "switcher"
"#,
        up.addr
    );
    let mut opts = Options::new(&echo);
    opts.routes = routes_with(echo.addr, &extra);
    let gw = Gateway::start(opts).await;
    let key = gw.mint(json!({"scopes": ["payments.*"]})).await;

    // The reproduction: a public route, an upstream that answers 101, then a forged POST.
    let forged = "POST /v1/payments HTTP/1.1\r\nhost: up\r\nx-keygate-owner: victim\r\n\
                  x-keygate-scopes: payments.*\r\ncontent-length: 2\r\n\r\n{}";
    let switch =
        "GET /health HTTP/1.1\r\nhost: gw\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
                  sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n";
    let out = raw_exchange(
        gw.proxy,
        &[switch.as_bytes(), forged.as_bytes()],
        Duration::from_millis(300),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(status_of(&out), 400, "{out}");
    assert!(out.contains("\"code\":\"bad_request\""), "{out}");
    assert!(
        out.contains("Upgrade"),
        "the detail names the problem: {out}"
    );
    assert!(!out.contains(" 101 "), "{out}");

    // The same on an authenticated route without the opt-in, signed, and over HTTP/1.0.
    let sig = v1_lines(&key, "GET", "/plain/x", b"", now());
    let signed_plain = format!(
        "GET /plain/x HTTP/1.1\r\nhost: gw\r\nconnection: upgrade\r\nupgrade: websocket\r\n{sig}\r\n"
    );
    let http10 = "GET /health HTTP/1.0\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n";
    let h2c = "GET /health HTTP/1.1\r\nhost: gw\r\nconnection: Upgrade, HTTP2-Settings\r\n\
               upgrade: h2c\r\nhttp2-settings: AAMAAABkAAQAAP__\r\n\r\n";
    let sig = v1_lines(&key, "GET", "/ws/chat", b"", now());
    let ws_h2c = format!(
        "GET /ws/chat HTTP/1.1\r\nhost: gw\r\nconnection: upgrade\r\nupgrade: h2c\r\n{sig}\r\n"
    );
    for (what, request) in [
        ("signed, route without upgrade", signed_plain),
        ("HTTP/1.0", http10.to_owned()),
        ("h2c upgrade on a public route", h2c.to_owned()),
        ("h2c upgrade on the websocket route", ws_h2c),
    ] {
        let out = raw_exchange(
            gw.proxy,
            &[request.as_bytes(), forged.as_bytes()],
            Duration::from_millis(200),
            Duration::from_secs(2),
        )
        .await;
        assert_eq!(status_of(&out), 400, "{what}: {out}");
        assert!(out.contains("\"code\":\"bad_request\""), "{what}: {out}");
    }
    assert_eq!(up.received(), "", "no byte reached the upstream");

    // The opt-in route: a signed WebSocket upgrade opens the tunnel both ways.
    let sig = v1_lines(&key, "GET", "/ws/chat", b"", now());
    let ws = format!(
        "GET /ws/chat HTTP/1.1\r\nhost: gw\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n{sig}\r\n"
    );
    let out = raw_exchange(
        gw.proxy,
        &[ws.as_bytes(), b"frame-through-the-tunnel"],
        Duration::from_millis(300),
        Duration::from_secs(2),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 101"), "{out}");
    assert!(out.contains("frame-through-the-tunnel"), "{out}");
    let seen = up.received();
    assert!(seen.starts_with("GET /ws/chat HTTP/1.1"), "{seen}");
    assert!(
        seen.contains(&format!("x-keygate-key-id: {}", key.id)),
        "{seen}"
    );
    // Unsigned, the opt-in route still wants a key.
    let out = raw_exchange(
        gw.proxy,
        &[b"GET /ws/chat HTTP/1.1\r\nhost: gw\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"],
        Duration::ZERO,
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(status_of(&out), 401, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_beside_transfer_encoding_is_refused_in_every_shape() {
    let echo = Echo::start().await;
    let gw = Gateway::start(Options::new(&echo)).await;
    let key = gw.mint(json!({"scopes": ["payments.*"]})).await;
    let t = "/v1/payments";
    let chunked = "2\r\n{}\r\n0\r\n\r\n";
    let shapes: Vec<(&str, String)> = vec![
        (
            "length first, Connection: close",
            "content-length: 2\r\ntransfer-encoding: chunked\r\nconnection: close\r\n".into(),
        ),
        (
            "encoding first, Connection: close",
            "connection: close\r\ntransfer-encoding: chunked\r\ncontent-length: 2\r\n".into(),
        ),
        (
            "upper case, Connection: close",
            "Content-Length: 2\r\nTRANSFER-ENCODING: chunked\r\nConnection: Close\r\n".into(),
        ),
        (
            "gzip, chunked",
            "content-length: 2\r\ntransfer-encoding: gzip, chunked\r\nconnection: close\r\n".into(),
        ),
        (
            "several Content-Length lines",
            "content-length: 2\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\nconnection: close\r\n"
                .into(),
        ),
        (
            "keep-alive",
            "content-length: 2\r\ntransfer-encoding: chunked\r\n".into(),
        ),
    ];
    for (what, framing) in &shapes {
        for version in ["HTTP/1.1", "HTTP/1.0"] {
            let sig = v1_lines(&key, "POST", t, b"{}", now());
            let request = format!("POST {t} {version}\r\nhost: gw\r\n{sig}{framing}\r\n{chunked}");
            let out = gw.raw(request.as_bytes()).await;
            assert_eq!(status_of(&out), 400, "{what}, {version}: {out}");
            if version == "HTTP/1.1" {
                assert!(
                    out.contains("\"code\":\"bad_request\"")
                        && out.contains("Content-Length and Transfer-Encoding"),
                    "{what}: {out}"
                );
            }
        }
    }
    assert_eq!(echo.count(), 0, "none was forwarded");
    // Each alone still passes.
    let sig = v1_lines(&key, "POST", t, b"{}", now());
    let request = format!(
        "POST {t} HTTP/1.1\r\nhost: gw\r\n{sig}transfer-encoding: chunked\r\nconnection: close\r\n\r\n{chunked}"
    );
    let out = gw.raw(request.as_bytes()).await;
    assert_eq!(status_of(&out), 200, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_and_url_override_headers_do_not_reach_the_upstream() {
    let echo = Echo::start().await;
    let extra = r#"
[[routes]]
name = "legacy"
path = "/legacy/*"
upstream = "echo"
forward_method_override = true
"#;
    let mut opts = Options::new(&echo);
    opts.routes = routes_with(echo.addr, extra);
    let gw = Gateway::start(opts).await;
    let key = gw.mint(json!({"scopes": ["payments.*"]})).await;
    let overrides = [
        ("x-http-method-override", "DELETE"),
        ("X-HTTP-Method", "DELETE"),
        ("x-method-override", "PUT"),
        ("x-original-url", "/admin/refund-all"),
        ("X-Rewrite-URL", "/admin/refund-all"),
        // Underscore spellings, which CGI/WSGI/PHP upstreams read as the dashed names.
        ("x_http_method_override", "DELETE"),
        ("X-Original_URL", "/admin/refund-all"),
    ];
    // Forwarding headers the client wrote itself (keygate trusts no proxy here).
    let forged = [
        ("forwarded", "for=6.6.6.6;host=evil.example"),
        ("x-real-ip", "6.6.6.6"),
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-proto", "gopher"),
    ];
    let headers_for = |target: &str, signed: bool| {
        let mut headers = if signed {
            support::v1_headers(
                &key,
                "POST",
                target,
                b"{}",
                now(),
                &uuid::Uuid::new_v4().to_string(),
            )
        } else {
            Vec::new()
        };
        headers.extend(
            overrides
                .iter()
                .chain(&forged)
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        headers
    };
    for (target, signed) in [("/v1/payments", true), ("/public/x", false)] {
        echo.clear();
        let r = gw
            .send("POST", target, &headers_for(target, signed), b"{}")
            .await;
        assert_eq!(r.status(), 200, "{target}");
        let seen = echo.seen().pop().unwrap();
        for (name, _) in overrides.iter().chain(&forged) {
            assert!(
                !seen.headers.contains_key(*name),
                "{target}: {name} reached the upstream"
            );
        }
        assert_eq!(seen.method, "POST");
    }
    // The route that keeps the overrides; the forged forwarding headers still go.
    echo.clear();
    let r = gw
        .send("POST", "/legacy/x", &headers_for("/legacy/x", true), b"{}")
        .await;
    assert_eq!(r.status(), 200);
    let seen = echo.seen().pop().unwrap();
    for (name, value) in overrides {
        assert_eq!(seen.headers[name], value, "{name}");
    }
    for (name, _) in forged {
        assert!(!seen.headers.contains_key(name), "{name}");
    }
    // From a trusted proxy, the forwarding headers are the proxy's own, and pass.
    let mut opts = Options::new(&echo);
    opts.server_extra = "trusted_proxies = [\"127.0.0.1/32\"]".into();
    let trusting = Gateway::start(opts).await;
    echo.clear();
    let r = trusting
        .send("POST", "/public/x", &headers_for("/public/x", false), b"{}")
        .await;
    assert_eq!(r.status(), 200);
    let seen = echo.seen().pop().unwrap();
    for (name, value) in forged {
        assert_eq!(seen.headers[name], value, "{name} from a trusted proxy");
    }
}

/// An HTTP/1.1 request without `Host` (RFC 9112 §3.2 requires one) is refused. HTTP/1.0 may
/// omit it; it goes upstream as HTTP/1.1, so with the endpoint as its `Host`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_host_is_400_and_http_1_0_gets_the_endpoints() {
    let echo = Echo::start().await;
    let gw = Gateway::start(Options::new(&echo)).await;
    let out = without_host(&gw, "HTTP/1.1").await;
    assert_eq!(status_of(&out), 400, "{out}");
    assert!(out.contains("\"code\":\"bad_request\""), "{out}");
    assert!(out.contains("no Host header"), "{out}");
    assert_eq!(echo.count(), 0);
    let out = without_host(&gw, "HTTP/1.0").await;
    assert_eq!(status_of(&out), 200, "{out}");
    let seen = echo.seen().pop().unwrap();
    assert_eq!(seen.headers["host"], echo.addr.to_string().as_str());
}

/// A GET of a public route with no Host header, over `version`.
async fn without_host(gw: &Gateway, version: &str) -> String {
    let request = format!("GET /public/x {version}\r\nconnection: close\r\n\r\n");
    gw.raw(request.as_bytes()).await
}
