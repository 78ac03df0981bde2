//! ZeroMQ, brokerless: feature `zmq`. DEALER, ROUTER, PUB and SUB speak ZMTP 3 (NULL security) through a
//! connection of this module's own (`zmq/zmtp.rs`: limits checked before memory is reserved, concurrent writes
//! gathered into one system call, a lone call's message written by its sender), which interoperates with libzmq
//! 4.3 (pyzmq).
//!
//! No broker sits between a caller and a worker, so each process is a node that does a broker's part itself,
//! after the reliable request-reply patterns of the ZeroMQ guide:
//!
//! - **Workers bind** a ROUTER socket ([`ZmqOptions::bind`]) and a PUB socket next to it. **Clients connect** a
//!   DEALER socket to each worker endpoint they are given ([`ZmqOptions::peers`], [`Zmq::add_peer`]) and say
//!   HELLO; each worker answers READY with the queues it serves and, per queue, how many requests one client
//!   may have outstanding there (its consumers' prefetch), and announces again whenever that changes.
//! - **Client-side balancing** (the guide's Majordomo without the broker in the middle): a request goes to the
//!   live worker serving its queue with the fewest outstanding, within that worker's window and at most
//!   [`ZmqOptions::window`]. Past every window it waits in the client, at most [`ZmqOptions::max_waiting`]
//!   requests, then [`Error::QueueFull`]; memory never grows without bound. A call to a queue no live worker
//!   serves fails at once with [`Error::NoResponders`]. High-water marks: what a connection queues for its
//!   writer is bounded by these windows on the client and by the requests it holds on the worker, whose backlog
//!   per queue is capped too ([`ZmqOptions::max_backlog`]); the PUB socket drops what a slow subscriber cannot
//!   take past 1,000 messages queued for it, and a subscription what its consumer has not taken past 1,000, as
//!   libzmq's sockets do past their high-water marks.
//! - **The client holds each request until a worker settles it** (Lazy Pirate with the worker's help): the
//!   worker's ACK drops it; REQUEUE sends it again to a live worker (counting a delivery); REPUBLISH replaces it
//!   with the next attempt of a retry. Replies come back on the same socket, by inbox and correlation id.
//! - **Heartbeats both ways** (Paranoid Pirate): every [`ZmqOptions::heartbeat`], PING from clients and PONG
//!   from workers; a worker silent for [`ZmqOptions::liveness`] heartbeats, or whose connection drops, is dead.
//!   Its outstanding requests go to the other workers as new deliveries, with the same idempotency key, and wait
//!   in the client for one until their deadline: with a dedup store on the workers each call takes effect once,
//!   and at least once without one. The client reconnects to it with exponential backoff (from one heartbeat
//!   up to [`ZmqOptions::reconnect_max`], with jitter). A worker whose consumer goes away hands its requests back the same way.
//! - **Broadcast over PUB/SUB**: [`Transport::publish_topic`] publishes on the node's PUB socket, and each
//!   [`Transport::subscribe`] is a SUB socket of its own, connected to the PUB socket of every peer (so each SUB
//!   is a subscriber group of one). ZeroMQ's slow joiner: a subscriber gets only what is published after its
//!   subscription reached the publisher, and a publish that found no subscriber is gone. A new SUB, and a SUB
//!   meeting a new publisher, syncs first (the guide's node coordination: it asks the publisher over its
//!   DEALER to publish a marker, and waits for the marker), so that a peer added with [`Zmq::add_peer`] misses
//!   nothing published after that returns. A ping ([`rpc_core::health`]) is a broadcast too: a worker
//!   answers the pings of the nodes whose PUB socket it knows, those it lists as peers.
//!
//! Refused with [`Error::Unsupported`], since without a broker nothing could keep them: durable queues and
//! durable callbacks (a request lives in its caller's memory), a maximum queue length, dead-letter queues and
//! delivery limits, delayed delivery, priorities, queue statistics and cancelling a queued call. Deleting a queue
//! drops the requests waiting for it in this client. A dead-lettered delivery is published to `<queue>.dlq`
//! like any request, to a worker serving that queue if one does, and dropped otherwise.
//!
//! The frames are in `docs/wire-format.md` ("ZeroMQ") and in [`wire`]: every message starts with the frame
//! `MQRPC-ZMQ/1` and a command byte, and a request carries the envelope's MessagePack as its last frame, so a
//! client or worker in another language needs only a ZeroMQ library and MessagePack. What a peer sends is
//! untrusted: a frame's declared length is checked against [`ZmqOptions::limits`] before anything is read into
//! memory, a message of more than 8 frames is skipped, and the frames are checked before anything is decoded
//! ([`wire::Command::parse`]), then the envelope by rpc-core's codec; a subscriber may send only subscriptions
//! (a frame of at most 1 KiB), 1,024 of them at most. ZeroMQ's NULL security has no authentication: bind where
//! the peers are trusted.
//!
//! ```no_run
//! # async fn run() -> Result<(), rpc_core::Error> {
//! use rpc_broker::adapter::zmq::{Zmq, ZmqOptions};
//! // A worker process: serves what its `Server` consumes, on a fixed port.
//! let worker = Zmq::start(ZmqOptions::new().bind("tcp://127.0.0.1:5555")).await?;
//! // A client process: calls the workers it is given.
//! let client = Zmq::start(ZmqOptions::new().peers(["tcp://127.0.0.1:5555"])).await?;
//! # drop((worker, client));
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rpc_core::codec::Limits;
use rpc_core::transport::{BoxFuture, Confirm, Consumer, ConsumerControl, Delivery, DeliverySink, Inbox};
use rpc_core::{Capabilities, ConsumeOptions, Envelope, Error, QueueOptions, Transport};
use tokio_util::sync::{CancellationToken, DropGuard};
use uuid::Uuid;

