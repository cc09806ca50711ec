//! Load generator for `benches/load/run.sh`: keep-alive HTTP/1.1 connections on raw hyper,
//! each sending requests back to back, optionally signed with `hmac-v1` (a fresh nonce per
//! request, which is why wrk cannot do this). The same client measures the upstream directly
//! and through keygate, so their ratio is fair.
//!
//! ```text
//! loadgen free-port
//! loadgen wait URL
//! loadgen mint ADMIN_URL TOKEN [AUTH]     -> prints "<public_key> <secret>"
//! loadgen run URL CONNECTIONS SECONDS BODY_BYTES [PUBLIC_KEY SECRET]
//! loadgen run-bearer URL CONNECTIONS SECONDS BODY_BYTES SECRET
//! loadgen run-keys URL CONNECTIONS SECONDS BODY_BYTES KEY_FILE   -> each request: the next key
//! loadgen run-unknown URL CONNECTIONS SECONDS BODY_BYTES DISTINCT -> unknown keys (0: all new)
//! loadgen seed-redis REDIS_URL MASTER_KEY N KEY_FILE   -> mints N keys straight into Redis
//! loadgen redis-commands REDIS_URL                     -> total_commands_processed
//! ```
//!
//! An `https://` URL is reached over TLS trusting the CA in `LG_CA` (PEM), server name
//! `localhost`; `LG_H2=1` speaks HTTP/2 (ALPN `h2` over TLS, prior knowledge over plain TCP),
//! one stream at a time per connection, like the HTTP/1.1 rows.
//!
//! With `RATE=N` in the environment, the `run*` commands send N requests/s in total, each
//! connection on its own schedule, instead of back to back: latency at one offered load, the
//! same for every row, rather than at each row's saturation (where p99 mostly restates the
//! throughput). A request whose slot passed while the previous answer was awaited is timed
//! from its slot, so a gateway that falls behind pays for its queue (no coordinated
//! omission); `late` counts those.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use keygate::cli::sign::{headers, SignRequest};
use keygate::keys::AuthKind;

type Out = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Which key signs each request.
#[derive(Clone)]
enum Keys {
    None,
    One(String, String),
    /// A bearer key's secret in `Authorization`.
    Bearer(String),
    /// Each request takes the next unused key of the list (all connections share the index):
    /// every request is a key's first, so a cache miss.
    Each(Arc<Vec<(String, String)>>, Arc<AtomicUsize>),
    /// Keys the gateway does not know: from a pool of `n` (0: a new one every request).
    Unknown(usize),
}

impl Keys {
    fn pick(&self, seq: u64) -> Option<Option<(String, String)>> {
        match self {
            Self::None => Some(None),
            Self::One(pk, sk) => Some(Some((pk.clone(), sk.clone()))),
            Self::Bearer(_) => Some(None),
            Self::Each(list, next) => list
                .get(next.fetch_add(1, Ordering::Relaxed))
                .map(|k| Some(k.clone())),
            Self::Unknown(n) => {
                let i: u64 = if *n == 0 {
                    rand::random()
                } else {
                    seq.wrapping_mul(2_654_435_761) % *n as u64
                };
                Some(Some((
                    format!("pk_test_{i:024}"),
                    "sk_test_unknown".to_owned(),
                )))
            }
        }
    }
}

struct Target {
    host: String,
    path: String,
    tls: bool,
}

fn parse(url: &str) -> Target {
    let (tls, rest) = match url.strip_prefix("https://") {
        Some(rest) => (true, rest),
        None => (
            false,
            url.strip_prefix("http://")
                .expect("http:// or https:// URL"),
        ),
    };
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    Target {
        tls,
        host: host.to_owned(),
        path: if path.is_empty() {
            "/".into()
        } else {
            path.to_owned()
        },
    }
}

async fn get(url: &str) -> Option<(u16, Vec<u8>)> {
    let t = parse(url);
    let stream = tokio::net::TcpStream::connect(&t.host).await.ok()?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    let req = hyper::Request::get(&t.path)
        .header("host", &t.host)
        .body(Full::new(Bytes::new()))
        .ok()?;
    let resp = send.send_request(req).await.ok()?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.ok()?.to_bytes().to_vec();
    Some((status, body))
}

