//! The server: workers that consume a service's queue, run its handlers and publish the replies.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tracing::Instrument;

use crate::context;
use crate::dedup::{Begin, DedupStore, MemoryDedup, StoredReply};
use crate::envelope::{Envelope, Kind, ReplyTo};
use crate::error::Error;
use crate::method::{MethodInfo, MethodKind};
use crate::naming;
use crate::retry::RetryPolicy;
use crate::status::{Code, Status};
use crate::transport::{
    self, AckHandle, Answered, BoxFuture, Confirm, ConsumeOptions, Consumer, Delivery, QueueOptions, Transport,
};

/// A service the server can run: implemented by the `<Trait>Server` that `#[service]` generates.
pub trait Service: Send + Sync + 'static {
    /// The service's name on the wire.
    fn name(&self) -> &'static str;

    /// The service's methods.
    fn methods(&self) -> &'static [MethodInfo];

    /// Runs `method` with `args` (the MessagePack map of its arguments). `Ok` holds the encoded result; `Err`
    /// a status, [`Code::Application`] with the encoded error value in its details for the method's own error.
    fn call(&self, method: &str, args: Bytes) -> BoxFuture<'static, Result<Bytes, Status>>;
}

/// Wraps a service with behaviour of its own, tower-style: [`Layer::layer`] takes the inner service and returns
/// the wrapped one (tracing, metrics, authorisation, a per-method policy...). Added with [`Server::layer`].
///
/// A request goes through the server's pipeline (deadline check, dedup claim), then through the layers, the
/// first added outermost, to the service the macro generated; what they return goes on to retry,
/// dead-letter or answer. Layers run inside the request's [`context`](crate::context::current), its deadline
/// and its panic guard, so a layer reads the caller, headers, attempt and deadline from there, and a layer
/// that returns an error status without calling the inner service refuses the request.
///
/// Any `Fn(Box<dyn Service>) -> Box<dyn Service>` is a layer.
pub trait Layer: Send + Sync + 'static {
    /// `inner` wrapped.
    fn layer(&self, inner: Box<dyn Service>) -> Box<dyn Service>;
}

impl<F> Layer for F
where
    F: Fn(Box<dyn Service>) -> Box<dyn Service> + Send + Sync + 'static,
{
    fn layer(&self, inner: Box<dyn Service>) -> Box<dyn Service> {
        self(inner)
    }
}

/// The layers of a server, the first added outermost.
#[derive(Default)]
struct Layers(Vec<Box<dyn Layer>>);

impl Layers {
    fn wrap(&self, service: Box<dyn Service>) -> Box<dyn Service> {
        self.0.iter().rev().fold(service, |inner, layer| layer.layer(inner))
    }
}

impl fmt::Debug for Layers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} layers", self.0.len())
    }
}

/// Configures how a service is served; [`Server::serve`] starts it.
#[derive(Debug)]
pub struct Server {
    transport: Arc<dyn Transport>,
    concurrency: usize,
    prefetch: u32,
    group: Option<String>,
    namespace: Option<String>,
    queue_options: QueueOptions,
    retry: RetryPolicy,
    method_retry: HashMap<String, RetryPolicy>,
    dedup: Option<Arc<dyn DedupStore>>,
    layers: Layers,
}

impl Server {
    /// A server on `transport`: 64 handlers at a time, prefetch 128, no retries, and a [`MemoryDedup`] of
    /// the idempotency keys it executed.
    pub fn new(transport: impl Transport) -> Server {
        Server {
            transport: transport::shared(transport),
            concurrency: 64,
            prefetch: 128,
            group: None,
            namespace: None,
            queue_options: QueueOptions::new(),
            retry: RetryPolicy::none(),
            method_retry: HashMap::new(),
            dedup: Some(Arc::new(MemoryDedup::default())),
            layers: Layers::default(),
        }
    }

