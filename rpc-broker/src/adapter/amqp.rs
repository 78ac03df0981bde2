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
//! `expiration` (the time budget, so RabbitMQ drops a request that expired while queued), `priority`,
//! `content_type: application/msgpack`, `timestamp`, `delivery_mode` 2 (persistent) for requests; the other
//! envelope fields are the `mqrpc-*` headers of [`crate::adapter::headers`], and user headers travel as headers.
//! The body is the MessagePack of the arguments or the result. A plain AMQP client calls a service by
//! publishing the MessagePack map of the arguments to the service's queue with `reply_to`, `correlation_id` and
//! `type` set, and reads the reply's body (and `mqrpc-status`, absent when ok) from its reply queue.
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

use std::collections::VecDeque;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ErrorKind, Event, ExchangeKind};
use rpc_core::transport::{AckHandle, Acker, BoxFuture, Confirm, Consumer, ConsumerControl, Delivery, Inbox, Outcome};
use rpc_core::{
    Capabilities, ConsumeOptions, Envelope, Error, Kind, QueueOptions, QueueStats, ReplyTo, Transport, naming,
};
use tokio::sync::{Notify, mpsc, watch};
use uuid::Uuid;

use super::{CounterMap, Counters, headers};

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
}

impl Default for AmqpOptions {
    fn default() -> AmqpOptions {
        AmqpOptions {
            quorum: false,
            direct_reply_to: false,
            queue_expires: None,
            persistent: true,
            max_backoff: Duration::from_secs(5),
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
}

/// A transport on RabbitMQ. Cheap to clone: clones share one supervised connection.
#[derive(Clone)]
pub struct Amqp {
    inner: Arc<Inner>,
}

impl fmt::Debug for Amqp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Amqp")
            .field("url", &redact(&self.inner.url))
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

/// The URL without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            let user = credentials.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

struct Inner {
    url: String,
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

/// Short-lived channels open at once, at most.
const ADMIN_CHANNELS: usize = 8;

/// What this transport declared, to declare again after a reconnection.
#[derive(Default)]
struct Topology {
    queues: BTreeMap<String, QueueOptions>,
    exchanges: BTreeSet<String>,
    bindings: BTreeSet<(String, String)>,
    inboxes: BTreeSet<String>,
}

struct Conn {
    connection: Connection,
    /// Publishes (in confirm mode) and the direct reply-to consumer.
    publisher: Channel,
    /// Publishes without confirms: calls' requests, whose reply proves arrival, and replies to reply queues.
    unconfirmed: Channel,
    generation: u64,
}

impl Conn {
    /// The error a failed publish reports: [`Error::Disconnected`] once the connection or the publishing channel
    /// is going away (RabbitMQ stopping puts the channel in an error state before the supervisor hears of it).
    fn publish_error(&self, error: lapin::Error) -> Error {
        self.error_on(&self.publisher, error)
    }

    /// As [`Conn::publish_error`], for a publish on `channel`.
    fn error_on(&self, channel: &Channel, error: lapin::Error) -> Error {
        if connection_level(&error) || !channel.status().connected() || !self.connection.status().connected() {
            Error::Disconnected
        } else {
            from_lapin(error)
        }
    }
}

#[derive(Clone)]
enum Target {
    Queue(String),
    Inbox(String),
    DirectReply,
}

impl Target {
    fn queue(&self) -> &str {
        match self {
            Target::Queue(queue) | Target::Inbox(queue) => queue,
            Target::DirectReply => DIRECT_REPLY_TO,
        }
    }
}

/// A consumer as the user sees it: it lives across reconnections.
struct Logical {
    target: Target,
    options: ConsumeOptions,
    sender: mpsc::UnboundedSender<Delivery>,
    paused: bool,
    /// The channel it consumes on now, and the consumer tag.
    current: Option<(Channel, ShortString)>,
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

    fn queue_arguments(&self, queue: &str, options: &QueueOptions) -> FieldTable {
        let mut arguments = FieldTable::default();
        let dead_letter_queue = naming::dead_letter_queue(queue);
        arguments.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
        arguments.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(dead_letter_queue.into()));
        if self.options.quorum || options.max_deliveries.is_some() {
            arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
            if let Some(max) = options.max_deliveries {
                // RabbitMQ dead-letters a message returned more than this many times; the consumer dead-letters
                // the delivery past `max` itself, so that the count is exact.
                arguments.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(i64::from(max)));
            }
        } else {
            arguments.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(9));
        }
        if let Some(max_len) = options.max_len {
            arguments.insert("x-max-length".into(), AMQPValue::LongLongInt(i64::try_from(max_len).unwrap_or(i64::MAX)));
            arguments.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
        }
        self.expires(&mut arguments);
        arguments
    }

