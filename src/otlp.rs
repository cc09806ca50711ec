//! OTLP span export, off unless `tracing.otlp_endpoint` is set: one server span per proxied
//! request, a child of the client's `traceparent` when it sent one, whose id is the parent the
//! upstream sees. Export is the OpenTelemetry SDK's batch processor on its own thread (OTLP
//! over HTTP, protobuf), so a slow or dead collector costs the proxy nothing but dropped spans.

use std::time::SystemTime;

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId, TraceState,
    Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider, Span};
use opentelemetry_sdk::Resource;

use crate::config::TracingConfig;

/// The exporter and the tracer spans are started from.
pub struct Otlp {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OtlpError(String);

impl Otlp {
    /// `None` when no endpoint is configured. Must run outside an async runtime: the blocking
    /// HTTP client it builds owns one.
    pub fn start(config: &TracingConfig, service_name: &str) -> Result<Option<Self>, OtlpError> {
        let Some(endpoint) = &config.otlp_endpoint else {
            return Ok(None);
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint.as_str())
            .with_timeout(config.otlp_timeout)
            .build()
            .map_err(|e| OtlpError(e.to_string()))?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            // A client's sampled flag decides for its trace; the ratio for traces keygate starts.
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sample_ratio,
            ))))
            .with_resource(
                Resource::builder()
                    .with_service_name(service_name.to_owned())
                    .build(),
            )
            .build();
        let tracer = provider.tracer("keygate");
        Ok(Some(Self { provider, tracer }))
    }

    /// Starts a request's span under the client's `traceparent` (already validated), or as a
    /// new trace with `trace_id`.
    pub fn span(&self, method: &str, client: Option<&str>, trace_id: u128) -> RequestSpan {
        let parent = client.and_then(remote_parent);
        let cx = parent.map_or_else(Context::new, |sc| {
            Context::new().with_remote_span_context(sc)
        });
        let builder = self
            .tracer
            .span_builder(method.to_owned())
            .with_kind(SpanKind::Server)
            .with_trace_id(TraceId::from(trace_id.max(1)))
            .with_start_time(SystemTime::now());
        RequestSpan(self.tracer.build_with_context(builder, &cx))
    }

    /// Sends what is buffered and stops the export thread; call once, after serving ends.
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "OTLP export did not finish cleanly");
        }
    }
}

/// The span of one request; dropped without [`RequestSpan::end`] it still ends (now).
pub struct RequestSpan(Span);

/// What the access log says of a request, as span attributes (OpenTelemetry HTTP semantic
/// conventions where one exists).
pub struct Finished<'a> {
    pub route: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub outcome: &'a str,
    pub request_id: &'a str,
    pub key_id: Option<&'a str>,
    pub owner: Option<&'a str>,
    pub client_ip: Option<std::net::IpAddr>,
    pub upstream: Option<std::net::SocketAddr>,
    pub http_version: &'a str,
}

impl RequestSpan {
    /// The `traceparent` the upstream gets: this span is its parent.
    pub fn traceparent(&self) -> String {
        use opentelemetry::trace::Span as _;
        let sc = self.0.span_context();
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    }

    pub fn end(mut self, method: &str, f: &Finished<'_>) {
        use opentelemetry::trace::Span as _;
        if !self.0.is_recording() {
            return;
        }
        self.0.update_name(format!("{method} {}", f.route));
        let mut attrs = vec![
            KeyValue::new("http.request.method", method.to_owned()),
            KeyValue::new("url.path", f.path.to_owned()),
            KeyValue::new("http.response.status_code", i64::from(f.status)),
            KeyValue::new("network.protocol.version", f.http_version.to_owned()),
            KeyValue::new("keygate.route", f.route.to_owned()),
            KeyValue::new("keygate.outcome", f.outcome.to_owned()),
            KeyValue::new("keygate.request_id", f.request_id.to_owned()),
        ];
        if let Some(k) = f.key_id {
            attrs.push(KeyValue::new("keygate.key_id", k.to_owned()));
        }
        if let Some(o) = f.owner {
            attrs.push(KeyValue::new("keygate.owner", o.to_owned()));
        }
        if let Some(ip) = f.client_ip {
            attrs.push(KeyValue::new("client.address", ip.to_string()));
        }
        if let Some(u) = f.upstream {
            attrs.push(KeyValue::new("server.address", u.ip().to_string()));
            attrs.push(KeyValue::new("server.port", i64::from(u.port())));
        }
        self.0.set_attributes(attrs);
        // Server spans are errors on 5xx only (a 4xx is the client's doing, semconv says).
        if f.status >= 500 || f.status == 0 {
            self.0.set_status(Status::error(f.outcome.to_owned()));
        }
        self.0.end();
    }
}

/// The client's span as a remote parent; `traceparent` was validated by [`super::proxy`].
fn remote_parent(traceparent: &str) -> Option<SpanContext> {
    let trace = u128::from_str_radix(traceparent.get(3..35)?, 16).ok()?;
    let span = u64::from_str_radix(traceparent.get(36..52)?, 16).ok()?;
    let flags = u8::from_str_radix(traceparent.get(53..55)?, 16).ok()?;
    Some(SpanContext::new(
        TraceId::from(trace),
        SpanId::from(span),
        TraceFlags::new(flags),
        true,
        TraceState::NONE,
    ))
}
