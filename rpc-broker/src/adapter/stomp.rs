//! STOMP 1.2, the text protocol ActiveMQ (Classic and Artemis) and RabbitMQ (its `rabbitmq_stomp` plugin) speak:
//! feature `stomp`.
//!
//! [`codec`] reads and writes frames, holding what a server sends to size limits before it allocates;
//! [`connection`] is one connection on it (the CONNECT handshake, heart-beats both ways, sends confirmed by
//! receipts, subscriptions, ACK and NACK, transactions). [`Stomp`] is the transport on them; it tells the server
//! by the CONNECTED frame's `server` header and maps mqrpc's queues onto what each server has:
//!
//! | contract | ActiveMQ | RabbitMQ |
//! |---|---|---|
//! | queue | `/queue/<name>`, made by the first SEND or SUBSCRIBE; declaring makes it with a subscription whose selector matches nothing | declared durable by a SUBSCRIBE to `/queue/<name>` on a short-lived connection (with `x-expires` from [`StompOptions::queue_expires`]); sends and consumers use `/amq/queue/<name>`, which declares nothing |
//! | a queue exists | the statistics plugin answers for it | a SUBSCRIBE to `/amq/queue/<name>` is not refused |
//! | publish | SEND, `persistent:true` but for replies to inboxes; confirmed by a `receipt` (a call's request is not: its reply proves it arrived, and ActiveMQ holds a connection's next frames while a persistent SEND with a receipt goes to disk) | the same |
//! | consume | a connection per consumer, `ack:client-individual`, `activemq.prefetchSize`; ack after the reply | `prefetch-count` |
//! | requeue | a copy with `mqrpc-delivery-count` raised and the ACK, in one transaction, at the end of the queue | the same |
//! | dead letters | a copy on `<queue>.dlq` and the ACK, in one transaction; after [`QueueOptions::max_deliveries`] deliveries a message goes there unrun | the same |
//! | release | left unacknowledged: the server gives it back, first in the queue, when the consumer's connection closes | the same |
//! | topic | SEND to `/topic/VirtualTopic.<topic>`; subscriber group `g` reads the queue `Consumer.<g>.VirtualTopic.<topic>` | SEND to `/topic/<topic>`; group `g` is the durable queue `<topic>@<g>` (`x-queue-name`) |
//! | inbox | `/temp-queue/mqrpc.inbox.<uuid>` of the main connection, which sends the requests | the same, taken as RabbitMQ hands its replies to the connection that named it in `reply-to` |
//! | priority | `priority` (JMS, 0 to 9; the queue must be prioritized, `prioritizedMessages`) | refused: [`Error::Unsupported`] |
//! | queue stats | the statistics plugin: `ready` is `size` less `inflightCount`; `delayed` counts the scheduler's jobs due at the queue; `cancelled` is the count of messages `<queue>.cancelled` took | refused |
//! | delayed delivery | `AMQ_SCHEDULED_DELAY`, held by the scheduler (when the broker runs with `schedulerSupport="true"`, which a probe at connect finds out; refused otherwise) | refused |
//! | cancel | the consumers of the queue hear of it on `/topic/mqrpc.cancel.<queue>` (one running the request stops its handler; one that gets it later drops it unrun); the scheduler drops a delayed one; a consumer with a selector on `correlation-id` takes one waiting in the queue, for a moment | refused |
//!
//! Refused everywhere with [`Error::Unsupported`]: a maximum queue length (ActiveMQ has none per queue; RabbitMQ
//! drops the oldest message instead of refusing the SEND, as its STOMP plugin ignores `x-overflow`) and deleting
//! a queue (STOMP has no command for it). `stomp/scheduler.rs` says how the scheduler is browsed and how cancels are
//! told and counted.
//!
//! Message headers: `correlation-id` (the caller's own, byte for byte, when it is not one of our UUIDs),
//! `reply-to` (`/queue/<name>` for a named queue, the inbox's destination otherwise, as the server rewrites it:
//! `/remote-temp-queue/...` on ActiveMQ, `/reply-queue/...` on RabbitMQ), `persistent`, `priority`, and the
//! `mqrpc-*` headers of [`crate::adapter::headers`] with `mqrpc-id` (the envelope id) and
//! `mqrpc-delivery-count`; user headers travel as headers. ActiveMQ stores each header with the message and
//! converts it twice, so what a reader can infer is not sent: no `content-type`; a reply to an inbox carries
//! neither its kind nor its id (what arrives at an inbox is a reply); a call's request carries no id (it is the
//! correlation id, which a reader takes for it), no `mqrpc-service` when it is the queue's name, and no
//! `mqrpc-idempotency-key` when it is the call's default, its correlation id in 32 hex digits (an empty value says
//! it has none). The body is the MessagePack of the arguments or the result. A plain STOMP client calls a
//! service by sending the MessagePack map of the arguments to `/queue/<service queue>` with `mqrpc-method`,
//! `reply-to` (a `/temp-queue/...` it reads) and `correlation-id`, and reads the reply's body (and
//! `mqrpc-status`, absent when ok); a worker with a dedup store runs it once per correlation id when that is a
//! UUID and no `mqrpc-idempotency-key` says otherwise.
//!
//! A delivery counts the copies a requeue made before it, plus one when the server says `redelivered:true` (its
//! consumer went before acking it; RabbitMQ also marks a message a queue-existence check took for a moment,
//! and both mark a released one). [`QueueOptions::max_deliveries`] is kept by the process that declared the
//! queue: STOMP has no place for it.
//!
//! A message whose body is past the codec's [`codec::Limits`] (16 MiB and 64 KiB by default) comes without it
//! ([`codec::Frame::oversized`]): a worker acks it and answers its caller [`rpc_core::Code::ResourceExhausted`],
//! and a reply past a client's limit fails its call with that code, so that it is not delivered again and again
//! to readers that cannot take it. A frame past the other limits (128 headers, a 64 KiB header block) closes the
//! connection that reads it, and the server then delivers the message again, to a consumer that cannot read it
//! either. Hold senders to the same limits at the server: ActiveMQ's STOMP connector takes
//! `?wireFormat.maxDataLength=16777216` (`.ci/activemq.xml` sets it), though its header limits (1,000 headers of
//! 10 KiB) are fixed above ours.
//!
//! The main connection is supervised: when it is lost, publishes fail at once with [`Error::Disconnected`] while
//! it reconnects with exponential backoff and jitter; inboxes are opened again on the new connection (replies on
//! their way meanwhile are lost, which fails their calls with [`Error::ReplyLost`]). Each consumer reconnects and
//! subscribes again by itself; its deliveries from before were given back by the server, and settling them
//! reports [`Error::DeliveryLost`].
//!
//! What the two servers do differs, as measured on ActiveMQ 5.17.2 (with `.ci/activemq.xml`) and RabbitMQ
//! 3.10.8:
//!
//! | | ActiveMQ | RabbitMQ |
//! |---|---|---|
//! | NACK (`client-individual`) | moves the message to `ActiveMQ.DLQ` at once (a poison ack; header `original-destination`) | requeues it, `redelivered:true` |
//! | UNSUBSCRIBE with messages unacked | gives them back | keeps them until the connection closes |
//! | a private reply queue | SUBSCRIBE to `/temp-queue/x`; a `reply-to` naming it reaches the receiver as `/remote-temp-queue/ID:...` | no SUBSCRIBE (an ERROR): a SEND with `reply-to:/temp-queue/x` makes it, and replies come as MESSAGE frames with `subscription:/temp-queue/x`; the receiver sees `/reply-queue/amq.gen-...` |
//! | a SEND to a queue that does not exist | makes it | `/queue/x` declares it (an ERROR closes the connection if it exists with other arguments); `/amq/queue/x` drops the message, with a receipt |
//! | a group while it has no consumer | keeps receiving | keeps receiving |
//! | `priority` header | honoured (prioritized queues) | ignored on a queue declared without `x-max-priority` |
//! | queue figures | the statistics plugin (`<statisticsBrokerPlugin/>`); its map messages reach a STOMP client only through `transformation:jms-map-json`, which needs XStream and Jettison on the broker's class path (the official distribution has them; Debian's package does not) | none over STOMP |
//! | delayed delivery | `AMQ_SCHEDULED_DELAY` ms (the scheduler) | none without a plugin |
//!
//! ```no_run
//! # async fn run() -> Result<(), rpc_core::Error> {
//! let transport = rpc_broker::adapter::stomp::Stomp::connect("stomp://127.0.0.1:61613").await?;
//! let client = rpc_core::Client::builder(transport).connect().await?;
//! # drop(client);
//! # Ok(())
//! # }
//! ```

