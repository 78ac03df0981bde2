//! The scenarios. Each takes a [`Harness`], works in a namespace of its own (so scenarios can share a broker
//! and run in parallel) and asserts what a user of the framework relies on.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use std::future::IntoFuture;

use futures::future::join_all;
use rpc_core::transport::Confirm;
use rpc_core::{
    Cancellation, Client, Code, ConsumeOptions, DurableCallbacks, Envelope, Error, Kind, QueueOptions, RetryPolicy,
    Server, ServerHandle, Transport, naming,
};
use uuid::Uuid;

use crate::service::{Events, MathError, ProbeClient, ProbeServer, Worker};
use crate::{Harness, eventually, eventually_async};

/// Every scenario of the suite, by name.
pub const SCENARIOS: &[&str] = crate::scenarios!(names);

const SERVICE: &str = "suite.Probe";

/// Whether the broker holds a message until a consumer acks it. Core NATS holds nothing: a message nobody
/// consumes at the moment it is published is gone, so the scenarios that need a queue assert a typed refusal.
fn holds_messages(transport: &dyn Transport) -> bool {
    transport.capabilities().acks
}
const WAIT: Duration = Duration::from_secs(20);

/// One scenario's view of the broker: a namespace of its own and helpers to start clients and workers.
struct Setup<'h> {
    harness: &'h dyn Harness,
    namespace: String,
}