    /// Wraps the service in `layer` (see [`Layer`]); layers added first run first.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    ///
    /// use bytes::Bytes;
    /// use rpc_core::transport::BoxFuture;
    /// use rpc_core::{Client, Code, MethodInfo, Server, Service, Status};
    ///
    /// #[rpc_core::service]
    /// pub trait Greeter {
    ///     async fn hello(&self, name: String) -> String;
    /// }
    ///
    /// struct Hi;
    /// impl Greeter for Hi {
    ///     async fn hello(&self, name: String) -> String {
    ///         format!("hello {name}")
    ///     }
    /// }
    ///
    /// /// Counts the requests it sees, and refuses callers without an identity.
    /// struct Guard {
    ///     inner: Box<dyn Service>,
    ///     seen: Arc<AtomicUsize>,
    /// }
    ///
    /// impl Service for Guard {
    ///     fn name(&self) -> &'static str {
    ///         self.inner.name()
    ///     }
    ///
    ///     fn methods(&self) -> &'static [MethodInfo] {
    ///         self.inner.methods()
    ///     }
    ///
    ///     fn call(&self, method: &str, args: Bytes) -> BoxFuture<'static, Result<Bytes, Status>> {
    ///         self.seen.fetch_add(1, Ordering::Relaxed);
    ///         let caller = rpc_core::context::current().and_then(|context| context.caller);
    ///         match caller {
    ///             Some(_) => self.inner.call(method, args),
    ///             None => Box::pin(async { Err(Status::new(Code::InvalidRequest, "say who you are")) }),
    ///         }
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), rpc_core::Error> {
    /// let broker = rpc_broker::Embedded::new();
    /// let seen = Arc::new(AtomicUsize::new(0));
    /// let counter = Arc::clone(&seen);
    /// let server = Server::new(broker.clone())
    ///     .layer(move |inner| Box::new(Guard { inner, seen: Arc::clone(&counter) }) as Box<dyn Service>)
    ///     .serve(GreeterServer::new(Hi))
    ///     .await?;
    ///
    /// let anonymous = Client::connect(broker.clone()).await?;
    /// let refused = GreeterClient::new(&anonymous).hello("ann".into()).await;
    /// assert!(matches!(refused, Err(rpc_core::Error::Remote(status)) if status.code() == Code::InvalidRequest));
    /// let known = Client::builder(broker.clone()).identity("billing").connect().await?;
    /// assert_eq!(GreeterClient::new(&known).hello("bob".into()).await?, "hello bob");
    /// assert_eq!(seen.load(Ordering::Relaxed), 2);
    /// # server.shutdown(std::time::Duration::from_secs(1)).await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn layer(mut self, layer: impl Layer) -> Server {
        self.layers.0.push(Box::new(layer));
        self
    }

    /// How the service's requests are retried when their handler fails (default [`RetryPolicy::none`]).
    /// Broadcasts are not retried.
    pub fn retry(mut self, policy: RetryPolicy) -> Server {
        self.retry = policy;
        self
    }

    /// How requests of `method` are retried, instead of the service's policy.
    pub fn retry_method(mut self, method: impl Into<String>, policy: RetryPolicy) -> Server {
        self.method_retry.insert(method.into(), policy);
        self
    }

    /// Where the idempotency keys this server executed are remembered, so that a request delivered again gets
    /// the stored reply instead of a second execution (default: a [`MemoryDedup`] of this server's own).
    /// Servers given clones of one store share it.
    pub fn dedup(mut self, store: impl DedupStore) -> Server {
        self.dedup = Some(Arc::new(store));
        self
    }

    /// Executes every delivery, remembering no idempotency key: a request delivered twice runs twice.
    pub fn without_dedup(mut self) -> Server {
        self.dedup = None;
        self
    }

    /// How many handlers run at once (at least 1).
    ///
    /// Each request is first polled in the server's own task: a handler that finishes without waiting costs no
    /// task of its own, and the replies of a batch of requests leave together. A handler that waits moves to a
    /// task of its own and runs in parallel with the others. After a first poll that computes for longer than
    /// half a millisecond, requests go straight to tasks for a second, so that a CPU-heavy service keeps every
    /// core busy.
    pub fn concurrency(mut self, concurrency: usize) -> Server {
        self.concurrency = concurrency.max(1);
        self
    }

    /// How many unacked requests the broker hands this server at once (at least 1).
    pub fn prefetch(mut self, prefetch: u32) -> Server {
        self.prefetch = prefetch.max(1);
        self
    }

    /// The subscriber group for broadcast methods (default: the service's name, so that all servers of a
    /// service share one copy). Servers in different groups each receive every broadcast.
    pub fn group(mut self, group: impl Into<String>) -> Server {
        self.group = Some(group.into());
        self
    }

    /// Prefixes queue and topic names with `namespace.`; clients must use the same namespace.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Server {
        self.namespace = Some(namespace.into());
        self
    }

    /// Options for declaring the service's queue (default: none, which accepts the queue as it exists).
    pub fn queue_options(mut self, options: QueueOptions) -> Server {
        self.queue_options = options;
        self
    }

    /// Declares the service's queue, starts consuming it (and the broadcast topic if the service has
    /// broadcast methods) and returns a handle to the running server.
    ///
    /// # Errors
    /// Whatever the transport reports when declaring or consuming.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub async fn serve<S: Service>(self, service: S) -> Result<ServerHandle, Error> {
        let namespace = self.namespace.as_deref();
        let queue = naming::service_queue(namespace, service.name());
        self.transport.declare_queue(&queue, &self.queue_options).await?;
        let options = ConsumeOptions::new().prefetch(self.prefetch);
        let requests = self.transport.consume(&queue, options).await?;
        let broadcasts = if service.methods().iter().any(|method| method.kind == MethodKind::Broadcast) {
            let topic = naming::service_topic(namespace, service.name());
            let group = self.group.as_deref().unwrap_or(service.name());
            Some(self.transport.subscribe(&topic, group, options).await?)
        } else {
            None
        };
        let shared = Arc::new(Shared {
            transport: self.transport,
            service: self.layers.wrap(Box::new(service)),
            stats: Counters::default(),
            queue,
            retry: self.retry,
            method_retry: self.method_retry,
            dedup: self.dedup,
        });
        let (stop, stop_rx) = oneshot::channel();
        let task = tokio::spawn(run(Arc::clone(&shared), requests, broadcasts, self.concurrency, stop_rx));
        Ok(ServerHandle { shared, stop: Some(stop), task: Some(task) })
    }
}

