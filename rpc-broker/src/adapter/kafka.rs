//! Kafka through rdkafka (librdkafka, built from source and linked statically): feature `kafka`.
//!
//! | contract | Kafka |
//! |---|---|
//! | queue | a topic of [`KafkaOptions::partitions`] partitions, named as the queue (bytes other than ASCII letters, digits, `.`, `_` and `-` become `_` and two hex digits) |
//! | workers | one consumer group per queue, its id the topic's name: competing consumers share the partitions |
//! | publish | the idempotent producer with `acks=all`: confirmed once every in-sync replica has the record; a topic that does not exist is [`Error::NoRoute`] |
//! | ack | an offset stored, committed by librdkafka every 250 ms, by [`Transport::flush`], and by the consumer before its partitions go. Calls finish out of order within a partition, so each partition stores only the offset below which every delivery is settled: never past a call still running |
//! | requeue | a copy at the end of the topic with its delivery count raised, then the commit |
//! | dead letters | a copy on the topic `<queue>.dlq` (one partition), then the commit; after [`QueueOptions::max_deliveries`] deliveries a record goes there unrun |
//! | topic | a topic of one partition (copies arrive in publish order); subscriber group `g` of topic `t` is the consumer group `t@g`, which starts at the end of the topic when it is first joined |
//! | inbox | a topic `mqrpc.inbox.<32 hex digits>` of one partition per client, read without a group and deleted when the client goes (Spring Kafka's reply topic per instance) |
//! | queue stats | from the broker: `published` the records the topic took, `ready` the group's lag, `dead_lettered` the records its `.dlq` took, `consumers` the group's members |
//!
//! Every envelope field travels in record headers (UTF-8 text: the `mqrpc-*` names of
//! [`crate::adapter::headers`], plus `mqrpc-id` for the envelope id and `mqrpc-delivery-count` on a requeued
//! copy); the record's value is the MessagePack of the arguments or the result, its key is empty. The time a
//! request was queued counts from the record's timestamp. A plain Kafka client calls a service by producing the
//! MessagePack map of the arguments to the service's topic with the headers `mqrpc-method`, `mqrpc-reply-to`
//! (a topic it reads), `mqrpc-reply-inbox: true` and `mqrpc-correlation-id`, and reads the reply's value (and
//! `mqrpc-status`, absent when ok) from its topic. docs/conformance.md has the whole table.
//!
//! What Kafka has no place for is refused with [`Error::Unsupported`]: priorities, delayed delivery, a
//! maximum queue length, cancelling a queued call. A record is at most the broker's `message.max.bytes` (1 MB by
//! default, below the envelope's 16 MiB): a larger call or reply fails its publish with [`Error::Transport`].
//!
//! Kafka counts no deliveries; this adapter does. A requeue raises the count on its copy. A record that an
//! earlier owner of its partition handed out (its worker died, or a rebalance moved the partition) counts one
//! more: each consumer marks how far it handed records out in the marker group `<group>.mqrpc-delivered` (at
//! once before its partitions go, every 100 ms otherwise, so a worker killed within 100 ms of a delivery leaves
//! it counted as a first one). Crashes again and again do not raise it further, so
//! [`QueueOptions::max_deliveries`] stops requeue loops, not crash loops (the dedup store absorbs the re-runs).
//! The maximum is kept by the process that declared the queue with it: Kafka topics have no place for it.
//!
//! A worker that dies leaves its uncommitted records to the group: after the rebalance (within
//! [`KafkaOptions::session_timeout`]) another member reads them again. A member losing partitions in a
//! rebalance first commits what it settled; its deliveries from those partitions are then revoked
//! ([`Acker::revoked`](rpc_core::transport::Acker::revoked)): a handler not started yet is not run, and a reply
//! or settle for them fails with [`Error::DeliveryLost`], since the partition's new owner runs the call again.
//! A consumer holding its prefetch of unsettled deliveries waits up to 500 ms for a settle; past that its
//! partitions are paused, not left unread, so that it keeps taking part in rebalances. (Pausing at once would
//! cost: librdkafka drops a paused partition's fetched-ahead records and fetches them again on resume.)
//!
//! Every partition is read strictly in offset order: tansu gives a record its offset before it stores
//! it, and a fetch made in between skips it for good; a record read past a missing offset is dropped and the
//! partition read again from the missing one until it is there (for at most 2 s).
//!
//! A group's first join waits for the broker's initial rebalance delay (Apache Kafka's
//! `group.initial.rebalance.delay.ms`, 3 s by default; tansu waits about half the session timeout), so a worker
//! takes its first request seconds after it starts; a short [`KafkaOptions::session_timeout`] shortens that on
//! tansu, and makes a dead worker's calls come back sooner, at the cost of more heartbeats.
//!
//! A broker that goes down and comes back with its log is a reconnection, which librdkafka makes by itself:
//! calls meanwhile fail by their deadline, then go on. A broker that comes back without its topics (tansu with
//! memory storage) is a new cluster: the processes that ran before must be started again. Do not delete a topic a
//! process still reads: tansu answers a fetch of a topic it does not know with a zero topic id and a
//! `CurrentLeader` tag, and librdkafka 2.12 then dereferences a NULL topic name in
//! `rd_kafka_metadata_update_op` and crashes the process.
//!
//! ```no_run
//! # async fn run() -> Result<(), rpc_core::Error> {
//! let transport = rpc_broker::adapter::kafka::Kafka::connect("127.0.0.1:9092").await?;
//! let client = rpc_core::Client::builder(transport).connect().await?;
//! # drop(client);
//! # Ok(())
//! # }
//! ```

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rpc_core::transport::{BoxFuture, Confirm, Consumer, Inbox};
use rpc_core::{Capabilities, ConsumeOptions, Envelope, Error, QueueOptions, QueueStats, Transport};

