//! The variants: how each one calls `add`, and what answers it.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};

/// How long one call may take before it counts as failed.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The subject (NATS), queue (RabbitMQ, ActiveMQ) or topic (Kafka) the raw responders listen on.
pub(crate) const RAW_QUEUE: &str = "mqrpc.bench.raw";

/// The service every mqrpc variant serves.
#[rpc_core::service]
pub(crate) trait Bench {
    /// `a + b`.
    async fn add(&self, a: i64, b: i64) -> i64;
}

/// The `Bench` implementation every mqrpc responder runs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Adder;

impl Bench for Adder {
    async fn add(&self, a: i64, b: i64) -> i64 {
        a.wrapping_add(b)
    }
}

/// One way of answering `add`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Variant {
    /// mpsc + oneshot in this process.
    InprocFloor,
    /// mqrpc on the embedded broker.
    Embedded,
    /// The same with an OpenTelemetry layer recording every span.
    EmbeddedOtel,
    /// mqrpc through the `rpc-broker` server.
    OwnBroker,
    /// mqrpc through the `rpc-broker` server, the service queue durable (the broker with a data directory).
    OwnDurable,
    /// async-nats request-reply.
    NatsRaw,
    /// mqrpc on core NATS.
    Nats,
    /// Hand-written lapin RPC.
    RabbitmqRaw,
    /// mqrpc on RabbitMQ.
    Rabbitmq,
    /// Hand-written rdkafka RPC.
    KafkaRaw,
    /// mqrpc on Kafka.
    Kafka,
    /// Hand-written STOMP RPC on ActiveMQ.
    ActivemqRaw,
    /// mqrpc on ActiveMQ, over STOMP.
    Activemq,
    /// Hand-written Redis Streams RPC.
    RedisRaw,
    /// mqrpc on Redis Streams.
    Redis,
    /// tarpc over TCP.
    Tarpc,
    /// mqrpc over ZeroMQ, brokerless.
    Zeromq,
}

impl Variant {
    /// Every variant, in the order of the table.
    pub(crate) const ALL: [Variant; 17] = [
        Variant::InprocFloor,
        Variant::Embedded,
        Variant::EmbeddedOtel,
        Variant::OwnBroker,
        Variant::OwnDurable,
        Variant::NatsRaw,
        Variant::Nats,
        Variant::RabbitmqRaw,
        Variant::Rabbitmq,
        Variant::KafkaRaw,
        Variant::Kafka,
        Variant::ActivemqRaw,
        Variant::Activemq,
        Variant::RedisRaw,
        Variant::Redis,
        Variant::Tarpc,
        Variant::Zeromq,
    ];

    /// The name on the command line and in the table.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Variant::InprocFloor => "inproc-floor",
            Variant::Embedded => "embedded",
            Variant::EmbeddedOtel => "embedded-otel",
            Variant::OwnBroker => "own-broker",
            Variant::OwnDurable => "own-durable",
            Variant::NatsRaw => "nats-raw",
            Variant::Nats => "nats",
            Variant::RabbitmqRaw => "rabbitmq-raw",
            Variant::Rabbitmq => "rabbitmq",
            Variant::KafkaRaw => "kafka-raw",
            Variant::Kafka => "kafka",
            Variant::ActivemqRaw => "activemq-raw",
            Variant::Activemq => "activemq",
            Variant::RedisRaw => "redis-raw",
            Variant::Redis => "redis",
            Variant::Tarpc => "tarpc",
            Variant::Zeromq => "zeromq",
        }
    }

    /// The variant named `name`.
    pub(crate) fn parse(name: &str) -> Option<Variant> {
        Variant::ALL.into_iter().find(|variant| variant.name() == name)
    }

    /// What this variant is compared with, if anything.
    pub(crate) fn baseline(self) -> Option<Variant> {
        match self {
            Variant::Embedded => Some(Variant::InprocFloor),
            Variant::EmbeddedOtel => Some(Variant::Embedded),
            Variant::OwnBroker | Variant::Nats => Some(Variant::NatsRaw),
            Variant::OwnDurable => Some(Variant::OwnBroker),
            Variant::Rabbitmq => Some(Variant::RabbitmqRaw),
            Variant::Kafka => Some(Variant::KafkaRaw),
            Variant::Activemq => Some(Variant::ActivemqRaw),
            Variant::Redis => Some(Variant::RedisRaw),
            Variant::Zeromq => Some(Variant::Tarpc),
            Variant::InprocFloor
            | Variant::NatsRaw
            | Variant::RabbitmqRaw
            | Variant::KafkaRaw
            | Variant::ActivemqRaw
            | Variant::RedisRaw
            | Variant::Tarpc => None,
        }
    }

    /// The process names of the external broker this variant goes through, for its CPU time.
    pub(crate) fn broker_processes(self) -> &'static [&'static str] {
        match self {
            Variant::NatsRaw | Variant::Nats => &["nats-server"],
            Variant::RabbitmqRaw | Variant::Rabbitmq => &["beam.smp"],
            Variant::KafkaRaw | Variant::Kafka => &["tansu"],
            Variant::ActivemqRaw | Variant::Activemq => &["java"],
            Variant::RedisRaw | Variant::Redis => &["redis-server"],
            _ => &[],
        }
    }
}