pub mod codec;
pub mod connection;
mod consumer;
mod mapping;
mod scheduler;
mod statistics;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use rpc_core::transport::{BoxFuture, Confirm, Consumer, Inbox};
use rpc_core::{Capabilities, ConsumeOptions, Envelope, Error, Kind, QueueOptions, QueueStats, Transport};
use tokio::sync::watch;
use uuid::Uuid;

use self::codec::{Command, Frame};
use self::connection::{ConnectOptions, Connection};
use self::consumer::Target;
use self::mapping::Outgoing;
use self::statistics::Figures;
use super::{CounterMap, Counters};

/// Queue names known to exist are remembered up to this many; past it the memory starts again.
const KNOWN_QUEUES_MAX: usize = 4_096;
/// The prefix of every inbox this transport opens.
const INBOX_PREFIX: &str = "/temp-queue/mqrpc.inbox.";
/// Calls sent with a delay are remembered, for a cancel to look for them in the scheduler, up to this many.
const DELAYED_MAX: usize = 65_536;
/// How long a cancel keeps a consumer on the queue that takes the call's request if it waits there.
const CANCEL_WINDOW: Duration = Duration::from_secs(1);
/// Cancels that hold such a consumer at once; past them, a cancel only tells the workers.
const CANCELS_MAX: usize = 64;
/// How late ActiveMQ's scheduler may queue a delayed message: idle, it looks for due jobs every 500 ms and is not
/// woken by a new one (measured on 5.17.2: a 50 ms delay came 250 to 500 ms late).
const SCHEDULER_SLACK: Duration = Duration::from_millis(550);

