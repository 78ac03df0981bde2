//! Our broker with a data directory, killed with SIGKILL and stopped with SIGTERM while calls and oneway
//! messages run against a durable queue, and started again on the same port and directory each time.
//!
//! The worker and the callers are in this process and stay up; the broker is a process of its own
//! (`probe-worker --broker PORT DATA_DIR`). Callers retry a call with the same idempotency key until it is
//! answered; publishers retry a oneway message with the same key until its publish is confirmed. At the end:
//! every call was answered, every confirmed message was executed, no effect was applied twice (the worker's
//! effects go to a sink file, one line per execution), and the queue is empty.

use std::collections::{HashMap, HashSet};
use std::future::IntoFuture;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use mqrpc_tests::service::{Events, ProbeClient, ProbeServer, Worker};
use mqrpc_tests::{WorkerProcess, eventually, eventually_async};
use rpc_broker::{Remote, RemoteOptions};
use rpc_core::{Client, Error, QueueOptions, Server, Transport, naming};
use uuid::Uuid;

const CALLS: usize = 10_000;
const MESSAGES: usize = 2_000;
const IN_FLIGHT: usize = 64;
const KILLS: usize = 5;
const GRACEFUL: usize = 2;
const SERVICE: &str = "suite.Probe";

/// The broker process on `port` (0: a free one) with `dir`; returns it, its URL and the messages it read back.
fn start_broker(port: u16, dir: &Path) -> (WorkerProcess, String, usize) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_probe-worker"));
    command.arg("--broker").arg(port.to_string()).arg(dir);
    let mut process = WorkerProcess::spawn(command);
    let url = process.line();
    let recovered = process.line().parse().expect("the count of messages read back");
    (process, url, recovered)
}

async fn connect(url: &str) -> Remote {
    let options = RemoteOptions::new().max_backoff(Duration::from_millis(100));
    Remote::connect_with(url, options).await.expect("connects to the broker")
}

/// Whether a call or publish that failed this way may be made again: the broker went away under it.
fn retryable(error: &Error) -> bool {
    matches!(
        error,
        Error::ReplyLost | Error::Disconnected | Error::Timeout(_) | Error::NoRoute(_) | Error::Transport(_)
    )
}

