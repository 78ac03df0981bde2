//! Health and discovery: which workers of a service are alive, who they are, and how busy.
//!
//! Every [`Server`](crate::Server) subscribes privately ([`Transport::subscribe_private`]) to its service's
//! ping topic, `<namespace>.<service>.ping` ([`naming::ping_topic`]), and answers each ping on the pinger's
//! inbox with a [`WorkerInfo`]. A ping is a broadcast, so every live worker answers, whichever queue or
//! subscriber group it consumes; the pinger collects the answers for as long as it waits. (Over ZeroMQ, where
//! no broker carries a broadcast, a worker hears the pings of the nodes it lists as peers.) The envelope and body
//! are in `docs/wire-format.md` ("Ping"), so a tool in another language can ping too.
//!
//! ```
//! # use std::time::Duration;
//! # use rpc_core::{Client, Server};
//! #[rpc_core::service]
//! pub trait Clock {
//!     async fn now(&self) -> u64;
//! }
//!
//! struct Fixed;
//! impl Clock for Fixed {
//!     async fn now(&self) -> u64 {
//!         42
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), rpc_core::Error> {
//! let broker = rpc_broker::Embedded::new();
//! let server = Server::new(broker.clone()).version("1.4.2").serve(ClockServer::new(Fixed)).await?;
//! let client = Client::connect(broker.clone()).await?;
//!
//! // Returns once one worker answered, or after 200 ms with those that did.
//! let workers = client.ping("Clock").wait(Duration::from_millis(200)).at_least(1).await?;
//! assert_eq!(workers.len(), 1);
//! assert_eq!(workers[0].version.as_deref(), Some("1.4.2"));
//! assert_eq!(workers[0].in_flight, 0);
//! # server.shutdown(Duration::from_secs(1)).await;
//! # Ok(())
//! # }
//! ```

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::codec::{self, Limits};
use crate::envelope::{Envelope, Kind, ReplyTo};
use crate::error::Error;
use crate::naming;
use crate::text::Text;
use crate::transport::{BoxFuture, Transport};

/// The method name of a ping: `$ping`. No method of a service can have it (method names are Rust
/// identifiers), so a worker tells a ping from a call by it.
pub const PING_METHOD: &str = "$ping";

/// How long a ping waits for answers unless told otherwise.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(1);

/// Answers a worker can send at most to one ping, the pinger keeps at most: a bound on what it holds.
pub const MAX_WORKERS: usize = 4096;

/// What one worker says of itself when pinged: the body of its answer, a MessagePack map with these keys
/// (`docs/wire-format.md`, "Ping"). Keys a reader does not know are ignored and missing ones take their
/// default, so fields can be added.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct WorkerInfo {
    /// The worker's id: a UUID made when its server started, new for each run.
    pub id: String,
    /// The service's name.
    pub service: String,
    /// The queue it consumes.
    pub queue: String,
    /// The application's version, as the server was given it ([`Server::version`](crate::Server::version)).
    pub version: Option<String>,
    /// The mqrpc version the worker runs.
    pub mqrpc: String,
    /// The host it runs on, as the host names itself.
    pub host: String,
    /// Its process id.
    pub pid: u32,
    /// Milliseconds since its server started.
    pub uptime_ms: u64,
    /// When its server started, in milliseconds since the Unix epoch (by its host's clock).
    pub started_ms: u64,
    /// Requests it is running now.
    pub in_flight: u32,
    /// Requests it runs at most at once.
    pub concurrency: u32,
    /// Requests it has handled (any outcome).
    pub handled: u64,
    /// Handled requests whose reply was not ok.
    pub failed: u64,
    /// Nanoseconds from deliveries to the end of their handling, summed over the requests handled.
    pub processing_ns: u64,
    /// The last failure, `<status code>:<message>`; none before the first.
    pub last_error: Option<String>,
    /// The message system it is connected to ([`Transport::system`]).
    pub system: String,
}

/// A ping of a service's workers, sent when awaited ([`Client::ping`](crate::Client::ping), [`Ping::new`]).
#[derive(Debug)]
#[must_use = "a ping does nothing until awaited"]
pub struct Ping {
    transport: Arc<dyn Transport>,
    namespace: Option<String>,
    service: String,
    wait: Duration,
    at_least: Option<usize>,
}

impl Ping {
    /// A ping of the workers of `service` (in `namespace`) on `transport`, waiting [`DEFAULT_WAIT`].
    pub fn new(transport: Arc<dyn Transport>, namespace: Option<&str>, service: &str) -> Ping {
        Ping {
            transport,
            namespace: namespace.map(str::to_owned),
            service: service.to_owned(),
            wait: DEFAULT_WAIT,
            at_least: None,
        }
    }