use self::broadcast::Broadcast;
use self::client::Routing;
use self::worker::Serving;

mod broadcast;
mod client;
pub mod wire;
mod worker;
mod zmtp;

/// Where a reply to an inbox of this transport goes: `zmq-inbox/<node id>/<n>`.
const INBOX_PREFIX: &str = "zmq-inbox/";

/// How a [`Zmq`] node binds, whom it calls, and its limits.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ZmqOptions {
    /// The endpoint its ROUTER socket binds (`tcp://127.0.0.1:5555`; port 0 picks a free one, which
    /// [`Zmq::endpoint`] tells). Without it the node only calls: it cannot serve a queue or publish to a topic.
    pub bind: Option<String>,
    /// The endpoint its PUB socket binds; by default the bind endpoint's host with a free port.
    pub publish: Option<String>,
    /// Worker endpoints to call.
    pub peers: Vec<String>,
    /// How often each side sends a heartbeat.
    pub heartbeat: Duration,
    /// Heartbeats a peer may miss before it is taken for dead.
    pub liveness: u32,
    /// Requests a client has outstanding at one worker for one queue at most (the worker's own window, its
    /// consumers' prefetch, may be smaller).
    pub window: u32,
    /// Requests a client holds waiting for a worker's window at most; a publish past it gets
    /// [`Error::QueueFull`].
    pub max_waiting: usize,
    /// Requests a worker keeps waiting for a consumer of one queue at most. A client that keeps to the windows
    /// never reaches it; one that sends past them has what is past the bound answered
    /// [`Code::ResourceExhausted`](rpc_core::Code::ResourceExhausted), unrun.
    pub max_backlog: usize,
    /// Limits on what peers send.
    pub limits: Limits,
    /// How long [`Zmq::start`] and [`Zmq::add_peer`] wait for a worker to answer HELLO, a new subscription for
    /// a publisher's sync marker, and a new consumer for its connected clients' SEEN.
    pub handshake_timeout: Duration,
    /// The longest wait between two attempts to reconnect to a worker.
    pub reconnect_max: Duration,
}

impl Default for ZmqOptions {
    fn default() -> ZmqOptions {
        ZmqOptions {
            bind: None,
            publish: None,
            peers: Vec::new(),
            heartbeat: Duration::from_secs(1),
            liveness: 3,
            window: 1_024,
            max_waiting: 65_536,
            max_backlog: 65_536,
            limits: Limits::default(),
            handshake_timeout: Duration::from_secs(5),
            reconnect_max: Duration::from_secs(32),
        }
    }
}

impl ZmqOptions {
    /// No endpoint bound, no peer, heartbeats every second, three missed make a peer dead.
    pub fn new() -> ZmqOptions {
        ZmqOptions::default()
    }

    /// Sets [`ZmqOptions::bind`].
    pub fn bind(mut self, endpoint: impl Into<String>) -> ZmqOptions {
        self.bind = Some(endpoint.into());
        self
    }

    /// Sets [`ZmqOptions::publish`].
    pub fn publish(mut self, endpoint: impl Into<String>) -> ZmqOptions {
        self.publish = Some(endpoint.into());
        self
    }

    /// Sets [`ZmqOptions::peers`].
    pub fn peers<I: IntoIterator<Item = S>, S: Into<String>>(mut self, endpoints: I) -> ZmqOptions {
        self.peers = endpoints.into_iter().map(Into::into).collect();
        self
    }

