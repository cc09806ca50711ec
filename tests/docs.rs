//! The documentation stands alone and tells the truth: the worked signing examples of
//! docs/signing.md are cases of the test vectors, its `openssl` recipe (and the one in
//! docs/clients.md) computes the same signature, and every relative link of the README, SECURITY.md, docs/ and deploy/ leads to a
//! file of the repository (nothing points outside it). The error-code table and the metrics
//! reference are held against the code by unit tests in `src/problem.rs` and `src/metrics.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use support::{files_under, repo_root};

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_root().join(rel)).unwrap()
}

fn vectors() -> Vec<Value> {
    let v: Value = serde_json::from_str(&read("tests/fixtures/signing.json")).unwrap();
    v["cases"].as_array().unwrap().clone()
}

fn case<'a>(cases: &'a [Value], note: &str) -> &'a Value {
    cases.iter().find(|c| c["note"] == note).unwrap()
}

#[test]
fn the_worked_signing_examples_are_test_vectors() {
    let doc = read("docs/signing.md");
    let cases = vectors();
    for note in ["json body", "GET with query, empty body"] {
        let c = case(&cases, note);
        for field in ["secret", "nonce", "target", "signature"] {
            let v = c[field].as_str().unwrap();
            assert!(doc.contains(v), "docs/signing.md lacks {note}: {field} {v}");
        }
        let sts = c["string_to_sign"].as_str().unwrap();
        assert!(
            doc.contains(&format!("```\n{sts}\n```")),
            "{note}: string to sign"
        );
    }
    let body = case(&cases, "numeric nonce, base64-looking secret used as text");
    for field in ["secret", "signature"] {
        assert!(
            doc.contains(body[field].as_str().unwrap()),
            "hmac-body {field}"
        );
    }
    let bearer = case(&cases, "bearer hash at rest");
    assert!(doc.contains(bearer["sha256"].as_str().unwrap()));
}

/// The shell recipes of docs/signing.md and docs/clients.md, run with the first vector's
/// secret, timestamp and nonce, compute its signature.
#[test]
fn the_openssl_recipes_sign_like_keygate() {
    let cases = vectors();
    let c = case(&cases, "json body");
    for (page, start) in [
        ("docs/signing.md", "```sh\nsecret="),
        ("docs/clients.md", "```sh\nts="),
    ] {
        let doc = read(page);
        let at = doc
            .find(start)
            .unwrap_or_else(|| panic!("{page}: no recipe"))
            + "```sh\n".len();
        let script = &doc[at..];
        let script = &script[..script.find("curl ").unwrap()];
        let script = script
            .replace(
                "ts=$(date +%s)",
                &format!("ts={}", c["timestamp"].as_str().unwrap()),
            )
            .replace(
                "nonce=$(cat /proc/sys/kernel/random/uuid)",
                &format!("nonce={}", c["nonce"].as_str().unwrap()),
            )
            .replace(
                "body='{\"amount\":\"10.00\"}'",
                "body='{\"amount\":\"10.00\",\"currency\":\"USDT\",\"order_id\":\"A-1001\"}'",
            );
        assert!(
            script.contains("openssl dgst -sha256 -hmac"),
            "{page}: {script}"
        );
        let out = Command::new("bash")
            .args(["-c", &format!("set -eu\n{script}\nprintf '%s' \"$sig\"")])
            .env("SECRET", c["secret"].as_str().unwrap())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{page}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            c["signature"].as_str().unwrap(),
            "{page}"
        );
    }
}

/// `](target)` links of a markdown text.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("](") {
        let tail = &rest[at + 2..];
        let end = tail.find(')').unwrap_or(tail.len());
        out.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

#[test]
fn every_link_of_the_docs_leads_inside_the_repository() {
    let root = repo_root();
    let mut pages = vec![root.join("README.md"), root.join("SECURITY.md")];
    pages.extend(files_under(&root.join("docs"), &[".md"]));
    pages.extend(files_under(&root.join("deploy"), &[".md"]));
    let mut checked = 0;
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        assert!(
            !text.contains("../shared") && !text.contains("SPEC.md"),
            "{} points at the specification outside the repository",
            page.display()
        );
        let dir = page.parent().unwrap();
        for link in links(&text) {
            if link.starts_with("http://") || link.starts_with("https://") || link.starts_with('#')
            {
                continue;
            }
            let file = link.split('#').next().unwrap();
            let target = dir.join(file);
            assert!(
                !escapes(&root, &target),
                "{}: the link {link} leads nowhere in the repository",
                page.display()
            );
            checked += 1;
        }
    }
    assert!(checked > 20, "{checked} links");
}