use self::consumer::{GroupStart, start_group, start_inbox};

mod consumer;
mod mapping;
mod order;

/// Every inbox topic starts with this.
const INBOX_PREFIX: &str = "mqrpc.inbox.";
/// The longest topic name Kafka takes.
const MAX_TOPIC: usize = 249;
/// How long a metadata or admin request may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Topic names known to exist are remembered up to this many; past it the memory starts again.
const KNOWN_TOPICS_MAX: usize = 4_096;

/// How a [`Kafka`] transport makes topics and joins groups.
#[derive(Clone)]
#[non_exhaustive]
pub struct KafkaOptions {
    /// Partitions of a queue's topic: the most workers of one queue that run at once.
    pub partitions: i32,
    /// Replicas of each topic this transport creates (1 on a single broker; 3 is the usual production choice).
    pub replication: i32,
    /// The group session timeout: a worker silent this long is dropped from its group and its calls go to
    /// the others.
    pub session_timeout: Duration,
    /// How long the producer tries to deliver a record before the publish fails.
    pub message_timeout: Duration,
    /// Further librdkafka properties for every client (`security.protocol`, `sasl.mechanism`, ...), applied
    /// after the adapter's own settings, which they override (`fetch.wait.max.ms`, `linger.ms`, ...).
    pub properties: Vec<(String, String)>,
}

impl Default for KafkaOptions {
    fn default() -> KafkaOptions {
        KafkaOptions {
            partitions: 6,
            replication: 1,
            session_timeout: Duration::from_secs(10),
            message_timeout: Duration::from_secs(30),
            properties: Vec::new(),
        }
    }
}

impl fmt::Debug for KafkaOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // librdkafka's secrets are the properties named for one: `sasl.password`, `ssl.key.password`,
        // `ssl.key.pem`, `sasl.oauthbearer.client.secret`, ...
        let secret = |name: &str| ["password", "secret", "key", "jaas"].iter().any(|part| name.contains(part));
        let properties: Vec<(&str, &str)> = self
            .properties
            .iter()
            .map(|(name, value)| (name.as_str(), if secret(name) { "***" } else { value.as_str() }))
            .collect();
        f.debug_struct("KafkaOptions")
            .field("partitions", &self.partitions)
            .field("replication", &self.replication)
            .field("session_timeout", &self.session_timeout)
            .field("message_timeout", &self.message_timeout)
            .field("properties", &properties)
            .finish()
    }
}

impl KafkaOptions {
    /// The defaults: 6 partitions, 1 replica, a 10 s session, 30 s to deliver a record.
    pub fn new() -> KafkaOptions {
        KafkaOptions::default()
    }

    /// Sets [`KafkaOptions::partitions`] (at least 1).
    pub fn partitions(mut self, partitions: i32) -> KafkaOptions {
        self.partitions = partitions.max(1);
        self
    }

