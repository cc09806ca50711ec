//! The container, Compose, Kubernetes, Prometheus and Grafana files of `deploy/`, held against
//! the binary: every YAML and JSON file parses; the config inside each passes `keygate
//! check-config`; ports, probes, secret names and paths, and grace periods agree with that
//! config; `promtool` checks and unit-tests the alert rules; and every metric the dashboard and
//! the alerts use is in a real scrape of the running binary. No engine runs containers here:
//! what an engine would do (build, schedule) is not exercised.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use serde_yaml::Value as Yaml;
use support::redis::TlsFiles;
use support::{files_under, repo_root, Echo, Gateway, Options};

fn deploy(path: &str) -> PathBuf {
    repo_root().join("deploy").join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every YAML document of a file, with `<<` merge keys applied.
fn yaml_docs(path: &Path) -> Vec<Yaml> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(&read(path))
        .map(|d| {
            let mut v = Yaml::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            v.apply_merge().unwrap();
            v
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml(path: &str) -> Yaml {
    let mut docs = yaml_docs(&deploy(path));
    assert_eq!(docs.len(), 1, "{path}");
    docs.remove(0)
}

fn s(v: &Yaml) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

fn n(v: &Yaml) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v:?}"))
}

/// `keygate check-config --offline` on config text.
fn check_config(text: &str, what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keygate.toml");
    std::fs::write(&path, text).unwrap();
    support::assert_check_config_offline(&path, what);
}

/// What the deploy files must agree with, read from a keygate config.
struct Facts {
    proxy_port: u16,
    admin_port: u16,
    metrics_port: u16,
    shutdown_grace_s: u64,
    master_key_file: String,
    admin_token_file: String,
    table: toml::Table,
}

fn port_of(listen: &str) -> u16 {
    listen.rsplit(':').next().unwrap().parse().unwrap()
}

fn facts(text: &str) -> Facts {
    let table: toml::Table = toml::from_str(text).unwrap();
    let get = |section: &str, key: &str| -> String {
        table[section][key]
            .as_str()
            .unwrap_or_else(|| panic!("{section}.{key}"))
            .to_owned()
    };
    let grace = get("server", "shutdown_grace");
    Facts {
        proxy_port: port_of(&get("server", "listen")),
        admin_port: port_of(&get("admin", "listen")),
        metrics_port: port_of(&get("metrics", "listen")),
        shutdown_grace_s: humantime::parse_duration(&grace).unwrap().as_secs(),
        master_key_file: get("secrets", "master_key_file"),
        admin_token_file: get("admin", "token_file"),
        table,
    }
}

#[test]
fn every_yaml_and_json_file_in_deploy_parses() {
    let yamls = files_under(&repo_root().join("deploy"), &[".yaml", ".yml"]);
    let mut docs = 0;
    for f in &yamls {
        docs += yaml_docs(f).len();
    }
    let jsons = files_under(&repo_root().join("deploy"), &[".json"]);
    for f in &jsons {
        serde_json::from_str::<serde_json::Value>(&read(f))
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
    }
    eprintln!(
        "{} YAML files ({docs} documents), {} JSON files",
        yamls.len(),
        jsons.len()
    );
    assert!(yamls.len() >= 15 && !jsons.is_empty());
}

/// `(instruction, arguments)` of a Containerfile, continuation lines joined.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && current.is_empty()) {
            continue;
        }
        current.push_str(t.trim_end_matches('\\'));
        current.push(' ');
        if !t.ends_with('\\') {
            let (op, args) = current.trim().split_once(' ').unwrap();
            out.push((op.to_uppercase(), args.trim().to_owned()));
            current.clear();
        }
    }
    out
}

