//! RabbitMQ (AMQP 0-9-1) through lapin: feature `amqp`.
//!
//! | contract | RabbitMQ |
//! |---|---|
//! | queue | a durable queue; classic with `x-max-priority: 9`, or a quorum queue when [`AmqpOptions::quorum`] is set or the queue has a maximum number of deliveries (`x-delivery-limit`) |
//! | publish | the default exchange, `mandatory`, publisher confirms: an unroutable request is [`Error::NoRoute`], a nack [`Error::QueueFull`] |
//! | call | a transient request with the reply to this transport's reply queue, to a queue whose worker's replies said it has no maximum length, is published `mandatory` on a channel without confirms: the reply proves it arrived, and a return fails the call with [`Error::NoRoute`] within [`RETURNS_POLL`] |
//! | max length | `x-max-length` with `x-overflow: reject-publish` |
//! | dead letters | `x-dead-letter-exchange: ""` routing to `<queue>.dlq` |
//! | consume | one channel per consumer, `basic.qos` prefetch, manual acks |
//! | topic | a durable fanout exchange; subscriber group `g` of topic `t` is the durable queue `t@g` bound to it |
//! | inbox | an exclusive auto-delete queue `mqrpc.inbox.<uuid>` per client, or direct reply-to ([`AmqpOptions::direct_reply_to`]) |
//!
//! Message properties: `message_id` (the envelope id), `correlation_id`, `reply_to`, `type` (the method),
//! `expiration` (the time budget: RabbitMQ moves a request that expired while queued to its dead-letter queue),
//! `priority`, `content_type: application/msgpack`, `timestamp`, `delivery_mode` 2 (persistent) for every
//! message but a reply; the other
//! envelope fields are the `mqrpc-*` headers of [`crate::adapter::headers`], and user headers travel as headers.
//! The body is the MessagePack of the arguments or the result. A plain AMQP client calls a service by
//! publishing the MessagePack map of the arguments to the service's queue with `reply_to`, `correlation_id` and
//! `type` set, and reads the reply's body (and `mqrpc-status`, absent when ok) from its reply queue.
//!
//! Credentials and TLS: the URL's user, password and virtual host (`amqp://user:password@host:port/vhost`;
//! refusals are [`Error::Unauthorized`], and no error or `Debug` output shows the password); `amqps://` for TLS,
//! trusting the system's roots and those of [`AmqpOptions::tls_roots_pem`], presenting the client certificate
//! of [`AmqpOptions::tls_client_pem`] to a broker that verifies clients.
//!
//! The connection is supervised: when it is lost, publishes fail at once with [`Error::Disconnected`] while it
//! reconnects with exponential backoff and jitter; then it declares its queues, exchanges, bindings and inboxes
//! again (an inbox keeps its name) and restarts its consumers, whose streams go on. Deliveries handed out
//! before the loss were requeued by RabbitMQ; settling them reports [`Error::Disconnected`].
//!
//! ```no_run
//! # async fn run() -> Result<(), rpc_core::Error> {
//! let transport = rpc_broker::adapter::amqp::Amqp::connect("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
//! let client = rpc_core::Client::builder(transport).connect().await?;
//! # drop(client);
//! # Ok(())
//! # }
//! ```

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::Poll;
use std::time::Duration;

use futures::StreamExt;
use lapin::Confirmation;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use rpc_core::transport::{BoxFuture, Confirm, Consumer, Inbox};
use rpc_core::{Capabilities, ConsumeOptions, Envelope, Error, Kind, QueueOptions, QueueStats, ReplyTo, Transport};
use tokio::sync::{Notify, watch};
use uuid::Uuid;

use self::connection::{ADMIN_CHANNELS, Conn, Topology, close_connection, supervise};
use self::consumer::{Logical, Target};
use self::mapping::{short, to_amqp};
use super::{CounterMap, Counters};

mod connection;
mod consumer;
mod mapping;