    fn expires(&self, arguments: &mut FieldTable) {
        if let Some(expires) = self.options.queue_expires {
            let millis = i64::try_from(expires.as_millis()).unwrap_or(i64::MAX).max(1);
            arguments.insert("x-expires".into(), AMQPValue::LongLongInt(millis));
        }
    }

    /// A short-lived channel for a declare or a check (a refused one closes its channel), with its permit.
    async fn admin_channel(&self, conn: &Conn) -> Result<(Channel, tokio::sync::SemaphorePermit<'_>), Error> {
        let permit = self.admin.acquire().await.map_err(|_| Error::Shutdown)?;
        let channel = conn.connection.create_channel().await.map_err(from_lapin)?;
        Ok((channel, permit))
    }

    /// Declares `queue` and its dead-letter queue on a channel of their own (a refused declare closes it).
    async fn declare_on(&self, conn: &Conn, queue: &str, options: &QueueOptions) -> Result<(), Error> {
        let (channel, _permit) = self.admin_channel(conn).await?;
        let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
        let mut dead_letter_arguments = FieldTable::default();
        self.expires(&mut dead_letter_arguments);
        let result = async {
            let dead_letters = short(&naming::dead_letter_queue(queue))?;
            channel
                .queue_declare(dead_letters, durable, dead_letter_arguments)
                .await
                .map_err(|error| declare_error(queue, error))?;
            channel
                .queue_declare(short(queue)?, durable, self.queue_arguments(queue, options))
                .await
                .map_err(|error| declare_error(queue, error))?;
            Ok(())
        }
        .await;
        close_channel(channel).await;
        result
    }

    /// The queue's message and consumer counts, or `None` if it does not exist.
    async fn inspect(&self, conn: &Conn, queue: &str) -> Result<Option<(u32, u32)>, Error> {
        let (channel, _permit) = self.admin_channel(conn).await?;
        let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        let result = channel.queue_declare(short(queue)?, passive, FieldTable::default()).await;
        close_channel(channel).await;
        match result {
            Ok(found) => Ok(Some((found.message_count(), found.consumer_count()))),
            Err(error) if soft_error(&error) == Some(AMQPSoftError::NOTFOUND) => Ok(None),
            // Another connection's exclusive queue (an inbox): it exists.
            Err(error) if soft_error(&error) == Some(AMQPSoftError::RESOURCELOCKED) => Ok(Some((0, 1))),
            Err(error) => Err(from_lapin(error)),
        }
    }

    async fn declare_exchange(&self, conn: &Conn, topic: &str) -> Result<(), Error> {
        let (channel, _permit) = self.admin_channel(conn).await?;
        let options = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
        let result =
            channel.exchange_declare(short(topic)?, ExchangeKind::Fanout, options, FieldTable::default()).await;
        close_channel(channel).await;
        result.map_err(|error| declare_error(topic, error))
    }

    async fn bind(&self, conn: &Conn, queue: &str, topic: &str) -> Result<(), Error> {
        let (channel, _permit) = self.admin_channel(conn).await?;
        let result = channel
            .queue_bind(short(queue)?, short(topic)?, "".into(), QueueBindOptions::default(), FieldTable::default())
            .await;
        close_channel(channel).await;
        result.map_err(|error| declare_error(queue, error))
    }

