//! OpenTelemetry for the trace tests: a `tracing-opentelemetry` layer exporting to an in-memory exporter,
//! installed once as the process's global subscriber, and lookups of what it exported.

use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::trace::{SpanId, TraceContextExt, TraceId, TracerProvider};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

struct Installed {
    exporter: InMemorySpanExporter,
    // Kept alive: dropping the provider shuts its exporter down.
    _provider: SdkTracerProvider,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

/// Installs the layer as the global subscriber, once per process; every span from then on is exported.
///
/// # Panics
/// When another global subscriber was installed first.
pub fn install() {
    INSTALLED.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("mqrpc-tests"));
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
            .expect("no other global subscriber is installed");
        Installed { exporter, _provider: provider }
    });
}

/// The trace id OpenTelemetry gave `span`.
///
/// # Panics
/// Before [`install`], or for a disabled span.
pub fn trace_id(span: &tracing::Span) -> TraceId {
    let trace_id = span.context().span().span_context().trace_id();
    assert_ne!(trace_id, TraceId::INVALID, "the span is not recorded: call `otel::install` first");
    trace_id
}

/// Extends a `tracing` span with the id OpenTelemetry gave it.
pub trait SpanIdExt {
    /// The span's OpenTelemetry span id.
    fn context_id(&self) -> SpanId;
}

impl SpanIdExt for tracing::Span {
    fn context_id(&self) -> SpanId {
        self.context().span().span_context().span_id()
    }
}

/// The spans of `trace` exported so far.
pub fn spans_of(trace: TraceId) -> Vec<SpanData> {
    let installed = INSTALLED.get().expect("otel::install was called");
    let spans = installed.exporter.get_finished_spans().expect("the in-memory exporter answers");
    spans.into_iter().filter(|span| span.span_context.trace_id() == trace).collect()
}

/// Waits until `trace` has `count` spans ended (a worker's span ends after its reply left), for up to `limit`.
///
/// # Panics
/// After `limit`, listing the spans seen.
pub async fn wait_for_spans(trace: TraceId, count: usize, limit: Duration) -> Vec<SpanData> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let spans = spans_of(trace);
        if spans.len() >= count {
            return spans;
        }
        let names: Vec<_> = spans.iter().map(|span| span.name.to_string()).collect();
        assert!(tokio::time::Instant::now() < deadline, "{} of {count} spans after {limit:?}: {names:?}", spans.len());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The value of attribute `key` of `span`, as a string.
pub fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.as_str().into_owned())
}

/// The span id in a `traceparent` header.
pub fn span_id_in(traceparent: &str) -> Option<SpanId> {
    rpc_core::trace::TraceParent::parse(traceparent).map(|parent| SpanId::from_bytes(parent.span_id))
}
