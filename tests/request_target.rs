//! Which request-target bytes reach the upstream as the client sent them (issue 24): every
//! byte value, raw in the path and in the query, alone and beside a raw space, sent through
//! the real binary to an upstream that records its request line byte for byte. The table is
//! printed; the assertions hold keygate's rule (docs/errors.md, `bad_request`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use support::{routes_with, Echo, Gateway, Options};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An upstream that records each request line's target as raw bytes and answers 200.
struct LineRecorder {
    addr: SocketAddr,
    targets: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl LineRecorder {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let targets: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let record = Arc::clone(&targets);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let record = Arc::clone(&record);
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        let Ok(n) = s.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        head.extend_from_slice(&buf[..n]);
                        let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                            continue;
                        };
                        let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
                        let target = line
                            .splitn(2, |&b| b == b' ')
                            .nth(1)
                            .and_then(|rest| rest.strip_suffix(b" HTTP/1.1\r"))
                            .unwrap_or(line)
                            .to_vec();
                        record.lock().unwrap().push(target);
                        head.drain(..end + 4);
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                            .await;
                    }
                });
            }
        });
        Self { addr, targets }
    }

    fn take(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.targets.lock().unwrap())
    }
}

/// Where a byte goes: a name, the target before it, after it, and how the upstream should
/// see what is after it.
type Place = (&'static str, &'static [u8], &'static [u8], &'static [u8]);

/// What became of one target.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Fate {
    /// Reached the upstream byte for byte.
    Unaltered,
    /// Reached the upstream as other bytes.
    Altered(String),
    /// Refused with this status (and problem code, when keygate answered).
    Refused(u16, String),
    /// No answer at all (the line broke the request apart).
    Closed,
}

/// Sends `prefix byte suffix` as a target; what reached the upstream in the byte's place.
/// `suffix_seen`: how the upstream is expected to see the suffix.
async fn fate(
    gw: &Gateway,
    up: &LineRecorder,
    prefix: &[u8],
    b: u8,
    suffix: &[u8],
    suffix_seen: &[u8],
) -> Fate {
    up.take();
    let target = [prefix, &[b], suffix].concat();
    let request = [
        b"GET ".as_slice(),
        &target,
        b" HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n",
    ]
    .concat();
    let out = gw.raw(&request).await;
    let status: u16 = out
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let seen = up.take();
    match (status, seen.first()) {
        (200, Some(got)) => {
            let middle = got
                .strip_prefix(prefix)
                .and_then(|rest| rest.strip_suffix(suffix_seen));
            match middle {
                Some(m) if m == [b] => Fate::Unaltered,
                Some(m) => Fate::Altered(String::from_utf8_lossy(m).into_owned()),
                None => Fate::Altered(format!("whole target: {}", String::from_utf8_lossy(got))),
            }
        }
        (0, _) => Fate::Closed,
        (s, _) => {
            let code = out
                .split("\"code\":\"")
                .nth(1)
                .and_then(|c| c.split('"').next())
                .unwrap_or("(plain)")
                .to_owned();
            Fate::Refused(s, code)
        }
    }
}

