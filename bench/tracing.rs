//! The `embedded-otel` variant: `embedded` with an OpenTelemetry layer recording every span the calls make.
//!
//! Every process of a run (this one and the responders and brokers it starts) has one subscriber, installed
//! first thing: a `tracing` registry with a reloadable layer, empty (so tracing's maximum level is off and
//! every span is disabled at its call site) except while `embedded-otel` runs, when it holds a
//! `tracing-opentelemetry` layer whose SDK samples every trace and hands the spans to a batch processor that
//! discards them: the cost of making and recording the spans, without an exporter's network I/O.
//!
//! A subscriber is installed in every run, whatever its variants, because without one a program pays for
//! tracing's `log` compatibility: tarpc, linked here for its variant, turns on `tracing`'s `log` feature, and
//! with it every disabled span of every call is offered to the `log` crate while no subscriber is set (about
//! 450 instructions per embedded call). A program that uses `tracing` sets a subscriber; one that does not
//! use it, and links nothing that turns the feature on, pays nothing either way.

use std::sync::OnceLock;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, SpanData, SpanExporter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::{Registry, reload};

type Layer = tracing_opentelemetry::OpenTelemetryLayer<Registry, SdkTracer>;

struct Switch {
    handle: reload::Handle<Option<Layer>, Registry>,
    /// Made when `embedded-otel` first runs: its batch processor has a thread of its own.
    provider: OnceLock<SdkTracerProvider>,
}

static SWITCH: OnceLock<Switch> = OnceLock::new();

/// Drops what it is given.
#[derive(Debug)]
struct Discard;

impl SpanExporter for Discard {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        drop(batch);
        Ok(())
    }
}

/// Installs the switchable subscriber, off, as this process's global one.
pub(crate) fn install() -> Result<(), String> {
    let (layer, handle) = reload::Layer::new(None::<Layer>);
    tracing::subscriber::set_global_default(Registry::default().with(layer))
        .map_err(|error| format!("cannot install the subscriber: {error}"))?;
    SWITCH.set(Switch { handle, provider: OnceLock::new() }).map_err(|_| "installed twice".to_owned())?;
    if tracing::level_filters::LevelFilter::current() != tracing::level_filters::LevelFilter::OFF {
        return Err("the subscriber left spans enabled while off".into());
    }
    Ok(())
}

/// Turns the OpenTelemetry layer on or off; off is nothing to do where the subscriber is not installed.
pub(crate) fn record(on: bool) -> Result<(), String> {
    let Some(switch) = SWITCH.get() else {
        return if on { Err("the subscriber is not installed".into()) } else { Ok(()) };
    };
    let layer = on.then(|| {
        let provider =
            switch.provider.get_or_init(|| SdkTracerProvider::builder().with_batch_exporter(Discard).build());
        tracing_opentelemetry::layer().with_tracer(provider.tracer("mqrpc-bench"))
    });
    switch.handle.reload(layer).map_err(|error| format!("cannot switch the layer: {error}"))
}
