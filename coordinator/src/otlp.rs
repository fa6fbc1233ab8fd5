//! Export of the coordinator's participant-call spans to an OpenTelemetry collector over
//! OTLP/gRPC (`--otlp-endpoint`), behind the `otlp` cargo feature.
//!
//! Invariants kept here:
//! - Only `call` spans are exported, one per participant call: the short `txn` spans the
//!   shards enter for every event would each be a separate root. Each exported call span
//!   is put in the transaction's W3C trace, as a child of the span the transaction's
//!   trace context names (the initiator's, or the coordinator's new root), and the
//!   `traceparent` the call sends names the exported span, so the participant's spans
//!   hang under it.
//! - Export never blocks or fails a transaction: spans go through the SDK's batch
//!   processor (bounded queue, dropped when full), and an unreachable collector only
//!   costs log lines of the exporter's own.

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Subscriber;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::registry::LookupSpan;
use treaty_sdk::trace::TraceContext;

/// The name of the spans exported.
pub const CALL_SPAN: &str = "call";

/// Why export could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("OTLP exporter for {endpoint}: {message}")]
pub struct OtlpError {
    endpoint: String,
    message: String,
}

/// Flushes and stops the exporter when dropped (at the end of `main`).
#[derive(Debug)]
pub struct OtlpGuard {
    provider: SdkTracerProvider,
}

impl Drop for OtlpGuard {
    fn drop(&mut self) {
        if let Err(error) = self.provider.shutdown() {
            eprintln!("OTLP exporter did not shut down cleanly: {error}");
        }
    }
}

/// The layer that exports `call` spans to `endpoint` (`http://collector:4317`). Must be
/// called inside the tokio runtime: the exporter's tonic channel needs it.
pub fn layer<S>(endpoint: &str) -> Result<(Box<dyn Layer<S> + Send + Sync>, OtlpGuard), OtlpError>
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|error| OtlpError {
            endpoint: endpoint.to_string(),
            message: error.to_string(),
        })?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name("treaty-coordinator")
                .build(),
        )
        .build();
    let tracer = provider.tracer("treaty");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(tracing_subscriber::filter::filter_fn(|metadata| {
            // Events are kept too: inside a call span they become its span events.
            !metadata.is_span() || metadata.name() == CALL_SPAN
        }))
        .boxed();
    Ok((layer, OtlpGuard { provider }))
}

/// Puts the call `span` into `trace`'s W3C trace, under the span it names, and makes
/// `trace` name the exported span instead of a random one. Without the exporter layer
/// installed this changes nothing.
pub(crate) fn adopt(span: &tracing::Span, trace: &mut TraceContext) {
    let parent = trace.traceparent();
    let remote = SpanContext::new(
        TraceId::from_bytes(parent.trace_id()),
        SpanId::from_bytes(parent.parent_id()),
        TraceFlags::new(parent.flags()),
        true,
        TraceState::default(),
    );
    if span
        .set_parent(opentelemetry::Context::new().with_remote_span_context(remote))
        .is_err()
    {
        return;
    }
    let exported = span.context().span().span_context().span_id();
    if exported != SpanId::INVALID {
        if let Some(named) = trace.with_parent_id(exported.to_bytes()) {
            *trace = named;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_call_span_joins_the_transactions_trace_and_the_call_names_it() {
        // A provider without exporter still assigns ids to the spans it samples.
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let mut trace = TraceContext::parse(EXAMPLE, Some("congo=t61rcWkgMzE")).unwrap();
            let span = tracing::info_span!(CALL_SPAN);
            adopt(&span, &mut trace);
            let exported = span.context().span().span_context().clone();
            assert_eq!(
                exported.trace_id().to_bytes(),
                trace.traceparent().trace_id()
            );
            assert_eq!(trace.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
            assert_eq!(
                exported.span_id().to_bytes(),
                trace.traceparent().parent_id()
            );
            assert_ne!(trace.traceparent().parent_id_hex(), "00f067aa0ba902b7");
            assert_eq!(trace.tracestate(), Some("congo=t61rcWkgMzE"));
        });
    }

    #[test]
    fn without_the_exporter_the_call_keeps_its_own_span_id() {
        let mut trace = TraceContext::parse(EXAMPLE, None).unwrap();
        let before = trace.clone();
        adopt(&tracing::info_span!(CALL_SPAN), &mut trace);
        assert_eq!(trace, before);
    }
}