/// Something that calls `add` and hands back the sum.
pub(crate) trait Caller: Send + Sync + 'static {
    /// One call.
    fn add(&self, a: i64, b: i64) -> impl Future<Output = Result<i64, String>> + Send;
}

/// The arguments as every raw variant sends them: a MessagePack array `[a, b]`.
pub(crate) fn encode_args(a: i64, b: i64) -> Result<Vec<u8>, String> {
    rmp_serde::to_vec(&(a, b)).map_err(|error| error.to_string())
}

/// What a raw responder does with a request body: the MessagePack sum, or `None` for a body that is not `[a, b]`.
pub(crate) fn answer(body: &[u8]) -> Option<Vec<u8>> {
    let (a, b): (i64, i64) = rmp_serde::from_slice(body).ok()?;
    rmp_serde::to_vec(&a.wrapping_add(b)).ok()
}

fn decode_sum(body: &[u8]) -> Result<i64, String> {
    rmp_serde::from_slice(body).map_err(|error| format!("bad reply: {error}"))
}

/// `inproc-floor`: a request channel and a oneshot reply, answered by one task.
#[derive(Debug)]
pub(crate) struct Floor {
    requests: mpsc::Sender<(Vec<u8>, oneshot::Sender<Vec<u8>>)>,
}

impl Floor {
    /// Starts the answering task.
    pub(crate) fn start() -> Floor {
        let (requests, mut receiver) = mpsc::channel::<(Vec<u8>, oneshot::Sender<Vec<u8>>)>(1024);
        tokio::spawn(async move {
            while let Some((body, reply)) = receiver.recv().await {
                if let Some(sum) = answer(&body) {
                    let _ = reply.send(sum);
                }
            }
        });
        Floor { requests }
    }
}

impl Caller for Floor {
    async fn add(&self, a: i64, b: i64) -> Result<i64, String> {
        let (reply, receive) = oneshot::channel();
        self.requests.send((encode_args(a, b)?, reply)).await.map_err(|_| "the answering task is gone".to_owned())?;
        let body = receive.await.map_err(|_| "no answer".to_owned())?;
        decode_sum(&body)
    }
}

/// Every mqrpc variant: the generated client.
#[derive(Debug)]
pub(crate) struct Mqrpc {
    client: BenchClient,
}

impl Mqrpc {
    /// A client on `transport`.
    pub(crate) async fn connect(transport: impl rpc_core::Transport) -> Result<Mqrpc, String> {
        let client = rpc_core::Client::connect(transport).await.map_err(|error| error.to_string())?;
        Ok(Mqrpc { client: BenchClient::new(&client) })
    }
}

impl Caller for Mqrpc {
    async fn add(&self, a: i64, b: i64) -> Result<i64, String> {
        self.client.add(a, b).timeout(CALL_TIMEOUT).await.map_err(|error| error.to_string())
    }
}

/// `nats-raw`: `Client::request`.
#[derive(Debug)]
pub(crate) struct NatsRaw {
    client: async_nats::Client,
}

impl NatsRaw {
    /// Connects to `url`.
    pub(crate) async fn connect(url: &str) -> Result<NatsRaw, String> {
        let client = async_nats::ConnectOptions::new()
            .request_timeout(Some(CALL_TIMEOUT))
            .connect(url)
            .await
            .map_err(|error| error.to_string())?;
        Ok(NatsRaw { client })
    }
}

impl Caller for NatsRaw {
    async fn add(&self, a: i64, b: i64) -> Result<i64, String> {
        let reply =
            self.client.request(RAW_QUEUE, Bytes::from(encode_args(a, b)?)).await.map_err(|error| error.to_string())?;
        decode_sum(&reply.payload)
    }
}

/// The `nats-raw` responder: a queue subscription answering each message in turn.
pub(crate) async fn nats_raw_responder(url: &str) -> Result<(), String> {
    let client = async_nats::connect(url).await.map_err(|error| error.to_string())?;
    let mut requests = client.queue_subscribe(RAW_QUEUE, "bench".into()).await.map_err(|error| error.to_string())?;
    client.flush().await.map_err(|error| error.to_string())?;
    crate::roles::ready("subscribed");
    while let Some(message) = requests.next().await {
        let (Some(reply), Some(sum)) = (message.reply, answer(&message.payload)) else { continue };
        client.publish(reply, Bytes::from(sum)).await.map_err(|error| error.to_string())?;
    }
    Ok(())
}

/// `rabbitmq-raw`: the RPC of RabbitMQ's tutorial, in lapin: an exclusive server-named reply queue consumed
/// without acks, a correlation id per call, a map of waiting calls.
#[derive(Debug)]
pub(crate) struct RabbitRaw {
    _connection: lapin::Connection,
    channel: lapin::Channel,
    reply_to: lapin::types::ShortString,
    waiting: Arc<DashMap<u64, oneshot::Sender<Vec<u8>>>>,
    next: AtomicU64,
}

