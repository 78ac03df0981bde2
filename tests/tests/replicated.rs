//! Replicated engines, started by the tests on loopback: a NATS cluster of three servers with JetStream and a
//! service stream of three replicas, and a RabbitMQ cluster of three nodes with the service queue a quorum
//! queue. The stream's or the queue's leader is killed (`kill -9`) in the middle of 2,000 calls: every call is
//! answered before its deadline, each key runs once (the dedup store absorbs the copies that come again), and
//! the stream or queue gets a new leader on another server.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use mqrpc_tests::free_port;
use mqrpc_tests::rabbit::RabbitNodes;
use rpc_broker::adapter::amqp::{Amqp, AmqpOptions};
use rpc_broker::adapter::nats::{Nats, NatsOptions};
use rpc_core::dedup::MemoryDedup;
use rpc_core::{Client, Error, Server};
use uuid::Uuid;

#[rpc_core::service]
trait Ledger {
    /// Records one execution of entry `n`; returns twice `n`.
    async fn apply(&self, n: u64) -> u64;
}

/// Counts how many times each entry ran.
#[derive(Clone, Default)]
struct Book {
    runs: Arc<Mutex<HashMap<u64, u32>>>,
}

impl Ledger for Book {
    async fn apply(&self, n: u64) -> u64 {
        *self.runs.lock().expect("not poisoned").entry(n).or_default() += 1;
        n * 2
    }
}

const SERVERS: usize = 3;
const CALLS: u64 = 2_000;
const IN_FLIGHT: usize = 64;
const DEADLINE: Duration = Duration::from_secs(60);

/// One server of the cluster.
struct Node {
    name: String,
    port: u16,
    child: Option<Child>,
}

/// Three nats-servers with JetStream, routed to each other on loopback, each with its own store.
struct Cluster {
    nodes: Vec<Node>,
    store: tempfile::TempDir,
}