/// How a [`Stomp`] transport sends and reconnects.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct StompOptions {
    /// Requests, oneway calls and replies to named queues are sent `persistent:true`, so that the server keeps
    /// them over a restart. Replies to inboxes never are.
    pub persistent: bool,
    /// The longest wait between two reconnection attempts.
    pub max_backoff: Duration,
    /// How each connection connects: heart-beats, timeouts, frame size limits.
    pub connect: ConnectOptions,
    /// On RabbitMQ, the queues this transport declares are deleted by the server after this long unused
    /// (`x-expires`). ActiveMQ drops idle queues by its own destination policy (`gcInactiveDestinations`).
    pub queue_expires: Option<Duration>,
}

impl Default for StompOptions {
    fn default() -> StompOptions {
        StompOptions {
            persistent: true,
            max_backoff: Duration::from_secs(5),
            connect: ConnectOptions::default(),
            queue_expires: None,
        }
    }
}

impl StompOptions {
    /// Persistent messages, reconnection backoff up to 5 s, 10 s heart-beats.
    pub fn new() -> StompOptions {
        StompOptions::default()
    }

    /// Sets [`StompOptions::persistent`].
    pub fn persistent(mut self, persistent: bool) -> StompOptions {
        self.persistent = persistent;
        self
    }

    /// Sets [`StompOptions::max_backoff`].
    pub fn max_backoff(mut self, backoff: Duration) -> StompOptions {
        self.max_backoff = backoff;
        self
    }

    /// Sets [`StompOptions::queue_expires`].
    pub fn queue_expires(mut self, expires: Duration) -> StompOptions {
        self.queue_expires = Some(expires);
        self
    }

    /// Sets [`StompOptions::connect`].
    pub fn connect(mut self, connect: ConnectOptions) -> StompOptions {
        self.connect = connect;
        self
    }
}

/// The server, as its CONNECTED frame names it: what it does with queues, groups and temporary queues differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flavour {
    ActiveMq,
    RabbitMq,
    /// Another server: treated as ActiveMQ, without priorities.
    Other,
}

impl Flavour {
    fn of(server: &str) -> Flavour {
        if server.starts_with("ActiveMQ") {
            Flavour::ActiveMq
        } else if server.starts_with("RabbitMQ") {
            Flavour::RabbitMq
        } else {
            Flavour::Other
        }
    }
}

/// A transport on a STOMP 1.2 server. Cheap to clone: clones share one supervised main connection (publishes
/// and inboxes); each consumer has a connection of its own.
#[derive(Clone)]
pub struct Stomp {
    inner: Arc<Inner>,
}

impl fmt::Debug for Stomp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stomp")
            .field("url", &super::redact_url(&self.inner.url))
            .field("server", &self.inner.server)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    url: String,
    options: StompOptions,
    flavour: Flavour,
    server: String,
    /// The main connection; `None` while it reconnects.
    main: watch::Sender<Option<Connection>>,
    closed: AtomicBool,
    counters: CounterMap,
    /// The maximum deliveries of the queues this process declared with one.
    max_deliveries: dashmap::DashMap<String, u32>,
    /// Queues known to exist.
    known: Mutex<HashSet<String>>,
    /// Bumped whenever the main connection is lost, and the inboxes' temporary queues with it.
    losses: watch::Sender<u64>,
    /// The live consumers, for [`Transport::flush`].
    consumers: Mutex<Vec<Weak<consumer::State>>>,
    /// Consumer connections closing, for [`Transport::flush`].
    closing: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// One existence check at a time.
    checking: tokio::sync::Mutex<()>,
    /// ActiveMQ's statistics plugin answers: one query at a time.
    answers: tokio::sync::Mutex<Option<connection::Subscription>>,
    /// ActiveMQ holds delayed messages (its scheduler is on).
    scheduler: bool,
    /// The scheduler's answers to browses: one at a time.
    jobs: tokio::sync::Mutex<Option<connection::Subscription>>,
    /// The calls sent with a delay, by correlation id, with when they are due.
    delayed: Mutex<HashMap<Uuid, Instant>>,
    /// Places for the cancels' consumers ([`CANCELS_MAX`]).
    cancels: Arc<tokio::sync::Semaphore>,
}