impl RabbitRaw {
    /// Connects to `url` and starts reading replies.
    pub(crate) async fn connect(url: &str) -> Result<RabbitRaw, String> {
        use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
        let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default().enable_auto_recover())
            .await
            .map_err(|error| error.to_string())?;
        let channel = connection.create_channel().await.map_err(|error| error.to_string())?;
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
                Default::default(),
            )
            .await
            .map_err(|error| error.to_string())?;
        let reply_to = queue.name().clone();
        let mut replies = channel
            .basic_consume(
                reply_to.clone(),
                "replies".into(),
                BasicConsumeOptions { no_ack: true, ..Default::default() },
                Default::default(),
            )
            .await
            .map_err(|error| error.to_string())?;
        let waiting: Arc<DashMap<u64, oneshot::Sender<Vec<u8>>>> = Arc::new(DashMap::new());
        let map = Arc::clone(&waiting);
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = replies.next().await {
                let id = delivery.properties.correlation_id().as_ref().and_then(|id| id.as_str().parse::<u64>().ok());
                if let Some((_, reply)) = id.and_then(|id| map.remove(&id)) {
                    let _ = reply.send(delivery.data);
                }
            }
        });
        Ok(RabbitRaw { _connection: connection, channel, reply_to, waiting, next: AtomicU64::new(0) })
    }
}

impl Caller for RabbitRaw {
    async fn add(&self, a: i64, b: i64) -> Result<i64, String> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (reply, receive) = oneshot::channel();
        self.waiting.insert(id, reply);
        let properties = lapin::BasicProperties::default()
            .with_correlation_id(id.to_string().into())
            .with_reply_to(self.reply_to.clone());
        let published = self
            .channel
            .basic_publish("".into(), RAW_QUEUE.into(), Default::default(), &encode_args(a, b)?, properties)
            .await;
        if let Err(error) = published {
            self.waiting.remove(&id);
            return Err(error.to_string());
        }
        match tokio::time::timeout(CALL_TIMEOUT, receive).await {
            Ok(Ok(body)) => decode_sum(&body),
            Ok(Err(_)) => Err("the reply reader stopped".into()),
            Err(_) => {
                self.waiting.remove(&id);
                Err("timed out".into())
            }
        }
    }
}

/// The `rabbitmq-raw` responder: a consumer with a prefetch, publishing each reply and acking the request.
pub(crate) async fn rabbit_raw_responder(url: &str) -> Result<(), String> {
    use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
    let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .map_err(|error| error.to_string())?;
    let channel = connection.create_channel().await.map_err(|error| error.to_string())?;
    channel
        .queue_declare(
            RAW_QUEUE.into(),
            QueueDeclareOptions { auto_delete: true, ..Default::default() },
            Default::default(),
        )
        .await
        .map_err(|error| error.to_string())?;
    channel.basic_qos(256, BasicQosOptions::default()).await.map_err(|error| error.to_string())?;
    let mut requests = channel
        .basic_consume(RAW_QUEUE.into(), "responder".into(), BasicConsumeOptions::default(), Default::default())
        .await
        .map_err(|error| error.to_string())?;
    crate::roles::ready("consuming");
    while let Some(delivery) = requests.next().await {
        let delivery = delivery.map_err(|error| error.to_string())?;
        let reply_to = delivery.properties.reply_to().clone();
        if let (Some(reply_to), Some(sum)) = (reply_to, answer(&delivery.data)) {
            let mut properties = lapin::BasicProperties::default();
            if let Some(id) = delivery.properties.correlation_id() {
                properties = properties.with_correlation_id(id.clone());
            }
            channel
                .basic_publish("".into(), reply_to, Default::default(), &sum, properties)
                .await
                .map_err(|error| error.to_string())?;
        }
        delivery.ack(BasicAckOptions::default()).await.map_err(|error| error.to_string())?;
    }
    Ok(())
}

/// Partitions of the Kafka request topics: `kafka-raw`'s, and the service queue's of `kafka`.
pub(crate) const KAFKA_PARTITIONS: i32 = 6;

/// The group session timeout of both Kafka variants' responders. tansu holds a group's first join for about
/// half of it: with the adapter's default of 10 s, each responder would wait 5 s for its first request.
pub(crate) const KAFKA_SESSION: Duration = Duration::from_secs(6);

/// How long a Kafka metadata or admin request may take.
const KAFKA_ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the broker may hold a fetch of `kafka-raw`'s consumers that finds nothing new: the value the
/// adapter's consumers use (it sets it after the properties of its options, so the `kafka` variant cannot change
/// it). On tansu it sets most of the latency at one call in flight, so a baseline with another value would
/// measure the setting rather than the framework.
const KAFKA_FETCH_WAIT_MS: &str = "100";

/// The `kafka-raw` header naming the call a request or reply belongs to.
const KAFKA_CORRELATION_ID: &str = "correlation-id";

/// The `kafka-raw` header naming the topic a request's reply goes to.
const KAFKA_REPLY_TO: &str = "reply-to";

/// The options of the `kafka` variant's client and worker.
pub(crate) fn kafka_options() -> rpc_broker::adapter::kafka::KafkaOptions {
    rpc_broker::adapter::kafka::KafkaOptions::new().partitions(KAFKA_PARTITIONS).session_timeout(KAFKA_SESSION)
}

/// The `host:port` list of a Kafka URL, which may start with `kafka://`.
fn kafka_brokers(url: &str) -> &str {
    url.strip_prefix("kafka://").unwrap_or(url)
}

/// What every `kafka-raw` client is configured with.
fn kafka_config(brokers: &str) -> rdkafka::ClientConfig {
    let mut config = rdkafka::ClientConfig::new();
    config.set("bootstrap.servers", brokers).set("allow.auto.create.topics", "false").set("log_level", "4");
    config
}