struct Shared {
    transport: Arc<dyn Transport>,
    service: Box<dyn Service>,
    stats: Counters,
    /// The service's queue, where retries go.
    queue: String,
    retry: RetryPolicy,
    method_retry: HashMap<String, RetryPolicy>,
    dedup: Option<Arc<dyn DedupStore>>,
}

impl Shared {
    fn policy(&self, method: &str) -> &RetryPolicy {
        self.method_retry.get(method).unwrap_or(&self.retry)
    }
}

#[derive(Default)]
struct Counters {
    handled: AtomicU64,
    failed: AtomicU64,
    panicked: AtomicU64,
    expired: AtomicU64,
    rejected: AtomicU64,
    undeliverable: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    deduplicated: AtomicU64,
    fenced: AtomicU64,
    cancelled: AtomicU64,
}

/// A snapshot of a server's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerStats {
    /// Requests handled and acked (any outcome).
    pub handled: u64,
    /// Handled requests whose reply was not ok (panics and expired ones included).
    pub failed: u64,
    /// Handlers that panicked.
    pub panicked: u64,
    /// Requests not run because their deadline had passed.
    pub expired: u64,
    /// Messages dead-lettered because they were not requests.
    pub rejected: u64,
    /// Replies that could not be delivered because the reply address was gone.
    pub undeliverable: u64,
    /// Failed requests put back on the queue for another attempt.
    pub retried: u64,
    /// Requests dead-lettered after their last attempt failed.
    pub dead_lettered: u64,
    /// Requests answered with the stored reply of their idempotency key instead of a second execution.
    pub deduplicated: u64,
    /// Replies not sent because the broker had taken their request back (this worker's connection was lost
    /// while the handler ran, and the request was redelivered): the delivery that has it now answers.
    pub fenced: u64,
    /// Handlers stopped because their caller cancelled the call; the request is acked without a reply.
    pub cancelled: u64,
}

impl ServerStats {
    fn of(stats: &Counters) -> ServerStats {
        ServerStats {
            handled: stats.handled.load(Ordering::Relaxed),
            failed: stats.failed.load(Ordering::Relaxed),
            panicked: stats.panicked.load(Ordering::Relaxed),
            expired: stats.expired.load(Ordering::Relaxed),
            rejected: stats.rejected.load(Ordering::Relaxed),
            undeliverable: stats.undeliverable.load(Ordering::Relaxed),
            retried: stats.retried.load(Ordering::Relaxed),
            dead_lettered: stats.dead_lettered.load(Ordering::Relaxed),
            deduplicated: stats.deduplicated.load(Ordering::Relaxed),
            fenced: stats.fenced.load(Ordering::Relaxed),
            cancelled: stats.cancelled.load(Ordering::Relaxed),
        }
    }
}

/// What a graceful shutdown did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Requests handed to this server but not started, handed back to the queue at once.
    pub released: usize,
    /// Handlers that finished within the grace period.
    pub finished: usize,
    /// Handlers still running at the end of the grace period, stopped; their requests go back to the queue.
    pub aborted: usize,
    /// The server's counters once it stopped.
    pub stats: ServerStats,
}

/// A running server. Dropping it stops the server at once: running handlers are stopped and their requests
/// requeued. Call [`ServerHandle::shutdown`] to let them finish first.
pub struct ServerHandle {
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<Duration>>,
    task: Option<JoinHandle<ShutdownReport>>,
}

