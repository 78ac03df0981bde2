//! A client calling `Calculator` through a running `rpc-broker` server: the third of three processes.
//!
//! From the repository root, in three terminals:
//!
//! ```text
//! cargo run -p rpc-broker -- serve          # 1. the broker, on 127.0.0.1:7878
//! cargo run --example remote_worker         # 2. a worker
//! cargo run --example remote_client         # 3. this client
//! ```
//!
//! The broker's URL comes from `MQRPC_BROKER` (default `mqrpc://127.0.0.1:7878`).

use mqrpc_examples::roles;
use rpc_broker::Remote;

#[tokio::main]
async fn main() -> Result<(), rpc_core::Error> {
    let url = std::env::var("MQRPC_BROKER").unwrap_or_else(|_| "mqrpc://127.0.0.1:7878".into());
    roles::client(Remote::connect(&url).await?).await
}