/// How often the requests RabbitMQ returned unroutable from the unconfirmed channel are collected, while
/// calls published there wait; lapin keeps them without telling anyone.
pub const RETURNS_POLL: Duration = Duration::from_millis(20);
/// Ids of returned calls kept for the waiting calls to find theirs.
const RETURNED_KEPT: usize = 1_024;
/// Every reply queue this transport declares starts with this.
const INBOX_PREFIX: &str = "mqrpc.inbox.";
/// The pseudo-queue of RabbitMQ's direct reply-to.
const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";
/// Queue names known to exist are remembered up to this many; past it the memory starts again.
const KNOWN_QUEUES_MAX: usize = 4_096;

/// How an [`Amqp`] transport declares queues and replies, and how it reconnects.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct AmqpOptions {
    /// Declare every request and callback queue as a quorum queue (replicated; no priorities).
    pub quorum: bool,
    /// Replies come through RabbitMQ's direct reply-to instead of a reply queue per client: cheaper, but a
    /// reply is lost if the client is gone, and the inbox cannot outlive a reconnection.
    pub direct_reply_to: bool,
    /// Queues declared by this transport are deleted by RabbitMQ after this long unused (`x-expires`).
    pub queue_expires: Option<Duration>,
    /// Requests are published persistent (`delivery_mode` 2), so that a durable queue keeps them over a broker
    /// restart. Replies are always transient.
    pub persistent: bool,
    /// The longest wait between two reconnection attempts.
    pub max_backoff: Duration,
    /// What an `amqps://` connection trusts and presents beyond the system's roots.
    tls: AmqpTls,
}

/// The TLS settings of an `amqps://` connection. Its `Debug` shows no key.
#[derive(Clone, Default)]
struct AmqpTls {
    /// PEM certificates trusted as roots, besides the system's.
    roots: Option<String>,
    /// The client's certificate chain and private key, both PEM.
    client: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for AmqpTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpTls")
            .field("roots", &self.roots.is_some())
            .field("client", &self.client.as_ref().map(|_| "***"))
            .finish()
    }
}

impl Default for AmqpOptions {
    fn default() -> AmqpOptions {
        AmqpOptions {
            quorum: false,
            direct_reply_to: false,
            queue_expires: None,
            persistent: true,
            max_backoff: Duration::from_secs(5),
            tls: AmqpTls::default(),
        }
    }
}

impl AmqpOptions {
    /// Classic durable queues, persistent requests, a reply queue per client.
    pub fn new() -> AmqpOptions {
        AmqpOptions::default()
    }

    /// Sets [`AmqpOptions::quorum`].
    pub fn quorum(mut self, quorum: bool) -> AmqpOptions {
        self.quorum = quorum;
        self
    }

    /// Sets [`AmqpOptions::direct_reply_to`].
    pub fn direct_reply_to(mut self, direct: bool) -> AmqpOptions {
        self.direct_reply_to = direct;
        self
    }

    /// Sets [`AmqpOptions::queue_expires`].
    pub fn queue_expires(mut self, expires: Duration) -> AmqpOptions {
        self.queue_expires = Some(expires);
        self
    }

    /// Sets [`AmqpOptions::persistent`].
    pub fn persistent(mut self, persistent: bool) -> AmqpOptions {
        self.persistent = persistent;
        self
    }

    /// Sets [`AmqpOptions::max_backoff`].
    pub fn max_backoff(mut self, backoff: Duration) -> AmqpOptions {
        self.max_backoff = backoff;
        self
    }

    /// Trusts the certificates in `pem` (PEM text), besides the system's roots, for an `amqps://` URL: a
    /// broker whose certificate a private authority signed.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `pem` holds no certificate.
    pub fn tls_roots_pem(mut self, pem: &[u8]) -> Result<AmqpOptions, Error> {
        super::check_certificates(pem)?;
        let text = std::str::from_utf8(pem)
            .map_err(|_| Error::InvalidArgument("the certificates' PEM is not UTF-8 text".into()))?;
        let roots = self.tls.roots.get_or_insert_with(String::new);
        roots.push_str(text);
        roots.push('\n');
        Ok(self)
    }

