//! A worker process cut off from our broker by a real network partition. The worker runs in a network namespace
//! of its own, joined to the host by a veth pair; the broker listens on the host's end of the pair (with a
//! token, as a non-loopback address requires), and the test cuts the link with `ip link set down`.
//!
//! - A cut shorter than the calls' deadline and than the heartbeats that hold the worker's deliveries: TCP
//!   carries the frames across once the link is back, and every call succeeds.
//! - A cut longer than the deadline: the broker drops the silent worker's connection and requeues what it held,
//!   and each call fails with `Timeout` by its deadline + 250 ms. Once the link is back, the worker reconnects
//!   and calls succeed again.
//!
//! The namespaces need root (`ip netns`); a build by another user ignores these tests. CI runs as root.

use std::future::IntoFuture;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use futures::future::join_all;
use mqrpc_tests::WorkerProcess;
use mqrpc_tests::service::ProbeClient;
use rpc_broker::Remote;
use rpc_broker::server::{BrokerServer, ServerConfig};
use rpc_core::{Client, Error};
use uuid::Uuid;

const TOKEN: &str = "partition-secret";
/// How far past its deadline a call may fail.
const SLACK: Duration = Duration::from_millis(250);
const WAIT: Duration = Duration::from_secs(30);

/// Runs `ip` with `args`; panics naming the command if it fails.
fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("runs ip");
    assert!(status.success(), "`ip {}` failed: {status}", args.join(" "));
}

/// A network namespace joined to the host by a veth pair on `10.213.<subnet>.0/24`: the host's end is `.1`,
/// the namespace's `.2`. Removed (with the pair) when dropped.
struct Partition {
    namespace: String,
    host_link: String,
    subnet: u8,
}

impl Partition {
    /// A namespace with its link (root only: the tests are built ignored otherwise).
    fn create(subnet: u8) -> Partition {
        let tag = format!("{}{subnet}", std::process::id() % 100_000);
        let partition = Partition { namespace: format!("mqrpc-{tag}"), host_link: format!("mqh{tag}"), subnet };
        let inner_link = format!("mqn{tag}");
        ip(&["netns", "add", &partition.namespace]);
        ip(&["link", "add", &partition.host_link, "type", "veth", "peer", "name", &inner_link]);
        ip(&["link", "set", &inner_link, "netns", &partition.namespace]);
        ip(&["addr", "add", &format!("{}/24", partition.host()), "dev", &partition.host_link]);
        ip(&["link", "set", &partition.host_link, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &partition.namespace, "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        inside(&["addr", "add", &format!("10.213.{subnet}.2/24"), "dev", &inner_link]);
        inside(&["link", "set", &inner_link, "up"]);
        inside(&["link", "set", "lo", "up"]);
        partition
    }

    /// The host's address on the pair.
    fn host(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.subnet, 1)
    }

    /// A `probe-worker` inside the namespace, serving through the broker at `url`.
    fn worker(&self, url: &str, namespace: &str) -> WorkerProcess {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.namespace, env!("CARGO_BIN_EXE_probe-worker"), url, namespace, "w", "16"]);
        WorkerProcess::spawn(command)
    }

    fn cut(&self) {
        ip(&["link", "set", &self.host_link, "down"]);
    }

    fn heal(&self) {
        ip(&["link", "set", &self.host_link, "up"]);
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        // Deleting the namespace deletes the pair with it; the host's end is deleted too in case the
        // namespace was not made.
        let quiet = |args: &[&str]| {
            let _ = Command::new("ip").args(args).stderr(std::process::Stdio::null()).status();
        };
        quiet(&["netns", "del", &self.namespace]);
        quiet(&["link", "del", &self.host_link]);
    }
}

/// Our broker on the host's end of `partition`, with heartbeats every 250 ms (a connection silent for 750 ms
/// is dropped), a client on the host, and a worker in the namespace.
async fn setup(partition: &Partition) -> (BrokerServer, Client, WorkerProcess) {
    let mut config = ServerConfig::default();
    config.token = Some(TOKEN.to_owned());
    config.heartbeat = Duration::from_millis(250);
    let broker = BrokerServer::bind(SocketAddr::from((partition.host(), 0)), config).await.expect("the broker starts");
    let url = format!("mqrpc://{TOKEN}@{}", broker.local_addr());
    let namespace = format!("n{}", Uuid::new_v4().simple());
    let worker = partition.worker(&url, &namespace);
    let transport = Remote::connect(&url).await.expect("the client connects");
    let client = Client::builder(transport).namespace(namespace).connect().await.expect("the client starts");
    (broker, client, worker)
}

