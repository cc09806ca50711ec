//! The access log and trace context through the real binary: one JSON line per request with
//! the fields an operator follows a request by, none of what a client keeps secret, and the
//! W3C `traceparent` kept from the client or started by keygate.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{Echo, Gateway, Options};

/// The access-log lines written so far, parsed.
fn access_lines(gw: &Gateway) -> Vec<Value> {
    gw.log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "keygate::access")
        .collect()
}

/// Waits until `n` access lines are written (the line follows the response).
async fn wait_for_lines(gw: &Gateway, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let lines = access_lines(gw);
        if lines.len() >= n || Instant::now() > deadline {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn one_json_line_per_request_without_secrets_and_with_the_trace() {
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    opts.routes = format!("[log]\nformat = \"json\"\n{}", opts.routes);
    opts.rust_log = "warn,keygate::access=info";
    let gw = Gateway::start(opts).await;
    let key = gw.mint(json!({"owner": "acme"})).await;

    // 1. Signed, with a query string, a body marker and the client's own trace.
    let body = br#"{"card":"4111111111111111","marker":"BODY-MARKER-7"}"#;
    let target = "/v1/payments?card_token=QUERY-SECRET-9";
    let nonce = "NONCE-MARKER-3";
    let headers = support::v1_headers(&key, "POST", target, body, support::now(), nonce);
    let signature = headers
        .iter()
        .find(|(k, _)| k == "x-api-signature")
        .map(|(_, v)| v.clone())
        .unwrap();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut with_trace = headers.clone();
    with_trace.push(("traceparent".into(), traceparent.into()));
    with_trace.push(("tracestate".into(), "vendor=abc".into()));
    let r = gw.send("POST", target, &with_trace, body).await;
    assert_eq!(r.status(), 200);
    let seen = echo.seen().pop().unwrap();
    assert_eq!(
        seen.headers["traceparent"], traceparent,
        "the client's trace goes on"
    );
    assert_eq!(seen.headers["tracestate"], "vendor=abc");

    // 2. A refusal (same nonce again), with an invalid traceparent: keygate starts a trace.
    let mut replay = headers.clone();
    replay.push(("traceparent".into(), "not-a-trace".into()));
    replay.push(("tracestate".into(), "vendor=abc".into()));
    let r = gw.send("POST", target, &replay, body).await;
    assert_eq!(r.status(), 401);

    // 3. A public route, no trace sent: the upstream gets the trace keygate started.
    echo.clear();
    let r = gw.send("GET", "/public/health", &[], b"").await;
    assert_eq!(r.status(), 200);
    let started = echo.seen().pop().unwrap();
    let sent_tp = started.headers["traceparent"].to_str().unwrap().to_owned();
    assert!(!started.headers.contains_key("tracestate"));

    let lines = wait_for_lines(&gw, 3).await;
    assert_eq!(lines.len(), 3, "{lines:?}");
    let (ok, refused, public) = (&lines[0], &lines[1], &lines[2]);
    assert_eq!(ok["route"], "create-payment");
    assert_eq!(ok["method"], "POST");
    assert_eq!(ok["path"], "/v1/payments");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["outcome"], "ok");
    assert_eq!(ok["key_id"], key.id.as_str());
    assert_eq!(ok["owner"], "acme");
    assert_eq!(ok["client_ip"], "127.0.0.1");
    assert_eq!(ok["upstream"], echo.addr.to_string());
    assert_eq!(ok["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(
        ok["request_id"],
        seen.headers["x-request-id"].to_str().unwrap()
    );
    assert_eq!(ok["bytes_in"], body.len());
    assert!(ok["bytes_out"].as_u64().unwrap() > 0);
    assert!(ok["auth_us"].as_u64().is_some() && ok["upstream_us"].as_u64().is_some());
    assert_eq!(ok["http"], "1.1");
    assert!(ok["timestamp"].is_string());
    assert!(ok.get("tls").is_none(), "plain HTTP has no TLS version");

    assert_eq!(
        (refused["status"].as_u64(), refused["outcome"].as_str()),
        (Some(401), Some("replayed_nonce"))
    );
    assert_eq!(
        refused["key_id"],
        Value::Null,
        "a refused request is not attributed to the key"
    );
    assert!(refused.get("upstream").is_none());
    let refused_trace = refused["trace_id"].as_str().unwrap();
    assert_eq!(refused_trace.len(), 32);
    assert_ne!(refused_trace, "4bf92f3577b34da6a3ce929d0e0e4736");

    assert_eq!(public["route"], "public");
    assert_eq!(public["trace_id"], &sent_tp[3..35]);

    // Nothing a client keeps secret, anywhere in the log.
    let log = gw.log();
    for secret in [
        key.secret.as_str(),
        signature.as_str(),
        nonce,
        "QUERY-SECRET-9",
        "BODY-MARKER-7",
        "4111111111111111",
    ] {
        assert!(!log.contains(secret), "the log holds {secret:?}");
    }
    assert!(!log.contains("\u{1b}["), "no ANSI colour in a file");
}

/// Issue 25 (outside test): a request whose body stopped arriving was closed at
/// `server.body_timeout` with no access-log line (the connection was dropped mid-request,
/// skipping the request's end). Now it ends like any failed request: one line, outcome
/// `body_timeout`, counted in `keygate_requests_total` and
/// `keygate_connections_closed_total{reason="body_timeout"}` — on a signed route (keygate
/// reads the body) and a public one (pingora streams it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_arriving_gets_its_access_log_line() {
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    opts.routes = format!("[log]\nformat = \"json\"\n{}", opts.routes);
    opts.server_extra = "body_timeout = \"1s\"".into();
    opts.rust_log = "warn,keygate::access=info";
    let gw = Gateway::start(opts).await;
    let key = gw.mint(json!({})).await;
    let body = [b'x'; 100];
    let signed: String = support::v1_headers(
        &key,
        "POST",
        "/v1/payments",
        &body,
        support::now(),
        &uuid::Uuid::new_v4().to_string(),
    )
    .iter()
    .map(|(k, v)| format!("{k}: {v}\r\n"))
    .collect();
    let signed_head =
        format!("POST /v1/payments HTTP/1.1\r\nhost: gw\r\ncontent-length: 100\r\n{signed}\r\n");
    let public_head = b"POST /public/upload HTTP/1.1\r\nhost: gw\r\ncontent-length: 100\r\n\r\n";
    let signed_parts: [&[u8]; 2] = [signed_head.as_bytes(), &body[..10]];
    let public_parts: [&[u8]; 2] = [public_head, &body[..10]];
    let started = Instant::now();
    let (a, b) = tokio::join!(
        support::raw_exchange(
            gw.proxy,
            &signed_parts,
            Duration::from_millis(50),
            Duration::from_secs(5),
        ),
        support::raw_exchange(
            gw.proxy,
            &public_parts,
            Duration::from_millis(50),
            Duration::from_secs(5),
        ),
    );
    println!("closed after {:?}: {a:?} / {b:?}", started.elapsed());
    let lines = wait_for_lines(&gw, 2).await;
    let late: Vec<&Value> = lines
        .iter()
        .filter(|l| l["outcome"] == "body_timeout")
        .collect();
    assert_eq!(late.len(), 2, "{lines:#?}");
    let mut paths: Vec<&str> = late.iter().map(|l| l["path"].as_str().unwrap()).collect();
    paths.sort_unstable();
    assert_eq!(paths, ["/public/upload", "/v1/payments"]);
    // The signed body is verified before anything goes upstream; a public route streams.
    assert!(
        echo.seen().iter().all(|s| s.target != "/v1/payments"),
        "an unverified request reached the upstream"
    );
    assert_eq!(
        gw.metric("keygate_connections_closed_total{reason=\"body_timeout\"}")
            .await,
        2.0
    );
    assert_eq!(
        gw.metric("keygate_requests_total{outcome=\"body_timeout\",route=\"create-payment\"}")
            .await,
        1.0
    );
}