    /// Presents the certificate chain in `cert_pem` and the private key in `key_pem` (PEM text) when the
    /// broker verifies clients (RabbitMQ's `ssl_options.verify = verify_peer`).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the PEM holds no certificate or no key.
    pub fn tls_client_pem(mut self, cert_pem: &[u8], key_pem: &[u8]) -> Result<AmqpOptions, Error> {
        super::check_client_pem(cert_pem, key_pem)?;
        self.tls.client = Some((cert_pem.to_vec(), key_pem.to_vec()));
        Ok(self)
    }
}

/// A transport on RabbitMQ. Cheap to clone: clones share one supervised connection.
#[derive(Clone)]
pub struct Amqp {
    inner: Arc<Inner>,
}

impl fmt::Debug for Amqp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Amqp")
            .field("urls", &self.inner.urls.iter().map(|url| super::redact_url(url)).collect::<Vec<_>>())
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

struct Inner {
    /// The nodes' URLs: one node's, or a cluster's nodes to try in turn.
    urls: Vec<String>,
    /// The index in `urls` of the node to try first: the one last connected to, or the next after it once that
    /// connection is lost.
    first_url: AtomicUsize,
    options: AmqpOptions,
    conn: watch::Sender<Option<Arc<Conn>>>,
    topology: Mutex<Topology>,
    consumers: Mutex<HashMap<u64, Logical>>,
    next_consumer: AtomicU64,
    generation: AtomicU64,
    known_queues: Mutex<HashSet<String>>,
    /// Queues whose existence a task is checking now.
    learning: Mutex<HashSet<String>>,
    /// Queues a worker's reply said have no maximum length: calls go there without confirms.
    unbounded: Mutex<HashSet<String>>,
    counters: CounterMap,
    closed: AtomicBool,
    /// Bounds the short-lived channels of declares and checks (RabbitMQ limits channels per connection).
    admin: tokio::sync::Semaphore,
    /// One existence check at a time, so that a burst of first calls to a queue checks it once.
    checking: tokio::sync::Mutex<()>,
    /// Bumped whenever the connection is lost, and the reply queues with it (they are exclusive).
    losses: watch::Sender<u64>,
    /// Consumer cancels and channel closes under way. A channel's close-ok comes once RabbitMQ has handled
    /// everything sent on it before, acks included.
    closing: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Calls published without a confirm.
    quiet: Arc<Quiet>,
}

/// The calls published on the unconfirmed channel, and what RabbitMQ returned of them.
#[derive(Default)]
struct Quiet {
    /// Calls whose publish future waits for a return; the collector sleeps while there are none.
    waiting: AtomicUsize,
    /// Wakes the collector when the first call starts waiting, and when the transport goes.
    wake: Notify,
    /// The ids of the latest returned calls, newest last; each batch bumps the version.
    returned: watch::Sender<VecDeque<Uuid>>,
}

/// Counts a call among [`Quiet::waiting`] while it lives.
struct Waiting<'a>(&'a Quiet);

impl<'a> Waiting<'a> {
    fn new(quiet: &'a Quiet) -> Waiting<'a> {
        if quiet.waiting.fetch_add(1, Ordering::AcqRel) == 0 {
            quiet.wake.notify_waiters();
        }
        Waiting(quiet)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Inner {
    fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
        mutex.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn current(&self) -> Result<Arc<Conn>, Error> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Shutdown);
        }
        self.conn.borrow().clone().ok_or(Error::Disconnected)
    }

    fn remember(&self, queue: &str) {
        let mut known = Inner::lock(&self.known_queues);
        if known.len() >= KNOWN_QUEUES_MAX {
            known.clear();
        }
        known.insert(queue.to_owned());
    }

