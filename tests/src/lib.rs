//! The end-to-end scenario suite of mqrpc, written against the [`Transport`] trait only, so that every
//! transport runs the same scenarios: a transport that passes it is a transport that works.
//!
//! A transport joins with one line in `tests/e2e.rs`:
//!
//! ```text
//! mqrpc_tests::scenario_suite!(embedded, mqrpc_tests::EmbeddedHarness::new());
//! ```

pub mod activemq;
pub mod kafka;
pub mod otel;
pub mod prometheus;
pub mod rabbit;
pub mod service;
pub mod suite;
pub mod tidy;

use std::sync::Arc;
use std::time::Duration;

use rpc_core::Transport;
use rpc_core::transport::BoxFuture;

/// Opens connections to the broker under test.
pub trait Harness: Send + Sync + 'static {
    /// A new connection, as a separate process would open it. Connections of one harness share the broker.
    fn connect(&self) -> BoxFuture<'_, Arc<dyn Transport>>;
}

/// The embedded broker: every connection is a handle to the same in-process engine.
#[derive(Debug, Default)]
pub struct EmbeddedHarness {
    broker: rpc_broker::Embedded,
}

impl EmbeddedHarness {
    /// A harness on a fresh embedded broker.
    pub fn new() -> EmbeddedHarness {
        EmbeddedHarness::default()
    }
}

impl Harness for EmbeddedHarness {
    fn connect(&self) -> BoxFuture<'_, Arc<dyn Transport>> {
        let transport: Arc<dyn Transport> = Arc::new(self.broker.clone());
        Box::pin(std::future::ready(transport))
    }
}

/// Our own broker server on a free loopback port, reached through [`rpc_broker::Remote`]: each connection is a
/// TCP connection of its own, as a separate process would open.
#[derive(Debug)]
pub struct RemoteHarness {
    server: rpc_broker::server::BrokerServer,
}

impl RemoteHarness {
    /// Starts a broker server with the default configuration.
    pub async fn start() -> RemoteHarness {
        RemoteHarness::start_with(rpc_broker::server::ServerConfig::default()).await
    }

    /// Starts a broker server with `config`.
    pub async fn start_with(config: rpc_broker::server::ServerConfig) -> RemoteHarness {
        let address = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let server = rpc_broker::server::BrokerServer::bind(address, config).await.expect("the broker starts");
        RemoteHarness { server }
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The server.
    pub fn server(&self) -> &rpc_broker::server::BrokerServer {
        &self.server
    }
}

impl Harness for RemoteHarness {
    fn connect(&self) -> BoxFuture<'_, Arc<dyn Transport>> {
        Box::pin(async move {
            let remote = rpc_broker::Remote::connect(&self.url()).await.expect("connects to the broker");
            let transport: Arc<dyn Transport> = Arc::new(remote);
            transport
        })
    }
}

/// A harness, or the reason it cannot run here: an external broker whose URL variable is unset. A test that
/// needs one is ignored, with the reason, when the variable was unset as the tests were built (`build.rs`);
/// `.ci/run` sets every variable, so in CI they always run (and a down broker fails them).
pub trait Available {
    /// The harness.
    type Harness: Harness;

    /// The harness.
    ///
    /// # Panics
    /// When it cannot run: the test fails, it never passes without running.
    fn available(self) -> Self::Harness;
}

impl Available for EmbeddedHarness {
    type Harness = EmbeddedHarness;

    fn available(self) -> EmbeddedHarness {
        self
    }
}

impl Available for RemoteHarness {
    type Harness = RemoteHarness;

    fn available(self) -> RemoteHarness {
        self
    }
}

impl<H: Harness> Available for Result<H, Skip> {
    type Harness = H;

    fn available(self) -> H {
        log_from_env();
        match self {
            Ok(harness) => harness,
            Err(Skip(reason)) => panic!("cannot run: {reason}"),
        }
    }
}