impl Inner {
    fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
        mutex.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn current(&self) -> Result<Connection, Error> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Shutdown);
        }
        self.main.borrow().clone().filter(|connection| !connection.is_closed()).ok_or(Error::Disconnected)
    }

    /// A new connection to the server.
    async fn connect(&self) -> Result<Connection, Error> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Shutdown);
        }
        Connection::connect(&self.url, &self.options.connect).await
    }

    fn register(&self, state: &Arc<consumer::State>) {
        let mut consumers = Inner::lock(&self.consumers);
        consumers.retain(|state| state.strong_count() > 0);
        consumers.push(Arc::downgrade(state));
    }

    /// Runs `closing` (a consumer's DISCONNECT) in a task of its own, which [`Transport::flush`] waits for.
    fn closing(&self, closing: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = Inner::lock(&self.closing);
        tasks.retain(|task| !task.is_finished());
        tasks.push(tokio::spawn(closing));
    }

    /// How `envelope` is sent to `destination`: persistent unless it is a reply to an inbox, with priorities on
    /// ActiveMQ.
    fn send_options(&self, envelope: &Envelope, destination: &str) -> Outgoing {
        let to_inbox = envelope.kind == Kind::Reply && mapping::is_inbox(destination);
        Outgoing {
            persistent: self.options.persistent && !to_inbox,
            priority: self.flavour == Flavour::ActiveMq,
            delivery_count: 0,
            delay: self.scheduler,
            stamped: self.flavour == Flavour::ActiveMq,
        }
    }

    /// The destination of `queue`: `/queue/<queue>` on ActiveMQ, which makes a queue a message is sent to;
    /// `/amq/queue/<queue>` on RabbitMQ, which names a queue without declaring it (a SEND to `/queue/<queue>`
    /// declares it, and the server closes the connection when the queue was declared with other arguments, by
    /// this transport or an AMQP client). An address that is a destination already stays as it is.
    fn destination(&self, queue: &str) -> String {
        match self.flavour {
            Flavour::RabbitMq if !queue.starts_with('/') => format!("/amq/queue/{queue}"),
            _ => mapping::destination(queue),
        }
    }

    /// The `x-expires` header of the queues declared on RabbitMQ, if any.
    fn expires(&self) -> Option<(String, String)> {
        let expires = self.options.queue_expires.filter(|_| self.flavour == Flavour::RabbitMq)?;
        Some(("x-expires".to_owned(), expires.as_millis().to_string()))
    }

    fn remember(&self, queue: &str) {
        let mut known = Inner::lock(&self.known);
        if known.len() >= KNOWN_QUEUES_MAX {
            known.clear();
        }
        known.insert(queue.to_owned());
    }

    fn is_known(&self, queue: &str) -> bool {
        queue.starts_with('/') || Inner::lock(&self.known).contains(queue)
    }
}

impl Stomp {
    /// Connects to the STOMP server at `url` (`stomp://[login:passcode@]host[:port][/vhost]`) with the default
    /// options.
    ///
    /// # Errors
    /// [`Error::Transport`] when the server cannot be reached, [`Error::Unauthorized`] when it refuses the
    /// credentials, [`Error::InvalidArgument`] for a bad URL.
    pub async fn connect(url: &str) -> Result<Stomp, Error> {
        Stomp::connect_with(url, StompOptions::default()).await
    }

    /// Connects with `options`.
    ///
    /// # Errors
    /// As [`Stomp::connect`].
    pub async fn connect_with(url: &str, options: StompOptions) -> Result<Stomp, Error> {
        let first = Connection::connect(url, &options.connect).await?;
        let server = first.server().to_owned();
        let flavour = Flavour::of(&server);
        let (scheduler, jobs) = match flavour {
            Flavour::ActiveMq => {
                let (on, answers) = scheduler::probe(&first, options.connect.receipt_timeout).await?;
                (on, Some(answers))
            }
            Flavour::RabbitMq | Flavour::Other => (false, None),
        };
        let inner = Arc::new(Inner {
            url: url.to_owned(),
            options,
            flavour,
            server,
            main: watch::Sender::new(Some(first)),
            closed: AtomicBool::new(false),
            counters: CounterMap::default(),
            max_deliveries: dashmap::DashMap::new(),
            known: Mutex::new(HashSet::new()),
            losses: watch::Sender::new(0),
            consumers: Mutex::new(Vec::new()),
            closing: Mutex::new(Vec::new()),
            checking: tokio::sync::Mutex::new(()),
            answers: tokio::sync::Mutex::new(None),
            scheduler,
            jobs: tokio::sync::Mutex::new(jobs),
            delayed: Mutex::new(HashMap::new()),
            cancels: Arc::new(tokio::sync::Semaphore::new(CANCELS_MAX)),
        });
        tokio::spawn(supervise(Arc::downgrade(&inner), inner.main.subscribe()));
        Ok(Stomp { inner })
    }

    /// The server's name and version, from its CONNECTED frame (`ActiveMQ/5.17.2`, `RabbitMQ/3.10.8`).
    pub fn server(&self) -> &str {
        &self.inner.server
    }

    /// Whether the main connection is up now.
    pub fn is_connected(&self) -> bool {
        self.inner.current().is_ok()
    }

    /// Waits until the main connection is up (at once if it is).
    pub async fn connected(&self) {
        let mut changes = self.inner.main.subscribe();
        let _ = changes.wait_for(|main| main.as_ref().is_some_and(|connection| !connection.is_closed())).await;
    }

