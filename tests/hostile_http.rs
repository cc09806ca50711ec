//! Hostile HTTP through the real proxy, one table: ambiguous framing, malformed and oversized
//! heads, pipelining behind a refusal, HTTP/1.0, absolute-form targets, path tricks, absurd
//! credential values. Each must be answered with the contract's error (or, where no request
//! can be read at all, the connection closed) — never a panic, a hang, a 5xx, or a byte to
//! the upstream. The figures (cases and outcomes) are printed.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use std::time::Duration;

use serde_json::json;
use support::{now, raw_exchange, status_of, v1_lines, Echo, Gateway, Options};

/// What a hostile request must get.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Want {
    /// This status with this problem+json code.
    Code(u16, &'static str),
    /// No request could be parsed: a plain 400 from the HTTP parser, or the connection closed.
    Unparseable,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_the_contracts_answer_and_never_reach_the_upstream() {
    let echo = Echo::start().await;
    let gw = Gateway::start(Options::new(&echo)).await;
    let key = gw.mint(json!({"scopes": ["payments.*"]})).await;
    let t = "/v1/payments";
    let signed =
        |method: &str, target: &str, body: &[u8]| v1_lines(&key, method, target, body, now());
    let sig = signed("POST", t, b"{}");
    let huge_nonce = "n".repeat(100_000);
    let many_headers: String = (0..300).map(|i| format!("x-h{i}: v\r\n")).collect();
    let big_header = format!("x-big: {}\r\n", "a".repeat(200_000));

    let cases: Vec<(&str, Vec<u8>, Want)> = vec![
        (
            "Content-Length with Transfer-Encoding",
            format!("POST {t} HTTP/1.1\r\nhost: gw\r\n{sig}content-length: 2\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n").into_bytes(),
            Want::Code(400, "bad_request"),
        ),
        (
            "two different Content-Lengths",
            format!("POST {t} HTTP/1.1\r\nhost: gw\r\n{sig}content-length: 2\r\ncontent-length: 3\r\n\r\n{{}}").into_bytes(),
            Want::Unparseable,
        ),
        (
            "obs-fold in a header",
            format!("POST {t} HTTP/1.1\r\nhost: gw\r\n{sig}x-folded: a\r\n  b\r\ncontent-length: 2\r\n\r\n{{}}").into_bytes(),
            Want::Unparseable,
        ),
        (
            "invalid UTF-8 in a credential header",
            [
                format!("POST {t} HTTP/1.1\r\nhost: gw\r\nx-api-public-key: pk_").into_bytes(),
                vec![0xff, 0xfe],
                b"\r\nx-api-signature: 00\r\ncontent-length: 2\r\n\r\n{}".to_vec(),
            ]
            .concat(),
            Want::Code(400, "malformed_credentials"),
        ),
        (
            "a control character in a header",
            format!("POST {t} HTTP/1.1\r\nhost: gw\r\n{sig}x-ctl: a\x01b\r\ncontent-length: 2\r\n\r\n{{}}").into_bytes(),
            Want::Unparseable,
        ),
        (
            "a 200 kB header",
            format!("POST {t} HTTP/1.1\r\nhost: gw\r\n{big_header}content-length: 2\r\n\r\n{{}}").into_bytes(),
            Want::Code(400, "bad_request"),
        ),
        (
            "300 headers",
            format!("POST {t} HTTP/1.1\r\nhost: gw\r\n{many_headers}content-length: 2\r\n\r\n{{}}").into_bytes(),
            Want::Unparseable,
        ),
        (
            "a 100,000-byte nonce",
            format!("POST {t} HTTP/1.1\r\nhost: gw\r\nx-api-public-key: {}\r\nx-api-signature: 00\r\nx-api-timestamp: {}\r\nx-api-nonce: {huge_nonce}\r\ncontent-length: 2\r\n\r\n{{}}", key.public_key, now()).into_bytes(),
            Want::Code(400, "bad_request"),
        ),
        (
            "a timestamp overflowing i64",
            format!("POST {t} HTTP/1.1\r\nhost: gw\r\nx-api-public-key: {}\r\nx-api-signature: 00\r\nx-api-timestamp: 99999999999999999999999\r\nx-api-nonce: n1\r\ncontent-length: 2\r\n\r\n{{}}", key.public_key).into_bytes(),
            Want::Code(400, "malformed_credentials"),
        ),
        (
            "a negative timestamp",
            format!("POST {t} HTTP/1.1\r\nhost: gw\r\nx-api-public-key: {}\r\nx-api-signature: 00\r\nx-api-timestamp: -9223372036854775808\r\nx-api-nonce: n2\r\ncontent-length: 2\r\n\r\n{{}}", key.public_key).into_bytes(),
            Want::Code(400, "malformed_credentials"),
        ),
        (
            "absolute-form target whose authority is not the Host",
            format!("POST http://evil.example{t} HTTP/1.1\r\nhost: gw\r\ncontent-length: 2\r\n\r\n{{}}").into_bytes(),
            Want::Unparseable,
        ),
        (
            "absolute-form target, unsigned",
            format!("POST http://evil.example{t} HTTP/1.1\r\nhost: evil.example\r\ncontent-length: 2\r\n\r\n{{}}").into_bytes(),
            Want::Code(401, "missing_credentials"),
        ),
        (
            "absolute-form target signed as origin-form",
            format!("POST http://evil.example{t} HTTP/1.1\r\nhost: evil.example\r\n{sig}content-length: 2\r\n\r\n{{}}").into_bytes(),
            Want::Code(401, "bad_signature"),
        ),
        (
            "mixed-case path: another path, no route",
            "POST /V1/Payments HTTP/1.1\r\nhost: gw\r\ncontent-length: 2\r\n\r\n{}".as_bytes().to_vec(),
            Want::Code(404, "no_route"),
        ),
        (
            "%2e%2e towards a public route",
            "GET /public/%2e%2e/v1/payments HTTP/1.1\r\nhost: gw\r\n\r\n".as_bytes().to_vec(),
            Want::Code(400, "bad_request"),
        ),
        (
            "// towards a public route",
            "GET /public//v1/payments HTTP/1.1\r\nhost: gw\r\n\r\n".as_bytes().to_vec(),
            Want::Code(400, "bad_request"),
        ),
        (
            "%2F inside a signed route",
            "GET /v1/payments%2F..%2Fadmin HTTP/1.1\r\nhost: gw\r\n\r\n".as_bytes().to_vec(),
            Want::Code(400, "bad_request"),
        ),
        (
            "HTTP/1.0 without keep-alive, unsigned",
            format!("POST {t} HTTP/1.0\r\ncontent-length: 2\r\n\r\n{{}}").into_bytes(),
            Want::Code(401, "missing_credentials"),
        ),
    ];

    // All at once: each waits up to 3 s for its connection to close.
    let answers = futures_util::future::join_all(cases.iter().map(|(_, request, _)| async move {
        raw_exchange(gw.proxy, &[request], Duration::ZERO, Duration::from_secs(3)).await
    }))
    .await;
    let mut outcomes = Vec::new();
    for ((what, _, want), out) in cases.iter().zip(&answers) {
        let status = status_of(out);
        let ok = match want {
            Want::Code(s, code) => status == *s && out.contains(&format!("\"code\":\"{code}\"")),
            // Pingora's parser refuses it before keygate sees a request.
            Want::Unparseable => out.is_empty() || status == 400,
        };
        let first_line = out.lines().next().unwrap_or("(closed)").to_owned();
        outcomes.push(format!("{what}: {first_line}"));
        assert!(
            ok,
            "{what}: want {want:?}, got: {}",
            out.chars().take(400).collect::<String>()
        );
        assert!(status < 500, "{what}: {out}");
    }
    println!(
        "hostile requests ({}):\n  {}",
        cases.len(),
        outcomes.join("\n  ")
    );
    assert_eq!(echo.count(), 0, "not one reached the upstream");

    // Pipelined: the first refused, the second (valid, public) still answered in order.
    let pipelined = format!(
        "POST {t} HTTP/1.1\r\nhost: gw\r\ncontent-length: 2\r\n\r\n{{}}GET /public/after HTTP/1.1\r\nhost: gw\r\n\r\n"
    );
    let out = gw.raw(pipelined.as_bytes()).await;
    let first = out.find("HTTP/1.1 401").expect(&out);
    let second = out.find("HTTP/1.1 200").expect(&out);
    assert!(first < second, "{out}");
    assert_eq!(echo.count(), 1, "only the public request went up");

    // HTTP/1.0 with keep-alive: answered, and the connection serves a second request.
    let ka = "GET /public/one HTTP/1.0\r\nconnection: keep-alive\r\n\r\nGET /public/two HTTP/1.0\r\n\r\n";
    let out = gw.raw(ka.as_bytes()).await;
    assert!(out.matches("HTTP/1.1 200").count() >= 2, "{out}");
    assert!(
        gw.log().lines().all(|l| !l.contains("panicked")),
        "{}",
        gw.log()
    );
}
