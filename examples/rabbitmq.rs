//! `Calculator` on RabbitMQ: a worker and a client in separate processes.
//!
//! With RabbitMQ on 127.0.0.1:5672 (guest/guest), from the repository root, in two terminals:
//!
//! ```text
//! cargo run --example rabbitmq --features amqp -- worker    # start several: they share the service's queue
//! cargo run --example rabbitmq --features amqp -- client
//! ```
//!
//! The URL comes from `MQRPC_AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`). The service's
//! queue is the durable queue `Calculator`; `rabbitmqctl list_queues` shows it, and a plain AMQP client can
//! call it (see `rpc_broker::adapter::amqp`).

use mqrpc_examples::roles;
use rpc_broker::adapter::amqp::Amqp;

#[tokio::main]
async fn main() -> Result<(), rpc_core::Error> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let role = roles::role()?;
    let url = std::env::var("MQRPC_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let transport = Amqp::connect(&url).await?;
    if role == "worker" { roles::worker(transport, "RabbitMQ").await } else { roles::client(transport).await }
}
