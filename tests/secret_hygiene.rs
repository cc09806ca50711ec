//! Secret hygiene through the real binary: traffic and every admin operation with known
//! secrets, then every log line (at trace level, every crate), every metric, every response
//! body, the audit log and the raw store file are scanned for the secrets, the admin token
//! and the master key, as text and in their hex and base64 forms. Zero hits.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use base64::Engine as _;
use serde_json::{json, Value};
use support::{Echo, Gateway, Options, ADMIN_TOKEN};

/// A secret and the forms it could leak in.
fn forms(secret: &str) -> Vec<String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut out = vec![
        secret.to_owned(),
        hex::encode(secret),
        b64.encode(secret),
        b64url.encode(secret),
    ];
    // Base64 text (the master key) also leaks as the bytes it stands for.
    if let Ok(raw) = b64.decode(secret) {
        out.push(hex::encode(&raw));
        out.push(b64url.encode(&raw));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_leaves_in_logs_metrics_bodies_audit_or_store() {
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    opts.rust_log = "trace";
    let gw = Gateway::start(opts).await;
    let admin = reqwest::Client::new();
    let mut bodies: Vec<String> = Vec::new();
    let mut secrets: Vec<String> = vec![ADMIN_TOKEN.to_owned(), gw.master_key.clone()];

    // Every admin operation, with known and minted secrets.
    let hmac = gw
        .mint(json!({"owner": "acme", "scopes": ["payments.*", "keys.manage"]}))
        .await;
    let bearer = gw.mint(json!({"owner": "acme", "auth": "bearer"})).await;
    secrets.extend([hmac.secret.clone(), bearer.secret.clone()]);
    let imported_secret = "imported-secret-Q7pX2mZ9vL4kR8sT";
    secrets.push(imported_secret.into());
    let r = admin
        .post(gw.admin_url("/v1/keys/import"))
        .bearer_auth(ADMIN_TOKEN)
        .json(
            &json!({"public_key": "pk_legacy_hygiene", "secret": imported_secret,
                      "owner": "acme", "name": "legacy", "auth": "hmac-body"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        201,
        "the import's answer hands the secret back: not scanned"
    );
    let r = admin
        .patch(gw.admin_url(&format!("/v1/keys/{}", bearer.id)))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"name": "renamed", "remaining": 100}))
        .send()
        .await
        .unwrap();
    bodies.push(r.text().await.unwrap());
    let r = admin
        .post(gw.admin_url(&format!("/v1/keys/{}/credits", bearer.id)))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"add": 5}))
        .send()
        .await
        .unwrap();
    bodies.push(r.text().await.unwrap());
    for path in ["/v1/keys", "/v1/audit", "/v1/assertion/keys"] {
        bodies.push(gw.admin_get(path, ADMIN_TOKEN).await.text().await.unwrap());
    }
    bodies.push(
        gw.admin_get("/v1/keys", "wrong-token")
            .await
            .text()
            .await
            .unwrap(),
    );

    // Traffic: signed, badly signed, bearer right and wrong, self-service mint.
    for _ in 0..3 {
        bodies.push(gw.post(&hmac, "/v1/payments").await.text().await.unwrap());
    }
    let mut wrong = hmac.clone();
    wrong.secret = format!("{}x", hmac.secret);
    bodies.push(gw.post(&wrong, "/v1/payments").await.text().await.unwrap());
    for (name, value) in [
        ("authorization", format!("Bearer {}", bearer.secret)),
        ("x-api-key", bearer.secret.clone()),
        ("authorization", format!("Bearer {}y", bearer.secret)),
    ] {
        let r = gw
            .send("GET", "/v1/payments/1", &[(name.into(), value)], b"")
            .await;
        bodies.push(r.text().await.unwrap());
    }
    let r = gw
        .call(&hmac, "POST", "/_keygate/v1/keys", json!({"name": "child"}))
        .await;
    let child: Value = r.json().await.unwrap();
    let child_secret = child["secret"].as_str().unwrap().to_owned();
    secrets.push(child_secret.clone());

    // Rotation and revocation last: the old secrets must not leak either.
    let r = admin
        .post(gw.admin_url(&format!("/v1/keys/{}/rotate", bearer.id)))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"grace_seconds": 0}))
        .send()
        .await
        .unwrap();
    let rotated: Value = r.json().await.unwrap();
    secrets.push(rotated["secret"].as_str().unwrap().to_owned());
    gw.revoke(&hmac).await;

    // What is scanned: logs, metrics, bodies other than the one response that hands each
    // secret out, the audit log and the store file.
    let log = gw.log();
    assert!(
        log.matches("keygate::access").count() >= 8,
        "the gateway's log is captured: {log}"
    );
    // The HTTP libraries' header dumps are held back whatever the level.
    for line in log
        .lines()
        .filter(|l| l.contains(" pingora") || l.contains(" h2::"))
    {
        assert!(
            !line.contains(" DEBUG ") && !line.contains(" TRACE "),
            "{line}"
        );
    }
    let metrics = gw.metrics_text().await;
    let audit = gw
        .admin_get("/v1/audit?limit=200", ADMIN_TOKEN)
        .await
        .text()
        .await
        .unwrap();
    let store = std::fs::read(gw.dir.join("keygate.db")).unwrap();
    let store = String::from_utf8_lossy(&store).into_owned();
    let places = [
        ("log", log.as_str()),
        ("metrics", metrics.as_str()),
        ("audit", audit.as_str()),
        ("store file", store.as_str()),
    ];
    let bodies = bodies.join("\n");
    let mut hits = Vec::new();
    for secret in &secrets {
        for form in forms(secret) {
            for (place, text) in places.iter().chain([&("bodies", bodies.as_str())]) {
                if let Some(at) = text.find(&form) {
                    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
                    let line_end = text[at..].find('\n').map_or(text.len(), |i| at + i);
                    let line: String = text[line_start..line_end].chars().take(300).collect();
                    hits.push(format!("{place}: {form} in: {line}"));
                }
            }
        }
    }
    println!(
        "secret hygiene: {} secrets x {} forms scanned over {} log lines, {} bytes of metrics, \
         audit and store: {} hits",
        secrets.len(),
        forms(&secrets[0]).len(),
        log.lines().count(),
        metrics.len() + audit.len() + store.len(),
        hits.len()
    );
    assert!(hits.is_empty(), "{hits:#?}");
}
