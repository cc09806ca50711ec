//! OTLP span export through the real binary: a collector in the test receives OTLP/HTTP
//! protobuf, decoded with the protocol's own generated types. One server span per request,
//! a child of the client's trace, the parent of what the upstream sees; the client's
//! not-sampled flag is followed; nothing secret leaves in a span; spans still buffered are
//! sent when the gateway stops.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::{status::StatusCode, Span};
use prost::Message as _;
use serde_json::json;
use support::{Echo, Gateway, Options};

/// One export request: its body as sent, and decoded.
type Export = (Vec<u8>, ExportTraceServiceRequest);

/// What the collector received.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<Export>>>);

impl Received {
    fn spans(&self) -> Vec<Span> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .flat_map(|(_, r)| r.resource_spans.iter())
            .flat_map(|rs| rs.scope_spans.iter())
            .flat_map(|ss| ss.spans.iter().cloned())
            .collect()
    }

    fn raw(&self) -> Vec<u8> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .flat_map(|(b, _)| b.clone())
            .collect()
    }

    fn service_names(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .flat_map(|(_, r)| r.resource_spans.iter())
            .filter_map(|rs| rs.resource.as_ref())
            .flat_map(|r| r.attributes.iter())
            .filter(|kv| kv.key == "service.name")
            .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
                AnyValue::StringValue(s) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }
}

/// An OTLP/HTTP collector on an ephemeral port.
async fn collector() -> (SocketAddr, Received) {
    let received = Received::default();
    let store = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: http::HeaderMap, body: bytes::Bytes| {
            let store = store.clone();
            async move {
                assert_eq!(headers["content-type"], "application/x-protobuf");
                let req = ExportTraceServiceRequest::decode(body.as_ref()).unwrap();
                store.0.lock().unwrap().push((body.to_vec(), req));
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, received)
}

fn attr(span: &Span, key: &str) -> Option<String> {
    let kv = span.attributes.iter().find(|kv| kv.key == key)?;
    match kv.value.as_ref()?.value.as_ref()? {
        AnyValue::StringValue(s) => Some(s.clone()),
        AnyValue::IntValue(i) => Some(i.to_string()),
        other => Some(format!("{other:?}")),
    }
}

fn find<'a>(spans: &'a [Span], trace_id: &str) -> Vec<&'a Span> {
    spans
        .iter()
        .filter(|s| hex::encode(&s.trace_id) == trace_id)
        .collect()
}

