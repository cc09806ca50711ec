//! What `deploy/` ships, held against the binary: every config in it passes the real
//! `keygate check-config`; the systemd unit has the hardening, credentials, directories and
//! stop timeout the binary and its config expect, `systemd-analyze verify` accepts it, and its
//! exposure score (`systemd-analyze security --offline`) stays low; and deploy/README.md's
//! systemd steps, run literally on a temp root with keygate as a non-root uid (the unit's
//! DynamicUser), install a gateway that starts and a master key that rotates.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use std::collections::BTreeMap;
use std::process::Command;

use support::{files_under, free_port, repo_root};

#[test]
fn every_config_in_deploy_passes_check_config() {
    // --offline: they name hosts of their own networks (compose services, cluster DNS).
    let configs = files_under(&repo_root().join("deploy"), &[".toml"]);
    assert!(configs.len() >= 3, "{configs:?}");
    for config in configs {
        support::assert_check_config_offline(&config, &config.display().to_string());
    }
}

/// `[Service]` settings of a unit file: each key with every value it is given.
fn service_settings(unit: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut in_service = false;
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service && !line.starts_with('#') {
            if let Some((k, v)) = line.split_once('=') {
                out.entry(k.to_owned()).or_default().push(v.to_owned());
            }
        }
    }
    out
}

fn seconds(value: &str) -> u64 {
    value
        .trim_matches('"')
        .trim_end_matches('s')
        .parse()
        .unwrap()
}

#[test]
fn the_systemd_unit_is_hardened_and_matches_its_config() {
    let unit = std::fs::read_to_string(repo_root().join("deploy/systemd/keygate.service")).unwrap();
    let config = std::fs::read_to_string(repo_root().join("deploy/systemd/keygate.toml")).unwrap();
    let s = service_settings(&unit);
    let one = |k: &str| -> &str {
        let v = s.get(k).unwrap_or_else(|| panic!("{k} is missing"));
        assert_eq!(v.len(), 1, "{k} given {v:?}");
        &v[0]
    };
    for (k, v) in [
        ("DynamicUser", "yes"),
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
        ("StateDirectory", "keygate"),
        ("RuntimeDirectory", "keygate"),
        ("PrivateTmp", "yes"),
        ("ProtectHome", "yes"),
    ] {
        assert_eq!(one(k), v, "{k}");
    }
    assert!(one("ExecReload").contains("-HUP $MAINPID"));
    assert!(one("ExecStart").ends_with("serve --config /etc/keygate/keygate.toml"));
    // The credential names keygate reads from $CREDENTIALS_DIRECTORY.
    let creds = &s["LoadCredential"];
    for name in ["master-key", "admin-token"] {
        assert!(
            creds.iter().any(|c| c.starts_with(&format!("{name}:"))),
            "{creds:?}"
        );
    }
    // The config's paths live in the unit's directories, and systemd waits longer than
    // keygate's shutdown grace before killing it.
    let table: toml::Table = toml::from_str(&config).unwrap();
    let server = table["server"].as_table().unwrap();
    let store = table["store"].as_table().unwrap();
    assert!(store["path"]
        .as_str()
        .unwrap()
        .starts_with("/var/lib/keygate/"));
    assert!(server["pid_file"]
        .as_str()
        .unwrap()
        .starts_with("/run/keygate/"));
    assert!(server["upgrade_sock"]
        .as_str()
        .unwrap()
        .starts_with("/run/keygate/"));
    let grace = seconds(server["shutdown_grace"].as_str().unwrap());
    assert!(seconds(one("TimeoutStopSec")) > grace);
    // The master key and admin token come from the credentials, not from files it names.
    assert!(table
        .get("secrets")
        .and_then(|t| t.get("master_key_file"))
        .is_none());
    assert!(table["admin"].get("token_file").is_none());
}

#[test]
fn systemd_analyze_accepts_the_unit() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!(
            "systemd-analyze is not installed; install it with: sudo apt-get install -y systemd \
             (scripts/dev test does)"
        );
    }
    // verify needs the ExecStart binary to exist: point it at the one under test.
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(repo_root().join("deploy/systemd/keygate.service"))
        .unwrap()
        .replace("/usr/local/bin/keygate", env!("CARGO_BIN_EXE_keygate"));
    let path = dir.path().join("keygate.service");
    std::fs::write(&path, unit).unwrap();
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&security.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("keygate.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {text}"));
    eprintln!("systemd-analyze security: exposure {score} (0 best, 10 worst)");
    assert!(score <= 2.0, "exposure {score}:\n{text}");
}