    /// Closes the main connection: inboxes end, and every later operation fails with [`Error::Shutdown`].
    /// Consumers end when they are dropped.
    pub async fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        if let Some(connection) = self.inner.main.send_replace(None) {
            let _ = connection.disconnect().await;
        }
    }

    async fn send(&self, queue: &str, envelope: Envelope, confirm: Confirm) -> Result<(), Error> {
        let destination = self.inner.destination(queue);
        let frame = mapping::to_frame(&envelope, &destination, self.inner.send_options(&envelope, &destination))?;
        let (envelope_delay, correlation_id) = (envelope.delay_ms, envelope.correlation_id);
        drop(envelope);
        if !self.inner.exists(queue).await? {
            return Err(Error::NoRoute(queue.to_owned()));
        }
        let connection = self.inner.current()?;
        if let (Some(delay), Some(correlation_id)) = (envelope_delay, correlation_id) {
            self.inner.sent_delayed(correlation_id, delay);
        }
        let counters = (!queue.starts_with('/')).then(|| self.inner.counters.of(queue));
        match confirm {
            // No receipt, persistent or not: ActiveMQ handles a connection's frames one after another, and a
            // persistent SEND with a receipt holds the next ones until it is on disk. The reply proves the
            // request arrived; a connection lost before takes the inbox with it, which fails the call with
            // `ReplyLost`.
            Confirm::Sent | Confirm::ByReply => connection.send_unconfirmed(frame)?,
            _ => connection.send(frame).await?,
        }
        if let Some(counters) = &counters {
            Counters::bump(&counters.published);
        }
        Ok(())
    }
}

impl Inner {
    /// Whether `queue` exists on the server, remembered once it does. ActiveMQ says so through its statistics
    /// plugin; RabbitMQ refuses a SUBSCRIBE to `/amq/queue/<queue>` that does not exist, which is tried on a
    /// connection of its own (the refusal closes it). Another server is taken at its word that it has it.
    async fn exists(&self, queue: &str) -> Result<bool, Error> {
        if self.is_known(queue) {
            return Ok(true);
        }
        // One check at a time: a burst of first calls to a queue checks it once.
        let _checking = self.checking.lock().await;
        if self.is_known(queue) {
            return Ok(true);
        }
        let exists = match self.flavour {
            Flavour::ActiveMq => self.statistics(queue).await?.is_some(),
            Flavour::RabbitMq => {
                let probe = self.connect().await?;
                // Prefetch 1: a message it takes meanwhile goes back, marked redelivered, when it closes.
                let subscribed = probe
                    .subscribe(&format!("/amq/queue/{queue}"), "client-individual", &[("prefetch-count", "1")])
                    .await;
                let _ = probe.disconnect().await;
                match subscribed {
                    Ok(_) => true,
                    Err(Error::Transport(refused)) if refused.to_string().contains("not_found") => false,
                    Err(error) => return Err(error),
                }
            }
            Flavour::Other => true,
        };
        if exists {
            self.remember(queue);
        }
        Ok(exists)
    }

    /// Makes `queue` exist on the server without taking any of its messages: on ActiveMQ a subscription whose
    /// selector matches no message; on RabbitMQ, if it does not exist yet, a subscription to `/queue/<queue>`
    /// (which declares it durable, with [`StompOptions::queue_expires`]) on a connection of its own.
    async fn make(&self, queue: &str) -> Result<(), Error> {
        match self.flavour {
            Flavour::ActiveMq | Flavour::Other => {
                let connection = self.current()?;
                let never = [("selector", "JMSType = 'mqrpc.declare'")];
                let subscription = connection.subscribe(&mapping::destination(queue), "auto", &never).await?;
                drop(subscription);
                Ok(())
            }
            Flavour::RabbitMq => {
                if self.exists(queue).await? {
                    return Ok(());
                }
                let declaring = self.connect().await?;
                let destination = mapping::destination(queue);
                let mut headers = vec![("prefetch-count", "1".to_owned())];
                headers.extend(self.expires().map(|(_, millis)| ("x-expires", millis)));
                let headers: Vec<(&str, &str)> = headers.iter().map(|(name, value)| (*name, value.as_str())).collect();
                let declared = declaring.subscribe(&destination, "client-individual", &headers).await;
                let _ = declaring.disconnect().await;
                declared?;
                self.remember(queue);
                Ok(())
            }
        }
    }

