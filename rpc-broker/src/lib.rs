//! The mqrpc broker engine and the transports built on it.
//!
//! - [`engine`]: the broker engine without I/O (queues, topics, acks, redelivery, TTL, limits, dead letters);
//! - [`Embedded`]: the engine in-process, as a [`Transport`](rpc_core::Transport), the default for
//!   quickstarts and tests;
//! - [`server`]: the engine behind TCP, the `rpc-broker` binary, and [`Remote`], the transport that talks to
//!   it; [`log`] keeps its durable queues on disk;
//! - [`adapter`]: transports to external brokers (RabbitMQ, NATS), one cargo feature each.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), rpc_core::Error> {
//! use rpc_core::Transport;
//! use rpc_core::transport::Confirm;
//!
//! let broker = rpc_broker::Embedded::new();
//! broker.declare_queue("jobs", &rpc_core::QueueOptions::new().max_len(1_000)).await?;
//! let mut consumer = broker.consume("jobs", rpc_core::ConsumeOptions::new()).await?;
//! broker.publish("jobs", rpc_core::Envelope::new(rpc_core::Kind::Oneway), Confirm::Broker).await?;
//! let delivery = consumer.next().await.expect("a delivery");
//! delivery.handle.ack().await?;
//! # Ok(())
//! # }
//! ```

pub mod access;
pub mod adapter;
#[cfg(feature = "monitoring")]
pub mod dashboard;
pub mod engine;
pub mod log;
#[cfg(feature = "monitoring")]
pub mod monitoring;

mod hub;
pub mod protocol;
pub mod server;

mod embedded;
mod remote;

pub use embedded::Embedded;
pub use remote::{Remote, RemoteOptions, TlsIdentity};
