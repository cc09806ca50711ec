//! Real `redis-server`s for one test, on their own ports and temp dirs; never the system's
//! 6379. One server ([`RedisServer`]), TLS or a password ([`Mode`]), or a 3-master cluster
//! ([`RedisCluster`]).
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How a server is reached.
#[derive(Clone, Debug, Default)]
pub enum Mode {
    #[default]
    Plain,
    /// `requirepass`.
    Password(String),
    /// TLS only (no plaintext port), with a certificate for 127.0.0.1 signed by a test CA.
    Tls(TlsFiles),
}

/// PEM files of a test CA and a server certificate it signed.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// A fresh CA and a certificate for `127.0.0.1`/`localhost`, written into `dir`.
    pub fn generate(dir: &std::path::Path) -> Self {
        Self::generate_until(dir, None)
    }

    /// As [`generate`](Self::generate), the leaf valid until `not_after` (rcgen's default,
    /// 4096-01-01, when `None`).
    pub fn generate_until(dir: &std::path::Path, not_after: Option<time::OffsetDateTime>) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // A subject of its own: with rcgen's default for both, OpenSSL clients (curl) take the
        // leaf for a self-signed certificate.
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "keygate test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "localhost");
        if let Some(at) = not_after {
            params.not_after = at;
        }
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        let files = Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        };
        std::fs::write(&files.ca, ca.pem()).unwrap();
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }
}

pub struct RedisServer {
    child: Child,
    pub port: u16,
    mode: Mode,
    extra: Vec<String>,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn assert_installed() {
    let found = Command::new("redis-server").arg("--version").output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "redis-server is not installed. Install it with: sudo apt-get install -y redis-server \
         (scripts/dev test installs it when run as root)"
    );
}

impl RedisServer {
    /// Starts a private server. A missing `redis-server` fails the test loudly: it is never
    /// skipped.
    pub fn start() -> Self {
        Self::start_with(&Mode::Plain, Vec::new)
    }

    pub fn start_mode(mode: &Mode) -> Self {
        Self::start_with(mode, Vec::new)
    }

    /// `extra` gives more arguments, fresh for each attempt (it may pick ports too).
    fn start_with(mode: &Mode, extra: impl Fn() -> Vec<String>) -> Self {
        assert_installed();
        for _ in 0..5 {
            let mut server = Self {
                child: Command::new("true").spawn().unwrap(),
                port: free_port(),
                mode: mode.clone(),
                extra: extra(),
                dir: tempfile::tempdir().unwrap(),
            };
            server.child = server.spawn();
            if server.wait_ready() {
                return server;
            }
            let _ = server.child.kill();
            let _ = server.child.wait();
        }
        panic!("could not start redis-server on a free port");
    }

