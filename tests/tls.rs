//! TLS on the proxy listener through the real binary: signed requests over TLS 1.2 and 1.3,
//! older versions refused, and the certificate reloaded on SIGHUP while a client keeps going.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use support::redis::TlsFiles;
use support::{now, Echo, Gateway, Key, Options};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

fn tls_options(echo: &Echo, files: &TlsFiles) -> Options {
    let mut opts = Options::new(echo);
    opts.server_extra = format!(
        "\n[server.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        files.cert.display().to_string(),
        files.key.display().to_string()
    );
    opts
}

fn client(cas: &[&Path], versions: &[&'static rustls::SupportedProtocolVersion]) -> ClientConfig {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots
            .add(CertificateDer::from_pem_file(ca).unwrap())
            .unwrap();
    }
    let mut cfg =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    // Every connection a full handshake: a resumed session shows no certificate.
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg
}

/// One request on a fresh TLS connection; the answer's status and the leaf the server showed.
async fn over_tls(
    cfg: &Arc<ClientConfig>,
    addr: SocketAddr,
    request: &str,
) -> Result<(u16, Vec<u8>), String> {
    let (text, leaf) = exchange_tls(cfg, addr, request).await?;
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no response: {text:?}"))?;
    Ok((status, leaf))
}

/// One request on a fresh TLS connection; the whole answer and the leaf the server showed.
async fn exchange_tls(
    cfg: &Arc<ClientConfig>,
    addr: SocketAddr,
    request: &str,
) -> Result<(String, Vec<u8>), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(cfg));
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec())
        .unwrap_or_default();
    tls.write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
    if let Ok(Err(e)) = read {
        if out.is_empty() {
            return Err(e.to_string());
        }
    }
    Ok((String::from_utf8_lossy(&out).into_owned(), leaf))
}

/// The leaf certificate a fresh handshake gets now.
async fn leaf_shown(cfg: &Arc<ClientConfig>, addr: SocketAddr) -> Vec<u8> {
    let req = "GET /public/x HTTP/1.1\r\nhost: l\r\nconnection: close\r\n\r\n";
    over_tls(cfg, addr, req).await.unwrap().1
}

fn signed_get(key: &Key, target: &str) -> String {
    format!(
        "GET {target} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n{}\r\n",
        support::v1_lines(key, "GET", target, b"", now())
    )
}