/// Logs to the test's output at the level of `RUST_LOG`, if set, for investigating a failure.
pub fn log_from_env() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// Starts a private server of `what` with `start` on a free port. The free port is found by binding it and
/// letting it go, so another process (a server of a test running alongside) may take it first: then the server
/// exits, and another port is tried, five at most.
pub fn on_a_free_port<T>(what: &str, mut start: impl FnMut(u16) -> std::io::Result<T>) -> T {
    let mut tries = Vec::new();
    for _ in 0..5 {
        let port = free_port();
        match start(port) {
            Ok(server) => return server,
            Err(error) => tries.push(format!("port {port}: {error}")),
        }
    }
    panic!("no private {what} came up: {tries:?}");
}

/// A port free on loopback now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|listener| listener.local_addr()).expect("a free port").port()
}

/// Why a test against an external broker cannot run.
#[derive(Debug)]
pub struct Skip(pub String);

/// The URL in environment variable `variable`, or why the tests that need it cannot run.
pub fn broker_url(variable: &str) -> Result<String, Skip> {
    std::env::var(variable).map_err(|_| {
        Skip(format!("{variable} is not set (it was when the tests were built): eval \"$(bash .ci/brokers)\""))
    })
}

/// The URL in environment variable `variable`, for a test that is built only when it is set.
///
/// # Panics
/// When it is not set now.
pub fn required_url(variable: &str) -> String {
    broker_url(variable).unwrap_or_else(|Skip(reason)| panic!("cannot run: {reason}"))
}

/// RabbitMQ at `MQRPC_AMQP_URL`, through [`rpc_broker::adapter::amqp::Amqp`]. The queues and exchanges its
/// connections name are deleted when the harness is dropped ([`tidy`]); queues a test's worker processes declare
/// expire a minute after their last use, so that test runs do not pile them up in the broker.
#[derive(Debug)]
pub struct AmqpHarness {
    url: String,
    options: rpc_broker::adapter::amqp::AmqpOptions,
    named: Arc<tidy::Named>,
}

impl AmqpHarness {
    /// Classic queues, a reply queue per client.
    pub fn from_env() -> Result<AmqpHarness, Skip> {
        AmqpHarness::with(rpc_broker::adapter::amqp::AmqpOptions::new())
    }

    /// Transient requests: calls to a queue known to exist are published without confirms.
    pub fn transient() -> Result<AmqpHarness, Skip> {
        AmqpHarness::with(rpc_broker::adapter::amqp::AmqpOptions::new().persistent(false))
    }

    /// With `options` (queues still expire a minute after their last use).
    pub fn with(options: rpc_broker::adapter::amqp::AmqpOptions) -> Result<AmqpHarness, Skip> {
        let url = broker_url("MQRPC_AMQP_URL")?;
        Ok(AmqpHarness { url, options: options.queue_expires(Duration::from_secs(60)), named: Arc::default() })
    }

    /// The broker's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// What the connections of this harness named so far, deleted when it is dropped.
    pub fn named(&self) -> &Arc<tidy::Named> {
        &self.named
    }

    /// A transport of this harness, typed.
    pub async fn amqp(&self) -> rpc_broker::adapter::amqp::Amqp {
        rpc_broker::adapter::amqp::Amqp::connect_with(&self.url, self.options.clone())
            .await
            .expect("connects to RabbitMQ at MQRPC_AMQP_URL")
    }
}

impl Harness for AmqpHarness {
    fn connect(&self) -> BoxFuture<'_, Arc<dyn Transport>> {
        Box::pin(async move {
            let transport: Arc<dyn Transport> =
                Arc::new(tidy::Recording::new(Arc::new(self.amqp().await), Arc::clone(&self.named)));
            transport
        })
    }
}

impl Drop for AmqpHarness {
    fn drop(&mut self) {
        self.named.delete_from(&self.url);
    }
}

/// A STOMP server through [`rpc_broker::adapter::stomp::Stomp`]: ActiveMQ at `MQRPC_STOMP_URL`, or RabbitMQ's
/// STOMP plugin at `MQRPC_STOMP_RABBIT_URL`. On RabbitMQ the queues its connections name are deleted through AMQP
/// (`MQRPC_AMQP_URL`) when the harness is dropped ([`tidy`]), and the others expire a minute after their last
/// use; ActiveMQ drops idle ones by the destination policy of `.ci/activemq.xml`.
#[derive(Debug)]
pub struct StompHarness {
    url: String,
    options: rpc_broker::adapter::stomp::StompOptions,
    /// On RabbitMQ: its AMQP URL, and what the connections named.
    tidy: Option<(String, Arc<tidy::Named>)>,
}