fn temporary(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("mqrpc-{name}-{}", Uuid::new_v4().simple()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_and_restarted_loses_no_confirmed_message_and_applies_each_effect_once() {
    let dir = temporary("data");
    let sink = temporary("sink");
    let (mut broker, url, _) = start_broker(0, &dir);
    let port: u16 = url.rsplit(':').next().and_then(|port| port.parse().ok()).expect("the broker's port");
    let namespace = format!("d{}", Uuid::new_v4().simple());

    // The worker: a durable service queue, its effects appended to the sink.
    let events = Arc::new(Events::default());
    let file = std::fs::OpenOptions::new().create(true).append(true).open(&sink).expect("opens the sink");
    *events.sink.lock().expect("not poisoned") = Some(file);
    let worker = Worker { name: "w".into(), events: Arc::clone(&events), client: None };
    let worker_transport = connect(&url).await;
    let _server = Server::new(worker_transport)
        .namespace(&namespace)
        .queue_options(QueueOptions::new().durable(true))
        .concurrency(IN_FLIGHT)
        .prefetch(IN_FLIGHT as u32)
        .serve(ProbeServer::new(worker))
        .await
        .expect("the worker serves");

    let client = Client::builder(connect(&url).await)
        .namespace(&namespace)
        .default_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("the client connects");
    let answered = Arc::new(AtomicUsize::new(0));
    let retries = Arc::new(AtomicUsize::new(0));

    // Calls, each retried with its key until answered.
    let calls = {
        let (client, answered, retries) = (client.clone(), Arc::clone(&answered), Arc::clone(&retries));
        tokio::spawn(
            futures::stream::iter(0..CALLS)
                .map(move |n| {
                    let (client, answered, retries) = (client.clone(), Arc::clone(&answered), Arc::clone(&retries));
                    async move {
                        let key = format!("call-{n}");
                        let probe = ProbeClient::new(&client);
                        let result = loop {
                            match probe.effect(n as i64).idempotency_key(&key).into_future().await {
                                Err(error) if retryable(&error) => {
                                    retries.fetch_add(1, Ordering::Relaxed);
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                }
                                other => break other,
                            }
                        };
                        answered.fetch_add(1, Ordering::SeqCst);
                        (n, result)
                    }
                })
                .buffer_unordered(IN_FLIGHT)
                .collect::<Vec<_>>(),
        )
    };

    // Oneway messages, each published again with its key until its publish is confirmed.
    let confirmed = Arc::new(Mutex::new(HashSet::new()));
    let publishes = {
        let (client, confirmed, retries) = (client.clone(), Arc::clone(&confirmed), Arc::clone(&retries));
        tokio::spawn(
            futures::stream::iter(0..MESSAGES)
                .map(move |n| {
                    let (client, confirmed, retries) = (client.clone(), Arc::clone(&confirmed), Arc::clone(&retries));
                    async move {
                        let probe = ProbeClient::new(&client);
                        loop {
                            match probe.record(n as i64).idempotency_key(format!("record-{n}")).await {
                                Ok(()) => break,
                                Err(error) if retryable(&error) => {
                                    retries.fetch_add(1, Ordering::Relaxed);
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                }
                                Err(error) => panic!("message {n} refused: {error}"),
                            }
                        }
                        confirmed.lock().expect("not poisoned").insert(n as i64);
                    }
                })
                .buffer_unordered(16)
                .collect::<Vec<_>>(),
        )
    };

    // The supervisor: after every step of answers the broker goes (kill -9, or SIGTERM for the graceful ones)
    // and comes back on the same port with the same directory.
    let disruptions = KILLS + GRACEFUL;
    let step = CALLS / (disruptions + 1);
    let mut recovered = Vec::new();
    for round in 0..disruptions {
        let target = step * (round + 1);
        eventually("answers to come in", Duration::from_secs(120), || answered.load(Ordering::SeqCst) >= target).await;
        let graceful = round % 3 == 1 && round / 3 < GRACEFUL;
        let (next, _, read_back) = if graceful {
            broker.stop();
            start_broker(port, &dir)
        } else {
            broker.kill();
            drop(broker);
            start_broker(port, &dir)
        };
        broker = next;
        recovered.push(read_back);
    }

    let results = tokio::time::timeout(Duration::from_secs(300), calls).await.expect("the calls end").expect("joins");
    tokio::time::timeout(Duration::from_secs(120), publishes).await.expect("the publishes end").expect("joins");
    let failed: Vec<_> = results.iter().filter(|(_, result)| result.is_err()).collect();
    assert!(failed.is_empty(), "{} calls failed, for example {:?}", failed.len(), failed.first());
    for (n, result) in &results {
        assert_eq!(result.as_ref().ok(), Some(&(*n as i64)));
    }

    // Every confirmed message runs, once.
    let confirmed: HashSet<i64> = confirmed.lock().expect("not poisoned").clone();
    assert_eq!(confirmed.len(), MESSAGES);
    eventually("every confirmed message to run", Duration::from_secs(60), || {
        let recorded: HashSet<i64> = events.recorded().into_iter().collect();
        confirmed.is_subset(&recorded)
    })
    .await;
    let recorded = events.recorded();
    let distinct: HashSet<i64> = recorded.iter().copied().collect();
    let lost = confirmed.difference(&distinct).count();

    // Every call's effect is in the sink, once.
    let text = std::fs::read_to_string(&sink).expect("reads the sink");
    let mut lines: HashMap<&str, usize> = HashMap::new();
    for line in text.lines() {
        *lines.entry(line.split(' ').next().unwrap_or_default()).or_default() += 1;
    }
    let applied = (0..CALLS).filter(|n| lines.contains_key(format!("call-{n}").as_str())).count();
    let twice = lines.values().filter(|count| **count > 1).count();

    // The queue is empty once the last acks are in.
    let observer = connect(&format!("mqrpc://127.0.0.1:{port}")).await;
    let queue = naming::service_queue(Some(&namespace), SERVICE);
    eventually_async("the durable queue to empty", Duration::from_secs(30), || async {
        observer.queue_stats(&queue).await.is_ok_and(|stats| stats.ready == 0 && stats.unacked == 0)
    })
    .await;
    let stats = observer.queue_stats(&queue).await.expect("stats");
    println!(
        "broker kills: {KILLS}, graceful restarts: {GRACEFUL}, messages read back at each start {recovered:?}; calls {CALLS}: answered {}, effects applied {applied}, \
         applied twice {twice}; oneway messages {MESSAGES}: confirmed {}, lost {lost}, run twice {}; retries {}; \
         queue after: {stats:?}",
        results.len(),
        confirmed.len(),
        recorded.len() - distinct.len(),
        retries.load(Ordering::Relaxed),
    );
    assert_eq!(applied, CALLS, "effects lost");
    assert_eq!(twice, 0, "effects applied twice");
    assert_eq!(lost, 0, "confirmed messages lost");
    assert_eq!(recorded.len(), distinct.len(), "messages run twice");
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&sink);
}