    /// Checks in a task of its own whether `queue` exists, and remembers it if so; one check per queue at once.
    fn learn(self: &Arc<Self>, queue: &str) {
        if !Inner::lock(&self.learning).insert(queue.to_owned()) {
            return;
        }
        let inner = Arc::clone(self);
        let queue = queue.to_owned();
        tokio::spawn(async move {
            if let Ok(conn) = inner.current()
                && let Ok(Some(_)) = inner.inspect(&conn, &queue).await
            {
                inner.remember(&queue);
            }
            Inner::lock(&inner.learning).remove(&queue);
        });
    }

    fn forget(&self, queue: &str) {
        Inner::lock(&self.known_queues).remove(queue);
        Inner::lock(&self.unbounded).remove(queue);
    }

    /// Remembers what a reply's [`headers::UNBOUNDED_QUEUE`](super::headers::UNBOUNDED_QUEUE) says.
    fn mark_unbounded(&self, queue: &str) {
        let mut unbounded = Inner::lock(&self.unbounded);
        if !unbounded.contains(queue) {
            if unbounded.len() >= KNOWN_QUEUES_MAX {
                unbounded.clear();
            }
            unbounded.insert(queue.to_owned());
        }
    }

    fn is_unbounded(&self, queue: &str) -> bool {
        Inner::lock(&self.unbounded).contains(queue)
    }

    fn is_known(&self, queue: &str) -> bool {
        queue.starts_with(DIRECT_REPLY_TO) || Inner::lock(&self.known_queues).contains(queue)
    }

    fn publish_to<'a>(
        &'a self,
        exchange: &'a str,
        queue: &'a str,
        envelope: Envelope,
    ) -> BoxFuture<'a, Result<(), Error>> {
        // The message is made before the future, which holds only what the publish and its confirm need: the
        // future is one allocation per message.
        let topic = !exchange.is_empty();
        let prepared = super::refuse_delay(&envelope).and_then(|()| {
            let conn = self.current()?;
            let (properties, body) = to_amqp(&envelope, self.options.persistent)?;
            let names = if topic { (short(exchange)?, ShortString::from("")) } else { ("".into(), short(queue)?) };
            Ok((conn, properties, body, names))
        });
        let (conn, properties, body, (exchange_name, routing_key)) = match prepared {
            Ok(prepared) => prepared,
            Err(error) => return Box::pin(std::future::ready(Err(error))),
        };
        let (id, kind) = (envelope.id, envelope.kind);
        drop(envelope);
        let options = BasicPublishOptions { mandatory: !topic, ..BasicPublishOptions::default() };
        Box::pin(async move {
            let mut publish =
                std::pin::pin!(conn.publisher.basic_publish(exchange_name, routing_key, options, &body, properties));
            // Its first poll takes the delivery tag and queues the frames; under `publish_order`, no other
            // publish comes between (see `Conn::publish_order`).
            let first = std::future::poll_fn(|context| {
                let _order = conn.publish_order.lock().unwrap_or_else(PoisonError::into_inner);
                Poll::Ready(publish.as_mut().poll(context))
            })
            .await;
            let sent = match first {
                Poll::Ready(sent) => sent,
                Poll::Pending => publish.await,
            };
            let confirm = sent.map_err(|error| conn.publish_error(error))?;
            let confirmation = confirm.await.map_err(|error| conn.publish_error(error))?;
            let name = if topic { exchange } else { queue };
            match confirmation {
                Confirmation::Ack(None) | Confirmation::NotRequested => {}
                Confirmation::Ack(Some(returned)) => {
                    // A return rides on the next confirm of the channel, which may be another publish's.
                    self.forget(returned.routing_key.as_str());
                    let returned_id = returned.properties.message_id().as_ref().map(ShortString::as_str);
                    if returned_id == Some(id.to_string().as_str()) {
                        return Err(Error::NoRoute(queue.to_owned()));
                    }
                }
                Confirmation::Nack(_) => {
                    Counters::bump(&self.counters.of(name).rejected);
                    return Err(Error::QueueFull(name.to_owned()));
                }
            }
            // A return may have been attached to another publish's confirm: the first publish to a queue checks
            // that it exists, so that a call to a service with no queue fails at once. Rare: boxed.
            if !topic && !self.is_known(queue) && kind != Kind::Reply {
                return Box::pin(self.check_exists(&conn, queue)).await;
            }
            Counters::bump(&self.counters.of(name).published);
            Ok(())
        })
    }

    /// After the first publish to `queue`: fails with [`Error::NoRoute`] if it does not exist.
    async fn check_exists(&self, conn: &Arc<Conn>, queue: &str) -> Result<(), Error> {
        let _checking = self.checking.lock().await;
        if !self.is_known(queue) {
            match self.inspect(conn, queue).await? {
                Some(_) => self.remember(queue),
                None => return Err(Error::NoRoute(queue.to_owned())),
            }
        }
        Counters::bump(&self.counters.of(queue).published);
        Ok(())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The collector of returns finds the transport gone and ends.
        self.quiet.wake.notify_waiters();
        if let Some(conn) = self.conn.borrow().clone() {
            close_connection(conn);
        }
    }
}

