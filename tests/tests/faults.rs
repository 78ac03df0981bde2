//! Faults that really happen to worker processes while calls run, on our broker, RabbitMQ, NATS JetStream, Kafka,
//! ActiveMQ, Redis Streams and ZeroMQ:
//! SIGKILL again and again, SIGTERM under load, and SIGSTOP past the heartbeats that hold a worker's
//! deliveries. Every call is answered, and the effects, counted by an idempotent sink, are each applied once.
//!
//! The sink is a file the worker processes append the idempotency key of each effect to. It is idempotent the
//! way an effect store keyed by idempotency key is: a key it holds twice is one effect applied, the second line
//! an execution it absorbed. A worker killed after the effect and before its ack makes the broker deliver the
//! request again to another worker, whose dedup store (in its own memory) has not seen the key: that is the
//! only way a key runs twice, so re-executions are bounded by what the killed workers held (16 requests each).
//! The tests count calls, kills, lost effects (keys of calls missing from the sink), effects applied (distinct
//! keys) and the re-executions the sink absorbed.

use std::collections::{HashMap, HashSet};
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use mqrpc_tests::service::ProbeClient;
use mqrpc_tests::{
    AmqpHarness, Available, Harness, KafkaHarness, NatsHarness, RedisStreamsHarness, RemoteHarness, StompHarness,
    WorkerProcess,
};
use rpc_broker::protocol::{ClientFrame, DEFAULT_MAX_FRAME, FrameCodec, ServerFrame};
use rpc_broker::{Remote, RemoteOptions};
use rpc_core::{Client, ConsumeOptions, Error, QueueOptions, Transport, naming};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::FramedRead;
use uuid::Uuid;

const CALLS: usize = 2_000;
const KILLS: usize = 20;
const WORKERS: usize = 3;
const IN_FLIGHT: usize = 48;

/// A worker process serving the probe service through `url`, its effects going to `sink`.
fn start_worker(url: &str, namespace: &str, name: &str, sink: &Path, options: &Options) -> WorkerProcess {
    let mut command = Command::new(env!("CARGO_BIN_EXE_probe-worker"));
    command.args([url, namespace, name, "16"]).env("MQRPC_PROBE_SINK", sink);
    if let Some(prefix) = options.stream_prefix {
        command.env("MQRPC_PROBE_STREAM_PREFIX", prefix);
    }
    if let Some(redis) = options.shared_dedup {
        command.env("MQRPC_PROBE_DEDUP_REDIS", redis);
    }
    WorkerProcess::spawn(command)
}

/// How the worker processes run.
#[derive(Clone, Copy, Debug, Default)]
struct Options<'a> {
    /// JetStream mode, with the harness's stream prefix (Redis Streams: its key prefix).
    stream_prefix: Option<&'a str>,
    /// A Redis whose dedup store the workers share.
    shared_dedup: Option<&'a str>,
    /// Brokerless: worker `n` serves at `endpoints[n]` (its URL) and comes back there after a kill.
    endpoints: Option<&'a [String]>,
}

/// What a run came to.
#[derive(Debug)]
struct Counts {
    calls: usize,
    answered: usize,
    disrupted: usize,
    lost: usize,
    applied: usize,
    reexecuted: usize,
}

/// What the supervisor does to a worker process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Disruption {
    /// SIGKILL: the process dies holding its deliveries.
    Kill,
    /// SIGTERM: the process shuts down gracefully and exits.
    Terminate,
}

/// Runs [`CALLS`] calls of `effect` through `harness` while a supervisor kills a worker process (SIGKILL) after
/// every `CALLS / (KILLS + 1)` answers and starts it again.
async fn kill_workers_during_calls(harness: &dyn Harness, url: &str, options: Options<'_>) -> Counts {
    disrupt_workers_during_calls(harness, url, options, Disruption::Kill).await
}