    /// Sets [`KafkaOptions::replication`] (at least 1).
    pub fn replication(mut self, replication: i32) -> KafkaOptions {
        self.replication = replication.max(1);
        self
    }

    /// Sets [`KafkaOptions::session_timeout`].
    pub fn session_timeout(mut self, timeout: Duration) -> KafkaOptions {
        self.session_timeout = timeout;
        self
    }

    /// Sets [`KafkaOptions::message_timeout`].
    pub fn message_timeout(mut self, timeout: Duration) -> KafkaOptions {
        self.message_timeout = timeout;
        self
    }

    /// Adds a librdkafka property for every client this transport makes.
    pub fn property(mut self, name: impl Into<String>, value: impl Into<String>) -> KafkaOptions {
        self.properties.push((name.into(), value.into()));
        self
    }
}

/// A [`Transport`] over Kafka. Cheap to clone: clones share the producer.
#[derive(Clone)]
pub struct Kafka {
    inner: Arc<Inner>,
}

struct Inner {
    brokers: String,
    options: KafkaOptions,
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    /// Topics known to exist.
    known: Mutex<HashSet<String>>,
    /// The maximum deliveries of the queues this process declared with one.
    max_deliveries: dashmap::DashMap<String, u32>,
    /// Consumers dropped and still leaving their groups.
    closing: Arc<consumer::Closing>,
    /// The group consumers, for [`Transport::flush`] to commit what their settles stored.
    groups: consumer::Groups,
}

impl fmt::Debug for Kafka {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kafka").field("brokers", &self.inner.brokers).finish_non_exhaustive()
    }
}

impl Kafka {
    /// Connects to the brokers `brokers` (`host:port`, comma-separated) with default options.
    ///
    /// # Errors
    /// As [`Kafka::connect_with`].
    pub async fn connect(brokers: &str) -> Result<Kafka, Error> {
        Kafka::connect_with(brokers, KafkaOptions::new()).await
    }

    /// Connects to the brokers `brokers` with `options`, and checks that they answer.
    ///
    /// # Errors
    /// [`Error::Transport`] naming the brokers when none answers within 10 s (nothing listens, or the TLS
    /// handshake fails: librdkafka's log says which); [`Error::Unauthorized`]
    /// when the broker refuses the SASL credentials; [`Error::Transport`] for a configuration librdkafka refuses.
    pub async fn connect_with(brokers: &str, options: KafkaOptions) -> Result<Kafka, Error> {
        let brokers = brokers.strip_prefix("kafka://").unwrap_or(brokers).to_owned();
        let producer: FutureProducer = client_config(&brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "0")
            // A record without a key goes to a random partition, so that competing workers share the load.
            .set("sticky.partitioning.linger.ms", "0")
            .set("message.timeout.ms", millis(options.message_timeout))
            .user(&options)
            .create()
            .map_err(transport_error)?;
        let admin: AdminClient<DefaultClientContext> =
            client_config(&brokers).user(&options).create().map_err(transport_error)?;
        let kafka = Kafka {
            inner: Arc::new(Inner {
                brokers,
                options,
                producer,
                admin,
                known: Mutex::new(HashSet::new()),
                max_deliveries: dashmap::DashMap::new(),
                closing: Arc::default(),
                groups: consumer::Groups::default(),
            }),
        };
        let probe = kafka.clone();
        let answered = tokio::task::spawn_blocking(move || {
            probe.inner.producer.client().fetch_metadata(None, ADMIN_TIMEOUT).map(|metadata| metadata.brokers().len())
        })
        .await
        .map_err(|error| Error::Transport(error.into()))?;
        match answered {
            Ok(_) => Ok(kafka),
            Err(error) => match broker_error(error) {
                Error::Unauthorized(refusal) => Err(Error::Unauthorized(refusal)),
                error => Err(Error::Transport(
                    format!("no Kafka broker of `{}` answered within {ADMIN_TIMEOUT:?}: {error}", kafka.inner.brokers)
                        .into(),
                )),
            },
        }
    }

    /// The options this transport was made with.
    pub fn options(&self) -> &KafkaOptions {
        &self.inner.options
    }

    fn remember(&self, topic: &str) {
        let mut known = self.inner.known.lock().unwrap_or_else(PoisonError::into_inner);
        if known.len() >= KNOWN_TOPICS_MAX {
            known.clear();
        }
        known.insert(topic.to_owned());
    }