    fn spawn(&self) -> Child {
        let port = self.port.to_string();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path());
        match &self.mode {
            Mode::Plain => {
                cmd.args(["--port", &port]);
            }
            Mode::Password(pw) => {
                cmd.args(["--port", &port, "--requirepass", pw]);
            }
            Mode::Tls(files) => {
                cmd.args([
                    "--port",
                    "0",
                    "--tls-port",
                    &port,
                    "--tls-auth-clients",
                    "no",
                ])
                .arg("--tls-cert-file")
                .arg(&files.cert)
                .arg("--tls-key-file")
                .arg(&files.key)
                .arg("--tls-ca-cert-file")
                .arg(&files.ca);
            }
        }
        cmd.args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return false;
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                match self.mode {
                    // The TLS handshake is the client's business: listening is enough here.
                    Mode::Tls(_) => return true,
                    Mode::Plain => {
                        if self.cli(&["PING"]).trim() == "+PONG" {
                            return true;
                        }
                    }
                    Mode::Password(_) => {
                        if self.cli(&["PING"]).starts_with("-NOAUTH") {
                            return true;
                        }
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Kills the server (an outage); `restart` brings it back, empty, on the same port.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&self) {
        Self::signal(self.child.id(), "STOP");
    }

    /// Thaws a [`Self::pause`]d server (SIGCONT).
    pub fn resume(&self) {
        Self::signal(self.child.id(), "CONT");
    }

    fn signal(pid: u32, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([format!("-{sig}"), pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{sig} {pid}");
    }

    pub fn restart(&mut self) {
        self.child = self.spawn();
        assert!(
            self.wait_ready(),
            "redis-server did not come back on port {}",
            self.port
        );
    }

    pub fn url(&self) -> String {
        match &self.mode {
            Mode::Plain => format!("redis://127.0.0.1:{}", self.port),
            Mode::Password(pw) => format!("redis://:{pw}@127.0.0.1:{}", self.port),
            Mode::Tls(_) => format!("rediss://127.0.0.1:{}", self.port),
        }
    }

    /// Commands the server has executed so far (`INFO stats`; the INFO itself counts one).
    pub fn commands_processed(&self) -> u64 {
        self.cli(&["INFO", "stats"])
            .lines()
            .find_map(|l| l.strip_prefix("total_commands_processed:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap()
    }

    /// Runs a command through a raw RESP exchange (no redis-cli needed) and returns the reply.
    /// Plaintext servers only.
    pub fn cli(&self, args: &[&str]) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut out = Vec::new();
        // Read until the peer pauses: enough for the small replies tests inspect.
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three masters, no replicas, slots split evenly; formed with plain cluster commands (no
/// redis-cli needed).
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_with(&Mode::Plain, || {
                    vec![
                        "--cluster-enabled".into(),
                        "yes".into(),
                        "--cluster-config-file".into(),
                        "nodes.conf".into(),
                        "--cluster-port".into(),
                        free_port().to_string(),
                        "--cluster-node-timeout".into(),
                        "2000".into(),
                    ]
                })
            })
            .collect();
        let ranges = [("0", "5460"), ("5461", "10922"), ("10923", "16383")];
        for (node, (lo, hi)) in nodes.iter().zip(ranges) {
            let reply = node.cli(&["CLUSTER", "ADDSLOTSRANGE", lo, hi]);
            assert!(reply.starts_with("+OK"), "ADDSLOTSRANGE: {reply}");
        }
        for node in &nodes[1..] {
            let bus = node_bus_port(node);
            let reply =
                nodes[0].cli(&["CLUSTER", "MEET", "127.0.0.1", &node.port.to_string(), &bus]);
            assert!(reply.starts_with("+OK"), "CLUSTER MEET: {reply}");
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = nodes.iter().all(|n| {
                let info = n.cli(&["CLUSTER", "INFO"]);
                info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:3")
            });
            if ok {
                return Self { nodes };
            }
            assert!(Instant::now() < deadline, "the test cluster did not form");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `redis+cluster://` naming every node.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// The node serving `key`'s slot.
    pub fn node_for(&self, key: &str) -> &RedisServer {
        let slot = self.nodes[0].cli(&["CLUSTER", "KEYSLOT", key]);
        let slot: u16 = slot.trim().trim_start_matches(':').parse().unwrap();
        let index = match slot {
            0..=5460 => 0,
            5461..=10922 => 1,
            _ => 2,
        };
        &self.nodes[index]
    }
}

fn node_bus_port(node: &RedisServer) -> String {
    let i = node
        .extra
        .iter()
        .position(|a| a == "--cluster-port")
        .unwrap();
    node.extra[i + 1].clone()
}

// --- A primary with one replica (nonce durability, `store.nonce_durability`) ---

/// A primary and one replica (`--replicaof`), the link up before `start` returns.
pub struct RedisReplicated {
    pub primary: RedisServer,
    pub replica: RedisServer,
}

impl RedisReplicated {
    pub fn start() -> Self {
        let primary = RedisServer::start();
        let of = primary.port.to_string();
        let replica = RedisServer::start_with(&Mode::Plain, || {
            vec!["--replicaof".into(), "127.0.0.1".into(), of.clone()]
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let linked = replica
                .cli(&["INFO", "replication"])
                .contains("master_link_status:up")
                && primary
                    .cli(&["INFO", "replication"])
                    .contains("connected_slaves:1");
            if linked {
                return Self { primary, replica };
            }
            assert!(Instant::now() < deadline, "the replica did not link up");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