/// Runs [`CALLS`] calls of `effect` through `harness` while a supervisor disrupts a worker process after every
/// `CALLS / (KILLS + 1)` answers and starts it again.
async fn disrupt_workers_during_calls(
    harness: &dyn Harness,
    url: &str,
    options: Options<'_>,
    disruption: Disruption,
) -> Counts {
    let namespace = format!("k{}", Uuid::new_v4().simple());
    let sink = sink_path();
    let url_of = |n: usize| options.endpoints.map_or_else(|| url.to_owned(), |endpoints| endpoints[n].clone());
    let start = |n: usize| start_worker(&url_of(n), &namespace, &format!("w{n}"), &sink, &options);
    let mut workers: Vec<WorkerProcess> = (0..WORKERS).map(start).collect();
    let client = Client::builder(harness.connect().await).namespace(&namespace).connect().await.expect("client");
    let answered = Arc::new(AtomicUsize::new(0));
    let keys: Vec<String> = (0..CALLS).map(|_| Uuid::new_v4().simple().to_string()).collect();
    let (caller, counter) = (client.clone(), Arc::clone(&answered));
    let calls = futures::stream::iter(keys.clone().into_iter().enumerate())
        .map(move |(n, key)| {
            let answered = Arc::clone(&counter);
            let probe = ProbeClient::new(&caller);
            let call = probe.effect(n as i64).idempotency_key(key).timeout(Duration::from_secs(120)).into_future();
            async move {
                let result = call.await;
                answered.fetch_add(1, Ordering::SeqCst);
                (n, result)
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<_>>();
    let calls = tokio::spawn(calls);

    // The supervisor: a kill after every step of answers, the victim started again at once.
    let step = CALLS / (KILLS + 1);
    let mut kills = 0;
    let mut shutdowns = Vec::new();
    while kills < KILLS {
        let target = (kills + 1) * step;
        mqrpc_tests::eventually("calls to progress between kills", Duration::from_secs(120), || {
            answered.load(Ordering::SeqCst) >= target
        })
        .await;
        let victim = kills % WORKERS;
        if options.endpoints.is_some() && disruption == Disruption::Kill {
            // A brokerless worker comes back on its own endpoint, which the killed process must free first.
            workers[victim].kill();
        }
        let replacement = start(victim);
        let stopped = std::mem::replace(&mut workers[victim], replacement);
        match disruption {
            Disruption::Kill => drop(stopped),
            Disruption::Terminate => {
                eprintln!("terminating {}", stopped.id());
                let report = stopped.terminate();
                // Handlers of a few milliseconds all finish within the grace period.
                assert_eq!(report["aborted"], 0, "a graceful shutdown aborted handlers: {report:?}");
                shutdowns.push(report);
            }
        }
        kills += 1;
    }
    let results = calls.await.expect("joins");
    let mut ok = 0;
    for (n, result) in results {
        assert_eq!(result.expect("answered despite the kills"), n as i64);
        ok += 1;
    }
    assert_eq!(client.stats().pending, 0);
    drop(workers);

    let applied = read_sink(&sink);
    let twice = reexecutions(&sink);
    let _ = std::fs::remove_file(&sink);
    let lost = keys.iter().filter(|key| !applied.contains_key(*key)).count();
    let strangers = applied.keys().filter(|key| !keys.contains(key)).count();
    assert_eq!(strangers, 0, "the sink holds effects of calls nobody made");
    // A keyed sink applies a key once whatever it is sent: each key is one effect; extra lines were absorbed.
    let reexecuted: usize = applied.values().map(|lines| lines - 1).sum();
    let counts = Counts { calls: CALLS, answered: ok, disrupted: kills, lost, applied: applied.len(), reexecuted };
    let released: u64 = shutdowns.iter().map(|report| report["released"]).sum();
    let finished: u64 = shutdowns.iter().map(|report| report["finished"]).sum();
    eprintln!("{url} {disruption:?}: {counts:?}; graceful shutdowns released {released}, finished {finished}");
    if disruption == Disruption::Terminate && !twice.is_empty() {
        eprintln!("ran twice (key worker attempt): {twice:#?}");
    }
    counts
}

fn sink_path() -> PathBuf {
    std::env::temp_dir().join(format!("mqrpc-sink-{}", Uuid::new_v4().simple()))
}

/// Lines per key in the sink (a line is `key worker attempt`).
fn read_sink(path: &Path) -> HashMap<String, usize> {
    let text = std::fs::read_to_string(path).expect("reads the sink");
    let mut lines = HashMap::new();
    for line in text.lines() {
        let key = line.split(' ').next().unwrap_or_default();
        *lines.entry(key.to_owned()).or_default() += 1;
    }
    lines
}

/// The sink's lines of the keys that ran more than once, to say where they ran.
fn reexecutions(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).expect("reads the sink");
    let lines = read_sink(path);
    text.lines().filter(|line| lines[line.split(' ').next().unwrap_or_default()] > 1).map(str::to_owned).collect()
}

/// Every call answered and its effect applied (no loss), and re-executions bounded by what the killed workers
/// held: at-least-once with a bound, not exactly-once (a worker killed between its effect and its ack runs the
/// call again elsewhere).
fn assert_none_lost_and_reexecutions_bounded(counts: &Counts) {
    assert_eq!((counts.calls, counts.answered, counts.disrupted), (CALLS, CALLS, KILLS));
    assert_eq!((counts.lost, counts.applied), (0, CALLS), "{counts:?}");
    assert!(counts.reexecuted <= KILLS * 16, "more re-executions than the killed workers held: {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_broker_kill_9_of_workers_twenty_times() {
    let harness = RemoteHarness::start().await;
    let counts = kill_workers_during_calls(&harness, &harness.url(), Options::default()).await;
    assert_none_lost_and_reexecutions_bounded(&counts);
}

/// The same kills with the workers sharing one dedup store in Redis: a key whose outcome a killed worker had
/// stored is answered from the store by the worker that gets it again, so only keys a worker was executing when
/// it died run twice, and a dead worker's claims run out after their lease (1 s) instead of holding keys back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_redis), ignore = "needs Redis: MQRPC_REDIS_URL (bash .ci/brokers)")]
async fn own_broker_kill_9_of_workers_sharing_a_redis_dedup_store() {
    let redis = mqrpc_tests::required_url("MQRPC_REDIS_URL");
    let harness = RemoteHarness::start().await;
    let options = Options { shared_dedup: Some(&redis), ..Options::default() };
    let counts = kill_workers_during_calls(&harness, &harness.url(), options).await;
    assert_none_lost_and_reexecutions_bounded(&counts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_amqp), ignore = "needs RabbitMQ: MQRPC_AMQP_URL (bash .ci/brokers)")]
async fn rabbitmq_kill_9_of_workers_twenty_times() {
    let harness = AmqpHarness::from_env().available();
    let counts = kill_workers_during_calls(&harness, harness.url(), Options::default()).await;
    assert_none_lost_and_reexecutions_bounded(&counts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_nats), ignore = "needs NATS: MQRPC_NATS_URL (bash .ci/brokers)")]
async fn jetstream_kill_9_of_workers_twenty_times() {
    let harness = NatsHarness::jetstream().available();
    let prefix = harness.stream_prefix().to_owned();
    let counts = kill_workers_during_calls(
        &harness,
        harness.url(),
        Options { stream_prefix: Some(&prefix), ..Options::default() },
    )
    .await;
    assert_none_lost_and_reexecutions_bounded(&counts);
}

/// Kafka: a killed worker's partitions go to the others once its group session (2 s here) runs out, and they
/// read again from the offset below which everything was settled; the records the dead worker had handed out
/// come again as a second delivery (attempt 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_kafka), ignore = "needs Kafka: MQRPC_KAFKA_URL (bash .ci/brokers)")]
async fn kafka_kill_9_of_workers_twenty_times() {
    let harness = KafkaHarness::from_env().available();
    let url = format!("kafka://{}", harness.url());
    let counts = kill_workers_during_calls(&harness, &url, Options::default()).await;
    assert_none_lost_and_reexecutions_bounded(&counts);
}

/// ActiveMQ over STOMP: a killed worker's connection drops, and ActiveMQ gives the messages it held unacked to
/// the other workers' subscriptions, marked `redelivered` (attempt 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_stomp), ignore = "needs ActiveMQ: MQRPC_STOMP_URL (bash .ci/brokers)")]
async fn activemq_kill_9_of_workers_twenty_times() {
    let harness = StompHarness::activemq().available();
    let counts = kill_workers_during_calls(&harness, harness.url(), Options::default()).await;
    assert_none_lost_and_reexecutions_bounded(&counts);
}

/// Redis Streams: a killed worker's entries stay pending in the group until they are idle past the visibility
/// timeout (2 s here), then another worker claims them (a second delivery, attempt 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_redis), ignore = "needs Redis: MQRPC_REDIS_URL (bash .ci/brokers)")]
async fn redis_streams_kill_9_of_workers_twenty_times() {
    let harness = RedisStreamsHarness::from_env().available();
    let prefix = harness.prefix().to_owned();
    let options = Options { stream_prefix: Some(&prefix), ..Options::default() };
    let counts = kill_workers_during_calls(&harness, harness.url(), options).await;
    assert_none_lost_and_reexecutions_bounded(&counts);
}

/// ZeroMQ, brokerless: three worker processes bound on their own ports and a client holding every request
/// until a worker settles it. A killed worker's connection drops (or its heartbeats stop), and the client sends
/// what it held there to the other two as a new delivery with the same idempotency key, then reconnects to the
/// worker's endpoint once it is back. The workers share a dedup store in Redis, so a key whose outcome the
/// killed worker stored is answered from the store; only keys it was executing run twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_redis), ignore = "needs Redis: MQRPC_REDIS_URL (bash .ci/brokers)")]
async fn zeromq_kill_9_of_workers_twenty_times() {
    let redis = mqrpc_tests::required_url("MQRPC_REDIS_URL");
    let endpoints: Vec<String> = (0..WORKERS).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let worker_urls: Vec<String> = endpoints.iter().map(|endpoint| format!("zmq-worker://{endpoint}")).collect();
    let client_url = format!("zmq://{}", endpoints.join(","));
    let harness = ProcessHarness(client_url.clone());
    let options = Options { shared_dedup: Some(&redis), endpoints: Some(&worker_urls), ..Options::default() };
    let counts = kill_workers_during_calls(&harness, &client_url, options).await;
    assert_none_lost_and_reexecutions_bounded(&counts);
}

/// ZeroMQ heartbeats (Paranoid Pirate): a worker process stopped with SIGSTOP keeps its TCP connection but
/// answers nothing. The client, with 100 ms heartbeats, takes it for dead after three silent ones and sends what
/// it held to the other worker; every call made while it is stopped is answered there, well within a 2 s
/// timeout. Resumed, the worker is connected to again and takes calls again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zeromq_worker_whose_heartbeats_stop_is_dropped_from_rotation_and_taken_back() {
    use rpc_broker::adapter::zmq::Zmq;
    let namespace = format!("hb{}", Uuid::new_v4().simple());
    let endpoints: Vec<String> = (0..2).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let sink = sink_path();
    let options = Options::default();
    let start =
        |n: usize| start_worker(&format!("zmq-worker://{}", endpoints[n]), &namespace, ["a", "b"][n], &sink, &options);
    let (stopped, _running) = (start(0), start(1));
    let peers = endpoints.iter().map(|endpoint| format!("tcp://{endpoint}"));
    let node = Zmq::start(mqrpc_tests::zmq_test_options().peers(peers)).await.expect("connects");
    assert_eq!(node.live_workers(), 2);
    let client = Client::builder(node.clone()).namespace(&namespace).connect().await.expect("client");
    let probe = ProbeClient::new(&client);
    stopped.pause();
    let calls = (0..40).map(|_| probe.whoami().timeout(Duration::from_secs(2)).into_future());
    for answer in futures::future::join_all(calls).await {
        let (name, _) = answer.expect("answered by the worker still beating");
        assert_eq!(name, "b");
    }
    assert_eq!(node.live_workers(), 1, "the stopped worker is still in rotation");
    stopped.resume();
    mqrpc_tests::eventually("the resumed worker to be connected again", Duration::from_secs(20), || {
        node.live_workers() == 2
    })
    .await;
    let calls = (0..200).map(|_| probe.whoami().timeout(Duration::from_secs(5)).into_future());
    let names: HashSet<String> =
        futures::future::join_all(calls).await.into_iter().map(|answer| answer.expect("answered").0).collect();
    assert_eq!(names, HashSet::from(["a".to_owned(), "b".to_owned()]), "the resumed worker takes no calls");
    assert_eq!(client.stats().pending, 0);
    let _ = std::fs::remove_file(&sink);
}