impl fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerHandle")
            .field("service", &self.shared.service.name())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl ServerHandle {
    /// The server's counters.
    pub fn stats(&self) -> ServerStats {
        ServerStats::of(&self.shared.stats)
    }

    /// Stops taking requests, lets running handlers finish for up to `grace`, then stops the rest; every
    /// request not answered goes back to the queue for another worker. Nothing is lost.
    pub async fn shutdown(mut self, grace: Duration) -> ShutdownReport {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(grace);
        }
        match self.task.take() {
            Some(task) => task.await.unwrap_or_default(),
            None => ShutdownReport::default(),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn run(
    shared: Arc<Shared>,
    mut requests: Consumer,
    mut broadcasts: Option<Consumer>,
    concurrency: usize,
    mut stop: oneshot::Receiver<Duration>,
) -> ShutdownReport {
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut tasks = JoinSet::new();
    let mut inline = Inline::default();
    let grace = loop {
        let permit = tokio::select! {
            biased;
            grace = &mut stop => break grace.unwrap_or_default(),
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break Duration::ZERO,
            },
        };
        let delivery = tokio::select! {
            biased;
            grace = &mut stop => break grace.unwrap_or_default(),
            delivery = requests.next() => delivery.map(|delivery| (delivery, Source::Queue)),
            Some(delivery) = next(&mut broadcasts) => Some((delivery, Source::Topic)),
        };
        let Some((delivery, source)) = delivery else {
            tracing::warn!(service = shared.service.name(), "the request consumer closed; the server stops");
            break Duration::ZERO;
        };
        let mut work = handle(Arc::clone(&shared), delivery, source, permit);
        if inline.allows() && inline.run(&mut work) {
            continue;
        }
        tasks.spawn(work);
        while tasks.try_join_next().is_some() {}
    };

    // Handlers that are done already are not counted as finishing within the grace period.
    while tasks.try_join_next().is_some() {}
    // No new deliveries from here on; those buffered and not started go back to the queue for other workers.
    let mut report = ShutdownReport::default();
    for consumer in std::iter::once(&mut requests).chain(broadcasts.as_mut()) {
        consumer.pause();
        while let Some(delivery) = consumer.try_next() {
            report.released += 1;
            settle(delivery.handle.release().await);
        }
    }
    let deadline = Instant::now().checked_add(grace);
    loop {
        let joined = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, tasks.join_next()).await,
            None => Ok(tasks.join_next().await),
        };
        match joined {
            Ok(Some(_)) => report.finished += 1,
            Ok(None) => break,
            Err(_) => {
                report.aborted = tasks.len();
                tasks.shutdown().await;
                break;
            }
        }
    }
    // Dropping the consumers after the handlers are done hands every unsettled delivery back to the broker.
    drop(requests);
    drop(broadcasts);
    if let Err(error) = shared.transport.flush().await {
        tracing::warn!(%error, "the broker may not have the last settles; it redelivers what it did not see");
    }
    report.stats = ServerStats::of(&shared.stats);
    report
}

/// Runs requests in the server's own task while their handlers finish at once.
///
/// A request is first polled here, in the loop that takes deliveries: a handler that completes without waiting
/// (most do: decode, compute, publish the reply, ack) costs no task and no wake-up, and the replies of a batch
/// of deliveries leave in one write. One that waits (on I/O, a timer, a lock) is moved to a task of its own
/// and runs in parallel with the next. A handler that computes for long in its first poll would hold the
/// loop: after one first poll longer than [`Inline::LONG`], or [`Inline::STRIKES`] longer than
/// [`Inline::SLOW`] in a row, every request goes straight to a task for [`Inline::BACKOFF`]. Slow polls between
/// fast ones do not count: the thread was preempted (on a busy machine, at every end of its time slice), or a
/// store grew its table, and a second of spawned tasks would cost more than the slow poll did.
#[derive(Default)]
struct Inline {
    /// Until when requests go straight to tasks.
    spawn_until: Option<std::time::Instant>,
    /// Slow first polls in a row.
    strikes: u32,
}

impl Inline {
    /// A first poll longer than this is slow.
    const SLOW: Duration = Duration::from_micros(500);
    /// How many slow first polls in a row take the server off inline polling.
    const STRIKES: u32 = 3;
    /// A first poll longer than this takes the server off inline polling at once: longer than a preemption
    /// lasts even on a busy machine (a few time slices), it is a handler that computes.
    const LONG: Duration = Duration::from_millis(50);
    /// How long the server stays off inline polling after that.
    const BACKOFF: Duration = Duration::from_secs(1);

    /// Whether a request may be polled here now. The clock is read only while inline polling is off.
    fn allows(&mut self) -> bool {
        self.spawn_until.is_none() || self.allows_at(std::time::Instant::now())
    }

    fn allows_at(&mut self, now: std::time::Instant) -> bool {
        match self.spawn_until {
            Some(until) if now < until => false,
            Some(_) => {
                self.spawn_until = None;
                true
            }
            None => true,
        }
    }

