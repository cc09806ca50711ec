//! W3C trace context (`traceparent`): a valid one from the client is passed upstream, so
//! keygate joins the caller's trace; otherwise keygate starts one. Without span export the
//! client's header goes on as it came; with it (`[tracing]`), keygate's own span becomes the
//! upstream's parent. The trace id goes into the access log.

use std::fmt::Write as _;

use crate::otlp::{Otlp, RequestSpan};

/// A request's place in its trace.
pub struct Trace {
    /// The `traceparent` the upstream gets.
    pub traceparent: String,
    /// The client sent a valid `traceparent` (and its `tracestate` may go along; it belongs
    /// to that trace and is dropped otherwise).
    pub client: bool,
    /// keygate's span, when spans are exported.
    pub span: Option<RequestSpan>,
}

pub fn begin(sent: Option<&http::HeaderValue>, export: Option<&Otlp>, method: &str) -> Trace {
    let client = sent.and_then(|v| v.to_str().ok()).filter(|v| is_valid(v));
    match export {
        Some(otlp) => {
            let span = otlp.span(method, client, rand::random());
            Trace {
                traceparent: span.traceparent(),
                client: client.is_some(),
                span: Some(span),
            }
        }
        None => Trace {
            traceparent: client.map_or_else(start, str::to_owned),
            client: client.is_some(),
            span: None,
        },
    }
}

/// Without export: the upstream's `traceparent` and whether the client's was kept.
#[cfg(test)]
fn traceparent(sent: Option<&http::HeaderValue>) -> (String, bool) {
    let t = begin(sent, None, "GET");
    (t.traceparent, t.client)
}

/// The trace id of a `traceparent` this module made or checked.
pub fn trace_id(traceparent: &str) -> &str {
    traceparent.get(3..35).unwrap_or_default()
}

/// A new trace: random trace and parent ids, sampled flag set (keygate records every request
/// in its access log, so the trace is worth keeping downstream).
fn start() -> String {
    let (trace, parent): (u128, u64) = (rand::random(), rand::random());
    let mut out = String::with_capacity(55);
    // Writing to a String cannot fail; all-zero ids are invalid, so never send one.
    let _ = write!(out, "00-{:032x}-{:016x}-01", trace.max(1), parent.max(1));
    out
}

/// `version-traceid-parentid-flags` (W3C Trace Context §3.2): lowercase hex, ids not all
/// zero, version not `ff`; a future version may add fields after a `-`.
fn is_valid(v: &str) -> bool {
    let b = v.as_bytes();
    let hex = |s: &[u8]| s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let nonzero = |s: &[u8]| s.iter().any(|c| *c != b'0');
    if b.len() < 55 || !hex(&b[..2]) || &b[..2] == b"ff" {
        return false;
    }
    if &b[..2] == b"00" && b.len() != 55 {
        return false;
    }
    if b.len() > 55 && b[55] != b'-' {
        return false;
    }
    b[2] == b'-'
        && b[35] == b'-'
        && b[52] == b'-'
        && hex(&b[3..35])
        && nonzero(&b[3..35])
        && hex(&b[36..52])
        && nonzero(&b[36..52])
        && hex(&b[53..55])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_traceparent_is_kept_and_anything_else_replaced() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (tp, kept) = traceparent(Some(&http::HeaderValue::from_static(good)));
        assert_eq!((tp.as_str(), kept), (good, true));
        assert_eq!(trace_id(&tp), "4bf92f3577b34da6a3ce929d0e0e4736");
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "garbage",
        ] {
            let (tp, kept) = traceparent(Some(&http::HeaderValue::from_static(bad)));
            assert!(!kept, "{bad}");
            assert!(is_valid(&tp), "{tp}");
        }
        let (fresh, kept) = traceparent(None);
        assert!(!kept && is_valid(&fresh));
        assert_ne!(fresh, traceparent(None).0);
    }
}