/// A loopback port free at the moment of asking, for a worker process to bind.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binds a free port");
    listener.local_addr().expect("bound").port()
}

/// Connects as a test process would, through [`mqrpc_tests::process_transport`].
struct ProcessHarness(String);

impl Harness for ProcessHarness {
    fn connect(&self) -> rpc_core::transport::BoxFuture<'_, Arc<dyn Transport>> {
        Box::pin(async move { mqrpc_tests::process_transport(&self.0).await.expect("connects") })
    }
}

/// SIGTERM under load: the worker stops taking requests, finishes those it runs, hands back those it holds and
/// exits; nothing is lost and nothing runs twice.
fn assert_graceful(counts: &Counts) {
    assert_eq!((counts.calls, counts.answered, counts.disrupted), (CALLS, CALLS, KILLS));
    assert_eq!((counts.lost, counts.applied, counts.reexecuted), (0, CALLS, 0), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_broker_sigterm_of_workers_under_load() {
    let harness = RemoteHarness::start().await;
    let counts =
        disrupt_workers_during_calls(&harness, &harness.url(), Options::default(), Disruption::Terminate).await;
    assert_graceful(&counts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_amqp), ignore = "needs RabbitMQ: MQRPC_AMQP_URL (bash .ci/brokers)")]
async fn rabbitmq_sigterm_of_workers_under_load() {
    let harness = AmqpHarness::from_env().available();
    let counts = disrupt_workers_during_calls(&harness, harness.url(), Options::default(), Disruption::Terminate).await;
    assert_graceful(&counts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_stomp), ignore = "needs ActiveMQ: MQRPC_STOMP_URL (bash .ci/brokers)")]