fn http_status(port: u16, method: &str, path: &str, token: Option<&str>) -> u16 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return 0;
    };
    let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    let body = if method == "POST" {
        r#"{"owner":"acme","name":"systemd"}"#
    } else {
        ""
    };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: k\r\nconnection: close\r\ncontent-type: \
         application/json\r\ncontent-length: {}\r\n{auth}\r\n{body}",
        body.len()
    );
    let mut out = String::new();
    if s.write_all(req.as_bytes()).is_err() || s.read_to_string(&mut out).is_err() {
        return 0;
    }
    out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// The unit's runtime contract without systemd (none runs here as init): keygate started as
/// the unit starts it, on the unit's config (its directories moved to a temp dir, ports
/// freed), with the master key and admin token only in `$CREDENTIALS_DIRECTORY` — it becomes
/// ready, accepts the admin token from the credential, writes its pid file, reloads on SIGHUP
/// (`ExecReload`) and exits on SIGTERM within `shutdown_grace`.
#[test]
fn keygate_runs_as_the_unit_runs_it() {
    let dir = tempfile::tempdir().unwrap();
    let (state, run, creds) = (
        dir.path().join("state"),
        dir.path().join("run"),
        dir.path().join("credentials"),
    );
    for d in [&state, &run, &creds] {
        std::fs::create_dir_all(d).unwrap();
    }
    let (proxy, admin, metrics) = (free_port(), free_port(), free_port());
    let config = std::fs::read_to_string(repo_root().join("deploy/systemd/keygate.toml"))
        .unwrap()
        .replace("/var/lib/keygate", state.to_str().unwrap())
        .replace("/run/keygate", run.to_str().unwrap())
        .replace("0.0.0.0:8080", &format!("127.0.0.1:{proxy}"))
        .replace("127.0.0.1:9901", &format!("127.0.0.1:{admin}"))
        .replace("127.0.0.1:9902", &format!("127.0.0.1:{metrics}"));
    let config_path = dir.path().join("keygate.toml");
    std::fs::write(&config_path, config).unwrap();
    let token = "systemd-credential-admin-token";
    std::fs::write(
        creds.join("master-key"),
        "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
    )
    .unwrap();
    std::fs::write(creds.join("admin-token"), token).unwrap();
    for f in ["master-key", "admin-token"] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(creds.join(f), std::fs::Permissions::from_mode(0o400)).unwrap();
    }
    let log = std::fs::File::create(dir.path().join("keygate.log")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["serve", "--config"])
        .arg(&config_path)
        .env_remove("KEYGATE_MASTER_KEY")
        .env_remove("KEYGATE_ADMIN_TOKEN")
        .env("CREDENTIALS_DIRECTORY", &creds)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let log = || std::fs::read_to_string(dir.path().join("keygate.log")).unwrap_or_default();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while http_status(admin, "GET", "/readyz", None) != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "never ready: {}",
            log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        http_status(admin, "POST", "/v1/keys", Some(token)),
        201,
        "{}",
        log()
    );
    assert_eq!(http_status(admin, "POST", "/v1/keys", Some("wrong")), 401);
    assert!(state.join("keygate.db").exists());
    let pid = std::fs::read_to_string(run.join("keygate.pid")).unwrap();
    assert_eq!(pid.trim(), child.id().to_string());
    // ExecReload.
    let hup = Command::new("kill")
        .args(["-HUP", pid.trim()])
        .status()
        .unwrap();
    assert!(hup.success());
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(http_status(admin, "GET", "/readyz", None), 200);
    assert!(log().contains("reload"), "{}", log());
    // systemd's stop: SIGTERM, then SIGKILL after TimeoutStopSec.
    let started = std::time::Instant::now();
    Command::new("kill")
        .args(["-TERM", pid.trim()])
        .status()
        .unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(15),
            "still running after TimeoutStopSec"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    eprintln!("stopped in {:?}: {status}", started.elapsed());
    assert!(status.success(), "{status}: {}", log());
}

/// The dynamic uid the test runs keygate as (systemd picks them from 61184–65519).
const DYNAMIC_UID: u32 = 62011;