impl Amqp {
    /// Connects to RabbitMQ at `url` (`amqp://user:password@host:port/vhost`, or `amqps://` for TLS) with the
    /// default options.
    ///
    /// `url` is one node's, or a cluster's nodes separated by commas: the transport connects to the first that
    /// answers, and after a connection is lost tries the next node first (the lost one may be down), going round
    /// the list until one answers.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a `url` that names no node, [`Error::Transport`] when no node can be
    /// reached, [`Error::Unauthorized`] when a node refuses the credentials.
    pub async fn connect(url: &str) -> Result<Amqp, Error> {
        Amqp::connect_with(url, AmqpOptions::default()).await
    }

    /// Connects with `options`.
    ///
    /// # Errors
    /// As [`Amqp::connect`].
    pub async fn connect_with(url: &str, options: AmqpOptions) -> Result<Amqp, Error> {
        let urls: Vec<String> =
            url.split(',').map(str::trim).filter(|url| !url.is_empty()).map(str::to_owned).collect();
        if urls.is_empty() {
            return Err(Error::InvalidArgument("no RabbitMQ URL given".into()));
        }
        let (conn, _) = watch::channel(None);
        let inner = Arc::new(Inner {
            urls,
            first_url: AtomicUsize::new(0),
            options,
            conn,
            topology: Mutex::new(Topology::default()),
            consumers: Mutex::new(HashMap::new()),
            next_consumer: AtomicU64::new(1),
            generation: AtomicU64::new(0),
            known_queues: Mutex::new(HashSet::new()),
            learning: Mutex::new(HashSet::new()),
            unbounded: Mutex::new(HashSet::new()),
            counters: CounterMap::default(),
            closed: AtomicBool::new(false),
            admin: tokio::sync::Semaphore::new(ADMIN_CHANNELS),
            checking: tokio::sync::Mutex::new(()),
            losses: watch::Sender::new(0),
            closing: Mutex::new(Vec::new()),
            quiet: Arc::default(),
        });
        let first = Arc::new(inner.open().await?);
        let events = first.connection.events_listener();
        inner.conn.send_replace(Some(first));
        tokio::spawn(supervise(Arc::downgrade(&inner), events.boxed()));
        tokio::spawn(collect_returns(Arc::downgrade(&inner), Arc::clone(&inner.quiet)));
        Ok(Amqp { inner })
    }

    /// Whether the connection is up now.
    pub fn is_connected(&self) -> bool {
        self.inner.conn.borrow().is_some()
    }

    /// Waits until the connection is up (at once if it is).
    pub async fn connected(&self) {
        let mut changes = self.inner.conn.subscribe();
        let _ = changes.wait_for(Option::is_some).await;
    }