fn leaf_der(path: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(path)
        .unwrap()
        .as_ref()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_requests_pass_over_tls_1_2_and_1_3() {
    let dir = tempfile::tempdir().unwrap();
    let files = TlsFiles::generate(dir.path());
    let echo = Echo::start().await;
    let gw = Gateway::start(tls_options(&echo, &files)).await;
    let key = gw.mint(json!({})).await;
    for versions in [
        &[&rustls::version::TLS13][..],
        &[&rustls::version::TLS12][..],
    ] {
        let cfg = Arc::new(client(&[&files.ca], versions));
        let (status, leaf) = over_tls(&cfg, gw.proxy, &signed_get(&key, "/v1/payments/p1"))
            .await
            .unwrap();
        assert_eq!(status, 200);
        assert_eq!(leaf, leaf_der(&files.cert));
    }
    assert_eq!(echo.count(), 2);
    let seen = echo.seen().pop().unwrap();
    assert_eq!(seen.headers["x-keygate-key-id"], key.id.as_str());
    // Plain HTTP on the TLS port is not served.
    let out = support::raw_exchange(
        gw.proxy,
        &[b"GET /public/x HTTP/1.1\r\nhost: x\r\n\r\n"],
        Duration::ZERO,
        Duration::from_secs(2),
    )
    .await;
    assert!(!out.contains("HTTP/1.1 200"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_1_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let files = TlsFiles::generate(dir.path());
    let echo = Echo::start().await;
    let gw = Gateway::start(tls_options(&echo, &files)).await;
    // rustls cannot speak TLS 1.1; OpenSSL's client can.
    let Ok(out) = std::process::Command::new("openssl")
        // SECLEVEL=0: Debian's OpenSSL would otherwise refuse to offer TLS 1.1 itself.
        .args([
            "s_client",
            "-tls1_1",
            "-cipher",
            "DEFAULT@SECLEVEL=0",
            "-connect",
            &gw.proxy.to_string(),
        ])
        .stdin(std::process::Stdio::null())
        .output()
    else {
        eprintln!("SKIPPED: no openssl binary to offer TLS 1.1 (apt-get install -y openssl)");
        return;
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "TLS 1.1 was accepted: {text}");
    assert!(
        text.contains("Cipher is (NONE)"),
        "no cipher may be agreed: {text}"
    );
    assert!(
        text.contains("alert"),
        "the server answers with an alert: {text}"
    );
}

/// A client keeps opening TLS connections while the certificate files are replaced and the
/// gateway gets SIGHUP: no request fails, and handshakes after the reload show the new leaf.
/// A broken file on a later SIGHUP leaves the certificate in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_certificate_reloads_on_sighup_without_a_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let first = TlsFiles::generate(dir.path());
    let next_dir = tempfile::tempdir().unwrap();
    let renewed_until = time::macros::datetime!(2031-06-01 0:00 UTC);
    let second = TlsFiles::generate_until(next_dir.path(), Some(renewed_until));
    let echo = Echo::start().await;
    let mut gw = Gateway::start(tls_options(&echo, &first)).await;
    let expiry = "keygate_tls_certificate_expiry_timestamp_seconds{listener=\"proxy\"}";
    let first_until = time::macros::datetime!(4096-01-01 0:00 UTC);
    assert_eq!(gw.metric(expiry).await, first_until.unix_timestamp() as f64);
    let cfg = Arc::new(client(
        &[&first.ca, &second.ca],
        &[&rustls::version::TLS13, &rustls::version::TLS12],
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let traffic = {
        let (cfg, stop, done, failed) = (cfg.clone(), stop.clone(), done.clone(), failed.clone());
        let addr = gw.proxy;
        tokio::spawn(async move {
            let req = "GET /public/tick HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n";
            while !stop.load(Ordering::Relaxed) {
                match over_tls(&cfg, addr, req).await {
                    Ok((200, _)) => done.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("failed: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::copy(&second.cert, &first.cert).unwrap();
    std::fs::copy(&second.key, &first.key).unwrap();
    gw.signal("HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let leaf = leaf_shown(&cfg, gw.proxy).await;
    assert_eq!(
        leaf,
        leaf_der(&second.cert),
        "a handshake after SIGHUP gets the new certificate"
    );
    assert_eq!(
        gw.metric(expiry).await,
        renewed_until.unix_timestamp() as f64,
        "the expiry gauge follows the reload"
    );

    // A broken file: the reload is refused and the new certificate stays in use.
    std::fs::write(&first.cert, "not a certificate").unwrap();
    gw.signal("HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    let leaf = leaf_shown(&cfg, gw.proxy).await;
    assert_eq!(leaf, leaf_der(&second.cert));
    assert_eq!(
        gw.metric(expiry).await,
        renewed_until.unix_timestamp() as f64
    );
    assert!(gw.log().contains("config reload refused"), "{}", gw.log());
    let (ok, bad) = (done.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("requests over TLS during two reloads: {ok} answered, {bad} failed");
    assert!(ok > 10, "only {ok} requests ran");
    assert_eq!(bad, 0);
    assert!(gw
        .signal_and_wait("TERM", Duration::from_secs(10))
        .is_some());
}

#[test]
fn check_config_names_an_unreadable_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.toml");
    std::fs::write(
        &path,
        "[server.tls]\ncert_file = \"/nonexistent/cert.pem\"\nkey_file = \"/nonexistent/key.pem\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("server.tls") && stderr.contains("/nonexistent/cert.pem"),
        "{stderr}"
    );
}

/// An HTTPS upstream with a certificate from its own CA: answers every request with 200 and
/// records the server name each handshake asked for, and each request head.
struct HttpsUpstream {
    addr: SocketAddr,
    seen: Arc<std::sync::Mutex<Vec<(String, String)>>>,
}

impl HttpsUpstream {
    async fn start(files: &TlsFiles) -> Self {
        Self::start_with(files, None).await
    }

    /// With `client_ca`, the upstream requires a client certificate that CA signed.
    async fn start_with(files: &TlsFiles, client_ca: Option<&Path>) -> Self {
        let certs = vec![CertificateDer::from_pem_file(&files.cert).unwrap()];
        let key =
            tokio_rustls::rustls::pki_types::PrivateKeyDer::from_pem_file(&files.key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                roots
                    .add(CertificateDer::from_pem_file(ca).unwrap())
                    .unwrap();
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let cfg = builder.with_single_cert(certs, key).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<std::sync::Mutex<Vec<(String, String)>>> = Arc::default();
        let record = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, record) = (acceptor.clone(), Arc::clone(&record));
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let sni = tls.get_ref().1.server_name().unwrap_or("").to_owned();
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    // Read the declared body too, so a large POST is answered after it.
                    let text = String::from_utf8_lossy(&head).into_owned();
                    let end = text.find("\r\n\r\n").map_or(0, |i| i + 4);
                    let declared = text
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .and_then(|n| n.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    let mut have = head.len() - end;
                    while have < declared {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => have += n,
                        }
                    }
                    record
                        .lock()
                        .unwrap()
                        .push((sni, format!("{text}body_len={have}")));
                    let _ = tls
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                        )
                        .await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        Self { addr, seen }
    }
}

fn https_routes(up: SocketAddr, tls_lines: &str) -> String {
    format!(
        r#"
[[upstreams]]
name = "bank"
endpoints = ["{up}"]
tls = true
{tls_lines}

[[routes]]
name = "bank"
path = "/v1/*"
upstream = "bank"
"#
    )
}

/// A gateway whose `/v1/*` routes go to the HTTPS `bank` with these upstream TLS lines, and
/// the answer to one signed `GET /v1/balance` through it.
async fn balance_via(
    echo: &Echo,
    bank: SocketAddr,
    tls_lines: &str,
) -> (Gateway, reqwest::Response) {
    let mut opts = Options::new(echo);
    opts.routes = https_routes(bank, tls_lines);
    let gw = Gateway::start(opts).await;
    let key = gw.mint(json!({})).await;
    let r = gw.send_v1(&key, "GET", "/v1/balance", b"").await;
    (gw, r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_is_verified_against_its_ca_with_sni() {
    let dir = tempfile::tempdir().unwrap();
    let files = TlsFiles::generate(dir.path());
    let bank = HttpsUpstream::start(&files).await;
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    let ca = files.ca.display().to_string();
    opts.routes = https_routes(bank.addr, &format!("sni = \"localhost\"\nca_file = {ca:?}"));
    let gw = Gateway::start(opts).await;
    let key = gw.mint(json!({})).await;
    let r = gw.send_v1(&key, "GET", "/v1/balance", b"").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok");
    let seen = bank.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].0, "localhost",
        "the upstream saw the configured SNI"
    );
    assert!(
        seen[0].1.contains(&format!("x-keygate-key-id: {}", key.id)),
        "{}",
        seen[0].1
    );
    // A body beyond pingora's 64 KiB retry buffer goes through keygate's own connector.
    let body = vec![b'x'; 100 * 1024];
    let r = gw.send_v1(&key, "POST", "/v1/transfers", &body).await;
    assert_eq!(r.status(), 200);
    let seen = bank.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert!(seen[1].1.ends_with("body_len=102400"), "{}", seen[1].1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_with_an_untrusted_certificate_is_502_unless_verify_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let files = TlsFiles::generate(dir.path());
    let other_dir = tempfile::tempdir().unwrap();
    let other = TlsFiles::generate(other_dir.path());
    let bank = HttpsUpstream::start(&files).await;
    let echo = Echo::start().await;
    // Trusting another CA: the handshake fails, and the request never reaches the bank.
    let wrong_ca = other.ca.display().to_string();
    let tls_lines = format!("sni = \"localhost\"\nca_file = {wrong_ca:?}");
    let (gw, r) = balance_via(&echo, bank.addr, &tls_lines).await;
    support::assert_problem(r, 502, "upstream_unavailable").await;
    assert!(bank.seen.lock().unwrap().is_empty());
    drop(gw);

    // verify = false: it goes through, and the start said so loudly.
    let (gw, r) = balance_via(&echo, bank.addr, "verify = false").await;
    assert_eq!(r.status(), 200, "{}", gw.log());
    assert!(gw.log().contains("verification is OFF"), "{}", gw.log());
}

#[test]
fn tls_to_an_ip_literal_needs_sni() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.toml");
    std::fs::write(&path, https_routes("127.0.0.1:9".parse().unwrap(), "")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("upstreams[0].sni"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_requires_client_certificates_gets_keygates() {
    let dir = tempfile::tempdir().unwrap();
    let server = TlsFiles::generate(dir.path());
    let client_dir = tempfile::tempdir().unwrap();
    let client_id = TlsFiles::generate(client_dir.path());
    let bank = HttpsUpstream::start_with(&server, Some(&client_id.ca)).await;
    let echo = Echo::start().await;
    let ca = server.ca.display().to_string();
    let base = format!("sni = \"localhost\"\nca_file = {ca:?}");

    // Without a client certificate the bank refuses the handshake.
    let (gw, r) = balance_via(&echo, bank.addr, &base).await;
    support::assert_problem(r, 502, "upstream_unavailable").await;
    assert!(bank.seen.lock().unwrap().is_empty());
    drop(gw);

    let tls_lines = format!(
        "{base}\nclient_cert_file = {:?}\nclient_key_file = {:?}",
        client_id.cert.display().to_string(),
        client_id.key.display().to_string()
    );
    let (_gw, r) = balance_via(&echo, bank.addr, &tls_lines).await;
    assert_eq!(r.status(), 200);
    assert_eq!(bank.seen.lock().unwrap().len(), 1);
}

/// A CA and client certificates it issued, with their keys, for mTLS tests.
struct ClientPki {
    ca_file: std::path::PathBuf,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl ClientPki {
    fn new(dir: &Path, name: &str) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let ca = params.self_signed(&ca_key).unwrap();
        let ca_file = dir.join(format!("{name}.pem"));
        std::fs::write(&ca_file, ca.pem()).unwrap();
        Self {
            ca_file,
            ca,
            ca_key,
        }
    }

    /// A client certificate: (DER chain, key DER, SHA-256 of the leaf).
    fn client(
        &self,
        cn: &str,
    ) -> (
        Vec<CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
        [u8; 32],
    ) {
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        let der = cert.der().clone();
        let digest: [u8; 32] = ring_sha256(der.as_ref());
        let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        (vec![der], key_der, digest)
    }
}

fn ring_sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

/// A client trusting `server_ca` and presenting `cert` (if any).
fn mtls_client(
    server_ca: &Path,
    cert: Option<(
        Vec<CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    )>,
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(server_ca).unwrap())
        .unwrap();
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
    Arc::new(match cert {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    })
}

/// The `code` of a problem+json answer, or "ok" for a 200.
fn outcome(text: &str) -> String {
    if text.starts_with("HTTP/1.1 200") {
        return "ok".into();
    }
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["code"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("unparsed: {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_bound_to_a_client_certificate_needs_that_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let files = TlsFiles::generate(dir.path());
    let clients = ClientPki::new(dir.path(), "partner-ca");
    let strangers = ClientPki::new(dir.path(), "other-ca");
    let echo = Echo::start().await;
    let mut opts = tls_options(&echo, &files);
    opts.server_extra.push_str(&format!(
        "client_ca_file = {:?}\n",
        clients.ca_file.display().to_string()
    ));
    let gw = Gateway::start(opts).await;

    let (chain_a, key_a, sha_a) = clients.client("acme-prod");
    let (chain_b, key_b, _) = clients.client("acme-other");
    let (chain_c, key_c, _) = strangers.client("mallory");
    // As `openssl x509 -fingerprint -sha256` prints it: upper case with colons.
    let printed: Vec<String> = sha_a.iter().map(|b| format!("{b:02X}")).collect();
    let bound = gw
        .mint(json!({"tls_client_cert_sha256": printed.join(":")}))
        .await;
    assert_eq!(bound.record["tls_client_cert_sha256"], hex::encode(sha_a));
    let free = gw.mint(json!({})).await;

    let with_a = mtls_client(&files.ca, Some((chain_a, key_a)));
    let with_b = mtls_client(&files.ca, Some((chain_b, key_b)));
    let without = mtls_client(&files.ca, None);
    let send = |cfg: &Arc<ClientConfig>, key: &Key| {
        let cfg = Arc::clone(cfg);
        let req = signed_get(key, "/v1/payments/p1");
        let addr = gw.proxy;
        async move { outcome(&exchange_tls(&cfg, addr, &req).await.unwrap().0) }
    };
    assert_eq!(send(&with_a, &bound).await, "ok");
    // The upstream's assertion names the certificate (RFC 8705 cnf.x5t#S256).
    let claims = |seen: &support::Seen| -> serde_json::Value {
        use base64::Engine;
        let token = seen.headers["x-keygate-assertion"].to_str().unwrap();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        serde_json::from_slice(&b64.decode(token.split('.').nth(1).unwrap()).unwrap()).unwrap()
    };
    let seen = echo.seen().pop().unwrap();
    assert_eq!(
        claims(&seen)["cnf"]["x5t#S256"],
        base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, sha_a)
    );
    assert_eq!(send(&with_b, &bound).await, "client_cert_required");
    assert_eq!(send(&without, &bound).await, "client_cert_required");
    // Keys without a binding work with or without a certificate.
    assert_eq!(send(&without, &free).await, "ok");
    assert!(
        claims(&echo.seen().pop().unwrap()).get("cnf").is_none(),
        "no certificate, no cnf"
    );
    assert_eq!(send(&with_b, &free).await, "ok");
    assert_eq!(echo.count(), 3);
    // A certificate from a CA the gateway does not trust fails the handshake.
    let with_c = mtls_client(&files.ca, Some((chain_c, key_c)));
    let req = signed_get(&free, "/v1/payments/p1");
    let refused = exchange_tls(&with_c, gw.proxy, &req).await;
    assert!(
        refused.as_ref().map_or(true, |(text, _)| text.is_empty()),
        "{refused:?}"
    );
    assert_eq!(echo.count(), 3);

    // Unbinding (PATCH null) lets the key in without a certificate.
    let r = gw
        .http
        .patch(gw.admin_url(&format!("/v1/keys/{}", bound.id)))
        .bearer_auth(support::ADMIN_TOKEN)
        .json(&json!({"tls_client_cert_sha256": null}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while send(&without, &bound).await != "ok" {
        assert!(
            std::time::Instant::now() < deadline,
            "the unbinding never took effect"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A malformed fingerprint is a validation error naming the field.
    let r = gw
        .create_key(&json!({"owner": "acme", "name": "x", "tls_client_cert_sha256": "abc"}))
        .await;
    let body = support::assert_problem(r, 422, "validation_failed").await;
    assert!(
        body["errors"]["tls_client_cert_sha256"].is_string(),
        "{body}"
    );
}

/// `curl` over HTTPS trusting `ca`: (status, body); status 0 when no HTTP answer came.
fn curl_https(ca: &Path, port: u16, path: &str, extra: &[&str]) -> (u16, String) {
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-w",
            "\n%{http_code}",
            "--cacert",
        ])
        .arg(ca)
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .args(extra)
        .arg(format!("https://localhost:{port}{path}"))
        .output()
        .expect("curl is needed: apt-get install -y curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.parse().unwrap_or(0), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_and_metrics_listeners_speak_https_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let files = TlsFiles::generate(dir.path());
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    let tls = format!(
        "cert_file = {:?}\nkey_file = {:?}\n",
        files.cert.display().to_string(),
        files.key.display().to_string()
    );
    opts.admin_extra = format!("\n[admin.tls]\n{tls}\n[metrics.tls]\n{tls}");
    opts.admin_tls_ca = Some(files.ca.clone());
    let gw = Gateway::start(opts).await;
    let (ca, admin, metrics) = (files.ca.clone(), gw.admin.port(), gw.metrics.port());
    let token = format!("authorization: Bearer {}", support::ADMIN_TOKEN);
    let (status, body) = tokio::task::spawn_blocking(move || {
        curl_https(
            &ca,
            admin,
            "/v1/keys",
            &[
                "-X",
                "POST",
                "-H",
                &token,
                "-H",
                "content-type: application/json",
                "-d",
                r#"{"owner":"acme","name":"over https"}"#,
            ],
        )
    })
    .await
    .unwrap();
    assert_eq!(status, 201, "{body}");
    let ca = files.ca.clone();
    let (status, text) =
        tokio::task::spawn_blocking(move || curl_https(&ca, metrics, "/metrics", &[]))
            .await
            .unwrap();
    assert_eq!(status, 200);
    assert!(text.contains("keygate_keys_changed_total"), "{text}");
    // The CLI speaks HTTPS to the admin listener, trusting the given CA.
    for args in [&["keys", "list"][..], &["assertion", "keys"][..]] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
            .args(args)
            .args([
                "--json",
                "--admin-url",
                &format!("https://localhost:{admin}"),
            ])
            .arg("--ca-file")
            .arg(&files.ca)
            .env("KEYGATE_ADMIN_TOKEN", support::ADMIN_TOKEN)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(v.get("items").or_else(|| v.get("keys")).is_some(), "{v}");
    }
    // Without the CA, the CLI refuses the server's certificate (exit 69, unreachable).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args([
            "keys",
            "list",
            "--admin-url",
            &format!("https://localhost:{admin}"),
        ])
        .env("KEYGATE_ADMIN_TOKEN", support::ADMIN_TOKEN)
        .env_remove("KEYGATE_ADMIN_CA_FILE")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(69),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Plain HTTP on those ports gets no answer.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{admin}/healthz"))
        .send()
        .await;
    assert!(plain.is_err() || plain.is_ok_and(|r| r.status() != 200));
}

/// 1,100 TCP connections to the TLS listener that never start a handshake, under a 1,024
/// descriptor limit. The handshake counts toward `max_connections` from the moment the
/// connection is accepted (the rest are closed at once) and must finish within
/// `header_timeout`; the admin and metrics listeners answer throughout, and once the silent
/// clients are cut, TLS clients are served again. Before, pingora ran the handshake outside
/// keygate's guard: each silent connection stayed 60 s, none counted, and the process ran out
/// of descriptors ("Too many open files") with every listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn silent_tls_clients_are_counted_and_cut_at_header_timeout() {
    const FLOOD: usize = 1_100;
    let dir = tempfile::tempdir().unwrap();
    let files = TlsFiles::generate(dir.path());
    let echo = Echo::start().await;
    let mut opts = tls_options(&echo, &files);
    opts.server_extra = format!("header_timeout = \"2s\"\n{}", opts.server_extra);
    opts.launcher = vec!["prlimit".into(), "--nofile=1024:1024".into()];
    let gw = Gateway::start(opts).await;
    let key = gw.mint(json!({})).await;
    let cfg = Arc::new(client(&[&files.ca], &[&rustls::version::TLS13]));
    let (status, _) = over_tls(&cfg, gw.proxy, &signed_get(&key, "/v1/payments/1"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let baseline = support::open_fds(gw.pid());

    let started = std::time::Instant::now();
    let mut held = Vec::new();
    for _ in 0..FLOOD {
        if let Ok(s) = tokio::net::TcpStream::connect(gw.proxy).await {
            held.push(s);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let peak = support::open_fds(gw.pid());
    let health = gw.http.get(gw.admin_url("/healthz")).send().await.unwrap();
    assert_eq!(
        health.status(),
        200,
        "the admin listener answers during the flood"
    );
    let over = gw
        .metric("keygate_connections_closed_total{reason=\"max_connections\"}")
        .await;
    assert!(peak < 1024, "{peak} descriptors at the peak");
    assert!(
        over > 0.0,
        "connections over max_connections are closed at once"
    );

    // header_timeout (2 s) cuts the silent handshakes, well before pingora's 60 s.
    let mut cut = 0.0;
    while started.elapsed() < Duration::from_secs(10) {
        cut = gw
            .metric("keygate_connections_closed_total{reason=\"tls_handshake_timeout\"}")
            .await;
        if cut > 0.0 && support::open_fds(gw.pid()) <= baseline + 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let released = started.elapsed();
    let after = support::open_fds(gw.pid());
    eprintln!(
        "TLS flood of {FLOOD} silent connections, 1,024 descriptors: {} connected, {baseline} \
         descriptors before, {peak} at the peak, {after} after {released:?}; {over} closed for \
         max_connections, {cut} cut at header_timeout",
        held.len()
    );
    assert!(cut > 0.0, "silent handshakes are cut at header_timeout");
    assert!(
        released < Duration::from_secs(6),
        "descriptors back after {released:?}"
    );
    assert!(
        after <= baseline + 10,
        "{after} descriptors, {baseline} before"
    );
    let (status, _) = over_tls(&cfg, gw.proxy, &signed_get(&key, "/v1/payments/1"))
        .await
        .unwrap();
    assert_eq!(status, 200, "TLS clients are served again");
    let scrape = gw.metrics_text().await;
    assert!(scrape.contains("keygate_open_connections"));
    drop(held);
    assert!(!gw.log().contains("Too many open files"), "{}", gw.log());
}

/// Handshakes that fail (not TLS at all, or cut short) are each counted and logged at most
/// once a minute: any client can cause them, so a line each would let it flood the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_handshakes_are_counted_and_logged_once_a_minute() {
    let dir = tempfile::tempdir().unwrap();
    let files = TlsFiles::generate(dir.path());
    let echo = Echo::start().await;
    let gw = Gateway::start(tls_options(&echo, &files)).await;
    const BAD: usize = 40;
    let closed = "keygate_connections_closed_total{reason=\"tls_handshake_failed\"}";
    let before = gw.metric(closed).await;
    // Connected and closed without a byte: a TCP health check, neither counted nor logged.
    for _ in 0..10 {
        drop(tokio::net::TcpStream::connect(gw.proxy).await.unwrap());
    }
    for i in 0..BAD {
        let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
        if i % 2 == 0 {
            // Plain HTTP to the TLS port.
            let _ = s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
        } else {
            // A TLS record header, then the connection closes mid-handshake.
            let _ = s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await;
        }
        let _ = s.shutdown().await;
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
    }
    // An IP address as SNI: rustls ignores it (and used to warn about it, once per handshake).
    for _ in 0..5 {
        let out = std::process::Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &gw.proxy.to_string(),
                "-servername",
                "127.0.0.1",
            ])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl is needed: apt-get install -y openssl");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("BEGIN CERTIFICATE")
                || String::from_utf8_lossy(&out.stdout).contains("Server certificate"),
            "the handshake with an IP as SNI completes"
        );
    }
    let mut failed = 0.0;
    for _ in 0..50 {
        failed = gw.metric(closed).await - before;
        if failed >= BAD as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(gw.metric(closed).await - before, BAD as f64);
    assert_eq!(failed, BAD as f64);
    let log = gw.log();
    let lines = log
        .lines()
        .filter(|l| l.contains("handshake") && (l.contains("WARN") || l.contains("ERROR")))
        .count();
    assert_eq!(lines, 1, "{log}");
}
