//! A worker serving `Calculator` through a running `rpc-broker` server: the second of three processes.
//!
//! From the repository root, in three terminals:
//!
//! ```text
//! cargo run -p rpc-broker -- serve          # 1. the broker, on 127.0.0.1:7878
//! cargo run --example remote_worker         # 2. this worker (start several: they share the load)
//! cargo run --example remote_client         # 3. a client
//! ```
//!
//! The broker's URL comes from `MQRPC_BROKER` (default `mqrpc://127.0.0.1:7878`). Stop it with Ctrl-C: it
//! finishes the calls it is running and hands the rest back to the broker.

use mqrpc_examples::roles;
use rpc_broker::Remote;

#[tokio::main]
async fn main() -> Result<(), rpc_core::Error> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let url = std::env::var("MQRPC_BROKER").unwrap_or_else(|_| "mqrpc://127.0.0.1:7878".into());
    roles::worker(Remote::connect(&url).await?, &url).await
}