    async fn declare_inbox(&self, conn: &Conn, name: &str) -> Result<(), Error> {
        let (channel, _permit) = self.admin_channel(conn).await?;
        let options = QueueDeclareOptions { exclusive: true, auto_delete: true, ..QueueDeclareOptions::default() };
        let result = channel.queue_declare(short(name)?, options, FieldTable::default()).await;
        close_channel(channel).await;
        result.map(|_| ()).map_err(from_lapin)
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

    /// Remembers what a reply's [`headers::UNBOUNDED_QUEUE`] says.
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

    /// Starts consumer `id` on `conn`: a channel of its own (the publisher's, for direct reply-to) and a pump.
    async fn start_consumer(self: &Arc<Self>, conn: &Conn, id: u64) -> Result<(), Error> {
        let Some((target, options)) =
            Inner::lock(&self.consumers).get(&id).map(|logical| (logical.target.clone(), logical.options))
        else {
            return Ok(());
        };
        let direct = matches!(target, Target::DirectReply);
        let channel =
            if direct { conn.publisher.clone() } else { conn.connection.create_channel().await.map_err(from_lapin)? };
        if !direct {
            let prefetch = u16::try_from(options.prefetch).unwrap_or(u16::MAX);
            channel.basic_qos(prefetch, BasicQosOptions { global: false }).await.map_err(from_lapin)?;
        }
        let no_ack = options.auto_ack || !matches!(target, Target::Queue(_));
        let consume_options = BasicConsumeOptions { no_ack, ..BasicConsumeOptions::default() };
        let queue = target.queue().to_owned();
        let consumer =
            match channel.basic_consume(short(&queue)?, "".into(), consume_options, FieldTable::default()).await {
                Ok(consumer) => consumer,
                Err(error) => {
                    if !direct {
                        close_quietly(channel);
                    }
                    return Err(match soft_error(&error) {
                        Some(AMQPSoftError::NOTFOUND) => Error::NoRoute(queue),
                        _ => from_lapin(error),
                    });
                }
            };
        let tag = consumer.tag();
        let sender = {
            let mut consumers = Inner::lock(&self.consumers);
            let Some(logical) = consumers.get_mut(&id) else {
                drop(consumers);
                self.cancel_consumer(channel, tag, !direct);
                return Ok(());
            };
            logical.current = Some((channel.clone(), tag));
            logical.sender.clone()
        };
        let (max_deliveries, unbounded) = match &target {
            Target::Queue(queue) => {
                let declared = Inner::lock(&self.topology).queues.get(queue).cloned();
                let max_deliveries = declared.as_ref().and_then(|options| options.max_deliveries);
                let unbounded = declared.is_some_and(|options| options.max_len.is_none()).then(|| queue.clone());
                (max_deliveries, unbounded)
            }
            _ => (None, None),
        };
        let counters = self.counters.of(&queue);
        let acker: Arc<AmqpAcker> = Arc::new(AmqpAcker {
            channel,
            counters: Arc::clone(&counters),
            max_deliveries,
            counts: Mutex::new(HashMap::new()),
            unbounded,
            inner: Arc::downgrade(self),
        });
        let inbox = !matches!(target, Target::Queue(_));
        let pump = Pump { inner: Arc::downgrade(self), id, acker, counters, sender, manual: !no_ack, inbox };
        tokio::spawn(pump.run(consumer, conn.generation));
        Ok(())
    }

    /// Declares everything again on a new connection and restarts the consumers.
    async fn restore(self: &Arc<Self>, conn: &Conn) -> Result<(), Error> {
        let topology = {
            let topology = Inner::lock(&self.topology);
            (topology.queues.clone(), topology.exchanges.clone(), topology.bindings.clone(), topology.inboxes.clone())
        };
        let (queues, exchanges, bindings, inboxes) = topology;
        for (queue, options) in &queues {
            self.declare_on(conn, queue, options).await?;
        }
        for exchange in &exchanges {
            self.declare_exchange(conn, exchange).await?;
        }
        for (queue, exchange) in &bindings {
            self.bind(conn, queue, exchange).await?;
        }
        for inbox in &inboxes {
            self.declare_inbox(conn, inbox).await?;
        }
        let ids: Vec<u64> = Inner::lock(&self.consumers)
            .iter_mut()
            .filter(|(_, logical)| !logical.paused)
            .map(|(id, logical)| {
                logical.current = None;
                *id
            })
            .collect();
        for id in ids {
            if let Err(error) = self.start_consumer(conn, id).await {
                tracing::warn!(%error, "could not restart a consumer after reconnecting; it ends");
                Inner::lock(&self.consumers).remove(&id);
            }
        }
        Ok(())
    }

    async fn open(&self) -> Result<Conn, Error> {
        let properties = ConnectionProperties::default().with_connection_name("mqrpc".into());
        let connection = Connection::connect(&self.url, properties).await.map_err(from_lapin)?;
        let publisher = connection.create_channel().await.map_err(from_lapin)?;
        publisher.confirm_select(ConfirmSelectOptions::default()).await.map_err(from_lapin)?;
        let unconfirmed = connection.create_channel().await.map_err(from_lapin)?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(Conn { connection, publisher, unconfirmed, generation })
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
            let confirm = conn
                .publisher
                .basic_publish(exchange_name, routing_key, options, &body, properties)
                .await
                .map_err(|error| conn.publish_error(error))?;
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

fn close_connection(conn: Arc<Conn>) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            let _ = conn.connection.close(200, "bye".into()).await;
        });
    }
}

/// Closes a short-lived channel before its permit goes, so that its id is free before it can be reused.
async fn close_channel(channel: Channel) {
    if channel.status().connected() {
        let _ = channel.close(200, "done".into()).await;
    }
}

fn close_quietly(channel: Channel) {
    if channel.status().connected()
        && let Ok(runtime) = tokio::runtime::Handle::try_current()
    {
        runtime.spawn(async move {
            let _ = channel.close(200, "done".into()).await;
        });
    }
}

impl Inner {
    /// Cancels a consumer, and closes its channel if `close` (which requeues what it held unacked), in the
    /// background; [`Transport::flush`] waits for it.
    fn cancel_consumer(&self, channel: Channel, tag: ShortString, close: bool) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let task = runtime.spawn(async move {
            let _ = channel.basic_cancel(tag, BasicCancelOptions::default()).await;
            if close {
                let _ = channel.close(200, "done".into()).await;
            }
        });
        let mut closing = Inner::lock(&self.closing);
        closing.retain(|task| !task.is_finished());
        closing.push(task);
    }
}