#[test]
fn the_container_image_runs_keygate_as_its_config_expects() {
    let file = instructions(&read(&deploy("Containerfile")));
    let all = |op: &str| -> Vec<&str> {
        file.iter()
            .filter(|(o, _)| o == op)
            .map(|(_, a)| a.as_str())
            .collect()
    };
    let one = |op: &str| -> &str {
        let v = all(op);
        assert_eq!(v.len(), 1, "{op}: {v:?}");
        v[0]
    };
    // Multi-stage: built with the lock file, run from a small base without the toolchain.
    let froms = all("FROM");
    assert_eq!(froms.len(), 2, "{froms:?}");
    assert!(froms[0].ends_with(" AS build"));
    assert!(froms[1].contains("distroless"), "{}", froms[1]);
    assert!(all("RUN")
        .iter()
        .any(|r| r.contains("cargo build --release --locked --bin keygate")));
    // Non-root, and numeric so Kubernetes' runAsNonRoot can check it.
    let user = one("USER");
    let uid: u32 = user.split(':').next().unwrap().parse().unwrap();
    assert_ne!(uid, 0);

    // The config baked in is where CMD points, and agrees with the rest of the image.
    let copies = all("COPY");
    let config_at = copies
        .iter()
        .find_map(|c| c.strip_prefix("deploy/container/keygate.toml "))
        .expect("the config is copied into the image");
    let cmd: Vec<String> = serde_json::from_str(one("CMD")).unwrap();
    assert_eq!(cmd, ["serve", "--config", config_at]);
    let entry: Vec<String> = serde_json::from_str(one("ENTRYPOINT")).unwrap();
    assert_eq!(entry, ["/usr/local/bin/keygate"]);
    let text = read(&deploy("container/keygate.toml"));
    check_config(&text, "deploy/container/keygate.toml");
    let f = facts(&text);
    let exposed: BTreeSet<u16> = one("EXPOSE")
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(
        exposed,
        BTreeSet::from([f.proxy_port, f.admin_port, f.metrics_port])
    );
    // The one writable path (read-only root filesystem) holds the store, and belongs to the
    // image's user.
    let volume: Vec<String> = serde_json::from_str(one("VOLUME")).unwrap();
    let store = f.table["store"]["path"].as_str().unwrap();
    assert!(store.starts_with(&format!("{}/", volume[0])), "{store}");
    assert!(copies
        .iter()
        .any(|c| c.contains(&format!("--chown={uid}:")) && c.ends_with(&volume[0])));
    for secret in [&f.master_key_file, &f.admin_token_file] {
        assert!(secret.starts_with("/etc/keygate/secrets/"), "{secret}");
    }
    // HEALTHCHECK: keygate's own probe (the image has no curl) on the admin /healthz of the
    // config CMD serves, so a config mounted over it (another port, [admin.tls]) keeps a
    // working probe (the_image_starts_healthy_… runs it).
    let health = one("HEALTHCHECK");
    let probe = health.split(" CMD ").nth(1).unwrap();
    let probe: Vec<String> = serde_json::from_str(probe).unwrap();
    assert_eq!(
        probe,
        ["/usr/local/bin/keygate", "health", "--config", config_at]
    );
    // Both bases pinned by digest: a rebuild gets the toolchain and runtime it was tested on.
    for from in &froms {
        let image = from.split_whitespace().next().unwrap();
        let digest = image.split_once("@sha256:").map_or("", |(_, d)| d);
        assert!(
            digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
            "FROM {from}: not pinned by digest"
        );
    }
}

/// The image's user (`USER` in deploy/Containerfile).
const IMAGE_UID: u32 = 65532;