    /// Polls `work` once; `true` when it finished (or panicked, which is logged and counts as finished).
    fn run(&mut self, work: &mut BoxFuture<'static, ()>) -> bool {
        let started = std::time::Instant::now();
        // A future polled here with a no-op waker and not ready is polled again by the task it moves to,
        // which registers that task's waker.
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| work.as_mut().now_or_never()));
        let took = started.elapsed();
        self.polled(took, started + took);
        match outcome {
            Ok(done) => done.is_some(),
            Err(panic) => {
                tracing::error!(message = %panic_message(panic.as_ref()), "a request's handling panicked");
                true
            }
        }
    }

    /// Counts a first poll that took `took` and ended at `now`.
    fn polled(&mut self, took: Duration, now: std::time::Instant) {
        if took <= Self::SLOW {
            self.strikes = 0;
            return;
        }
        self.strikes += 1;
        if self.strikes >= Self::STRIKES || took > Self::LONG {
            self.strikes = 0;
            self.spawn_until = now.checked_add(Self::BACKOFF);
        }
    }
}

async fn next(consumer: &mut Option<Consumer>) -> Option<Delivery> {
    match consumer {
        Some(consumer) => consumer.next().await,
        None => std::future::pending().await,
    }
}

/// Where a delivery came from: the service's queue, or a subscriber group of its broadcast topic.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Queue,
    Topic,
}

/// The handling of one delivery, holding `permit` until it is done.
///
/// Not an `async fn`: the delivery is taken apart before the future is made, so that the future (one heap
/// allocation per request) holds the request once, and stays under a kilobyte, which the allocator serves
/// fastest.
fn handle(
    shared: Arc<Shared>,
    delivery: Delivery,
    source: Source,
    permit: OwnedSemaphorePermit,
) -> BoxFuture<'static, ()> {
    let Delivery { envelope, delivery_count, received_at, handle } = delivery;
    if !matches!(envelope.kind, Kind::Request | Kind::Oneway) {
        let kind = envelope.kind;
        return Box::pin(async move {
            shared.stats.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(?kind, "dead-lettering a message that is not a request");
            settle(handle.dead_letter().await);
            drop(permit);
        });
    }
    let attempt = envelope.attempt.max(1).saturating_add(delivery_count.saturating_sub(1));
    let span = tracing::info_span!(
        "rpc.handle",
        service = %envelope.service,
        method = %envelope.method,
        correlation_id = ?envelope.correlation_id,
        attempt,
    );
    let deadline =
        envelope.deadline_ms.and_then(|ms| Instant::from_std(received_at).checked_add(Duration::from_millis(ms)));
    let request = Request {
        envelope: Arc::new(envelope),
        attempt,
        deadline,
        received_at: Instant::from_std(received_at),
        source,
    };
    Box::pin(handle_request(shared, request, handle, permit).instrument(span))
}

/// A request being handled.
struct Request {
    /// Shared with the handler's context.
    envelope: Arc<Envelope>,
    /// Which attempt this is, redeliveries included.
    attempt: u32,
    deadline: Option<Instant>,
    /// When the delivery arrived.
    received_at: Instant,
    source: Source,
}

impl Request {
    fn expired(&self) -> bool {
        self.envelope.deadline_ms == Some(0) || self.deadline.is_some_and(|deadline| deadline <= Instant::now())
    }
}

/// Handles a request, holding `_permit` (a slot of the server's concurrency) until it is done.
async fn handle_request(shared: Arc<Shared>, request: Request, handle: AckHandle, _permit: OwnedSemaphorePermit) {
    let shared = &*shared;
    let stats = &shared.stats;
    let policy = if request.source == Source::Queue { shared.policy(&request.envelope.method) } else { &RETRY_NONE };
    if !policy.is_none() && request.attempt > policy.max_attempts() {
        // Delivered again after its last attempt: the workers that held it stopped before settling it.
        let status =
            Status::new(Code::Internal, "delivered again after its last attempt: the workers holding it stopped");
        // Rare paths are boxed, so that the future of every request stays small.
        Box::pin(dead_letter(shared, &request, handle, policy, status)).await;
        return;
    }
    let claim = match claim(shared, &request).await {
        Claim::Execute(claim) => claim,
        Claim::Answer(result) => {
            stats.deduplicated.fetch_add(1, Ordering::Relaxed);
            answer(shared, request, handle, result).await;
            return;
        }
        Claim::Requeue => {
            settle(handle.requeue().await);
            return;
        }
        Claim::Expired => {
            stats.expired.fetch_add(1, Ordering::Relaxed);
            Box::pin(answer(shared, request, handle, Err(expired_status()))).await;
            return;
        }
    };
    let Some(result) = execute(shared, &request, &handle).await else {
        // The caller cancelled the call: nobody waits for a reply, and it must not run again.
        stats.cancelled.fetch_add(1, Ordering::Relaxed);
        if let Some((store, key)) = &claim {
            store.abandon(key).await;
        }
        settle(handle.ack().await);
        return;
    };
    if let Err(status) = &result
        && !policy.is_none()
        && policy.retries(status.code())
    {
        if let Some((store, key)) = &claim {
            store.abandon(key).await;
        }
        if request.attempt < policy.max_attempts() {
            let wait = policy.backoff_before(request.attempt + 1);
            // After the backoff, the next attempt needs time before the deadline: as long as this one took from
            // its delivery to now (its wait for a worker, and the attempt), and RETRY_MARGIN for the copy's way
            // to a worker and the answer's back. A retry that would start just before the deadline would answer
            // after the caller gave up, where dead-lettering now answers in time.
            let now = Instant::now();
            let took = now.saturating_duration_since(request.received_at);
            if request.deadline.is_none_or(|deadline| now + wait + took + RETRY_MARGIN < deadline) {
                Box::pin(retry(shared, request, handle, wait)).await;
                return;
            }
        }
        let status = status.clone();
        Box::pin(dead_letter(shared, &request, handle, policy, status)).await;
        return;
    }
    if let Some((store, key)) = &claim {
        match &result {
            // Not an outcome to replay (a panic, a deadline, a shutdown): the next delivery runs it again.
            Err(status) if status.code() != Code::Application => store.abandon(key).await,
            _ => settle(store.complete_borrowed(key, &result).await),
        }
    }
    answer(shared, request, handle, result).await;
}

