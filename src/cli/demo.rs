//! `keygate demo`: a zero-setup gateway — embedded store in a temp dir, a built-in echo
//! upstream, one minted key, and a signed `curl` command that works when pasted.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::Request;
use rand::distributions::{Alphanumeric, DistString};
use rand::rngs::OsRng;
use serde_json::json;

use super::sign::{self, SignRequest};
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::keys::{mint, AuthKind, EmbeddedStore, Environment, MasterKey, NewKey, SecretString};
use crate::server::{AxumService, StartError};
use crate::App;

/// Where the demo listens.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub metrics_listen: SocketAddr,
}

/// The built-in upstream: answers every request with what it received.
fn echo_router() -> axum::Router {
    axum::Router::new().fallback(|req: Request| async move {
        let (parts, body) = req.into_parts();
        let body: Bytes = axum::body::to_bytes(body, 16 * 1024 * 1024)
            .await
            .unwrap_or_default();
        let headers: BTreeMap<String, String> = parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        axum::Json(json!({
            "upstream": "keygate demo echo",
            "method": parts.method.as_str(),
            "target": parts.uri.to_string(),
            "headers": headers,
            "body": String::from_utf8_lossy(&body),
        }))
    })
}

fn config_text(opts: &DemoOptions, upstream: SocketAddr, dir: &std::path::Path) -> String {
    format!(
        r#"
[server]
listen = "{listen}"
shutdown_grace = "1s"

[admin]
listen = "{admin}"

[metrics]
listen = "{metrics}"

[store]
kind = "embedded"
path = "{db}"

[[upstreams]]
name = "echo"
endpoints = ["{upstream}"]

[[routes]]
name = "create-payment"
methods = ["POST"]
path = "/v1/payments"
scope = "payments.create"
upstream = "echo"

[[routes]]
name = "read-payment"
methods = ["GET"]
path = "/v1/payments/*"
scope = "payments.read"
upstream = "echo"

[[routes]]
name = "health"
methods = ["GET"]
path = "/health"
upstream = "echo"
public = true
"#,
        listen = opts.listen,
        admin = opts.admin_listen,
        metrics = opts.metrics_listen,
        db = dir.join("keygate.db").display(),
    )
}

/// Runs the demo until Ctrl-C.
pub fn run(opts: &DemoOptions) -> Result<(), StartError> {
    let dir: PathBuf = std::env::temp_dir().join(format!(
        "keygate-demo-{}-{}",
        std::process::id(),
        Alphanumeric.sample_string(&mut OsRng, 6)
    ));
    std::fs::create_dir_all(&dir).map_err(StartError::Runtime)?;

    let echo_addr = SocketAddr::from(([127, 0, 0, 1], 0));
    let echo = TcpListener::bind(echo_addr).map_err(|e| StartError::Listen(echo_addr, e))?;
    echo.set_nonblocking(true).map_err(StartError::Runtime)?;
    let upstream = echo.local_addr().map_err(StartError::Runtime)?;

    let config = Config::from_toml(&config_text(opts, upstream, &dir)).map_err(|e| {
        StartError::Runtime(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            e.to_string(),
        ))
    })?;
    let (master, _) = MasterKey::generate();
    let admin_token = SecretString::new(format!(
        "kgadm_{}",
        Alphanumeric.sample_string(&mut OsRng, 32)
    ));
    let stores = crate::server::Stores::of(EmbeddedStore::open(&dir.join("keygate.db"))?);
    let store = stores.keys;

    let clock = SystemClock;
    let new = NewKey {
        owner: "demo-merchant".into(),
        name: "demo key".into(),
        description: Some("minted by keygate demo".into()),
        scopes: vec!["payments.*".into()],
        ip_allow_list: vec![],
        rate_limits: vec![],
        remaining: None,
        refill: None,
        expires_at: None,
        environment: Environment::Test,
        auth: AuthKind::HmacV1,
        metadata: BTreeMap::new(),
        tls_client_cert_sha256: None,
    };
    let (record, secret) = mint(&master, new, clock.now());
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?
        .block_on(store.insert(&record))?;

    let proxy_url = format!("http://{}", loopback(opts.listen));
    let admin_url = format!("http://{}", loopback(opts.admin_listen));
    let req = SignRequest {
        scheme: AuthKind::HmacV1,
        public_key: record.public_key.clone(),
        secret: secret.expose().to_owned(),
        method: "POST".into(),
        target: "/v1/payments".into(),
        body: br#"{"amount":"10.00","currency":"USD","order_id":"demo-1"}"#.to_vec(),
        timestamp: clock.unix(),
        nonce: uuid::Uuid::new_v4().to_string(),
    };
    println!(
        "\nkeygate demo is starting\n\
         \n  proxy     {proxy_url}   (signed client traffic)\
         \n  admin     {admin_url}   (admin API)\
         \n  metrics   http://{}/metrics\
         \n  upstream  http://{upstream}   (built-in echo)\
         \n  data      {}\
         \n\nadmin token (shown once):  {}\
         \n\ndemo key  {}\n  public_key  {}\n  secret      {}   (shown once)\n  scopes      payments.*\
         \n\nA signed request (valid for 5 minutes, and once: its nonce cannot be replayed):\n\n{}\n\
         \nSign another one:\n\n  keygate sign --public-key {} --secret {} --method POST --target /v1/payments --body '{{\"amount\":\"1.00\"}}' --url {proxy_url}\n\
         \nMint a key:\n\n  curl -sS -X POST {admin_url}/v1/keys -H 'authorization: Bearer {}' \\\n    -H 'content-type: application/json' -d '{{\"owner\":\"acme\",\"name\":\"checkout\",\"scopes\":[\"payments.create\"]}}'\n\
         \nCtrl-C stops the demo.\n",
        loopback(opts.metrics_listen),
        dir.display(),
        admin_token.expose(),
        record.id,
        record.public_key,
        secret.expose(),
        sign::curl(&proxy_url, &req),
        record.public_key,
        secret.expose(),
        admin_token.expose(),
    );

    let app = App {
        config,
        config_path: None,
        upgrade: false,
        store,
        signing_keys: stores.signing_keys,
        rate_limits: stores.rate_limits,
        abuse: stores.abuse,
        credits: stores.credits,
        master: Arc::new(master),
        admin_token_hashes: vec![admin_token.sha256()],
        clock: Arc::new(clock),
    };
    let echo_service = pingora::services::background::background_service(
        "demo echo upstream",
        AxumService::new(echo, echo_router()),
    );
    app.run(vec![Box::new(echo_service)], None)
}

fn loopback(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    }
}
