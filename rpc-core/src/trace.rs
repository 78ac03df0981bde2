//! Trace context across the queue: W3C `traceparent` and `tracestate` in every call's headers, and the spans
//! that a call makes on its way.
//!
//! A call carries the [W3C trace context](https://www.w3.org/TR/trace-context/) as two envelope headers,
//! [`TRACEPARENT`] and [`TRACESTATE`]. The adapters put envelope headers in each broker's native place (AMQP
//! headers, NATS headers, Kafka record headers, STOMP headers), so a tracer that reads those sees the call too.
//!
//! The spans follow OpenTelemetry's semantic conventions for messaging and RPC, as `tracing` spans whose
//! fields are the attributes:
//!
//! | span | made by | `otel.kind` | name (`otel.name`) |
//! |---|---|---|---|
//! | `rpc.call` | a call, as it is awaited | `client` | `<service>/<method>` |
//! | `rpc.send` | a oneway call, a broadcast, a durable call | `producer` | `send <queue or topic>` |
//! | `rpc.handle` | a worker, for each delivery it runs; durable callbacks, for each reply | `server` (requests), `consumer` (oneway calls, replies) | `process <queue>` |
//!
//! With attributes `rpc.system` (`mqrpc`), `rpc.service`, `rpc.method`, `messaging.system` (the transport's
//! [`system`](crate::Transport::system)), `messaging.operation.type` (`send`, `process`),
//! `messaging.destination.name`, `messaging.message.id` (the envelope's id) and
//! `messaging.message.conversation_id` (the correlation id); a worker's span adds `mqrpc.attempt`, and a span
//! whose call failed `otel.status_code = "error"` and `error.type`.
//!
//! **With the `opentelemetry` feature** and a [`tracing-opentelemetry`](https://docs.rs/tracing-opentelemetry)
//! layer installed, a call's `traceparent` is its span's own context, and a worker's span takes the one it
//! receives as its parent: the client's call span is the parent of the worker's span, calls made inside a
//! handler are children of the handler's span, and each retry's span carries a link to the span of the attempt
//! before it (the retry's copy carries that attempt's context as [`RETRY_TRACEPARENT`]); a durable callback's
//! span is a child of the durable call's, whose context the reply echoes. A redelivery after a
//! worker died is another child of the same call span, with a higher `mqrpc.attempt`.
//!
//! **Without it**, or without such a layer, calls made inside a handler forward the trace context the handler's
//! request carried, unchanged (as W3C asks of a participant that records nothing), so the trace goes on
//! through the next service that does record. A `traceparent` the caller set as a header is sent as set.
//!
//! With no `tracing` subscriber at all, the spans are disabled and cost a check each.

use std::collections::BTreeMap;
use std::fmt;

use tracing::field::{Empty, display};
use uuid::Uuid;

use crate::envelope::{Envelope, Kind};
use crate::transport::Transport;

/// The header that carries the W3C `traceparent`.
pub const TRACEPARENT: &str = "traceparent";

/// The header that carries the W3C `tracestate`.
pub const TRACESTATE: &str = "tracestate";

/// The header a retry's copy carries: the `traceparent` of the attempt it follows, which the next attempt's
/// span links to.
pub const RETRY_TRACEPARENT: &str = "retry-traceparent";

/// The longest `tracestate` forwarded: W3C's 32 list members of at most 256 bytes fit in 512 bytes as
/// implementations truncate them; a longer one is dropped rather than cut in the middle of a member.
pub const MAX_TRACESTATE: usize = 512;

/// A W3C `traceparent`: which trace a call belongs to and which span is its parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceParent {
    /// The trace's id; never all zeros.
    pub trace_id: [u8; 16],
    /// The parent span's id; never all zeros.
    pub span_id: [u8; 8],
    /// The trace flags; bit 0 is "sampled".
    pub flags: u8,
}

impl TraceParent {
    /// Reads a `traceparent` header: version `00` exactly (`00-<32 hex>-<16 hex>-<2 hex>`), or a later
    /// version's first four fields (a later version may add fields after a `-`), lower-case hex; `None` for
    /// anything else, for version `ff`, and for an all-zero trace or span id, as the W3C specification asks.
    pub fn parse(header: &str) -> Option<TraceParent> {
        let bytes = header.as_bytes();
        if bytes.len() < 55 || bytes.len() > 512 {
            return None;
        }
        let version = hex::<1>(&bytes[0..2])?[0];
        if version == 0xff || (version == 0 && bytes.len() != 55) || (bytes.len() > 55 && bytes[55] != b'-') {
            return None;
        }
        if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return None;
        }
        let trace_id = hex::<16>(&bytes[3..35])?;
        let span_id = hex::<8>(&bytes[36..52])?;
        let flags = hex::<1>(&bytes[53..55])?[0];
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceParent { trace_id, span_id, flags })
    }

    /// Whether the caller recorded its span (flag bit 0).
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

