//! Observability: one trace across a client and two services, exported over OTLP/HTTP to Jaeger or any
//! OpenTelemetry collector, a ping of a service's workers, and the calls' metrics in the Prometheus text format.
//!
//! Start Jaeger, which takes OTLP/HTTP on port 4318 and shows traces on port 16686:
//!
//! ```text
//! docker run --rm -p 16686:16686 -p 4318:4318 jaegertracing/jaeger:latest
//! ```
//!
//! then, from the repository root:
//!
//! ```text
//! cargo run -p mqrpc-examples --features otlp --example observability
//! ```
//!
//! and open <http://localhost:16686>: service `mqrpc-observability`, the trace id it printed. The trace holds the
//! example's root span, the call `shop.Shop/order` and the worker's `process shop.Shop`, and in it the nested call
//! `Calculator/add` with its own worker span. `OTEL_EXPORTER_OTLP_ENDPOINT` names another collector (default
//! `http://localhost:4318`). Then the calculator's workers as a ping finds them, and last the metrics: the scrape
//! a Prometheus server would read.

use mqrpc_examples::calculator::{Calc, CalculatorClient, CalculatorServer};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use rpc_broker::Embedded;
use rpc_core::{Client, Server};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;

/// A shop whose orders are priced by the calculator: a call that makes a call.
#[rpc_core::service(name = "shop.Shop")]
pub trait Shop {
    /// The price of `count` items at `price` each.
    async fn order(&self, price: i64, count: i64) -> i64;
}

struct Shopkeeper {
    calculator: Client,
}

impl Shop for Shopkeeper {
    async fn order(&self, price: i64, count: i64) -> i64 {
        let calculator = CalculatorClient::new(&self.calculator);
        let mut total = 0;
        for _ in 0..count {
            // Each call is a child of this handler's span, in the caller's trace.
            total = calculator.add(total, price).await.unwrap_or(total);
        }
        total
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Metrics first: clients and servers register theirs when they start.
    let buckets = [0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new().set_buckets(&buckets)?.install_recorder()?;

    // The endpoint comes from OTEL_EXPORTER_OTLP_ENDPOINT when it is set.
    let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_http();
    if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_none() {
        exporter = exporter.with_endpoint("http://localhost:4318/v1/traces");
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter.build()?)
        .with_resource(Resource::builder().with_service_name("mqrpc-observability").build())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("mqrpc-observability")))
        .with(tracing_subscriber::fmt::layer().with_filter(tracing_subscriber::filter::LevelFilter::WARN));
    tracing::subscriber::set_global_default(subscriber)?;

    let broker = Embedded::new();
    let _calculator = Server::new(broker.clone()).version("1.0.0").serve(CalculatorServer::new(Calc)).await?;
    let client = Client::connect(broker.clone()).await?;
    let _shop = Server::new(broker).serve(ShopServer::new(Shopkeeper { calculator: client.clone() })).await?;

    let root = tracing::info_span!("checkout");
    let trace_id = root.context().span().span_context().trace_id();
    let shop = ShopClient::new(&client);
    let total = async { shop.order(250, 3).await }.instrument(root).await?;
    println!("order total: {total}");
    println!("trace id: {trace_id}");

    // Which workers of a service are alive, and how busy: every worker answers a ping.
    for worker in client.ping("Calculator").wait(std::time::Duration::from_millis(200)).await? {
        println!(
            "Calculator worker {} version {} on {} (pid {}): {} handled, {} in flight",
            worker.id,
            worker.version.as_deref().unwrap_or("-"),
            worker.host,
            worker.pid,
            worker.handled,
            worker.in_flight
        );
    }

    // Sends what the batch processor holds before the process ends.
    provider.shutdown()?;
    println!("\nmetrics, as a Prometheus scrape reads them:");
    // The counters that moved and the histograms' counts (every bucket is in the scrape too).
    let moved = |line: &&str| line.starts_with("mqrpc_") && !line.contains("_bucket") && !line.ends_with(" 0");
    for line in metrics.render().lines().filter(moved) {
        println!("{line}");
    }
    Ok(())
}
