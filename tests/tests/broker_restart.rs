//! The broker restarts during a run of calls: every call made meanwhile resolves by its deadline (a reply or a
//! typed error), and calls succeed again after the restart.
//!
//! RabbitMQ is the machine's shared broker, stopped with `rabbitmqctl stop_app`: only the tests of this binary
//! restart it (cargo runs test binaries one at a time), one at a time ([`RABBITMQ`]), and only where
//! `MQRPC_AMQP_CTL` names the control command (`.ci/run` sets it), never against a broker it was not given. NATS runs as a private server on a
//! port of its own (`MQRPC_NATS_SERVER` names the binary), killed and started again. Kafka (a private tansu,
//! `MQRPC_TANSU`) goes down behind a relay that drops its connections, as tansu's memory storage cannot survive a
//! restart (see [`kafka_restart_during_calls`]). Our own broker runs in the test, dropped and bound
//! again on the same address. ActiveMQ runs as a private broker on a port and data directory of its own
//! (`MQRPC_ACTIVEMQ`), killed with SIGKILL and started again on its journal. Redis runs as a private
//! `redis-server` (`MQRPC_REDIS_SERVER`) with its append-only file, killed with SIGKILL and started again on it.

use std::future::IntoFuture;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqrpc_tests::activemq::PrivateActiveMq;
use mqrpc_tests::kafka::PrivateTansu;
use mqrpc_tests::on_a_free_port;
use mqrpc_tests::service::{Events, ProbeClient, ProbeServer, Worker};
use mqrpc_tests::{AmqpHarness, Available, Harness, KafkaHarness, NatsHarness, RedisStreamsHarness, StompHarness};
use rpc_core::{Client, Error, Server, ServerHandle, Transport};
use tokio::sync::watch;
use uuid::Uuid;

/// Held by each test that restarts RabbitMQ, for all of its run: the tests of a binary run at once.
static RABBITMQ: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Each call's budget; a call must resolve by it plus this slack.
const BUDGET: Duration = Duration::from_secs(1);
const SLACK: Duration = Duration::from_millis(500);

async fn worker(transport: Arc<dyn Transport>, namespace: &str) -> ServerHandle {
    let worker = Worker { name: "w".into(), events: Arc::new(Events::default()), client: None };
    Server::new(transport).namespace(namespace).serve(ProbeServer::new(worker)).await.expect("the worker starts")
}

/// What the calls made while the broker restarted came to.
#[derive(Debug, Default)]
struct Tally {
    ok: usize,
    failed: Vec<String>,
    slowest: Duration,
}

/// Calls `add` one after another until `stop` turns true, each with [`BUDGET`], and tallies the outcomes.
async fn call_until(client: Client, mut stop: watch::Receiver<bool>) -> Tally {
    let probe = ProbeClient::new(&client);
    let mut tally = Tally::default();
    let mut n = 0i64;
    while !*stop.borrow() {
        n += 1;
        let started = Instant::now();
        let result = probe.add(n, 1).timeout(BUDGET).await;
        let took = started.elapsed();
        tally.slowest = tally.slowest.max(took);
        assert!(took <= BUDGET + SLACK, "a call took {took:?}, past its deadline: {result:?}");
        match result {
            Ok(sum) => {
                assert_eq!(sum, n + 1);
                tally.ok += 1;
            }
            Err(
                error @ (Error::Timeout(_)
                | Error::Disconnected
                | Error::ReplyLost
                | Error::NoRoute(_)
                | Error::NoResponders(_)),
            ) => {
                tally.failed.push(error.to_string());
                // Failing fast must not spin: pace the retries.
                let _ = tokio::time::timeout(Duration::from_millis(20), stop.changed()).await;
            }
            Err(other) => panic!("an untyped failure during the restart: {other:?}"),
        }
    }
    tally
}