/// The `sh` blocks of deploy/README.md's "## systemd" section, each as logical lines
/// (continuations joined, trailing comments of non-shell lines kept for `sh`).
fn readme_systemd_blocks() -> Vec<Vec<String>> {
    let readme = std::fs::read_to_string(repo_root().join("deploy/README.md")).unwrap();
    let section = readme
        .split("\n## ")
        .find(|s| s.starts_with("systemd\n"))
        .expect("deploy/README.md has a systemd section");
    let mut blocks = Vec::new();
    for (i, part) in section.split("```").enumerate() {
        let Some(body) = part.strip_prefix("sh\n").filter(|_| i % 2 == 1) else {
            continue;
        };
        let mut lines = Vec::new();
        let mut current = String::new();
        for line in body.lines() {
            current.push_str(line.trim_end_matches('\\').trim_end());
            current.push(' ');
            if !line.ends_with('\\') {
                lines.push(current.trim().to_owned());
                current.clear();
            }
        }
        blocks.push(lines);
    }
    blocks
}

/// A temp root standing for `/`, and keygate run in it as the unit runs it.
struct Host {
    root: tempfile::TempDir,
    ports: (u16, u16, u16),
    gateway: Option<std::process::Child>,
    unit: BTreeMap<String, Vec<String>>,
    runs: u32,
}

impl Host {
    fn new() -> Self {
        use support::unprivileged::own;
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        // What a host has before the install.
        for d in ["usr/local/bin", "etc/systemd/system", "var/lib", "run"] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        for d in [
            "",
            "usr",
            "usr/local",
            "usr/local/bin",
            "etc",
            "etc/systemd",
            "etc/systemd/system",
            "var",
            "var/lib",
            "run",
        ] {
            own(&r.join(d), 0, 0, 0o755);
        }
        let unit =
            std::fs::read_to_string(repo_root().join("deploy/systemd/keygate.service")).unwrap();
        Self {
            root,
            ports: (free_port(), free_port(), free_port()),
            gateway: None,
            unit: service_settings(&unit),
            runs: 0,
        }
    }

    fn at(&self, path: &str) -> std::path::PathBuf {
        self.root.path().join(path.trim_start_matches('/'))
    }

    /// A shell line of the README with its absolute paths moved under the root.
    fn sh(&self, line: &str) {
        let r = self.root.path().display().to_string();
        let line = line
            .replace("target/release/keygate", env!("CARGO_BIN_EXE_keygate"))
            .replace(" /etc/", &format!(" {r}/etc/"))
            .replace(" /usr/", &format!(" {r}/usr/"));
        let status = Command::new("sh")
            .args(["-c", &line])
            .current_dir(repo_root())
            .status()
            .unwrap();
        assert!(status.success(), "{line}");
    }

    /// `$CREDENTIALS_DIRECTORY` as systemd makes it for `LoadCredential=name:path` lines:
    /// copies owned by the unit's user, 0400, in a 0500 directory.
    fn credentials(&mut self, load: &[String]) -> std::path::PathBuf {
        use support::unprivileged::own;
        self.runs += 1;
        let dir = self.at(&format!("run/credentials/unit-{}", self.runs));
        std::fs::create_dir_all(&dir).unwrap();
        own(&self.at("run/credentials"), 0, 0, 0o755);
        for spec in load {
            let (name, path) = spec.split_once(':').unwrap();
            let copy = dir.join(name);
            std::fs::copy(self.at(path), &copy)
                .unwrap_or_else(|e| panic!("LoadCredential={spec}: {e}"));
            own(&copy, DYNAMIC_UID, DYNAMIC_UID, 0o400);
        }
        own(&dir, DYNAMIC_UID, DYNAMIC_UID, 0o500);
        dir
    }

    /// keygate as the unit's dynamic user, with these credentials.
    fn keygate(&self, credentials: &std::path::Path) -> Command {
        let mut c = support::unprivileged::command(
            DYNAMIC_UID,
            DYNAMIC_UID,
            &self.at("/usr/local/bin/keygate"),
        );
        c.current_dir(self.root.path())
            .env_remove("KEYGATE_MASTER_KEY")
            .env_remove("KEYGATE_ADMIN_TOKEN")
            .env("CREDENTIALS_DIRECTORY", credentials);
        c
    }

