//! STOMP 1.2, the text protocol ActiveMQ (Classic and Artemis) and RabbitMQ (its `rabbitmq_stomp` plugin) speak:
//! feature `stomp`.
//!
//! [`codec`] reads and writes frames, holding what a server sends to size limits before it allocates;
//! [`connection`] is one connection on it (the CONNECT handshake, heart-beats both ways, sends confirmed by
//! receipts, subscriptions, ACK and NACK). The transport that maps mqrpc's queues onto STOMP destinations is
//! built on them.
//!
//! What the two servers do with the features a transport needs differs, as measured on ActiveMQ 5.17.2 (with
//! `.ci/activemq.xml`) and RabbitMQ 3.10.8:
//!
//! | | ActiveMQ | RabbitMQ |
//! |---|---|---|
//! | NACK (`client-individual`) | moves the message to `ActiveMQ.DLQ` at once (a poison ack; header `original-destination`) | requeues it, `redelivered:true` |
//! | UNSUBSCRIBE with messages unacked | gives them back | keeps them until the connection closes |
//! | a private reply queue | SUBSCRIBE to `/temp-queue/x`; a `reply-to` naming it reaches the receiver as `/remote-temp-queue/ID:...` | no SUBSCRIBE (an ERROR): a SEND with `reply-to:/temp-queue/x` makes it, and replies come as MESSAGE frames with `subscription:/temp-queue/x`; the receiver sees `/reply-queue/amq.gen-...` |
//! | subscriber groups | virtual topics: SEND to `/topic/VirtualTopic.t`, group `g` reads `/queue/Consumer.g.VirtualTopic.t` | SUBSCRIBE to `/topic/t` with `durable:true`, `auto-delete:false` and `x-queue-name` (the members of a group share the queue) |
//! | a group while it has no consumer | keeps receiving | keeps receiving |
//! | `priority` header | honoured (prioritized queues) | ignored on a queue declared without `x-max-priority` |
//! | expiry | `expires`: absolute, ms since the epoch | `expiration`: relative, ms |
//! | delayed delivery | `AMQ_SCHEDULED_DELAY` ms (the scheduler) | none without a plugin |
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