    fn forget(&self, topic: &str) {
        self.inner.known.lock().unwrap_or_else(PoisonError::into_inner).remove(topic);
    }

    /// Whether `topic` exists: remembered, or else asked of the broker.
    async fn exists(&self, topic: &str) -> Result<bool, Error> {
        if self.inner.known.lock().unwrap_or_else(PoisonError::into_inner).contains(topic) {
            return Ok(true);
        }
        let partitions = self.partitions_of(topic).await?;
        if partitions.is_empty() {
            return Ok(false);
        }
        self.remember(topic);
        Ok(true)
    }

    /// The partitions of `topic` (none: it does not exist).
    async fn partitions_of(&self, topic: &str) -> Result<Vec<i32>, Error> {
        let kafka = self.clone();
        let name = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            let metadata = kafka.inner.producer.client().fetch_metadata(Some(&name), ADMIN_TIMEOUT);
            let metadata = metadata.map_err(|error| match error {
                KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition) => None,
                other => Some(other),
            });
            match metadata {
                Ok(metadata) => Ok(metadata
                    .topics()
                    .iter()
                    .filter(|found| found.name() == name && found.error().is_none())
                    .flat_map(|found| found.partitions().iter().map(|partition| partition.id()))
                    .collect()),
                Err(None) => Ok(Vec::new()),
                Err(Some(error)) => Err(broker_error(error)),
            }
        })
        .await
        .map_err(|error| Error::Transport(error.into()))?
    }

    /// Creates `topic` with `partitions` unless it exists.
    async fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), Error> {
        if self.exists(topic).await? {
            return Ok(());
        }
        let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(self.inner.options.replication));
        let results = self
            .inner
            .admin
            .create_topics([&new], &AdminOptions::new().request_timeout(Some(ADMIN_TIMEOUT)))
            .await
            .map_err(broker_error)?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(Error::Transport(format!("creating topic `{name}`: {code}").into()));
                }
            }
        }
        // The broker answers the creation before every broker's metadata has the topic.
        let deadline = tokio::time::Instant::now() + ADMIN_TIMEOUT;
        while !self.exists(topic).await? {
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Transport(format!("topic `{topic}` was created but does not show").into()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    async fn delete_topic(&self, topic: &str) -> Result<(), Error> {
        self.forget(topic);
        let results = self
            .inner
            .admin
            .delete_topics(&[topic], &AdminOptions::new().request_timeout(Some(ADMIN_TIMEOUT)))
            .await
            .map_err(broker_error)?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                Err((name, code)) => {
                    return Err(Error::Transport(format!("deleting topic `{name}`: {code}").into()));
                }
            }
        }
        Ok(())
    }

    /// Produces `envelope` to `topic`, which exists, confirmed by the broker.
    async fn produce(&self, topic: &str, envelope: &Envelope, delivery_count: u32) -> Result<(), Error> {
        let headers = mapping::to_headers(envelope, delivery_count);
        let record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(topic).payload(envelope.body.as_ref()).headers(headers);
        match self.inner.producer.send(record, Duration::ZERO).await {
            Ok(_) => Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::UnknownTopicOrPartition), _)) => {
                self.forget(topic);
                Err(Error::NoRoute(topic.to_owned()))
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                Err(Error::QueueFull(topic.to_owned()))
            }
            Err((error, _)) => Err(broker_error(error)),
        }
    }

    /// Publishes `envelope` to the queue `queue`: refused for what Kafka cannot carry, [`Error::NoRoute`]
    /// for a queue that does not exist.
    async fn publish_to(&self, queue: &str, envelope: Envelope, delivery_count: u32) -> Result<(), Error> {
        refuse(&envelope)?;
        let topic = topic_name(queue)?;
        if !self.exists(&topic).await? {
            return Err(Error::NoRoute(queue.to_owned()));
        }
        self.produce(&topic, &envelope, delivery_count).await
    }
}

/// What every client of the transport is configured with; the adapter's settings of each client follow, then
/// [`UserProperties::user`] applies the user's.
fn client_config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers).set("allow.auto.create.topics", "false").set("log_level", "4");
    config
}

/// The user's librdkafka properties ([`KafkaOptions::properties`]), applied last: they override the adapter's.
trait UserProperties {
    fn user(&mut self, options: &KafkaOptions) -> &mut Self;
}