async fn activemq_sigterm_of_workers_under_load() {
    let harness = StompHarness::activemq().available();
    let counts = disrupt_workers_during_calls(&harness, harness.url(), Options::default(), Disruption::Terminate).await;
    assert_graceful(&counts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_nats), ignore = "needs NATS: MQRPC_NATS_URL (bash .ci/brokers)")]
async fn jetstream_sigterm_of_workers_under_load() {
    let harness = NatsHarness::jetstream().available();
    let prefix = harness.stream_prefix().to_owned();
    let counts = disrupt_workers_during_calls(
        &harness,
        harness.url(),
        Options { stream_prefix: Some(&prefix), ..Options::default() },
        Disruption::Terminate,
    )
    .await;
    assert_graceful(&counts);
}

/// A worker stopped with SIGSTOP in the middle of a handler, after its effect and before its reply, for longer
/// than the heartbeats that hold its deliveries: the broker drops its connection and redelivers the request to
/// a second worker, which answers. Resumed with SIGCONT, the first worker finishes its handler but cannot
/// answer for a request it no longer holds: its reply is fenced (dropped and counted), so the caller gets
/// exactly one reply. The effect is applied once by the keyed sink; both workers executed it, since the second
/// worker's dedup store is its own.
async fn paused_worker_is_fenced(harness: &dyn Harness, url: &str, handler: Duration) {
    let namespace = format!("p{}", Uuid::new_v4().simple());
    let sink = sink_path();
    let start = |name: &str| start_worker(url, &namespace, name, &sink, &Options::default());
    let paused = start("paused");
    let client = Client::builder(harness.connect().await).namespace(&namespace).connect().await.expect("client");
    let key = Uuid::new_v4().simple().to_string();
    let probe = ProbeClient::new(&client);
    let call = probe.effect_then_wait(7, handler.as_millis() as u64).idempotency_key(&key).timeout(handler * 4);
    let call = tokio::spawn(call.into_future());
    let lines = |key: &str| read_sink(&sink).get(key).copied().unwrap_or(0);
    mqrpc_tests::eventually("the first worker to apply the effect", WAIT, || lines(&key) == 1).await;
    paused.pause();
    let second = start("second");
    // The broker gave the request to the second worker: the first one's deliveries were taken back.
    mqrpc_tests::eventually("the request to be redelivered", WAIT, || lines(&key) == 2).await;
    paused.resume();
    assert_eq!(call.await.expect("joins").expect("answered by the second worker"), 7);
    // The first worker's handler ends after it was resumed (it had `handler` to go); its report says what
    // became of its reply.
    let first = paused.terminate();
    let second = second.terminate();
    let _ = std::fs::remove_file(&sink);
    eprintln!("{url}: paused worker {first:?}; second worker {second:?}");
    assert_eq!((first["fenced"], first["handled"]), (1, 0), "the paused worker answered: {first:?}");
    assert_eq!(second["handled"], 1);
    assert_eq!(client.stats().late_replies, 0, "a second reply reached the caller");
    assert_eq!(client.stats().pending, 0);
}

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_broker_paused_worker_cannot_answer_a_redelivered_request() {
    // Heartbeats every 100 ms: a connection silent for 300 ms loses its deliveries.
    let mut config = rpc_broker::server::ServerConfig::default();
    config.heartbeat = Duration::from_millis(100);
    let harness = RemoteHarness::start_with(config).await;
    paused_worker_is_fenced(&harness, &harness.url(), Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_amqp), ignore = "needs RabbitMQ: MQRPC_AMQP_URL (bash .ci/brokers)")]
