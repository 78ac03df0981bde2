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

mod calculator;

use std::time::{Duration, Instant};

use calculator::CalculatorClient;
use rpc_broker::Remote;
use rpc_core::Client;

#[tokio::main]
async fn main() -> Result<(), rpc_core::Error> {
    let url = std::env::var("MQRPC_BROKER").unwrap_or_else(|_| "mqrpc://127.0.0.1:7878".into());
    let client = Client::connect(Remote::connect(&url).await?).await?;
    let calc = CalculatorClient::new(&client);
    println!("add(2, 3) = {}", calc.add(2, 3).timeout(Duration::from_secs(5)).await?);
    println!("div(1, 0) = {:?}", calc.div(1.0, 0.0).timeout(Duration::from_secs(5)).await?);
    let started = Instant::now();
    let calls = (0..1_000).map(|n| calc.add(n, n).timeout(Duration::from_secs(30)));
    let mut correct = 0;
    for (n, result) in
        futures::future::join_all(calls.map(std::future::IntoFuture::into_future)).await.into_iter().enumerate()
    {
        if result? == 2 * n as i64 {
            correct += 1;
        }
    }
    println!("1,000 concurrent calls: {correct} correct in {:?}", started.elapsed());
    Ok(())
}