/// A producer as the adapter makes one: idempotent, confirmed by every in-sync replica, sending at once.
fn kafka_producer(brokers: &str) -> Result<rdkafka::producer::FutureProducer, String> {
    kafka_config(brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "0")
        .create()
        .map_err(|error| error.to_string())
}

/// Creates `topic` with `partitions` unless it exists, and waits until the broker's metadata shows it.
async fn create_kafka_topic(brokers: &str, topic: &str, partitions: i32) -> Result<(), String> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::error::RDKafkaErrorCode;
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        kafka_config(brokers).create().map_err(|error| error.to_string())?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let options = AdminOptions::new().request_timeout(Some(KAFKA_ADMIN_TIMEOUT));
    for result in admin.create_topics([&new], &options).await.map_err(|error| error.to_string())? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => return Err(format!("creating topic `{name}`: {code}")),
        }
    }
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: rdkafka::consumer::BaseConsumer =
            kafka_config(&brokers).create().map_err(|error| error.to_string())?;
        let deadline = std::time::Instant::now() + KAFKA_ADMIN_TIMEOUT;
        while kafka_partitions(&consumer, &topic)?.is_empty() {
            if std::time::Instant::now() >= deadline {
                return Err(format!("topic `{topic}` was created but does not show"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    })
    .await
    .map_err(|error| error.to_string())?
}

/// Deletes `topic` if it exists.
async fn delete_kafka_topic(brokers: &str, topic: &str) -> Result<(), String> {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::error::RDKafkaErrorCode;
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        kafka_config(brokers).create().map_err(|error| error.to_string())?;
    let options = AdminOptions::new().request_timeout(Some(KAFKA_ADMIN_TIMEOUT));
    for result in admin.delete_topics(&[topic], &options).await.map_err(|error| error.to_string())? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((name, code)) => return Err(format!("deleting topic `{name}`: {code}")),
        }
    }
    Ok(())
}

/// The partitions of `topic` in the broker's metadata (none while it does not show), blocking.
fn kafka_partitions(consumer: &rdkafka::consumer::BaseConsumer, topic: &str) -> Result<Vec<i32>, String> {
    use rdkafka::consumer::Consumer;
    use rdkafka::error::KafkaError;
    use rdkafka::error::RDKafkaErrorCode;
    match consumer.fetch_metadata(Some(topic), KAFKA_ADMIN_TIMEOUT) {
        Ok(metadata) => Ok(metadata
            .topics()
            .iter()
            .filter(|found| found.name() == topic && found.error().is_none())
            .flat_map(|found| found.partitions().iter().map(|partition| partition.id()))
            .collect()),
        Err(KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition)) => Ok(Vec::new()),
        Err(error) => Err(error.to_string()),
    }
}

/// `kafka-raw`: a hand-written request-reply over rdkafka. Requests go to [`RAW_QUEUE`] with the correlation
/// id and the reply topic in headers; replies come back on a topic of one partition per client, read without a
/// group, and are matched to the waiting calls by correlation id.
pub(crate) struct KafkaRaw {
    producer: rdkafka::producer::FutureProducer,
    reply_to: String,
    waiting: Arc<DashMap<u64, oneshot::Sender<Vec<u8>>>>,
    next: AtomicU64,
    /// Dropped with the client: the reply reader stops and deletes the reply topic, as the `kafka` variant's
    /// client does with its inbox.
    _stop: oneshot::Sender<()>,
}

impl std::fmt::Debug for KafkaRaw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaRaw").field("reply_to", &self.reply_to).finish_non_exhaustive()
    }
}