/// The time a retry needs before the deadline past its backoff and the last attempt's time: for the copy's
/// way to a worker and the answer's way back.
const RETRY_MARGIN: Duration = Duration::from_millis(25);

static RETRY_NONE: std::sync::LazyLock<RetryPolicy> = std::sync::LazyLock::new(RetryPolicy::none);

/// `future`'s output, or `None` once `deadline` passes, in an `async` body. The timer is made only for a future
/// that is not ready at its first poll: most handlers and dedup stores finish at once, and a timer costs more
/// than they do. A macro rather than an `async fn`, which would hold the future twice (as its argument and
/// pinned).
macro_rules! within {
    ($deadline:expr, $future:expr) => {{
        let mut future = std::pin::pin!($future);
        match future.as_mut().now_or_never() {
            Some(output) => Some(output),
            None => match $deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, future).await.ok(),
                None => Some(future.await),
            },
        }
    }};
}

/// What the dedup store says about a request.
enum Claim<'a> {
    /// Run it; complete or abandon this claim afterwards.
    Execute(Option<(&'a dyn DedupStore, &'a str)>),
    /// Its key was executed: answer with this.
    Answer(StoredReply),
    /// The store failed: hand the request back rather than risk a second execution.
    Requeue,
    /// The deadline passed while another delivery of the key ran.
    Expired,
}