/// Runs calls through `restart`, then checks they failed meanwhile with typed errors and work again.
async fn calls_survive(harness: &dyn Harness, restart: impl std::future::Future<Output = ()>) {
    let namespace = format!("r{}", Uuid::new_v4().simple());
    let _worker = worker(harness.connect().await, &namespace).await;
    let client = Client::builder(harness.connect().await).namespace(&namespace).connect().await.expect("client");
    let probe = ProbeClient::new(&client);
    assert_eq!(probe.add(1, 1).await.expect("works before"), 2);
    let (stop, stopped) = watch::channel(false);
    let calls = tokio::spawn(call_until(client.clone(), stopped));
    restart.await;
    // Calls come back once the transports have reconnected.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut in_a_row = 0;
    while in_a_row < 20 {
        assert!(Instant::now() < deadline, "calls did not come back within 60 s of the restart");
        match probe.add(2, 2).timeout(BUDGET).await {
            Ok(4) => in_a_row += 1,
            _ => {
                in_a_row = 0;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    stop.send_replace(true);
    let tally = calls.await.expect("joins");
    eprintln!(
        "during the restart: {} answered, {} failed typed, slowest {:?}",
        tally.ok,
        tally.failed.len(),
        tally.slowest
    );
    assert!(!tally.failed.is_empty(), "no call failed: the broker did not really go away");
    assert_eq!(client.stats().pending, 0);
}

fn ctl(command: &str, argument: &str) {
    let status = Command::new(command).arg(argument).stdout(Stdio::null()).status().expect("runs the control command");
    assert!(status.success(), "`{command} {argument}` failed");
}

/// Confirmed calls (persistent requests), then calls published without confirms (transient requests), each
/// through a restart of RabbitMQ; one after the other, as both restart the same broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(mqrpc_amqp, mqrpc_amqp_ctl)),
    ignore = "needs CI's own RabbitMQ to restart: MQRPC_AMQP_URL and MQRPC_AMQP_CTL (bash .ci/brokers)"
)]
async fn rabbitmq_restart_during_calls() {
    let _only = RABBITMQ.lock().await;
    let command = mqrpc_tests::required_url("MQRPC_AMQP_CTL");
    let persistent = AmqpHarness::from_env().available();
    let transient = AmqpHarness::transient().available();
    for harness in [persistent, transient] {
        let command = command.clone();
        calls_survive(&harness, async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let stop = command.clone();
            tokio::task::spawn_blocking(move || ctl(&stop, "stop_app")).await.expect("stops");
            tokio::time::sleep(Duration::from_secs(1)).await;
            tokio::task::spawn_blocking(move || ctl(&command, "start_app")).await.expect("starts");
        })
        .await;
    }
}

/// A nats-server of the test's own, on a free port, with JetStream storage in a directory of its own.
struct PrivateNats {
    binary: String,
    /// The server's name, unique to this test: a handshake with another server on the port is not taken for ours.
    name: String,
    port: u16,
    store: std::path::PathBuf,
    child: Option<Child>,
}

