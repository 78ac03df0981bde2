//! What calls that time out or are dropped leave behind in the client: nothing. This test binary holds one
//! test so that its process is the client alone: the broker and the worker are processes of their own
//! (`probe-worker --broker` and `probe-worker`), and the process's resident set is the client's.
//!
//! Rounds of 50,000 calls with a 50 ms deadline to a handler that takes 200 ms, and 10,000 more dropped by their
//! callers 5 ms after they start: two rounds to warm up, three measured. Then the client's pending map is empty,
//! the worker runs no handler a second later, and the client's resident set is within 5 MiB of where the
//! measured rounds started: a leak of 30 bytes a call would show. The warm-up is two whole rounds because the
//! allocator's working set grows to the workload's high-water mark in the first rounds (12 MiB after the first,
//! 15 MiB after the second, flat from there over ten rounds), which a smaller warm-up leaves to the measured
//! rounds.

use std::future::IntoFuture;
use std::process::Command;
use std::time::{Duration, Instant};

use futures::StreamExt;
use mqrpc_tests::WorkerProcess;
use mqrpc_tests::service::ProbeClient;
use rpc_broker::Remote;
use rpc_core::{Client, Error, Transport, naming};
use uuid::Uuid;

/// Calls that time out, per round.
const TIMED_OUT: usize = 50_000;
/// Calls dropped by their callers, per round.
const DROPPED: usize = 10_000;
/// Rounds of the warm-up.
const WARM_UP: usize = 2;
/// Rounds measured.
const ROUNDS: usize = 3;
/// Calls in flight at once.
const IN_FLIGHT: usize = 2_000;
/// Calls in flight at once while they are dropped: fewer, so that the caller's task comes back to each within
/// the 5 ms after which it drops it.
const DROPPING: usize = 200;
/// The deadline of each call.
const DEADLINE: Duration = Duration::from_millis(50);
/// How long the handler would take.
const HANDLER_MS: u64 = 200;
/// How far the client's resident set may end above where it started.
const MARGIN: u64 = 5 * 1024 * 1024;

/// This process's resident set, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("reads /proc/self/status");
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).expect("a VmRSS line");
    let kib: u64 = line.split_whitespace().nth(1).and_then(|kib| kib.parse().ok()).expect("a size in kB");
    kib * 1024
}

/// `calls` calls that time out, `IN_FLIGHT` at a time; every one must fail with `Timeout`, but for a few on a
/// host that stalls both processes past the handler's time (seen once, on a loaded VM): a worker's runtime woken
/// late can find the handler done as its deadline passes and answer, and a caller's woken late can find that
/// answer there with its own deadline past. At most one call in a thousand.
async fn time_out(probe: &ProbeClient, calls: usize) {
    let outcomes = futures::stream::iter(0..calls)
        .map(|_| probe.work(HANDLER_MS).timeout(DEADLINE).into_future())
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<_>>()
        .await;
    let mut answered_late = 0;
    for outcome in outcomes {
        match outcome {
            Err(Error::Timeout(_)) => {}
            Ok(millis) if millis == HANDLER_MS => answered_late += 1,
            other => panic!("{other:?}"),
        }
    }
    assert!(answered_late * 1_000 <= calls, "{answered_late} of {calls} calls answered past their deadline");
}

/// `calls` calls dropped by their callers 5 ms after they start; returns how many were dropped (a caller's
/// task that is not polled for longer than the deadline sees the call time out before it can drop it).
async fn drop_calls(probe: &ProbeClient, calls: usize) -> usize {
    let outcomes = futures::stream::iter(0..calls)
        .map(|_| {
            let call = probe.work(HANDLER_MS).timeout(DEADLINE).into_future();
            async move { tokio::time::timeout(Duration::from_millis(5), call).await }
        })
        .buffer_unordered(DROPPING)
        .collect::<Vec<_>>()
        .await;
    let mut dropped = 0;
    for outcome in outcomes {
        match outcome {
            Err(_) => dropped += 1,
            Ok(result) => assert!(matches!(result, Err(Error::Timeout(_))), "{result:?}"),
        }
    }
    dropped
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_and_dropped_calls_leave_nothing_behind() {
    let mut broker = WorkerProcess::spawn({
        let mut command = Command::new(env!("CARGO_BIN_EXE_probe-worker"));
        command.arg("--broker");
        command
    });
    let url = broker.line();
    let namespace = format!("m{}", Uuid::new_v4().simple());
    let worker = WorkerProcess::spawn({
        let mut command = Command::new(env!("CARGO_BIN_EXE_probe-worker"));
        command.args([url.as_str(), namespace.as_str(), "w0", "16"]);
        command
    });
    let transport = Remote::connect(&url).await.expect("connects");
    let client = Client::builder(transport.clone()).namespace(&namespace).connect().await.expect("client");
    let probe = ProbeClient::new(&client);

    for _ in 0..WARM_UP {
        time_out(&probe, TIMED_OUT).await;
        drop_calls(&probe, DROPPED).await;
    }
    let start = rss();
    let started = Instant::now();
    let mut dropped = 0;
    for _ in 0..ROUNDS {
        time_out(&probe, TIMED_OUT).await;
        dropped += drop_calls(&probe, DROPPED).await;
    }
    let took = started.elapsed();
    let end = rss();
    let pending = client.stats().pending;
    let ended = Instant::now();

    // A second after the last call, the worker holds no request and runs no handler.
    let queue = naming::service_queue(Some(&namespace), "suite.Probe");
    let mut idle_after = None;
    while ended.elapsed() < Duration::from_secs(1) {
        let stats = transport.queue_stats(&queue).await.expect("queue stats");
        if stats.ready == 0 && stats.unacked == 0 {
            idle_after = Some(ended.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = worker.terminate();
    broker.kill();
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    eprintln!(
        "{ROUNDS} rounds of {TIMED_OUT} timed-out calls and {DROPPED} calls to drop ({dropped} dropped) in {took:.1?}: client RSS {:.1} MiB -> {:.1} MiB, \
         pending {pending}, worker idle after {idle_after:?}; worker {report:?}",
        mib(start),
        mib(end),
    );
    assert!(
        dropped >= ROUNDS * DROPPED * 9 / 10,
        "only {dropped} of {} calls were dropped before they timed out",
        ROUNDS * DROPPED
    );
    assert_eq!(pending, 0, "calls left in the pending map");
    assert!(idle_after.is_some(), "the worker still held requests a second after the last call");
    assert_eq!(report["work_running"], 0, "a handler still ran: {report:?}");
    assert_eq!((report["finished"], report["aborted"]), (0, 0), "handlers ran at shutdown: {report:?}");
    assert!(end <= start + MARGIN, "client RSS grew from {:.1} MiB to {:.1} MiB", mib(start), mib(end));
}
