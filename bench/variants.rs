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

/// The subject (NATS) or queue (RabbitMQ) the raw responders listen on.
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
    /// tarpc over TCP.
    Tarpc,
}

impl Variant {
    /// Every variant, in the order of the table.
    pub(crate) const ALL: [Variant; 9] = [
        Variant::InprocFloor,
        Variant::Embedded,
        Variant::OwnBroker,
        Variant::OwnDurable,
        Variant::NatsRaw,
        Variant::Nats,
        Variant::RabbitmqRaw,
        Variant::Rabbitmq,
        Variant::Tarpc,
    ];

    /// The name on the command line and in the table.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Variant::InprocFloor => "inproc-floor",
            Variant::Embedded => "embedded",
            Variant::OwnBroker => "own-broker",
            Variant::OwnDurable => "own-durable",
            Variant::NatsRaw => "nats-raw",
            Variant::Nats => "nats",
            Variant::RabbitmqRaw => "rabbitmq-raw",
            Variant::Rabbitmq => "rabbitmq",
            Variant::Tarpc => "tarpc",
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
            Variant::OwnBroker | Variant::Nats => Some(Variant::NatsRaw),
            Variant::OwnDurable => Some(Variant::OwnBroker),
            Variant::Rabbitmq => Some(Variant::RabbitmqRaw),
            Variant::InprocFloor | Variant::NatsRaw | Variant::RabbitmqRaw | Variant::Tarpc => None,
        }
    }

    /// The process names of the external broker this variant goes through, for its CPU time.
    pub(crate) fn broker_processes(self) -> &'static [&'static str] {
        match self {
            Variant::NatsRaw | Variant::Nats => &["nats-server"],
            Variant::RabbitmqRaw | Variant::Rabbitmq => &["beam.smp"],
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