    /// Closes the connection: consumers end, unacked deliveries are requeued by RabbitMQ, and every later
    /// operation fails with [`Error::Shutdown`].
    pub async fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        if let Some(conn) = self.inner.conn.send_replace(None) {
            let _ = conn.connection.close(200, "closed by the application".into()).await;
        }
        Inner::lock(&self.inner.consumers).clear();
    }
}

/// Collects the calls RabbitMQ returned unroutable from the unconfirmed channel, every [`RETURNS_POLL`] while
/// calls wait there, and tells them; the queue they were sent to is checked again by the next call.
async fn collect_returns(inner: Weak<Inner>, quiet: Arc<Quiet>) {
    loop {
        let woken = quiet.wake.notified();
        let mut woken = std::pin::pin!(woken);
        // Enabled before the check, so that a call that starts waiting in between wakes it.
        woken.as_mut().enable();
        if quiet.waiting.load(Ordering::Acquire) == 0 {
            woken.await;
        }
        tokio::time::sleep(RETURNS_POLL).await;
        let conn = match inner.upgrade() {
            None => return,
            Some(strong) if strong.closed.load(Ordering::Acquire) => return,
            Some(strong) => strong.conn.borrow().clone(),
        };
        let Some(conn) = conn else { continue };
        // Without confirms, this only takes what lapin holds.
        let returned = conn.unconfirmed.wait_for_confirms().await.unwrap_or_default();
        drop(conn);
        if returned.is_empty() {
            continue;
        }
        let Some(strong) = inner.upgrade() else { return };
        let mut ids = Vec::with_capacity(returned.len());
        for message in &returned {
            strong.forget(message.routing_key.as_str());
            let id = message.properties.message_id().as_ref().and_then(|id| Uuid::parse_str(id.as_str()).ok());
            ids.extend(id);
        }
        tracing::debug!(returned = returned.len(), "RabbitMQ returned unroutable calls");
        quiet.returned.send_modify(|kept| {
            kept.extend(ids);
            let excess = kept.len().saturating_sub(RETURNED_KEPT);
            kept.drain(..excess);
        });
    }
}

