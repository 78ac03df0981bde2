//! The embedded broker's in-process path: a request is handled on the thread that publishes it, within the
//! server's concurrency limit; a call's future stays small enough for malloc's per-thread cache.

use std::future::IntoFuture;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rpc_broker::Embedded;
use rpc_core::{Client, Server};

#[rpc_core::service]
trait Probe {
    /// `n` plus one.
    async fn next(&self, n: u64) -> u64;
    /// Waits `ms` milliseconds, counting the handlers running meanwhile.
    async fn hold(&self, ms: u64) -> u64;
    /// The id of the tokio task the handler runs in.
    async fn task(&self) -> String;
    /// The milliseconds its request had left when the handler started.
    async fn left(&self) -> u64;
}

#[derive(Clone, Default)]
struct Probing {
    running: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
}

impl Probe for Probing {
    async fn next(&self, n: u64) -> u64 {
        n + 1
    }

    async fn hold(&self, ms: u64) -> u64 {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        ms
    }

    async fn task(&self) -> String {
        tokio::task::try_id().map(|id| id.to_string()).unwrap_or_default()
    }

    async fn left(&self) -> u64 {
        let deadline = rpc_core::context::current().and_then(|context| context.deadline);
        deadline.map_or(u64::MAX, |deadline| {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            u64::try_from(left.as_millis()).unwrap_or(u64::MAX)
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_on_the_embedded_broker_is_answered_within_its_first_poll() {
    use futures::FutureExt;

    let broker = Embedded::new();
    let _server = Server::new(broker.clone()).serve(ProbeServer::new(Probing::default())).await.expect("serves");
    let client = Client::connect(broker).await.expect("client");
    for n in 0..50 {
        // The call's first poll publishes; the broker hands the request to the server right there, whose handler
        // answers at once, and the reply is in before the poll returns: no thread or task in between.
        let answered = ProbeClient::new(&client).next(n).into_future().now_or_never();
        assert_eq!(answered.map(|answer| answer.expect("answered")), Some(n + 1), "call {n} waited");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_handled_where_they_are_published_keep_to_the_servers_concurrency() {
    let broker = Embedded::new();
    let probing = Probing::default();
    let server = Server::new(broker.clone())
        .concurrency(3)
        .prefetch(16)
        .serve(ProbeServer::new(probing.clone()))
        .await
        .expect("serves");
    let client = Client::connect(broker).await.expect("client");
    let calls: Vec<_> = (0..24)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { ProbeClient::new(&client).hold(20).await })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.expect("the call ran").expect("answered"), 20);
    }
    let most = probing.most.load(Ordering::SeqCst);
    assert!(most <= 3, "{most} handlers ran at once under a concurrency of 3");
    assert!(most >= 2, "the handlers ran one at a time ({most}): the limit was not what held them");
    let report = server.shutdown(Duration::from_secs(5)).await;
    assert_eq!((report.aborted, report.stats.handled), (0, 24), "{report:?}");
}

#[tokio::test]
async fn a_calls_future_fits_in_mallocs_per_thread_cache() {
    // glibc's malloc serves blocks of up to 1,032 bytes from a cache per thread, without its arena's lock; a
    // call's future is one such block per call. It held the call's envelope twice when it was 1,408 bytes.
    let client = Client::connect(Embedded::new()).await.expect("client");
    let future = ProbeClient::new(&client).next(1).into_future();
    let size = std::mem::size_of_val(&*future);
    assert!(size <= 1_024, "a call's future is {size} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_from_many_threads_outlive_every_clone_of_their_client() {
    let broker = Embedded::new();
    let _server = Server::new(broker.clone()).serve(ProbeServer::new(Probing::default())).await.expect("serves");
    let client = Client::connect(broker).await.expect("client");
    // Calls made on both runtime threads and on threads of their own, each holding its thread's handle of
    // the client rather than a clone of it.
    let mut calls = Vec::new();
    for n in 0..8u64 {
        let client = client.clone();
        // The task makes the call's future on a runtime thread and spawns it; the task and its clone end.
        #[expect(clippy::async_yields_async, reason = "the task hands back the call it spawned, to be awaited here")]
        let spawned = tokio::spawn(async move { tokio::spawn(ProbeClient::new(&client).hold(100 + n).into_future()) });
        calls.push(spawned.await.expect("the call was made"));
    }
    let runtime = tokio::runtime::Handle::current();
    for n in 0..4u64 {
        let client = client.clone();
        let runtime = runtime.clone();
        let call = std::thread::spawn(move || runtime.spawn(ProbeClient::new(&client).hold(200 + n).into_future()));
        calls.push(call.join().expect("the thread made its call"));
    }
    // Every clone of the client goes while the calls wait: they still get their replies.
    drop(client);
    let answers: Vec<u64> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|call| call.expect("the call ran").expect("answered"))
        .collect();
    let expected: Vec<u64> = (100..108).chain(200..204).collect();
    assert_eq!(answers, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_calling_task_that_spent_its_budget_still_has_its_requests_handled_in_it() {
    let broker = Embedded::new();
    let _server = Server::new(broker.clone()).serve(ProbeServer::new(Probing::default())).await.expect("serves");
    let client = Client::connect(broker).await.expect("client");
    let caller = tokio::spawn(async move {
        let probe = ProbeClient::new(&client);
        let mut elsewhere = 0;
        // Each call's reply spends a unit of the task's budget (128 a turn): the calls run through it again
        // and again.
        for _ in 0..1_000 {
            let handled_in = probe.task().await.expect("answered");
            if handled_in != tokio::task::id().to_string() {
                elsewhere += 1;
            }
        }
        elsewhere
    });
    assert_eq!(caller.await.expect("the calls ran"), 0, "requests moved to tasks of their own");
}

#[tokio::test]
async fn a_call_that_waited_for_its_turn_sends_what_is_left_of_its_budget() {
    let broker = Embedded::new();
    let _server = Server::new(broker.clone()).serve(ProbeServer::new(Probing::default())).await.expect("serves");
    // Four calls a second, one at once: the second call's turn comes 250 ms after the first's.
    let client = Client::builder(broker).rate_limit(4, 1).connect().await.expect("client");
    let probe = ProbeClient::new(&client);
    let budget = Duration::from_secs(5);
    let (first, second) =
        tokio::join!(probe.left().timeout(budget).into_future(), probe.left().timeout(budget).into_future());
    let (first, second) = (first.expect("answered"), second.expect("answered"));
    // Sent at once, the first has its budget but for the moment since it was made.
    assert!((4_800..=5_000).contains(&first), "the first call had {first} ms left");
    // The second waited its turn, which its request's deadline counts.
    assert!(second <= 4_760, "the second call had {second} ms left, after a 250 ms wait");
}