async fn claim<'a>(shared: &'a Shared, request: &'a Request) -> Claim<'a> {
    let (Some(store), Some(key)) = (shared.dedup.as_deref(), request.envelope.idempotency_key.as_deref()) else {
        return Claim::Execute(None);
    };
    loop {
        let begun = within!(request.deadline, store.begin(key)).ok_or(());
        let wake = match begun {
            Ok(Ok(Begin::Execute)) => return Claim::Execute(Some((store, key))),
            Ok(Ok(Begin::Done(reply))) => return Claim::Answer(reply),
            Ok(Ok(Begin::InProgress(wake))) => wake,
            Ok(Err(error)) => {
                tracing::warn!(%error, key, "the dedup store failed; requeueing the request");
                return Claim::Requeue;
            }
            Err(_) => return Claim::Expired,
        };
        // Another delivery of the same key runs now: its outcome is this one's. Rare: boxed, like the other rare
        // paths.
        let wait = async {
            match wake {
                Some(wake) => wake.await,
                None => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        match request.deadline {
            Some(deadline) => {
                if Box::pin(tokio::time::timeout_at(deadline, wait)).await.is_err() {
                    return Claim::Expired;
                }
            }
            None => Box::pin(wait).await,
        }
    }
}

fn expired_status() -> Status {
    Status::new(Code::DeadlineExceeded, "the deadline passed while the request was queued")
}

/// Runs the handler, within the request's deadline, with its context; a panic becomes [`Code::Internal`].
/// `None`: the caller cancelled the call and the handler was stopped (dropped at its next await).
async fn execute(shared: &Shared, request: &Request, handle: &AckHandle) -> Option<Result<Bytes, Status>> {
    let stats = &shared.stats;
    let envelope = &request.envelope;
    if request.expired() {
        stats.expired.fetch_add(1, Ordering::Relaxed);
        return Some(Err(expired_status()));
    }
    let context =
        context::Current { envelope: Arc::clone(envelope), attempt: request.attempt, deadline: request.deadline };
    let service = &shared.service;
    let run = || {
        // `call` runs at the first poll, inside the panic guard and the context: decoding the arguments is
        // part of the handler.
        let call =
            AssertUnwindSafe(async { service.call(&envelope.method, envelope.body.clone()).await }).catch_unwind();
        let call = context::scope(context, call);
        async {
            // Biased: the handler is polled first.
            tokio::select! {
                biased;
                outcome = call => Some(outcome),
                // Asked for only once the handler waits: no signal is made for one that finishes at once.
                () = async {
                    match handle.cancelled() {
                        Some(cancelled) => cancelled.await,
                        None => std::future::pending().await,
                    }
                } => None,
            }
        }
    };
    let outcome = within!(request.deadline, run());
    Some(match outcome {
        Some(Some(Ok(result))) => result,
        Some(Some(Err(panic))) => {
            stats.panicked.fetch_add(1, Ordering::Relaxed);
            let message = panic_message(panic.as_ref());
            tracing::error!(%message, "handler panicked");
            Err(Status::new(Code::Internal, format!("handler panicked: {message}")))
        }
        Some(None) => return None,
        None => {
            stats.expired.fetch_add(1, Ordering::Relaxed);
            Err(Status::new(Code::DeadlineExceeded, "the handler ran past the caller's deadline"))
        }
    })
}

/// Puts a copy of the request carrying `attempt + 1` on the service's queue, due after the backoff `wait`, in
/// place of this one (fenced: a worker that lost the request makes no copy). Where the transport has delayed delivery the broker holds the copy meanwhile; elsewhere the
/// worker waits out the backoff first, holding the request. If the copy cannot be published, this one goes
/// back to the queue instead.
async fn retry(shared: &Shared, request: Request, handle: AckHandle, wait: Duration) {
    let delayed = shared.transport.capabilities().delayed_delivery && !wait.is_zero();
    if !delayed {
        tokio::time::sleep(wait).await;
    }
    let mut copy = Arc::unwrap_or_clone(request.envelope);
    copy.id = crate::envelope::new_id();
    copy.attempt = request.attempt + 1;
    copy.delay_ms = delayed.then(|| u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1));
    if let Some(deadline) = request.deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        copy.deadline_ms = Some(u64::try_from(left.as_millis()).unwrap_or(u64::MAX).max(1));
    }
    tracing::debug!(attempt = copy.attempt, ?wait, delayed, "retrying a failed request");
    // Counted before the publish: a worker can take the copy, and its caller read the stats, before this
    // publish's confirm comes back.
    shared.stats.retried.fetch_add(1, Ordering::Relaxed);
    let republished = if handle.is_auto() {
        // No reply path of its own: published through the server's transport, unfenced.
        shared.transport.publish(&shared.queue, copy, Confirm::Broker).await.map_err(|error| (error, handle))
    } else {
        handle.republish(&shared.queue, copy).await
    };
    match republished {
        Ok(()) => {}
        Err((Error::DeliveryLost, _)) => {
            // Another worker has the request now, and decides on its next attempt.
            shared.stats.retried.fetch_sub(1, Ordering::Relaxed);
            fenced(shared);
        }
        Err((error, handle)) => {
            shared.stats.retried.fetch_sub(1, Ordering::Relaxed);
            tracing::warn!(%error, "could not put the retry on the queue; requeueing the request");
            settle(handle.requeue().await);
        }
    }
}

/// Gives up on a request: the caller gets [`Code::DeadLettered`] with the last failure, and the request goes to
/// the dead-letter queue, where it can be inspected and replayed.
async fn dead_letter(shared: &Shared, request: &Request, handle: AckHandle, policy: &RetryPolicy, last: Status) {
    let stats = &shared.stats;
    stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
    stats.failed.fetch_add(1, Ordering::Relaxed);
    let why = if request.attempt >= policy.max_attempts() {
        "the last attempt"
    } else {
        "the deadline left no time for another attempt"
    };
    let message =
        format!("attempt {} of {} failed and {why} was reached: {last}", request.attempt, policy.max_attempts());
    tracing::warn!(%message, "dead-lettering a request");
    let status = Status::new(Code::DeadLettered, message).with_details(last.details().clone());
    match reply(shared, &request.envelope, &handle, Err(status)).await {
        Ok(()) => {}
        Err(Error::DeliveryLost) => {
            // Another delivery of it decides now.
            fenced(shared);
            return;
        }
        Err(error) => tracing::warn!(%error, "could not publish the dead-letter reply"),
    }
    settle(handle.dead_letter().await);
}