impl Amqp {
    /// A call's request published without a confirm where that is safe ([`Confirm::ByReply`]).
    fn publish_quiet<'a>(&'a self, queue: &'a str, envelope: Envelope) -> BoxFuture<'a, Result<(), Error>> {
        // One lookup on the way of most calls: a queue said to be unbounded is known.
        let unbounded = envelope.kind == Kind::Request && self.inner.is_unbounded(queue);
        if !unbounded {
            if envelope.kind == Kind::Request && !self.inner.is_known(queue) {
                // The confirmed publish checks the queue after its confirm, but the reply usually comes first
                // and the caller drops the check with the publish: a check of its own learns it.
                self.inner.learn(queue);
            }
            return self.inner.publish_to("", queue, envelope);
        }
        // A persistent request keeps its confirm: it says the request is on disk. Direct reply-to needs the
        // request on the channel that consumes the replies, which confirms.
        let to_inbox = envelope.reply_to.as_ref().is_some_and(ReplyTo::is_inbox) && !self.inner.options.direct_reply_to;
        let conn = match self.inner.current() {
            Ok(conn) => conn,
            Err(error) => return Box::pin(std::future::ready(Err(error))),
        };
        // A full queue drops an unconfirmed publish without a word: only a queue that a worker's reply said
        // has no maximum length (above) takes them.
        if !to_inbox
            || self.inner.options.persistent
            || envelope.delay_ms.is_some()
            || !conn.unconfirmed.status().connected()
        {
            return self.inner.publish_to("", queue, envelope);
        }
        // A connection lost meanwhile takes the reply queue with it, which fails the call with `ReplyLost`; an
        // unroutable request comes back and fails it with `NoRoute`.
        let prepared = to_amqp(&envelope, false).and_then(|message| Ok((message, short(queue)?)));
        let ((properties, body), routing_key) = match prepared {
            Ok(prepared) => prepared,
            Err(error) => return Box::pin(std::future::ready(Err(error))),
        };
        let id = envelope.id;
        drop(envelope);
        // Subscribed before the publish, so that its return cannot be missed.
        let mut returned = self.inner.quiet.returned.subscribe();
        Box::pin(async move {
            let _waiting = Waiting::new(&self.inner.quiet);
            let options = BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() };
            let _unconfirmed = conn
                .unconfirmed
                .basic_publish("".into(), routing_key, options, &body, properties)
                .await
                .map_err(|error| conn.error_on(&conn.unconfirmed, error))?;
            drop(conn);
            Counters::bump(&self.inner.counters.of(queue).published);
            loop {
                if returned.changed().await.is_err() {
                    return Err(Error::Shutdown);
                }
                if returned.borrow_and_update().contains(&id) {
                    return Err(Error::NoRoute(queue.to_owned()));
                }
            }
        })
    }

    /// An unconfirmed publish, for a reply to an inbox: a caller's reply queue is transient, and a confirm adds
    /// no guarantee, only a round trip. Not mandatory, so a reply queue that is gone drops the reply, as a
    /// caller that gave up would.
    fn publish_unconfirmed<'a>(&'a self, reply_to: &'a str, reply: Envelope) -> BoxFuture<'a, Result<(), Error>> {
        // The message is made before the future, as in `publish_to`.
        let prepared = self.inner.current().and_then(|conn| {
            let (properties, body) = to_amqp(&reply, false)?;
            Ok((conn, properties, body, short(reply_to)?))
        });
        let (conn, properties, body, routing_key) = match prepared {
            Ok(prepared) => prepared,
            Err(error) => return Box::pin(std::future::ready(Err(error))),
        };
        drop(reply);
        Box::pin(async move {
            // Not on the confirming channel: lapin would keep every confirm nobody waits for.
            let _unconfirmed = conn
                .unconfirmed
                .basic_publish("".into(), routing_key, BasicPublishOptions::default(), &body, properties)
                .await
                .map_err(|error| conn.error_on(&conn.unconfirmed, error))?;
            // No counter per reply address: a worker answers many callers over its life, and each would keep
            // one.
            Ok(())
        })
    }
}