impl Amqp {
    /// Connects to RabbitMQ at `url` (`amqp://user:password@host:port/vhost`, or `amqps://` for TLS) with the
    /// default options.
    ///
    /// # Errors
    /// [`Error::Transport`] when the broker cannot be reached, [`Error::Unauthorized`] when it refuses the
    /// credentials.
    pub async fn connect(url: &str) -> Result<Amqp, Error> {
        Amqp::connect_with(url, AmqpOptions::default()).await
    }

    /// Connects with `options`.
    ///
    /// # Errors
    /// As [`Amqp::connect`].
    pub async fn connect_with(url: &str, options: AmqpOptions) -> Result<Amqp, Error> {
        let (conn, _) = watch::channel(None);
        let inner = Arc::new(Inner {
            url: url.to_owned(),
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

    async fn consumer(&self, target: Target, options: ConsumeOptions) -> Result<Consumer, Error> {
        let conn = self.inner.current()?;
        let id = self.inner.next_consumer.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = mpsc::unbounded_channel();
        let logical = Logical { target, options, sender, paused: false, current: None };
        Inner::lock(&self.inner.consumers).insert(id, logical);
        if let Err(error) = self.inner.start_consumer(&conn, id).await {
            Inner::lock(&self.inner.consumers).remove(&id);
            return Err(error);
        }
        let guard = ConsumerGuard { inner: Arc::clone(&self.inner), id };
        Ok(Consumer::from_channel(receiver, Some(Box::new(guard))))
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

/// Watches the connection and reconnects when it is lost.
async fn supervise(inner: Weak<Inner>, mut events: futures::stream::BoxStream<'static, Event>) {
    loop {
        while let Some(event) = events.next().await {
            match event {
                // A channel closed by RabbitMQ (a refused declare, say) is reported here too; only the loss of
                // the connection matters to the supervisor.
                Event::Error(error) if connection_level(&error) => {
                    tracing::warn!(%error, "lost the connection to RabbitMQ; reconnecting");
                    break;
                }
                Event::Error(error) => tracing::debug!(%error, "RabbitMQ closed a channel"),
                Event::ConnectionBlocked(reason) => tracing::warn!(%reason, "RabbitMQ blocked publishing"),
                _ => {}
            }
        }
        let Some(strong) = inner.upgrade() else { return };
        if strong.closed.load(Ordering::Acquire) {
            return;
        }
        strong.conn.send_replace(None);
        strong.losses.send_modify(|losses| *losses += 1);
        let max_backoff = strong.options.max_backoff;
        drop(strong);
        let mut attempt = 0;
        events = loop {
            tokio::time::sleep(rpc_core::retry::reconnect_backoff(attempt, max_backoff)).await;
            attempt = attempt.saturating_add(1);
            let Some(strong) = inner.upgrade() else { return };
            if strong.closed.load(Ordering::Acquire) {
                return;
            }
            let conn = match strong.open().await {
                Ok(conn) => Arc::new(conn),
                Err(error) => {
                    tracing::debug!(%error, attempt, "reconnecting to RabbitMQ failed");
                    continue;
                }
            };
            let events = conn.connection.events_listener();
            match strong.restore(&conn).await {
                Ok(()) => {
                    tracing::info!(attempt, "reconnected to RabbitMQ");
                    strong.conn.send_replace(Some(conn));
                    break events.boxed();
                }
                Err(error) => {
                    tracing::warn!(%error, "restoring queues and consumers failed; reconnecting again");
                    close_connection(conn);
                }
            }
        };
    }
}

/// Moves deliveries of one consumer on one connection into the consumer's stream.
struct Pump {
    inner: Weak<Inner>,
    id: u64,
    acker: Arc<AmqpAcker>,
    counters: Arc<Counters>,
    sender: mpsc::UnboundedSender<Delivery>,
    manual: bool,
    /// Consumes replies: reads [`headers::UNBOUNDED_QUEUE`].
    inbox: bool,
}

impl Pump {
    async fn run(self, mut consumer: lapin::Consumer, generation: u64) {
        let mut lost_connection = false;
        while let Some(item) = consumer.next().await {
            match item {
                Ok(delivery) => {
                    if !self.forward(delivery).await {
                        return;
                    }
                }
                Err(error) => {
                    lost_connection = connection_level(&error);
                    tracing::debug!(%error, lost_connection, "a consumer's stream failed");
                    break;
                }
            }
        }
        // The stream ended: the connection went away (the supervisor restarts the consumer), we cancelled it
        // (pause, drop), or RabbitMQ cancelled it (the queue was deleted): then the consumer ends.
        let Some(inner) = self.inner.upgrade() else { return };
        let current = inner.conn.borrow().as_ref().map(|conn| conn.generation);
        if lost_connection || current != Some(generation) {
            return;
        }
        let mut consumers = Inner::lock(&inner.consumers);
        if consumers.get(&self.id).is_some_and(|logical| !logical.paused) {
            consumers.remove(&self.id);
        }
    }

    /// Hands one delivery to the consumer; false when the consumer is gone.
    async fn forward(&self, delivery: lapin::message::Delivery) -> bool {
        let tag = delivery.delivery_tag;
        let delivery_count = delivery_count(&delivery);
        if self.inbox
            && let Some(AMQPValue::LongString(queue)) =
                delivery.properties.headers().as_ref().and_then(|table| table.inner().get(headers::UNBOUNDED_QUEUE))
            && let Some(inner) = self.inner.upgrade()
        {
            inner.mark_unbounded(&String::from_utf8_lossy(queue.as_bytes()));
        }
        let envelope = match from_amqp(delivery.properties, delivery.data) {
            Ok(envelope) => envelope,
            Err(error) => {
                tracing::warn!(%error, "dead-lettering a message that is not an mqrpc message");
                if self.manual {
                    Counters::bump(&self.counters.dead_lettered);
                    let _ = self.acker.channel.basic_reject(tag, BasicRejectOptions { requeue: false }).await;
                }
                return true;
            }
        };
        if envelope.deadline_ms == Some(0) {
            Counters::bump(&self.counters.expired);
            if self.manual {
                let _ = self.acker.channel.basic_ack(tag, BasicAckOptions::default()).await;
            }
            return true;
        }
        if self.manual && self.acker.max_deliveries.is_some_and(|max| delivery_count > max) {
            Counters::bump(&self.counters.dead_lettered);
            let _ = self.acker.channel.basic_reject(tag, BasicRejectOptions { requeue: false }).await;
            return true;
        }
        let handle = if self.manual {
            self.counters.unacked.fetch_add(1, Ordering::Relaxed);
            if self.acker.max_deliveries.is_some() {
                Inner::lock(&self.acker.counts).insert(tag, delivery_count);
            }
            AckHandle::new(Arc::clone(&self.acker) as Arc<dyn Acker>, tag)
        } else {
            AckHandle::auto()
        };
        let delivery = Delivery { envelope, delivery_count, received_at: Instant::now(), handle };
        self.sender.send(delivery).is_ok()
    }
}

/// How many times a delivery has been delivered: exact on quorum queues (`x-delivery-count`); on classic
/// queues, 2 for any redelivery.
fn delivery_count(delivery: &lapin::message::Delivery) -> u32 {
    let returned = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|headers| headers.inner().get("x-delivery-count"))
        .and_then(integer)
        .and_then(|count| u32::try_from(count).ok());
    match returned {
        Some(count) => count.saturating_add(1),
        None if delivery.redelivered => 2,
        None => 1,
    }
}

/// Settles deliveries on the channel they came from; once that channel is gone, RabbitMQ requeued them.
struct AmqpAcker {
    channel: Channel,
    counters: Arc<Counters>,
    max_deliveries: Option<u32>,
    /// Delivery counts of unsettled deliveries, kept when the queue has a maximum.
    counts: Mutex<HashMap<u64, u32>>,
    /// The queue, when this transport declared it without a maximum length: said on each reply to an inbox.
    unbounded: Option<String>,
    /// The transport, for confirmed publishes.
    inner: Weak<Inner>,
}

impl fmt::Debug for AmqpAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpAcker").field("channel", &self.channel.id()).finish_non_exhaustive()
    }
}

impl Acker for AmqpAcker {
    fn settle(&self, tag: u64, outcome: Outcome) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let count = Inner::lock(&self.counts).remove(&tag);
            let outcome = match (outcome, count, self.max_deliveries) {
                (Outcome::Requeue, Some(count), Some(max)) if count >= max => Outcome::DeadLetter,
                (outcome, ..) => outcome,
            };
            let result = match outcome {
                Outcome::Ack => self.channel.basic_ack(tag, BasicAckOptions::default()).await,
                Outcome::Requeue | Outcome::Release => {
                    self.channel.basic_nack(tag, BasicNackOptions { requeue: true, multiple: false }).await
                }
                Outcome::DeadLetter => self.channel.basic_reject(tag, BasicRejectOptions { requeue: false }).await,
            };
            self.counters.unacked.fetch_sub(1, Ordering::Relaxed);
            match result {
                Ok(()) => {
                    match outcome {
                        Outcome::Ack => Counters::bump(&self.counters.acked),
                        Outcome::DeadLetter => Counters::bump(&self.counters.dead_lettered),
                        Outcome::Requeue | Outcome::Release => {}
                    }
                    Ok(())
                }
                Err(error) if connection_level(&error) || !self.channel.status().connected() => {
                    Err(Error::Disconnected)
                }
                Err(error) => Err(from_lapin(error)),
            }
        })
    }

    fn publish<'a>(
        &'a self,
        _tag: u64,
        queue: &'a str,
        envelope: Envelope,
        confirm: Confirm,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            if !self.channel.status().connected() {
                // RabbitMQ requeued the channel's deliveries when it closed.
                return Err(Error::DeliveryLost);
            }
            if confirm != Confirm::Sent {
                // A durable callback queue: confirmed, on the transport's publishing channel.
                let inner = self.inner.upgrade().ok_or(Error::Disconnected)?;
                return inner.publish_to("", queue, envelope).await;
            }
            // On the delivery's own channel: once RabbitMQ has closed its connection (missed heartbeats) and
            // requeued the request, it reads nothing more from it, so a stale reply never reaches the caller.
            // Unconfirmed and not mandatory; the ack that follows on this channel cannot overtake it.
            let (properties, body) = to_amqp_marked(&envelope, false, self.unbounded.as_deref())?;
            match self
                .channel
                .basic_publish("".into(), short(queue)?, BasicPublishOptions::default(), &body, properties)
                .await
            {
                Ok(_unconfirmed) => Ok(()),
                Err(error) if connection_level(&error) || !self.channel.status().connected() => {
                    Err(Error::DeliveryLost)
                }
                Err(error) => Err(from_lapin(error)),
            }
        })
    }
}