    /// What the server says of `queue`; `None` when it does not have it. On ActiveMQ, through its statistics
    /// plugin: a query sent to `ActiveMQ.Statistics.Destination.<queue>` is answered on a temporary queue of
    /// the main connection with the queue's figures (a map message, which the `jms-map-json` transformation
    /// turns into JSON), then an empty map that ends the list.
    async fn statistics(&self, queue: &str) -> Result<Option<Figures>, Error> {
        if self.flavour != Flavour::ActiveMq {
            return Err(Error::Unsupported("queue stats"));
        }
        let timeout = self.options.connect.receipt_timeout;
        let mut answers = self.answers.lock().await;
        let connection = self.current()?;
        if answers.as_ref().is_none_or(|answers| answers.connection().is_closed()) {
            let transformation = [("transformation", "jms-map-json")];
            *answers = Some(connection.subscribe(STATISTICS_INBOX, "auto", &transformation).await?);
        }
        let Some(answers) = answers.as_mut() else { return Err(Error::Disconnected) };
        let query = Uuid::new_v4().to_string();
        connection.send_unconfirmed(
            Frame::new(Command::Send)
                .header("destination", &format!("/queue/ActiveMQ.Statistics.Destination.{queue}"))
                .header("reply-to", STATISTICS_INBOX)
                .header("correlation-id", &query)
                .header("ActiveMQ.Statistics.Destination.List.End.With.Null", "true"),
        )?;
        let read = async {
            let mut figures = None;
            loop {
                let frame = answers.next().await.ok_or(Error::Disconnected)?;
                // An answer to an earlier query that gave up waiting.
                if frame.get("correlation-id").is_some_and(|id| id != query) {
                    continue;
                }
                match statistics::read(&frame.body) {
                    statistics::Answer::End => return Ok(figures),
                    statistics::Answer::Queue(name, read) if name == queue => figures = Some(read),
                    statistics::Answer::Queue(..) | statistics::Answer::Unreadable => {}
                }
            }
        };
        tokio::time::timeout(timeout, read).await.map_err(|_| Error::Timeout(timeout))?
    }
}

impl Inner {
    /// Remembers that the call `correlation_id` was sent with a delay of `delay_ms`.
    fn sent_delayed(&self, correlation_id: Uuid, delay_ms: u64) {
        let now = Instant::now();
        let mut delayed = Inner::lock(&self.delayed);
        if delayed.len() >= DELAYED_MAX {
            delayed.retain(|_, due| *due > now);
            if delayed.len() >= DELAYED_MAX {
                delayed.clear();
            }
        }
        delayed.insert(correlation_id, now + Duration::from_millis(delay_ms));
    }

    /// Whether the call `correlation_id` may wait in the scheduler (sent with a delay not yet over, by a margin).
    fn may_be_scheduled(&self, correlation_id: Uuid) -> bool {
        const MARGIN: Duration = Duration::from_secs(5);
        let mut delayed = Inner::lock(&self.delayed);
        match delayed.get(&correlation_id) {
            Some(due) if *due + MARGIN > Instant::now() => true,
            Some(_) => {
                delayed.remove(&correlation_id);
                false
            }
            None => false,
        }
    }

    /// The jobs ActiveMQ's scheduler holds, browsed over the main connection.
    async fn jobs(&self) -> Result<Vec<scheduler::Job>, Error> {
        let mut answers = self.jobs.lock().await;
        let connection = self.current()?;
        if answers.as_ref().is_none_or(|answers| answers.connection().is_closed()) {
            *answers = Some(connection.subscribe(scheduler::ANSWERS, "auto", &[]).await?);
        }
        let Some(answers) = answers.as_mut() else { return Err(Error::Disconnected) };
        scheduler::jobs(&connection, answers, self.options.connect.receipt_timeout).await
    }

    /// See [`Transport::cancel`] on [`Stomp`].
    async fn cancel(&self, queue: &str, correlation_id: Uuid) -> Result<(), Error> {
        let correlation = correlation_id.to_string();
        let destination = mapping::destination(queue);
        let connection = self.current()?;
        // First a consumer that takes the request if it waits in the queue: subscribed before the notice goes,
        // so that a worker the notice frees does not take it first.
        let taker = match Arc::clone(&self.cancels).try_acquire_owned() {
            Ok(permit) => {
                let selector = format!("JMSCorrelationID = '{correlation}'");
                let headers = [("selector", selector.as_str()), ("activemq.prefetchSize", "1")];
                Some((connection.subscribe(&destination, "client-individual", &headers).await?, permit))
            }
            Err(_) => None,
        };
        connection.send_unconfirmed(scheduler::notice(queue, &correlation))?;
        if self.scheduler && self.may_be_scheduled(correlation_id) {
            let jobs = self.jobs().await?;
            let mine = |job: &&scheduler::Job| {
                job.destination.as_deref() == Some(&destination) && job.correlation_id.as_deref() == Some(&correlation)
            };
            if let Some(job) = jobs.iter().find(mine) {
                scheduler::remove(&connection, &job.id)?;
                connection.send_unconfirmed(scheduler::marker(queue, &correlation))?;
            }
        }
        if let Some((mut taker, _permit)) = taker
            && let Ok(Some(frame)) = tokio::time::timeout(CANCEL_WINDOW, taker.next()).await
            && let Some(ack) = frame.get("ack")
        {
            let ack = Frame::new(Command::Ack).header("id", ack);
            connection.transaction([scheduler::marker(queue, &correlation), ack]).await?;
        }
        Ok(())
    }
}