impl Transport for Amqp {
    fn system(&self) -> &'static str {
        "rabbitmq"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::none()
            .durable(true)
            .acks(true)
            .priority(!self.inner.options.quorum)
            .max_length(true)
            .dead_letter(true)
            .requeue(true)
            .subscriber_groups(true)
            .queue_stats(true)
    }

    fn declare_queue<'a>(&'a self, queue: &'a str, options: &'a QueueOptions) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let conn = self.inner.current()?;
            match self.inner.declare_on(&conn, queue, options).await {
                Ok(()) => {}
                // Declaring with the defaults accepts the queue as it is.
                Err(Error::InvalidArgument(_)) if *options == QueueOptions::new() => {
                    self.inner.remember(queue);
                    return Ok(());
                }
                Err(error) => return Err(error),
            }
            Inner::lock(&self.inner.topology).queues.entry(queue.to_owned()).or_insert_with(|| options.clone());
            self.inner.remember(queue);
            Ok(())
        })
    }

    fn publish<'a>(&'a self, queue: &'a str, envelope: Envelope, confirm: Confirm) -> BoxFuture<'a, Result<(), Error>> {
        match confirm {
            Confirm::Broker => self.inner.publish_to("", queue, envelope),
            Confirm::ByReply => self.publish_quiet(queue, envelope),
            _ => self.publish_unconfirmed(queue, envelope),
        }
    }

    fn publish_topic<'a>(&'a self, topic: &'a str, envelope: Envelope) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let conn = self.inner.current()?;
            let known = Inner::lock(&self.inner.topology).exchanges.contains(topic);
            if !known {
                self.inner.declare_exchange(&conn, topic).await?;
                Inner::lock(&self.inner.topology).exchanges.insert(topic.to_owned());
            }
            self.inner.publish_to(topic, "", envelope).await
        })
    }

    fn consume<'a>(&'a self, queue: &'a str, options: ConsumeOptions) -> BoxFuture<'a, Result<Consumer, Error>> {
        Box::pin(self.consumer(Target::Queue(queue.to_owned()), options))
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        options: ConsumeOptions,
    ) -> BoxFuture<'a, Result<Consumer, Error>> {
        Box::pin(async move {
            let conn = self.inner.current()?;
            let queue = format!("{topic}@{group}");
            self.inner.declare_exchange(&conn, topic).await?;
            self.inner.declare_on(&conn, &queue, &QueueOptions::new()).await?;
            self.inner.bind(&conn, &queue, topic).await?;
            {
                let mut topology = Inner::lock(&self.inner.topology);
                topology.exchanges.insert(topic.to_owned());
                topology.queues.entry(queue.clone()).or_default();
                topology.bindings.insert((queue.clone(), topic.to_owned()));
            }
            self.consumer(Target::Queue(queue), options).await
        })
    }

    /// An exclusive, auto-delete queue bound to the topic's fanout exchange: RabbitMQ deletes it with its
    /// connection, and this transport with its consumer.
    fn subscribe_private<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Consumer, Error>> {
        Box::pin(async move {
            let conn = self.inner.current()?;
            let name = format!("{INBOX_PREFIX}{}", Uuid::new_v4().simple());
            self.inner.declare_exchange(&conn, topic).await?;
            self.inner.declare_inbox(&conn, &name).await?;
            self.inner.bind(&conn, &name, topic).await?;
            {
                let mut topology = Inner::lock(&self.inner.topology);
                topology.exchanges.insert(topic.to_owned());
                topology.inboxes.insert(name.clone());
                topology.bindings.insert((name.clone(), topic.to_owned()));
            }
            self.consumer(Target::Inbox(name), ConsumeOptions::new().auto_ack(true)).await
        })
    }

    fn open_inbox(&self) -> BoxFuture<'_, Result<Inbox, Error>> {
        Box::pin(async move {
            let conn = self.inner.current()?;
            if self.inner.options.direct_reply_to {
                let consumer = self.consumer(Target::DirectReply, ConsumeOptions::new().auto_ack(true)).await?;
                let losses = Some(self.inner.losses.subscribe());
                return Ok(Inbox { address: DIRECT_REPLY_TO.to_owned(), consumer, losses });
            }
            let name = format!("{INBOX_PREFIX}{}", Uuid::new_v4().simple());
            self.inner.declare_inbox(&conn, &name).await?;
            Inner::lock(&self.inner.topology).inboxes.insert(name.clone());
            let consumer = self.consumer(Target::Inbox(name.clone()), ConsumeOptions::new().auto_ack(true)).await?;
            Ok(Inbox { address: name, consumer, losses: Some(self.inner.losses.subscribe()) })
        })
    }

    fn queue_stats<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<QueueStats, Error>> {
        Box::pin(async move {
            let conn = self.inner.current()?;
            let (ready, consumers) =
                self.inner.inspect(&conn, queue).await?.ok_or_else(|| Error::NoRoute(queue.to_owned()))?;
            let counters = self.inner.counters.of(queue);
            Ok(counters.stats(ready as usize, consumers as usize))
        })
    }

    fn delete_queue<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let conn = self.inner.current()?;
            self.inner.forget(queue);
            self.inner.delete(&conn, queue).await
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), Error>> {
        // Acks travel on their consumer's channel; a server drops its consumers before flushing, and the close
        // of each channel completes once RabbitMQ has handled the acks sent on it.
        Box::pin(async move {
            let closing = std::mem::take(&mut *Inner::lock(&self.inner.closing));
            let closed = tokio::time::timeout(Duration::from_secs(5), futures::future::join_all(closing));
            closed.await.map(drop).map_err(|_| Error::Timeout(Duration::from_secs(5)))
        })
    }
}