async fn rabbitmq_paused_worker_cannot_answer_a_redelivered_request() {
    let harness = AmqpHarness::from_env().available();
    // Heartbeats every second: RabbitMQ closes a connection that misses two, and requeues its deliveries.
    let url = format!("{}?heartbeat=1", harness.url());
    paused_worker_is_fenced(&harness, &url, Duration::from_secs(8)).await;
}

/// A worker running one handler at a time holds 15 more requests it was handed (prefetch 16) when it is stopped
/// with SIGSTOP past its heartbeats. The broker holds back new work from its silent connection, then drops the
/// connection and hands its 16 requests to a second worker, which answers them all. Resumed, the first worker
/// finds by the clock that it was away past the heartbeats: it runs none of the 15 it still holds (they are
/// `revoked`; before, it ran each one again), its reply to the request it was in the middle of is fenced, and it
/// reconnects and serves again. Each of the 15 keys' effects happened once; the interrupted request's effect
/// happened on both workers, as no store per worker can prevent (its effect came before the pause).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_broker_paused_worker_runs_nothing_the_broker_took_back() {
    const HELD: usize = 15;
    let mut config = rpc_broker::server::ServerConfig::default();
    config.heartbeat = Duration::from_millis(100);
    let harness = RemoteHarness::start_with(config).await;
    let url = harness.url();
    let namespace = format!("r{}", Uuid::new_v4().simple());
    let sink = sink_path();
    let start = |name: &str, concurrency: &str, prefetch: &str| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_probe-worker"));
        command.args([url.as_str(), &namespace, name, concurrency, prefetch]).env("MQRPC_PROBE_SINK", &sink);
        WorkerProcess::spawn(command)
    };
    let paused = start("paused", "1", "16");
    let transport = harness.connect().await;
    let client = Client::builder(Arc::clone(&transport)).namespace(&namespace).connect().await.expect("client");
    let probe = ProbeClient::new(&client);
    let lines = |key: &str| read_sink(&sink).get(key).copied().unwrap_or(0);

    // The worker's one handler is busy, past its effect.
    let first = Uuid::new_v4().simple().to_string();
    let busy = probe.effect_then_wait(0, 2_000).idempotency_key(&first).timeout(WAIT * 2).into_future();
    let busy = tokio::spawn(busy);
    mqrpc_tests::eventually("the first effect", WAIT, || lines(&first) == 1).await;
    // Fifteen more requests, handed to the worker and waiting for its handler.
    let keys: Vec<String> = (0..HELD).map(|_| Uuid::new_v4().simple().to_string()).collect();
    let held: Vec<_> = keys
        .iter()
        .enumerate()
        .map(|(n, key)| tokio::spawn(probe.effect(n as i64 + 1).idempotency_key(key).timeout(WAIT * 2).into_future()))
        .collect();
    let queue = naming::service_queue(Some(&namespace), "suite.Probe");
    mqrpc_tests::eventually_async("the requests to be handed to the worker", WAIT, || async {
        transport.queue_stats(&queue).await.is_ok_and(|stats| stats.unacked == HELD + 1 && stats.ready == 0)
    })
    .await;

    paused.pause();
    let second = start("second", "16", "16");
    assert_eq!(busy.await.expect("joins").expect("answered by the second worker"), 0);
    for (n, call) in held.into_iter().enumerate() {
        assert_eq!(call.await.expect("joins").expect("answered by the second worker"), n as i64 + 1);
    }
    paused.resume();
    // Only the first worker serves from here: a call it answers was read after the ones it held (one handler
    // at a time, in order), so by then it has dropped them or run them.
    let second = second.terminate();
    let after = Uuid::new_v4().simple().to_string();
    let answered = probe.effect(99).idempotency_key(&after).timeout(WAIT * 2).await;
    assert_eq!(answered.expect("answered by the first worker once it is back"), 99);
    let first_report = paused.terminate();
    let effects = read_sink(&sink);
    let _ = std::fs::remove_file(&sink);
    eprintln!("paused worker {first_report:?}; second worker {second:?}");
    let repeated: Vec<&String> = keys.iter().filter(|key| effects.get(*key).copied() != Some(1)).collect();
    assert!(repeated.is_empty(), "effects of held requests repeated or missing: {repeated:?} in {effects:?}");
    assert_eq!(first_report["revoked"], HELD as u64, "{first_report:?}");
    assert_eq!(first_report["fenced"], 1, "{first_report:?}");
    assert_eq!(first_report["handled"], 1, "the paused worker answered what it held: {first_report:?}");
    assert_eq!(second["handled"], HELD as u64 + 1, "{second:?}");
    assert_eq!(client.stats().pending, 0);
}

