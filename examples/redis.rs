//! `Calculator` on Redis Streams: a worker and a client in separate processes.
//!
//! With Redis on 127.0.0.1:6379 (6.2 or later), from the repository root, in two terminals:
//!
//! ```text
//! cargo run --example redis --features redis -- worker    # start several: they share the stream
//! cargo run --example redis --features redis -- client
//! ```
//!
//! The server comes from `MQRPC_REDIS_URL` (default `redis://127.0.0.1:6379`). The service's queue is the stream
//! `mqrpc:q:Calculator`, read by the consumer group `mqrpc`; each client reads its replies from a stream
//! `mqrpc:i:<id>` of its own, which expires if the client goes away. A worker that dies leaves its calls
//! pending; another claims them after 30 s (`RedisStreamsOptions::visibility`). A plain Redis client can call
//! the service (see `rpc_broker::adapter::redis_streams`).

use mqrpc_examples::roles;
use rpc_broker::adapter::redis_streams::RedisStreams;

#[tokio::main]
async fn main() -> Result<(), rpc_core::Error> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let role = roles::role()?;
    let url = std::env::var("MQRPC_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let transport = RedisStreams::connect(&url).await?;
    if role == "worker" { roles::worker(transport, "Redis").await } else { roles::client(transport).await }
}
