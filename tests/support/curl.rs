//! curl as the tests' HTTP client where the protocol matters: HTTP/1.1, h2c with prior
//! knowledge and h2 by ALPN, with any header a real client may send.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;

/// One curl exchange: the HTTP version used, the status, the response headers and body.
#[derive(Debug)]
pub struct Reply {
    pub version: String,
    pub status: u16,
    /// Response header lines, names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// curl's own complaint, if any: read only in failure messages (`Debug`).
    pub error: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    /// The first value of response header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The contract's problem+json with `code`, over HTTP/2.
    pub fn assert_problem(&self, status: u16, code: &str) {
        assert_eq!(
            (self.version.as_str(), self.status),
            ("2", status),
            "{self:?}"
        );
        assert_eq!(self.json()["code"], code, "{self:?}");
    }
}

/// Runs curl with `flags` (protocol and trust) on `url`.
pub async fn curl(
    flags: &[String],
    method: &str,
    url: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Reply {
    let dir = tempfile::tempdir().unwrap();
    let body_file = dir.path().join("body");
    let (out_file, head_file) = (dir.path().join("out"), dir.path().join("head"));
    std::fs::write(&body_file, body).unwrap();
    let mut cmd = std::process::Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "20",
        "-X",
        method,
        "-w",
        "%{http_version} %{http_code}",
        "-o",
    ])
    .arg(&out_file)
    .arg("-D")
    .arg(&head_file)
    .args(flags);
    if !body.is_empty() {
        cmd.arg("--data-binary")
            .arg(format!("@{}", body_file.display()));
        cmd.args(["-H", "content-type: application/json"]);
    }
    for (k, v) in headers {
        cmd.arg("-H").arg(format!("{k}: {v}"));
    }
    cmd.arg(url);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("curl is needed: apt-get install -y curl");
    let written = String::from_utf8_lossy(&out.stdout).to_string();
    let (version, status) = written.split_once(' ').unwrap_or(("", "0"));
    // The last response's header block (a 100 Continue comes first when asked for).
    let head = std::fs::read_to_string(&head_file).unwrap_or_default();
    let last = head
        .split("\r\n\r\n")
        .filter(|b| !b.trim().is_empty())
        .last()
        .unwrap_or_default();
    let headers = last
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Reply {
        version: version.to_owned(),
        status: status.parse().unwrap_or(0),
        headers,
        body: std::fs::read_to_string(&out_file).unwrap_or_default(),
        error: String::from_utf8_lossy(&out.stderr).to_string(),
    }
}