/// Pauses or ends a logical consumer. A consumer keeps its connection alive.
struct ConsumerGuard {
    inner: Arc<Inner>,
    id: u64,
}

impl ConsumerControl for ConsumerGuard {
    fn pause(&self) {
        let mut consumers = Inner::lock(&self.inner.consumers);
        if let Some(logical) = consumers.get_mut(&self.id) {
            logical.paused = true;
            if let Some((channel, tag)) = logical.current.clone() {
                // The channel stays open: the deliveries it holds stay settleable.
                self.inner.cancel_consumer(channel, tag, false);
            }
        }
    }
}

impl Drop for ConsumerGuard {
    fn drop(&mut self) {
        let Some(logical) = Inner::lock(&self.inner.consumers).remove(&self.id) else { return };
        if let Target::Inbox(name) = &logical.target {
            Inner::lock(&self.inner.topology).inboxes.remove(name);
        }
        if let Some((channel, tag)) = logical.current {
            // Closing the consumer's channel requeues what it held unacked.
            let direct = matches!(logical.target, Target::DirectReply);
            self.inner.cancel_consumer(channel, tag, !direct);
        }
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
        // Quiet: the reply to the inbox proves the request arrived. A connection lost meanwhile takes the
        // reply queue with it, which fails the call with `ReplyLost`; an unroutable request comes back and
        // fails it with `NoRoute`. Otherwise the future waits until the caller drops it.
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
        // The message is made before the future, which holds only the publish.
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

/// A name as an AMQP short string (at most 255 bytes).
fn short(name: &str) -> Result<ShortString, Error> {
    ShortString::try_new(name).map_err(|_| Error::InvalidArgument(format!("`{name}` is longer than 255 bytes")))
}

fn integer(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some((*n).into()),
        AMQPValue::LongUInt(n) => Some((*n).into()),
        AMQPValue::ShortInt(n) => Some((*n).into()),
        AMQPValue::ShortUInt(n) => Some((*n).into()),
        AMQPValue::ShortShortInt(n) => Some((*n).into()),
        AMQPValue::ShortShortUInt(n) => Some((*n).into()),
        AMQPValue::LongString(text) => std::str::from_utf8(text.as_bytes()).ok()?.parse().ok(),
        _ => None,
    }
}

fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        AMQPValue::ShortString(text) => Some(text.as_str().to_owned()),
        other => integer(other).map(|n| n.to_string()),
    }
}