impl StompHarness {
    /// ActiveMQ at `MQRPC_STOMP_URL`.
    pub fn activemq() -> Result<StompHarness, Skip> {
        Ok(StompHarness::with(&broker_url("MQRPC_STOMP_URL")?, stomp_options()))
    }

    /// RabbitMQ's STOMP plugin at `MQRPC_STOMP_RABBIT_URL`.
    pub fn rabbitmq() -> Result<StompHarness, Skip> {
        let mut harness = StompHarness::with(&broker_url("MQRPC_STOMP_RABBIT_URL")?, stomp_options());
        harness.tidy = broker_url("MQRPC_AMQP_URL").ok().map(|url| (url, Arc::default()));
        Ok(harness)
    }

    /// The server at `url`, with `options`.
    pub fn with(url: &str, options: rpc_broker::adapter::stomp::StompOptions) -> StompHarness {
        StompHarness { url: url.to_owned(), options, tidy: None }
    }

    /// The server's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A transport of this harness, typed.
    pub async fn stomp(&self) -> rpc_broker::adapter::stomp::Stomp {
        rpc_broker::adapter::stomp::Stomp::connect_with(&self.url, self.options.clone())
            .await
            .expect("connects to the STOMP server")
    }
}

impl Harness for StompHarness {
    fn connect(&self) -> BoxFuture<'_, Arc<dyn Transport>> {
        Box::pin(async move {
            let transport: Arc<dyn Transport> = Arc::new(self.stomp().await);
            match &self.tidy {
                Some((_, named)) => Arc::new(tidy::Recording::new(transport, Arc::clone(named))),
                None => transport,
            }
        })
    }
}

impl Drop for StompHarness {
    fn drop(&mut self) {
        if let Some((amqp_url, named)) = &self.tidy {
            named.delete_from(amqp_url);
        }
    }
}

/// ZeroMQ nodes on loopback, brokerless: every connection is a node of its own with a ROUTER and a PUB socket on
/// free ports, and the nodes of one harness form a mesh (each new node is added as a peer of every node, itself
/// included), as a deployment would list its workers' endpoints. A new node's `connect` returns once every
/// node has its READY and its subscriptions are synced with it. The harness keeps its nodes until it is dropped.
#[derive(Debug, Default)]
pub struct ZmqHarness {
    nodes: tokio::sync::Mutex<Vec<rpc_broker::adapter::zmq::Zmq>>,
}

impl ZmqHarness {
    /// A harness with no node yet.
    pub fn new() -> ZmqHarness {
        ZmqHarness::default()
    }

    /// A new node of the mesh, typed.
    pub async fn node(&self) -> rpc_broker::adapter::zmq::Zmq {
        use rpc_broker::adapter::zmq::{Zmq, ZmqOptions};
        let mut nodes = self.nodes.lock().await;
        let node = Zmq::start(ZmqOptions::new().bind("tcp://127.0.0.1:0")).await.expect("a ZeroMQ node binds");
        let endpoint = node.endpoint().expect("bound").to_owned();
        let mut joins = Vec::new();
        for peer in nodes.iter().chain(std::iter::once(&node)) {
            joins.push((peer.clone(), endpoint.clone()));
            if peer.endpoint() != Some(endpoint.as_str()) {
                joins.push((node.clone(), peer.endpoint().expect("bound").to_owned()));
            }
        }
        let joined = futures::future::join_all(joins.iter().map(|(from, to)| from.add_peer(to))).await;
        for result in joined {
            result.expect("a ZeroMQ node answers its peers");
        }
        nodes.push(node.clone());
        node
    }
}

impl Available for ZmqHarness {
    type Harness = ZmqHarness;

    fn available(self) -> ZmqHarness {
        log_from_env();
        self
    }
}

impl Harness for ZmqHarness {
    fn connect(&self) -> BoxFuture<'_, Arc<dyn Transport>> {
        Box::pin(async move {
            let transport: Arc<dyn Transport> = Arc::new(self.node().await);
            transport
        })
    }
}

/// The STOMP transport's options in the tests: queues declared on RabbitMQ expire a minute after their last use.
fn stomp_options() -> rpc_broker::adapter::stomp::StompOptions {
    rpc_broker::adapter::stomp::StompOptions::new().queue_expires(Duration::from_secs(60))
}