impl PrivateNats {
    fn start(binary: &str) -> PrivateNats {
        on_a_free_port("nats-server", |port| {
            let id = Uuid::new_v4().simple();
            let store = std::env::temp_dir().join(format!("mqrpc-nats-{id}"));
            let name = format!("mqrpc-test-{id}");
            let mut server = PrivateNats { binary: binary.to_owned(), name, port, store, child: None };
            server.spawn().map(|()| server)
        })
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server and waits until it answers as itself.
    fn spawn(&mut self) -> std::io::Result<()> {
        let child = Command::new(&self.binary)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-n", &self.name, "-js", "-sd"])
            .arg(&self.store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let child = self.child.insert(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait()? {
                return Err(std::io::Error::other(format!("nats-server exited: {status}")));
            }
            match handshake(self.port, &self.name) {
                Ok(()) => return Ok(()),
                Err(error) if Instant::now() >= deadline => {
                    return Err(std::io::Error::other(format!("nats-server did not answer: {error}")));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether the server named `name` speaks NATS on `port`: it sends its `INFO`, under that name, and answers a
/// `PING`. A listening socket alone is not enough: it may be another server's.
fn handshake(port: u16, name: &str) -> std::io::Result<()> {
    use std::io::{BufRead, BufReader, Write};

    let stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if !line.starts_with("INFO ") || !line.contains(&format!("\"server_name\":\"{name}\"")) {
        return Err(std::io::Error::other(format!("not this server's INFO: {line:?}")));
    }
    (&stream).write_all(b"CONNECT {\"verbose\":false}\r\nPING\r\n")?;
    line.clear();
    reader.read_line(&mut line)?;
    if line.trim_end() == "PONG" { Ok(()) } else { Err(std::io::Error::other(format!("no PONG: {line:?}"))) }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

/// ActiveMQ killed with SIGKILL and started again on its data directory, while calls run: the transports
/// reconnect (the main connection, each consumer's own, the inboxes opened again on the new main connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_activemq), ignore = "needs the activemq command: MQRPC_ACTIVEMQ (bash .ci/brokers)")]
async fn activemq_restart_during_calls() {
    let server = std::sync::Mutex::new(PrivateActiveMq::start());
    let harness = StompHarness::with(&server.lock().expect("not poisoned").url(), quick_reconnection());
    calls_survive(&harness, async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        restart_activemq(&server).await;
    })
    .await;
}

/// Requests waiting on ActiveMQ, persistent, survive its SIGKILL: its journal has each one whose receipt came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_activemq), ignore = "needs the activemq command: MQRPC_ACTIVEMQ (bash .ci/brokers)")]
async fn activemq_queued_requests_survive_a_restart() {
    let server = std::sync::Mutex::new(PrivateActiveMq::start());
    let harness = StompHarness::with(&server.lock().expect("not poisoned").url(), quick_reconnection());
    queued_requests_survive_a_restart(&harness, restart_activemq(&server)).await;
}

/// ActiveMQ killed while two calls run: the caller's inbox (a temporary queue of its connection) goes with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_activemq), ignore = "needs the activemq command: MQRPC_ACTIVEMQ (bash .ci/brokers)")]
async fn activemq_restart_fails_waiting_calls_with_reply_lost() {
    mqrpc_tests::log_from_env();
    let server = std::sync::Mutex::new(PrivateActiveMq::start());
    let url = server.lock().expect("not poisoned").url();
    let connect = move || -> futures::future::BoxFuture<'static, Arc<dyn Transport>> {
        let url = url.clone();
        Box::pin(async move {
            let transport = rpc_broker::adapter::stomp::Stomp::connect_with(&url, quick_reconnection()).await;
            Arc::new(transport.expect("connects")) as Arc<dyn Transport>
        })
    };
    let stop = async {
        tokio::task::block_in_place(|| server.lock().expect("not poisoned").kill());
    };
    let start = async {
        tokio::task::block_in_place(|| server.lock().expect("not poisoned").spawn().expect("starts again"));
    };
    waiting_calls_fail_with_reply_lost(&connect, stop, start).await;
}

fn quick_reconnection() -> rpc_broker::adapter::stomp::StompOptions {
    rpc_broker::adapter::stomp::StompOptions::new().max_backoff(Duration::from_millis(500))
}

/// Kills the private ActiveMQ and starts it again on the same port and directory.
async fn restart_activemq(server: &std::sync::Mutex<PrivateActiveMq>) {
    tokio::task::block_in_place(|| {
        let mut server = server.lock().expect("not poisoned");
        server.kill();
        std::thread::sleep(Duration::from_secs(1));
        server.spawn().expect("ActiveMQ starts again on its port");
    });
}

/// A TCP relay in front of a broker on loopback. [`Relay::cut`] drops every connection through it and refuses new
/// ones, as a broker that went down does; [`Relay::restore`] accepts again, as the broker back with its log.
struct Relay {
    port: u16,
    target: u16,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Relay {
    /// The relay's listening socket, bound before the broker starts so that the broker can advertise its port.
    async fn listen() -> tokio::net::TcpListener {
        tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binds the relay")
    }

    fn start(listener: tokio::net::TcpListener, target: u16) -> Relay {
        let port = listener.local_addr().expect("the relay's address").port();
        Relay { port, target, task: Some(tokio::spawn(relay(listener, target))) }
    }

    async fn cut(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    async fn restore(&mut self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await.expect("binds the relay again");
        self.task = Some(tokio::spawn(relay(listener, self.target)));
    }
}

/// Accepts on `listener` and copies each connection to and from `target`; the connections end with the task.
async fn relay(listener: tokio::net::TcpListener, target: u16) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((mut inbound, _)) = accepted else { continue };
                connections.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Kafka goes down during calls and comes back with its log: every call resolves by its deadline, answered or
/// with a typed error, and the same worker and client serve calls again after.
///
/// tansu keeps its log in memory only, so a killed tansu comes back empty: that is a new cluster, not a restart,
/// and a consumer that fetches a partition of a topic the broker no longer knows crashes librdkafka 2.12 (tansu
/// answers with a zero topic id and a `CurrentLeader` tag; `rd_kafka_metadata_update_op` then looks the topic up
/// by a NULL name). A restart of a broker that keeps its log is, to its clients, every connection dropped and
/// refused for a while: the test makes exactly that with a [`Relay`] in front of tansu, which advertises the
/// relay's port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_tansu), ignore = "needs a tansu binary: MQRPC_TANSU (bash .ci/brokers)")]
async fn kafka_restart_during_calls() {
    mqrpc_tests::log_from_env();
    let binary = mqrpc_tests::required_url("MQRPC_TANSU");
    let listener = Relay::listen().await;
    let advertised = listener.local_addr().expect("the relay's address").port();
    let server = PrivateTansu::start(&binary, advertised);
    let mut relay = Relay::start(listener, server.port);
    let harness = KafkaHarness::at(&format!("127.0.0.1:{advertised}"));
    calls_survive(&harness, async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        relay.cut().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        relay.restore().await;
    })
    .await;
}

async fn nats_restart(jetstream: bool) {
    let binary = mqrpc_tests::required_url("MQRPC_NATS_SERVER");
    let mut server = PrivateNats::start(&binary);
    let options = if jetstream {
        rpc_broker::adapter::nats::NatsOptions::jetstream()
    } else {
        rpc_broker::adapter::nats::NatsOptions::new()
    };
    let harness = NatsHarness::at(&server.url(), options.max_backoff(Duration::from_millis(500)));
    let restart = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.kill();
        tokio::time::sleep(Duration::from_secs(1)).await;
        server.spawn().expect("nats-server starts again on its port");
    };
    calls_survive(&harness, restart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_nats_server), ignore = "needs a nats-server binary: MQRPC_NATS_SERVER (bash .ci/brokers)")]
async fn nats_restart_during_calls() {
    nats_restart(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_nats_server), ignore = "needs a nats-server binary: MQRPC_NATS_SERVER (bash .ci/brokers)")]
async fn jetstream_restart_during_calls() {
    nats_restart(true).await;
}

/// A broker that goes away takes the callers' inboxes with it: a call waiting for its reply fails at once with
/// `ReplyLost`, not at its timeout. A client that resends lost calls gets its answer after the restart, from one
/// execution: the worker's dedup store answers the resent request (and, on a broker that keeps it, the request
/// redelivered after the restart) with the outcome of the first.
async fn waiting_calls_fail_with_reply_lost(
    connect: &(dyn Fn() -> futures::future::BoxFuture<'static, Arc<dyn Transport>> + Sync),
    stop: impl std::future::Future<Output = ()>,
    start: impl std::future::Future<Output = ()>,
) {
    let namespace = format!("r{}", Uuid::new_v4().simple());
    let events = Arc::new(Events::default());
    let worker = Worker { name: "w".into(), events: Arc::clone(&events), client: None };
    let _server =
        Server::new(connect().await).namespace(&namespace).serve(ProbeServer::new(worker)).await.expect("serves");
    let plain = Client::builder(connect().await).namespace(&namespace).connect().await.expect("client");
    let resending =
        Client::builder(connect().await).namespace(&namespace).resend_lost_calls(40).connect().await.expect("client");
    assert_eq!(ProbeClient::new(&plain).add(1, 1).await.expect("works before"), 2);

    let timeout = Duration::from_secs(30);
    let lost = tokio::spawn(ProbeClient::new(&plain).work(1_500).timeout(timeout).into_future());
    let key = Uuid::new_v4().simple().to_string();
    let resent = ProbeClient::new(&resending).work(1_501).idempotency_key(&key).timeout(timeout).into_future();
    let resent = tokio::spawn(resent);
    mqrpc_tests::eventually("both calls running", Duration::from_secs(10), || {
        events.started.load(std::sync::atomic::Ordering::SeqCst) == 2
    })
    .await;
    stop.await;
    let stopped = Instant::now();
    match lost.await.expect("joins") {
        Err(Error::ReplyLost) => {}
        other => panic!("expected ReplyLost, got {other:?}"),
    }
    let noticed = stopped.elapsed();
    assert!(noticed < timeout / 10, "ReplyLost came after {noticed:?}, as late as a timeout");
    start.await;
    let mut answer = resent.await.expect("joins");
    // Core NATS holds nothing: a resend that comes back before the worker has subscribed again finds no one, and
    // the caller tries again with the same key.
    while let Err(Error::NoResponders(_)) = answer {
        tokio::time::sleep(Duration::from_millis(50)).await;
        answer = ProbeClient::new(&resending).work(1_501).idempotency_key(&key).timeout(timeout).await;
    }
    assert_eq!(answer.expect("answered after the restart"), 1_501);
    assert_eq!(events.finished("work"), 2, "each call ran once: the resend was answered from the dedup store");
    assert_eq!((plain.stats().pending, resending.stats().pending), (0, 0));
    eprintln!("ReplyLost {noticed:?} after the broker went away");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_broker_restart_fails_waiting_calls_with_reply_lost() {
    use rpc_broker::server::{BrokerServer, ServerConfig};
    use rpc_broker::{Remote, RemoteOptions};

    let broker = BrokerServer::bind(([127, 0, 0, 1], 0).into(), ServerConfig::default()).await.expect("binds");
    let (address, url) = (broker.local_addr(), broker.url());
    let connect = move || -> futures::future::BoxFuture<'static, Arc<dyn Transport>> {
        let url = url.clone();
        Box::pin(async move {
            let options = RemoteOptions::new().max_backoff(Duration::from_millis(200));
            Arc::new(Remote::connect_with(&url, options).await.expect("connects")) as Arc<dyn Transport>
        })
    };
    let mut restarted = None;
    waiting_calls_fail_with_reply_lost(&connect, async { drop(broker) }, async {
        restarted = Some(BrokerServer::bind(address, ServerConfig::default()).await.expect("binds again"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(mqrpc_amqp, mqrpc_amqp_ctl)),
    ignore = "needs CI's own RabbitMQ to restart: MQRPC_AMQP_URL and MQRPC_AMQP_CTL (bash .ci/brokers)"
)]
async fn rabbitmq_restart_fails_waiting_calls_with_reply_lost() {
    let _only = RABBITMQ.lock().await;
    let command = mqrpc_tests::required_url("MQRPC_AMQP_CTL");
    let harness = Arc::new(AmqpHarness::from_env().available());
    let connect = move || -> futures::future::BoxFuture<'static, Arc<dyn Transport>> {
        let harness = Arc::clone(&harness);
        Box::pin(async move { harness.connect().await })
    };
    let (stop, start) = (command.clone(), command);
    waiting_calls_fail_with_reply_lost(
        &connect,
        async move { tokio::task::spawn_blocking(move || ctl(&stop, "stop_app")).await.expect("stops") },
        async move { tokio::task::spawn_blocking(move || ctl(&start, "start_app")).await.expect("starts") },
    )
    .await;
}

async fn nats_reply_lost(jetstream: bool) {
    let binary = mqrpc_tests::required_url("MQRPC_NATS_SERVER");
    let server = std::sync::Mutex::new(PrivateNats::start(&binary));
    let options = if jetstream {
        rpc_broker::adapter::nats::NatsOptions::jetstream()
    } else {
        rpc_broker::adapter::nats::NatsOptions::new()
    };
    let harness = Arc::new(NatsHarness::at(
        &server.lock().expect("not poisoned").url(),
        options.max_backoff(Duration::from_millis(200)),
    ));
    let connect = move || -> futures::future::BoxFuture<'static, Arc<dyn Transport>> {
        let harness = Arc::clone(&harness);
        Box::pin(async move { harness.connect().await })
    };
    waiting_calls_fail_with_reply_lost(&connect, async { server.lock().expect("not poisoned").kill() }, async {
        server.lock().expect("not poisoned").spawn().expect("nats-server starts again on its port");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_nats_server), ignore = "needs a nats-server binary: MQRPC_NATS_SERVER (bash .ci/brokers)")]
async fn nats_restart_fails_waiting_calls_with_reply_lost() {
    nats_reply_lost(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_nats_server), ignore = "needs a nats-server binary: MQRPC_NATS_SERVER (bash .ci/brokers)")]
async fn jetstream_restart_fails_waiting_calls_with_reply_lost() {
    nats_reply_lost(true).await;
}

/// Requests waiting in a durable queue, with no worker to take them, survive a restart of the broker: every
/// one of them is run once a worker starts after it.
async fn queued_requests_survive_a_restart(harness: &dyn Harness, restart: impl std::future::Future<Output = ()>) {
    const MESSAGES: i64 = 200;
    let namespace = format!("q{}", Uuid::new_v4().simple());
    // A worker declares the service's queue, then goes: the requests wait for the next one.
    worker(harness.connect().await, &namespace).await.shutdown(Duration::from_secs(5)).await;
    let client = Client::builder(harness.connect().await).namespace(&namespace).connect().await.expect("client");
    let probe = ProbeClient::new(&client);
    for n in 0..MESSAGES {
        probe.record(n).await.expect("the broker confirms the request");
    }
    restart.await;
    let events = Arc::new(Events::default());
    let worker = Worker { name: "after".into(), events: Arc::clone(&events), client: None };
    let _server = Server::new(harness.connect().await)
        .namespace(&namespace)
        .serve(ProbeServer::new(worker))
        .await
        .expect("a worker starts after the restart");
    mqrpc_tests::eventually("every queued request to run", Duration::from_secs(60), || {
        events.recorded().len() >= MESSAGES as usize
    })
    .await;
    let mut recorded = events.recorded();
    recorded.sort_unstable();
    assert_eq!(recorded, (0..MESSAGES).collect::<Vec<_>>(), "requests lost or run twice across the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(mqrpc_amqp, mqrpc_amqp_ctl)),
    ignore = "needs CI's own RabbitMQ to restart: MQRPC_AMQP_URL and MQRPC_AMQP_CTL (bash .ci/brokers)"
)]
async fn rabbitmq_queued_requests_survive_a_restart() {
    let _only = RABBITMQ.lock().await;
    let command = mqrpc_tests::required_url("MQRPC_AMQP_CTL");
    let harness = AmqpHarness::from_env().available();
    queued_requests_survive_a_restart(&harness, async move {
        let stop = command.clone();
        tokio::task::spawn_blocking(move || ctl(&stop, "stop_app")).await.expect("stops");
        tokio::task::spawn_blocking(move || ctl(&command, "start_app")).await.expect("starts");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_nats_server), ignore = "needs a nats-server binary: MQRPC_NATS_SERVER (bash .ci/brokers)")]
async fn jetstream_queued_requests_survive_a_restart() {
    let binary = mqrpc_tests::required_url("MQRPC_NATS_SERVER");
    let server = std::sync::Mutex::new(PrivateNats::start(&binary));
    let url = server.lock().expect("not poisoned").url();
    let options = rpc_broker::adapter::nats::NatsOptions::jetstream().max_backoff(Duration::from_millis(200));
    let harness = NatsHarness::at(&url, options);
    queued_requests_survive_a_restart(&harness, async {
        let mut server = server.lock().expect("not poisoned");
        server.kill();
        server.spawn().expect("nats-server starts again on its port");
    })
    .await;
}

/// A redis-server of the test's own, on a free port, with its append-only file (`appendfsync always`) in a
/// directory of its own when `persistent`: killed with SIGKILL and started again, it has every stream and group
/// back. Without it, it comes back empty.
struct PrivateRedis {
    binary: String,
    persistent: bool,
    port: u16,
    dir: std::path::PathBuf,
    child: Option<Child>,
}

impl PrivateRedis {
    fn start(binary: &str, persistent: bool) -> PrivateRedis {
        on_a_free_port("redis-server", |port| {
            let dir = std::env::temp_dir().join(format!("mqrpc-redis-{}", Uuid::new_v4().simple()));
            std::fs::create_dir_all(&dir)?;
            let mut server = PrivateRedis { binary: binary.to_owned(), persistent, port, dir, child: None };
            server.spawn().map(|()| server)
        })
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server and waits until it answers `PING` on its port.
    fn spawn(&mut self) -> std::io::Result<()> {
        let child = Command::new(&self.binary)
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string(), "--save", ""])
            .args(["--appendonly", if self.persistent { "yes" } else { "no" }, "--appendfsync", "always", "--dir"])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let child = self.child.insert(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait()? {
                return Err(std::io::Error::other(format!("redis-server exited: {status}")));
            }
            match redis_ping(self.port) {
                Ok(()) => return Ok(()),
                Err(error) if Instant::now() >= deadline => {
                    return Err(std::io::Error::other(format!("redis-server did not answer: {error}")));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether a Redis answers `PING` on `port`.
fn redis_ping(port: u16) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(b"PING\r\n")?;
    let mut answer = [0u8; 7];
    stream.read_exact(&mut answer)?;
    if &answer == b"+PONG\r\n" { Ok(()) } else { Err(std::io::Error::other("not a PONG")) }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Redis killed with SIGKILL and started again on its append-only file while calls run: the transports'
/// connections come back, the queue, its group and the caller's inbox with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_redis_server), ignore = "needs a redis-server binary: MQRPC_REDIS_SERVER (bash .ci/brokers)")]
async fn redis_streams_restart_during_calls() {
    redis_restart(true).await;
}

/// The same with a Redis that keeps nothing: it comes back empty, and the worker declares its queue again and
/// the client makes its inbox again, so calls are answered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_redis_server), ignore = "needs a redis-server binary: MQRPC_REDIS_SERVER (bash .ci/brokers)")]
async fn redis_streams_restart_without_persistence_during_calls() {
    redis_restart(false).await;
}

async fn redis_restart(persistent: bool) {
    let binary = mqrpc_tests::required_url("MQRPC_REDIS_SERVER");
    let mut server = PrivateRedis::start(&binary, persistent);
    let harness = RedisStreamsHarness::at(&server.url());
    let restart = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.kill();
        tokio::time::sleep(Duration::from_secs(1)).await;
        server.spawn().expect("redis-server starts again on its port");
    };
    calls_survive(&harness, restart).await;
}
