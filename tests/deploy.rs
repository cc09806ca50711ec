//! What `deploy/` ships, held against the binary: every config in it passes the real
//! `keygate check-config`; the systemd unit has the hardening, credentials, directories and
//! stop timeout the binary and its config expect, `systemd-analyze verify` accepts it, and its
//! exposure score (`systemd-analyze security --offline`) stays low.
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
