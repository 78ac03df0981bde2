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

mod calculator;

use std::time::Duration;

use calculator::{Calculator, CalculatorServer, MathError};
use rpc_broker::Remote;
use rpc_core::Server;

struct Calc;

impl Calculator for Calc {
    async fn add(&self, a: i64, b: i64) -> i64 {
        a + b
    }

    async fn div(&self, a: f64, b: f64) -> Result<f64, MathError> {
        if b == 0.0 { Err(MathError::DivideByZero) } else { Ok(a / b) }
    }
}

#[tokio::main]
async fn main() -> Result<(), rpc_core::Error> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let url = std::env::var("MQRPC_BROKER").unwrap_or_else(|_| "mqrpc://127.0.0.1:7878".into());
    let broker = Remote::connect(&url).await?;
    let server = Server::new(broker).concurrency(64).serve(CalculatorServer::new(Calc)).await?;
    println!("worker serving Calculator through {url}; Ctrl-C stops it");
    let _ = tokio::signal::ctrl_c().await;
    let report = server.shutdown(Duration::from_secs(5)).await;
    println!("stopped: {report:?}");
    Ok(())
}