fn string_value(value: impl Into<Vec<u8>>) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.into()))
}

/// The AMQP properties and body of an envelope.
fn to_amqp(envelope: &Envelope, persistent: bool) -> Result<(BasicProperties, Vec<u8>), Error> {
    to_amqp_marked(envelope, persistent, None)
}

/// As [`to_amqp`], with [`headers::UNBOUNDED_QUEUE`] set to `unbounded`.
fn to_amqp_marked(
    envelope: &Envelope,
    persistent: bool,
    unbounded: Option<&str>,
) -> Result<(BasicProperties, Vec<u8>), Error> {
    let mut table = FieldTable::default();
    if let Some(queue) = unbounded {
        table.insert(headers::UNBOUNDED_QUEUE.into(), string_value(queue));
    }
    table.insert(headers::KIND.into(), string_value(super::kind_name(envelope.kind)));
    if !envelope.service.is_empty() {
        table.insert(headers::SERVICE.into(), string_value(envelope.service.as_str()));
    }
    if envelope.attempt > 1 {
        table.insert(headers::ATTEMPT.into(), AMQPValue::LongLongInt(envelope.attempt.into()));
    }
    if let Some(budget) = envelope.deadline_ms {
        table.insert(headers::DEADLINE_MS.into(), AMQPValue::LongLongInt(i64::try_from(budget).unwrap_or(i64::MAX)));
        let sent_at = i64::try_from(super::now_ms()).unwrap_or(i64::MAX);
        table.insert(headers::SENT_AT_MS.into(), AMQPValue::LongLongInt(sent_at));
    }
    if let Some(key) = &envelope.idempotency_key {
        table.insert(headers::IDEMPOTENCY_KEY.into(), string_value(key.as_str()));
    }
    if envelope.status != 0 {
        table.insert(headers::STATUS.into(), AMQPValue::LongLongInt(envelope.status.into()));
    }
    if let Some(message) = &envelope.status_message {
        table.insert(headers::STATUS_MESSAGE.into(), string_value(message.as_str()));
    }
    for (name, value) in super::user_headers(&envelope.headers) {
        table.insert(short(name)?, string_value(value));
    }
    let mut properties = BasicProperties::default()
        .with_message_id(short(&envelope.id.to_string())?)
        .with_content_type("application/msgpack".into())
        .with_timestamp(super::now_ms() / 1_000);
    let raw_correlation = envelope.headers.get(headers::RAW_CORRELATION_ID);
    if let Some(raw) = raw_correlation {
        properties = properties.with_correlation_id(short(raw)?);
    } else if let Some(correlation_id) = envelope.correlation_id {
        properties = properties.with_correlation_id(short(&correlation_id.to_string())?);
    }
    if let Some(reply_to) = &envelope.reply_to {
        properties = properties.with_reply_to(short(reply_to.address())?);
        if reply_to.is_inbox() {
            table.insert(headers::REPLY_TO_INBOX.into(), AMQPValue::Boolean(true));
        }
    }
    if !envelope.method.is_empty() {
        properties = properties.with_type(short(&envelope.method)?);
    }
    if let Some(budget) = envelope.deadline_ms {
        properties = properties.with_expiration(short(&budget.max(1).to_string())?);
    }
    if let Some(priority) = envelope.priority {
        properties = properties.with_priority(priority);
    }
    if let Some(caller) = &envelope.caller {
        // `app_id`, AMQP's "creating application": free-form, unlike `user_id`, which RabbitMQ checks against
        // the connection's user.
        properties = properties.with_app_id(short(caller)?);
    }
    if persistent && envelope.kind != Kind::Reply {
        properties = properties.with_delivery_mode(2);
    }
    properties = properties.with_headers(table);
    Ok((properties, envelope.body.to_vec()))
}