/// Publishes the reply (for requests) and acks the request; a reply that cannot be published requeues it.
async fn answer(shared: &Shared, request: Request, handle: AckHandle, result: Result<Bytes, Status>) {
    let stats = &shared.stats;
    if result.is_err() {
        stats.failed.fetch_add(1, Ordering::Relaxed);
    }
    let mut envelope = request.envelope;
    if envelope.kind != Kind::Request || envelope.reply_to.is_none() {
        // Nobody waits for a reply.
        stats.handled.fetch_add(1, Ordering::Relaxed);
        settle(handle.ack().await);
        return;
    }
    // The handler's context is gone by now, so the request is this one's alone (unless the handler left a task
    // holding it): its names move into the reply.
    let reply = match Arc::get_mut(&mut envelope) {
        Some(request) => request.take_reply(result),
        None => envelope.reply(result),
    };
    let Some(reply_to) = envelope.reply_to.as_ref() else { return };
    // The reply and the ack in one step.
    let answered = if handle.is_auto() {
        publish_unfenced(shared, reply_to, reply).await
    } else {
        handle.answer(reply_to, reply).await
    };
    match answered {
        Ok(Answered::Sent) => {}
        Ok(Answered::Undeliverable) => undeliverable(shared, reply_to),
        Err(Error::DeliveryLost) => {
            fenced(shared);
            return;
        }
        Err(error) => {
            tracing::warn!(%error, "could not publish the reply; requeueing the request");
            settle(handle.requeue().await);
            return;
        }
    }
    stats.handled.fetch_add(1, Ordering::Relaxed);
}

/// Counts a reply not sent because the broker took its request back from this worker (its connection was
/// lost while the handler ran) and redelivers it: the delivery that has it now answers.
fn fenced(shared: &Shared) {
    shared.stats.fenced.fetch_add(1, Ordering::Relaxed);
    tracing::debug!("reply dropped: the broker took the request back and redelivers it");
}

/// Publishes the reply to a request that has a reply address, fenced by its delivery; a reply address that is
/// gone counts as done.
async fn reply(
    shared: &Shared,
    envelope: &Envelope,
    handle: &AckHandle,
    result: Result<Bytes, Status>,
) -> Result<(), Error> {
    let (Kind::Request, Some(reply_to)) = (envelope.kind, envelope.reply_to.as_ref()) else { return Ok(()) };
    let reply = envelope.reply(result);
    let answered = if handle.is_auto() {
        publish_unfenced(shared, reply_to, reply).await
    } else {
        handle.reply(reply_to, reply).await
    };
    if answered? == Answered::Undeliverable {
        undeliverable(shared, reply_to);
    }
    Ok(())
}

/// Publishes the reply to an auto-acked delivery, which has no reply path of its own, through the server's
/// transport: unfenced.
async fn publish_unfenced(shared: &Shared, reply_to: &ReplyTo, reply: Envelope) -> Result<Answered, Error> {
    Answered::of(shared.transport.publish(reply_to.address(), reply, Confirm::for_reply(reply_to)).await)
}

/// Counts a reply whose address is gone: the caller went with its inbox, and nobody is left to answer.
fn undeliverable(shared: &Shared, reply_to: &ReplyTo) {
    shared.stats.undeliverable.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(reply_to = reply_to.address(), "reply undeliverable: the reply address is gone");
}

fn settle(result: Result<(), Error>) {
    if let Err(error) = result {
        tracing::warn!(%error, "could not settle a delivery; the broker redelivers it");
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(message) = panic.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message.clone()
    } else {
        "a non-string payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_polling_stops_only_after_several_slow_polls_in_a_row() {
        let start = std::time::Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let (slow, fast) = (Inline::SLOW * 10, Inline::SLOW / 10);
        let mut inline = Inline::default();
        // Slow polls between fast ones, however close together, never add up.
        for step in 0..20 {
            inline.polled(if step % 2 == 0 { slow } else { fast }, at(step));
            assert!(inline.allows_at(at(step)), "a lone slow poll stopped inline polling");
        }
        let mut inline = Inline::default();
        for strike in 1..Inline::STRIKES {
            inline.polled(slow, at(u64::from(strike)));
            assert!(inline.allows_at(at(u64::from(strike))));
        }
        inline.polled(slow, at(10));
        assert!(!inline.allows_at(at(11)), "slow polls in a row left inline polling on");
        assert!(!inline.allows_at(at(900)));
        assert!(inline.allows_at(at(1011)), "inline polling did not resume after the backoff");
        // The count starts again after a backoff.
        inline.polled(slow, at(1012));
        assert!(inline.allows_at(at(1013)));
        // A handler that computes for long stops it at once, between fast ones too.
        inline.polled(fast, at(1014));
        inline.polled(Inline::LONG * 2, at(1040));
        assert!(!inline.allows_at(at(1041)), "a long first poll left inline polling on");
    }
}