/// The image as a container engine would run it, without an engine: its own config (absolute
/// paths moved under a temp root, ports freed), only the secrets deploy/README.md documents,
/// owned and moded as it says, and keygate run as the image's uid (setpriv, when root). The
/// config passes `check-config`, the gateway starts, and the HEALTHCHECK's command reports
/// it healthy — also with `[admin.tls]` added, where a fixed `http://` URL cannot.
fn run_the_image(admin_tls: bool) {
    use support::unprivileged;
    if let Some(why) = unprivileged::cannot_switch() {
        eprintln!("not as uid {IMAGE_UID}: {why}");
    }
    let bin = Path::new(env!("CARGO_BIN_EXE_keygate"));
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let etc = r.join("etc/keygate");
    let secrets = etc.join("secrets");
    let data = r.join("var/lib/keygate");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::create_dir_all(&data).unwrap();
    // What the image has: directories anyone may traverse, the volume the user's own (0700,
    // COPY --chown of /out/data), the config root's and readable.
    for d in [
        r,
        &r.join("etc"),
        &etc,
        &secrets,
        &r.join("var"),
        &r.join("var/lib"),
    ] {
        unprivileged::own(d, 0, 0, 0o755);
    }
    unprivileged::own(&data, IMAGE_UID, IMAGE_UID, 0o700);
    let (proxy, admin, metrics) = (
        support::free_port(),
        support::free_port(),
        support::free_port(),
    );
    let mut config = read(&deploy("container/keygate.toml"))
        .replace("/etc/keygate", etc.to_str().unwrap())
        .replace("/var/lib/keygate", data.to_str().unwrap())
        .replace(":8080\"", &format!(":{proxy}\""))
        .replace(":9901\"", &format!(":{admin}\""))
        .replace(":9902\"", &format!(":{metrics}\""));
    if admin_tls {
        std::fs::create_dir_all(etc.join("tls")).unwrap();
        let tls = TlsFiles::generate(&etc.join("tls"));
        unprivileged::own(&etc.join("tls"), 0, 0, 0o755);
        unprivileged::own(&tls.cert, 0, 0, 0o644);
        unprivileged::own(&tls.key, IMAGE_UID, 0, 0o600);
        config.push_str(&format!(
            "\n[admin.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            tls.cert.display(),
            tls.key.display()
        ));
    }
    let config_path = etc.join("keygate.toml");
    std::fs::write(&config_path, config).unwrap();
    unprivileged::own(&config_path, 0, 0, 0o644);
    // deploy/README.md: `chmod 600 secrets/* && sudo chown 65532 secrets/*`.
    std::fs::write(
        secrets.join("master-key"),
        "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n",
    )
    .unwrap();
    std::fs::write(
        secrets.join("admin-token"),
        "image-admin-token-0123456789\n",
    )
    .unwrap();
    for f in ["master-key", "admin-token"] {
        unprivileged::own(&secrets.join(f), IMAGE_UID, 0, 0o600);
    }
    let keygate = || {
        let mut c = unprivileged::command(IMAGE_UID, IMAGE_UID, bin);
        c.current_dir(r)
            .env_remove("KEYGATE_MASTER_KEY")
            .env_remove("KEYGATE_ADMIN_TOKEN")
            .env_remove("KEYGATE_ADMIN_CA_FILE")
            .env_remove("CREDENTIALS_DIRECTORY");
        c
    };
    let checked = keygate()
        .arg("check-config")
        .arg(&config_path)
        .output()
        .unwrap();
    assert!(
        checked.status.success(),
        "check-config: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let log_path = r.join("keygate.log");
    let log = std::fs::File::create(&log_path).unwrap();
    // The image's CMD.
    let mut child = keygate()
        .args(["serve", "--config"])
        .arg(&config_path)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    // The HEALTHCHECK's command, retried as the engine does within its start period.
    let health = || {
        let out = keygate()
            .args(["health", "--config"])
            .arg(&config_path)
            .output()
            .unwrap();
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let (mut code, mut said) = health();
    while code != Some(0) {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("keygate exited {status}: {}", log());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never healthy: {said}\n{}",
            log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
        (code, said) = health();
    }
    let scheme = if admin_tls { "https" } else { "http" };
    assert_eq!(
        said.trim(),
        format!("{scheme}://127.0.0.1:{admin}/healthz: 200")
    );
    if admin_tls {
        // What the HEALTHCHECK ran before: a fixed http:// URL, never healthy under TLS.
        let old = keygate()
            .args([
                "health",
                "--url",
                &format!("http://127.0.0.1:{admin}/healthz"),
            ])
            .status()
            .unwrap();
        assert_eq!(old.code(), Some(1));
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    // How it stops is tests/deploy.rs's (systemd) and tests/lifecycle's concern; a SIGTERM
    // this early may land before the gateway's handlers are set.
    let status = child.wait().unwrap();
    eprintln!("stopped: {status}");
}

#[test]
fn the_image_starts_healthy_on_its_own_config_with_only_the_documented_secrets() {
    run_the_image(false);
}

#[test]
fn the_image_health_check_follows_admin_tls() {
    run_the_image(true);
}

#[test]
fn dockerignore_keeps_what_the_build_needs_and_drops_the_rest() {
    let patterns: Vec<String> = read(&repo_root().join(".dockerignore"))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/').to_owned())
        .collect();
    let ignored = |path: &str| {
        patterns.iter().any(|p| {
            let p = p.trim_start_matches("**/");
            path == p
                || path.starts_with(&format!("{p}/"))
                || (p.starts_with("*.") && path.ends_with(&p[1..]))
        })
    };
    for gone in [
        "target",
        ".git",
        "fuzz/target",
        "fuzz/corpus",
        "data",
        "deploy/secrets",
    ] {
        assert!(ignored(gone), "{gone} is sent to the build");
    }
    // Everything cargo reads to build the binary, and the config the image copies.
    for kept in [
        "Cargo.toml",
        "Cargo.lock",
        "src/main.rs",
        "src/lib.rs",
        "benches/verify.rs",
        "examples",
        "deploy/container/keygate.toml",
        "config/keygate.toml",
        "docs/metrics.md",
        "tests/fixtures/signing.json",
        "vendor/pingora-core/Cargo.toml",
        "vendor/pingora-core/src/lib.rs",
    ] {
        assert!(!ignored(kept), "{kept} is left out of the build");
        assert!(repo_root().join(kept).exists(), "{kept}");
    }
}

/// The `keygate-*` services of the compose file.
fn gateways(compose: &Yaml) -> Vec<(&str, &Yaml)> {
    let services = compose["services"].as_mapping().unwrap();
    let out: Vec<(&str, &Yaml)> = services
        .iter()
        .map(|(k, v)| (s(k), v))
        .filter(|(k, _)| k.starts_with("keygate-"))
        .collect();
    assert_eq!(out.len(), 2, "two gateways");
    out
}

#[test]
fn compose_runs_two_gateways_on_one_redis_with_secrets_as_files() {
    let compose = yaml("compose.yaml");
    let services = &compose["services"];
    let config_text = read(&deploy("compose/keygate.toml"));
    check_config(&config_text, "deploy/compose/keygate.toml");
    let f = facts(&config_text);

    // Both gateways: the same image, config, secrets; non-root, read-only, no capabilities.
    for (name, gw) in gateways(&compose) {
        assert_eq!(s(&gw["build"]["dockerfile"]), "deploy/Containerfile");
        assert_eq!(gw["read_only"], Yaml::Bool(true), "{name}");
        assert_ne!(s(&gw["user"]).split(':').next(), Some("0"));
        assert_eq!(s(&gw["cap_drop"][0]), "ALL");
        let mounts: Vec<&str> = gw["volumes"].as_sequence().unwrap().iter().map(s).collect();
        assert!(
            mounts.contains(&"./compose/keygate.toml:/etc/keygate/keygate.toml:ro"),
            "{mounts:?}"
        );
        let cmd: Vec<&str> = gw["command"].as_sequence().unwrap().iter().map(s).collect();
        assert_eq!(cmd, ["serve", "--config", "/etc/keygate/keygate.toml"]);
        let targets: BTreeSet<&str> = gw["secrets"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|x| s(&x["target"]))
            .collect();
        assert_eq!(
            targets,
            BTreeSet::from([f.master_key_file.as_str(), f.admin_token_file.as_str()])
        );
        for x in gw["secrets"].as_sequence().unwrap() {
            let source = s(&x["source"]);
            assert!(
                compose["secrets"][source]["file"].is_string(),
                "secret {source} is a file"
            );
        }
        let grace = humantime::parse_duration(s(&gw["stop_grace_period"])).unwrap();
        assert!(grace.as_secs() > f.shutdown_grace_s, "{name}: stop grace");
        // Only loopback on the host: the proxy, and the admin port of one gateway.
        for p in gw["ports"].as_sequence().unwrap() {
            let p = s(p);
            assert!(p.starts_with("127.0.0.1:"), "{name}: {p}");
            let inside: u16 = p.rsplit(':').next().unwrap().parse().unwrap();
            assert!([f.proxy_port, f.admin_port].contains(&inside), "{p}");
            assert_ne!(inside, f.metrics_port);
        }
    }
    // No secret is an environment value anywhere.
    let text = read(&deploy("compose.yaml"));
    for var in ["KEYGATE_MASTER_KEY", "KEYGATE_ADMIN_TOKEN"] {
        assert!(!text.contains(var), "{var} in compose.yaml");
    }

    // One Redis for both; the upstream is the echo service.
    let url = f.table["store"]["url"].as_str().unwrap();
    assert_eq!(url, "redis://redis:6379");
    assert!(services["redis"]["image"]
        .as_str()
        .unwrap()
        .contains("redis:"));
    assert!(services["redis"]["healthcheck"].is_mapping());
    let endpoint = f.table["upstreams"][0]["endpoints"][0].as_str().unwrap();
    let (host, port) = endpoint.split_once(':').unwrap();
    assert_eq!(host, "echo");
    assert_eq!(s(&services["echo"]["environment"]["HTTP_PORT"]), port);

    // Prometheus scrapes both gateways' metrics listeners and loads the alert rules.
    let prom = yaml("prometheus/prometheus.yml");
    let targets: BTreeSet<&str> = prom["scrape_configs"][0]["static_configs"][0]["targets"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(s)
        .collect();
    let expected: BTreeSet<String> = gateways(&compose)
        .iter()
        .map(|(name, _)| format!("{name}:{}", f.metrics_port))
        .collect();
    assert_eq!(
        targets,
        expected.iter().map(String::as_str).collect::<BTreeSet<_>>()
    );
    assert_eq!(s(&prom["rule_files"][0]), "alerts.yaml");
    let prom_mounts: Vec<&str> = services["prometheus"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(s)
        .collect();
    assert!(prom_mounts.contains(&"./prometheus/alerts.yaml:/etc/prometheus/alerts.yaml:ro"));
    assert!(prom_mounts.contains(&"./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro"));

    // Grafana: the data source is this Prometheus, and the dashboard sits where the provider
    // looks.
    let grafana_mounts: Vec<&str> = services["grafana"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(s)
        .collect();
    assert!(grafana_mounts.contains(&"./grafana/provisioning:/etc/grafana/provisioning:ro"));
    let provider = yaml("grafana/provisioning/dashboards/keygate.yaml");
    let dash_dir = s(&provider["providers"][0]["options"]["path"]);
    assert!(grafana_mounts
        .contains(&format!("./grafana/keygate.json:{dash_dir}/keygate.json:ro").as_str()));
    let ds = yaml("grafana/provisioning/datasources/prometheus.yaml");
    assert_eq!(s(&ds["datasources"][0]["url"]), "http://prometheus:9090");
    for rel in mounts_sources(&compose) {
        assert!(
            deploy(&rel).exists(),
            "compose mounts {rel}, which is not there"
        );
    }
}

/// Every `./…` host path compose mounts or reads a secret from (relative to `deploy/`).
fn mounts_sources(compose: &Yaml) -> Vec<String> {
    let mut out = Vec::new();
    for (_, svc) in compose["services"].as_mapping().unwrap() {
        for v in svc["volumes"].as_sequence().into_iter().flatten() {
            if let Some(rel) = s(v).strip_prefix("./") {
                out.push(rel.split(':').next().unwrap().to_owned());
            }
        }
    }
    out
}

/// Every document of the Kubernetes manifests (kustomization resources, the Secret's shape and
/// the ServiceMonitor), by kind and name.
fn manifests() -> Vec<Yaml> {
    let kustomization = yaml("kubernetes/kustomization.yaml");
    let mut docs = Vec::new();
    let resources: Vec<&str> = kustomization["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(s)
        .collect();
    for r in resources
        .iter()
        .chain(["secret.example.yaml", "servicemonitor.yaml"].iter())
    {
        docs.extend(yaml_docs(&deploy(&format!("kubernetes/{r}"))));
    }
    // Every file of the folder is either a resource or one of the two applied by hand.
    for f in files_under(&deploy("kubernetes"), &[".yaml"]) {
        let name = f.file_name().unwrap().to_str().unwrap().to_owned();
        assert!(
            name == "kustomization.yaml"
                || resources.contains(&name.as_str())
                || ["secret.example.yaml", "servicemonitor.yaml"].contains(&name.as_str()),
            "{name} is in no list"
        );
    }
    docs
}

/// A Kubernetes memory quantity in MiB (`512Mi`, `1Gi`).
fn mebibytes(q: &str) -> u64 {
    if let Some(m) = q.strip_suffix("Mi") {
        m.parse().unwrap()
    } else if let Some(g) = q.strip_suffix("Gi") {
        g.parse::<u64>().unwrap() * 1024
    } else {
        panic!("memory limit {q}: write it in Mi or Gi")
    }
}

fn find<'a>(docs: &'a [Yaml], kind: &str, name: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| d["kind"] == *kind && d["metadata"]["name"] == *name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn the_kubernetes_manifests_match_the_binary() {
    let docs = manifests();
    // The ConfigMap is generated from keygate.toml (a new name for every change).
    let kustomization = yaml("kubernetes/kustomization.yaml");
    let generator = &kustomization["configMapGenerator"][0];
    assert_eq!(s(&generator["name"]), "keygate-config");
    assert_eq!(s(&generator["files"][0]), "keygate.toml");
    let config_text = read(&deploy("kubernetes/keygate.toml"));
    check_config(&config_text, "deploy/kubernetes/keygate.toml");
    let f = facts(&config_text);
    let deployment = find(&docs, "Deployment", "keygate");
    let pod = &deployment["spec"]["template"]["spec"];
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(deployment["spec"]["selector"]["matchLabels"], *labels);
    let container = &pod["containers"][0];

    // Ports by name, as the config listens.
    let port = |name: &str| -> u16 {
        let p = container["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|p| p["name"] == *name)
            .unwrap_or_else(|| panic!("no port {name}"));
        u16::try_from(n(&p["containerPort"])).unwrap()
    };
    assert_eq!(port("proxy"), f.proxy_port);
    assert_eq!(port("admin"), f.admin_port);
    assert_eq!(port("metrics"), f.metrics_port);
    // Probes on the admin listener. Readiness is "can this pod serve" (not store health,
    // which fails on every pod at once), answered within the probe's timeout.
    assert_eq!(
        s(&container["readinessProbe"]["httpGet"]["path"]),
        "/readyz/serving"
    );
    assert!(n(&container["readinessProbe"]["timeoutSeconds"]) >= 3);
    assert_eq!(s(&container["readinessProbe"]["httpGet"]["port"]), "admin");
    assert_eq!(
        s(&container["livenessProbe"]["httpGet"]["path"]),
        "/healthz"
    );
    assert_eq!(s(&container["livenessProbe"]["httpGet"]["port"]), "admin");
    // A stopping pod: preStop pause, then SIGTERM and the grace; the kubelet waits for all of
    // it (and pingora's final second) before SIGKILL.
    let pause = n(&container["lifecycle"]["preStop"]["sleep"]["seconds"]);
    // The sleep action needs Kubernetes 1.30: said where an operator reads, not only in YAML.
    assert!(read(&deploy("README.md")).contains("**Kubernetes 1.30 or later**"));
    let termination = n(&pod["terminationGracePeriodSeconds"]);
    assert!(
        termination >= pause + f.shutdown_grace_s + 2,
        "terminationGracePeriodSeconds {termination} < {pause} + {} + 2",
        f.shutdown_grace_s
    );
    assert!(
        termination <= pause + f.shutdown_grace_s + 10,
        "needlessly long"
    );
    // Requests set; non-root, read-only, nothing to escalate.
    for r in ["cpu", "memory"] {
        assert!(container["resources"]["requests"][r].is_string(), "{r}");
    }
    // A memory limit, and a max_connections that fits in it: connections beyond what memory
    // holds get the pod OOM-killed instead of turned away (issue 25 item 7).
    let limit = mebibytes(s(&container["resources"]["limits"]["memory"]));
    let capacity = f
        .table
        .get("cache")
        .and_then(|c| c.get("capacity"))
        .map_or(100_000, |c| u64::try_from(c.as_integer().unwrap()).unwrap());
    let max_connections = f.table["server"]["max_connections"]
        .as_integer()
        .expect("the ConfigMap sizes server.max_connections for the memory limit");
    let allowed = keygate::sizing::connections_for_memory(limit * 1024 * 1024, capacity);
    assert!(
        usize::try_from(max_connections).unwrap() <= allowed,
        "max_connections {max_connections} > {allowed}, what {limit} MiB holds"
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], Yaml::Bool(true));
    assert_ne!(n(&pod["securityContext"]["runAsUser"]), 0);
    let sc = &container["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], Yaml::Bool(true));
    assert_eq!(sc["allowPrivilegeEscalation"], Yaml::Bool(false));
    assert_eq!(s(&sc["capabilities"]["drop"][0]), "ALL");

    // The config and secrets are mounted where the command and the config look.
    let args: Vec<&str> = container["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(s)
        .collect();
    let mount = |volume: &str| -> &Yaml {
        container["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| m["name"] == *volume)
            .unwrap_or_else(|| panic!("no mount of {volume}"))
    };
    assert_eq!(
        args,
        ["serve", "--config", s(&mount("config")["mountPath"])]
    );
    let volumes = pod["volumes"].as_sequence().unwrap();
    let volume = |name: &str| volumes.iter().find(|v| v["name"] == *name).unwrap();
    assert_eq!(s(&volume("config")["configMap"]["name"]), "keygate-config");
    let secret_volume = &volume("secrets")["secret"];
    let secret = find(&docs, "Secret", s(&secret_volume["secretName"]));
    let secret_keys: BTreeSet<&str> = secret["stringData"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(s)
        .collect();
    let dir = s(&mount("secrets")["mountPath"]);
    let mut files = BTreeSet::new();
    for item in secret_volume["items"].as_sequence().unwrap() {
        assert!(secret_keys.contains(s(&item["key"])), "{item:?}");
        files.insert(format!("{dir}/{}", s(&item["path"])));
    }
    assert_eq!(
        files,
        BTreeSet::from([f.master_key_file.clone(), f.admin_token_file])
    );
    // With fsGroup, the kubelet makes Secret files root-owned with the group's read bit; keygate
    // must accept that mode.
    let mode = u32::try_from(n(&secret_volume["defaultMode"])).unwrap();
    assert_eq!(mode, 0o440);
    assert!(pod["securityContext"]["fsGroup"].is_u64());
    assert!(keygate::keys::secret::private_mode(mode, 0));

    // Services: the proxy for clients, metrics for Prometheus; the admin port in none.
    let container_ports: BTreeSet<&str> = ["proxy", "admin", "metrics"].into();
    let mut exposed = BTreeSet::new();
    for svc in docs.iter().filter(|d| d["kind"] == *"Service") {
        for k in svc["spec"]["selector"].as_mapping().unwrap().keys() {
            assert_eq!(svc["spec"]["selector"][k], labels[k]);
        }
        for p in svc["spec"]["ports"].as_sequence().unwrap() {
            let target = s(&p["targetPort"]);
            assert!(container_ports.contains(target), "{target}");
            exposed.insert(target);
        }
    }
    assert_eq!(exposed, BTreeSet::from(["proxy", "metrics"]));
    let policy = find(&docs, "NetworkPolicy", "keygate");
    let mut allowed = BTreeSet::new();
    for rule in policy["spec"]["ingress"].as_sequence().unwrap() {
        for p in rule["ports"].as_sequence().unwrap() {
            allowed.insert(s(&p["port"]));
        }
    }
    assert_eq!(
        allowed,
        BTreeSet::from(["proxy", "metrics"]),
        "admin is not admitted"
    );
    assert_eq!(policy["spec"]["podSelector"]["matchLabels"], *labels);

    // Disruption budget, autoscaler, ServiceMonitor: aimed at this Deployment and Service.
    let pdb = find(&docs, "PodDisruptionBudget", "keygate");
    assert_eq!(pdb["spec"]["selector"]["matchLabels"], *labels);
    let replicas = n(&deployment["spec"]["replicas"]);
    assert!(n(&pdb["spec"]["minAvailable"]) < replicas);
    let hpa = find(&docs, "HorizontalPodAutoscaler", "keygate");
    assert_eq!(s(&hpa["spec"]["scaleTargetRef"]["kind"]), "Deployment");
    assert_eq!(s(&hpa["spec"]["scaleTargetRef"]["name"]), "keygate");
    assert!(n(&hpa["spec"]["minReplicas"]) >= 2);
    let monitor = find(&docs, "ServiceMonitor", "keygate");
    let metrics_svc = find(&docs, "Service", "keygate-metrics");
    for (k, v) in monitor["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .unwrap()
    {
        assert_eq!(metrics_svc["metadata"]["labels"][k], *v);
    }
    assert_eq!(s(&monitor["spec"]["endpoints"][0]["port"]), "metrics");
    // The job label Prometheus gives the gateway's series is the one KeygateDown selects on
    // (issue 25 item 7: the operator's default, the Service name keygate-metrics, matched none).
    let job_label = s(&monitor["spec"]["jobLabel"]);
    assert_eq!(
        s(&metrics_svc["metadata"]["labels"][job_label]),
        alert_job(),
        "the ServiceMonitor's job is not the one KeygateDown matches"
    );
    assert_eq!(s(&metrics_svc["spec"]["ports"][0]["name"]), "metrics");
}

/// `kubectl kustomize DIR` as YAML documents; `None` (with the reason printed) when kubectl is
/// not installed: a build machine need not have it (scripts/dev does not install it).
fn kustomize(dir: &Path) -> Option<Vec<Yaml>> {
    use serde::Deserialize;
    let out = match Command::new("kubectl")
        .args(["kustomize", &dir.display().to_string()])
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            eprintln!(
                "SKIPPED: kubectl is not installed ({e}); the kustomize output is not checked"
            );
            return None;
        }
    };
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    Some(
        serde_yaml::Deserializer::from_str(&text)
            .map(|d| Yaml::deserialize(d).unwrap())
            .filter(|v| !v.is_null())
            .collect(),
    )
}

/// The generated ConfigMap's name and its keygate.toml, and the name the Deployment mounts.
fn rendered_config(docs: &[Yaml]) -> (String, String, String) {
    let maps: Vec<&Yaml> = docs.iter().filter(|d| d["kind"] == *"ConfigMap").collect();
    assert_eq!(maps.len(), 1);
    let name = s(&maps[0]["metadata"]["name"]).to_owned();
    let text = s(&maps[0]["data"]["keygate.toml"]).to_owned();
    let deployment = docs
        .iter()
        .find(|d| d["kind"] == *"Deployment")
        .expect("a Deployment");
    let mounted = deployment["spec"]["template"]["spec"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == *"config")
        .map(|v| s(&v["configMap"]["name"]).to_owned())
        .unwrap();
    (name, text, mounted)
}

/// Issue 25 item 7: `keygate.toml` mounted with `subPath` from a fixed ConfigMap never saw an
/// update. The ConfigMap is generated with a hash of the file in its name and the Deployment
/// mounts that name, so a changed config is a changed pod template: the Deployment rolls.
#[test]
fn kustomize_gives_each_config_its_own_configmap_so_a_change_rolls_the_deployment() {
    let Some(docs) = kustomize(&deploy("kubernetes")) else {
        return;
    };
    let (name, text, mounted) = rendered_config(&docs);
    assert!(name.starts_with("keygate-config-"), "{name}");
    assert_eq!(
        mounted, name,
        "the Deployment mounts the generated ConfigMap"
    );
    assert_eq!(text, read(&deploy("kubernetes/keygate.toml")));
    for d in docs.iter().filter(|d| d["kind"] != *"Namespace") {
        assert_eq!(s(&d["metadata"]["namespace"]), "keygate", "{d:?}");
    }

    // The same manifests with one changed line: another name, and the Deployment follows it.
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(deploy("kubernetes")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    let changed = text.replace("max_connections = 2500", "max_connections = 2000");
    assert_ne!(changed, text);
    std::fs::write(dir.path().join("keygate.toml"), &changed).unwrap();
    let (name2, text2, mounted2) = rendered_config(&kustomize(dir.path()).unwrap());
    assert_ne!(name2, name, "a changed config gets a new ConfigMap name");
    assert_eq!(mounted2, name2);
    assert_eq!(text2, changed);
    eprintln!("config change: {name} -> {name2}; the Deployment's pod template changes with it");
}

/// Fails loudly, with the install command, when promtool is missing.
fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(deploy("prometheus"))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "promtool: {e}; install it with: sudo apt-get install -y prometheus \
                 (scripts/dev test does)"
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

/// The job `KeygateDown` selects on, from its `up{job="…"}` expression.
fn alert_job() -> String {
    let alerts = yaml("prometheus/alerts.yaml");
    let rule = alerts["groups"][0]["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|r| r["alert"] == *"KeygateDown")
        .unwrap();
    let expr = s(&rule["expr"]);
    let job = expr
        .split("job=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("KeygateDown has no job selector: {expr}"));
    job.to_owned()
}

/// Where the alert rules' `runbook_url`s start: a placeholder deploy/README.md says how to
/// replace once.
const RUNBOOK_BASE: &str = "https://keygate.example/docs";

#[test]
fn keygate_down_matches_the_job_of_every_shipped_scrape() {
    let job = alert_job();
    // Compose's Prometheus.
    let prom = yaml("prometheus/prometheus.yml");
    let jobs: Vec<&str> = prom["scrape_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| s(&c["job_name"]))
        .collect();
    assert_eq!(jobs, [job.as_str()]);
    // The Prometheus operator: checked in the_kubernetes_manifests_match_the_binary against
    // the ServiceMonitor's jobLabel; here that it is set at all.
    let monitor = yaml("kubernetes/servicemonitor.yaml");
    assert!(monitor["spec"]["jobLabel"].is_string());
}

#[test]
fn every_alert_has_a_firing_and_a_quiet_promtool_case() {
    let names: BTreeSet<String> = yaml("prometheus/alerts.yaml")["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap().iter())
        .map(|r| s(&r["alert"]).to_owned())
        .collect();
    let (mut firing, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    for case in yaml("prometheus/alerts.test.yaml")["tests"]
        .as_sequence()
        .unwrap()
    {
        for t in case["alert_rule_test"].as_sequence().unwrap() {
            let name = s(&t["alertname"]).to_owned();
            if t["exp_alerts"].as_sequence().unwrap().is_empty() {
                quiet.insert(name);
            } else {
                firing.insert(name);
            }
        }
    }
    assert_eq!(
        names.len(),
        13,
        "13 names, 14 rules (two severities of one)"
    );
    for name in &names {
        assert!(firing.contains(name), "no promtool case where {name} fires");
        assert!(
            quiet.contains(name),
            "no promtool case where {name} stays quiet"
        );
    }
}

#[test]
fn promtool_checks_the_rules_and_their_unit_tests_pass() {
    let rules = promtool(&["check", "rules", "alerts.yaml"]);
    assert!(rules.contains("SUCCESS: 14 rules found"), "{rules}");
    promtool(&["check", "config", "prometheus.yml"]);
    let tests = promtool(&["test", "rules", "alerts.test.yaml"]);
    assert!(tests.contains("SUCCESS"), "{tests}");
    // Each alert has a runbook section in docs/operations.md.
    let ops = read(&repo_root().join("docs/operations.md")).to_lowercase();
    for group in yaml("prometheus/alerts.yaml")["groups"]
        .as_sequence()
        .unwrap()
    {
        for rule in group["rules"].as_sequence().unwrap() {
            let name = s(&rule["alert"]);
            // A URL an alert receiver can open (was a repository path).
            let url = s(&rule["annotations"]["runbook_url"]);
            assert_eq!(
                url,
                format!("{RUNBOOK_BASE}/operations.md#{}", name.to_lowercase())
            );
            assert!(
                ops.contains(&format!("### {}", name.to_lowercase())),
                "docs/operations.md has no section for {name}"
            );
        }
    }
}

/// Metric names in PromQL text (`keygate_…`), histogram suffixes removed.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("keygate_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        out.insert(base.to_owned());
        rest = &tail[end..];
    }
    out
}

/// Every `expr` string in a JSON document.
fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match x {
                    serde_json::Value::String(e) if k == "expr" => out.push(e.clone()),
                    _ => exprs(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| exprs(x, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_alerts_use_only_metrics_the_binary_exports() {
    // A gateway with a TLS listener, a rate-limited route and a metered key, driven through
    // each outcome the panels show, then scraped.
    let dir = tempfile::tempdir().unwrap();
    let tls = TlsFiles::generate(dir.path());
    let echo = Echo::start().await;
    let mut opts = Options::new(&echo);
    opts.server_extra = format!(
        "\n[server.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        tls.cert.display().to_string(),
        tls.key.display().to_string()
    );
    let gw = Gateway::start(opts).await;
    let https = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&tls.ca).unwrap()).unwrap(),
        )
        .build()
        .unwrap();
    let limited = gw
        .mint(json!({"rate_limits": [{"name": "burst", "limit": 1, "window": "1m"}]}))
        .await;
    let broke = gw.mint(json!({"remaining": 0})).await;
    let mut seen = Vec::new();
    for key in [&limited, &limited, &broke] {
        let nonce = uuid::Uuid::new_v4().to_string();
        let h = support::v1_headers(key, "POST", "/v1/payments", b"{}", support::now(), &nonce);
        let mut req = https
            .post(format!("https://localhost:{}/v1/payments", gw.proxy.port()))
            .body("{}");
        for (k, v) in &h {
            req = req.header(k.as_str(), v.as_str());
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        seen.push((status, body["code"].as_str().unwrap_or("ok").to_owned()));
    }
    assert_eq!(
        seen,
        [
            (200, "ok".to_owned()),
            (429, "rate_limited".to_owned()),
            (429, "quota_exhausted".to_owned())
        ]
    );
    let scrape = gw.metrics_text().await;
    let exported: BTreeSet<String> = scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .flat_map(metric_names)
        .collect();

    let dashboard: serde_json::Value =
        serde_json::from_str(&read(&deploy("grafana/keygate.json"))).unwrap();
    let mut dash_exprs = Vec::new();
    exprs(&dashboard, &mut dash_exprs);
    let alerts = yaml("prometheus/alerts.yaml");
    let alert_exprs: Vec<String> = alerts["groups"][0]["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| s(&r["expr"]).to_owned())
        .collect();
    let mut used = BTreeSet::new();
    for (what, list) in [("dashboard", &dash_exprs), ("alerts", &alert_exprs)] {
        for e in list {
            for name in metric_names(e) {
                assert!(
                    exported.contains(&name),
                    "{what} uses {name}, which the binary does not export:\n{e}\nexported: {exported:?}"
                );
                used.insert(name);
            }
        }
    }
    // What the dashboard must show (the list), by the metric behind each.
    let dash_used: BTreeSet<String> = dash_exprs.iter().flat_map(|e| metric_names(e)).collect();
    for needed in [
        "keygate_requests_total",
        "keygate_auth_duration_seconds",
        "keygate_upstream_duration_seconds",
        "keygate_key_cache_requests_total",
        "keygate_store_errors_total",
        "keygate_ready",
        "keygate_change_feed_lag_seconds",
        "keygate_rate_limited_total",
        "keygate_tls_certificate_expiry_timestamp_seconds",
    ] {
        assert!(
            dash_used.contains(needed),
            "the dashboard has no panel on {needed}"
        );
    }
    eprintln!(
        "{} dashboard and {} alert expressions use {} metrics, all in a real scrape",
        dash_exprs.len(),
        alert_exprs.len(),
        used.len()
    );
}