/// Kafka at `MQRPC_KAFKA_URL` (tansu in CI), through [`rpc_broker::adapter::kafka::Kafka`], with a 2 s group
/// session: tansu holds a group's first join for about half of it.
#[derive(Debug)]
pub struct KafkaHarness {
    url: String,
    options: rpc_broker::adapter::kafka::KafkaOptions,
}

impl KafkaHarness {
    /// The broker at `MQRPC_KAFKA_URL`.
    pub fn from_env() -> Result<KafkaHarness, Skip> {
        Ok(KafkaHarness::at(&broker_url("MQRPC_KAFKA_URL")?))
    }

    /// The broker at `url`.
    pub fn at(url: &str) -> KafkaHarness {
        let options = rpc_broker::adapter::kafka::KafkaOptions::new().session_timeout(Duration::from_secs(2));
        KafkaHarness { url: url.to_owned(), options }
    }

    /// The broker's address.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A transport of this harness, typed.
    pub async fn kafka(&self) -> rpc_broker::adapter::kafka::Kafka {
        rpc_broker::adapter::kafka::Kafka::connect_with(&self.url, self.options.clone())
            .await
            .expect("connects to Kafka at MQRPC_KAFKA_URL")
    }
}

impl Harness for KafkaHarness {
    fn connect(&self) -> BoxFuture<'_, Arc<dyn Transport>> {
        Box::pin(async move {
            let transport: Arc<dyn Transport> = Arc::new(self.kafka().await);
            transport
        })
    }
}

/// Redis at `MQRPC_REDIS_URL`, through [`rpc_broker::adapter::redis_streams::RedisStreams`], with a key prefix
/// of the harness's own (its keys are deleted when it is dropped) and a 2 s visibility timeout, so that a
/// worker that went away has its calls claimed by another quickly.
#[derive(Debug)]
pub struct RedisStreamsHarness {
    url: String,
    options: rpc_broker::adapter::redis_streams::RedisStreamsOptions,
}

impl RedisStreamsHarness {
    /// The Redis at `MQRPC_REDIS_URL`.
    pub fn from_env() -> Result<RedisStreamsHarness, Skip> {
        Ok(RedisStreamsHarness::at(&broker_url("MQRPC_REDIS_URL")?))
    }

    /// The Redis at `url`.
    pub fn at(url: &str) -> RedisStreamsHarness {
        let options = redis_streams_options().prefix(format!("mqrpc-test:{}:", uuid::Uuid::new_v4().simple()));
        RedisStreamsHarness { url: url.to_owned(), options }
    }

    /// The prefix of the harness's keys, for worker processes to use the same.
    pub fn prefix(&self) -> &str {
        &self.options.prefix
    }

    /// Redis's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A transport of this harness, typed.
    pub async fn redis(&self) -> rpc_broker::adapter::redis_streams::RedisStreams {
        rpc_broker::adapter::redis_streams::RedisStreams::connect_with(&self.url, self.options.clone())
            .await
            .expect("connects to Redis at MQRPC_REDIS_URL")
    }
}

impl Harness for RedisStreamsHarness {
    fn connect(&self) -> BoxFuture<'_, Arc<dyn Transport>> {
        Box::pin(async move {
            let transport: Arc<dyn Transport> = Arc::new(self.redis().await);
            transport
        })
    }
}

impl Drop for RedisStreamsHarness {
    fn drop(&mut self) {
        let (url, pattern) = (self.url.clone(), format!("{}*", self.options.prefix));
        // The test's runtime may be shutting down: the keys are deleted on a thread of their own.
        let cleanup = std::thread::spawn(move || {
            let Ok(client) = redis::Client::open(url) else { return };
            let Ok(mut connection) = client.get_connection() else { return };
            let keys: Vec<String> = redis::cmd("KEYS").arg(&pattern).query(&mut connection).unwrap_or_default();
            if !keys.is_empty() {
                let _: Result<i64, _> = redis::cmd("DEL").arg(&keys).query(&mut connection);
            }
        });
        let _ = cleanup.join();
    }
}