    /// Sets [`ZmqOptions::heartbeat`] and [`ZmqOptions::liveness`].
    pub fn heartbeat(mut self, every: Duration, liveness: u32) -> ZmqOptions {
        self.heartbeat = every.max(Duration::from_millis(10));
        self.liveness = liveness.max(1);
        self
    }

    /// Sets [`ZmqOptions::window`].
    pub fn window(mut self, window: u32) -> ZmqOptions {
        self.window = window.max(1);
        self
    }

    /// Sets [`ZmqOptions::max_waiting`].
    pub fn max_waiting(mut self, max_waiting: usize) -> ZmqOptions {
        self.max_waiting = max_waiting;
        self
    }

    /// Sets [`ZmqOptions::max_backlog`].
    pub fn max_backlog(mut self, max_backlog: usize) -> ZmqOptions {
        self.max_backlog = max_backlog;
        self
    }

    /// Sets [`ZmqOptions::limits`].
    pub fn limits(mut self, limits: Limits) -> ZmqOptions {
        self.limits = limits;
        self
    }

    /// Sets [`ZmqOptions::handshake_timeout`].
    pub fn handshake_timeout(mut self, timeout: Duration) -> ZmqOptions {
        self.handshake_timeout = timeout;
        self
    }

    /// Sets [`ZmqOptions::reconnect_max`].
    pub fn reconnect_max(mut self, max: Duration) -> ZmqOptions {
        self.reconnect_max = max.max(Duration::from_millis(10));
        self
    }
}

/// A ZeroMQ node as a [`Transport`] (see the module documentation). Cloning shares it; its sockets close when
/// the last clone is dropped.
#[derive(Clone)]
pub struct Zmq {
    inner: Arc<Inner>,
    _alive: Arc<DropGuard>,
}

impl fmt::Debug for Zmq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Zmq").field("node", &self.inner.node).field("endpoint", &self.inner.endpoint).finish()
    }
}

/// What the node's tasks share.
struct Inner {
    node: Uuid,
    options: ZmqOptions,
    /// The ROUTER's bound endpoint.
    endpoint: Option<String>,
    /// Ends every task of the node.
    shutdown: CancellationToken,
    routing: Routing,
    serving: Option<Serving>,
    broadcast: Broadcast,
    inboxes: dashmap::DashMap<String, InboxSink>,
    next_inbox: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Zmq {
    /// Starts a node: binds what [`ZmqOptions::bind`] says and connects to every peer, waiting up to
    /// [`ZmqOptions::handshake_timeout`] for them to answer (a peer that does not is retried in the
    /// background, with backoff).
    ///
    /// # Errors
    /// [`Error::Transport`] when an endpoint cannot be bound; [`Error::InvalidArgument`] for a malformed one.
    pub async fn start(options: ZmqOptions) -> Result<Zmq, Error> {
        let shutdown = CancellationToken::new();
        let node = Uuid::new_v4();
        let (serving, endpoint, publisher) = match &options.bind {
            Some(bind) => {
                let (serving, endpoint) = worker::bind(bind).await?;
                let publish = options.publish.clone().unwrap_or_else(|| any_port(&endpoint));
                let publisher = broadcast::bind(&publish, &shutdown, options.handshake_timeout).await?;
                (Some(serving), Some(endpoint), Some(publisher))
            }
            None => (None, None, None),
        };
        let inner = Arc::new(Inner {
            node,
            routing: Routing::new(),
            serving,
            broadcast: Broadcast::new(publisher),
            endpoint,
            shutdown: shutdown.clone(),
            inboxes: dashmap::DashMap::new(),
            next_inbox: AtomicU64::new(0),
            options,
        });
        if let Some(serving) = &inner.serving {
            serving.start(&inner);
        }
        client::start_sweeper(&inner);
        let zmq = Zmq { inner, _alive: Arc::new(shutdown.drop_guard()) };
        let peers = zmq.inner.options.peers.clone();
        let joined = futures::future::join_all(peers.iter().map(|peer| zmq.add_peer(peer))).await;
        for (peer, result) in peers.iter().zip(joined) {
            if let Err(error) = result {
                tracing::warn!(%peer, %error, "a ZeroMQ peer did not answer; retrying in the background");
            }
        }
        Ok(zmq)
    }

    /// The endpoint this node's ROUTER socket is bound to, for peers to connect to.
    pub fn endpoint(&self) -> Option<&str> {
        self.inner.endpoint.as_deref()
    }

    /// The endpoint this node's PUB socket is bound to.
    pub fn publish_endpoint(&self) -> Option<&str> {
        self.inner.broadcast.endpoint()
    }

    /// This node's id, as peers know it.
    pub fn node(&self) -> Uuid {
        self.inner.node
    }

    /// Connects to the worker at `endpoint` (nothing is done if it is connected already, or being connected)
    /// and waits for its READY, and for this node's subscriptions to sync with its PUB socket. A worker that
    /// goes away is reconnected to, with backoff, until this node is dropped.
    ///
    /// # Errors
    /// [`Error::Timeout`] when the worker did not answer within [`ZmqOptions::handshake_timeout`] (it is still
    /// being connected to in the background).
    pub async fn add_peer(&self, endpoint: &str) -> Result<(), Error> {
        let timeout = self.inner.options.handshake_timeout;
        client::connect(&self.inner, endpoint);
        let publisher = tokio::time::timeout(timeout, self.inner.routing.ready(endpoint))
            .await
            .map_err(|_| Error::Timeout(timeout))?;
        if let Some((node, publishes)) = publisher {
            broadcast::found_publisher(&self.inner, node, &publishes).await;
        }
        Ok(())
    }

    /// How many workers this node is connected to and has heard from lately.
    pub fn live_workers(&self) -> usize {
        self.inner.routing.live_workers()
    }
}

/// `endpoint` with its port replaced by 0: another free port on the same interface.
fn any_port(endpoint: &str) -> String {
    match endpoint.rsplit_once(':') {
        Some((host, _port)) => format!("{host}:0"),
        None => endpoint.to_owned(),
    }
}

impl Inner {
    fn serving(&self) -> Result<&Serving, Error> {
        self.serving.as_ref().ok_or(Error::Unsupported("serving a queue from a ZeroMQ node that binds no endpoint"))
    }