/// Calls in the lost-confirm test.
const CONFIRM_CALLS: usize = 10_000;
/// One confirm in this many is dropped.
const DROP_EVERY: usize = 10;

/// A TCP proxy in front of our broker that drops one in `every` of the broker's confirms of publishes on their
/// way to the client (it reads the frames with the protocol's own codec): the client never learns that those
/// publishes arrived. Everything else passes.
struct ConfirmDropper {
    address: SocketAddr,
    dropped: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl ConfirmDropper {
    async fn start(broker: SocketAddr, every: usize) -> ConfirmDropper {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.expect("the proxy binds");
        let address = listener.local_addr().expect("the proxy's address");
        let dropped = Arc::new(AtomicUsize::new(0));
        let confirms = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&dropped);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(upstream) = TcpStream::connect(broker).await else { continue };
                let publishes = Arc::new(Mutex::new(HashSet::new()));
                let (client_read, client_write) = client.into_split();
                let (broker_read, broker_write) = upstream.into_split();
                let sent = Arc::clone(&publishes);
                tokio::spawn(forward(client_read, broker_write, move |frame| {
                    if let Ok(ClientFrame::Publish { req, .. }) = ClientFrame::parse(frame.clone())
                        && req != 0
                    {
                        sent.lock().expect("not poisoned").insert(req);
                    }
                    true
                }));
                let (confirms, dropped) = (Arc::clone(&confirms), Arc::clone(&counter));
                tokio::spawn(forward(broker_read, client_write, move |frame| {
                    let Ok(ServerFrame::Ok { req, .. }) = ServerFrame::parse(frame.clone()) else { return true };
                    if !publishes.lock().expect("not poisoned").remove(&req) {
                        return true;
                    }
                    if confirms.fetch_add(1, Ordering::SeqCst) % every == every - 1 {
                        dropped.fetch_add(1, Ordering::SeqCst);
                        return false;
                    }
                    true
                }));
            }
        });
        ConfirmDropper { address, dropped, task }
    }

    fn url(&self) -> String {
        format!("mqrpc://{}", self.address)
    }
}