/// NATS at `MQRPC_NATS_URL`, through [`rpc_broker::adapter::nats::Nats`], in core or JetStream mode. In
/// JetStream mode the streams of one harness share a prefix of their own and are deleted when it is dropped.
#[derive(Debug)]
pub struct NatsHarness {
    url: String,
    options: rpc_broker::adapter::nats::NatsOptions,
}

impl NatsHarness {
    /// Core NATS.
    pub fn core() -> Result<NatsHarness, Skip> {
        NatsHarness::with(rpc_broker::adapter::nats::NatsOptions::new())
    }

    /// JetStream work-queue streams.
    pub fn jetstream() -> Result<NatsHarness, Skip> {
        NatsHarness::with(rpc_broker::adapter::nats::NatsOptions::jetstream())
    }

    /// With `options` (a stream prefix of the harness's own).
    pub fn with(options: rpc_broker::adapter::nats::NatsOptions) -> Result<NatsHarness, Skip> {
        Ok(NatsHarness::at(&broker_url("MQRPC_NATS_URL")?, options))
    }

    /// The server at `url`, with `options` (a stream prefix of the harness's own).
    pub fn at(url: &str, options: rpc_broker::adapter::nats::NatsOptions) -> NatsHarness {
        let prefix = format!("MQRPCT{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        NatsHarness { url: url.to_owned(), options: options.stream_prefix(prefix) }
    }

    /// The server's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The prefix of this harness's streams, for worker processes that must use the same.
    pub fn stream_prefix(&self) -> &str {
        &self.options.stream_prefix
    }

    /// A transport of this harness, typed.
    pub async fn nats(&self) -> rpc_broker::adapter::nats::Nats {
        rpc_broker::adapter::nats::Nats::connect_with(&self.url, self.options.clone())
            .await
            .expect("connects to NATS at MQRPC_NATS_URL")
    }
}

impl Harness for NatsHarness {
    fn connect(&self) -> BoxFuture<'_, Arc<dyn Transport>> {
        Box::pin(async move {
            let transport: Arc<dyn Transport> = Arc::new(self.nats().await);
            transport
        })
    }
}