impl UserProperties for ClientConfig {
    fn user(&mut self, options: &KafkaOptions) -> &mut ClientConfig {
        for (name, value) in &options.properties {
            self.set(name, value);
        }
        self
    }
}

fn millis(duration: Duration) -> String {
    duration.as_millis().max(1).to_string()
}

/// Refuses what Kafka has no place for, rather than ignoring it.
fn refuse(envelope: &Envelope) -> Result<(), Error> {
    crate::adapter::refuse_delay(envelope)?;
    match envelope.priority {
        Some(priority) if priority > 0 => Err(Error::Unsupported("priorities")),
        _ => Ok(()),
    }
}

/// The topic of a queue or reply address: a legal Kafka topic name (ASCII letters, digits, `.`, `_`, `-`) is
/// itself; in any other name, each other byte becomes `_` and two upper-case hex digits. Escaping a topic name
/// again changes nothing.
///
/// # Errors
/// [`Error::InvalidArgument`] for an empty name, or one whose topic would be longer than Kafka allows.
pub fn topic_name(queue: &str) -> Result<String, Error> {
    let mut topic = String::with_capacity(queue.len());
    for byte in queue.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-') {
            topic.push(char::from(byte));
        } else {
            topic.push_str(&format!("_{byte:02X}"));
        }
    }
    if topic.is_empty() || topic.len() > MAX_TOPIC || topic == "." || topic == ".." {
        return Err(Error::InvalidArgument(format!(
            "`{queue}` makes no Kafka topic name (1 to {MAX_TOPIC} characters once escaped, not `.` or `..`)"
        )));
    }
    Ok(topic)
}

fn transport_error(error: KafkaError) -> Error {
    Error::Transport(Box::new(error))
}

/// An error of the broker or the connection to it.
fn broker_error(error: KafkaError) -> Error {
    match error.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::MessageTimedOut
            | RDKafkaErrorCode::OperationTimedOut
            | RDKafkaErrorCode::RequestTimedOut,
        ) => Error::Disconnected,
        Some(
            RDKafkaErrorCode::Authentication
            | RDKafkaErrorCode::SaslAuthenticationFailed
            | RDKafkaErrorCode::TopicAuthorizationFailed,
        ) => Error::Unauthorized(error.to_string()),
        _ => Error::Transport(Box::new(error)),
    }
}

