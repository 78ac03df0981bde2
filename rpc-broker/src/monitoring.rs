//! Monitoring of a broker server: its Prometheus metrics over HTTP (`rpc-broker serve --metrics ADDR`).
//!
//! [`Metrics::install`] makes a Prometheus recorder (`metrics-exporter-prometheus`) the process's recorder, so the
//! clients and servers of the process (`rpc-core`'s `metrics` feature) are in the same scrape; [`Metrics::serve`]
//! answers `GET /metrics` in the Prometheus text format. The queue figures are read from the broker at each
//! scrape.
//!
//! | metric | type | labels | what |
//! |---|---|---|---|
//! | `mqrpc_broker_queue_messages` | gauge | queue, state (`ready`, `delayed`, `unacked`) | messages the queue holds |
//! | `mqrpc_broker_queue_consumers` | gauge | queue | consumers attached |
//! | `mqrpc_broker_queue_published_total` | counter | queue | messages published (a rate is `rate(...)`) |
//! | `mqrpc_broker_queue_delivered_total` | counter | queue | messages handed to consumers, redeliveries included |
//! | `mqrpc_broker_queue_acked_total` | counter | queue | messages acked |
//! | `mqrpc_broker_queue_dead_lettered_total` | counter | queue | messages moved to the dead-letter queue |
//! | `mqrpc_broker_queue_expired_total` | counter | queue | messages dropped at their deadline while queued |
//! | `mqrpc_broker_queue_rejected_total` | counter | queue | publishes refused because the queue was full |
//! | `mqrpc_broker_queue_cancelled_total` | counter | queue | messages removed because their call was cancelled |
//! | `mqrpc_broker_queue_deduplicated_total` | counter | queue | publishes taken once as a retry of one already taken |
//! | `mqrpc_broker_inboxes` | gauge | | callers' inboxes (not labelled one by one: each client has its own) |
//! | `mqrpc_broker_connections` | gauge | | connections open |
//! | `mqrpc_broker_connections_accepted_total` | counter | | connections accepted |
//! | `mqrpc_broker_connections_rejected_total` | counter | | connections closed for a protocol, auth or limit error |
//! | `mqrpc_broker_frames_received_total` | counter | | frames read |
//! | `mqrpc_broker_held_bytes` | gauge | | bytes of messages held |
//! | `mqrpc_broker_resident_memory_bytes` | gauge | | the process's resident memory |
//! | `mqrpc_broker_log_fsync_seconds` | histogram | | one group commit's syncs of the durable log |
//!
//! Callers' inboxes (`inbox.` names) are counted, not labelled, so that the label sets stay bounded; a queue's
//! gauges go from the scrape five minutes after the queue is deleted.

use std::net::SocketAddr;
use std::time::Duration;

use metrics::{counter, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;
use tokio::net::TcpListener;

use crate::server::Monitor;

/// The histogram buckets of every duration the framework records, in seconds: 50 µs to 10 s.
pub const BUCKETS: [f64; 16] =
    [0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// How long a gauge stays in the scrape without being set: a deleted queue's.
const IDLE: Duration = Duration::from_secs(300);

/// The metrics of a broker server and of whatever else in the process records through the `metrics` facade.
#[derive(Clone, Debug)]
pub struct Metrics {
    handle: PrometheusHandle,
    monitor: Monitor,
}

impl Metrics {
    /// Installs a Prometheus recorder as the process's global recorder, reading the broker's figures from
    /// `monitor` at each scrape.
    ///
    /// # Errors
    /// When the process has a recorder already.
    pub fn install(monitor: Monitor) -> Result<Metrics, String> {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&BUCKETS)
            .map_err(|error| error.to_string())?
            .idle_timeout(MetricKindMask::GAUGE, Some(IDLE))
            .build_recorder();
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder).map_err(|_| "the process has a metrics recorder already".to_owned())?;
        Ok(Metrics { handle, monitor })
    }

    /// The scrape: every metric in the Prometheus text format, the broker's read now.
    pub fn render(&self) -> String {
        self.refresh();
        self.handle.render()
    }

    /// Sets the broker's gauges and counters from its figures.
    fn refresh(&self) {
        let stats = self.monitor.stats();
        gauge!("mqrpc_broker_connections").set(stats.connections as f64);
        counter!("mqrpc_broker_connections_accepted_total").absolute(stats.accepted);
        counter!("mqrpc_broker_connections_rejected_total").absolute(stats.rejected);
        counter!("mqrpc_broker_frames_received_total").absolute(stats.frames_in);
        gauge!("mqrpc_broker_held_bytes").set(stats.bytes_held as f64);
        if let Some(resident) = resident_memory() {
            gauge!("mqrpc_broker_resident_memory_bytes").set(resident as f64);
        }
        let mut inboxes = 0_usize;
        for (queue, stats) in self.monitor.queues() {
            if queue.starts_with("inbox.") {
                inboxes += 1;
                continue;
            }
            for (state, count) in [("ready", stats.ready), ("delayed", stats.delayed), ("unacked", stats.unacked)] {
                gauge!("mqrpc_broker_queue_messages", "queue" => queue.clone(), "state" => state).set(count as f64);
            }
            gauge!("mqrpc_broker_queue_consumers", "queue" => queue.clone()).set(stats.consumers as f64);
            for (name, value) in [
                ("mqrpc_broker_queue_published_total", stats.published),
                ("mqrpc_broker_queue_delivered_total", stats.delivered),
                ("mqrpc_broker_queue_acked_total", stats.acked),
                ("mqrpc_broker_queue_dead_lettered_total", stats.dead_lettered),
                ("mqrpc_broker_queue_expired_total", stats.expired),
                ("mqrpc_broker_queue_rejected_total", stats.rejected),
                ("mqrpc_broker_queue_cancelled_total", stats.cancelled),
                ("mqrpc_broker_queue_deduplicated_total", stats.deduplicated),
            ] {
                counter!(name, "queue" => queue.clone()).absolute(value);
            }
        }
        gauge!("mqrpc_broker_inboxes").set(inboxes as f64);
    }

    /// Answers `GET /metrics` on `listener` until the task is dropped.
    ///
    /// # Errors
    /// When the listener fails.
    pub async fn serve(self, listener: TcpListener) -> std::io::Result<()> {
        let router = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let metrics = self.clone();
                async move {
                    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], metrics.render())
                }
            }),
        );
        axum::serve(listener, router).await
    }

    /// Binds `address` and serves the scrape there in a task of its own; returns the address bound (port 0
    /// picks a free one).
    ///
    /// # Errors
    /// When `address` cannot be bound.
    pub async fn spawn(self, address: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(address).await?;
        let bound = listener.local_addr()?;
        tokio::spawn(async move {
            if let Err(error) = self.serve(listener).await {
                tracing::error!(%error, "the metrics endpoint stopped");
            }
        });
        Ok(bound)
    }
}

/// The process's resident memory in bytes, from `/proc/self/status` (Linux); `None` elsewhere.
fn resident_memory() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.trim_start_matches("VmRSS:").trim().trim_end_matches("kB").trim().parse().ok()?;
    kib.checked_mul(1024)
}
