//! A worker process for the fault tests: serves the suite's `Probe` service through a broker server.
//!
//! ```text
//! probe-worker URL NAMESPACE NAME [CONCURRENCY]
//! ```
//!
//! Prints `ready` on stdout once it is consuming; runs until killed.

use std::io::Write;
use std::sync::Arc;

use mqrpc_tests::service::{Events, ProbeServer, Worker};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), rpc_core::Error> {
    let mut args = std::env::args().skip(1);
    let (Some(url), Some(namespace), Some(name)) = (args.next(), args.next(), args.next()) else {
        eprintln!("usage: probe-worker URL NAMESPACE NAME [CONCURRENCY]");
        std::process::exit(2);
    };
    let concurrency = args.next().and_then(|n| n.parse().ok()).unwrap_or(16);
    let transport = rpc_broker::Remote::connect(&url).await?;
    let worker = Worker { name, events: Arc::new(Events::default()), client: None };
    let _server = rpc_core::Server::new(transport)
        .namespace(namespace)
        .concurrency(concurrency)
        .prefetch(concurrency as u32)
        .serve(ProbeServer::new(worker))
        .await?;
    println!("ready");
    let _ = std::io::stdout().flush();
    std::future::pending::<()>().await;
    Ok(())
}
