//! Brokers beyond the shared suite, in one test binary: RabbitMQ and NATS called by their own clients
//! (`rabbitmq_nats`), workers sharing a Redis dedup store (`shared_dedup`), and our broker with a data
//! directory killed and restarted under load (`durable`), and the STOMP connection on ActiveMQ and RabbitMQ
//! (`stomp`), ZeroMQ's windows and refusals (`zeromq`), and the two forms of a Redis Streams entry
//! (`redis_streams`), and credentials and TLS through the adapters' options on RabbitMQ and private nats-servers
//! (`credentials`). A test that needs an external broker is ignored, with the variable it needs, in a build
//! without that broker's URL (`build.rs`; `.ci/run` sets them all).
//!
//! `memory.rs` stays a binary of its own: it measures its process's resident set, which other tests in the
//! same process would grow.

use std::time::Duration;

mod credentials;
mod durable;
mod limits;
mod rabbitmq_nats;
mod redis_streams;
mod shared_dedup;
mod stomp;
mod zeromq;

/// How long a test waits for a reply, a message or a state it expects.
const WAIT: Duration = Duration::from_secs(20);