impl KafkaRaw {
    /// Connects to `url`, makes the reply topic and starts reading it.
    pub(crate) async fn connect(url: &str) -> Result<KafkaRaw, String> {
        use rdkafka::admin::{AdminClient, AdminOptions};
        use rdkafka::consumer::{Consumer, StreamConsumer};
        use rdkafka::message::{Headers, Message};
        let brokers = kafka_brokers(url);
        let producer = kafka_producer(brokers)?;
        let admin: AdminClient<rdkafka::client::DefaultClientContext> =
            kafka_config(brokers).create().map_err(|error| error.to_string())?;
        let reply_to = format!("{RAW_QUEUE}.reply.{}", uuid::Uuid::new_v4().simple());
        create_kafka_topic(brokers, &reply_to, 1).await?;
        // librdkafka wants a group id for any consumer; this one is only assigned, never joins or commits.
        let replies: StreamConsumer = kafka_config(brokers)
            .set("group.id", &reply_to)
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", KAFKA_FETCH_WAIT_MS)
            .create()
            .map_err(|error| error.to_string())?;
        let mut partition = rdkafka::TopicPartitionList::new();
        partition.add_partition_offset(&reply_to, 0, rdkafka::Offset::Beginning).map_err(|error| error.to_string())?;
        replies.assign(&partition).map_err(|error| error.to_string())?;
        let waiting: Arc<DashMap<u64, oneshot::Sender<Vec<u8>>>> = Arc::new(DashMap::new());
        let map = Arc::clone(&waiting);
        let (stop, mut stopped) = oneshot::channel::<()>();
        let topic = reply_to.clone();
        tokio::spawn(async move {
            loop {
                let record = tokio::select! {
                    _ = &mut stopped => break,
                    record = replies.recv() => record,
                };
                let record = match record {
                    Ok(record) => record,
                    Err(error) => {
                        eprintln!("kafka-raw: reading replies: {error}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let id = record.headers().and_then(|headers| {
                    let header = headers.iter().find(|header| header.key == KAFKA_CORRELATION_ID)?;
                    std::str::from_utf8(header.value?).ok()?.parse::<u64>().ok()
                });
                if let Some((_, reply)) = id.and_then(|id| map.remove(&id)) {
                    let _ = reply.send(record.payload().unwrap_or_default().to_vec());
                }
            }
            // librdkafka's close blocks.
            let _ = tokio::task::spawn_blocking(move || drop(replies)).await;
            let options = AdminOptions::new().request_timeout(Some(KAFKA_ADMIN_TIMEOUT));
            let _ = admin.delete_topics(&[topic.as_str()], &options).await;
        });
        Ok(KafkaRaw { producer, reply_to, waiting, next: AtomicU64::new(0), _stop: stop })
    }
}

impl Caller for KafkaRaw {
    async fn add(&self, a: i64, b: i64) -> Result<i64, String> {
        use rdkafka::message::{Header, OwnedHeaders};
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (reply, receive) = oneshot::channel();
        self.waiting.insert(id, reply);
        let body = encode_args(a, b)?;
        let id_text = id.to_string();
        let headers = OwnedHeaders::new_with_capacity(2)
            .insert(Header { key: KAFKA_CORRELATION_ID, value: Some(&id_text) })
            .insert(Header { key: KAFKA_REPLY_TO, value: Some(&self.reply_to) });
        let record: rdkafka::producer::FutureRecord<'_, (), [u8]> =
            rdkafka::producer::FutureRecord::to(RAW_QUEUE).payload(body.as_slice()).headers(headers);
        if let Err((error, _)) = self.producer.send(record, Duration::ZERO).await {
            self.waiting.remove(&id);
            return Err(error.to_string());
        }
        match tokio::time::timeout(CALL_TIMEOUT, receive).await {
            Ok(Ok(body)) => decode_sum(&body),
            Ok(Err(_)) => Err("the reply reader stopped".into()),
            Err(_) => {
                self.waiting.remove(&id);
                Err("timed out".into())
            }
        }
    }
}

/// The consumer context of the `kafka-raw` responder: says `ready` once the group has assigned it partitions.
#[derive(Debug, Default)]
struct Joined {
    said: std::sync::atomic::AtomicBool,
}

impl rdkafka::ClientContext for Joined {}

impl rdkafka::consumer::ConsumerContext for Joined {
    fn post_rebalance(&self, _: &rdkafka::consumer::BaseConsumer<Self>, rebalance: &rdkafka::consumer::Rebalance<'_>) {
        if matches!(rebalance, rdkafka::consumer::Rebalance::Assign(list) if list.count() > 0)
            && !self.said.swap(true, Ordering::Relaxed)
        {
            crate::roles::ready("consuming");
        }
    }
}

/// The `kafka-raw` responder: a member of a consumer group on [`RAW_QUEUE`] that produces each reply to the
/// topic its request names, and stores a request's offset for the next automatic commit once its reply (and
/// every earlier one) is confirmed, holding at most [`PREFETCH`](crate::roles::PREFETCH) replies unconfirmed.
///
/// It starts on a new topic and a new group: the bench kills each responder, and the records an earlier one
/// left are for callers that are gone; tansu reads a partition by listing every batch it holds, so an old
/// topic's history would slow this run down; and a new group has no member left over from the responder killed
/// last, whose session would hold up the join.
pub(crate) async fn kafka_raw_responder(url: &str) -> Result<(), String> {
    use futures::stream::FuturesOrdered;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
    let brokers = kafka_brokers(url);
    delete_kafka_topic(brokers, RAW_QUEUE).await?;
    create_kafka_topic(brokers, RAW_QUEUE, KAFKA_PARTITIONS).await?;
    let group = format!("{RAW_QUEUE}.{}", uuid::Uuid::new_v4().simple());
    let producer = kafka_producer(brokers)?;
    let requests: StreamConsumer<Joined> = kafka_config(brokers)
        .set("group.id", &group)
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", KAFKA_SESSION.as_millis().to_string())
        .set("heartbeat.interval.ms", (KAFKA_SESSION / 3).as_millis().to_string())
        .set("fetch.wait.max.ms", KAFKA_FETCH_WAIT_MS)
        .create_with_context(Joined::default())
        .map_err(|error| error.to_string())?;
    requests.subscribe(&[RAW_QUEUE]).map_err(|error| error.to_string())?;
    let mut replies = FuturesOrdered::new();
    loop {
        tokio::select! {
            Some((partition, offset, delivered)) = replies.next() => {
                if let Err(error) = delivered {
                    eprintln!("kafka-raw: a reply was not delivered: {error}");
                }
                requests.store_offset(RAW_QUEUE, partition, offset).map_err(|error| error.to_string())?;
            }
            record = requests.recv(), if replies.len() < crate::roles::PREFETCH as usize => {
                let record = record.map_err(|error| error.to_string())?;
                let header = |key: &str| {
                    let headers = record.headers()?;
                    let header = headers.iter().find(|header| header.key == key)?;
                    std::str::from_utf8(header.value?).ok()
                };
                let sum = answer(record.payload().unwrap_or_default());
                let reply = match (header(KAFKA_REPLY_TO), header(KAFKA_CORRELATION_ID), sum) {
                    (Some(reply_to), Some(id), Some(sum)) => {
                        let headers = OwnedHeaders::new_with_capacity(1)
                            .insert(Header { key: KAFKA_CORRELATION_ID, value: Some(id) });
                        let reply: rdkafka::producer::FutureRecord<'_, (), [u8]> =
                            rdkafka::producer::FutureRecord::to(reply_to).payload(sum.as_slice()).headers(headers);
                        Some(producer.send_result(reply).map_err(|(error, _)| error.to_string())?)
                    }
                    _ => None,
                };
                let (partition, offset) = (record.partition(), record.offset());
                replies.push_back(async move {
                    let delivered = match reply {
                        Some(delivery) => match delivery.await {
                            Ok(Ok(_)) => Ok(()),
                            Ok(Err((error, _))) => Err(error.to_string()),
                            Err(_) => Err("the producer is gone".to_owned()),
                        },
                        None => Ok(()),
                    };
                    (partition, offset, delivered)
                });
            }
        }
    }
}

/// The `activemq-raw` destination of the requests.
const STOMP_RAW_QUEUE: &str = "/queue/mqrpc.bench.raw";

/// `activemq-raw`: a hand-written request-reply over one STOMP connection. Requests go to [`STOMP_RAW_QUEUE`]
/// with a `correlation-id` and a `reply-to` naming a temporary queue the same connection subscribed to, sent
/// `persistent:true` without a receipt as the `activemq` variant sends a call's request (the reply proves it
/// arrived); replies come back on that subscription, `ack:auto`, and are matched to the waiting calls by
/// correlation id.
pub(crate) struct ActivemqRaw {
    connection: rpc_broker::adapter::stomp::connection::Connection,
    reply_to: String,
    waiting: Arc<DashMap<u64, oneshot::Sender<Bytes>>>,
    next: AtomicU64,
    /// Dropped with the client: the reply reader stops and the connection ends, taking the temporary queue.
    _stop: oneshot::Sender<()>,
}

impl std::fmt::Debug for ActivemqRaw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivemqRaw").field("reply_to", &self.reply_to).finish_non_exhaustive()
    }
}

