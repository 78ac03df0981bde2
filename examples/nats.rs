//! `Calculator` on NATS: a worker and a client in separate processes, on core NATS or on JetStream.
//!
//! With NATS on 127.0.0.1:4222 (JetStream enabled for the second form), from the repository root, in two
//! terminals:
//!
//! ```text
//! cargo run --example nats --features nats -- worker        # start several: they form the queue group `Calculator`
//! cargo run --example nats --features nats -- client
//!
//! MQRPC_NATS_JETSTREAM=1 cargo run --example nats --features nats -- worker   # the queue is a work-queue stream
//! MQRPC_NATS_JETSTREAM=1 cargo run --example nats --features nats -- client   # calls made before a worker runs wait
//! ```
//!
//! The URL comes from `MQRPC_NATS_URL` (default `nats://127.0.0.1:4222`).

use mqrpc_examples::roles;
use rpc_broker::adapter::nats::{Nats, NatsOptions};
use rpc_core::{QueueOptions, Transport};

#[tokio::main]
async fn main() -> Result<(), rpc_core::Error> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let role = roles::role()?;
    let url = std::env::var("MQRPC_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let jetstream = std::env::var("MQRPC_NATS_JETSTREAM").is_ok_and(|value| value == "1");
    let options = if jetstream { NatsOptions::jetstream() } else { NatsOptions::new() };
    let transport = Nats::connect_with(&url, options).await?;
    if jetstream {
        // The deployment's step: the stream exists before any worker, so calls made meanwhile wait in it.
        transport.declare_queue("Calculator", &QueueOptions::new()).await?;
    }
    let broker = if jetstream { "NATS JetStream" } else { "NATS" };
    if role == "worker" { roles::worker(transport, broker).await } else { roles::client(transport).await }
}
