//! `Calculator` on Kafka: a worker and a client in separate processes.
//!
//! With a Kafka broker on 127.0.0.1:9092 (`bash .ci/brokers` starts tansu there), from the repository root, in
//! two terminals:
//!
//! ```text
//! cargo run --example kafka --features kafka -- worker    # start several: the topic's partitions are shared
//! cargo run --example kafka --features kafka -- client
//! ```
//!
//! The brokers come from `MQRPC_KAFKA_URL` (default `127.0.0.1:9092`). The service's queue is the topic
//! `Calculator` (6 partitions), read by the consumer group `Calculator`; each client reads its replies from a
//! topic `mqrpc.inbox.<id>` of its own. A worker serves a few seconds after it starts, once the group has
//! assigned it partitions. A plain Kafka client can call the service (see `rpc_broker::adapter::kafka`).

use mqrpc_examples::roles;
use rpc_broker::adapter::kafka::Kafka;

#[tokio::main]
async fn main() -> Result<(), rpc_core::Error> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let role = roles::role()?;
    let brokers = std::env::var("MQRPC_KAFKA_URL").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let transport = Kafka::connect(&brokers).await?;
    if role == "worker" { roles::worker(transport, "Kafka").await } else { roles::client(transport).await }
}