impl ActivemqRaw {
    /// Connects to `url`, subscribes to a temporary reply queue and starts reading it.
    pub(crate) async fn connect(url: &str) -> Result<ActivemqRaw, String> {
        use rpc_broker::adapter::stomp::connection::{ConnectOptions, Connection};
        let connection =
            Connection::connect(url, &ConnectOptions::default()).await.map_err(|error| error.to_string())?;
        let reply_to = format!("/temp-queue/{RAW_QUEUE}.reply.{}", uuid::Uuid::new_v4().simple());
        let mut replies = connection.subscribe(&reply_to, "auto", &[]).await.map_err(|error| error.to_string())?;
        let waiting: Arc<DashMap<u64, oneshot::Sender<Bytes>>> = Arc::new(DashMap::new());
        let map = Arc::clone(&waiting);
        let (stop, mut stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            loop {
                let frame = tokio::select! {
                    _ = &mut stopped => break,
                    frame = replies.next() => frame,
                };
                let Some(frame) = frame else { break };
                let id = frame.get("correlation-id").and_then(|id| id.parse::<u64>().ok());
                if let Some((_, reply)) = id.and_then(|id| map.remove(&id)) {
                    let _ = reply.send(frame.body);
                }
            }
            let connection = replies.connection().clone();
            drop(replies);
            let _ = connection.disconnect().await;
        });
        Ok(ActivemqRaw { connection, reply_to, waiting, next: AtomicU64::new(0), _stop: stop })
    }
}

impl Caller for ActivemqRaw {
    async fn add(&self, a: i64, b: i64) -> Result<i64, String> {
        use rpc_broker::adapter::stomp::codec::{Command, Frame};
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (reply, receive) = oneshot::channel();
        self.waiting.insert(id, reply);
        let mut request = Frame::new(Command::Send)
            .header("destination", STOMP_RAW_QUEUE)
            .header("reply-to", &self.reply_to)
            .header("correlation-id", &id.to_string())
            .header("persistent", "true");
        request.body = Bytes::from(encode_args(a, b)?);
        if let Err(error) = self.connection.send_unconfirmed(request) {
            self.waiting.remove(&id);
            return Err(error.to_string());
        }
        match tokio::time::timeout(CALL_TIMEOUT, receive).await {
            Ok(Ok(body)) => decode_sum(&body),
            Ok(Err(_)) => Err("the reply reader stopped".into()),
            Err(_) => {
                self.waiting.remove(&id);
                Err("timed out".into())
            }
        }
    }
}