    /// The inbox address's node, if it is one of this transport's kind.
    fn inbox_node(address: &str) -> Option<Uuid> {
        let rest = address.strip_prefix(INBOX_PREFIX)?;
        let (node, _) = rest.split_once('/')?;
        Uuid::try_parse(node).ok()
    }

    fn publish(&self, queue: &str, envelope: Envelope) -> Result<(), Error> {
        super::refuse_delay(&envelope)?;
        if envelope.priority.is_some() {
            return Err(Error::Unsupported("priorities"));
        }
        if let Some(node) = Inner::inbox_node(queue) {
            return self.reply(node, queue, envelope);
        }
        check_name(queue)?;
        let bytes = rpc_core::codec::encode_envelope(&envelope)?;
        self.routing.publish(queue, bytes, envelope.deadline_ms, &self.options)
    }

    /// Sends a reply to the inbox `address` of `node`, outside of any delivery's settle.
    fn reply(&self, node: Uuid, address: &str, envelope: Envelope) -> Result<(), Error> {
        if node == self.node {
            self.deliver_to_inbox(address, envelope);
            return Ok(());
        }
        let serving = self.serving.as_ref().ok_or_else(|| Error::NoRoute(address.to_owned()))?;
        let bytes = rpc_core::codec::encode_envelope(&envelope)?;
        serving.answer_node(node, address, bytes)
    }

    /// Hands a reply to this node's inbox `address`; a reply for an inbox that is gone is dropped.
    fn deliver_to_inbox(&self, address: &str, envelope: Envelope) {
        let delivery = Delivery {
            envelope: Arc::new(envelope),
            delivery_count: 1,
            queued: Duration::ZERO,
            received_at: std::time::Instant::now(),
            handle: rpc_core::transport::AckHandle::auto(),
        };
        match self.inboxes.get(address) {
            Some(inbox) => match inbox.direct.get() {
                Some(sink) => sink(delivery),
                None => {
                    let _ = inbox.channel.send(delivery);
                }
            },
            None => tracing::debug!(inbox = %address, "a reply for an inbox that is closed; dropped"),
        }
    }
}

/// Refuses an empty or overlong queue name, which a peer would refuse.
fn check_name(name: &str) -> Result<(), Error> {
    if name.is_empty() || name.len() > wire::MAX_NAME {
        return Err(Error::InvalidArgument(format!(
            "a queue name of {} bytes; 1 to {} are allowed",
            name.len(),
            wire::MAX_NAME
        )));
    }
    Ok(())
}

impl Transport for Zmq {
    fn system(&self) -> &'static str {
        "zeromq"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::none().requeue(true)
    }

