//! End to end through the real binary: the success path and every error code of SPEC §3.4
//! (but `rate_limited`, which is not built yet), each provoked through the proxy, each
//! checked to have reached the upstream not at all.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use std::time::Duration;

use serde_json::json;
use support::{
    assert_problem, body_headers, now, raw_exchange, v1_headers, Echo, Gateway, Options,
};

async fn setup() -> (Echo, Gateway) {
    let echo = Echo::start().await;
    let gw = Gateway::start(Options::new(&echo)).await;
    (echo, gw)
}

/// Every test below that is refused must leave the upstream untouched.
fn assert_upstream_untouched(echo: &Echo) {
    assert_eq!(
        echo.count(),
        0,
        "the upstream saw a refused request: {:?}",
        echo.seen()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_post_reaches_upstream_byte_identical_with_identity() {
    let (echo, gw) = setup().await;
    let key = gw.mint(json!({"owner": "merchant_42", "scopes": ["payments.create", "payments.read"], "environment": "live"})).await;
    let body: Vec<u8> = (0..1024u32).map(|i| (i * 7 % 256) as u8).collect();
    let mut headers = v1_headers(&key, "POST", "/v1/payments", &body, now(), "nonce-1");
    headers.push(("x-keygate-owner".into(), "someone-else".into()));
    headers.push(("x-keygate-key-id".into(), "key_spoofed".into()));
    headers.push(("x-forwarded-for".into(), "203.0.113.5".into()));
    let resp = gw.send("POST", "/v1/payments", &headers, &body).await;
    assert_eq!(resp.status(), 200);
    let rid = resp
        .headers()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();

    let seen = echo.seen();
    assert_eq!(seen.len(), 1);
    let s = &seen[0];
    assert_eq!(s.method, "POST");
    assert_eq!(s.target, "/v1/payments");
    assert_eq!(&s.body[..], &body[..], "body must be byte-identical");
    let h = |n: &str| {
        s.headers
            .get_all(n)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(h("x-keygate-key-id"), vec![key.id.clone()]);
    assert_eq!(h("x-keygate-owner"), vec!["merchant_42".to_owned()]);
    assert_eq!(
        h("x-keygate-scopes"),
        vec!["payments.create payments.read".to_owned()]
    );
    assert_eq!(h("x-keygate-environment"), vec!["live".to_owned()]);
    assert_eq!(h("x-request-id"), vec![rid]);
    assert_eq!(
        h("x-forwarded-for"),
        vec!["203.0.113.5, 127.0.0.1".to_owned()]
    );
    for cred in [
        "x-api-public-key",
        "x-api-signature",
        "x-api-timestamp",
        "x-api-nonce",
        "authorization",
    ] {
        assert!(h(cred).is_empty(), "{cred} leaked upstream");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_above_the_retry_buffer_is_forwarded_whole_after_verification() {
    let (echo, gw) = setup().await;
    let key = gw.mint(json!({})).await;
    // 300 KiB: past pingora's 64 KiB retry buffer, so keygate forwards it itself.
    let body: Vec<u8> = (0..300 * 1024u32).map(|i| (i % 251) as u8).collect();
    let resp = gw.send_v1(&key, "POST", "/v1/payments", &body).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("x-request-id"));
    let answer: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(answer["body_len"], 300 * 1024);
    let seen = echo.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(&seen[0].body[..], &body[..]);
    assert_eq!(seen[0].headers["x-keygate-key-id"], key.id.as_str());
    assert!(!seen[0].headers.contains_key("x-api-signature"));

    // The same large body with a wrong signature never leaves keygate.
    echo.clear();
    let mut headers = v1_headers(&key, "POST", "/v1/payments", b"other", now(), "n-large-2");
    headers.retain(|(k, _)| k != "content-length");
    let resp = gw.send("POST", "/v1/payments", &headers, &body).await;
    assert_problem(resp, 401, "bad_signature").await;
    assert_upstream_untouched(&echo);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_at_the_retry_buffer_boundary_arrive_whole() {
    let (echo, gw) = setup().await;
    let key = gw.mint(json!({})).await;
    // 64 KiB fits pingora's retry buffer; one byte more takes keygate's own forwarding path;
    // exactly server.max_body_bytes (1 MiB here) is still accepted.
    for size in [64 * 1024 - 1, 64 * 1024, 64 * 1024 + 1, 1024 * 1024] {
        echo.clear();
        let body: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
        let resp = gw.send_v1(&key, "POST", "/v1/payments", &body).await;
        assert_eq!(resp.status(), 200, "size {size}");
        let seen = echo.seen();
        assert_eq!(seen.len(), 1, "size {size}");
        assert_eq!(seen[0].body.len(), size);
        assert_eq!(&seen[0].body[..], &body[..], "size {size}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_with_query_is_signed_over_the_exact_target() {
    let (echo, gw) = setup().await;
    let key = gw.mint(json!({})).await;
    let target = "/v1/payments/pay_123?expand=customer&limit=10";
    let resp = gw.send_v1(&key, "GET", target, b"").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(echo.seen()[0].target, target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_is_404() {
    let (echo, gw) = setup().await;
    let resp = gw.send("GET", "/v2/nothing", &[], b"").await;
    assert_problem(resp, 404, "no_route").await;
    let resp = gw.send("POST", "/", &[], b"{}").await;
    assert_problem(resp, 404, "no_route").await;
    assert_upstream_untouched(&echo);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_too_large_is_413_without_reading_it() {
    let (echo, gw) = setup().await;
    let key = gw.mint(json!({})).await;
    let body = vec![b'a'; 1024 * 1024 + 1];
    let resp = gw.send_v1(&key, "POST", "/v1/payments", &body).await;
    assert_problem(resp, 413, "body_too_large").await;

    // A chunked body has no length up front: it is counted while read, once the headers
    // have passed checks 3-7 (credentials come before a byte of the body is read).
    let signed = support::v1_lines(&key, "POST", "/v1/payments", b"", support::now());
    let head = format!(
        "POST /v1/payments HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n{signed}\r\n"
    );
    let chunk = format!("100000\r\n{}\r\n", "b".repeat(0x100000));
    let out = raw_exchange(
        gw.proxy,
        &[
            head.as_bytes(),
            chunk.as_bytes(),
            chunk.as_bytes(),
            b"0\r\n\r\n",
        ],
        Duration::from_millis(10),
        Duration::from_secs(5),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    assert!(out.contains("body_too_large"), "{out}");
    assert_upstream_untouched(&echo);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_and_malformed_credentials() {
    let (echo, gw) = setup().await;
    assert_problem(
        gw.send("POST", "/v1/payments", &[], b"{}").await,
        401,
        "missing_credentials",
    )
    .await;
    let key = gw.mint(json!({})).await;
    let mut h = v1_headers(&key, "POST", "/v1/payments", b"{}", now(), "n1");
    h.retain(|(k, _)| k != "x-api-signature");
    assert_problem(
        gw.send("POST", "/v1/payments", &h, b"{}").await,
        401,
        "missing_credentials",
    )
    .await;
    let mut h = v1_headers(&key, "POST", "/v1/payments", b"{}", now(), "n1");
    h.retain(|(k, _)| k != "x-api-timestamp");
    assert_problem(
        gw.send("POST", "/v1/payments", &h, b"{}").await,
        401,
        "missing_credentials",
    )
    .await;

    let mut h = v1_headers(&key, "POST", "/v1/payments", b"{}", now(), "n1");
    h.iter_mut()
        .filter(|(k, _)| k == "x-api-signature")
        .for_each(|(_, v)| *v = "xyz".into());
    assert_problem(
        gw.send("POST", "/v1/payments", &h, b"{}").await,
        400,
        "malformed_credentials",
    )
    .await;
    let h = v1_headers(&key, "POST", "/v1/payments", b"{}", now(), "bad nonce!");
    assert_problem(
        gw.send("POST", "/v1/payments", &h, b"{}").await,
        400,
        "malformed_credentials",
    )
    .await;
    let h = vec![("authorization".to_owned(), "Basic Zm9vOmJhcg==".to_owned())];
    assert_problem(
        gw.send("POST", "/v1/payments", &h, b"{}").await,
        400,
        "malformed_credentials",
    )
    .await;
    assert_upstream_untouched(&echo);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_key_is_401() {
    let (echo, gw) = setup().await;
    let mut key = gw.mint(json!({})).await;
    key.public_key = "pk_test_AAAAAAAAAAAAAAAAAAAAAAAA".into();
    for _ in 0..2 {
        // The second answer comes from the negative cache; it must be the same.
        assert_problem(
            gw.send_v1(&key, "POST", "/v1/payments", b"{}").await,
            401,
            "unknown_key",
        )
        .await;
    }
    let h = vec![("x-api-key".to_owned(), "sk_test_nobody".to_owned())];
    assert_problem(
        gw.send("POST", "/v1/payments", &h, b"{}").await,
        401,
        "unknown_key",
    )
    .await;
    assert_upstream_untouched(&echo);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_key_is_refused_at_once() {
    let (echo, gw) = setup().await;
    let key = gw.mint(json!({})).await;
    assert_eq!(
        gw.send_v1(&key, "POST", "/v1/payments", b"{}")
            .await
            .status(),
        200
    );
    echo.clear();
    gw.revoke(&key).await;
    assert_problem(
        gw.send_v1(&key, "POST", "/v1/payments", b"{}").await,
        401,
        "revoked_key",
    )
    .await;
    assert_upstream_untouched(&echo);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_key_is_401() {
    let (echo, gw) = setup().await;
    let soon = time::OffsetDateTime::now_utc() + time::Duration::seconds(2);
    let exp = soon
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let key = gw.mint(json!({"expires_at": exp})).await;
    assert_eq!(
        gw.send_v1(&key, "POST", "/v1/payments", b"{}")
            .await
            .status(),
        200
    );
    echo.clear();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_problem(
        gw.send_v1(&key, "POST", "/v1/payments", b"{}").await,
        401,
        "expired_key",
    )
    .await;
    assert_upstream_untouched(&echo);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_allow_list_is_enforced() {
    let (echo, gw) = setup().await;
    let outside = gw
        .mint(json!({"ip_allow_list": ["10.0.0.0/8", "2001:db8::/32"]}))
        .await;
    let body = assert_problem(
        gw.send_v1(&outside, "POST", "/v1/payments", b"{}").await,
        403,
        "ip_not_allowed",
    )
    .await;
    assert!(body["detail"].as_str().unwrap().contains("127.0.0.1"));
    // An untrusted peer cannot talk its way in through X-Forwarded-For.
    let mut h = v1_headers(&outside, "POST", "/v1/payments", b"{}", now(), "xff-1");
    h.push(("x-forwarded-for".into(), "10.1.2.3".into()));
    assert_problem(
        gw.send("POST", "/v1/payments", &h, b"{}").await,
        403,
        "ip_not_allowed",
    )
    .await;
    assert_upstream_untouched(&echo);
    let inside = gw.mint(json!({"ip_allow_list": ["127.0.0.1"]})).await;
    assert_eq!(
        gw.send_v1(&inside, "POST", "/v1/payments", b"{}")
            .await
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_proxy_forwarded_address_is_believed() {
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    opts.server_extra = "trusted_proxies = [\"127.0.0.1/32\"]".into();
    let gw = Gateway::start(opts).await;
    let key = gw.mint(json!({"ip_allow_list": ["198.51.100.0/24"]})).await;
    let mut h = v1_headers(&key, "POST", "/v1/payments", b"{}", now(), "tp-1");
    h.push(("x-forwarded-for".into(), "6.6.6.6, 198.51.100.7".into()));
    let resp = gw.send("POST", "/v1/payments", &h, b"{}").await;
    assert_eq!(resp.status(), 200);
    let xff = echo.seen()[0].headers["x-forwarded-for"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(xff, "6.6.6.6, 198.51.100.7, 198.51.100.7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_timestamp_is_401() {
    let (echo, gw) = setup().await;
    let key = gw.mint(json!({})).await;
    for ts in [now() - 301, now() + 301] {
        let h = v1_headers(
            &key,
            "POST",
            "/v1/payments",
            b"{}",
            ts,
            &format!("stale-{ts}"),
        );
        assert_problem(
            gw.send("POST", "/v1/payments", &h, b"{}").await,
            401,
            "stale_timestamp",
        )
        .await;
    }
    assert_upstream_untouched(&echo);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_signature_is_401_and_leaks_nothing() {
    let (echo, gw) = setup().await;
    let key = gw.mint(json!({})).await;
    let h = v1_headers(
        &key,
        "POST",
        "/v1/payments",
        br#"{"amount":"1.00"}"#,
        now(),
        "bs-1",
    );
    let body = assert_problem(
        gw.send("POST", "/v1/payments", &h, br#"{"amount":"9.00"}"#)
            .await,
        401,
        "bad_signature",
    )
    .await;
    let text = body.to_string();
    assert!(!text.contains(&key.secret));
    // The signature for the body actually sent must not appear either.
    let right = v1_headers(
        &key,
        "POST",
        "/v1/payments",
        br#"{"amount":"9.00"}"#,
        now(),
        "bs-1",
    );
    let expected = &right
        .iter()
        .find(|(k, _)| k == "x-api-signature")
        .unwrap()
        .1;
    assert!(!text.contains(expected.as_str()));
    // The same nonce still works: a forged request does not burn it.
    assert_eq!(
        gw.send("POST", "/v1/payments", &right, br#"{"amount":"9.00"}"#)
            .await
            .status(),
        200
    );
    echo.clear();
    // Target tampering is caught too.
    let h = v1_headers(&key, "GET", "/v1/payments/a", b"", now(), "bs-2");
    assert_problem(
        gw.send("GET", "/v1/payments/b", &h, b"").await,
        401,
        "bad_signature",
    )
    .await;
    assert_upstream_untouched(&echo);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_nonce_is_refused() {
    let (echo, gw) = setup().await;
    let key = gw.mint(json!({})).await;
    let h = v1_headers(&key, "POST", "/v1/payments", b"{}", now(), "once");
    assert_eq!(
        gw.send("POST", "/v1/payments", &h, b"{}").await.status(),
        200
    );
    echo.clear();
    assert_problem(
        gw.send("POST", "/v1/payments", &h, b"{}").await,
        401,
        "replayed_nonce",
    )
    .await;
    assert_upstream_untouched(&echo);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hmac_body_keys_sign_the_body_and_need_a_nonce() {
    let (echo, gw) = setup().await;
    let key = gw.mint(json!({"auth": "hmac-body"})).await;
    let body = br#"{"from":"ETH","to":"USDT","nonce":1643881172430}"#;
    let h = body_headers(&key, body);
    assert_eq!(
        gw.send("POST", "/v1/payments", &h, body).await.status(),
        200
    );
    assert_eq!(&echo.seen()[0].body[..], &body[..]);
    echo.clear();
    assert_problem(
        gw.send("POST", "/v1/payments", &h, body).await,
        401,
        "replayed_nonce",
    )
    .await;
    let no_nonce = br#"{"from":"ETH"}"#;
    let h = body_headers(&key, no_nonce);
    assert_problem(
        gw.send("POST", "/v1/payments", &h, no_nonce).await,
        401,
        "missing_nonce",
    )
    .await;
    let h = body_headers(&key, b"");
    assert_problem(
        gw.send("POST", "/v1/payments", &h, b"").await,
        401,
        "missing_nonce",
    )
    .await;
    assert_upstream_untouched(&echo);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insufficient_scope_is_403() {
    let (echo, gw) = setup().await;
    let key = gw.mint(json!({"scopes": ["payments.read"]})).await;
    let body = assert_problem(
        gw.send_v1(&key, "POST", "/v1/payments", b"{}").await,
        403,
        "insufficient_scope",
    )
    .await;
    assert!(body["detail"].as_str().unwrap().contains("payments.create"));
    assert_upstream_untouched(&echo);
    assert_eq!(
        gw.send_v1(&key, "GET", "/v1/payments/p1", b"")
            .await
            .status(),
        200
    );
    let all = gw.mint(json!({"scopes": ["*"]})).await;
    assert_eq!(
        gw.send_v1(&all, "POST", "/v1/payments", b"{}")
            .await
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_keys_and_routes_that_refuse_them() {
    let (echo, gw) = setup().await;
    let key = gw.mint(json!({"auth": "bearer"})).await;
    let h = vec![("authorization".to_owned(), format!("Bearer {}", key.secret))];
    assert_eq!(
        gw.send("POST", "/v1/payments", &h, b"{}").await.status(),
        200
    );
    let h2 = vec![("x-api-key".to_owned(), key.secret.clone())];
    assert_eq!(
        gw.send("POST", "/v1/payments", &h2, b"{}").await.status(),
        200
    );
    assert!(!echo.seen()[0].headers.contains_key("authorization"));
    assert!(!echo.seen()[1].headers.contains_key("x-api-key"));
    echo.clear();
    let body = assert_problem(
        gw.send("POST", "/v1/signed-only", &h, b"{}").await,
        401,
        "missing_credentials",
    )
    .await;
    assert!(body["detail"].as_str().unwrap().contains("bearer"));
    assert_upstream_untouched(&echo);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_kept_for_an_upstream_that_verifies_them() {
    let (echo, gw) = setup().await;
    let key = gw.mint(json!({})).await;
    assert_eq!(
        gw.send_v1(&key, "POST", "/v1/verifies/x", b"{}")
            .await
            .status(),
        200
    );
    let seen = &echo.seen()[0];
    assert_eq!(seen.headers["x-api-public-key"], key.public_key.as_str());
    assert!(seen.headers.contains_key("x-api-signature"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_sealed_under_another_master_key_is_503_not_401() {
    let echo = Echo::start().await;
    let mut gw = Gateway::start(Options::new(&echo)).await;
    let key = gw.mint(json!({})).await;
    let tmp = gw.take_dir();
    let dir = gw.dir.clone();
    assert!(gw
        .signal_and_wait("TERM", Duration::from_secs(10))
        .is_some());
    let mut opts = Options::new(&echo);
    opts.dir = Some(dir);
    // Without assertions: the stored assertion keyring cannot be opened either, and a gateway
    // that needs it never reports ready (tests/assertion.rs); this case is about the key.
    opts.routes = opts
        .routes
        .replace("[[upstreams]]\n", "[[upstreams]]\nassertion = \"off\"\n");
    // A different master key: the stored record cannot be opened, the key cannot be judged.
    let gw = Gateway::start(opts).await;
    assert_problem(
        gw.send_v1(&key, "POST", "/v1/payments", b"{}").await,
        503,
        "store_unavailable",
    )
    .await;
    assert_upstream_untouched(&echo);
    drop(tmp);
}

/// Both forwarding paths — pingora's, and keygate's own for bodies over 64 KiB — must map
/// an upstream failure to the same answer.
async fn assert_both_paths_answer(target: &str, status: u16, code: &str) {
    let (_echo, gw) = setup().await;
    let key = gw.mint(json!({})).await;
    for body in [b"{}".to_vec(), vec![b'x'; 100 * 1024]] {
        let resp = gw.send_v1(&key, "POST", target, &body).await;
        assert_problem(resp, status, code).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_is_502() {
    assert_both_paths_answer("/v1/dead", 502, "upstream_unavailable").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_is_504() {
    // The echo sleeps 3 s on /slow; the upstream's read_timeout is 1 s.
    assert_both_paths_answer("/v1/x/slow", 504, "upstream_timeout").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_routes_need_no_credentials_but_lose_spoofed_identity() {
    let (echo, gw) = setup().await;
    let h = vec![("x-keygate-owner".to_owned(), "spoof".to_owned())];
    let resp = gw.send("GET", "/public/prices", &h, b"").await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("x-request-id"));
    let seen = &echo.seen()[0];
    assert!(!seen.headers.contains_key("x-keygate-owner"));
    assert!(seen.headers.contains_key("x-request-id"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_and_not_forwarded() {
    let (echo, gw) = setup().await;
    let key = gw.mint(json!({})).await;
    let body = br#"{"amount":"5.00"}"#;
    let h = v1_headers(&key, "POST", "/v1/payments", body, now(), "expect-1");
    let mut head = format!(
        "POST /v1/payments HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nexpect: 100-continue\r\nconnection: close\r\n",
        body.len()
    );
    for (k, v) in &h {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let out = raw_exchange(
        gw.proxy,
        &[head.as_bytes(), body],
        Duration::from_millis(200),
        Duration::from_secs(5),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 100 Continue"), "{out}");
    assert!(out.contains("HTTP/1.1 200"), "{out}");
    let seen = echo.seen();
    assert_eq!(&seen[0].body[..], &body[..]);
    assert!(!seen[0].headers.contains_key("expect"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_outcomes_by_route() {
    let (_echo, gw) = setup().await;
    let key = gw.mint(json!({})).await;
    assert_eq!(
        gw.send_v1(&key, "POST", "/v1/payments", b"{}")
            .await
            .status(),
        200
    );
    assert_eq!(
        gw.send_v1(&key, "POST", "/v1/payments", b"{}")
            .await
            .status(),
        200
    );
    assert_eq!(
        gw.send("POST", "/v1/payments", &[], b"{}").await.status(),
        401
    );
    assert_eq!(gw.send("GET", "/nope", &[], b"").await.status(), 404);
    // A request is counted in pingora's logging phase, just after its answer is sent: wait for
    // the last one.
    let mut text = String::new();
    for _ in 0..40 {
        text = gw.metrics_text().await;
        if text.contains("keygate_requests_total{outcome=\"no_route\",route=\"unmatched\"} 1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let line = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .map(str::to_owned)
    };
    assert_eq!(
        line("keygate_requests_total{outcome=\"ok\",route=\"create-payment\"}").as_deref(),
        Some("keygate_requests_total{outcome=\"ok\",route=\"create-payment\"} 2"),
        "{text}"
    );
    assert!(
        line("keygate_requests_total{outcome=\"missing_credentials\",route=\"create-payment\"} 1")
            .is_some(),
        "{text}"
    );
    assert!(
        line("keygate_requests_total{outcome=\"no_route\",route=\"unmatched\"} 1").is_some(),
        "{text}"
    );
    assert!(
        line("keygate_key_cache_requests_total{result=\"miss\"} 1").is_some(),
        "{text}"
    );
    assert!(
        line("keygate_key_cache_requests_total{result=\"hit\"} 1").is_some(),
        "{text}"
    );
    assert!(
        line("keygate_auth_duration_seconds_count{route=\"create-payment\"} 3").is_some(),
        "{text}"
    );
    assert!(line("keygate_upstream_duration_seconds_count{route=\"create-payment\",status_class=\"2xx\"} 2").is_some(), "{text}");
    assert!(!text.contains(&key.id) && !text.contains(&key.public_key) && !text.contains("acme"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_requests_are_counted_per_key() {
    let (_echo, gw) = setup().await;
    let key = gw.mint(json!({})).await;
    let other = gw.mint(json!({})).await;
    for _ in 0..3 {
        assert_eq!(
            gw.send_v1(&key, "POST", "/v1/payments", b"{}")
                .await
                .status(),
            200
        );
    }
    // Refused requests are not counted: this one fails its signature.
    let h = v1_headers(&key, "POST", "/v1/payments", b"a", now(), "uncounted");
    assert_eq!(
        gw.send("POST", "/v1/payments", &h, b"b").await.status(),
        401
    );
    let record = gw
        .key_record_with_usage(&key.id, 3, Duration::from_secs(5))
        .await;
    assert_eq!(record["total_requests"], 3, "{record}");
    assert!(record["last_used_at"].is_string());
    assert_eq!(
        record["updated_at"], key.record["updated_at"],
        "usage is not a change"
    );
    let untouched = gw.key_record(&other.id).await;
    assert_eq!(untouched["total_requests"], 0);
    assert!(untouched["last_used_at"].is_null());
}