/// The envelope of an AMQP message: written by [`to_amqp`], or by a plain AMQP client.
fn from_amqp(properties: BasicProperties, body: Vec<u8>) -> Result<Envelope, Error> {
    let header = |name: &str| properties.headers().as_ref().and_then(|table| table.inner().get(name));
    let reply_to = properties.reply_to().as_ref().map(|reply_to| reply_to.as_str().to_owned());
    let kind_name = header(headers::KIND).and_then(text);
    let mut envelope = Envelope::new(super::kind_of(kind_name.as_deref(), reply_to.is_some()));
    if let Some(id) = properties.message_id().as_ref().and_then(|id| Uuid::parse_str(id.as_str()).ok()) {
        envelope.id = id;
    }
    if let Some(correlation) = properties.correlation_id() {
        match Uuid::parse_str(correlation.as_str()) {
            Ok(id) => envelope.correlation_id = Some(id),
            Err(_) => {
                // A plain client's correlation id that is not a UUID: kept verbatim for the reply.
                envelope.correlation_id = Some(Uuid::new_v4());
                envelope.headers.insert(headers::RAW_CORRELATION_ID.to_owned(), correlation.as_str().to_owned());
            }
        }
    }
    // RabbitMQ's direct reply-to is an inbox by the broker's own definition.
    let inbox = header(headers::REPLY_TO_INBOX).is_some_and(|flag| matches!(flag, AMQPValue::Boolean(true)));
    envelope.reply_to = reply_to.map(|address| match inbox || address.starts_with(DIRECT_REPLY_TO) {
        true => ReplyTo::Inbox(address),
        false => ReplyTo::Queue(address),
    });
    envelope.service = header(headers::SERVICE).and_then(text).unwrap_or_default();
    envelope.method = properties.kind().as_ref().map(|kind| kind.as_str().to_owned()).unwrap_or_default();
    envelope.attempt =
        header(headers::ATTEMPT).and_then(integer).and_then(|n| u32::try_from(n).ok()).unwrap_or(1).max(1);
    let budget = header(headers::DEADLINE_MS)
        .and_then(integer)
        .or_else(|| properties.expiration().as_ref().and_then(|expiration| expiration.as_str().parse().ok()))
        .and_then(|budget| u64::try_from(budget).ok());
    if let Some(budget) = budget {
        let sent_at = header(headers::SENT_AT_MS)
            .and_then(integer)
            .and_then(|sent| u64::try_from(sent).ok())
            .or_else(|| properties.timestamp().map(|seconds| seconds.saturating_mul(1_000)));
        envelope.deadline_ms = Some(super::remaining_ms(budget, sent_at, super::now_ms()));
    }
    envelope.idempotency_key = header(headers::IDEMPOTENCY_KEY).and_then(text);
    envelope.caller = properties.app_id().as_ref().map(|caller| caller.as_str().to_owned());
    envelope.priority = properties.priority().filter(|priority| *priority > 0);
    envelope.status = header(headers::STATUS).and_then(integer).and_then(|code| u16::try_from(code).ok()).unwrap_or(0);
    envelope.status_message = header(headers::STATUS_MESSAGE).and_then(text);
    for (name, value) in properties.headers().iter().flat_map(|table| table.inner()) {
        if super::is_user_header(name.as_str())
            && let Some(value) = text(value)
        {
            envelope.headers.insert(name.as_str().to_owned(), value);
        }
    }
    envelope.body = Bytes::from(body);
    Ok(envelope)
}

