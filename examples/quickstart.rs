//! Quickstart: every kind of call on the embedded broker, in one process, with nothing to install.
//!
//! Run it from the repository root:
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! It prints one line per scenario: a call, a typed error, a timeout, a delayed call, a oneway call, an
//! in-process callback, a durable callback and a broadcast. Set `RUST_LOG=debug` to see the spans of each call.

use std::time::Duration;

use rpc_broker::Embedded;
use rpc_core::{Client, DurableCallbacks, Error, Server};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// The error `div` returns; it arrives at the caller as this type.
#[derive(Debug, Serialize, Deserialize)]
pub enum MathError {
    /// The divisor was zero.
    DivideByZero,
}

/// A calculator, served over a queue.
#[rpc_core::service]
pub trait Calculator {
    /// Adds two numbers.
    async fn add(&self, a: i64, b: i64) -> i64;
    /// Divides `a` by `b`, or says why not.
    async fn div(&self, a: f64, b: f64) -> Result<f64, MathError>;
    /// Takes `millis` milliseconds to answer.
    async fn slow(&self, millis: u64) -> u64;
    /// Writes a line to the worker's log; nobody waits for it.
    #[rpc(oneway)]
    async fn log(&self, line: String);
    /// Tells every subscriber group about an event.
    #[rpc(broadcast)]
    async fn announce(&self, event: String);
}

/// One worker; `group` names its broadcast subscriber group and `seen` reports what it logged or heard.
struct Calc {
    group: &'static str,
    seen: mpsc::UnboundedSender<String>,
}

impl Calculator for Calc {
    async fn add(&self, a: i64, b: i64) -> i64 {
        a + b
    }

    async fn div(&self, a: f64, b: f64) -> Result<f64, MathError> {
        if b == 0.0 { Err(MathError::DivideByZero) } else { Ok(a / b) }
    }

    async fn slow(&self, millis: u64) -> u64 {
        tokio::time::sleep(Duration::from_millis(millis)).await;
        millis
    }

    async fn log(&self, line: String) {
        let _ = self.seen.send(format!("logged {line:?}"));
    }

    async fn announce(&self, event: String) {
        let _ = self.seen.send(format!("{} heard {event:?}", self.group));
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();

    let broker = Embedded::new();
    let (seen, mut worker_news) = mpsc::unbounded_channel();
    let billing = Server::new(broker.clone())
        .group("billing")
        .serve(CalculatorServer::new(Calc { group: "billing", seen: seen.clone() }))
        .await?;
    let audit =
        Server::new(broker.clone()).group("audit").serve(CalculatorServer::new(Calc { group: "audit", seen })).await?;

    let client = Client::connect(broker.clone()).await?;
    let calc = CalculatorClient::new(&client);

    // A call.
    println!("call       add(2, 3) = {}", calc.add(2, 3).await?);

    // The method's own error type, typed at the caller.
    println!("typed err  div(1, 0) = {:?}", calc.div(1.0, 0.0).await?);

    // A timeout: the pending call is cleaned up, and the worker does not outlive the caller's budget.
    match calc.slow(2_000).timeout(Duration::from_millis(100)).await {
        Err(error @ Error::Timeout(_)) => {
            println!("timeout    slow(2000) with a 100 ms budget: {error} ({} pending)", client.stats().pending)
        }
        other => println!("timeout    unexpected: {other:?}"),
    }

    // A delayed call: the broker holds the request for 200 ms before a worker can take it.
    let sent = std::time::Instant::now();
    let sum = calc.add(1, 1).delay(Duration::from_millis(200)).await?;
    println!(
        "delayed    add(1, 1) = {sum}, answered {} ms after it was sent with a 200 ms delay",
        sent.elapsed().as_millis()
    );

    // Fire-and-forget: returns once queued; a worker runs it.
    calc.log("hello".into()).await?;
    println!("oneway     log(\"hello\") queued; the worker {}", next(&mut worker_news).await);

    // An in-process callback: the call returns at once, a closure gets the typed result later.
    let (sender, receiver) = tokio::sync::oneshot::channel();
    let id = calc.add(20, 22).on_reply(move |sum| {
        let _ = sender.send(sum);
    });
    let sum = receiver.await.map_err(|_| Error::Shutdown)??;
    println!("callback   add(20, 22) = {sum}, delivered to a closure (call {id})");

    // A durable callback: the reply goes to the `sums` callback queue; the caller can go away, and a handler
    // registered under that name later (here: a new client, as after a restart) takes it.
    let caller = Client::connect(broker.clone()).await?;
    CalculatorClient::new(&caller).add(40, 2).durable("sums").await?;
    caller.close();
    drop(caller);
    let (sums, mut durable_replies) = mpsc::unbounded_channel();
    let callbacks = DurableCallbacks::new("sums")
        .on(CalculatorClient::ADD, move |reply| {
            let sums = sums.clone();
            async move {
                let _ = sums.send(reply.result);
            }
        })
        .start(broker.clone())
        .await?;
    let sum = durable_replies.recv().await.ok_or(Error::Shutdown)??;
    println!("durable    add(40, 2) = {sum}, handled from callback queue `sums` after the caller left");

    // A broadcast: every subscriber group gets one copy.
    calc.announce("deploy v2".into()).await?;
    let mut heard = [next(&mut worker_news).await, next(&mut worker_news).await];
    heard.sort();
    println!("broadcast  announce(\"deploy v2\"): {}", heard.join(", "));

    callbacks.shutdown().await;
    billing.shutdown(Duration::from_secs(5)).await;
    audit.shutdown(Duration::from_secs(5)).await;
    Ok(())
}

async fn next(news: &mut mpsc::UnboundedReceiver<String>) -> String {
    match tokio::time::timeout(Duration::from_secs(5), news.recv()).await {
        Ok(Some(news)) => news,
        _ => "said nothing within 5 s".to_owned(),
    }
}