impl Drop for ConfirmDropper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies frames from `read` to `write`, those that `keep` keeps.
async fn forward(read: OwnedReadHalf, mut write: OwnedWriteHalf, mut keep: impl FnMut(&Bytes) -> bool) {
    let mut frames = FramedRead::new(read, FrameCodec::new(DEFAULT_MAX_FRAME));
    while let Some(Ok(frame)) = frames.next().await {
        if !keep(&frame) {
            continue;
        }
        let mut out = BytesMut::with_capacity(frame.len() + 4);
        out.put_u32(u32::try_from(frame.len()).expect("a frame under the maximum"));
        out.extend_from_slice(&frame);
        if write.write_all(&out).await.is_err() {
            break;
        }
    }
}

/// One in ten of the broker's publish confirms is lost on the way to the client. Half the calls wait for their
/// reply: their requests are quiet publishes, which the broker confirms only if they fail, since the reply
/// proves the request arrived. The other half are durable calls (the reply goes to a callback queue), which
/// know only the confirm: a lost one times out and the caller sends the call again with the same idempotency
/// key, so the broker holds it twice, and the worker's dedup store answers the second copy with the stored
/// reply. Every effect is applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_broker_lost_publish_confirms_apply_each_effect_once() {
    let broker = RemoteHarness::start().await;
    let proxy = ConfirmDropper::start(broker.server().local_addr(), DROP_EVERY).await;
    let namespace = format!("c{}", Uuid::new_v4().simple());
    let sink = sink_path();
    let worker = start_worker(&broker.url(), &namespace, "w0", &sink, &Options::default());
    let options = RemoteOptions::new().request_timeout(Duration::from_millis(300));
    let through_proxy = Remote::connect_with(&proxy.url(), options).await.expect("connects through the proxy");
    let client = Client::builder(through_proxy).namespace(&namespace).connect().await.expect("client");
    let direct = Remote::connect(&broker.url()).await.expect("connects");
    let callbacks = naming::callback_queue(Some(&namespace), "confirms");
    direct.declare_queue(&callbacks, &QueueOptions::new().durable(true)).await.expect("declares");
    let mut replies = direct.consume(&callbacks, ConsumeOptions::new().auto_ack(true)).await.expect("consumes");

    let keys: Vec<String> = (0..CONFIRM_CALLS).map(|_| Uuid::new_v4().simple().to_string()).collect();
    let caller = client.clone();
    let tries = futures::stream::iter(keys.clone().into_iter().enumerate())
        .map(move |(n, key)| {
            let probe = ProbeClient::new(&caller);
            async move {
                for attempt in 1..=20 {
                    let call = probe.effect(n as i64).idempotency_key(&key).timeout(Duration::from_secs(10));
                    let result = if n % 2 == 0 {
                        call.await.map(|answer| assert_eq!(answer, n as i64))
                    } else {
                        call.header("n", n.to_string()).durable("confirms").await.map(drop)
                    };
                    match result {
                        Ok(()) => return attempt,
                        Err(Error::Timeout(_)) => continue,
                        Err(error) => panic!("call {n} failed: {error}"),
                    }
                }
                panic!("call {n} never confirmed in 20 attempts");
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<u32>>()
        .await;
    let resent_calls = tries.iter().filter(|attempts| **attempts > 1).count();
    let resends: u32 = tries.iter().map(|attempts| attempts - 1).sum();

    // A reply reaches the callback queue for every durable call, once per copy the broker held.
    let mut answered = HashSet::new();
    let mut callback_replies = 0;
    while answered.len() < CONFIRM_CALLS / 2 {
        let reply = tokio::time::timeout(WAIT, replies.next()).await.expect("a durable reply").expect("open");
        assert_eq!(reply.envelope.status, 0, "{:?}", reply.envelope.status_message);
        answered.insert(reply.envelope.headers["n"].clone());
        callback_replies += 1;
    }
    let report = worker.terminate();
    let applied = read_sink(&sink);
    let _ = std::fs::remove_file(&sink);
    let dropped = proxy.dropped.load(Ordering::SeqCst);
    let lost = keys.iter().filter(|key| !applied.contains_key(*key)).count();
    let reexecuted: usize = applied.values().map(|lines| lines - 1).sum();
    eprintln!(
        "lost confirms: {CONFIRM_CALLS} calls, {dropped} confirms dropped, {resent_calls} calls sent again \
         ({resends} resends), {callback_replies} durable replies for {} durable calls, {lost} effects lost, {} \
         applied, {reexecuted} executed twice; worker {report:?}",
        CONFIRM_CALLS / 2,
        applied.len()
    );
    // Only the durable calls' publishes are confirmed.
    assert!(dropped >= CONFIRM_CALLS / 2 / DROP_EVERY - 10, "the proxy dropped only {dropped} confirms");
    assert!(resent_calls > 0, "no durable call lost its confirm");
    assert_eq!((lost, applied.len(), reexecuted), (0, CONFIRM_CALLS, 0));
    assert!(report["deduplicated"] > 0, "no second copy reached the worker: {report:?}");
    assert_eq!(client.stats().pending, 0);
}