    fn declare_queue<'a>(&'a self, queue: &'a str, options: &'a QueueOptions) -> BoxFuture<'a, Result<(), Error>> {
        let refused = if options.durable {
            Err(Error::Unsupported("durable queues on ZeroMQ (a request lives in its caller's memory)"))
        } else if options.max_len.is_some() {
            Err(Error::Unsupported("a maximum queue length on ZeroMQ (there is no queue between the processes)"))
        } else if options.max_deliveries.is_some() {
            Err(Error::Unsupported("a maximum number of deliveries on ZeroMQ (it has no dead-letter queue)"))
        } else {
            check_name(queue)
        };
        Box::pin(std::future::ready(refused))
    }

    fn publish<'a>(&'a self, queue: &'a str, envelope: Envelope, confirm: Confirm) -> BoxFuture<'a, Result<(), Error>> {
        let _ = confirm;
        rpc_core::transport::finished(self.inner.publish(queue, envelope))
    }

    fn publish_topic<'a>(&'a self, topic: &'a str, envelope: Envelope) -> BoxFuture<'a, Result<(), Error>> {
        let published = check_name(topic).and_then(|()| {
            let bytes = rpc_core::codec::encode_envelope(&envelope)?;
            self.inner.broadcast.publish(topic, bytes)
        });
        rpc_core::transport::finished(published)
    }

    fn consume<'a>(&'a self, queue: &'a str, options: ConsumeOptions) -> BoxFuture<'a, Result<Consumer, Error>> {
        Box::pin(async move {
            check_name(queue)?;
            let serving = self.inner.serving()?;
            serving.consume(&self.inner, queue, options).await
        })
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        options: ConsumeOptions,
    ) -> BoxFuture<'a, Result<Consumer, Error>> {
        // Each subscription is a SUB socket of its own: a group of one, whatever its name.
        let _ = (group, options);
        Box::pin(async move {
            check_name(topic)?;
            broadcast::subscribe(&self.inner, topic).await
        })
    }

    /// A SUB socket of its own, as every subscription here: nothing outlives it.
    fn subscribe_private<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Consumer, Error>> {
        Box::pin(async move {
            check_name(topic)?;
            broadcast::subscribe(&self.inner, topic).await
        })
    }

    fn open_inbox(&self) -> BoxFuture<'_, Result<Inbox, Error>> {
        let n = self.inner.next_inbox.fetch_add(1, Ordering::Relaxed);
        let address = format!("{INBOX_PREFIX}{}/{n}", self.inner.node.simple());
        let (channel, receiver) = tokio::sync::mpsc::unbounded_channel();
        let direct = Arc::new(std::sync::OnceLock::new());
        self.inner.inboxes.insert(address.clone(), InboxSink { channel, direct: Arc::clone(&direct) });
        let control = InboxControl { inner: Arc::clone(&self.inner), address: address.clone(), direct };
        let consumer = Consumer::from_channel(receiver, Some(Box::new(control)));
        Box::pin(std::future::ready(Ok(Inbox { address, consumer, losses: None })))
    }

    fn delete_queue<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        // Nothing holds a queue but the callers: this one drops the requests it holds waiting for a worker.
        let deleted = if Inner::inbox_node(queue).is_some() {
            Err(Error::InvalidArgument(format!("{queue} is an inbox, not a queue")))
        } else {
            self.inner.routing.delete(queue);
            Ok(())
        };
        Box::pin(std::future::ready(deleted))
    }
}

/// Where the replies to an inbox go: its consumer's channel, or the sink it asked for
/// ([`Consumer::direct`]), called on the task that reads the worker's connection.
struct InboxSink {
    channel: tokio::sync::mpsc::UnboundedSender<Delivery>,
    direct: Arc<std::sync::OnceLock<DeliverySink>>,
}

/// Closes an inbox with its consumer.
struct InboxControl {
    inner: Arc<Inner>,
    address: String,
    direct: Arc<std::sync::OnceLock<DeliverySink>>,
}

impl ConsumerControl for InboxControl {
    fn pause(&self) {}

    fn direct(&self, sink: DeliverySink) -> bool {
        self.direct.set(sink).is_ok()
    }
}

impl Drop for InboxControl {
    fn drop(&mut self) {
        self.inner.inboxes.remove(&self.address);
    }
}

/// The announcement of what a worker serves: each queue with the window one client gets there.
type Queues = BTreeMap<String, u32>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_inbox_address_names_its_node() {
        let node = Uuid::new_v4();
        assert_eq!(Inner::inbox_node(&format!("zmq-inbox/{}/3", node.simple())), Some(node));
        assert_eq!(Inner::inbox_node("ns.Calculator"), None);
        assert_eq!(Inner::inbox_node("zmq-inbox/not-a-node/3"), None);
        assert_eq!(any_port("tcp://127.0.0.1:5555"), "tcp://127.0.0.1:0");
    }
}