/// Runs `calls` calls of a 20 ms `work` with `deadline`, all at once, and returns their results with how long
/// each took.
async fn calls(client: &Client, calls: usize, deadline: Duration) -> Vec<(Result<u64, Error>, Duration)> {
    let probe = ProbeClient::new(client);
    join_all((0..calls).map(|_| {
        let call = probe.work(20).timeout(deadline).into_future();
        async move {
            let started = Instant::now();
            let result = call.await;
            (result, started.elapsed())
        }
    }))
    .await
}

/// Calls per second of `count` calls run 32 at a time, all of which must succeed.
async fn throughput(client: &Client, count: usize) -> f64 {
    let started = Instant::now();
    for _ in 0..count / 32 {
        for (result, _) in calls(client, 32, WAIT).await {
            assert_eq!(result.expect("answered"), 20);
        }
    }
    count as f64 / started.elapsed().as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_root), ignore = "needs root for network namespaces (ip netns)")]
async fn calls_survive_a_partition_shorter_than_their_deadline() {
    let partition = Partition::create(1);
    let (_broker, client, _worker) = setup(&partition).await;
    let before = throughput(&client, 256).await;
    let probe = ProbeClient::new(&client);
    // Calls in flight across the cut, and calls made during it.
    let caller = client.clone();
    let across = tokio::spawn(async move { calls(&caller, 32, Duration::from_secs(3)).await });
    partition.cut();
    let during = join_all((0..16).map(|_| probe.work(20).timeout(Duration::from_secs(3)).into_future()));
    let (during, ()) = tokio::join!(during, async {
        // The cut itself: shorter than the 750 ms after which the broker drops a silent connection.
        tokio::time::sleep(Duration::from_millis(400)).await;
        partition.heal();
    });
    for result in during {
        assert_eq!(result.expect("a call made during a short cut succeeds"), 20);
    }
    for (result, _) in across.await.expect("joins") {
        assert_eq!(result.expect("a call in flight across a short cut succeeds"), 20);
    }
    let after = throughput(&client, 256).await;
    eprintln!("short cut: {before:.0} calls/s before, {after:.0} after");
    assert_eq!(client.stats().pending, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_root), ignore = "needs root for network namespaces (ip netns)")]
async fn calls_fail_by_their_deadline_during_a_longer_partition_and_recover_after() {
    const DEADLINE: Duration = Duration::from_secs(1);
    let partition = Partition::create(2);
    let (_broker, client, _worker) = setup(&partition).await;
    let before = throughput(&client, 256).await;
    partition.cut();
    let cut_at = Instant::now();
    // The cut lasts past these calls' deadline: each fails with a typed error, in time.
    let failed = calls(&client, 32, DEADLINE).await;
    for (result, took) in &failed {
        assert!(matches!(result, Err(Error::Timeout(_))), "expected Timeout, got {result:?}");
        assert!(*took <= DEADLINE + SLACK, "a call failed {took:?} after it started, past its deadline + {SLACK:?}");
    }
    // Long enough for the broker to drop the worker, and the worker to give up on the broker.
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(cut_at.elapsed())).await;
    partition.heal();
    let healed = Instant::now();
    // The worker reconnects with its backoff; the first call that succeeds shows it is back.
    let probe = ProbeClient::new(&client);
    let back = loop {
        match probe.work(20).timeout(Duration::from_secs(2)).await {
            Ok(20) => break healed.elapsed(),
            Ok(other) => panic!("work answered {other}"),
            Err(Error::Timeout(_)) => assert!(healed.elapsed() < WAIT, "the worker did not come back"),
            Err(error) => panic!("unexpected error after healing: {error}"),
        }
    };
    let after = throughput(&client, 256).await;
    eprintln!(
        "long cut: {} calls failed with Timeout within {DEADLINE:?} + {SLACK:?}; worker back {back:?} after \
         healing; {before:.0} calls/s before, {after:.0} after",
        failed.len()
    );
    assert_eq!(client.stats().pending, 0);
}
