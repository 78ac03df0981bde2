//! Worker processes killed with SIGKILL again and again while calls run, on our broker, RabbitMQ and NATS
//! JetStream: every call is answered, and the effects, counted by an idempotent sink, are each applied once.
//!
//! The sink is a file the worker processes append the idempotency key of each effect to. It is idempotent the
//! way an effect store keyed by idempotency key is: a key it holds twice is one effect applied, the second line
//! an execution it absorbed. A worker killed after the effect and before its ack makes the broker deliver the
//! request again to another worker, whose dedup store (in its own memory) has not seen the key: that is the
//! only way a key runs twice, so re-executions are bounded by what the killed workers held (16 requests each).
//! The test counts calls, kills, lost effects (keys of calls missing from the sink), effects applied (distinct
//! keys) and the re-executions the sink absorbed.

use std::collections::HashMap;
use std::future::IntoFuture;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use mqrpc_tests::service::ProbeClient;
use mqrpc_tests::{AmqpHarness, Available, Harness, NatsHarness, RemoteHarness, WorkerProcess};
use rpc_core::Client;
use uuid::Uuid;

const CALLS: usize = 2_000;
const KILLS: usize = 20;
const WORKERS: usize = 3;
const IN_FLIGHT: usize = 48;

/// A worker process serving the probe service through `url`, its effects going to `sink`.
fn start_worker(url: &str, namespace: &str, name: &str, sink: &Path, stream_prefix: Option<&str>) -> WorkerProcess {
    let mut command = Command::new(env!("CARGO_BIN_EXE_probe-worker"));
    command.args([url, namespace, name, "16"]).env("MQRPC_PROBE_SINK", sink);
    if let Some(prefix) = stream_prefix {
        command.env("MQRPC_PROBE_STREAM_PREFIX", prefix);
    }
    WorkerProcess::spawn(command)
}

/// What a run came to.
#[derive(Debug)]
struct Counts {
    calls: usize,
    answered: usize,
    kills: usize,
    lost: usize,
    applied: usize,
    reexecuted: usize,
}

/// Runs [`CALLS`] calls of `effect` through `harness` while a supervisor kills a worker process (SIGKILL) after
/// every `CALLS / (KILLS + 1)` answers and starts it again.
async fn kill_workers_during_calls(harness: &dyn Harness, url: &str, stream_prefix: Option<&str>) -> Counts {
    let namespace = format!("k{}", Uuid::new_v4().simple());
    let sink = sink_path();
    let start = |n: usize| start_worker(url, &namespace, &format!("w{n}"), &sink, stream_prefix);
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
    while kills < KILLS {
        let target = (kills + 1) * step;
        mqrpc_tests::eventually("calls to progress between kills", Duration::from_secs(120), || {
            answered.load(Ordering::SeqCst) >= target
        })
        .await;
        let victim = kills % WORKERS;
        workers[victim].kill();
        workers[victim] = start(victim);
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
    let _ = std::fs::remove_file(&sink);
    let lost = keys.iter().filter(|key| !applied.contains_key(*key)).count();
    let strangers = applied.keys().filter(|key| !keys.contains(key)).count();
    assert_eq!(strangers, 0, "the sink holds effects of calls nobody made");
    // A keyed sink applies a key once whatever it is sent: each key is one effect; extra lines were absorbed.
    let reexecuted: usize = applied.values().map(|lines| lines - 1).sum();
    let counts = Counts { calls: CALLS, answered: ok, kills, lost, applied: applied.len(), reexecuted };
    eprintln!("{url}: {counts:?}");
    counts
}

fn sink_path() -> PathBuf {
    std::env::temp_dir().join(format!("mqrpc-sink-{}", Uuid::new_v4().simple()))
}

/// Lines per key in the sink.
fn read_sink(path: &Path) -> HashMap<String, usize> {
    let text = std::fs::read_to_string(path).expect("reads the sink");
    let mut lines = HashMap::new();
    for key in text.lines() {
        *lines.entry(key.to_owned()).or_default() += 1;
    }
    lines
}

fn assert_exactly_once(counts: &Counts) {
    assert_eq!((counts.calls, counts.answered, counts.kills), (CALLS, CALLS, KILLS));
    assert_eq!((counts.lost, counts.applied), (0, CALLS), "{counts:?}");
    assert!(counts.reexecuted <= KILLS * 16, "more re-executions than the killed workers held: {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_broker_kill_9_of_workers_twenty_times() {
    let harness = RemoteHarness::start().await;
    let counts = kill_workers_during_calls(&harness, &harness.url(), None).await;
    assert_exactly_once(&counts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_kill_9_of_workers_twenty_times() {
    let Some(harness) = AmqpHarness::from_env().available() else { return };
    let counts = kill_workers_during_calls(&harness, harness.url(), None).await;
    assert_exactly_once(&counts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_kill_9_of_workers_twenty_times() {
    let Some(harness) = NatsHarness::jetstream().available() else { return };
    let prefix = harness.stream_prefix().to_owned();
    let counts = kill_workers_during_calls(&harness, harness.url(), Some(&prefix)).await;
    assert_exactly_once(&counts);
}