/// Whether `target` (joined from relative parts) leaves `root` once `..` is resolved.
fn escapes(root: &Path, target: &Path) -> bool {
    match target.canonicalize() {
        Ok(real) => !real.starts_with(root.canonicalize().unwrap()),
        Err(_) => true,
    }
}

#[test]
fn every_section_of_the_example_config_has_a_heading_in_the_configuration_reference() {
    // An operator looks a key up by its section's heading: a section without one is a key the
    // reference hides (the `[[upstreams]]` table once sat under `[assertion]`).
    let example: toml::Table = read("config/keygate.toml").parse().unwrap();
    let reference = read("docs/configuration.md");
    let headings: Vec<&str> = reference
        .lines()
        .filter(|l| l.starts_with("## ") || l.starts_with("### "))
        .collect();
    let mut missing = Vec::new();
    for (name, value) in &example {
        let heading = match value {
            toml::Value::Array(_) => format!("`[[{name}]]`"),
            _ => format!("`[{name}]`"),
        };
        if !headings.iter().any(|h| h.contains(&heading)) {
            missing.push(heading);
        }
    }
    assert!(example.len() >= 10, "the example config lost its sections");
    assert!(
        missing.is_empty(),
        "docs/configuration.md has no heading for {missing:?}"
    );
}

/// The first ```sh block after `heading` in the README.
fn readme_block(readme: &str, heading: &str) -> String {
    let section = readme.split(heading).nth(1).unwrap();
    let block = section.split("```sh\n").nth(1).unwrap();
    block.split("```").next().unwrap().to_string()
}

/// The README's "Running it for real" steps, run literally in a fresh copy of the repository's
/// config (no `data/` directory, no `KEYGATE_ADMIN_TOKEN` in the gateway's environment), with
/// the release build swapped for this build and the listeners moved to free ports; then the
/// README's own mint command, with the token exported as the README says, creates a key.
#[test]
fn the_readmes_running_it_for_real_steps_work_in_a_fresh_checkout() {
    let readme = read("README.md");
    let steps = readme_block(&readme, "## Running it for real");
    let dir = tempfile::tempdir().unwrap();
    let (proxy, admin, metrics) = (
        support::free_port(),
        support::free_port(),
        support::free_port(),
    );
    std::fs::create_dir_all(dir.path().join("config")).unwrap();
    let config = read("config/keygate.toml")
        .replace("0.0.0.0:8080", &format!("127.0.0.1:{proxy}"))
        .replace("127.0.0.1:9901", &format!("127.0.0.1:{admin}"))
        .replace("127.0.0.1:9902", &format!("127.0.0.1:{metrics}"));
    std::fs::write(dir.path().join("config/keygate.toml"), config).unwrap();
    let bin = env!("CARGO_BIN_EXE_keygate");
    let sh = |line: &str| {
        Command::new("sh")
            .args(["-ec", line])
            .current_dir(dir.path())
            .env_remove("KEYGATE_ADMIN_TOKEN")
            .env_remove("KEYGATE_MASTER_KEY")
            .output()
            .unwrap()
    };
    let mut gateway = None;
    for line in steps.lines().filter(|l| !l.trim().is_empty()) {
        let line = line.replace("target/release/keygate", bin);
        if line.starts_with("cargo build") {
            continue;
        }
        if line.contains(" serve ") {
            let cmd = line.split_whitespace().skip(1).collect::<Vec<_>>();
            let child = Command::new(bin)
                .args(&cmd)
                .current_dir(dir.path())
                .env_remove("KEYGATE_ADMIN_TOKEN")
                .env_remove("KEYGATE_MASTER_KEY")
                .stderr(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            gateway = Some(child);
            continue;
        }
        let out = sh(&line);
        assert!(
            out.status.success(),
            "README step `{line}` failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let gateway = gateway.expect("the README's steps start the gateway");

    assert!(
        readme.contains("export KEYGATE_ADMIN_TOKEN=$(cat data/admin.token)"),
        "the README says how to give the CLI the token"
    );
    let mint = readme_block(&readme, "Mint a key:").replace("9901", &admin.to_string());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let reply = loop {
        let out = sh(&format!(
            "export KEYGATE_ADMIN_TOKEN=$(cat data/admin.token)\n{mint}"
        ));
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() && text.contains("\"secret\"") {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the README's mint command never worked: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let key: Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(key["owner"], "acme", "{reply}");

    let _ = Command::new("kill")
        .args(["-TERM", &gateway.id().to_string()])
        .status();
    let out = gateway.wait_with_output().unwrap();
    let log =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        !log.contains("KEYGATE_ADMIN_TOKEN"),
        "the README's setup must not make keygate warn about its environment: {log}"
    );
}