impl Cluster {
    fn start(binary: &str) -> Cluster {
        let store = tempfile::tempdir().expect("a directory");
        let id = Uuid::new_v4().simple().to_string();
        let ports: Vec<(u16, u16)> = (0..SERVERS).map(|_| (free_port(), free_port())).collect();
        let mut nodes = Vec::new();
        for (n, (port, route)) in ports.iter().enumerate() {
            let name = format!("mqrpc-{}-{n}", &id[..8]);
            let routes: Vec<String> = ports
                .iter()
                .filter(|(_, other)| other != route)
                .map(|(_, other)| format!("nats://127.0.0.1:{other}"))
                .collect();
            let child = Command::new(binary)
                .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-n", &name, "-js", "-sd"])
                .arg(store.path().join(&name))
                .args(["--cluster_name", &format!("mqrpc-{}", &id[..8])])
                .args(["--cluster", &format!("nats://127.0.0.1:{route}")])
                .args(["--routes", &routes.join(",")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("nats-server runs");
            nodes.push(Node { name, port: *port, child: Some(child) });
        }
        Cluster { nodes, store }
    }

    /// Every server, as one URL list.
    fn url(&self) -> String {
        self.nodes.iter().map(|node| format!("nats://127.0.0.1:{}", node.port)).collect::<Vec<_>>().join(",")
    }

    /// Kills the server named `name` with SIGKILL.
    fn kill(&mut self, name: &str) {
        let node = self.nodes.iter_mut().find(|node| node.name == name).expect("a server of the cluster");
        if let Some(mut child) = node.child.take() {
            child.kill().expect("killed");
            child.wait().expect("reaped");
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = self.store.path();
    }
}

/// The leader of the stream that holds `subject`, as JetStream reports it.
async fn leader(nats: &async_nats::Client, subject: &str) -> Option<String> {
    let jetstream = async_nats::jetstream::new(nats.clone());
    let mut streams = jetstream.streams();
    while let Some(Ok(info)) = streams.next().await {
        if info.config.subjects.iter().any(|held| held == subject) {
            return info.cluster.and_then(|cluster| cluster.leader);
        }
    }
    None
}

/// Makes 2,000 calls, `IN_FLIGHT` at a time, each with a key of its own, sent again by its caller on the errors
/// a lost node gives until it is answered or `DEADLINE` passes; `kill` runs once a sixth are answered. Checks
/// that every call was answered with its result and each key ran once; returns how many were answered before
/// the kill and the retries by error.
async fn calls_across_a_kill(
    client: &Client,
    book: &Book,
    kill: impl FnOnce(),
) -> (usize, HashMap<&'static str, usize>) {
    let answered = Arc::new(AtomicUsize::new(0));
    let retried = Arc::new(Mutex::new(HashMap::<&'static str, usize>::new()));
    let (caller, answers, retries) = (client.clone(), Arc::clone(&answered), Arc::clone(&retried));
    let calls = futures::stream::iter(0..CALLS)
        .map(move |n| {
            let (client, answered, retried) = (caller.clone(), Arc::clone(&answers), Arc::clone(&retries));
            async move {
                let key = format!("entry-{n}");
                let deadline = Instant::now() + DEADLINE;
                let mut seen: Vec<&'static str> = Vec::new();
                // The caller's own loop: a call whose reply may be lost is sent again with the same key.
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(format!("entry {n}: no answer within {DEADLINE:?}; the attempts: {seen:?}"));
                    }
                    let attempt = LedgerClient::new(&client)
                        .apply(n)
                        .idempotency_key(key.clone())
                        .timeout(left.min(Duration::from_secs(10)))
                        .await;
                    match attempt {
                        Ok(doubled) if doubled == n * 2 => {
                            answered.fetch_add(1, Ordering::Relaxed);
                            return Ok(());
                        }
                        Ok(other) => return Err(format!("entry {n}: answered {other}")),
                        Err(
                            error @ (Error::Timeout(_)
                            | Error::ReplyLost
                            | Error::Disconnected
                            | Error::NoResponders(_)
                            | Error::Transport(_)),
                        ) => {
                            *retried.lock().expect("not poisoned").entry(error.kind()).or_default() += 1;
                            seen.push(error.kind());
                            // A caller backs off before it sends again: a transport that is reconnecting
                            // fails at once.
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(error) => return Err(format!("entry {n}: {error}")),
                    }
                }
            }
        })
        .buffer_unordered(IN_FLIGHT);
    let run = tokio::spawn(calls.collect::<Vec<Result<(), String>>>());
    while answered.load(Ordering::Relaxed) < usize::try_from(CALLS / 6).expect("small") {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    kill();
    let killed_at = answered.load(Ordering::Relaxed);
    let results = run.await.expect("the calls ran");

    let failures: Vec<&String> = results.iter().filter_map(|result| result.as_ref().err()).collect();
    assert!(failures.is_empty(), "{} calls failed: {:?}", failures.len(), &failures[..failures.len().min(10)]);
    assert_eq!(answered.load(Ordering::Relaxed), usize::try_from(CALLS).expect("small"));
    assert!(killed_at < usize::try_from(CALLS).expect("small"), "the leader died after every call was answered");
    let runs = book.runs.lock().expect("not poisoned").clone();
    let twice: Vec<(&u64, &u32)> = runs.iter().filter(|(_, count)| **count > 1).collect();
    assert_eq!(runs.len(), usize::try_from(CALLS).expect("small"), "every entry ran");
    assert!(twice.is_empty(), "entries that ran more than once: {twice:?}");
    let retried = retried.lock().expect("not poisoned").clone();
    (killed_at, retried)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_nats_server), ignore = "needs a nats-server binary: MQRPC_NATS_SERVER (bash .ci/brokers)")]
async fn calls_survive_the_kill_of_the_stream_leader_in_a_three_server_cluster() {
    let binary = mqrpc_tests::required_url("MQRPC_NATS_SERVER");
    let mut cluster = Cluster::start(&binary);
    let url = cluster.url();
    let options = || NatsOptions::jetstream().replicas(3).ack_wait(Duration::from_secs(5));
    let namespace = format!("replicated{}", &Uuid::new_v4().simple().to_string()[..8]);
    let queue = rpc_core::naming::service_queue(Some(&namespace), "Ledger");

    // The cluster elects its JetStream leaders: the worker starts once a stream of three replicas can be made.
    let book = Book::default();
    let started = Instant::now();
    let server = loop {
        let attempt = async {
            let transport = Nats::connect_with(&url, options()).await?;
            Server::new(transport)
                .namespace(&namespace)
                .dedup(MemoryDedup::new(100_000, Duration::from_secs(600)))
                .serve(LedgerServer::new(book.clone()))
                .await
        };
        match attempt.await {
            Ok(server) => break server,
            Err(error) if started.elapsed() < Duration::from_secs(30) => {
                tracing::debug!(%error, "the cluster is not ready yet");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => panic!("the cluster did not take the stream within 30 s: {error}"),
        }
    };
    let client = Client::builder(Nats::connect_with(&url, options()).await.expect("connects"))
        .namespace(&namespace)
        .connect()
        .await
        .expect("client");
    let observer = async_nats::connect(url.split(',').collect::<Vec<_>>()).await.expect("connects");
    let first = leader(&observer, &queue).await.expect("the stream has a leader");

    let (killed_at, retried) = calls_across_a_kill(&client, &book, || cluster.kill(&first)).await;
    // The stream's info names its new leader once the survivors have agreed on it, which can be after the
    // calls went through.
    let reported = Instant::now();
    let new = loop {
        let new = leader(&observer, &queue).await;
        if new.as_ref().is_some_and(|new| *new != first) || reported.elapsed() > Duration::from_secs(20) {
            break new;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(new.as_ref().is_some_and(|new| *new != first), "the stream's leader after the kill: {new:?}, was {first}");
    println!(
        "killed the leader {first} after {killed_at} answers; calls sent again by their callers, by error: \
         {retried:?}; {} copies absorbed by the dedup store; new leader {new:?}",
        server.stats().deduplicated
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_rabbitmq_bin), ignore = "needs RabbitMQ's own scripts: MQRPC_RABBITMQ_BIN (bash .ci/brokers)")]
async fn calls_survive_the_kill_of_a_quorum_queues_leader_in_a_three_node_cluster() {
    let cluster = RabbitNodes::cluster(&mqrpc_tests::required_url("MQRPC_RABBITMQ_BIN"));
    let options = || AmqpOptions::new().quorum(true);
    let namespace = format!("replicated{}", &Uuid::new_v4().simple().to_string()[..8]);
    let queue = rpc_core::naming::service_queue(Some(&namespace), "Ledger");
    // The queue is declared through node a, which makes its leader there; worker and caller use node b.
    let declaring = Amqp::connect_with(&cluster.url(0), options()).await.expect("connects to node a");
    rpc_core::Transport::declare_queue(&declaring, &queue, &rpc_core::QueueOptions::new()).await.expect("declares");
    let first = cluster.leader(1, &queue).expect("the queue has a leader");
    assert_eq!(first, cluster.nodes[0].name, "declared through node a");

    let book = Book::default();
    let server = Server::new(Amqp::connect_with(&cluster.url(1), options()).await.expect("connects to node b"))
        .namespace(&namespace)
        .dedup(MemoryDedup::new(100_000, Duration::from_secs(600)))
        .serve(LedgerServer::new(book.clone()))
        .await
        .expect("serves");
    let client = Client::builder(Amqp::connect_with(&cluster.url(1), options()).await.expect("connects to node b"))
        .namespace(&namespace)
        .connect()
        .await
        .expect("client");

    let (killed_at, retried) = calls_across_a_kill(&client, &book, || cluster.kill(&first)).await;
    let new = cluster.leader(1, &queue);
    assert!(new.as_ref().is_some_and(|new| *new != first), "the queue's leader after the kill: {new:?}, was {first}");
    println!(
        "killed the leader {first} after {killed_at} answers; calls sent again by their callers, by error: \
         {retried:?}; {} copies absorbed by the dedup store; new leader {new:?}",
        server.stats().deduplicated
    );
}