fn show(b: u8) -> String {
    if b.is_ascii_graphic() {
        format!("{:?}", b as char)
    } else {
        format!("0x{b:02X}")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_bytes_the_parser_would_rewrite_are_refused_and_the_rest_pass_unaltered() {
    let echo = Echo::start().await;
    let up = LineRecorder::start().await;
    let extra = format!(
        "[[upstreams]]\nname = \"lines\"\nendpoints = [\"{}\"]\n\n[[routes]]\nname = \"lines\"\npath = \"/t/*\"\nupstream = \"lines\"\npublic = true\n",
        up.addr
    );
    let mut opts = Options::new(&echo);
    opts.routes = routes_with(echo.addr, &extra);
    let gw = Gateway::start(opts).await;

    // For each place: byte -> fate.
    let mut table: BTreeMap<&str, BTreeMap<u8, Fate>> = BTreeMap::new();
    for b in 0..=255u8 {
        let places: [Place; 4] = [
            ("path", b"/t/a", b"b", b"b"),
            ("query", b"/t/x?q=a", b"b", b"b"),
            ("path, beside a raw space", b"/t/a", b"b c", b"b%20c"),
            ("query, beside a raw space", b"/t/x?q=a", b"b c", b"b%20c"),
        ];
        for (place, prefix, suffix, seen) in places {
            let f = fate(&gw, &up, prefix, b, suffix, seen).await;
            table.entry(place).or_default().insert(b, f);
        }
    }
    // Printed grouped: fate -> bytes.
    for (place, fates) in &table {
        let mut by: BTreeMap<&Fate, Vec<String>> = BTreeMap::new();
        for (b, f) in fates {
            by.entry(f).or_default().push(show(*b));
        }
        println!("{place}:");
        for (f, bytes) in by {
            println!("  {f:?}: {}", bytes.join(" "));
        }
    }
    // Raw UTF-8 (é), alone and beside a raw space.
    let utf8: [Place; 3] = [
        ("path", b"/t/caf", b"\xA9", b"\xA9"),
        ("query", b"/t/x?q=caf", b"\xA9", b"\xA9"),
        (
            "query, beside a raw space",
            b"/t/x?q=caf",
            b"\xA9 c",
            b"%A9%20c",
        ),
    ];
    for (place, prefix, suffix, seen) in utf8 {
        let f = fate(&gw, &up, prefix, 0xC3, suffix, seen).await;
        println!("raw UTF-8 (\u{e9}, first byte 0xC3) in the {place}: {f:?}");
        assert_eq!(
            f,
            Fate::Refused(400, "bad_request".into()),
            "raw UTF-8 in the {place}"
        );
    }
    // Nothing reaches the upstream as other bytes than the client sent: what the parser would
    // percent-encode (a raw space, tab, CR, other controls, DEL, non-ASCII) is refused with
    // keygate's problem+json, before any key lookup (before: 401 bad_signature when signed,
    // and the encoded target forwarded on a public route).
    for (place, fates) in &table {
        for (b, f) in fates {
            assert!(
                !matches!(f, Fate::Altered(_)),
                "{} reaches the upstream altered in the {place}: {f:?}",
                show(*b)
            );
        }
        for b in [b' ', b'\t', b'\r', 0x01, 0x7F] {
            assert_eq!(
                fates[&b],
                Fate::Refused(400, "bad_request".into()),
                "{} in the {place}",
                show(b)
            );
        }
        // Bytes that are not UTF-8 at all the parser refuses itself (a bare 400).
        for b in [0x80, 0xC3, 0xFF] {
            assert!(
                matches!(fates[&b], Fate::Refused(400, _)),
                "{} in the {place}: {:?}",
                show(b),
                fates[&b]
            );
        }
    }

    // A raw '#' is refused by keygate wherever it is: the parser would drop it and all after.
    for (place, fates) in &table {
        assert_eq!(
            fates[&b'#'],
            Fate::Refused(400, "bad_request".into()),
            "'#' in the {place}"
        );
    }
    // What passes unaltered is RFC 3986's pchar/query set plus `[ ] \ ^ ` { | }` (sent raw
    // by real clients, e.g. `y=[1]`, and forwarded as sent): never a byte the parser rewrites.
    let tolerated = b"[]\\^`{|}";
    for (place, fates) in &table {
        for (b, f) in fates {
            if *f == Fate::Unaltered {
                assert!(
                    b.is_ascii_alphanumeric()
                        || b"-._~!$&'()*+,;=:@/?%".contains(b)
                        || tolerated.contains(b)
                        || (*b == b'"' && !place.contains("space")),
                    "{} passes unaltered in the {place}",
                    show(*b)
                );
            }
        }
    }
    assert_eq!(echo.count(), 0);
}

/// A signed request whose target holds a raw space, as Go's net/http writes `?q=a b`: refused
/// with 400 `bad_request` naming the problem, before any key lookup — an unknown key gets the
/// same answer. Before, the parser percent-encoded the space and the signature over the raw
/// bytes failed (401 `bad_signature`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_target_with_a_raw_space_is_400_not_bad_signature() {
    let echo = Echo::start().await;
    let gw = Gateway::start(Options::new(&echo)).await;
    let key = gw
        .mint(serde_json::json!({"scopes": ["payments.read"]}))
        .await;
    let mut unknown = key.clone();
    unknown.public_key = format!("{}x", &key.public_key[..key.public_key.len() - 1]);
    for (k, label) in [(&key, "known key"), (&unknown, "unknown key")] {
        let target = "/v1/payments/1?q=a b";
        let mut head = format!("GET {target} HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n");
        for (name, value) in support::v1_headers(k, "GET", target, b"", support::now(), "raw-space")
        {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let out = gw.raw(head.as_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 400"), "{label}: {out}");
        assert!(out.contains("\"code\":\"bad_request\""), "{label}: {out}");
        assert!(out.contains("percent-encoded"), "{label}: {out}");
    }
    assert_eq!(echo.count(), 0);
}