impl<'h> Setup<'h> {
    fn new(harness: &'h dyn Harness) -> Setup<'h> {
        Setup { harness, namespace: format!("t{}", Uuid::new_v4().simple()) }
    }

    async fn transport(&self) -> Arc<dyn Transport> {
        self.harness.connect().await
    }

    async fn client(&self) -> Client {
        Client::builder(self.transport().await).namespace(&self.namespace).connect().await.expect("client connects")
    }

    fn server(&self, transport: Arc<dyn Transport>) -> Server {
        Server::new(transport).namespace(&self.namespace)
    }

    async fn worker(&self, name: &str) -> (ServerHandle, Arc<Events>) {
        self.worker_with(name, |server| server).await
    }

    async fn worker_with(&self, name: &str, configure: impl FnOnce(Server) -> Server) -> (ServerHandle, Arc<Events>) {
        let events = Arc::new(Events::default());
        let worker = Worker { name: name.to_owned(), events: Arc::clone(&events), client: None };
        let server = configure(self.server(self.transport().await));
        (server.serve(ProbeServer::new(worker)).await.expect("server starts"), events)
    }

    fn queue(&self) -> String {
        naming::service_queue(Some(&self.namespace), SERVICE)
    }
}

/// Results of the method's type and the method's own error type both arrive typed.
pub async fn typed_results_and_typed_errors(harness: &dyn Harness) {
    let setup = Setup::new(harness);
    let (_server, _) = setup.worker("w").await;
    let probe = ProbeClient::new(&setup.client().await);
    assert_eq!(probe.add(2, 3).await.expect("add"), 5);
    assert_eq!(probe.div(6, 3).await.expect("div"), Ok(2));
    assert_eq!(probe.div(1, 0).await.expect("div"), Err(MathError::DivideByZero));
    assert_eq!(probe.div(7, 2).await.expect("div"), Err(MathError::NotExact { remainder: 1 }));
    assert_eq!(probe.whoami().await.expect("whoami"), ("w".to_owned(), 1));
}

/// A method the service does not have is answered with `UnknownMethod`, not a timeout.
pub async fn unknown_method(harness: &dyn Harness) {
    let setup = Setup::new(harness);
    let (_server, _) = setup.worker("w").await;
    let client = setup.client().await;
    let args = rpc_core::codec::encode(&BTreeMap::<String, i64>::new()).expect("encodes");
    match client.request(SERVICE, "no_such_method", args).timeout(WAIT).await {
        Err(Error::Remote(status)) => {
            assert_eq!(status.code(), Code::UnknownMethod);
            assert!(status.message().contains("no_such_method"), "{status}");
        }
        other => panic!("expected an unknown-method status, got {other:?}"),
    }
    let bad_args = rpc_core::codec::encode(&BTreeMap::from([("a", "text")])).expect("encodes");
    match client.request(SERVICE, "add", bad_args).timeout(WAIT).await {
        Err(Error::Remote(status)) => assert_eq!(status.code(), Code::InvalidArgument),
        other => panic!("expected an invalid-argument status, got {other:?}"),
    }
}

/// A call that gets no reply in time fails with `Timeout`, and its pending entry is gone.
pub async fn timeout_leaves_no_pending_call(harness: &dyn Harness) {
    let setup = Setup::new(harness);
    let (_server, events) = setup.worker("w").await;
    let client = setup.client().await;
    let probe = ProbeClient::new(&client);
    let calls = (0..20).map(|_| probe.gate().timeout(Duration::from_millis(100)).into_future());
    for result in join_all(calls).await {
        assert!(matches!(result, Err(Error::Timeout(_))), "{result:?}");
    }
    assert_eq!(client.stats().pending, 0);
    assert_eq!(probe.add(1, 2).await.expect("add"), 3);
    assert_eq!(client.stats().pending, 0);
    events.gate.notify_waiters();
}

/// A reply that arrives after its call timed out is dropped and counted, not leaked.
pub async fn late_reply_is_dropped_and_counted(harness: &dyn Harness) {
    let setup = Setup::new(harness);
    let transport = setup.transport().await;
    transport.declare_queue(&setup.queue(), &QueueOptions::new()).await.expect("declares");
    // A hand-written worker that answers only after the caller gave up.
    let mut slow_worker = transport.consume(&setup.queue(), ConsumeOptions::new()).await.expect("consumes");
    let client = setup.client().await;
    let probe = ProbeClient::new(&client);
    // The worker takes the request while the call waits (a transport may drop a request whose deadline passed
    // before a worker took it), and answers once the call has timed out.
    let call = tokio::spawn(probe.add(1, 2).timeout(Duration::from_millis(300)).into_future());
    let request = tokio::time::timeout(WAIT, slow_worker.next()).await.expect("delivered").expect("open");
    let result = call.await.expect("the call's task");
    assert!(matches!(result, Err(Error::Timeout(_))), "{result:?}");
    assert_eq!(client.stats().pending, 0);
    let reply_to = request.envelope.reply_to.clone().expect("a reply address");
    let reply = request.envelope.reply(Ok(rpc_core::codec::encode(&3i64).expect("encodes")));
    transport
        .publish(reply_to.address(), reply, Confirm::for_reply(&reply_to))
        .await
        .expect("the late reply is published");
    request.handle.ack().await.expect("acks");
    eventually("the late reply to be counted", WAIT, || client.stats().late_replies == 1).await;
    assert_eq!(client.stats().pending, 0);
    // The client goes on working. A broker that holds no message (core NATS) may still route the first call
    // to the hand-written worker, whose unsubscription travels on another connection: that call is lost and
    // timed out, and the next one is answered.
    let (_server, _) = setup.worker("w").await;
    drop(slow_worker);
    eventually_async("a call to be answered by the new worker", WAIT * 2, || async {
        probe.add(2, 2).timeout(Duration::from_secs(5)).await.ok() == Some(4)
    })
    .await;
    assert_eq!(client.stats().late_replies, 1);
}

/// 10,000 calls in flight at once are all answered, each with its own result.
pub async fn ten_thousand_concurrent_calls(harness: &dyn Harness) {
    let setup = Setup::new(harness);
    let (_a, _) = setup.worker_with("a", |server| server.concurrency(256).prefetch(512)).await;
    let (_b, _) = setup.worker_with("b", |server| server.concurrency(256).prefetch(512)).await;
    let client = setup.client().await;
    let probe = ProbeClient::new(&client);
    let calls = (0..10_000i64).map(|n| probe.add(n, n).timeout(Duration::from_secs(60)).into_future());
    let results = join_all(calls).await;
    for (n, result) in results.into_iter().enumerate() {
        assert_eq!(result.expect("answered"), 2 * n as i64);
    }
    assert_eq!(client.stats().pending, 0);
}

/// A panic in a handler becomes an `Internal` error reply, and the worker goes on serving.
pub async fn panicking_handler_becomes_an_error_reply(harness: &dyn Harness) {
    let setup = Setup::new(harness);
    let (server, _) = setup.worker_with("w", |server| server.concurrency(1)).await;
    let probe = ProbeClient::new(&setup.client().await);
    for _ in 0..3 {
        match probe.boom().await {
            Err(Error::Remote(status)) => {
                assert_eq!(status.code(), Code::Internal);
                assert!(status.message().contains("boom on purpose"), "{status}");
            }
            other => panic!("expected an internal-error status, got {other:?}"),
        }
    }
    assert_eq!(probe.add(20, 22).await.expect("the worker lives on"), 42);
    assert_eq!(server.stats().panicked, 3);
}

/// Requests held unacked by a worker that disappears are redelivered to another worker, as a new attempt.
pub async fn redelivery_when_a_worker_disappears(harness: &dyn Harness) {
    let setup = Setup::new(harness);
    let transport = setup.transport().await;
    transport.declare_queue(&setup.queue(), &QueueOptions::new()).await.expect("declares");
    let mut doomed = transport.consume(&setup.queue(), ConsumeOptions::new().prefetch(5)).await.expect("consumes");
    let probe = ProbeClient::new(&setup.client().await);
    let calls: Vec<_> = (0..5).map(|_| tokio::spawn(probe.whoami().timeout(WAIT).into_future())).collect();
    for _ in 0..5 {
        let delivery = tokio::time::timeout(WAIT, doomed.next()).await.expect("delivered").expect("open");
        assert_eq!(delivery.envelope.method, "whoami");
    }
    // The worker dies holding five unacked requests.
    drop(doomed);
    let (_server, events) = setup.worker("survivor").await;
    for call in calls {
        let (name, attempt) = call.await.expect("joins").expect("answered after redelivery");
        assert_eq!(name, "survivor");
        assert_eq!(attempt, 2);
    }
    assert_eq!(events.finished("whoami"), 5);
}

/// A queue at its maximum length refuses a publish with `QueueFull` at once; nothing queued is lost.
pub async fn queue_full_from_a_bounded_queue(harness: &dyn Harness) {
    let setup = Setup::new(harness);
    let transport = setup.transport().await;
    let bounded = QueueOptions::new().max_len(3);
    if !transport.capabilities().max_length {
        let refused = transport.declare_queue(&setup.queue(), &bounded).await;
        assert!(matches!(refused, Err(Error::Unsupported(_))), "a max length was silently ignored: {refused:?}");
        return;
    }
    transport.declare_queue(&setup.queue(), &bounded).await.expect("declares");
    let probe = ProbeClient::new(&setup.client().await);
    let queued: Vec<_> = (0..3).map(|n| tokio::spawn(probe.add(n, 1).timeout(WAIT).into_future())).collect();
    let queue = setup.queue();
    let ready = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let deadline = tokio::time::Instant::now() + WAIT;
    while ready.load(std::sync::atomic::Ordering::SeqCst) < 3 {
        assert!(tokio::time::Instant::now() < deadline, "the three calls were not queued");
        let stats = transport.queue_stats(&queue).await.expect("stats");
        ready.store(stats.ready, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    match probe.add(9, 9).timeout(WAIT).await {
        Err(Error::QueueFull(full)) => assert_eq!(full, queue),
        other => panic!("expected QueueFull, got {other:?}"),
    }
    let (_server, _) = setup.worker_with("w", |server| server.queue_options(bounded)).await;
    for (n, call) in queued.into_iter().enumerate() {
        assert_eq!(call.await.expect("joins").expect("answered"), n as i64 + 1);
    }
}

/// A message requeued `max_deliveries` times goes to the dead-letter queue, intact.
pub async fn dead_letter_after_max_deliveries(harness: &dyn Harness) {
    let setup = Setup::new(harness);
    let transport = setup.transport().await;
    let queue = format!("{}.jobs", setup.namespace);
    if !transport.capabilities().dead_letter {
        let refused = transport.declare_queue(&queue, &QueueOptions::new().max_deliveries(3)).await;
        assert!(matches!(refused, Err(Error::Unsupported(_))), "max deliveries were silently ignored: {refused:?}");
        return;
    }
    transport.declare_queue(&queue, &QueueOptions::new().max_deliveries(3)).await.expect("declares");
    let mut envelope = Envelope::new(Kind::Oneway);
    envelope.method = "job".into();
    envelope.body = rpc_core::codec::encode(&42).expect("encodes");
    let id = envelope.id;
    transport.publish(&queue, envelope, Confirm::Broker).await.expect("publishes");
    let mut consumer = transport.consume(&queue, ConsumeOptions::new().prefetch(1)).await.expect("consumes");
    for attempt in 1..=3 {
        let delivery = tokio::time::timeout(WAIT, consumer.next()).await.expect("delivered").expect("open");
        assert_eq!((delivery.envelope.id, delivery.delivery_count), (id, attempt));
        delivery.handle.requeue().await.expect("requeues");
    }
    let dead_letters = naming::dead_letter_queue(&queue);
    let mut dead = transport.consume(&dead_letters, ConsumeOptions::new()).await.expect("consumes the DLQ");
    let delivery = tokio::time::timeout(WAIT, dead.next()).await.expect("dead-lettered").expect("open");
    assert_eq!(delivery.envelope.id, id);
    assert_eq!(rpc_core::codec::decode::<i64>(&delivery.envelope.body, &Default::default()), Ok(42));
    delivery.handle.ack().await.expect("acks");
    assert_eq!(transport.queue_stats(&queue).await.expect("stats").dead_lettered, 1);
}

/// A broadcast reaches each of three subscriber groups exactly once.
pub async fn broadcast_reaches_each_group_once(harness: &dyn Harness) {
    let setup = Setup::new(harness);
    let mut groups = Vec::new();
    for group in ["billing", "audit", "search"] {
        // One worker a group, one request at a time: the group sees its copies in order.
        let (server, events) = setup.worker_with(group, |server| server.group(group).concurrency(1).prefetch(1)).await;
        groups.push((server, events));
    }
    let probe = ProbeClient::new(&setup.client().await);
    for n in 1..=5 {
        probe.announce(n).await.expect("broadcasts");
    }
    probe.announce(0).await.expect("broadcasts the end marker");
    for (_, events) in &groups {
        eventually("every group to see the end marker", WAIT, || events.recorded().last() == Some(&0)).await;
        assert_eq!(events.recorded(), [1, 2, 3, 4, 5, 0]);
    }
}

/// Workers on one queue compete: the load is shared, and every call is answered once.
pub async fn competing_workers_share_the_load(harness: &dyn Harness) {
    let setup = Setup::new(harness);
    let (_a, a) = setup.worker_with("a", |server| server.concurrency(4).prefetch(4)).await;
    let (_b, b) = setup.worker_with("b", |server| server.concurrency(4).prefetch(4)).await;
    let probe = ProbeClient::new(&setup.client().await);
    let results = join_all((0..400).map(|_| probe.whoami().timeout(WAIT).into_future())).await;
    let mut per_worker: HashMap<String, usize> = HashMap::new();
    for result in results {
        *per_worker.entry(result.expect("answered").0).or_default() += 1;
    }
    let (on_a, on_b) = (per_worker.get("a").copied().unwrap_or(0), per_worker.get("b").copied().unwrap_or(0));
    assert_eq!(on_a + on_b, 400);
    // Both take a real share; not an even one, since a worker that gets less CPU (many tests run at once on
    // two cores) rightly takes fewer calls.
    assert!(on_a >= 40 && on_b >= 40, "load not shared: a {on_a}, b {on_b}");
    assert_eq!(a.finished("whoami") + b.finished("whoami"), 400);
}

/// A durable call's reply waits in its callback queue and is handled by a process started after the caller
/// went away.
pub async fn durable_callback_after_the_caller_restarted(harness: &dyn Harness) {
    let setup = Setup::new(harness);
    let deployment = setup.transport().await;
    if !holds_messages(deployment.as_ref()) {
        let refused = ProbeClient::new(&setup.client().await).add(40, 2).durable("sums").await;
        assert!(matches!(refused, Err(Error::Unsupported(_))), "a durable call was accepted: {refused:?}");
        return;
    }
    deployment.declare_queue(&setup.queue(), &QueueOptions::new()).await.expect("declares");

    let caller = setup.client().await;
    let correlation_id =
        ProbeClient::new(&caller).add(40, 2).header("order", "7").durable("sums").await.expect("the request is queued");
    caller.close();
    drop(caller);

    let (_server, events) = setup.worker("w").await;
    eventually("the worker to answer", WAIT, || events.finished("add") == 1).await;

    // The caller's process "restarts": a new connection registers the handler under the callback's name.
    let (sender, mut replies) = tokio::sync::mpsc::unbounded_channel();
    let callbacks = DurableCallbacks::new("sums")
        .namespace(&setup.namespace)
        .on(ProbeClient::ADD, move |reply| {
            let sender = sender.clone();
            async move {
                let _ = sender.send(reply);
            }
        })
        .start(setup.transport().await)
        .await
        .expect("callbacks start");
    let reply = tokio::time::timeout(WAIT, replies.recv()).await.expect("a reply").expect("open");
    assert_eq!(reply.correlation_id, Some(correlation_id));
    assert_eq!(reply.result.expect("ok"), 42);
    assert_eq!(reply.headers.get("order").map(String::as_str), Some("7"));
    callbacks.shutdown().await;
}

/// A graceful shutdown lets running handlers finish and requeues the rest: every call is answered once.
pub async fn graceful_shutdown_loses_nothing(harness: &dyn Harness) {
    let setup = Setup::new(harness);
    let (first, first_events) = setup.worker_with("first", |server| server.concurrency(2).prefetch(4)).await;
    let probe = ProbeClient::new(&setup.client().await);
    // One task polls all twenty: its first poll sends every request, before any reaches the worker, so that none
    // is sent while no worker serves the queue (on ZeroMQ that is `NoResponders` at once, as it should be).
    let calls = tokio::spawn(join_all((0..20).map(|_| probe.work(50).timeout(WAIT).into_future())));
    eventually("the first worker to start", WAIT, || {
        first_events.started.load(std::sync::atomic::Ordering::SeqCst) >= 2
    })
    .await;
    let report = first.shutdown(Duration::from_secs(10)).await;
    assert_eq!(report.aborted, 0);
    let (_second, second_events) = setup.worker("second").await;
    for call in calls.await.expect("joins") {
        assert_eq!(call.expect("answered"), 50);
    }
    assert_eq!(first_events.finished("work") + second_events.finished("work"), 20);
    assert!(first_events.finished("work") >= 2);
}

/// A shutdown with no grace stops running handlers; their requests are redelivered and still answered.
pub async fn forced_shutdown_requeues_running_calls(harness: &dyn Harness) {
    let setup = Setup::new(harness);
    let (first, first_events) = setup.worker_with("first", |server| server.concurrency(4).prefetch(4)).await;
    let probe = ProbeClient::new(&setup.client().await);
    let calls: Vec<_> = (0..8).map(|_| tokio::spawn(probe.work(5_000).timeout(WAIT).into_future())).collect();
    eventually("the first worker to start four calls", WAIT, || {
        first_events.started.load(std::sync::atomic::Ordering::SeqCst) == 4
    })
    .await;
    let report = first.shutdown(Duration::ZERO).await;
    assert_eq!(report.aborted, 4);
    let (_second, second_events) = setup.worker_with("second", |server| server.concurrency(8)).await;
    for call in calls {
        assert_eq!(call.await.expect("joins").expect("answered"), 5_000);
    }
    assert_eq!(first_events.finished("work"), 0);
    assert_eq!(second_events.finished("work"), 8);
}

/// A request whose deadline passed while it was queued is not executed, and it does not answer for its
/// idempotency key: the caller's next try with the key, sent with time to spare, runs.
///
/// Budgets are relative (no clocks are compared across hosts), so a request's budget starts when the broker
/// takes it; the time on the wire before that is not counted. The expired request is therefore published
/// directly and its budget waited out from the broker's confirmation, which comes after the broker took it.
pub async fn expired_request_is_not_executed(harness: &dyn Harness) {
    let setup = Setup::new(harness);
    let transport = setup.transport().await;
    transport.declare_queue(&setup.queue(), &QueueOptions::new()).await.expect("declares");
    let probe = ProbeClient::new(&setup.client().await);
    let result = probe.div(1, 1).timeout(Duration::from_millis(50)).await;
    if !holds_messages(transport.as_ref()) {
        // Nothing holds the request while no worker runs: the broker says so at once.
        assert!(matches!(result, Err(Error::NoResponders(_))), "{result:?}");
        return;
    }
    assert!(matches!(result, Err(Error::Timeout(_))), "{result:?}");
    let budget = Duration::from_millis(50);
    let mut request = Envelope::new(Kind::Request);
    request.service = SERVICE.into();
    request.method = "add".into();
    request.body = rpc_core::codec::encode(&BTreeMap::from([("a", 1), ("b", 1)])).expect("encodes");
    request.deadline_ms = Some(u64::try_from(budget.as_millis()).expect("fits"));
    request.idempotency_key = Some("expired-then-sent-again".into());
    transport.publish(&setup.queue(), request, Confirm::Broker).await.expect("publishes");
    // The budget running out in the queue is what this scenario is about, so it waits for exactly that.
    tokio::time::sleep(budget).await;
    let (_server, events) = setup.worker_with("w", |server| server.concurrency(1).prefetch(1)).await;
    assert_eq!(probe.add(2, 2).await.expect("answered"), 4);
    assert_eq!(events.finished("add"), 1, "the expired request ran");
    let again = probe.add(1, 1).idempotency_key("expired-then-sent-again").timeout(WAIT).await;
    assert_eq!(again.expect("the key's next try runs"), 2);
    assert_eq!(events.finished("add"), 2);
}

/// A request that expires in the worker, waiting behind a slow call for the worker's one slot, is answered
/// "deadline exceeded" unrun, and that answer is not kept for its idempotency key: the caller's next try with
/// the key, sent with time to spare, runs once.
pub async fn expired_request_does_not_answer_for_its_key(harness: &dyn Harness) {
    let setup = Setup::new(harness);
    let (server, events) = setup.worker_with("w", |server| server.concurrency(1).prefetch(4)).await;
    let probe = ProbeClient::new(&setup.client().await);
    let slow = tokio::spawn(probe.work(600).timeout(WAIT).into_future());
    eventually("the slow call to start", WAIT, || events.started.load(std::sync::atomic::Ordering::SeqCst) == 1).await;
    let late = probe.add(1, 1).idempotency_key("expired-in-the-worker").timeout(Duration::from_millis(150)).await;
    assert!(matches!(late, Err(Error::Timeout(_))), "{late:?}");
    assert_eq!(slow.await.expect("joins").expect("answered"), 600);
    let again = probe.add(1, 1).idempotency_key("expired-in-the-worker").timeout(WAIT).await;
    assert_eq!(again.expect("the key's next try runs"), 2);
    assert_eq!(events.finished("add"), 1);
    // Whether the first try reached the worker (and was answered unrun) or left the queue with the caller's
    // cancel or its budget, it never ran.
    assert!(server.stats().expired <= 1);
}

/// Deleting a service's queue removes it with the requests waiting in it; deleting it again, or a queue that
/// never was, succeeds; a worker started afterwards declares it anew and serves, and the deleted requests never
/// run. Core NATS holds no queue, so there deleting is all there is to it.
pub async fn deleted_queue_is_gone_with_its_messages(harness: &dyn Harness) {
    let setup = Setup::new(harness);
    let transport = setup.transport().await;
    transport.declare_queue(&setup.queue(), &QueueOptions::new()).await.expect("declares");
    let probe = ProbeClient::new(&setup.client().await);
    let holds = holds_messages(transport.as_ref());
    if holds {
        for n in 0..3 {
            probe.record(n).await.expect("queued");
        }
    }
    transport.delete_queue(&setup.queue()).await.expect("deletes");
    transport.delete_queue(&setup.queue()).await.expect("deleting again is done already");
    transport.delete_queue(&format!("{}.never", setup.namespace)).await.expect("a queue that never was");
    if transport.capabilities().queue_stats {
        let stats = transport.queue_stats(&setup.queue()).await;
        assert!(matches!(stats, Err(Error::NoRoute(_))), "{stats:?}");
    }
    let (_server, events) = setup.worker("w").await;
    assert_eq!(probe.add(2, 2).timeout(WAIT).await.expect("served after the deletion"), 4);
    probe.record(7).await.expect("queued");
    eventually("the new request to run", WAIT, || events.recorded() == [7]).await;
}

/// A oneway call returns once queued, and a worker runs it.
pub async fn oneway_call_runs(harness: &dyn Harness) {
    let setup = Setup::new(harness);
    let (_server, events) = setup.worker("w").await;
    let probe = ProbeClient::new(&setup.client().await);
    for n in 0..10 {
        probe.record(n).await.expect("queued");
    }
    eventually("ten records", WAIT, || events.finished("record") == 10).await;
    let mut recorded = events.recorded();
    recorded.sort_unstable();
    assert_eq!(recorded, (0..10).collect::<Vec<_>>());
}

/// `on_reply` returns at once and the closure receives the typed result.
pub async fn in_process_callback_receives_the_result(harness: &dyn Harness) {
    let setup = Setup::new(harness);
    let (_server, _) = setup.worker("w").await;
    let probe = ProbeClient::new(&setup.client().await);
    let (sender, receiver) = tokio::sync::oneshot::channel();
    probe.div(9, 0).on_reply(move |result| {
        let _ = sender.send(result);
    });
    let result = tokio::time::timeout(WAIT, receiver).await.expect("called back").expect("sent");
    assert_eq!(result.expect("answered"), Err(MathError::DivideByZero));
}

/// A call made inside a handler inherits what remains of the outer call's budget.
pub async fn nested_call_inherits_the_deadline(harness: &dyn Harness) {
    let setup = Setup::new(harness);
    let client = setup.client().await;
    let events = Arc::new(Events::default());
    let worker = Worker { name: "w".into(), events, client: Some(client.clone()) };
    let _server = setup.server(setup.transport().await).serve(ProbeServer::new(worker)).await.expect("serves");
    let probe = ProbeClient::new(&client);
    let own = probe.remaining().await.expect("answered").expect("has a deadline");
    assert!(own > 20_000, "a direct call carries the default 30 s budget, saw {own} ms");
    let inner = probe.nested().timeout(Duration::from_secs(2)).await.expect("answered").expect("has a deadline");
    assert!(inner <= 2_000, "the nested call outlived its caller's budget: {inner} ms");
}

/// Priorities order deliveries where the transport has them; where it does not, asking is a typed error.
pub async fn priority_orders_calls_or_is_refused(harness: &dyn Harness) {
    let setup = Setup::new(harness);
    let transport = setup.transport().await;
    transport.declare_queue(&setup.queue(), &QueueOptions::new()).await.expect("declares");
    let probe = ProbeClient::new(&setup.client().await);
    if !transport.capabilities().priority {
        let refused = probe.record(1).priority(9).await;
        assert!(matches!(refused, Err(Error::Unsupported(_))), "{refused:?}");
        return;
    }
    probe.record(1).await.expect("queued");
    probe.record(2).priority(0).await.expect("queued");
    probe.record(3).priority(9).await.expect("queued");
    probe.record(4).priority(5).await.expect("queued");
    let refused = probe.record(5).priority(10).await;
    assert!(matches!(refused, Err(Error::InvalidArgument(_))), "{refused:?}");
    let (_server, events) = setup.worker_with("w", |server| server.concurrency(1).prefetch(1)).await;
    eventually("four records", WAIT, || events.finished("record") == 4).await;
    assert_eq!(events.recorded(), [3, 4, 1, 2]);
}

/// A durable callback handler that panics dead-letters that reply and goes on handling the others.
pub async fn durable_callback_panic_is_dead_lettered(harness: &dyn Harness) {
    let setup = Setup::new(harness);
    let (_server, _) = setup.worker("w").await;
    let probe = ProbeClient::new(&setup.client().await);
    if !holds_messages(setup.transport().await.as_ref()) {
        let refused = probe.add(0, 1).durable("fragile").await;
        assert!(matches!(refused, Err(Error::Unsupported(_))), "a durable call was accepted: {refused:?}");
        return;
    }
    probe.add(0, 1).durable("fragile").await.expect("queued");
    probe.add(0, 2).durable("fragile").await.expect("queued");
    let (sender, mut handled) = tokio::sync::mpsc::unbounded_channel();
    let callbacks = DurableCallbacks::new("fragile")
        .namespace(&setup.namespace)
        .on(ProbeClient::ADD, move |reply| {
            let sender = sender.clone();
            async move {
                let sum = reply.result.expect("ok");
                assert_ne!(sum, 1, "a handler bug on purpose");
                let _ = sender.send(sum);
            }
        })
        .start(setup.transport().await)
        .await
        .expect("callbacks start");
    assert_eq!(tokio::time::timeout(WAIT, handled.recv()).await.expect("handled").expect("open"), 2);
    let transport = setup.transport().await;
    let dead_letters = naming::dead_letter_queue(&naming::callback_queue(Some(&setup.namespace), "fragile"));
    let mut dead = transport.consume(&dead_letters, ConsumeOptions::new()).await.expect("consumes the DLQ");
    let delivery = tokio::time::timeout(WAIT, dead.next()).await.expect("dead-lettered").expect("open");
    assert_eq!(rpc_core::codec::decode::<i64>(&delivery.envelope.body, &Default::default()), Ok(1));
    delivery.handle.ack().await.expect("acks");
    callbacks.shutdown().await;
}

/// Closing a client fails its waiting calls at once with `Shutdown`, and every later call too.
pub async fn closing_the_client_fails_waiting_calls(harness: &dyn Harness) {
    let setup = Setup::new(harness);
    let (_server, events) = setup.worker("w").await;
    let client = setup.client().await;
    let probe = ProbeClient::new(&client);
    let waiting = tokio::spawn(probe.gate().timeout(WAIT).into_future());
    eventually("the call to be pending", WAIT, || client.stats().pending == 1).await;
    let started = tokio::time::Instant::now();
    client.close();
    let result = waiting.await.expect("joins");
    assert!(matches!(result, Err(Error::Shutdown)), "{result:?}");
    assert!(started.elapsed() < WAIT / 2, "the call waited for its timeout instead of failing at once");
    assert!(matches!(probe.add(1, 1).await, Err(Error::Shutdown)));
    assert_eq!(client.stats().pending, 0);
    events.gate.notify_waiters();
}

/// A call to a service nobody serves fails at once with a typed error (`NoRoute`, or `NoResponders` where the
/// broker reports that), not by its timeout.
pub async fn call_to_a_missing_service_fails_at_once(harness: &dyn Harness) {
    let setup = Setup::new(harness);
    let client = setup.client().await;
    let probe = ProbeClient::new(&client);
    let started = tokio::time::Instant::now();
    let result = probe.add(1, 1).timeout(WAIT).await;
    let queue = setup.queue();
    match result {
        Err(Error::NoRoute(name) | Error::NoResponders(name)) => assert_eq!(name, queue),
        other => panic!("expected NoRoute or NoResponders, got {other:?}"),
    }
    assert!(started.elapsed() < WAIT / 4, "the call waited for its timeout: {:?}", started.elapsed());
    assert_eq!(client.stats().pending, 0);
}

/// A retry policy for the scenarios: quick backoff, panics retried.
fn quick_retries(attempts: u32) -> RetryPolicy {
    RetryPolicy::attempts(attempts).backoff(Duration::from_millis(5), Duration::from_millis(20))
}

/// A handler that fails twice succeeds on its third attempt; each retry is a new message carrying `attempt + 1`.
pub async fn retries_until_the_handler_succeeds(harness: &dyn Harness) {
    let setup = Setup::new(harness);
    let (server, events) = setup.worker_with("w", |server| server.retry(quick_retries(4))).await;
    let probe = ProbeClient::new(&setup.client().await);
    assert_eq!(probe.flaky(2).timeout(WAIT).await.expect("succeeds in the end"), 3);
    assert_eq!(events.finished("flaky"), 1);
    let stats = server.stats();
    assert_eq!((stats.panicked, stats.retried, stats.dead_lettered), (2, 2, 0));
}

/// A request whose handler always panics runs at most `max_attempts` times, then goes to the dead-letter queue
/// and the caller gets `DeadLettered`; other calls are served meanwhile.
pub async fn poison_request_is_dead_lettered_after_its_attempts(harness: &dyn Harness) {
    let setup = Setup::new(harness);
    let (server, _) = setup
        .worker_with("w", |server| {
            server
                .retry_method("boom", quick_retries(3))
                .retry_method("div", quick_retries(2).retry_on([Code::Application]))
        })
        .await;
    let client = setup.client().await;
    let probe = ProbeClient::new(&client);
    let poison = tokio::spawn(probe.boom().timeout(WAIT).into_future());
    let sums = join_all((0..20).map(|n| probe.add(n, 1).timeout(WAIT).into_future())).await;
    for (n, sum) in sums.into_iter().enumerate() {
        assert_eq!(sum.expect("other calls are unaffected"), n as i64 + 1);
    }
    match poison.await.expect("joins") {
        Err(Error::Remote(status)) => {
            assert_eq!((status.code(), status.cause()), (Code::DeadLettered, Some(Code::Internal)));
            assert!(
                status.message().contains("attempt 3 of 3") && status.message().contains("boom on purpose"),
                "{status}"
            );
            assert!(status.application_error::<MathError>().is_none(), "a panic carries no error value");
        }
        other => panic!("expected DeadLettered, got {other:?}"),
    }
    // The method's own error, retried and dead-lettered: the caller still gets its typed value.
    match probe.div(1, 0).timeout(WAIT).await {
        Err(Error::Remote(status)) => {
            assert_eq!((status.code(), status.cause()), (Code::DeadLettered, Some(Code::Application)));
            let error = status.application_error::<MathError>().expect("carries the error").expect("decodes");
            assert_eq!(error, MathError::DivideByZero);
        }
        other => panic!("expected DeadLettered with the error value, got {other:?}"),
    }
    let stats = server.stats();
    assert_eq!((stats.panicked, stats.retried, stats.dead_lettered), (3, 3, 2));
    let transport = setup.transport().await;
    if transport.capabilities().dead_letter {
        let dead_letters = naming::dead_letter_queue(&setup.queue());
        let mut dead = transport.consume(&dead_letters, ConsumeOptions::new()).await.expect("consumes the DLQ");
        let delivery = tokio::time::timeout(WAIT, dead.next()).await.expect("dead-lettered").expect("open");
        assert_eq!((delivery.envelope.method.as_str(), delivery.envelope.attempt), ("boom", 3));
        delivery.handle.ack().await.expect("acks");
    }
    assert_eq!(client.stats().pending, 0);
}

/// Retries never outlive the caller: when the next backoff would end past the deadline, the request is
/// dead-lettered and the caller hears so before its timeout.
pub async fn retries_stop_before_the_deadline(harness: &dyn Harness) {
    let setup = Setup::new(harness);
    let policy = RetryPolicy::attempts(50).backoff(Duration::from_millis(100), Duration::from_secs(5));
    let (server, _) = setup.worker_with("w", |server| server.retry(policy)).await;
    let probe = ProbeClient::new(&setup.client().await);
    match probe.flaky(1_000).timeout(Duration::from_secs(2)).await {
        Err(Error::Remote(status)) => {
            assert_eq!(status.code(), Code::DeadLettered);
            assert!(status.message().contains("deadline leaving no time"), "{status}");
        }
        other => panic!("expected DeadLettered before the deadline, got {other:?}"),
    }
    let stats = server.stats();
    assert!(stats.panicked >= 2 && stats.panicked < 50, "{stats:?}");
    assert_eq!(stats.dead_lettered, 1);
}

/// Calls that share an idempotency key are one call in effect: the handler runs once and every call gets its
/// reply, whether the duplicates come one after another or all at once.
pub async fn same_idempotency_key_executes_once(harness: &dyn Harness) {
    let setup = Setup::new(harness);
    let (server, events) = setup.worker("w").await;
    let probe = ProbeClient::new(&setup.client().await);
    for _ in 0..3 {
        assert_eq!(probe.count(7).idempotency_key("order-7").timeout(WAIT).await.expect("answered"), 1);
    }
    let together = join_all((0..10).map(|_| probe.count(8).idempotency_key("order-8").timeout(WAIT).into_future()));
    for count in together.await {
        assert_eq!(count.expect("answered"), 1);
    }
    // Without a key of its own, each call is a call of its own.
    assert_eq!(probe.count(9).timeout(WAIT).await.expect("answered"), 1);
    assert_eq!(probe.count(9).timeout(WAIT).await.expect("answered"), 2);
    assert_eq!(events.finished("count"), 4);
    assert_eq!(server.stats().deduplicated, 11);
}

/// A handler whose effect comes first and which then runs past the caller's deadline is not stopped there: it
/// runs to its end and its outcome is stored under the call's key. The caller, timing out, retries with the
/// same key until it is answered; each retry made while the first execution runs waits for it (and times out),
/// the first made after it ended gets its stored outcome. Each key's effect happens once.
pub async fn handler_past_its_deadline_runs_once_per_key(harness: &dyn Harness) {
    const KEYS: i64 = 20;
    const TAIL_MS: u64 = 400;
    const DEADLINE: Duration = Duration::from_millis(100);
    let setup = Setup::new(harness);
    let (_server, events) = setup.worker("w").await;
    let client = setup.client().await;
    let probe = ProbeClient::new(&client);
    let calls = (0..KEYS).map(|n| {
        let probe = probe.clone();
        async move {
            let key = format!("slow-{n}");
            let mut timeouts = 0u32;
            loop {
                match probe.count_then_wait(n, TAIL_MS).idempotency_key(&key).timeout(DEADLINE).await {
                    Ok(count) => return (count, timeouts),
                    Err(Error::Timeout(_)) if timeouts < 100 => timeouts += 1,
                    Err(error) => panic!("key {key}: {error:?} after {timeouts} timeouts"),
                }
            }
        }
    });
    let answers = join_all(calls).await;
    for (n, (count, timeouts)) in answers.iter().enumerate() {
        assert_eq!(*count, 1, "key {n} answered with another execution's count");
        assert!(*timeouts >= 1, "key {n}: the first call did not time out");
    }
    let counts = events.counts.lock().expect("not poisoned").clone();
    assert_eq!(counts.len(), KEYS as usize, "{counts:?}");
    assert!(counts.values().all(|&count| count == 1), "a key's effect happened more than once: {counts:?}");
    assert_eq!(events.finished("count_then_wait"), KEYS as u64, "an execution was stopped at its deadline");
    assert_eq!(client.stats().pending, 0);
}

/// A client limited to 20 calls a second (a burst of 1) spaces a burst of 11 calls over at least half a second,
/// and a call whose turn would come after its deadline fails with `Timeout` at once, unsent.
pub async fn rate_limit_spaces_a_burst_in_the_caller(harness: &dyn Harness) {
    let setup = Setup::new(harness);
    let (_server, events) = setup.worker("w").await;
    let client = Client::builder(setup.transport().await)
        .namespace(&setup.namespace)
        .rate_limit(20, 1)
        .connect()
        .await
        .expect("client connects");
    let probe = ProbeClient::new(&client);
    let started = tokio::time::Instant::now();
    let burst = join_all((0..11).map(|n| probe.add(n, 1).timeout(WAIT).into_future())).await;
    let took = started.elapsed();
    for (n, sum) in burst.into_iter().enumerate() {
        assert_eq!(sum.expect("answered"), n as i64 + 1);
    }
    // The first goes at once, then one every 50 ms: the last cannot start before 500 ms (the bucket is measured
    // to the millisecond, hence 490).
    assert!(took >= Duration::from_millis(490), "11 calls at 20 a second took only {took:?}");
    // Three calls take the next turns (at once, then 50 and 100 ms on): a call made after them with 1 ms to go
    // cannot have a turn before its deadline.
    let (queued, refused) =
        tokio::join!(join_all((0..3).map(|n| probe.add(n, 2).timeout(WAIT).into_future())), async {
            tokio::task::yield_now().await;
            probe.add(1, 1).timeout(Duration::from_millis(1)).await
        });
    assert!(queued.iter().all(Result::is_ok), "{queued:?}");
    assert!(matches!(refused, Err(Error::Timeout(_))), "{refused:?}");
    assert_eq!(events.finished("add"), 14, "the refused call was sent");
}

/// A client limited to 3 calls in flight sends a burst of 30 to a worker that could run 16 at once: the worker
/// never runs more than 3, every call is answered, and a call that cannot get a place before its deadline
/// fails with `Timeout` without being sent.
pub async fn in_flight_limit_holds_a_burst_in_the_caller(harness: &dyn Harness) {
    let setup = Setup::new(harness);
    let (_server, events) = setup.worker_with("w", |server| server.concurrency(16).prefetch(16)).await;
    let client = Client::builder(setup.transport().await)
        .namespace(&setup.namespace)
        .max_in_flight(3)
        .connect()
        .await
        .expect("client connects");
    let probe = ProbeClient::new(&client);
    let burst = join_all((0..30).map(|_| probe.work(20).timeout(WAIT).into_future())).await;
    assert!(burst.iter().all(|result| matches!(result, Ok(20))), "{burst:?}");
    assert_eq!(events.most_running.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert_eq!(events.started.load(std::sync::atomic::Ordering::SeqCst), 30);

    let holding = join_all((0..3).map(|_| probe.work(500).timeout(WAIT).into_future()));
    let refused = async {
        eventually("three calls in flight", WAIT, || client.stats().pending == 3).await;
        probe.work(1).timeout(Duration::from_millis(50)).await
    };
    let (held, refused) = tokio::join!(holding, refused);
    assert!(held.iter().all(|result| matches!(result, Ok(500))), "{held:?}");
    assert!(matches!(refused, Err(Error::Timeout(_))), "{refused:?}");
    assert_eq!(events.started.load(std::sync::atomic::Ordering::SeqCst), 33, "the refused call was sent");
}

/// Cancelling a call ends it at once with `Cancelled`, and dropping its future cancels it too. Where the
/// transport can cancel (the embedded and own broker), a request still queued is removed and never runs, and a
/// running handler is stopped, its request acked without a reply. Elsewhere only the waiting ends: the
/// requests run to the end and their replies are dropped as late.
pub async fn cancelled_call_leaves_the_queue_and_stops_its_handler(harness: &dyn Harness) {
    use std::sync::atomic::Ordering::SeqCst;
    const MILLIS: u64 = 1_500;
    let setup = Setup::new(harness);
    let transport = setup.transport().await;
    let cancels = transport.capabilities().cancel;
    let (server, events) = setup.worker_with("w", |server| server.concurrency(1).prefetch(1)).await;
    let client = setup.client().await;
    let probe = ProbeClient::new(&client);
    // The first call runs and holds the worker's only place; the second waits behind it.
    let (first_done, first_result) = tokio::sync::oneshot::channel();
    let first = probe.work(MILLIS).timeout(WAIT).on_reply(move |result| drop(first_done.send(result)));
    eventually("the first call to run", WAIT, || events.running.load(SeqCst) == 1).await;
    let (second_done, second_result) = tokio::sync::oneshot::channel();
    let second = probe.work(MILLIS).timeout(WAIT).on_reply(move |result| drop(second_done.send(result)));
    eventually("the second call to be sent", WAIT, || client.stats().pending == 2).await;
    if cancels {
        eventually_async("the second call to wait in the queue", WAIT, || async {
            transport.queue_stats(&setup.queue()).await.is_ok_and(|stats| stats.ready == 1)
        })
        .await;
    } else {
        // A call cancelled before its request went out never sends it; this one is to run after all, so its
        // request is at the broker first, where the broker tells (on a busy machine the call's task may not
        // have published it yet when the caller sees it pending). The first call's request is out to the
        // worker: the second one waits in the queue, or, where the broker counts what its consumers fetched
        // as unacked, is one of two such.
        eventually_async("the second call's request to reach the broker", WAIT, || async {
            transport.queue_stats(&setup.queue()).await.map_or(true, |stats| stats.ready >= 1 || stats.unacked >= 2)
        })
        .await;
    }
    // The caller learns whether the broker can stop the request or only the waiting ends.
    let cancellation = if cancels { Cancellation::Broker } else { Cancellation::WaitOnly };
    assert_eq!(client.cancel(second), Some(cancellation));
    assert!(matches!(second_result.await, Ok(Err(Error::Cancelled))));
    assert_eq!(client.cancel(first), Some(cancellation));
    assert!(matches!(first_result.await, Ok(Err(Error::Cancelled))));
    assert_eq!(client.cancel(first), None, "a call ends once");
    assert_eq!(client.stats().pending, 0);
    let uncancelled = if cancels { 0 } else { 2 };
    eventually("the calls the broker cannot cancel to be counted", WAIT, || client.stats().uncancelled == uncancelled)
        .await;
    if cancels {
        eventually("the running handler to stop", WAIT, || events.running.load(SeqCst) == 0).await;
        eventually("the worker to count the cancel", WAIT, || server.stats().cancelled == 1).await;
        // The worker counts the cancel when the handler stops; its ack reaches the broker after that.
        eventually_async("the stopped handler's request to be acked", WAIT, || async {
            transport.queue_stats(&setup.queue()).await.is_ok_and(|stats| stats.unacked == 0)
        })
        .await;
        let stats = transport.queue_stats(&setup.queue()).await.expect("stats");
        assert_eq!((stats.ready, stats.unacked, stats.cancelled), (0, 0, 1), "{stats:?}");
    } else {
        eventually("both calls to run to the end", WAIT, || events.finished("work") == 2).await;
        eventually("both replies to arrive late", WAIT, || client.stats().late_replies == 2).await;
    }
    // A future dropped while its handler runs.
    let started = events.started.load(SeqCst);
    let call = probe.work(MILLIS).timeout(WAIT).into_future();
    tokio::select! {
        result = call => panic!("the call ended before it was dropped: {result:?}"),
        () = eventually("the third call to run", WAIT, || events.started.load(SeqCst) == started + 1) => {}
    }
    if cancels {
        eventually("the dropped call's handler to stop", WAIT, || events.running.load(SeqCst) == 0).await;
        eventually("the worker to count the cancel", WAIT, || server.stats().cancelled == 2).await;
        assert_eq!(events.finished("work"), 0, "a cancelled handler ran to the end");
        assert_eq!(events.started.load(SeqCst), 2, "the cancelled queued call ran");
    }
    // The worker goes on answering.
    assert_eq!(probe.add(1, 2).timeout(WAIT).await.expect("answered"), 3);
    assert_eq!(client.stats().pending, 0);
}

/// A handler reads who called from its context: the identity the client declared, or none.
pub async fn handler_reads_the_callers_identity(harness: &dyn Harness) {
    let setup = Setup::new(harness);
    let (_server, _) = setup.worker("w").await;
    let named = Client::builder(setup.transport().await)
        .namespace(&setup.namespace)
        .identity("billing")
        .connect()
        .await
        .expect("client connects");
    assert_eq!(named.identity(), Some("billing"));
    let caller = ProbeClient::new(&named).caller().timeout(WAIT).await.expect("answered");
    assert_eq!(caller.as_deref(), Some("billing"));
    let anonymous = setup.client().await;
    assert_eq!(ProbeClient::new(&anonymous).caller().timeout(WAIT).await.expect("answered"), None);
}

/// Requests that failed for good wait in the dead-letter queue: listing them leaves them there, and once the
/// cause is fixed a replay runs each once more with its own idempotency key.
pub async fn dead_letters_are_listed_and_replayed_with_their_key(harness: &dyn Harness) {
    use rpc_core::dead_letters::DeadLetters;
    use std::sync::atomic::Ordering::SeqCst;
    let setup = Setup::new(harness);
    let transport = setup.transport().await;
    let dead = DeadLetters::of_service(Arc::clone(&transport), Some(&setup.namespace), SERVICE);
    if !transport.capabilities().dead_letter {
        assert!(matches!(dead.list(10).await, Err(Error::Unsupported(_))));
        return;
    }
    assert!(dead.list(10).await.expect("lists").is_empty());
    let (server, events) = setup.worker_with("w", |server| server.retry_method("fragile", quick_retries(2))).await;
    events.broken.store(true, SeqCst);
    let probe = ProbeClient::new(&setup.client().await);
    for n in 1..=3 {
        let failed = probe.fragile(n).idempotency_key(format!("order-{n}")).timeout(WAIT).await;
        assert!(matches!(&failed, Err(Error::Remote(status)) if status.code() == Code::DeadLettered), "{failed:?}");
    }
    eventually_async("three dead letters", WAIT, || async { dead.count().await.is_ok_and(|count| count == 3) }).await;
    // Listing leaves them in place, in order. On JetStream a released message can take up to the consumer's
    // ack wait to be deliverable again, so a listing right after another may come up short for a moment.
    let keys = |listed: &[Envelope]| -> Vec<String> {
        listed.iter().map(|envelope| envelope.idempotency_key.as_deref().unwrap_or_default().to_owned()).collect()
    };
    for _ in 0..2 {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let listed = dead.list(10).await.expect("lists");
            assert!(listed.iter().all(|envelope| envelope.method == "fragile" && envelope.attempt == 2));
            if keys(&listed) == ["order-1", "order-2", "order-3"] {
                // Listing leaves them where they are, and the count says so at once.
                assert_eq!(dead.count().await.expect("counts"), 3, "a count right after a listing");
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "the listing stayed {:?}", keys(&listed));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert!(dead.list(2).await.expect("lists").len() <= 2);
    events.broken.store(false, SeqCst);
    let first = dead.replay(2).await.expect("replays");
    assert!(first <= 2);
    let replayed = std::sync::atomic::AtomicUsize::new(first);
    eventually_async("all three replayed", WAIT, || async {
        let more = dead.replay(10).await.expect("replays");
        replayed.fetch_add(more, SeqCst) + more == 3
    })
    .await;
    eventually("the replayed calls to run", WAIT, || events.finished("fragile") == 3).await;
    let mut keys = events.keys.lock().expect("not poisoned").clone();
    keys.sort();
    assert_eq!(keys, ["order-1", "order-2", "order-3"]);
    assert_eq!(dead.count().await.expect("counts"), 0);
    // Each failed for good once, and each replay ran: none was answered from the dedup store.
    let stats = server.stats();
    assert_eq!((stats.dead_lettered, stats.deduplicated), (3, 0));
}

/// A call sent with a delay waits that long in the broker before a worker takes it, can be cancelled while it
/// waits, and must leave time for its answer; a transport without delayed delivery refuses it.
pub async fn delayed_call_waits_its_delay_or_is_refused(harness: &dyn Harness) {
    const DELAY: Duration = Duration::from_millis(400);
    let setup = Setup::new(harness);
    let transport = setup.transport().await;
    let (_server, events) = setup.worker("w").await;
    let client = setup.client().await;
    let probe = ProbeClient::new(&client);
    if !transport.capabilities().delayed_delivery {
        match probe.add(1, 2).delay(DELAY).timeout(WAIT).await {
            Err(Error::Unsupported(what)) => assert_eq!(what, "delayed delivery"),
            other => panic!("expected Unsupported, got {other:?}"),
        }
        assert_eq!(client.stats().pending, 0);
        return;
    }
    match probe.add(1, 2).delay(WAIT).timeout(WAIT).await {
        Err(Error::InvalidArgument(why)) => assert!(why.contains("longer timeout"), "{why}"),
        other => panic!("expected InvalidArgument for a delay as long as the timeout, got {other:?}"),
    }
    let sent = tokio::time::Instant::now();
    let (done, result) = tokio::sync::oneshot::channel();
    probe.add(2, 3).delay(DELAY).timeout(WAIT).on_reply(move |sum| drop(done.send(sum)));
    eventually_async("the call to wait out its delay in the broker", WAIT, || async {
        transport.queue_stats(&setup.queue()).await.is_ok_and(|stats| stats.delayed == 1 && stats.ready == 0)
    })
    .await;
    assert_eq!(result.await.expect("answered").expect("add"), 5);
    assert!(sent.elapsed() >= DELAY, "answered after {:?}, before its delay", sent.elapsed());
    // Cancelled while it waits: it never runs.
    let (done, result) = tokio::sync::oneshot::channel();
    let id = probe.count(7).delay(DELAY).timeout(WAIT).on_reply(move |count| drop(done.send(count)));
    eventually_async("the second call to wait out its delay", WAIT, || async {
        transport.queue_stats(&setup.queue()).await.is_ok_and(|stats| stats.delayed == 1)
    })
    .await;
    assert_eq!(client.cancel(id), Some(Cancellation::Broker));
    assert!(matches!(result.await, Ok(Err(Error::Cancelled))));
    // The cancel goes out on the client's connection, the stats come over another.
    eventually_async("the broker to remove the cancelled call", WAIT, || async {
        transport.queue_stats(&setup.queue()).await.is_ok_and(|stats| (stats.delayed, stats.cancelled) == (0, 1))
    })
    .await;
    // A later call, delayed past the cancelled one's due time, is answered; the cancelled one never ran.
    assert_eq!(probe.add(1, 1).delay(DELAY + DELAY / 2).timeout(WAIT).await.expect("answered"), 2);
    assert!(events.counts.lock().expect("not poisoned").is_empty(), "the cancelled delayed call ran");
    assert_eq!(client.stats().pending, 0);
}

/// Between attempts, a retried request waits in the broker where it has delayed delivery: the worker is free
/// to serve other calls during the backoff, and the retry is answered once the backoff is over.
pub async fn retry_backoff_is_held_by_the_broker(harness: &dyn Harness) {
    const BACKOFF: Duration = Duration::from_millis(600);
    let setup = Setup::new(harness);
    let transport = setup.transport().await;
    let delays = transport.capabilities().delayed_delivery;
    let policy = RetryPolicy::attempts(2).backoff(BACKOFF, BACKOFF).multiplier(1.0);
    let (server, _) = setup.worker_with("w", |server| server.concurrency(1).prefetch(1).retry(policy)).await;
    let probe = ProbeClient::new(&setup.client().await);
    let (done, result) = tokio::sync::oneshot::channel();
    let sent = tokio::time::Instant::now();
    probe.flaky(1).timeout(WAIT).on_reply(move |attempt| drop(done.send(attempt)));
    eventually("the first attempt to fail", WAIT, || server.stats().panicked == 1).await;
    if delays {
        eventually_async("the retry to wait in the broker", WAIT, || async {
            transport
                .queue_stats(&setup.queue())
                .await
                .is_ok_and(|stats| stats.delayed == 1 && stats.unacked == 0 && stats.ready == 0)
        })
        .await;
        // The worker holds nothing during the backoff: its one place serves another call.
        assert_eq!(probe.add(2, 2).timeout(WAIT).await.expect("served"), 4);
    }
    assert_eq!(result.await.expect("answered").expect("the retry succeeds"), 2);
    // The backoff is between half and all of its nominal length (jitter).
    assert!(sent.elapsed() >= BACKOFF / 2, "the retry came after {:?}", sent.elapsed());
    assert_eq!(server.stats().retried, 1);
}

/// A call's W3C trace context reaches its handler, and calls made inside the handler carry it on: unchanged
/// where no OpenTelemetry layer records spans (as here), so that the next service that records continues the
/// trace. A call made outside any trace carries none.
pub async fn trace_context_goes_on_with_nested_calls(harness: &dyn Harness) {
    let setup = Setup::new(harness);
    let client = setup.client().await;
    let worker = Worker { name: "w".into(), events: Arc::new(Events::default()), client: Some(client.clone()) };
    let _server = setup.server(setup.transport().await).serve(ProbeServer::new(worker)).await.expect("serves");
    let probe = ProbeClient::new(&client);
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (own, nested) = probe
        .nested_trace()
        .header(rpc_core::trace::TRACEPARENT, parent)
        .header(rpc_core::trace::TRACESTATE, "vendor=opaque")
        .timeout(WAIT)
        .await
        .expect("answered");
    assert_eq!(own.as_deref(), Some(parent), "the handler did not see its caller's traceparent");
    assert_eq!(nested.as_deref(), Some(parent), "a nested call did not carry the trace on");
    let (own, nested) = probe.nested_trace().timeout(WAIT).await.expect("answered");
    assert_eq!((own, nested), (None, None), "a call outside any trace carried a trace context");
}

/// A ping finds every live worker of a service, whatever it consumes, with its identity, version, system and
/// load; a worker that stopped no longer answers.
pub async fn ping_finds_every_live_worker(harness: &dyn Harness) {
    let setup = Setup::new(harness);
    let events = Arc::new(Events::default());
    let mut servers = Vec::new();
    for name in ["a", "b"] {
        let worker = Worker { name: name.into(), events: Arc::clone(&events), client: None };
        let server = setup.server(setup.transport().await).version("7.1.0").concurrency(3);
        servers.push(server.serve(ProbeServer::new(worker)).await.expect("serves"));
    }
    let client = setup.client().await;
    let probe = ProbeClient::new(&client);
    let workers = client.ping(SERVICE).wait(WAIT).at_least(2).await.expect("pings");
    assert_eq!(workers.len(), 2, "{workers:?}");
    assert!(workers.iter().all(|worker| worker.in_flight == 0), "{workers:?}");
    assert_ne!(workers[0].id, workers[1].id);
    let system = client.transport().system();
    for worker in &workers {
        assert_eq!(worker.service, SERVICE);
        assert_eq!(worker.queue, setup.queue());
        assert_eq!(worker.version.as_deref(), Some("7.1.0"));
        assert_eq!(worker.mqrpc, env!("CARGO_PKG_VERSION"));
        assert_eq!(worker.system, system);
        assert_eq!(worker.pid, std::process::id());
        assert_eq!(worker.concurrency, 3);
    }
    // A call held by a worker: its ping says so.
    let held = tokio::spawn(probe.gate().timeout(WAIT).into_future());
    eventually_async("a ping to count the held call", WAIT, || async {
        let workers = client.ping(SERVICE).wait(WAIT).at_least(2).await.expect("pings");
        workers.iter().map(|worker| worker.in_flight).sum::<u32>() == 1
    })
    .await;
    // Counted from when its worker took it, which may be before its handler waits at the gate.
    eventually("the held call to be let go", WAIT, || {
        events.gate.notify_waiters();
        held.is_finished()
    })
    .await;
    held.await.expect("joins").expect("the held call is answered");

    let kept = servers.remove(0);
    let stopped = servers.remove(0).shutdown(Duration::from_secs(5)).await;
    assert_eq!(stopped.aborted, 0);
    let left = client.ping(SERVICE).wait(Duration::from_secs(2)).await.expect("pings");
    assert_eq!(left.len(), 1, "only the worker still running answers: {left:?}");
    assert!(workers.iter().any(|worker| worker.id == left[0].id));
    assert_eq!(left[0].handled, kept.stats().handled);
    // A service nobody runs: no answer, and no error.
    let nobody = client.ping("suite.Nobody").wait(Duration::from_millis(300)).await.expect("pings");
    assert!(nobody.is_empty(), "{nobody:?}");
}

/// With an OpenTelemetry layer installed ([`crate::otel::install`]; not a scenario of the suite, which runs
/// without one): a call's span is the parent of the worker's span, a call made in the handler is its child, a
/// retry's span links to the attempt before it, and a oneway call's send span is the parent of its process
/// span; every span names the transport's messaging system and the queue.
pub async fn spans_of_a_call_form_one_trace(harness: &dyn Harness) {
    use opentelemetry::trace::{SpanId, SpanKind};
    use tracing::Instrument;

    use crate::otel::{SpanIdExt, attribute, span_id_in, trace_id, wait_for_spans};

    crate::otel::install();
    let setup = Setup::new(harness);
    let client = setup.client().await;
    let system = client.transport().system();
    let worker = Worker { name: "w".into(), events: Arc::new(Events::default()), client: Some(client.clone()) };
    let server = setup.server(setup.transport().await).retry(quick_retries(3));
    let _server = server.serve(ProbeServer::new(worker)).await.expect("serves");
    let probe = ProbeClient::new(&client);
    let root = tracing::info_span!("test.root");
    let trace = trace_id(&root);
    let (own, nested) = async {
        let seen = probe.nested_trace().timeout(WAIT).await.expect("answered");
        assert_eq!(probe.flaky(1).timeout(WAIT).await.expect("succeeds on its second attempt"), 2);
        probe.record(7).await.expect("queued");
        seen
    }
    .instrument(root.clone())
    .await;
    let root_id = root.context_id();
    drop(root);
    // The root, 3 calls and a send; 5 process spans: nested_trace, trace_parent, flaky twice, record.
    let spans = wait_for_spans(trace, 10, WAIT).await;
    let queue = setup.queue();
    let find = |name: &str, method: &str, parent: SpanId| {
        let found: Vec<_> = spans
            .iter()
            .filter(|span| {
                span.name == name
                    && attribute(span, "rpc.method").as_deref() == Some(method)
                    && span.parent_span_id == parent
            })
            .collect();
        assert!(!found.is_empty(), "no span {name} of {method} under {parent}: {spans:#?}");
        found
    };
    let call_name = |method: &str| format!("{SERVICE}/{method}");
    let process = format!("process {queue}");

    let outer = find(&call_name("nested_trace"), "nested_trace", root_id)[0];
    assert_eq!(outer.span_kind, SpanKind::Client);
    for (key, value) in [
        ("messaging.system", system),
        ("messaging.destination.name", queue.as_str()),
        ("rpc.system", "mqrpc"),
        ("rpc.service", SERVICE),
    ] {
        assert_eq!(attribute(outer, key).as_deref(), Some(value), "{key} of the call span");
    }
    assert!(attribute(outer, "messaging.message.id").is_some());
    let outer_id = outer.span_context.span_id();
    assert_eq!(own.as_deref().and_then(span_id_in), Some(outer_id), "the request did not carry its call span");
    let handled = find(&process, "nested_trace", outer_id)[0];
    assert_eq!(handled.span_kind, SpanKind::Server);
    assert_eq!(attribute(handled, "messaging.system").as_deref(), Some(system));
    assert_eq!(attribute(handled, "messaging.destination.name"), Some(queue.clone()));
    let inner = find(&call_name("trace_parent"), "trace_parent", handled.span_context.span_id())[0];
    assert_eq!(nested.as_deref().and_then(span_id_in), Some(inner.span_context.span_id()));
    find(&process, "trace_parent", inner.span_context.span_id());

    let flaky = find(&call_name("flaky"), "flaky", root_id)[0];
    let mut attempts = find(&process, "flaky", flaky.span_context.span_id());
    attempts.sort_by_key(|span| attribute(span, "mqrpc.attempt"));
    assert_eq!(attempts.len(), 2, "one process span per attempt: {attempts:#?}");
    let (first, second) = (attempts[0], attempts[1]);
    assert_eq!(attribute(first, "mqrpc.attempt").as_deref(), Some("1"));
    assert_eq!(attribute(first, "error.type").as_deref(), Some("internal"));
    assert_eq!(attribute(second, "mqrpc.attempt").as_deref(), Some("2"));
    let links: Vec<_> = second.links.iter().map(|link| link.span_context.span_id()).collect();
    assert_eq!(links, [first.span_context.span_id()], "the retry does not link to the attempt it follows");

    let send = find(&format!("send {queue}"), "record", root_id)[0];
    assert_eq!(send.span_kind, SpanKind::Producer);
    let recorded = find(&process, "record", send.span_context.span_id())[0];
    assert_eq!(recorded.span_kind, SpanKind::Consumer);

    if !holds_messages(client.transport().as_ref()) {
        return;
    }
    // A durable call's reply, handled by a callback: a child of the durable call's send span.
    let root = tracing::info_span!("test.durable");
    let trace = trace_id(&root);
    probe.add(1, 2).durable("traced").instrument(root.clone()).await.expect("the request is queued");
    let (sender, mut replies) = tokio::sync::mpsc::unbounded_channel();
    let callbacks = DurableCallbacks::new("traced")
        .namespace(&setup.namespace)
        .on(ProbeClient::ADD, move |reply| {
            let sender = sender.clone();
            async move {
                let _ = sender.send(reply.result);
            }
        })
        .start(setup.transport().await)
        .await
        .expect("callbacks start");
    let sum = tokio::time::timeout(WAIT, replies.recv()).await.expect("a reply").expect("open");
    assert_eq!(sum.expect("ok"), 3);
    callbacks.shutdown().await;
    let root_id = root.context_id();
    drop(root);
    // The root, the send, the worker's span and the callback's.
    let spans = wait_for_spans(trace, 4, WAIT).await;
    let callback_queue = naming::callback_queue(Some(&setup.namespace), "traced");
    let send = spans.iter().find(|span| span.name == format!("send {queue}") && span.parent_span_id == root_id);
    let send = send.unwrap_or_else(|| panic!("no send span of the durable call: {spans:#?}"));
    let handled = format!("process {callback_queue}");
    assert!(
        spans.iter().any(|span| span.name == handled && span.parent_span_id == send.span_context.span_id()),
        "the callback's span is not a child of the durable call's: {spans:#?}"
    );
}
