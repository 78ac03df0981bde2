//! The worker and the client of the `remote_*`, `rabbitmq`, `nats`, `kafka`, `redis`, `activemq` and `zeromq`
//! examples: the same code on every transport.

use std::time::{Duration, Instant};

use rpc_core::{Client, Server, Transport};

use crate::calculator::{Calc, CalculatorClient, CalculatorServer};

/// Serves `Calculator` until Ctrl-C, then finishes what it runs and hands the rest back to the broker.
pub async fn worker(transport: impl Transport, broker: &str) -> Result<(), rpc_core::Error> {
    let server = Server::new(transport)
        .concurrency(64)
        .version(env!("CARGO_PKG_VERSION"))
        .serve(CalculatorServer::new(Calc))
        .await?;
    println!("worker serving Calculator on {broker}; Ctrl-C stops it");
    let _ = tokio::signal::ctrl_c().await;
    let report = server.shutdown(Duration::from_secs(5)).await;
    println!("stopped: {report:?}");
    Ok(())
}

/// Makes a few calls and 1,000 concurrent ones, and prints what came back.
pub async fn client(transport: impl Transport) -> Result<(), rpc_core::Error> {
    let client = Client::connect(transport).await?;
    let calc = CalculatorClient::new(&client);
    println!("add(2, 3) = {}", calc.add(2, 3).timeout(Duration::from_secs(5)).await?);
    println!("div(1, 0) = {:?}", calc.div(1.0, 0.0).timeout(Duration::from_secs(5)).await?);
    let started = Instant::now();
    let calls =
        (0..1_000).map(|n| std::future::IntoFuture::into_future(calc.add(n, n).timeout(Duration::from_secs(30))));
    let mut correct = 0;
    for (n, result) in futures::future::join_all(calls).await.into_iter().enumerate() {
        if result? == 2 * n as i64 {
            correct += 1;
        }
    }
    println!("1,000 concurrent calls: {correct} correct in {:?}", started.elapsed());
    Ok(())
}

/// `worker` or `client`, from the first command-line argument.
pub fn role() -> Result<String, rpc_core::Error> {
    match std::env::args().nth(1).as_deref() {
        Some(role @ ("worker" | "client")) => Ok(role.to_owned()),
        _ => Err(rpc_core::Error::InvalidArgument("say `worker` or `client`".into())),
    }
}