/// The `activemq-raw` responder: a `client-individual` subscription to [`STOMP_RAW_QUEUE`] with a prefetch of
/// [`PREFETCH`](crate::roles::PREFETCH), sending each reply (not persistent, without a receipt, as the
/// `activemq` variant's worker replies to an inbox) to the request's `reply-to` with its `correlation-id`, then
/// acking the request.
pub(crate) async fn activemq_raw_responder(url: &str) -> Result<(), String> {
    use rpc_broker::adapter::stomp::codec::{Command, Frame};
    use rpc_broker::adapter::stomp::connection::{ConnectOptions, Connection};
    let connection = Connection::connect(url, &ConnectOptions::default()).await.map_err(|error| error.to_string())?;
    let prefetch = crate::roles::PREFETCH.to_string();
    let mut requests = connection
        .subscribe(STOMP_RAW_QUEUE, "client-individual", &[("activemq.prefetchSize", &prefetch)])
        .await
        .map_err(|error| error.to_string())?;
    crate::roles::ready("subscribed");
    while let Some(request) = requests.next().await {
        if let (Some(reply_to), Some(sum)) = (request.get("reply-to"), answer(&request.body)) {
            // No `persistent` header: ActiveMQ takes a STOMP message as non-persistent without one.
            let mut reply = Frame::new(Command::Send).header("destination", reply_to);
            if let Some(id) = request.get("correlation-id") {
                reply = reply.header("correlation-id", id);
            }
            reply.body = Bytes::from(sum);
            connection.send_unconfirmed(reply).map_err(|error| error.to_string())?;
        }
        if let Some(ack) = request.get("ack") {
            connection.ack(ack).map_err(|error| error.to_string())?;
        }
    }
    Err("the connection to the server closed".into())
}

/// The tarpc service: the same `add`.
#[tarpc::service]
pub(crate) trait TarpcBench {
    /// `a + b`.
    async fn add(a: i64, b: i64) -> i64;
}

#[derive(Clone, Copy, Debug)]
struct TarpcAdder;

impl TarpcBench for TarpcAdder {
    async fn add(self, _: tarpc::context::Context, a: i64, b: i64) -> i64 {
        a.wrapping_add(b)
    }
}

/// `tarpc`: its generated client over a MessagePack TCP transport.
#[derive(Debug)]
pub(crate) struct Tarpc {
    client: TarpcBenchClient,
}

impl Tarpc {
    /// Connects to `addr`.
    pub(crate) async fn connect(addr: &str) -> Result<Tarpc, String> {
        let transport = tarpc::serde_transport::tcp::connect(addr, tokio_serde::formats::MessagePack::default)
            .await
            .map_err(|error| error.to_string())?;
        let mut config = tarpc::client::Config::default();
        config.max_in_flight_requests = 4096;
        config.pending_request_buffer = 1024;
        Ok(Tarpc { client: TarpcBenchClient::new(config, transport).spawn() })
    }
}

impl Caller for Tarpc {
    async fn add(&self, a: i64, b: i64) -> Result<i64, String> {
        let mut context = tarpc::context::current();
        context.deadline = std::time::Instant::now() + CALL_TIMEOUT;
        self.client.add(context, a, b).await.map_err(|error| error.to_string())
    }
}

/// The tarpc responder: listens on a free loopback port and serves each connection.
pub(crate) async fn tarpc_responder() -> Result<(), String> {
    use tarpc::server::Channel;
    let mut listener = tarpc::serde_transport::tcp::listen("127.0.0.1:0", tokio_serde::formats::MessagePack::default)
        .await
        .map_err(|error| error.to_string())?;
    listener.config_mut().max_frame_length(16 * 1024 * 1024);
    crate::roles::ready(&listener.local_addr().to_string());
    while let Some(transport) = listener.next().await {
        let Ok(transport) = transport else { continue };
        let channel = tarpc::server::BaseChannel::with_defaults(transport);
        tokio::spawn(channel.execute(TarpcAdder.serve()).for_each(|call| async move {
            tokio::spawn(call);
        }));
    }
    Ok(())
}

/// The stream `redis-raw`'s requests go to, read by the consumer group [`RAW_GROUP`].
pub(crate) const RAW_STREAM: &str = "mqrpc-bench:raw";
/// `redis-raw`'s consumer group.
const RAW_GROUP: &str = "bench";

/// `redis-raw`: a hand-written request-reply over Redis Streams, as redis-rs's users write it: `XADD` to
/// [`RAW_STREAM`] with the correlation id (`c`), the reply stream (`r`) and the arguments (`b`); the replies read
/// with `XREAD BLOCK` from a stream of the client's own, on a connection of its own; a map of waiting calls.
pub(crate) struct RedisRaw {
    commands: redis::aio::MultiplexedConnection,
    reply_to: String,
    waiting: Arc<DashMap<u64, oneshot::Sender<Vec<u8>>>>,
    next: AtomicU64,
    /// Dropped with the client: the reply reader stops and deletes the reply stream.
    _stop: oneshot::Sender<()>,
}

impl std::fmt::Debug for RedisRaw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisRaw").field("reply_to", &self.reply_to).finish_non_exhaustive()
    }
}

/// A field's bytes in a stream entry.
fn field<'a>(entry: &'a redis::streams::StreamId, name: &str) -> Option<&'a [u8]> {
    match entry.map.get(name)? {
        redis::Value::BulkString(bytes) => Some(bytes),
        _ => None,
    }
}