/// One client connection: HTTP/1.1 or HTTP/2, plain or TLS.
enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    async fn open(t: &Target) -> Self {
        let h2 = std::env::var("LG_H2").is_ok_and(|v| v == "1");
        let tcp = tokio::net::TcpStream::connect(&t.host).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        if !t.tls {
            return Self::handshake(TokioIo::new(tcp), h2).await;
        }
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        let ca = std::env::var("LG_CA").expect("LG_CA: the PEM CA to trust for https://");
        for cert in rustls::pki_types::CertificateDer::pem_file_iter(&ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        cfg.alpn_protocols = vec![if h2 {
            b"h2".to_vec()
        } else {
            b"http/1.1".to_vec()
        }];
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .unwrap();
        Self::handshake(TokioIo::new(tls), h2).await
    }

    async fn handshake<T>(io: TokioIo<T>, h2: bool) -> Self
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        if h2 {
            let (send, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(conn);
            Self::H2(send)
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            Self::H1(send)
        }
    }

    async fn send_request(
        &mut self,
        req: hyper::Request<Full<Bytes>>,
    ) -> hyper::Result<hyper::Response<hyper::body::Incoming>> {
        match self {
            Self::H1(s) => s.send_request(req).await,
            Self::H2(s) => s.send_request(req).await,
        }
    }
}

async fn connection(
    t: &Target,
    secs: f64,
    body: Bytes,
    keys: Keys,
    expect: u16,
    id: String,
    pace: Option<(Duration, Duration)>,
) -> (Vec<u32>, u64, u64) {
    let mut lat = Vec::with_capacity(200_000);
    let mut bad = 0u64;
    let mut late = 0u64;
    let mut send = Sender::open(t).await;
    let h2 = matches!(send, Sender::H2(_));
    let begin = Instant::now();
    let end = begin + Duration::from_secs_f64(secs);
    let mut i = 0u64;
    while Instant::now() < end {
        i += 1;
        // The request's slot when paced (connections staggered by `phase`, so they do not
        // all fire at once); it is made (and signed) before its slot comes.
        let slot =
            pace.map(|(iv, phase)| begin + phase + iv * u32::try_from(i).unwrap_or(u32::MAX));
        let mut req = if h2 {
            // HTTP/2 carries the authority in the URI, not a host header.
            let scheme = if t.tls { "https" } else { "http" };
            hyper::Request::post(format!("{scheme}://{}{}", t.host, t.path))
        } else {
            hyper::Request::post(&t.path).header("host", &t.host)
        }
        .header("content-type", "application/json");
        // Out of fresh keys: this connection is done.
        let Some(signer) = keys.pick(i) else { break };
        if let Keys::Bearer(secret) = &keys {
            req = req.header("authorization", format!("Bearer {secret}"));
        }
        if let Some((pk, secret)) = &signer {
            let sr = SignRequest {
                scheme: AuthKind::HmacV1,
                public_key: pk.clone(),
                secret: secret.clone(),
                method: "POST".into(),
                target: t.path.clone(),
                body: body.to_vec(),
                timestamp: time::OffsetDateTime::now_utc().unix_timestamp(),
                nonce: format!("{id}-{i}"),
            };
            for (k, v) in headers(&sr) {
                req = req.header(k, v);
            }
        }
        let req = req.body(Full::new(body.clone())).unwrap();
        let start = match slot {
            // Behind schedule (the previous answer came after this slot): the wait counts.
            Some(slot) if Instant::now() > slot => {
                late += 1;
                slot
            }
            // On time: timed from the actual send, so the timer's wake-up (tokio's 1 ms
            // granularity) is not counted as the gateway's.
            Some(slot) => {
                tokio::time::sleep_until(slot.into()).await;
                Instant::now()
            }
            None => Instant::now(),
        };
        match send.send_request(req).await {
            Ok(resp) => {
                let ok = resp.status().as_u16() == expect;
                let _ = resp.into_body().collect().await;
                lat.push(u32::try_from(start.elapsed().as_micros()).unwrap_or(u32::MAX));
                if !ok {
                    bad += 1;
                }
            }
            Err(_) => {
                bad += 1;
                break;
            }
        }
    }
    (lat, bad, late)
}