    /// How long to collect answers (default [`DEFAULT_WAIT`]): workers that have not answered by then are not
    /// counted as alive.
    pub fn wait(mut self, wait: Duration) -> Ping {
        self.wait = wait;
        self
    }

    /// Returns as soon as `workers` different workers answered, without waiting the rest of [`Ping::wait`].
    pub fn at_least(mut self, workers: usize) -> Ping {
        self.at_least = Some(workers);
        self
    }

    /// Sends the ping and collects the answers: one [`WorkerInfo`] per worker, ordered by id.
    ///
    /// # Errors
    /// The transport's errors for opening an inbox or publishing to the ping topic ([`Error::Unsupported`]
    /// where it has no private subscriptions, so no worker could answer).
    pub async fn send(self) -> Result<Vec<WorkerInfo>, Error> {
        let mut inbox = self.transport.open_inbox().await?;
        let correlation_id = Uuid::new_v4();
        let mut ping = Envelope::new(Kind::Request);
        ping.correlation_id = Some(correlation_id);
        ping.service = Text::from(&self.service);
        ping.method = Text::from_static(PING_METHOD);
        ping.reply_to = Some(ReplyTo::Inbox(Text::from(&inbox.address)));
        ping.deadline_ms = Some(u64::try_from(self.wait.as_millis()).unwrap_or(u64::MAX));
        let topic = naming::ping_topic(self.namespace.as_deref(), &self.service);
        let deadline = tokio::time::Instant::now() + self.wait;
        self.transport.publish_topic(&topic, ping).await?;
        let limits = Limits::default();
        let enough = self.at_least.unwrap_or(usize::MAX).min(MAX_WORKERS);
        let mut workers: Vec<WorkerInfo> = Vec::new();
        while workers.len() < enough {
            let Ok(Some(delivery)) = tokio::time::timeout_at(deadline, inbox.consumer.next()).await else { break };
            let answer = delivery.envelope;
            if answer.kind != Kind::Reply || answer.correlation_id != Some(correlation_id) || answer.status != 0 {
                continue;
            }
            match codec::decode::<WorkerInfo>(&answer.body, &limits) {
                Ok(info) if !workers.iter().any(|known| known.id == info.id) => workers.push(info),
                Ok(_) => {}
                Err(error) => tracing::debug!(%error, service = %self.service, "an undecodable answer to a ping"),
            }
        }
        workers.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(workers)
    }
}

impl IntoFuture for Ping {
    type Output = Result<Vec<WorkerInfo>, Error>;
    type IntoFuture = BoxFuture<'static, Result<Vec<WorkerInfo>, Error>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.send())
    }
}

/// A running server, as a transport may announce it to its broker's own discovery tools
/// ([`Transport::announce`]): on NATS, the service API of `nats micro`.
#[non_exhaustive]
pub struct Announcement {
    /// The service's name.
    pub service: String,
    /// The queue its requests come on.
    pub queue: String,
    /// The methods it serves.
    pub methods: Vec<String>,
    /// What the worker says of itself at the moment it is called.
    pub info: Arc<dyn Fn() -> WorkerInfo + Send + Sync>,
}

impl Announcement {
    /// An announcement of `service` on `queue` with `methods`, whose figures `info` gives.
    pub fn new(
        service: impl Into<String>,
        queue: impl Into<String>,
        methods: Vec<String>,
        info: Arc<dyn Fn() -> WorkerInfo + Send + Sync>,
    ) -> Announcement {
        Announcement { service: service.into(), queue: queue.into(), methods, info }
    }
}

impl std::fmt::Debug for Announcement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Announcement")
            .field("service", &self.service)
            .field("queue", &self.queue)
            .field("methods", &self.methods)
            .finish_non_exhaustive()
    }
}

/// An announcement in force: dropping it withdraws it.
pub struct Announced(#[allow(dead_code)] Box<dyn Send + Sync>);

impl Announced {
    /// Holds `guard` (subscriptions, a task's abort handle...) for as long as the announcement stands.
    pub fn new(guard: impl Send + Sync + 'static) -> Announced {
        Announced(Box::new(guard))
    }
}

impl std::fmt::Debug for Announced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Announced")
    }
}

/// The host's name, as it names itself (`/proc/sys/kernel/hostname`, else `$HOSTNAME`), or empty.
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|name| name.trim().to_owned())
        .unwrap_or_default()
}
