//! Replicated engines, started by the tests on loopback: a NATS cluster of three servers with JetStream and a
//! service stream of three replicas, and a RabbitMQ cluster of three nodes with the service queue a quorum
//! queue. The stream's or the queue's leader is killed (`kill -9`) in the middle of 2,000 calls: every call is
//! answered before its deadline, each key runs once (the dedup store absorbs the copies that come again), and
//! the stream or queue gets a new leader on another server.

use std::collections::HashMap;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
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

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|listener| listener.local_addr()).expect("a free port").port()
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
    let new = leader(&observer, &queue).await;
    assert!(new.as_ref().is_some_and(|new| *new != first), "the stream's leader after the kill: {new:?}, was {first}");
    println!(
        "killed the leader {first} after {killed_at} answers; calls sent again by their callers, by error: \
         {retried:?}; {} copies absorbed by the dedup store; new leader {new:?}",
        server.stats().deduplicated
    );
}

/// Three RabbitMQ nodes of the test's own (names `mqrpc<id>-a@localhost` and so on, ports of their own, no
/// plugins, a cookie in a home directory of their own), joined into one cluster.
struct RabbitCluster {
    directory: tempfile::TempDir,
    bin: std::path::PathBuf,
    nodes: Vec<(String, u16)>,
    /// The `rabbitmq-server` scripts that started the nodes.
    scripts: Vec<Child>,
}

impl RabbitCluster {
    fn start(bin: &str) -> RabbitCluster {
        let directory = tempfile::tempdir().expect("a directory");
        let bin = std::path::PathBuf::from(bin);
        let home = directory.path().join("home");
        std::fs::create_dir_all(&home).expect("a home");
        let cookie = home.join(".erlang.cookie");
        std::fs::write(&cookie, Uuid::new_v4().simple().to_string().to_uppercase()).expect("a cookie");
        std::fs::set_permissions(&cookie, std::os::unix::fs::PermissionsExt::from_mode(0o400)).expect("private");
        let id = &Uuid::new_v4().simple().to_string()[..8];
        let mut cluster = RabbitCluster { directory, bin, nodes: Vec::new(), scripts: Vec::new() };
        for name in ["a", "b", "c"] {
            let (port, distribution) = (free_port(), free_port());
            let node = format!("mqrpc{id}-{name}@localhost");
            let dir = cluster.directory.path().join(name);
            std::fs::create_dir_all(&dir).expect("a node directory");
            std::fs::write(dir.join("enabled_plugins"), "").expect("writes");
            let config = format!("listeners.tcp.default = 127.0.0.1:{port}\nloopback_users = none\n");
            std::fs::write(dir.join("rabbitmq.conf"), config).expect("writes");
            let script = Command::new(cluster.bin.join("rabbitmq-server"))
                .env("HOME", &home)
                .env("RABBITMQ_NODENAME", &node)
                .env("RABBITMQ_NODE_PORT", port.to_string())
                .env("RABBITMQ_DIST_PORT", distribution.to_string())
                .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
                .env("RABBITMQ_LOG_BASE", dir.join("log"))
                .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
                .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"))
                .env("RABBITMQ_PID_FILE", dir.join("pid"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("rabbitmq-server runs");
            cluster.scripts.push(script);
            cluster.nodes.push((node, port));
        }
        for (n, name) in ["a", "b", "c"].iter().enumerate() {
            let pid = cluster.directory.path().join(name).join("pid");
            let node = cluster.nodes[n].0.clone();
            cluster.ctl(&node, &["wait", &pid.to_string_lossy(), "--timeout", "120"]);
        }
        let first = cluster.nodes[0].0.clone();
        for (node, _) in &cluster.nodes[1..] {
            cluster.ctl(node, &["stop_app"]);
            cluster.ctl(node, &["join_cluster", &first]);
            cluster.ctl(node, &["start_app"]);
        }
        cluster
    }

    /// `rabbitmqctl -n node args`, which must succeed; its output.
    fn ctl(&self, node: &str, args: &[&str]) -> String {
        let output = Command::new(self.bin.join("rabbitmqctl"))
            .env("HOME", self.directory.path().join("home"))
            .args(["-n", node])
            .args(args)
            .output()
            .expect("rabbitmqctl runs");
        assert!(output.status.success(), "rabbitmqctl -n {node} {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn url(&self, n: usize) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.nodes[n].1)
    }

    /// The node that leads quorum queue `queue`, asked of node `n`.
    fn leader(&self, n: usize, queue: &str) -> Option<String> {
        let listed = self.ctl(&self.nodes[n].0, &["list_queues", "-q", "--no-table-headers", "name", "leader"]);
        listed.lines().find_map(|line| {
            let mut columns = line.split_whitespace();
            (columns.next() == Some(queue)).then(|| columns.next().map(str::to_owned)).flatten()
        })
    }

    /// Kills node `node`'s Erlang VM with SIGKILL.
    fn kill(&self, node: &str) {
        let n = self.nodes.iter().position(|(name, _)| name == node).expect("a node of the cluster");
        let pid = std::fs::read_to_string(self.directory.path().join(["a", "b", "c"][n]).join("pid")).expect("its pid");
        let killed = Command::new("kill").args(["-9", pid.trim()]).status().expect("kill runs");
        assert!(killed.success(), "kill -9 {pid}");
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        for name in ["a", "b", "c"] {
            if let Ok(pid) = std::fs::read_to_string(self.directory.path().join(name).join("pid")) {
                let _ = Command::new("kill").args(["-9", pid.trim()]).stderr(Stdio::null()).status();
            }
        }
        for script in &mut self.scripts {
            let _ = script.kill();
            let _ = script.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_rabbitmq_bin), ignore = "needs RabbitMQ's own scripts: MQRPC_RABBITMQ_BIN (bash .ci/brokers)")]
async fn calls_survive_the_kill_of_a_quorum_queues_leader_in_a_three_node_cluster() {
    let cluster = RabbitCluster::start(&mqrpc_tests::required_url("MQRPC_RABBITMQ_BIN"));
    let options = || AmqpOptions::new().quorum(true);
    let namespace = format!("replicated{}", &Uuid::new_v4().simple().to_string()[..8]);
    let queue = rpc_core::naming::service_queue(Some(&namespace), "Ledger");
    // The queue is declared through node a, which makes its leader there; worker and caller use node b.
    let declaring = Amqp::connect_with(&cluster.url(0), options()).await.expect("connects to node a");
    rpc_core::Transport::declare_queue(&declaring, &queue, &rpc_core::QueueOptions::new()).await.expect("declares");
    let first = cluster.leader(1, &queue).expect("the queue has a leader");
    assert_eq!(first, cluster.nodes[0].0, "declared through node a");

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