async fn run(args: &[String], keys: Keys, expect: u16) -> Out {
    let t = parse(&args[0]);
    let conns: usize = args[1].parse()?;
    let secs: f64 = args[2].parse()?;
    let body = Bytes::from(vec![b'x'; args[3].parse()?]);
    let t = std::sync::Arc::new(t);
    let started = Instant::now();
    let mut tasks = Vec::new();
    // Nonces must be unique across runs too: a run prefix, then connection and sequence.
    let run_id: u32 = rand::random();
    let rate: Option<f64> = std::env::var("RATE").ok().map(|r| r.parse()).transpose()?;
    let interval = rate.map(|r| Duration::from_secs_f64(conns as f64 / r));
    for conn in 0..conns {
        let id = format!("{run_id:08x}-{conn}");
        let (t, body, keys) = (std::sync::Arc::clone(&t), body.clone(), keys.clone());
        tasks.push(tokio::spawn(async move {
            let pace = interval.map(|iv| (iv, iv * conn as u32 / conns as u32));
            connection(&t, secs, body, keys, expect, id, pace).await
        }));
    }
    let mut all = Vec::new();
    let mut bad = 0;
    let mut late = 0;
    for task in tasks {
        let (lat, b, l) = task.await?;
        all.extend(lat);
        bad += b;
        late += l;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{{\"requests\":{},\"rps\":{:.0},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"non_2xx_or_errors\":{},\"late\":{late}}}",
        all.len(),
        all.len() as f64 / elapsed,
        pct(0.50),
        pct(0.99),
        pct(0.999),
        bad
    );
    Ok(())
}

/// Mints `n` hmac-v1 keys straight into Redis (as the admin API would, without audit
/// entries), 32 at a time, and writes "public_key secret" lines to `file`.
async fn seed_redis(url: &str, master_key: &str, n: usize, file: &str) -> Out {
    use keygate::keys::{mint, AuthKind, Environment, KeyStore, MasterKey, NewKey, RedisStore};
    let mk = Arc::new(MasterKey::from_base64(master_key)?);
    let url = url.to_owned();
    let store = Arc::new(tokio::task::spawn_blocking(move || RedisStore::open(&url)).await??);
    let lines = Arc::new(std::sync::Mutex::new(String::new()));
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (mk, store, lines, next) = (mk.clone(), store.clone(), lines.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let new = NewKey {
                    owner: "bench".into(),
                    name: "fresh".into(),
                    description: None,
                    scopes: vec!["payments.*".into()],
                    ip_allow_list: vec![],
                    expires_at: None,
                    environment: Environment::Test,
                    auth: AuthKind::HmacV1,
                    metadata: Default::default(),
                    tls_client_cert_sha256: None,
                    rate_limits: vec![],
                    remaining: None,
                    refill: None,
                };
                let (record, secret) = mint(&mk, new, time::OffsetDateTime::now_utc());
                store.insert(&record).await.unwrap();
                let line = format!("{} {}\n", record.public_key, secret.expose());
                lines.lock().unwrap().push_str(&line);
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let text = lines.lock().unwrap().clone();
    std::fs::write(file, text)?;
    drop(store);
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Out {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("free-port") => {
            println!("{}", std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port());
        }
        Some("wait") => {
            let deadline = Instant::now() + Duration::from_secs(60);
            while get(&args[1]).await.map(|(s, _)| s) != Some(200) {
                if Instant::now() > deadline {
                    return Err(format!("{} not ready", args[1]).into());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Some("mint") => {
            let t = parse(&format!("{}/v1/keys", args[1]));
            let stream = tokio::net::TcpStream::connect(&t.host).await?;
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let auth = args.get(3).map_or("hmac-v1", String::as_str);
            // LG_MINT_EXTRA: more fields of the key, e.g. `"rate_limits":[…]`.
            let extra = std::env::var("LG_MINT_EXTRA")
                .map(|e| format!(",{e}"))
                .unwrap_or_default();
            let body = format!(
                r#"{{"owner":"bench","name":"load","scopes":["payments.*"],"auth":"{auth}"{extra}}}"#
            );
            let req = hyper::Request::post(&t.path)
                .header("host", &t.host)
                .header("authorization", format!("Bearer {}", args[2]))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))?;
            let resp = send.send_request(req).await?;
            let v: serde_json::Value = serde_json::from_slice(&resp.into_body().collect().await?.to_bytes())?;
            println!("{} {}", v["public_key"].as_str().unwrap_or(""), v["secret"].as_str().unwrap_or(""));
        }
        Some("run") => {
            let keys = if args.len() >= 7 {
                Keys::One(args[5].clone(), args[6].clone())
            } else {
                Keys::None
            };
            run(&args[1..5], keys, 200).await?;
        }
        Some("run-keys") => {
            let list: Vec<(String, String)> = std::fs::read_to_string(&args[5])?
                .lines()
                .filter_map(|l| l.split_once(' '))
                .map(|(pk, sk)| (pk.to_owned(), sk.to_owned()))
                .collect();
            let keys = Keys::Each(Arc::new(list), Arc::new(AtomicUsize::new(0)));
            run(&args[1..5], keys, 200).await?;
        }
        Some("run-bearer") => run(&args[1..5], Keys::Bearer(args[5].clone()), 200).await?,
        Some("run-unknown") => run(&args[1..5], Keys::Unknown(args[5].parse()?), 401).await?,
        Some("seed-redis") => seed_redis(&args[1], &args[2], args[3].parse()?, &args[4]).await?,
        Some("redis-commands") => {
            let client = redis::Client::open(args[1].as_str())?;
            let mut conn = client.get_multiplexed_async_connection().await?;
            let info: String = redis::cmd("INFO").arg("stats").query_async(&mut conn).await?;
            let n = info
                .lines()
                .find_map(|l| l.strip_prefix("total_commands_processed:"))
                .ok_or("no total_commands_processed in INFO")?;
            println!("{}", n.trim());
        }
        _ => return Err("usage: loadgen free-port | wait URL | mint ADMIN_URL TOKEN | run URL CONNS SECS BODY [PK SECRET]".into()),
    }
    Ok(())
}