/// The version `00` form: `00-<trace id>-<span id>-<flags>`.
impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("00-")?;
        self.trace_id.iter().try_for_each(|byte| write!(f, "{byte:02x}"))?;
        f.write_str("-")?;
        self.span_id.iter().try_for_each(|byte| write!(f, "{byte:02x}"))?;
        write!(f, "-{:02x}", self.flags)
    }
}

/// `N` bytes from `2 * N` lower-case hex digits.
fn hex<const N: usize>(digits: &[u8]) -> Option<[u8; N]> {
    fn nibble(digit: u8) -> Option<u8> {
        match digit {
            b'0'..=b'9' => Some(digit - b'0'),
            b'a'..=b'f' => Some(digit - b'a' + 10),
            _ => None,
        }
    }
    let mut out = [0; N];
    if digits.len() != 2 * N {
        return None;
    }
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// The span of a call, as it is awaited: the parent of the worker's span.
pub(crate) fn call_span(transport: &dyn Transport, service: &str, method: &str, correlation_id: Uuid) -> tracing::Span {
    tracing::info_span!(
        "rpc.call",
        otel.name = %format_args!("{service}/{method}"),
        otel.kind = "client",
        otel.status_code = Empty,
        "error.type" = Empty,
        rpc.system = "mqrpc",
        rpc.service = service,
        rpc.method = method,
        messaging.system = transport.system(),
        "messaging.operation.type" = "send",
        messaging.destination.name = Empty,
        messaging.message.id = Empty,
        messaging.message.conversation_id = %correlation_id,
    )
}

/// The span of a message sent with no reply to wait for: a oneway call, a broadcast, a durable call.
pub(crate) fn send_span(transport: &dyn Transport, service: &str, method: &str, destination: &str) -> tracing::Span {
    tracing::info_span!(
        "rpc.send",
        otel.name = %format_args!("send {destination}"),
        otel.kind = "producer",
        otel.status_code = Empty,
        "error.type" = Empty,
        rpc.system = "mqrpc",
        rpc.service = service,
        rpc.method = method,
        messaging.system = transport.system(),
        "messaging.operation.type" = "send",
        messaging.destination.name = destination,
        messaging.message.id = Empty,
        messaging.message.conversation_id = Empty,
    )
}

/// The span of a worker running one delivery of `envelope` from `destination`, a child of the caller's span
/// where the request carries its context.
pub(crate) fn process_span(
    transport: &dyn Transport,
    envelope: &Envelope,
    destination: &str,
    attempt: u32,
) -> tracing::Span {
    // A root in this process: a request handled on the thread that published it (an in-process transport)
    // is not a child of the call's span there, but continues its trace from the headers, as anywhere else.
    let span = tracing::info_span!(
        parent: None,
        "rpc.handle",
        otel.name = %format_args!("process {destination}"),
        otel.kind = if envelope.kind == Kind::Request { "server" } else { "consumer" },
        otel.status_code = Empty,
        "error.type" = Empty,
        rpc.system = "mqrpc",
        rpc.service = %envelope.service,
        rpc.method = %envelope.method,
        messaging.system = transport.system(),
        "messaging.operation.type" = "process",
        messaging.destination.name = destination,
        messaging.message.id = %envelope.id,
        messaging.message.conversation_id = envelope.correlation_id.map(display),
        mqrpc.attempt = attempt,
    );
    continue_from(&span, &envelope.headers);
    span
}

/// Records what a span's message became once it is known: its id and where it went.
pub(crate) fn sending(span: &tracing::Span, envelope: &Envelope, destination: &str) {
    if span.is_disabled() {
        return;
    }
    span.record("messaging.message.id", display(envelope.id));
    span.record("messaging.destination.name", destination);
    if let Some(correlation_id) = envelope.correlation_id {
        span.record("messaging.message.conversation_id", display(correlation_id));
    }
}

/// Puts the trace context of a call whose span is `span` in its request's `headers`: the span's own context
/// where an OpenTelemetry layer records it, else the context of the request being handled, forwarded. A
/// `traceparent` already in the headers (set by the caller) is left as it is.
pub(crate) fn inject(span: &tracing::Span, headers: &mut BTreeMap<String, String>) {
    if headers.contains_key(TRACEPARENT) {
        return;
    }
    #[cfg(feature = "opentelemetry")]
    if let Some((parent, state)) = otel::context_of(span) {
        headers.insert(TRACEPARENT.to_owned(), parent.to_string());
        if !state.is_empty() && state.len() <= MAX_TRACESTATE {
            headers.insert(TRACESTATE.to_owned(), state);
        }
        return;
    }
    let _ = span;
    crate::context::with_request(|request| {
        let Some(parent) = request.headers.get(TRACEPARENT).filter(|parent| TraceParent::parse(parent).is_some())
        else {
            return;
        };
        headers.insert(TRACEPARENT.to_owned(), parent.clone());
        if let Some(state) = request.headers.get(TRACESTATE).filter(|state| state.len() <= MAX_TRACESTATE) {
            headers.insert(TRACESTATE.to_owned(), state.clone());
        }
    });
}

/// Makes the trace context in a request's `headers` the parent of the worker's `span`, and links a retry's
/// span to the attempt before it. Does nothing without the `opentelemetry` feature or for a disabled span.
fn continue_from(span: &tracing::Span, headers: &BTreeMap<String, String>) {
    #[cfg(feature = "opentelemetry")]
    if !span.is_disabled() {
        otel::continue_from(span, headers);
    }
    let _ = (span, headers);
}

/// The `traceparent` of the current span, for a retry's copy to carry as [`RETRY_TRACEPARENT`]; `None` where no
/// OpenTelemetry layer records the span.
#[cfg(feature = "opentelemetry")]
pub(crate) fn current_for_link() -> Option<String> {
    otel::context_of(&tracing::Span::current()).map(|(parent, _)| parent.to_string())
}

/// Without the `opentelemetry` feature there is no span context to link to.
#[cfg(not(feature = "opentelemetry"))]
pub(crate) fn current_for_link() -> Option<String> {
    None
}

/// Marks `span` failed, with `kind` as its `error.type`.
pub(crate) fn failed(span: &tracing::Span, kind: &str) {
    span.record("otel.status_code", "error");
    span.record("error.type", kind);
}

#[cfg(feature = "opentelemetry")]
mod otel {
    use std::collections::BTreeMap;

    use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::{MAX_TRACESTATE, RETRY_TRACEPARENT, TRACEPARENT, TRACESTATE, TraceParent};

    /// The context of `span` as OpenTelemetry records it, with its `tracestate` header; `None` when no layer
    /// records the span.
    pub(super) fn context_of(span: &tracing::Span) -> Option<(TraceParent, String)> {
        if span.is_disabled() {
            return None;
        }
        let context = span.context();
        let span_ref = context.span();
        let span_context = span_ref.span_context();
        if !span_context.is_valid() {
            return None;
        }
        let parent = TraceParent {
            trace_id: span_context.trace_id().to_bytes(),
            span_id: span_context.span_id().to_bytes(),
            flags: span_context.trace_flags().to_u8(),
        };
        Some((parent, span_context.trace_state().header()))
    }

    fn remote(parent: TraceParent, state: Option<&String>) -> SpanContext {
        let state = state
            .filter(|state| state.len() <= MAX_TRACESTATE)
            .and_then(|state| state.parse::<TraceState>().ok())
            .unwrap_or_default();
        SpanContext::new(
            TraceId::from_bytes(parent.trace_id),
            SpanId::from_bytes(parent.span_id),
            TraceFlags::new(parent.flags),
            true,
            state,
        )
    }

    pub(super) fn continue_from(span: &tracing::Span, headers: &BTreeMap<String, String>) {
        if let Some(parent) = headers.get(TRACEPARENT).and_then(|header| TraceParent::parse(header)) {
            let context =
                opentelemetry::Context::new().with_remote_span_context(remote(parent, headers.get(TRACESTATE)));
            if let Err(error) = span.set_parent(context) {
                tracing::debug!(%error, "could not continue the caller's trace");
            }
        }
        if let Some(previous) = headers.get(RETRY_TRACEPARENT).and_then(|header| TraceParent::parse(header)) {
            span.add_link(remote(previous, None));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_specification_example_reads_and_writes_back_the_same() {
        let parent = TraceParent::parse(EXAMPLE).expect("the W3C example is a traceparent");
        assert_eq!(parent.trace_id[0], 0x4b);
        assert_eq!(parent.span_id[7], 0xb7);
        assert!(parent.sampled());
        assert_eq!(parent.to_string(), EXAMPLE);
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "0é-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?} was read");
        }
    }

    #[test]
    fn a_later_version_is_read_for_its_first_fields() {
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-what-comes-next";
        let parent = TraceParent::parse(later).expect("a later version is read");
        assert!(!parent.sampled());
        assert_eq!(TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00x"), None);
    }

    proptest::proptest! {
        #[test]
        fn every_traceparent_written_reads_back(trace in proptest::array::uniform16(1u8..), span in proptest::array::uniform8(1u8..), flags: u8) {
            let parent = TraceParent { trace_id: trace, span_id: span, flags };
            proptest::prop_assert_eq!(TraceParent::parse(&parent.to_string()), Some(parent));
        }

        #[test]
        fn no_string_makes_the_reader_panic(header in ".{0,80}") {
            let _ = TraceParent::parse(&header);
        }
    }
}