impl Transport for Kafka {
    fn system(&self) -> &'static str {
        "kafka"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::none().durable(true).acks(true).dead_letter(true).subscriber_groups(true).queue_stats(true)
    }

    fn declare_queue<'a>(&'a self, queue: &'a str, options: &'a QueueOptions) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            if options.max_len.is_some() {
                return Err(Error::Unsupported("queue length limits"));
            }
            if queue.starts_with(INBOX_PREFIX) {
                return Err(Error::InvalidArgument(format!(
                    "`{queue}`: names starting with `{INBOX_PREFIX}` are inboxes'"
                )));
            }
            let topic = topic_name(queue)?;
            let dead_letters = topic_name(&rpc_core::naming::dead_letter_queue(queue))?;
            self.create_topic(&dead_letters, 1).await?;
            self.create_topic(&topic, self.inner.options.partitions).await?;
            match options.max_deliveries {
                Some(max) => {
                    self.inner.max_deliveries.insert(topic, max);
                }
                None => {
                    self.inner.max_deliveries.remove(&topic);
                }
            }
            Ok(())
        })
    }

    fn publish<'a>(&'a self, queue: &'a str, envelope: Envelope, confirm: Confirm) -> BoxFuture<'a, Result<(), Error>> {
        // Every publish is confirmed: a reply's ack never overtakes it, and the producer batches what is
        // published at once.
        let _ = confirm;
        Box::pin(self.publish_to(queue, envelope, 1))
    }

    fn publish_topic<'a>(&'a self, topic: &'a str, envelope: Envelope) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            refuse(&envelope)?;
            let name = topic_name(topic)?;
            if !self.exists(&name).await? {
                // No subscriber group was ever made: nobody to receive it.
                return Ok(());
            }
            self.produce(&name, &envelope, 1).await
        })
    }

    fn consume<'a>(&'a self, queue: &'a str, options: ConsumeOptions) -> BoxFuture<'a, Result<Consumer, Error>> {
        Box::pin(async move {
            let topic = topic_name(queue)?;
            if !self.exists(&topic).await? {
                return Err(Error::NoRoute(queue.to_owned()));
            }
            let max_deliveries = self.inner.max_deliveries.get(&topic).map(|max| *max);
            start_group(self.clone(), topic.clone(), topic, options, max_deliveries, GroupStart::Committed).await
        })
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        options: ConsumeOptions,
    ) -> BoxFuture<'a, Result<Consumer, Error>> {
        Box::pin(async move {
            let name = topic_name(topic)?;
            self.create_topic(&name, 1).await?;
            let group_id = format!("{name}@{group}");
            start_group(self.clone(), name, group_id, options, None, GroupStart::End).await
        })
    }

    /// A reader of the topic's partition without a group, from its end: it commits nothing, so nothing of it
    /// stays on the broker.
    fn subscribe_private<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Consumer, Error>> {
        Box::pin(async move {
            let name = topic_name(topic)?;
            self.create_topic(&name, 1).await?;
            consumer::start_reader(self.clone(), name, consumer::Reader::Private).await
        })
    }

    fn open_inbox(&self) -> BoxFuture<'_, Result<Inbox, Error>> {
        Box::pin(async move {
            let topic = format!("{INBOX_PREFIX}{}", uuid::Uuid::new_v4().simple());
            self.create_topic(&topic, 1).await?;
            start_inbox(self.clone(), topic).await
        })
    }

    fn queue_stats<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<QueueStats, Error>> {
        Box::pin(async move {
            let topic = topic_name(queue)?;
            let partitions = self.partitions_of(&topic).await?;
            if partitions.is_empty() {
                return Err(Error::NoRoute(queue.to_owned()));
            }
            let dead_letters = topic_name(&rpc_core::naming::dead_letter_queue(queue))?;
            let dead_partitions = self.partitions_of(&dead_letters).await?;
            consumer::stats(self.clone(), topic, partitions, dead_letters, dead_partitions).await
        })
    }

    fn delete_queue<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            if queue.starts_with(INBOX_PREFIX) {
                return Err(Error::InvalidArgument(format!("`{queue}` is an inbox; it goes with its client")));
            }
            let topic = topic_name(queue)?;
            self.delete_topic(&topic).await?;
            self.inner.max_deliveries.remove(&topic);
            // The groups' committed offsets would point into a topic made again later.
            let marker = consumer::marker_group(&topic);
            let deleted = self
                .inner
                .admin
                .delete_groups(&[topic.as_str(), &marker], &AdminOptions::new().request_timeout(Some(ADMIN_TIMEOUT)))
                .await;
            if let Err(error) = deleted {
                tracing::debug!(%error, group = %topic, "could not delete the consumer group");
            }
            Ok(())
        })
    }

    /// Waits until the producer delivered what it was given, the group consumers committed the offsets their
    /// settles stored, and the consumers dropped so far have left their groups (each commits what was settled
    /// as it leaves).
    fn flush(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let kafka = self.clone();
            tokio::task::spawn_blocking(move || kafka.inner.producer.flush(ADMIN_TIMEOUT))
                .await
                .map_err(|error| Error::Transport(error.into()))?
                .map_err(broker_error)?;
            self.inner.groups.commit().await?;
            if self.inner.closing.wait(ADMIN_TIMEOUT).await { Ok(()) } else { Err(Error::Timeout(ADMIN_TIMEOUT)) }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_no_secret_property() {
        let options = KafkaOptions::new()
            .property("sasl.username", "tenant")
            .property("sasl.password", "pw-1")
            .property("ssl.key.password", "pw-2")
            .property("sasl.oauthbearer.client.secret", "pw-3");
        let shown = format!("{options:?}");
        assert!(shown.contains("tenant"), "{shown}");
        assert!(!shown.contains("pw-"), "{shown}");
    }

    #[test]
    fn legal_topic_names_stay_and_others_are_escaped_once() {
        assert_eq!(topic_name("ns.Calc-1").expect("valid"), "ns.Calc-1");
        assert_eq!(topic_name("my_replies").expect("valid"), "my_replies");
        assert_eq!(topic_name("a/b@c").expect("valid"), "a_2Fb_40c");
        let escaped = topic_name("a/b@c").expect("valid");
        assert_eq!(topic_name(&escaped).expect("valid"), escaped);
        assert!(matches!(topic_name(""), Err(Error::InvalidArgument(_))));
        assert!(matches!(topic_name(&"x".repeat(250)), Err(Error::InvalidArgument(_))));
    }
}
