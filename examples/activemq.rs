//! `Calculator` on ActiveMQ over STOMP: a worker and a client in separate processes.
//!
//! With ActiveMQ's STOMP connector on 127.0.0.1:61623 (`bash .ci/brokers` starts ActiveMQ 5.17 there), from the
//! repository root, in two terminals:
//!
//! ```text
//! cargo run --example activemq --features stomp -- worker    # start several: they share the service's queue
//! cargo run --example activemq --features stomp -- client
//! ```
//!
//! The URL comes from `MQRPC_STOMP_URL` (default `stomp://127.0.0.1:61623`). The service's queue is the queue
//! `/queue/Calculator`, each worker reading it on a connection of its own; each client reads its replies from a
//! temporary queue `/temp-queue/mqrpc.inbox.<id>`. The web console's queue list shows it, and a plain STOMP
//! client can call the service (see `rpc_broker::adapter::stomp`).

use mqrpc_examples::roles;
use rpc_broker::adapter::stomp::Stomp;

#[tokio::main]
async fn main() -> Result<(), rpc_core::Error> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let role = roles::role()?;
    let url = std::env::var("MQRPC_STOMP_URL").unwrap_or_else(|_| "stomp://127.0.0.1:61623".into());
    let transport = Stomp::connect(&url).await?;
    if role == "worker" { roles::worker(transport, "ActiveMQ").await } else { roles::client(transport).await }
}