/// Watches the main connection; when it is lost, counts the loss and connects again with backoff.
async fn supervise(inner: Weak<Inner>, mut main: watch::Receiver<Option<Connection>>) {
    loop {
        let current = main.borrow_and_update().clone();
        match current {
            Some(connection) => {
                tokio::select! {
                    () = connection.closed() => {}
                    changed = main.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        continue;
                    }
                }
            }
            None => {
                if main.changed().await.is_err() {
                    return;
                }
                continue;
            }
        }
        let Some(strong) = inner.upgrade() else { return };
        if strong.closed.load(Ordering::Acquire) {
            return;
        }
        tracing::warn!(server = %strong.server, "lost the connection to the STOMP server; reconnecting");
        strong.main.send_replace(None);
        strong.losses.send_modify(|losses| *losses += 1);
        let max_backoff = strong.options.max_backoff;
        drop(strong);
        let _ = main.borrow_and_update();
        let mut attempt = 0;
        loop {
            tokio::time::sleep(rpc_core::retry::reconnect_backoff(attempt, max_backoff)).await;
            attempt = attempt.saturating_add(1);
            let Some(strong) = inner.upgrade() else { return };
            match strong.connect().await {
                Ok(connection) => {
                    tracing::info!(attempt, "reconnected to the STOMP server");
                    *strong.answers.lock().await = None;
                    *strong.jobs.lock().await = None;
                    strong.main.send_replace(Some(connection));
                    break;
                }
                Err(Error::Shutdown) => return,
                Err(error) => tracing::debug!(%error, attempt, "reconnecting to the STOMP server failed"),
            }
        }
    }
}

/// Where ActiveMQ's statistics plugin answers, on the main connection.
const STATISTICS_INBOX: &str = "/temp-queue/mqrpc.statistics";

