//! `Calculator` over ZeroMQ, brokerless: workers and a client in separate processes, nothing to run in between.
//!
//! From the repository root, in three terminals:
//!
//! ```text
//! cargo run --example zeromq --features zmq -- worker tcp://127.0.0.1:5555
//! cargo run --example zeromq --features zmq -- worker tcp://127.0.0.1:5556
//! cargo run --example zeromq --features zmq -- client tcp://127.0.0.1:5555,tcp://127.0.0.1:5556
//! ```
//!
//! Each worker binds a ROUTER socket on its endpoint (default `tcp://127.0.0.1:5555`) and a PUB socket on a free
//! port next to it; the client connects a DEALER socket to every endpoint it is given (default the same one),
//! spreads its calls over the workers that answer, and moves the calls of a worker that stops (Ctrl-C one while
//! the client runs) to the others. See `rpc_broker::adapter::zmq` for what is refused without a broker.

use mqrpc_examples::roles;
use rpc_broker::adapter::zmq::{Zmq, ZmqOptions};

#[tokio::main]
async fn main() -> Result<(), rpc_core::Error> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let role = roles::role()?;
    let endpoints = std::env::args().nth(2).unwrap_or_else(|| "tcp://127.0.0.1:5555".into());
    if role == "worker" {
        let transport = Zmq::start(ZmqOptions::new().bind(&endpoints)).await?;
        let bound = transport.endpoint().unwrap_or_default().to_owned();
        roles::worker(transport, &format!("ZeroMQ at {bound}")).await
    } else {
        let transport = Zmq::start(ZmqOptions::new().peers(endpoints.split(','))).await?;
        println!("connected to {} of {} workers", transport.live_workers(), endpoints.split(',').count());
        roles::client(transport).await
    }
}