impl Drop for NatsHarness {
    fn drop(&mut self) {
        if !self.options.jetstream {
            return;
        }
        let (url, prefix) = (self.url.clone(), format!("{}_", self.options.stream_prefix));
        // The test's runtime may be shutting down: the streams are deleted on a runtime of their own.
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            runtime.block_on(async move {
                use futures::StreamExt;
                let Ok(client) = async_nats::connect(url).await else { return };
                let jetstream = async_nats::jetstream::new(client);
                let names: Vec<String> =
                    jetstream.stream_names().filter_map(|name| async { name.ok() }).collect().await;
                for name in names.into_iter().filter(|name| name.starts_with(&prefix)) {
                    let _ = jetstream.delete_stream(&name).await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// Waits until `condition` holds, checking every few milliseconds, and panics naming `what` after `limit`.
pub async fn eventually(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until the asynchronous `condition` holds, checking every few milliseconds, and panics naming `what`
/// after `limit`.
pub async fn eventually_async<F, Fut>(what: &str, limit: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !condition().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// How long one scenario may run before [`Watchdog`] ends the test process.
pub const SCENARIO_LIMIT: Duration = Duration::from_secs(300);

/// Ends the test process, naming the test, if it is still running after a limit: a test that hangs fails the run
/// in minutes instead of holding CI until its own timeout. It watches from an OS thread of its own, so it fires
/// even when every thread of the test's runtime is blocked (a deadlock), where a timer of that runtime would not.
#[derive(Debug)]
pub struct Watchdog {
    /// Dropped with the watchdog (the test ended, passed or panicked), which ends the watching thread's wait.
    _done: std::sync::mpsc::Sender<()>,
}

impl Watchdog {
    /// Starts watching test `name` until the watchdog is dropped.
    pub fn start(name: &'static str, limit: Duration) -> Watchdog {
        let (done, finished) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            use std::io::Write;
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = finished.recv_timeout(limit) {
                // Written to stderr itself: the test harness captures what `eprintln!` prints, and would lose it.
                let _ = writeln!(std::io::stderr(), "{name} ran past {limit:?}: a hang; ending the test process");
                std::process::exit(124);
            }
        });
        Watchdog { _done: done }
    }
}

/// One `#[tokio::test]` per scenario of [`suite`] for the transport that `$harness` connects to.
///
/// A broker that cannot express some scenarios names the ones it runs and the ones it cannot, with the reason;
/// those are generated as ignored tests, so that `cargo test` lists them, and a generated test checks that the
/// two lists together are the whole suite:
///
/// ```text
/// mqrpc_tests::scenario_suite!(nats_core, harness(),
///     run: [typed_results_and_typed_errors, ...],
///     ignore "core NATS holds no messages": [graceful_shutdown_loses_nothing, ...]);
/// ```
/// Every scenario of the suite ([`suite`]), listed once: `scenarios!(names)` is their names, and
/// `scenarios!(each m)` calls macro `m!` with each. [`scenario_suite!`] makes each transport's tests of it.
#[macro_export]
macro_rules! scenarios {
    ($($mode:tt)*) => {
        $crate::__scenario_list! { [$($mode)*]
            typed_results_and_typed_errors,
            unknown_method,
            timeout_leaves_no_pending_call,
            late_reply_is_dropped_and_counted,
            ten_thousand_concurrent_calls,
            panicking_handler_becomes_an_error_reply,
            redelivery_when_a_worker_disappears,
            queue_full_from_a_bounded_queue,
            dead_letter_after_max_deliveries,
            broadcast_reaches_each_group_once,
            competing_workers_share_the_load,
            durable_callback_after_the_caller_restarted,
            graceful_shutdown_loses_nothing,
            forced_shutdown_requeues_running_calls,
            expired_request_is_not_executed,
            expired_request_does_not_answer_for_its_key,
            oneway_call_runs,
            deleted_queue_is_gone_with_its_messages,
            in_process_callback_receives_the_result,
            nested_call_inherits_the_deadline,
            priority_orders_calls_or_is_refused,
            durable_callback_panic_is_dead_lettered,
            closing_the_client_fails_waiting_calls,
            call_to_a_missing_service_fails_at_once,
            retries_until_the_handler_succeeds,
            poison_request_is_dead_lettered_after_its_attempts,
            retries_stop_before_the_deadline,
            same_idempotency_key_executes_once,
            handler_past_its_deadline_runs_once_per_key,
            in_flight_limit_holds_a_burst_in_the_caller,
            rate_limit_spaces_a_burst_in_the_caller,
            cancelled_call_leaves_the_queue_and_stops_its_handler,
            handler_reads_the_callers_identity,
            dead_letters_are_listed_and_replayed_with_their_key,
            delayed_call_waits_its_delay_or_is_refused,
            retry_backoff_is_held_by_the_broker,
            trace_context_goes_on_with_nested_calls,
            ping_finds_every_live_worker,
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __scenario_list {
    ([names] $($scenario:ident),* $(,)?) => { &[$(stringify!($scenario)),*] };
    ([each $m:ident] $($scenario:ident),* $(,)?) => { $( $m!($scenario); )* };
}

/// The scenario suite over one transport: a module `$name` with a test per scenario, run against the harness
/// `$harness`.
///
/// - `needs CFG = "reason"`: the tests are ignored with that reason unless `CFG` is on (`build.rs` turns on
///   one per broker variable that is set, so that a missing broker is a visible skip, not a pass).
/// - `ignore "reason": [scenario, ...]`: the scenarios this transport cannot run, ignored with the reason;
///   every other scenario runs.
#[macro_export]
macro_rules! scenario_suite {
    (
        $name:ident, $harness:expr
        $(, needs $cfg:ident = $needs:literal)?
        $(, ignore $reason:literal: [$($ignored:ident),* $(,)?])?
        $(,)?
    ) => {
        $crate::__scenario_suite! { ($) $name, ($harness), [$($cfg = $needs)?], [$($reason: $($ignored),*)?] }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __scenario_suite {
    (($d:tt) $name:ident, ($harness:expr), [$($cfg:ident = $needs:literal)?], [$($reason:literal: $($ignored:ident),*)?]) => {
        mod $name {
            macro_rules! scenario_test {
                $($(
                    ($ignored) => {
                        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                        #[ignore = $reason]
                        async fn $ignored() {
                            let _watchdog = $crate::Watchdog::start(concat!(module_path!(), "::", stringify!($ignored)), $crate::SCENARIO_LIMIT);
                            $crate::suite::$ignored(&$crate::Available::available($harness)).await;
                        }
                    };
                )*)?
                ($d scenario:ident) => {
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    $(#[cfg_attr(not($cfg), ignore = $needs)])?
                    async fn $d scenario() {
                        let _watchdog = $crate::Watchdog::start(concat!(module_path!(), "::", stringify!($d scenario)), $crate::SCENARIO_LIMIT);
                        $crate::suite::$d scenario(&$crate::Available::available($harness)).await;
                    }
                };
            }

            $crate::scenarios!(each scenario_test);

            #[test]
            fn the_scenarios_it_cannot_run_are_scenarios() {
                let ignored: &[&str] = &[$($(stringify!($ignored)),*)?];
                for name in ignored {
                    assert!($crate::suite::SCENARIOS.contains(name), "`{name}` is not a scenario");
                }
            }
        }
    };
}

/// The transport a test process (`probe-worker`, `probe-client`) connects with, picked by `url`: `amqp://`
/// RabbitMQ (queues expire after a minute unused), `nats://` NATS (JetStream when `MQRPC_PROBE_STREAM_PREFIX`
/// names the harness's stream prefix, with a 2 s ack wait), `kafka://HOST:PORT` Kafka (a 2 s group session),
/// `stomp://` a STOMP server (ActiveMQ, RabbitMQ's plugin), `redis://` Redis Streams (keys prefixed with
/// `MQRPC_PROBE_STREAM_PREFIX` when it is set, a 2 s visibility timeout), `zmq-worker://HOST:PORT` a ZeroMQ node bound there,
/// `zmq://HOST:PORT,HOST:PORT` a ZeroMQ node calling those workers (both with [`zmq_test_options`]), else our
/// broker.
///
/// # Errors
/// The transport's connection errors.
pub async fn process_transport(url: &str) -> Result<Arc<dyn Transport>, rpc_core::Error> {
    if url.starts_with("amqp") {
        let options = rpc_broker::adapter::amqp::AmqpOptions::new().queue_expires(Duration::from_secs(60));
        Ok(Arc::new(rpc_broker::adapter::amqp::Amqp::connect_with(url, options).await?))
    } else if url.starts_with("nats") {
        let options = match std::env::var("MQRPC_PROBE_STREAM_PREFIX") {
            Ok(prefix) => rpc_broker::adapter::nats::NatsOptions::jetstream()
                .stream_prefix(prefix)
                .ack_wait(Duration::from_secs(2)),
            Err(_) => rpc_broker::adapter::nats::NatsOptions::new(),
        };
        Ok(Arc::new(rpc_broker::adapter::nats::Nats::connect_with(url, options).await?))
    } else if url.starts_with("stomp://") {
        Ok(Arc::new(rpc_broker::adapter::stomp::Stomp::connect_with(url, stomp_options()).await?))
    } else if url.starts_with("redis://") {
        let mut options = redis_streams_options();
        if let Ok(prefix) = std::env::var("MQRPC_PROBE_STREAM_PREFIX") {
            options = options.prefix(prefix);
        }
        Ok(Arc::new(rpc_broker::adapter::redis_streams::RedisStreams::connect_with(url, options).await?))
    } else if let Some(endpoint) = url.strip_prefix("zmq-worker://") {
        let options = zmq_test_options().bind(format!("tcp://{endpoint}"));
        Ok(Arc::new(rpc_broker::adapter::zmq::Zmq::start(options).await?))
    } else if let Some(endpoints) = url.strip_prefix("zmq://") {
        let peers = endpoints.split(',').map(|endpoint| format!("tcp://{endpoint}"));
        Ok(Arc::new(rpc_broker::adapter::zmq::Zmq::start(zmq_test_options().peers(peers)).await?))
    } else if let Some(brokers) = url.strip_prefix("kafka://") {
        let options = rpc_broker::adapter::kafka::KafkaOptions::new().session_timeout(Duration::from_secs(2));
        Ok(Arc::new(rpc_broker::adapter::kafka::Kafka::connect_with(brokers, options).await?))
    } else {
        Ok(Arc::new(rpc_broker::Remote::connect(url).await?))
    }
}

/// Redis Streams in the tests: a visibility timeout of 2 s, so that a dead worker's calls are claimed by
/// another quickly.
pub fn redis_streams_options() -> rpc_broker::adapter::redis_streams::RedisStreamsOptions {
    rpc_broker::adapter::redis_streams::RedisStreamsOptions::new().visibility(Duration::from_secs(2))
}

/// ZeroMQ nodes in the fault and interop tests: heartbeats every 100 ms (a worker is dead after 300 ms of
/// silence) and reconnects at most 200 ms apart, so that a killed worker's calls move on quickly.
pub fn zmq_test_options() -> rpc_broker::adapter::zmq::ZmqOptions {
    rpc_broker::adapter::zmq::ZmqOptions::new()
        .heartbeat(Duration::from_millis(100), 3)
        .reconnect_max(Duration::from_millis(200))
}

/// A worker process of the fault tests (the `probe-worker` binary), killed with SIGKILL when dropped.
#[derive(Debug)]
pub struct WorkerProcess {
    child: std::process::Child,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl WorkerProcess {
    /// Runs `command` (a `probe-worker` invocation; integration tests find the binary with
    /// `env!("CARGO_BIN_EXE_probe-worker")`) and waits until it prints `ready`.
    pub fn spawn(mut command: std::process::Command) -> WorkerProcess {
        use std::io::BufRead;
        let mut child = command.stdout(std::process::Stdio::piped()).spawn().expect("the worker process starts");
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("reads the worker's first line");
        assert_eq!(line.trim(), "ready", "the worker did not start");
        WorkerProcess { child, stdout }
    }

    /// The next line the process prints, without its line break.
    pub fn line(&mut self) -> String {
        use std::io::BufRead;
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("reads the process's output");
        line.trim_end().to_owned()
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (a name `kill` knows: `STOP`, `CONT`, `TERM`) to the process.
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("runs kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Stops the process where it is (SIGSTOP): it neither runs nor answers heartbeats until resumed. Returns once
    /// every thread of it is stopped: `kill` returns when the signal is queued, and a thread running on another
    /// core at that moment goes on for a little while, long enough to answer a request sent right after.
    pub fn pause(&self) {
        self.signal("STOP");
        let tasks = format!("/proc/{}/task", self.child.id());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !every_thread_stopped(&tasks) {
            assert!(std::time::Instant::now() < deadline, "process {} did not stop within 5 s", self.child.id());
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Resumes a paused process (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    /// Asks the process to stop (SIGTERM), waits for it to exit, and returns the counters of its `stopped`
    /// line (the worker's graceful shutdown report and its server's counters).
    pub fn terminate(mut self) -> std::collections::HashMap<String, u64> {
        use std::io::BufRead;
        self.signal("TERM");
        let mut counters = std::collections::HashMap::new();
        let mut line = String::new();
        while self.stdout.read_line(&mut line).expect("reads the worker's output") > 0 {
            if let Some(pairs) = line.trim().strip_prefix("stopped ") {
                for pair in pairs.split(' ') {
                    let (name, value) = pair.split_once('=').expect("name=value");
                    counters.insert(name.to_owned(), value.parse().expect("a count"));
                }
            }
            line.clear();
        }
        let status = self.child.wait().expect("waits for the worker");
        assert!(status.success(), "the worker failed to stop: {status}");
        assert!(!counters.is_empty(), "the worker stopped without its report");
        counters
    }

    /// Asks the process to stop (SIGTERM) and waits until it exits; panics if it fails.
    pub fn stop(mut self) {
        self.signal("TERM");
        let status = self.child.wait().expect("waits for the process");
        assert!(status.success(), "the process failed to stop: {status}");
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether every thread under `tasks` (a process's `/proc/<pid>/task`) is stopped by a signal (state `T`).
fn every_thread_stopped(tasks: &str) -> bool {
    let Ok(entries) = std::fs::read_dir(tasks) else { return false };
    entries.flatten().all(|task| {
        // `<tid> (<name>) <state> ...`: the name may hold spaces and parentheses, the state follows the last `)`.
        std::fs::read_to_string(task.path().join("stat"))
            .ok()
            .and_then(|stat| stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('T')))
            .unwrap_or(false)
    })
}