impl Transport for Stomp {
    fn system(&self) -> &'static str {
        match self.inner.flavour {
            Flavour::ActiveMq => "activemq",
            Flavour::RabbitMq => "rabbitmq",
            Flavour::Other => "stomp",
        }
    }

    fn capabilities(&self) -> Capabilities {
        let activemq = self.inner.flavour == Flavour::ActiveMq;
        Capabilities::none()
            .durable(true)
            .acks(true)
            .priority(activemq)
            .dead_letter(true)
            .requeue(true)
            .subscriber_groups(true)
            .queue_stats(activemq)
            .delayed_delivery(self.inner.scheduler)
            .delay_slack(SCHEDULER_SLACK)
            .cancel(activemq)
    }

    fn declare_queue<'a>(&'a self, queue: &'a str, options: &'a QueueOptions) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            if options.max_len.is_some() {
                return Err(Error::Unsupported("queue length limits"));
            }
            if queue.starts_with('/') || queue.is_empty() {
                return Err(Error::InvalidArgument(format!("`{queue}` is not a queue name")));
            }
            match options.max_deliveries {
                Some(max) => {
                    self.inner.max_deliveries.insert(queue.to_owned(), max);
                }
                None => {
                    self.inner.max_deliveries.remove(queue);
                }
            }
            self.inner.make(&rpc_core::naming::dead_letter_queue(queue)).await?;
            self.inner.make(queue).await?;
            self.inner.remember(queue);
            Ok(())
        })
    }

    fn publish<'a>(&'a self, queue: &'a str, envelope: Envelope, confirm: Confirm) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(self.send(queue, envelope, confirm))
    }

    fn publish_topic<'a>(&'a self, topic: &'a str, envelope: Envelope) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let destination = self.topic_destination(topic);
            let frame = mapping::to_frame(&envelope, &destination, self.inner.send_options(&envelope, &destination))?;
            self.inner.current()?.send(frame).await
        })
    }

    fn consume<'a>(&'a self, queue: &'a str, options: ConsumeOptions) -> BoxFuture<'a, Result<Consumer, Error>> {
        Box::pin(async move {
            if queue.starts_with('/') || queue.is_empty() {
                return Err(Error::InvalidArgument(format!("`{queue}` is not a queue name")));
            }
            let target = Target {
                queue: queue.to_owned(),
                destination: self.inner.destination(queue),
                headers: Vec::new(),
                max_deliveries: self.inner.max_deliveries.get(queue).map(|max| *max),
                notices: (self.inner.flavour == Flavour::ActiveMq).then(|| scheduler::notices(queue)),
                inbox: false,
            };
            let consumer = match consumer::start(&self.inner, target, options).await {
                Err(Error::Transport(refused)) if refused.to_string().contains("not_found") => {
                    return Err(Error::NoRoute(queue.to_owned()));
                }
                started => started?,
            };
            self.inner.remember(queue);
            Ok(consumer)
        })
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        options: ConsumeOptions,
    ) -> BoxFuture<'a, Result<Consumer, Error>> {
        Box::pin(async move {
            let target = match self.inner.flavour {
                Flavour::RabbitMq => {
                    let queue = format!("{topic}@{group}");
                    Target {
                        destination: self.topic_destination(topic),
                        headers: vec![
                            ("durable".to_owned(), "true".to_owned()),
                            ("auto-delete".to_owned(), "false".to_owned()),
                            ("x-queue-name".to_owned(), queue.clone()),
                        ]
                        .into_iter()
                        .chain(self.inner.expires())
                        .collect(),
                        queue,
                        max_deliveries: None,
                        notices: None,
                        inbox: false,
                    }
                }
                Flavour::ActiveMq | Flavour::Other => {
                    let queue = format!("Consumer.{}.VirtualTopic.{topic}", escape_group(group));
                    Target {
                        destination: mapping::destination(&queue),
                        headers: Vec::new(),
                        queue,
                        max_deliveries: None,
                        notices: None,
                        inbox: false,
                    }
                }
            };
            consumer::start(&self.inner, target, options).await
        })
    }

    /// A plain subscription to the topic (`/topic/<topic>` on RabbitMQ, whose queue for it is exclusive and
    /// auto-delete; `/topic/VirtualTopic.<topic>` on ActiveMQ, a non-durable topic subscriber), auto-acked:
    /// it ends with its connection and leaves nothing behind.
    fn subscribe_private<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Consumer, Error>> {
        Box::pin(async move {
            let target = Target {
                destination: self.topic_destination(topic),
                headers: Vec::new(),
                queue: format!("{topic}@private"),
                max_deliveries: None,
                notices: None,
                inbox: false,
            };
            consumer::start(&self.inner, target, ConsumeOptions::new().auto_ack(true)).await
        })
    }

    fn open_inbox(&self) -> BoxFuture<'_, Result<Inbox, Error>> {
        Box::pin(async move {
            let address = format!("{INBOX_PREFIX}{}", Uuid::new_v4().simple());
            let consumer = consumer::start_inbox(&self.inner, address.clone()).await?;
            Ok(Inbox { address, consumer, losses: Some(self.inner.losses.subscribe()) })
        })
    }

    fn queue_stats<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<QueueStats, Error>> {
        Box::pin(async move {
            let figures = self.inner.statistics(queue).await?.ok_or_else(|| Error::NoRoute(queue.to_owned()))?;
            let counters = self.inner.counters.of(queue);
            let mut stats = counters.stats(figures.ready, figures.consumers);
            stats.unacked = figures.unacked;
            let cancelled = self.inner.statistics(&scheduler::cancelled_queue(queue)).await?;
            stats.cancelled = cancelled.map_or(0, |figures| figures.enqueued);
            if self.inner.scheduler {
                let destination = mapping::destination(queue);
                let jobs = self.inner.jobs().await?;
                stats.delayed = jobs.iter().filter(|job| job.destination.as_deref() == Some(&destination)).count();
            }
            Ok(stats)
        })
    }

    /// Cancels the call `correlation_id` on ActiveMQ, in a task of its own: its consumers hear of it (one
    /// running it stops, one that gets it later drops it unrun), the scheduler drops it if it was sent with a
    /// delay, and a consumer on the queue takes it for a second if it waits there.
    /// [`Error::Unsupported`] elsewhere.
    fn cancel<'a>(&'a self, queue: &'a str, correlation_id: Uuid) -> BoxFuture<'a, Result<(), Error>> {
        if self.inner.flavour != Flavour::ActiveMq {
            return Box::pin(std::future::ready(Err(Error::Unsupported("cancelling a queued call"))));
        }
        let (inner, queue) = (Arc::clone(&self.inner), queue.to_owned());
        tokio::spawn(async move {
            if let Err(error) = inner.cancel(&queue, correlation_id).await {
                tracing::debug!(%error, %correlation_id, "could not cancel a call at the server");
            }
        });
        Box::pin(std::future::ready(Ok(())))
    }

    /// Waits until the server has handled what was sent without a receipt: the main connection's sends and
    /// each consumer's acks (the receipt of a frame sent after them), and the DISCONNECTs of the consumers
    /// dropped so far.
    fn flush(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            const LIMIT: Duration = Duration::from_secs(5);
            let live: Vec<Connection> = Inner::lock(&self.inner.consumers)
                .iter()
                .filter_map(Weak::upgrade)
                .filter_map(|state| state.connection())
                .collect();
            let closing = std::mem::take(&mut *Inner::lock(&self.inner.closing));
            let main = self.inner.current().ok();
            let all = async move {
                if let Some(main) = main {
                    main.sync().await?;
                }
                for connection in live.iter().filter(|connection| !connection.is_closed()) {
                    connection.sync().await?;
                }
                futures::future::join_all(closing).await;
                Ok(())
            };
            tokio::time::timeout(LIMIT, all).await.map_err(|_| Error::Timeout(LIMIT))?
        })
    }
}

impl Stomp {
    /// The destination a topic's messages are sent to: a virtual topic on ActiveMQ, whose subscriber groups are
    /// the queues `Consumer.<group>.VirtualTopic.<topic>`; `amq.topic` on RabbitMQ.
    fn topic_destination(&self, topic: &str) -> String {
        match self.inner.flavour {
            Flavour::RabbitMq => format!("/topic/{topic}"),
            Flavour::ActiveMq | Flavour::Other => format!("/topic/VirtualTopic.{topic}"),
        }
    }
}

/// A subscriber group's name as one segment of an ActiveMQ destination name: bytes other than ASCII letters,
/// digits, `_` and `-` become `%` and two hex digits.
fn escape_group(group: &str) -> String {
    let mut escaped = String::with_capacity(group.len());
    for byte in group.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-' {
            escaped.push(char::from(byte));
        } else {
            escaped.push_str(&format!("%{byte:02X}"));
        }
    }
    escaped
}
