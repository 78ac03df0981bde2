//! mqrpc's runtime: typed RPC over message queues.
//!
//! You annotate a trait with [`service`]; the macro generates a client stub that puts each request on a queue
//! with a reply-to address and a correlation id, and a dispatcher that [`Server`] workers run. The same code
//! runs on the embedded broker (`rpc_broker::Embedded`, the default) and on the brokers that the adapters
//! reach.
//!
//! # Tutorial: define, implement, serve, call
//!
//! ```
//! use std::time::Duration;
//!
//! use rpc_core::{Client, DurableCallbacks, Server};
//!
//! // 1. Define the service. Errors of the method's own type arrive typed at the caller.
//! #[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
//! pub enum MathError {
//!     DivideByZero,
//! }
//!
//! #[rpc_core::service]
//! pub trait Calculator {
//!     /// Adds two numbers.
//!     async fn add(&self, a: i64, b: i64) -> i64;
//!     /// Divides `a` by `b`.
//!     async fn div(&self, a: f64, b: f64) -> Result<f64, MathError>;
//!     /// Writes a line to the server's log; nobody waits for it.
//!     #[rpc(oneway)]
//!     async fn log(&self, line: String);
//! }
//!
//! // 2. Implement it with plain `async fn`s.
//! struct Calc;
//!
//! impl Calculator for Calc {
//!     async fn add(&self, a: i64, b: i64) -> i64 {
//!         a + b
//!     }
//!
//!     async fn div(&self, a: f64, b: f64) -> Result<f64, MathError> {
//!         if b == 0.0 { Err(MathError::DivideByZero) } else { Ok(a / b) }
//!     }
//!
//!     async fn log(&self, line: String) {
//!         println!("log: {line}");
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), rpc_core::Error> {
//! // 3. Serve it: workers consume the `Calculator` queue of the broker.
//! let broker = rpc_broker::Embedded::new();
//! let server = Server::new(broker.clone()).concurrency(16).serve(CalculatorServer::new(Calc)).await?;
//!
//! // 4. Call it.
//! let client = Client::connect(broker.clone()).await?;
//! let calc = CalculatorClient::new(&client);
//! assert_eq!(calc.add(2, 3).await?, 5);
//! assert_eq!(calc.div(1.0, 0.0).await?, Err(MathError::DivideByZero));
//! assert_eq!(calc.add(1, 1).timeout(Duration::from_secs(1)).priority(5).await?, 2);
//! calc.log("hello".into()).await?;
//!
//! // 5. Or let a callback take the result later: in-process...
//! let (tx, rx) = tokio::sync::oneshot::channel();
//! calc.add(20, 22).on_reply(move |sum| { let _ = tx.send(sum); });
//! assert_eq!(rx.await.expect("the callback runs")?, 42);
//!
//! // ...or durably: the reply waits in the `sums` callback queue for whoever handles it.
//! calc.add(40, 2).durable("sums").await?;
//! let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
//! let callbacks = DurableCallbacks::new("sums")
//!     .on(CalculatorClient::ADD, move |reply| {
//!         let tx = tx.clone();
//!         async move { let _ = tx.send(reply.result); }
//!     })
//!     .start(broker.clone())
//!     .await?;
//! assert_eq!(rx.recv().await.expect("the durable callback runs")?, 42);
//!
//! callbacks.shutdown().await;
//! server.shutdown(Duration::from_secs(5)).await;
//! # Ok(())
//! # }
//! ```
//!
//! # Traces and metrics
//!
//! Every call carries its W3C trace context in its headers and makes `tracing` spans named after
//! OpenTelemetry's conventions ([`trace`]); with the `opentelemetry` feature and a `tracing-opentelemetry`
//! layer, the worker's span is a child of the caller's, across the queue. With the `metrics` feature, clients
//! and servers record calls, outcomes and durations through the `metrics` facade ([`metrics`]) into the
//! recorder the program installs (Prometheus, or another). `examples/observability.rs` does both.
//!
//! # What travels
//!
//! Every message is an [`Envelope`], a MessagePack map described in `docs/wire-format.md`; arguments travel as
//! a MessagePack map keyed by parameter name. Untrusted bytes go through [`codec`], which checks size and
//! nesting depth before decoding.

pub mod codec;
pub mod context;
pub mod naming;

mod admission;
mod callback;
mod client;
pub mod dead_letters;
pub mod dedup;
mod envelope;
mod error;
pub mod health;
mod method;
pub mod metrics;
pub mod retry;
mod server;
mod status;
mod stripe;
mod text;
pub mod trace;
pub mod transport;

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;

pub use callback::{CallbackHandle, CallbackReply, DurableCallbacks};
pub use client::{Call, Cancellation, Client, ClientBuilder, ClientStats, DEFAULT_TIMEOUT, MAX_PRIORITY, Notify};
pub use dedup::{Begin, DedupStore, MemoryDedup, StoredReply};
pub use envelope::{COMPACT_VERSION, Envelope, Kind, ReplyTo, VERSION};
pub use error::Error;
pub use method::{DecodeFn, Method, MethodInfo, MethodKind};
pub use retry::RetryPolicy;
pub use rpc_macros::service;
pub use server::{Layer, Server, ServerHandle, ServerStats, Service, ShutdownReport};
pub use status::{Code, Status};
pub use text::Text;
pub use transport::{Capabilities, ConsumeOptions, QueueOptions, QueueStats, Transport};
