//! How the services log and trace. Logs go to stderr, filtered by
//! `LLMOS_LOG` (an `EnvFilter`, e.g. `info,llmos_coordinator=debug`), as
//! text or as one JSON object per line (`--log-format json`, for log
//! pipelines). With `--otlp-endpoint URL` the request spans (coordinator:
//! `generate`, `attempt`; worker: `sequence`, and `step` on every stage)
//! also go to an OpenTelemetry collector over OTLP/HTTP (protobuf; `URL`
//! as `OTEL_EXPORTER_OTLP_ENDPOINT`, e.g. `http://collector:4318`, with
//! `/v1/traces` appended), batched (`OTEL_BSP_*` variables apply),
//! whatever `LLMOS_LOG` lets through.
//!
//! Trace context crosses processes as W3C `traceparent` strings: in gRPC
//! metadata and HTTP headers, and in each step's sequences (a step serves
//! many requests: its span is a child of its first sequence's and links to
//! every other's).

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Starts the process's logging; `format` is `text` or `json`.
pub fn init(format: &str, default_filter: &str) -> Result<(), String> {
    init_with_traces(format, default_filter, "llmos", None).map(std::mem::forget)
}

/// Flushes and stops the trace exporter when dropped (at the end of
/// `main`): spans still batched are sent.
#[must_use = "dropping the guard stops the trace exporter"]
pub struct Tracing {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Tracing {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            // The batch thread exports what it holds; a collector that is
            // gone costs its timeout, once.
            let _ = std::thread::spawn(move || p.shutdown()).join();
        }
    }
}

/// The URL spans are posted to for an OTLP/HTTP base URL.
fn traces_url(endpoint: &str) -> String {
    let e = endpoint.trim_end_matches('/');
    if e.ends_with("/v1/traces") {
        e.to_string()
    } else {
        format!("{e}/v1/traces")
    }
}

/// [`init`], and spans exported to `otlp_endpoint` (when given) as
/// `service` (the resource's `service.name`).
pub fn init_with_traces(
    format: &str,
    default_filter: &str,
    service: &str,
    otlp_endpoint: Option<&str>,
) -> Result<Tracing, String> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LLMOS_LOG")
        .unwrap_or_else(|_| default_filter.into());
    let fmt = match format {
        "text" => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        "json" => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        other => return Err(format!("--log-format {other:?}: text or json")),
    };
    let Some(endpoint) = otlp_endpoint.filter(|e| !e.is_empty()) else {
        tracing_subscriber::registry()
            .with(fmt)
            .try_init()
            .map_err(|e| e.to_string())?;
        return Ok(Tracing { provider: None });
    };
    if !endpoint.starts_with("http://") {
        return Err(format!(
            "--otlp-endpoint {endpoint:?}: give an http:// URL of an OTLP/HTTP collector (e.g. http://collector:4318); TLS is not supported"
        ));
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(traces_url(endpoint))
        .build()
        .map_err(|e| format!("--otlp-endpoint {endpoint}: {e}"))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service.to_string())
                .build(),
        )
        .build();
    let tracer = provider.tracer("llmos");
    // The request spans, whatever the log filter shows.
    let spans = tracing_subscriber::filter::Targets::new()
        .with_target("llmos_coordinator", tracing::Level::INFO)
        .with_target("llmos_worker", tracing::Level::INFO);
    tracing_subscriber::registry()
        .with(fmt)
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(spans),
        )
        .try_init()
        .map_err(|e| e.to_string())?;
    Ok(Tracing {
        provider: Some(provider),
    })
}

/// The W3C `traceparent` of `span`, if it is being traced.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = std::collections::HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent")
}

/// The span context a `traceparent` names (None: absent or malformed).
fn remote(traceparent: &str) -> Option<opentelemetry::Context> {
    let carrier =
        std::collections::HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// Makes `span` a child of the remote span `traceparent` names (a
/// malformed or absent one leaves it a root).
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(cx) = traceparent.and_then(remote) {
        let _ = span.set_parent(cx);
    }
}

/// Links `span` to the remote span `traceparent` names.
pub fn add_link(span: &tracing::Span, traceparent: &str) {
    if let Some(cx) = remote(traceparent) {
        span.add_link(cx.span().span_context().clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_parse_and_the_traces_url_is_otlps() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let cx = remote(tp).expect("valid");
        assert_eq!(
            cx.span().span_context().trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert!(remote("garbage").is_none());
        assert!(remote("00-00000000000000000000000000000000-b7ad6b7169203331-01").is_none());
        assert_eq!(traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(
            traces_url("http://c:4318/v1/traces/"),
            "http://c:4318/v1/traces"
        );
    }
}