    /// `systemctl start keygate`: the unit's directories (StateDirectory and
    /// RuntimeDirectory with their modes, owned by the dynamic user), its credentials, and
    /// ExecStart as that user, with the config's host paths and ports moved (the file is
    /// rewritten in place: its mode and owner are the install's).
    fn start(&mut self) {
        use support::unprivileged::own;
        let config_path = self.at("/etc/keygate/keygate.toml");
        let r = self.root.path().display().to_string();
        let (proxy, admin, metrics) = self.ports;
        let text = std::fs::read_to_string(&config_path)
            .unwrap()
            .replace("\"/var/lib/keygate", &format!("\"{r}/var/lib/keygate"))
            .replace("\"/run/keygate", &format!("\"{r}/run/keygate"))
            .replace("0.0.0.0:8080", &format!("127.0.0.1:{proxy}"))
            .replace("127.0.0.1:9901", &format!("127.0.0.1:{admin}"))
            .replace("127.0.0.1:9902", &format!("127.0.0.1:{metrics}"));
        std::fs::write(&config_path, text).unwrap();
        for (key, dir) in [("StateDirectory", "var/lib"), ("RuntimeDirectory", "run")] {
            let name = &self.unit[key][0];
            let mode = u32::from_str_radix(&self.unit[&format!("{key}Mode")][0], 8).unwrap();
            let path = self.at(&format!("{dir}/{name}"));
            std::fs::create_dir_all(&path).unwrap();
            own(&path, DYNAMIC_UID, DYNAMIC_UID, mode);
        }
        let load = self.unit["LoadCredential"].clone();
        let creds = self.credentials(&load);
        let exec: Vec<String> = self.unit["ExecStart"][0]
            .split_whitespace()
            .map(|a| a.replace("/etc/", &format!("{r}/etc/")))
            .collect();
        assert_eq!(exec[0], "/usr/local/bin/keygate");
        let log = std::fs::File::create(self.at("keygate.log")).unwrap();
        let child = self
            .keygate(&creds)
            .args(&exec[1..])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.gateway = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while http_status(admin, "GET", "/readyz", None) != 200 {
            if let Some(status) = self.gateway.as_mut().unwrap().try_wait().unwrap() {
                panic!("keygate exited {status}: {}", self.log());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never ready: {}",
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.at("keygate.log")).unwrap_or_default()
    }

    /// `systemctl stop keygate`: SIGTERM, and the exit.
    fn stop(&mut self) {
        let mut child = self.gateway.take().expect("running");
        let started = std::time::Instant::now();
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        let status = child.wait().unwrap();
        eprintln!("systemctl stop: exited in {:?}", started.elapsed());
        assert!(status.success(), "{status}: {}", self.log());
    }

    /// `systemd-run … -p LoadCredential=… /usr/local/bin/keygate ARGS`: keygate as the
    /// dynamic user with those credentials; its exit code and output.
    fn systemd_run(&mut self, line: &str) -> (Option<i32>, String) {
        let words: Vec<&str> = line
            .split("  #")
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        let mut load = Vec::new();
        let mut props = Vec::new();
        let mut args = None;
        let mut i = 1;
        while i < words.len() {
            match words[i] {
                "-p" => {
                    let p = words[i + 1];
                    if let Some(spec) = p.strip_prefix("LoadCredential=") {
                        load.push(spec.to_owned());
                    } else {
                        props.push(p);
                    }
                    i += 2;
                }
                "/usr/local/bin/keygate" => {
                    args = Some(&words[i + 1..]);
                    break;
                }
                _ => i += 1,
            }
        }
        // The unit the command must share: its user, its state directory.
        for p in ["DynamicUser=yes", "User=keygate", "StateDirectory=keygate"] {
            assert!(props.contains(&p), "{line}: no -p {p}");
        }
        let r = self.root.path().display().to_string();
        let args: Vec<String> = args
            .unwrap_or_else(|| panic!("{line}: no keygate command"))
            .iter()
            .map(|a| a.replace("/etc/", &format!("{r}/etc/")))
            .collect();
        let creds = self.credentials(&load);
        let out = self.keygate(&creds).args(&args).output().unwrap();
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// One logical line of a README block, as the host would run it; what a `systemd-run`
    /// printed.
    fn run(&mut self, line: &str) -> Option<String> {
        if line.starts_with("install ") || line.starts_with("(umask") || line.starts_with("mv ") {
            self.sh(line);
        } else if line.starts_with("systemctl daemon-reload && systemctl enable --now keygate")
            || line == "systemctl start keygate"
        {
            self.start();
        } else if line == "systemctl stop keygate" {
            self.stop();
        } else if line.starts_with("systemd-run ") {
            let (code, out) = self.systemd_run(line);
            assert_eq!(code, Some(0), "{line}: {out}");
            return Some(out);
        } else {
            assert!(
                line.starts_with("systemctl reload") || line.starts_with("journalctl"),
                "a README line this test does not know: {line}"
            );
        }
        None
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(mut child) = self.gateway.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// deploy/README.md's systemd steps, run literally on a temp root (issue 25 item 1): the
/// install's modes; keygate started as the unit starts it but as a non-root uid (the unit's
/// DynamicUser, via setpriv) reads the config, gets its secrets from a
/// `$CREDENTIALS_DIRECTORY` copy and becomes ready (with the 0700/0600 install it exited 64).
/// Then the README's `keygate secrets` blocks (item 4): `secrets status` and a one-stop
/// master-key rotation through `systemd-run`, as that uid on the unit's state directory.
#[test]
fn the_readme_systemd_install_starts_as_a_dynamic_user_and_rotates_the_master_key() {
    use support::unprivileged::mode;
    if let Some(why) = support::unprivileged::cannot_switch() {
        eprintln!("keygate not run as uid {DYNAMIC_UID}: {why}");
    }
    let blocks = readme_systemd_blocks();
    assert_eq!(
        blocks.len(),
        3,
        "install, secrets status, rotation: {blocks:?}"
    );
    let mut host = Host::new();
    for line in &blocks[0] {
        host.run(line);
    }
    // The modes the README installs, as a host's `ls -l` would show them.
    for (path, want) in [
        ("/etc/keygate", 0o755),
        ("/etc/keygate/keygate.toml", 0o644),
        ("/etc/keygate/master.key", 0o600),
        ("/etc/keygate/admin.token", 0o600),
    ] {
        assert_eq!(
            mode(&host.at(path)),
            want,
            "{path}: {:o}",
            mode(&host.at(path))
        );
    }
    // Running: the admin token from the credential works; an hmac key is sealed.
    let token = std::fs::read_to_string(host.at("/etc/keygate/admin.token")).unwrap();
    let admin = host.ports.1;
    assert_eq!(
        http_status(admin, "POST", "/v1/keys", Some(token.trim())),
        201,
        "{}",
        host.log()
    );
    let old_key = std::fs::read_to_string(host.at("/etc/keygate/master.key")).unwrap();

    // keygate secrets status from an admin shell.
    let said: Vec<String> = blocks[1].iter().filter_map(|l| host.run(l)).collect();
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(said[0].contains("(current): 1 key secrets"), "{}", said[0]);

    // Master-key rotation in one stop. A client asks the proxy every 20 ms throughout: how
    // long it went unanswered is what the rotation costs (docs/operations.md).
    let probing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let prober = {
        let probing = std::sync::Arc::clone(&probing);
        let proxy = host.ports.0;
        std::thread::spawn(move || {
            let (mut refused, mut longest, mut since) = (0u32, std::time::Duration::ZERO, None);
            while probing.load(std::sync::atomic::Ordering::Relaxed) {
                if http_status(proxy, "GET", "/probe", None) == 0 {
                    refused += 1;
                    since.get_or_insert_with(std::time::Instant::now);
                } else if let Some(t) = since.take() {
                    longest = longest.max(t.elapsed());
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            (refused, longest)
        })
    };
    let mut said = Vec::new();
    let mut down = None;
    for line in &blocks[2] {
        if line == "systemctl stop keygate" {
            down = Some(std::time::Instant::now());
        }
        said.extend(host.run(line));
    }
    let down = down.expect("the rotation stops the gateway").elapsed();
    std::thread::sleep(std::time::Duration::from_millis(100));
    probing.store(false, std::sync::atomic::Ordering::Relaxed);
    let (refused, longest) = prober.join().unwrap();
    eprintln!(
        "master-key rotation: {down:?} from stop to ready again (stop, reseal, status, start); \
         the proxy unanswered for {longest:?} ({refused} probes refused)"
    );
    assert_eq!(said.len(), 2, "{said:?}");
    assert!(said[0].contains("1 key records re-sealed"), "{}", said[0]);
    assert!(
        said[1].contains("(current): 1 key secrets") && said[1].contains("everything is sealed"),
        "{}",
        said[1]
    );
    let new_key = std::fs::read_to_string(host.at("/etc/keygate/master.key")).unwrap();
    assert_ne!(new_key, old_key);
    assert_eq!(mode(&host.at("/etc/keygate/master.key")), 0o600);
    assert_eq!(
        http_status(admin, "GET", "/v1/keys", Some(token.trim())),
        200,
        "{}",
        host.log()
    );
    host.stop();
}