impl RedisRaw {
    /// Connects to `url` and starts reading replies.
    pub(crate) async fn connect(url: &str) -> Result<RedisRaw, String> {
        let client = redis::Client::open(url).map_err(|error| error.to_string())?;
        let commands = client.get_multiplexed_async_connection().await.map_err(|error| error.to_string())?;
        let mut reader = client.get_multiplexed_async_connection().await.map_err(|error| error.to_string())?;
        let reply_to = format!("mqrpc-bench:replies:{}", uuid::Uuid::new_v4().simple());
        let waiting: Arc<DashMap<u64, oneshot::Sender<Vec<u8>>>> = Arc::new(DashMap::new());
        let (map, key) = (Arc::clone(&waiting), reply_to.clone());
        let (stop, mut stopped) = oneshot::channel::<()>();
        let mut cleanup = commands.clone();
        tokio::spawn(async move {
            let mut last = "$".to_owned();
            loop {
                let mut read = redis::cmd("XREAD");
                read.arg("COUNT").arg(1024).arg("BLOCK").arg(1000).arg("STREAMS").arg(&key).arg(&last);
                let reply = tokio::select! {
                    _ = &mut stopped => break,
                    reply = read.query_async::<Option<redis::streams::StreamReadReply>>(&mut reader) => reply,
                };
                let Ok(reply) = reply else { continue };
                let mut read_ids = Vec::new();
                for entry in reply.into_iter().flat_map(|reply| reply.keys).flat_map(|key| key.ids) {
                    last.clone_from(&entry.id);
                    read_ids.push(entry.id.clone());
                    let id = field(&entry, "c").and_then(|id| std::str::from_utf8(id).ok()?.parse::<u64>().ok());
                    if let (Some((_, reply)), Some(body)) = (id.and_then(|id| map.remove(&id)), field(&entry, "b")) {
                        let _ = reply.send(body.to_vec());
                    }
                }
                if !read_ids.is_empty() {
                    let _: Result<i64, _> = redis::cmd("XDEL").arg(&key).arg(&read_ids).query_async(&mut cleanup).await;
                }
            }
            let _: Result<i64, _> = redis::cmd("DEL").arg(&key).query_async(&mut cleanup).await;
        });
        Ok(RedisRaw { commands, reply_to, waiting, next: AtomicU64::new(0), _stop: stop })
    }
}

impl Caller for RedisRaw {
    async fn add(&self, a: i64, b: i64) -> Result<i64, String> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (reply, receive) = oneshot::channel();
        self.waiting.insert(id, reply);
        let mut commands = self.commands.clone();
        let added: Result<String, _> = redis::cmd("XADD")
            .arg(RAW_STREAM)
            .arg("*")
            .arg("c")
            .arg(id)
            .arg("r")
            .arg(&self.reply_to)
            .arg("b")
            .arg(encode_args(a, b)?)
            .query_async(&mut commands)
            .await;
        if let Err(error) = added {
            self.waiting.remove(&id);
            return Err(error.to_string());
        }
        match tokio::time::timeout(CALL_TIMEOUT, receive).await {
            Ok(Ok(body)) => decode_sum(&body),
            Ok(Err(_)) => Err("the reply reader stopped".into()),
            Err(_) => {
                self.waiting.remove(&id);
                Err("timed out".into())
            }
        }
    }
}

/// The `redis-raw` responder: a member of the consumer group on [`RAW_STREAM`] reading up to 256 entries at a
/// time, answering each on its reply stream, then acking and deleting the batch in one pipeline.
pub(crate) async fn redis_raw_responder(url: &str) -> Result<(), String> {
    let client = redis::Client::open(url).map_err(|error| error.to_string())?;
    let mut reader = client.get_multiplexed_async_connection().await.map_err(|error| error.to_string())?;
    let mut commands = client.get_multiplexed_async_connection().await.map_err(|error| error.to_string())?;
    let _: Result<i64, _> = redis::cmd("DEL").arg(RAW_STREAM).query_async(&mut commands).await;
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(RAW_STREAM)
        .arg(RAW_GROUP)
        .arg("$")
        .arg("MKSTREAM")
        .query_async::<()>(&mut commands)
        .await
        .map_err(|error| error.to_string())?;
    crate::roles::ready("reading");
    loop {
        let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(RAW_GROUP)
            .arg("responder")
            .arg("COUNT")
            .arg(256)
            .arg("BLOCK")
            .arg(1000)
            .arg("STREAMS")
            .arg(RAW_STREAM)
            .arg(">")
            .query_async(&mut reader)
            .await
            .map_err(|error| error.to_string())?;
        let entries: Vec<_> = reply.into_iter().flat_map(|reply| reply.keys).flat_map(|key| key.ids).collect();
        if entries.is_empty() {
            continue;
        }
        let mut pipeline = redis::pipe();
        for entry in &entries {
            let (Some(reply_to), Some(id), Some(sum)) =
                (field(entry, "r"), field(entry, "c"), field(entry, "b").and_then(answer))
            else {
                continue;
            };
            pipeline.cmd("XADD").arg(reply_to).arg("*").arg("c").arg(id).arg("b").arg(sum).ignore();
        }
        let ids: Vec<&str> = entries.iter().map(|entry| entry.id.as_str()).collect();
        pipeline.cmd("XACK").arg(RAW_STREAM).arg(RAW_GROUP).arg(&ids).ignore();
        pipeline.cmd("XDEL").arg(RAW_STREAM).arg(&ids).ignore();
        pipeline.query_async::<()>(&mut commands).await.map_err(|error| error.to_string())?;
    }
}
