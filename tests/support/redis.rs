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
        resp_exchange(self.port, None, args)
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
        Self::start_nodes(3, 2000)
    }

    /// Three masters and `replicas` replicas of each (`nodes[3 * r + i]`, r ≥ 1, replicates
    /// `nodes[i]`), with `node_timeout_ms` as `cluster-node-timeout`: a killed master's replica
    /// takes over about that long after the kill.
    pub fn start_with_replicas(replicas: usize, node_timeout_ms: u32) -> Self {
        let cluster = Self::start_nodes(3 * (1 + replicas), node_timeout_ms);
        let ids: Vec<String> = cluster.nodes[..3]
            .iter()
            .map(|n| resp_text(&n.cli(&["CLUSTER", "MYID"])))
            .collect();
        for (j, replica) in cluster.nodes.iter().enumerate().skip(3) {
            let id = &ids[j % 3];
            // A node learns the others over the bus: REPLICATE fails until it knows the master.
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let reply = replica.cli(&["CLUSTER", "REPLICATE", id]);
                if reply.starts_with("+OK") {
                    break;
                }
                assert!(Instant::now() < deadline, "CLUSTER REPLICATE: {reply}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let linked = format!("connected_slaves:{replicas}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let synced = cluster.nodes[..3].iter().all(|m| {
                let info = m.cli(&["INFO", "replication"]);
                info.contains(&linked)
                    && !info.contains("state=wait_bgsave")
                    && !info.contains("state=send_bulk")
            });
            let ok = cluster
                .nodes
                .iter()
                .all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"));
            if synced && ok {
                return cluster;
            }
            assert!(
                Instant::now() < deadline,
                "the replicas did not catch up with their masters"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether `node` now answers `ROLE` as a master.
    pub fn is_master(node: &RedisServer) -> bool {
        node.cli(&["ROLE"]).contains("master")
    }

    /// After master `dead` was killed: waits until one of its replicas is a master and every
    /// other node says `cluster_state:ok`; returns how long that took.
    pub fn wait_failover(&self, dead: usize, within: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let promoted = self
                .nodes
                .iter()
                .enumerate()
                .any(|(j, n)| j >= 3 && j % 3 == dead && Self::is_master(n));
            let ok = self
                .nodes
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != dead)
                .all(|(_, n)| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"));
            if promoted && ok {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < within,
                "no replica of node {dead} was promoted within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn start_nodes(count: usize, node_timeout_ms: u32) -> Self {
        let nodes: Vec<RedisServer> = (0..count)
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
                        node_timeout_ms.to_string(),
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
        let known = format!("cluster_known_nodes:{count}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = nodes.iter().all(|n| {
                let info = n.cli(&["CLUSTER", "INFO"]);
                info.contains("cluster_state:ok") && info.contains(&known)
            });
            if ok {
                return Self { nodes };
            }
            assert!(Instant::now() < deadline, "the test cluster did not form");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `redis+cluster://` naming the three first masters (seeds: the client learns the rest).
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.nodes[..3]
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// The index of the first master serving `key`'s slot.
    pub fn master_index_for(&self, key: &str) -> usize {
        let slot = self.nodes[0].cli(&["CLUSTER", "KEYSLOT", key]);
        let slot: u16 = slot.trim().trim_start_matches(':').parse().unwrap();
        match slot {
            0..=5460 => 0,
            5461..=10922 => 1,
            _ => 2,
        }
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

/// The text of a simple or bulk RESP reply.
fn resp_text(reply: &str) -> String {
    reply
        .lines()
        .find(|l| !l.starts_with('$'))
        .unwrap_or_default()
        .trim_start_matches('+')
        .trim()
        .to_owned()
}

fn node_bus_port(node: &RedisServer) -> String {
    let i = node
        .extra
        .iter()
        .position(|a| a == "--cluster-port")
        .unwrap();
    node.extra[i + 1].clone()
}

// ---- Redis Sentinel ---------------------------------------------------------------------------

/// The name the test sentinels monitor.
pub const SENTINEL_MASTER: &str = "keygate";

/// One `redis-server --sentinel`, with its config file in its own temp dir (a sentinel
/// rewrites its config as it learns the topology).
struct SentinelProcess {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for SentinelProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A primary, one replica and three sentinels (quorum 2, `down-after-milliseconds 1000`,
/// `failover-timeout 5000`), each on a free port with its own temp dir.
pub struct SentinelSet {
    pub primary: RedisServer,
    pub replica: RedisServer,
    sentinels: Vec<SentinelProcess>,
    /// The data nodes' password, if any.
    pub password: Option<String>,
    /// The sentinels' password, if any.
    pub sentinel_password: Option<String>,
}

impl SentinelSet {
    pub fn start() -> Self {
        Self::start_with(None, None)
    }

    /// Data nodes with `requirepass password`, sentinels with `requirepass sentinel_password`.
    pub fn start_with(password: Option<&str>, sentinel_password: Option<&str>) -> Self {
        let mode = password.map_or(Mode::Plain, |p| Mode::Password(p.to_owned()));
        let auth: Vec<String> = password
            .map(|p| vec!["--masterauth".to_owned(), p.to_owned()])
            .unwrap_or_default();
        let primary = {
            let auth = auth.clone();
            RedisServer::start_with(&mode, move || auth.clone())
        };
        let primary_port = primary.port;
        let replica = RedisServer::start_with(&mode, move || {
            let mut args = vec![
                "--replicaof".to_owned(),
                "127.0.0.1".to_owned(),
                primary_port.to_string(),
            ];
            args.extend(auth.clone());
            args
        });
        let sentinels = (0..3)
            .map(|_| start_sentinel(primary_port, password, sentinel_password))
            .collect();
        let set = Self {
            primary,
            replica,
            sentinels,
            password: password.map(str::to_owned),
            sentinel_password: sentinel_password.map(str::to_owned),
        };
        set.wait_formed();
        set
    }

    /// Until every sentinel knows the replica (up) and the two other sentinels: without them
    /// no failover can be authorised.
    fn wait_formed(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let replica = format!("{}", self.replica.port);
        loop {
            let formed = self.sentinels.iter().all(|s| {
                let master = self.sentinel_cmd(s.port, &["SENTINEL", "MASTER", SENTINEL_MASTER]);
                let replicas =
                    self.sentinel_cmd(s.port, &["SENTINEL", "REPLICAS", SENTINEL_MASTER]);
                resp_field(&master, "num-other-sentinels").as_deref() == Some("2")
                    && resp_field(&master, "num-slaves").as_deref() == Some("1")
                    && replicas.contains(&replica)
                    && resp_field(&replicas, "master-link-status").as_deref() == Some("ok")
            });
            if formed {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the sentinels did not see the replica and each other within 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `host:port` of each sentinel.
    pub fn sentinels(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect()
    }

    /// SIGKILL of the current primary (the one a sentinel names).
    pub fn kill_primary(&mut self) {
        let port = self.primary_port();
        if self.primary.port == port {
            self.primary.stop();
        } else {
            self.replica.stop();
        }
    }

    /// `SENTINEL FAILOVER`: the replica is promoted and the primary, alive, demoted.
    pub fn force_failover(&self) {
        let reply = self.sentinel_cmd(
            self.sentinels[0].port,
            &["SENTINEL", "FAILOVER", SENTINEL_MASTER],
        );
        assert!(reply.contains("+OK"), "SENTINEL FAILOVER: {reply}");
    }

    /// `ROLE` of the node on `port` (`master`/`slave`), with the data nodes' password.
    pub fn role_of(&self, port: u16) -> String {
        let reply = resp_exchange(port, self.password.as_deref(), &["ROLE"]);
        ["master", "slave"]
            .into_iter()
            .find(|r| reply.contains(&format!("\r\n{r}\r\n")))
            .unwrap_or("unknown")
            .to_owned()
    }

    /// `host:port` of the primary, asked from a sentinel that answers.
    pub fn primary_addr(&self) -> String {
        format!("127.0.0.1:{}", self.primary_port())
    }

    fn primary_port(&self) -> u16 {
        for s in &self.sentinels {
            let reply = self.sentinel_cmd(
                s.port,
                &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_MASTER],
            );
            // *2 $9 127.0.0.1 $N <port>
            if let Some(port) = reply
                .split("\r\n")
                .filter(|l| !l.starts_with(['*', '$', '+', '-']))
                .nth(1)
                .and_then(|p| p.parse().ok())
            {
                return port;
            }
        }
        panic!("no sentinel names a primary");
    }

    /// `[store]` TOML for this set; password files are written by the caller.
    pub fn store_toml(&self, more: &str) -> String {
        let list: Vec<String> = self.sentinels().iter().map(|s| format!("{s:?}")).collect();
        format!(
            "[store]\nkind = \"redis\"\nsentinels = [{}]\nsentinel_master = \"{SENTINEL_MASTER}\"\n{more}",
            list.join(", ")
        )
    }

    /// One command to a sentinel (AUTH first when it has a password).
    pub fn sentinel_cmd(&self, port: u16, args: &[&str]) -> String {
        resp_exchange(port, self.sentinel_password.as_deref(), args)
    }
}

fn start_sentinel(
    primary_port: u16,
    password: Option<&str>,
    sentinel_password: Option<&str>,
) -> SentinelProcess {
    for _ in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut conf = format!(
            "port {port}\nbind 127.0.0.1\ndir {dir}\n\
             sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {primary_port} 2\n\
             sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
             sentinel failover-timeout {SENTINEL_MASTER} 5000\n\
             sentinel parallel-syncs {SENTINEL_MASTER} 1\n",
            dir = dir.path().display()
        );
        if let Some(pw) = password {
            conf.push_str(&format!("sentinel auth-pass {SENTINEL_MASTER} {pw}\n"));
        }
        if let Some(pw) = sentinel_password {
            conf.push_str(&format!("requirepass {pw}\nsentinel sentinel-pass {pw}\n"));
        }
        let path = dir.path().join("sentinel.conf");
        std::fs::write(&path, conf).unwrap();
        let mut child = Command::new("redis-server")
            .arg(&path)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                break;
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return SentinelProcess {
                    child,
                    port,
                    _dir: dir,
                };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("could not start a sentinel on a free port");
}

/// A raw RESP exchange: `AUTH password` first when given, then `args`; the replies as text.
pub fn resp_exchange(port: u16, password: Option<&str>, args: &[&str]) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let encode = |args: &[&str]| {
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        req
    };
    let mut req = String::new();
    if let Some(pw) = password {
        req.push_str(&encode(&["AUTH", pw]));
    }
    req.push_str(&encode(args));
    if s.write_all(req.as_bytes()).is_err() {
        return String::new();
    }
    let mut buf = vec![0u8; 1 << 16];
    let mut out = Vec::new();
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The value after `name` in a RESP array of field/value bulk strings.
fn resp_field(reply: &str, name: &str) -> Option<String> {
    let lines: Vec<&str> = reply
        .split("\r\n")
        .filter(|l| !l.starts_with(['*', '$']))
        .collect();
    lines
        .iter()
        .position(|l| *l == name)
        .and_then(|i| lines.get(i + 1))
        .map(|v| (*v).to_owned())
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