fn soft_error(error: &lapin::Error) -> Option<AMQPSoftError> {
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(soft) => Some(soft.clone()),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// Whether `error` means the connection is gone (rather than one channel).
fn connection_level(error: &lapin::Error) -> bool {
    match error.kind() {
        ErrorKind::ProtocolError(_) => error.is_amqp_hard_error(),
        ErrorKind::InvalidChannelState(..) => false,
        _ => true,
    }
}

fn declare_error(name: &str, error: lapin::Error) -> Error {
    match soft_error(&error) {
        Some(AMQPSoftError::PRECONDITIONFAILED) => Error::InvalidArgument(format!(
            "`{name}` exists with other options than these: declare it with the defaults to use it as it is ({error})"
        )),
        Some(AMQPSoftError::ACCESSREFUSED) => Error::Unauthorized(error.to_string()),
        _ => from_lapin(error),
    }
}

fn from_lapin(error: lapin::Error) -> Error {
    match error.kind() {
        ErrorKind::ProtocolError(amqp) if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)) => {
            Error::Unauthorized(error.to_string())
        }
        ErrorKind::InvalidConnectionState(_) | ErrorKind::IOError(_) | ErrorKind::MissingHeartbeatError => {
            Error::Disconnected
        }
        ErrorKind::InvalidChannelState(..) => Error::Transport(Box::new(error)),
        _ => Error::Transport(Box::new(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_round_trips_through_amqp_properties() {
        let mut envelope = Envelope::new(Kind::Request);
        envelope.correlation_id = Some(Uuid::new_v4());
        envelope.service = "Calculator".into();
        envelope.method = "add".into();
        envelope.reply_to = Some(ReplyTo::Inbox("mqrpc.inbox.1".into()));
        envelope.deadline_ms = Some(5_000);
        envelope.attempt = 3;
        envelope.idempotency_key = Some("key".into());
        envelope.priority = Some(7);
        envelope.caller = Some("billing".into());
        envelope.headers.insert("order".into(), "7".into());
        envelope.body = Bytes::from_static(b"\x81\xa1a\x01");
        let (properties, body) = to_amqp(&envelope, true).expect("maps");
        assert_eq!(properties.delivery_mode(), &Some(2));
        assert_eq!(properties.expiration().as_ref().map(ShortString::as_str), Some("5000"));
        let back = from_amqp(properties, body).expect("maps back");
        assert!(back.deadline_ms.is_some_and(|left| left > 4_000 && left <= 5_000), "{:?}", back.deadline_ms);
        let mut expected = envelope.clone();
        expected.deadline_ms = back.deadline_ms;
        assert_eq!(back, expected);
    }

    #[test]
    fn a_plain_clients_correlation_id_is_echoed_verbatim() {
        let properties = BasicProperties::default()
            .with_correlation_id("42".into())
            .with_reply_to("amq.gen-1".into())
            .with_type("add".into());
        let request = from_amqp(properties, b"\x80".to_vec()).expect("maps");
        assert_eq!(request.kind, Kind::Request);
        assert_eq!(request.method, "add");
        let reply = request.reply(Ok(Bytes::from_static(b"\x05")));
        let (properties, _) = to_amqp(&reply, true).expect("maps");
        assert_eq!(properties.correlation_id().as_ref().map(ShortString::as_str), Some("42"));
        assert_eq!(properties.delivery_mode(), &None, "replies are transient");
    }

    #[test]
    fn passwords_are_not_logged() {
        assert_eq!(redact("amqp://guest:secret@127.0.0.1:5672/%2f"), "amqp://guest:***@127.0.0.1:5672/%2f");
        assert_eq!(redact("amqp://127.0.0.1"), "amqp://127.0.0.1");
    }
}
