//! Test harness: a recording echo upstream, the real `keygate` binary on free ports, and
//! clients that sign like real ones.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::Request;
use keygate::cli::sign::{self, SignRequest};
use keygate::keys::AuthKind;
use serde_json::{json, Value};

pub mod curl;
pub mod redis;
pub mod unprivileged;

pub const ADMIN_TOKEN: &str = "kgadm_test_token_0123456789abcdef";

/// One request as the upstream received it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    /// The request line's version as the upstream read it.
    pub version: http::Version,
    pub target: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    /// When the upstream had read it.
    pub at: Instant,
}

/// A real HTTP upstream that records every request and echoes a small JSON answer.
/// `/…/slow` waits 3 s before answering (timeouts and draining); `/…/fail` answers 503.
pub struct Echo {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Echo {
    pub async fn start() -> Self {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let record = Arc::clone(&seen);
        let app = axum::Router::new().fallback(move |req: Request| {
            let record = Arc::clone(&record);
            async move {
                let (parts, body) = req.into_parts();
                let body = axum::body::to_bytes(body, 64 * 1024 * 1024)
                    .await
                    .unwrap_or_default();
                let target = parts.uri.to_string();
                let slow = parts.uri.path().ends_with("/slow");
                let status = if parts.uri.path().ends_with("/fail") {
                    http::StatusCode::SERVICE_UNAVAILABLE
                } else {
                    http::StatusCode::OK
                };
                record.lock().unwrap().push(Seen {
                    method: parts.method.to_string(),
                    version: parts.version,
                    target: target.clone(),
                    headers: parts.headers,
                    body: body.clone(),
                    at: Instant::now(),
                });
                if slow {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
                (
                    status,
                    axum::Json(json!({"echo": true, "target": target, "body_len": body.len()})),
                )
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, seen }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }
}

/// A port that was free a moment ago (pingora cannot report the port it bound for `:0`).
pub fn free_port() -> u16 {
    // Never the same port twice in one test process: gateways started at once by parallel
    // tests would otherwise be handed a port another one's listener takes first (the kernel
    // hands a released port out again), and its readiness probe would reach the other one.
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Runs `cmd`; its exit code (-1 for a signal) and its stdout and stderr as one text.
pub fn run_output(cmd: &mut Command) -> (i32, String) {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// `keygate check-config --offline FILE` must pass (`what` names the file in the failure).
pub fn assert_check_config_offline(path: &Path, what: &str) {
    let (code, text) = run_output(
        Command::new(env!("CARGO_BIN_EXE_keygate"))
            .args(["check-config", "--offline"])
            .arg(path),
    );
    assert_eq!(code, 0, "{what}: {text}");
}

/// A Python venv under target/`name`, made once per test process and kept between runs: it is
/// (re)made with `pip install PIP_ARGS…` unless `python -c "import IMPORTS"` already works. A
/// missing python3-venv or a failing pip is a loud failure with the install command.
pub fn python_venv(name: &str, imports: &str, pip_args: &[&str]) -> PathBuf {
    static MADE: Mutex<()> = Mutex::new(());
    let _once = MADE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let venv = repo_root().join("target").join(name);
    let py = venv.join("bin/python");
    let ready = Command::new(&py)
        .args(["-c", &format!("import {imports}")])
        .status()
        .is_ok_and(|s| s.success());
    if !ready {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status();
        assert!(
            made.is_ok_and(|s| s.success()),
            "python3 with venv is needed: apt-get install -y python3-venv (scripts/dev test \
             installs it)"
        );
        let (code, out) = run_output(
            Command::new(venv.join("bin/pip"))
                .args(["install", "-q"])
                .args(pip_args),
        );
        assert_eq!(code, 0, "pip install {pip_args:?} failed:\n{out}");
    }
    py
}

/// The repository's root (where Cargo.toml is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every file under `dir` (recursively) whose name ends with one of `suffixes`, sorted.
pub fn files_under(dir: &Path, suffixes: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if suffixes.iter().any(|s| path.to_string_lossy().ends_with(s)) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// A fresh base64 master key.
pub fn master_key() -> String {
    use base64::Engine;
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The standard test routes in front of `echo`; `dead` is a port nobody listens on.
pub fn routes(echo: SocketAddr) -> String {
    let dead = free_port();
    format!(
        r#"
[[upstreams]]
name = "echo"
endpoints = ["{echo}"]
connect_timeout = "1s"
read_timeout = "1s"

[[upstreams]]
name = "echo-verifies"
endpoints = ["{echo}"]
forward_credentials = true

[[upstreams]]
name = "dead"
endpoints = ["127.0.0.1:{dead}"]
connect_timeout = "1s"

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
name = "v1-only"
path = "/v1/signed-only"
auth = ["hmac-v1"]
upstream = "echo"

[[routes]]
name = "verifying-upstream"
path = "/v1/verifies/*"
upstream = "echo-verifies"

[[routes]]
name = "dead"
path = "/v1/dead"
upstream = "dead"

[[routes]]
name = "public"
path = "/public/*"
upstream = "echo-verifies"
public = true

[[routes]]
name = "anything"
path = "/v1/*"
upstream = "echo"
"#
    )
}

/// [`routes`] with `extra` (TOML `[[routes]]`) tried before the default routes.
pub fn routes_with(echo: SocketAddr, extra: &str) -> String {
    let base = routes(echo);
    let (upstreams, defaults) = base.split_at(base.find("[[routes]]").unwrap_or(base.len()));
    format!("{upstreams}\n{extra}\n{defaults}")
}

/// How to start a gateway.
pub struct Options {
    pub routes: String,
    /// Extra TOML placed in `[server]`.
    pub server_extra: String,
    pub shutdown_grace: &'static str,
    /// Reuse a data dir (restart tests).
    pub dir: Option<PathBuf>,
    pub master_key: Option<String>,
    /// `admin.token_sha256` entries.
    pub admin_token_sha256: Vec<String>,
    /// Replaces the `[store]` table (default: embedded in the data dir).
    pub store_toml: Option<String>,
    /// Replaces the `[cache]` table.
    pub cache_toml: Option<String>,
    /// Extra TOML placed in `[admin]`.
    pub admin_extra: String,
    /// Pass the test admin token in `KEYGATE_ADMIN_TOKEN` (the default).
    pub admin_token_env: bool,
    /// `RUST_LOG` for the gateway (default `warn`: no access log).
    pub rust_log: &'static str,
    /// The admin listener speaks HTTPS with a certificate from this CA: readiness is probed
    /// with curl trusting it.
    pub admin_tls_ca: Option<PathBuf>,
    /// Extra environment for the gateway process.
    pub env: Vec<(&'static str, String)>,
    /// A command that runs the gateway (it must exec it, keeping the pid), e.g. `prlimit`.
    pub launcher: Vec<String>,
}

impl Options {
    pub fn new(echo: &Echo) -> Self {
        Self {
            routes: routes(echo.addr),
            server_extra: String::new(),
            shutdown_grace: "1s",
            dir: None,
            master_key: None,
            admin_token_sha256: Vec::new(),
            store_toml: None,
            cache_toml: None,
            admin_extra: String::new(),
            admin_token_env: true,
            rust_log: "warn",
            admin_tls_ca: None,
            env: Vec::new(),
            launcher: Vec::new(),
        }
    }
}

/// The real `keygate` binary, running.
pub struct Gateway {
    child: Option<Child>,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub dir: PathBuf,
    /// Keeps the temp dir alive for the gateway's lifetime unless a dir was given.
    _tmp: Option<tempfile::TempDir>,
    pub master_key: String,
    pub http: reqwest::Client,
}

/// A key as minted through the admin API.
#[derive(Clone, Debug)]
pub struct Key {
    pub id: String,
    pub public_key: String,
    pub secret: String,
    pub record: Value,
}

impl Gateway {
    pub async fn start(opts: Options) -> Self {
        let (tmp, dir) = match &opts.dir {
            Some(d) => (None, d.clone()),
            None => {
                let t = tempfile::tempdir().unwrap();
                let d = t.path().to_path_buf();
                (Some(t), d)
            }
        };
        let master_key = opts.master_key.clone().unwrap_or_else(master_key);
        // A port can be taken between probing and binding: try a few times.
        for attempt in 0..5 {
            let (proxy, admin, metrics) = (free_port(), free_port(), free_port());
            let config = format!(
                r#"
[server]
listen = "127.0.0.1:{proxy}"
threads = 1
max_body_bytes = 1048576
shutdown_grace = "{grace}"
{server_extra}

[admin]
listen = "127.0.0.1:{admin}"
token_sha256 = {hashes:?}
{admin_extra}

[metrics]
listen = "127.0.0.1:{metrics}"

{store}

{cache}
{routes}
"#,
                grace = opts.shutdown_grace,
                server_extra = opts.server_extra,
                store = opts.store_toml.clone().unwrap_or_else(|| format!(
                    "[store]\nkind = \"embedded\"\npath = \"{}\"",
                    dir.join("keygate.db").display()
                )),
                routes = opts.routes,
                hashes = opts.admin_token_sha256,
                admin_extra = opts.admin_extra,
                cache = opts
                    .cache_toml
                    .clone()
                    .unwrap_or_else(|| "[cache]\nttl = \"30s\"\nnegative_ttl = \"5s\"".to_owned()),
            );
            let config_path = dir.join("keygate.toml");
            std::fs::write(&config_path, config).unwrap();
            let log = std::fs::File::create(dir.join(format!("gateway-{attempt}.log"))).unwrap();
            let mut cmd = match opts.launcher.split_first() {
                Some((program, args)) => {
                    let mut c = Command::new(program);
                    c.args(args).arg(env!("CARGO_BIN_EXE_keygate"));
                    c
                }
                None => Command::new(env!("CARGO_BIN_EXE_keygate")),
            };
            if opts.admin_token_env {
                cmd.env("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN);
            } else {
                cmd.env_remove("KEYGATE_ADMIN_TOKEN");
            }
            let child = cmd
                .args(["serve", "--config"])
                .arg(&config_path)
                .env("KEYGATE_MASTER_KEY", &master_key)
                .env("RUST_LOG", opts.rust_log)
                .envs(opts.env.iter().map(|(k, v)| (k, v)))
                // Logs go to stdout (tracing), start failures to stderr: one file for both.
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            let mut gw = Gateway {
                child: Some(child),
                proxy: SocketAddr::from(([127, 0, 0, 1], proxy)),
                admin: SocketAddr::from(([127, 0, 0, 1], admin)),
                metrics: SocketAddr::from(([127, 0, 0, 1], metrics)),
                dir: dir.clone(),
                _tmp: None,
                master_key: master_key.clone(),
                http: reqwest::Client::builder()
                    .pool_max_idle_per_host(0)
                    .build()
                    .unwrap(),
            };
            if gw
                .wait_ready(Duration::from_secs(30), opts.admin_tls_ca.as_deref())
                .await
            {
                gw._tmp = tmp;
                return gw;
            }
            let log = std::fs::read_to_string(dir.join(format!("gateway-{attempt}.log")))
                .unwrap_or_default();
            gw.kill();
            if !log.contains("cannot listen") {
                panic!("gateway did not become ready:\n{log}");
            }
        }
        panic!("gateway could not find free ports");
    }

    async fn wait_ready(&mut self, within: Duration, tls_ca: Option<&Path>) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if child.try_wait().ok().flatten().is_some() {
                    return false;
                }
            }
            if let Some(ca) = tls_ca {
                let probe = Command::new("curl")
                    .args(["-sf", "-o", "/dev/null", "--cacert"])
                    .arg(ca)
                    .arg(format!("https://localhost:{}/readyz", self.admin.port()))
                    .args([
                        "--resolve",
                        &format!("localhost:{}:127.0.0.1", self.admin.port()),
                    ])
                    .status();
                if probe.is_ok_and(|s| s.success()) {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            let url = format!("http://{}/readyz", self.admin);
            if let Ok(r) = self.http.get(&url).send().await {
                if r.status() == 200 {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    pub fn url(&self, target: &str) -> String {
        format!("http://{}{target}", self.proxy)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    pub fn log(&self) -> String {
        let mut out = String::new();
        for i in 0..5 {
            out.push_str(
                &std::fs::read_to_string(self.dir.join(format!("gateway-{i}.log")))
                    .unwrap_or_default(),
            );
        }
        out
    }

    /// `POST /v1/keys` with the admin token and exactly this body, whatever the answer.
    pub async fn create_key(&self, body: &Value) -> reqwest::Response {
        self.http
            .post(self.admin_url("/v1/keys"))
            .bearer_auth(ADMIN_TOKEN)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// Mints a key; `body` is merged over a default owner and name.
    pub async fn mint(&self, body: Value) -> Key {
        let mut full = json!({"owner": "acme", "name": "test key", "scopes": ["payments.*"]});
        if let (Some(f), Some(b)) = (full.as_object_mut(), body.as_object()) {
            for (k, v) in b {
                f.insert(k.clone(), v.clone());
            }
        }
        let resp = self.create_key(&full).await;
        let status = resp.status();
        let record: Value = resp.json().await.unwrap();
        assert_eq!(status, 201, "mint failed: {record}");
        Key {
            id: record["id"].as_str().unwrap().to_owned(),
            public_key: record["public_key"].as_str().unwrap().to_owned(),
            secret: record["secret"].as_str().unwrap().to_owned(),
            record,
        }
    }

    /// A key as the admin API shows it now.
    pub async fn key_record(&self, id: &str) -> Value {
        self.admin_get(&format!("/v1/keys/{id}"), ADMIN_TOKEN)
            .await
            .json()
            .await
            .unwrap()
    }

    /// The key's record once its `total_requests` reaches `n` (usage is flushed about once a
    /// second), or the last one read after `within`.
    pub async fn key_record_with_usage(&self, id: &str, n: u64, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let r = self.key_record(id).await;
            if r["total_requests"] == n || Instant::now() > deadline {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `GET` on the admin listener with `token` as the bearer.
    pub async fn admin_get(&self, path: &str, token: &str) -> reqwest::Response {
        self.http
            .get(self.admin_url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    /// Revokes through the admin API; the record it answered.
    pub async fn revoke(&self, key: &Key) -> Value {
        let r = self
            .http
            .post(self.admin_url(&format!("/v1/keys/{}/revoke", key.id)))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }

    /// The metrics listener's text.
    pub async fn metrics_text(&self) -> String {
        self.http
            .get(format!("http://{}/metrics", self.metrics))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of the first metrics line starting with `prefix` (0 when absent).
    pub async fn metric(&self, prefix: &str) -> f64 {
        self.metrics_text()
            .await
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    /// A self-service (or any) call signed with `hmac-v1` now; `body` as JSON unless null.
    pub async fn call(
        &self,
        key: &Key,
        method: &str,
        target: &str,
        body: Value,
    ) -> reqwest::Response {
        self.call_with(key, method, target, body, &[]).await
    }

    /// [`Self::call`] with `extra` headers (not signed: keygate signs no header).
    pub async fn call_with(
        &self,
        key: &Key,
        method: &str,
        target: &str,
        body: Value,
        extra: &[(&str, &str)],
    ) -> reqwest::Response {
        let bytes = if body.is_null() {
            Vec::new()
        } else {
            serde_json::to_vec(&body).unwrap()
        };
        let mut headers = v1_headers(
            key,
            method,
            target,
            &bytes,
            now(),
            &uuid::Uuid::new_v4().to_string(),
        );
        if !bytes.is_empty() {
            headers.push(("content-type".into(), "application/json".into()));
        }
        headers.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        self.send(method, target, &headers, &bytes).await
    }

    /// Sends a request signed with `hmac-v1` now, with a fresh nonce.
    /// A signed POST of `{}` to `target`, fresh nonce.
    pub async fn post(&self, key: &Key, target: &str) -> reqwest::Response {
        self.send_v1(key, "POST", target, b"{}").await
    }

    pub async fn send_v1(
        &self,
        key: &Key,
        method: &str,
        target: &str,
        body: &[u8],
    ) -> reqwest::Response {
        let headers = v1_headers(
            key,
            method,
            target,
            body,
            now(),
            &uuid::Uuid::new_v4().to_string(),
        );
        self.send(method, target, &headers, body).await
    }

    /// Sends a request with exactly these extra headers.
    pub async fn send(
        &self,
        method: &str,
        target: &str,
        headers: &[(String, String)],
        body: &[u8],
    ) -> reqwest::Response {
        let mut req = self
            .http
            .request(method.parse().unwrap(), self.url(target))
            .body(body.to_vec());
        for (k, v) in headers {
            req = req.header(k.as_str(), v.as_str());
        }
        req.send().await.unwrap()
    }

    /// Writes one raw request to the proxy listener and returns everything read until the
    /// connection closes or 3 s pass.
    pub async fn raw(&self, request: &[u8]) -> String {
        raw_exchange(
            self.proxy,
            &[request],
            Duration::ZERO,
            Duration::from_secs(3),
        )
        .await
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends `signal` (e.g. "HUP") to the gateway.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Sends `signal` (e.g. "TERM") and waits up to `within` for the process to exit.
    pub fn signal_and_wait(
        &mut self,
        signal: &str,
        within: Duration,
    ) -> Option<std::process::ExitStatus> {
        self.signal(signal);
        let deadline = Instant::now() + within;
        let child = self.child.as_mut()?;
        while Instant::now() < deadline {
            if let Some(s) = child.try_wait().unwrap() {
                self.child = None;
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Keeps the data dir for a restart by taking it out of this gateway.
    pub fn take_dir(&mut self) -> Option<tempfile::TempDir> {
        self._tmp.take()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Descriptors open in process `pid`.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// Resident memory of process `pid`, MiB.
pub fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

pub fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn to_owned_headers(h: Vec<(&'static str, String)>) -> Vec<(String, String)> {
    h.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

pub fn v1_headers(
    key: &Key,
    method: &str,
    target: &str,
    body: &[u8],
    ts: i64,
    nonce: &str,
) -> Vec<(String, String)> {
    to_owned_headers(sign::headers(&SignRequest {
        scheme: AuthKind::HmacV1,
        public_key: key.public_key.clone(),
        secret: key.secret.clone(),
        method: method.into(),
        target: target.into(),
        body: body.to_vec(),
        timestamp: ts,
        nonce: nonce.into(),
    }))
}

/// `hmac-v1` headers at `ts` with a fresh nonce, as raw `name: value\r\n` lines, for requests
/// written byte by byte.
pub fn v1_lines(key: &Key, method: &str, target: &str, body: &[u8], ts: i64) -> String {
    v1_headers(
        key,
        method,
        target,
        body,
        ts,
        &uuid::Uuid::new_v4().to_string(),
    )
    .iter()
    .map(|(k, v)| format!("{k}: {v}\r\n"))
    .collect()
}

pub fn body_headers(key: &Key, body: &[u8]) -> Vec<(String, String)> {
    to_owned_headers(sign::headers(&SignRequest {
        scheme: AuthKind::HmacBody,
        public_key: key.public_key.clone(),
        secret: key.secret.clone(),
        method: String::new(),
        target: String::new(),
        body: body.to_vec(),
        timestamp: 0,
        nonce: String::new(),
    }))
}

/// Asserts a problem+json answer with `status` and `code`; returns the body.
pub async fn assert_problem(resp: reqwest::Response, status: u16, code: &str) -> Value {
    let got = resp.status().as_u16();
    let ctype = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let rid = resp
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().unwrap().to_owned());
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    assert_eq!(
        (got, body["code"].as_str()),
        (status, Some(code)),
        "body: {body}"
    );
    assert_eq!(ctype, "application/problem+json");
    assert_eq!(body["status"], status);
    assert_eq!(body["type"], format!("urn:keygate:error:{code}"));
    assert!(body["title"].as_str().is_some_and(|t| !t.is_empty()));
    let rid = rid.expect("every response carries x-request-id");
    assert_eq!(body["request_id"], rid.as_str());
    body
}

/// The status of a raw HTTP/1 response (`HTTP/1.1 400 …`); 0 when there is none.
pub fn status_of(raw_response: &str) -> u16 {
    raw_response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Writes raw bytes to `addr` and returns everything read until close or `wait`.
pub async fn raw_exchange(
    addr: SocketAddr,
    parts: &[&[u8]],
    pause: Duration,
    wait: Duration,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(pause).await;
        }
        if s.write_all(p).await.is_err() {
            break;
        }
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

pub fn path_exists(p: &Path) -> bool {
    p.exists()
}

/// GET requests in a loop (5 ms apart) until [`Traffic::finish`]: counts those sent and those
/// not answered 200. `fresh_connections`: a new connection for every request.
pub struct Traffic {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: tokio::task::JoinHandle<(usize, usize)>,
}

impl Traffic {
    pub fn gets(url: String, fresh_connections: bool) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let handle = tokio::spawn(async move {
            let mut builder = reqwest::Client::builder();
            if fresh_connections {
                builder = builder.pool_max_idle_per_host(0);
            }
            let http = builder.build().unwrap();
            let (mut sent, mut failed) = (0, 0);
            while !stopped.load(Ordering::Relaxed) {
                sent += 1;
                match http.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {}
                    other => {
                        eprintln!("failed: {other:?}");
                        failed += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (sent, failed)
        });
        Self { stop, handle }
    }

    /// Stops the loop: (sent, failed).
    pub async fn finish(self) -> (usize, usize) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.await.unwrap()
    }
}

/// An HTTP/2 connection with prior knowledge (h2c) to `addr`: its request sender, the
/// connection driven in the background.
pub async fn h2c_connect<B>(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<B>
where
    B: hyper::body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    sender
}
