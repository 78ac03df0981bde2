//! STOMP 1.2, the text protocol ActiveMQ (Classic and Artemis) and RabbitMQ (its `rabbitmq_stomp` plugin) speak:
//! feature `stomp`.
//!
//! [`codec`] reads and writes frames, holding what a server sends to size limits before it allocates;
//! [`connection`] is one connection on it (the CONNECT handshake, heart-beats both ways, sends confirmed by
//! receipts, subscriptions, ACK and NACK). The transport that maps mqrpc's queues onto STOMP destinations is
//! built on them.
//!
//! ```no_run
//! # async fn run() -> Result<(), rpc_core::Error> {
//! use rpc_broker::adapter::stomp::codec::{Command, Frame};
//! use rpc_broker::adapter::stomp::connection::{ConnectOptions, Connection};
//!
//! let connection = Connection::connect("stomp://127.0.0.1:61613", &ConnectOptions::default()).await?;
//! let mut orders = connection.subscribe("/queue/orders", "client-individual", &[]).await?;
//! connection.send(Frame::new(Command::Send).header("destination", "/queue/orders")).await?;
//! if let Some(message) = orders.next().await {
//!     connection.ack(message.get("ack").unwrap_or_default())?;
//! }
//! # Ok(())
//! # }
//! ```

pub mod codec;
pub mod connection;