// Two workers: the collector must answer while this test blocks waiting for the exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_span_per_request_joined_to_the_clients_trace_and_flushed_at_stop() {
    let (otlp, received) = collector().await;
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    opts.server_extra = "name = \"gw-test\"".into();
    opts.routes = format!(
        "[tracing]\notlp_endpoint = \"http://{otlp}/v1/traces\"\n{}",
        opts.routes
    );
    // Nothing is sent on the SDK's timer during the test: every span must come from the
    // flush when the gateway stops.
    opts.env = vec![("OTEL_BSP_SCHEDULE_DELAY", "600000".into())];
    let mut gw = Gateway::start(opts).await;
    let key = gw.mint(json!({"owner": "acme"})).await;

    // 1. Signed, with the client's sampled trace and its tracestate.
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_parent = "00f067aa0ba902b7";
    let body = br#"{"amount":100}"#;
    let target = "/v1/payments?card_token=QUERY-SECRET-9";
    let nonce = "NONCE-MARKER-3";
    let mut headers = support::v1_headers(&key, "POST", target, body, support::now(), nonce);
    let signature = headers
        .iter()
        .find(|(k, _)| k == "x-api-signature")
        .map(|(_, v)| v.clone())
        .unwrap();
    headers.push((
        "traceparent".into(),
        format!("00-{client_trace}-{client_parent}-01"),
    ));
    headers.push(("tracestate".into(), "vendor=abc".into()));
    let r = gw.send("POST", target, &headers, body).await;
    assert_eq!(r.status(), 200);
    let seen = echo.seen().pop().unwrap();
    let upstream_tp = seen.headers["traceparent"].to_str().unwrap().to_owned();
    assert!(
        upstream_tp.starts_with(&format!("00-{client_trace}-")) && upstream_tp.ends_with("-01"),
        "{upstream_tp}"
    );
    assert_ne!(
        &upstream_tp[36..52],
        client_parent,
        "keygate's span is the upstream's parent"
    );
    assert_eq!(seen.headers["tracestate"], "vendor=abc");

    // 2. Refused (no credentials), no trace sent: keygate starts one.
    let r = gw.send("POST", "/v1/payments", &[], b"{}").await;
    assert_eq!(r.status(), 401);

    // 3. The client's trace is not sampled: followed, nothing exported for it.
    let unsampled = "11111111111111111111111111111111";
    let r = gw
        .send(
            "GET",
            "/public/health",
            &[(
                "traceparent".into(),
                format!("00-{unsampled}-2222222222222222-00"),
            )],
            b"",
        )
        .await;
    assert_eq!(r.status(), 200);
    let seen = echo.seen().pop().unwrap();
    let tp = seen.headers["traceparent"].to_str().unwrap();
    assert!(
        tp.starts_with(&format!("00-{unsampled}-")) && tp.ends_with("-00"),
        "{tp}"
    );

    // 4. An upstream that fails: the span is an error.
    let r = gw.send("GET", "/v1/dead", &[], b"").await;
    assert_eq!(r.status(), 401, "unsigned is refused before the upstream");
    let h = support::v1_headers(&key, "GET", "/v1/dead", b"", support::now(), "n-dead");
    let r = gw.send("GET", "/v1/dead", &h, b"").await;
    assert_eq!(r.status(), 502);

    assert!(
        received.spans().is_empty(),
        "the timer is 10 minutes: nothing is sent before the stop"
    );
    let status = gw.signal_and_wait("TERM", Duration::from_secs(15));
    assert!(status.is_some_and(|s| s.success()), "{}", gw.log());

    let spans = received.spans();
    assert_eq!(spans.len(), 4, "{spans:#?}");
    assert_eq!(received.service_names(), ["gw-test"]);

    let joined = find(&spans, client_trace);
    assert_eq!(joined.len(), 1);
    let s = joined[0];
    assert_eq!(hex::encode(&s.parent_span_id), client_parent);
    assert_eq!(hex::encode(&s.span_id), &upstream_tp[36..52]);
    assert_eq!(s.kind, 2, "SPAN_KIND_SERVER");
    assert_eq!(s.name, "POST create-payment");
    assert_eq!(attr(s, "http.request.method").as_deref(), Some("POST"));
    assert_eq!(attr(s, "url.path").as_deref(), Some("/v1/payments"));
    assert_eq!(attr(s, "http.response.status_code").as_deref(), Some("200"));
    assert_eq!(attr(s, "keygate.outcome").as_deref(), Some("ok"));
    assert_eq!(attr(s, "keygate.key_id"), Some(key.id.clone()));
    assert_eq!(attr(s, "keygate.owner").as_deref(), Some("acme"));
    assert_eq!(attr(s, "client.address").as_deref(), Some("127.0.0.1"));
    assert!(s.end_time_unix_nano >= s.start_time_unix_nano && s.start_time_unix_nano > 0);
    assert!(s
        .status
        .as_ref()
        .is_none_or(|st| st.code != StatusCode::Error as i32));

    assert!(
        find(&spans, unsampled).is_empty(),
        "not sampled by the client"
    );

    let refused: Vec<_> = spans
        .iter()
        .filter(|s| attr(s, "keygate.outcome").as_deref() == Some("missing_credentials"))
        .collect();
    assert_eq!(refused.len(), 2, "{spans:#?}");
    for s in &refused {
        assert!(s.parent_span_id.is_empty(), "keygate started the trace");
        assert_eq!(attr(s, "http.response.status_code").as_deref(), Some("401"));
        assert!(
            s.status
                .as_ref()
                .is_none_or(|st| st.code != StatusCode::Error as i32),
            "a 4xx is not a server error"
        );
    }
    let failed: Vec<_> = spans
        .iter()
        .filter(|s| attr(s, "http.response.status_code").as_deref() == Some("502"))
        .collect();
    assert_eq!(failed.len(), 1);
    let st = failed[0].status.as_ref().unwrap();
    assert_eq!(st.code, StatusCode::Error as i32);
    assert_eq!(st.message, "upstream_unavailable");

    // Nothing a client keeps secret left the process in a span.
    let raw = received.raw();
    for secret in [
        signature.as_str(),
        nonce,
        "QUERY-SECRET-9",
        "card_token",
        key.secret.as_str(),
        "amount",
    ] {
        assert!(
            !raw.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{secret} was exported"
        );
    }
}

#[tokio::test]
async fn a_bad_endpoint_is_refused_at_check_config() {
    let echo = Echo::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keygate.toml");
    std::fs::write(
        &path,
        format!(
            "[tracing]\notlp_endpoint = \"collector:4318\"\nsample_ratio = 1.5\n{}",
            support::routes(echo.addr)
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("tracing.otlp_endpoint"), "{text}");
    assert!(text.contains("tracing.sample_ratio"), "{text}");
}
