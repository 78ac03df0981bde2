//! The server: workers that consume a service's queue, run its handlers and publish the replies.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use uuid::Uuid;

use crate::dedup::{DedupStore, MemoryDedup};
use crate::error::Error;
use crate::method::{MethodInfo, MethodKind};
use crate::metrics::ServerMetrics;
use crate::naming;
use crate::retry::RetryPolicy;
use crate::status::Status;
use crate::stripe::Striped;
use crate::transport::{self, BoxFuture, ConsumeOptions, Consumer, Delivery, QueueOptions, Transport};

mod direct;
mod inline;
mod outcome;
mod permits;
mod pipeline;

use direct::Direct;
use inline::Inline;
pub(crate) use inline::latest_reading;
use outcome::settle;
use permits::{Permits, Slot};
use pipeline::handle;

/// A service the server can run: implemented by the `<Trait>Server` that `#[service]` generates.
pub trait Service: Send + Sync + 'static {
    /// The service's name on the wire.
    fn name(&self) -> &'static str;

    /// The service's methods.
    fn methods(&self) -> &'static [MethodInfo];

    /// Runs `method` with `args` (the MessagePack map of its arguments). `Ok` holds the encoded result; `Err`
    /// a status, [`Code::Application`](crate::Code::Application) with the encoded error value in its details
    /// for the method's own error.
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
    overrun: Duration,
    layers: Layers,
    version: Option<String>,
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
            overrun: Duration::from_secs(30),
            layers: Layers::default(),
            version: None,
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

    /// How long a handler with a dedup claim may run past its caller's deadline (default 30 s).
    ///
    /// A handler that started may have made its effect, so with a dedup store it is not stopped at the
    /// deadline: it runs to its end and its outcome is stored under the idempotency key, and the caller's retry
    /// with the key gets that outcome (or waits for it, up to its own deadline) instead of running it again.
    /// A handler still running `overrun` past the deadline is stopped, and its key's outcome stored as
    /// [`Code::DeadlineExceeded`](crate::Code::DeadlineExceeded): it is not run again either. A request whose
    /// deadline passed before it started is never started. Without a dedup store
    /// ([`without_dedup`](Server::without_dedup)) handlers stop at the deadline.
    pub fn overrun(mut self, overrun: Duration) -> Server {
        self.overrun = overrun;
        self
    }

    /// How many handlers run at once (at least 1).
    ///
    /// Each request is first polled in the server's own task: a handler that finishes without waiting costs no
    /// task of its own, and the replies of a batch of requests leave together. A handler that waits moves to a
    /// task of its own and runs in parallel with the others. After first polls that compute for longer than
    /// half a millisecond (three in a row, or one over 50 ms), requests go straight to tasks for a second, so
    /// that a CPU-heavy service keeps every core busy.
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

    /// The application's version, told to whoever pings the service's workers
    /// ([`health`](crate::health)); none by default.
    pub fn version(mut self, version: impl Into<String>) -> Server {
        self.version = Some(version.into());
        self
    }

    /// Options for declaring the service's queue (default: none, which accepts the queue as it exists).
    pub fn queue_options(mut self, options: QueueOptions) -> Server {
        self.queue_options = options;
        self
    }

    /// Declares the service's queue, starts consuming it (and the broadcast topic if the service has
    /// broadcast methods), subscribes to its ping topic to answer pings ([`health`](crate::health), where the
    /// transport has private subscriptions) and returns a handle to the running server.
    ///
    /// # Errors
    /// Whatever the transport reports when declaring, consuming or subscribing.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub async fn serve<S: Service>(self, service: S) -> Result<ServerHandle, Error> {
        let namespace = self.namespace.as_deref();
        let queue = naming::service_queue(namespace, service.name());
        self.transport.declare_queue(&queue, &self.queue_options).await?;
        let options = ConsumeOptions::new().prefetch(self.prefetch);
        let mut requests = self.transport.consume(&queue, options).await?;
        let topic = naming::service_topic(namespace, service.name());
        let broadcasts = if service.methods().iter().any(|method| method.kind == MethodKind::Broadcast) {
            let group = self.group.as_deref().unwrap_or(service.name());
            Some(self.transport.subscribe(&topic, group, options).await?)
        } else {
            None
        };
        let pings = match self.transport.subscribe_private(&naming::ping_topic(namespace, service.name())).await {
            Ok(pings) => Some(pings),
            Err(Error::Unsupported(what)) => {
                tracing::debug!(service = service.name(), what, "the transport cannot subscribe privately: no pings");
                None
            }
            Err(error) => return Err(error),
        };
        let shared = Arc::new(Shared {
            metrics: ServerMetrics::new(service.name(), service.methods()),
            transport: self.transport,
            service: self.layers.wrap(Box::new(service)),
            stats: Counters::default(),
            queue,
            topic,
            retry: self.retry,
            method_retry: self.method_retry,
            dedup: self.dedup,
            overrun: self.overrun,
            identity: Identity {
                id: Uuid::new_v4(),
                version: self.version,
                started: Instant::now(),
                concurrency: self.concurrency,
                permits: Permits::new(self.concurrency),
                waiting: AtomicBool::new(false),
                started_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX)),
                last_error: std::sync::Mutex::new(None),
            },
        });
        let (stop, stop_rx) = oneshot::channel();
        let announced = announce(&shared).await;
        let presence = Presence {
            pings: pings.map(|pings| tokio::spawn(answer_pings(Arc::clone(&shared), pings))),
            _announced: announced,
        };
        let inline = Arc::new(Inline::default());
        // Where the transport is in process, requests are handled on the threads that publish them, from the
        // moment `serve` returns; the loop takes those that find every permit taken.
        let direct = Direct::start(&shared, &inline, &mut requests);
        let task = tokio::spawn(run(Arc::clone(&shared), requests, broadcasts, (inline, direct), presence, stop_rx));
        Ok(ServerHandle { shared, stop: Some(stop), task: Some(task) })
    }
}

struct Shared {
    transport: Arc<dyn Transport>,
    metrics: ServerMetrics,
    service: Box<dyn Service>,
    stats: Counters,
    /// The service's queue, where retries go.
    queue: String,
    /// The service's broadcast topic.
    topic: String,
    retry: RetryPolicy,
    method_retry: HashMap<String, RetryPolicy>,
    dedup: Option<Arc<dyn DedupStore>>,
    /// How long a handler with a dedup claim may run past its deadline.
    overrun: Duration,
    /// Who this server is, for pings.
    identity: Identity,
}

/// What a server tells whoever pings it, beyond its counters.
struct Identity {
    id: Uuid,
    version: Option<String>,
    started: Instant,
    concurrency: usize,
    /// The handlers' permits: those taken are the requests in flight, but the one the server holds while it
    /// waits for a delivery.
    permits: Permits,
    /// Whether the server holds a permit and waits for a delivery.
    waiting: AtomicBool,
    /// When it started, in milliseconds since the Unix epoch.
    started_ms: u64,
    /// The last failure, `<code>:<message>`.
    last_error: std::sync::Mutex<Option<String>>,
}

/// How a running server is found: the task answering pings and the transport's announcement, both ended with
/// the server.
struct Presence {
    pings: Option<JoinHandle<()>>,
    _announced: Option<crate::health::Announced>,
}

impl Drop for Presence {
    fn drop(&mut self) {
        if let Some(pings) = &self.pings {
            pings.abort();
        }
    }
}

/// Announces the server through its transport (see [`Transport::announce`]); a failure leaves it unannounced.
async fn announce(shared: &Arc<Shared>) -> Option<crate::health::Announced> {
    let weak = Arc::downgrade(shared);
    let host = crate::health::host_name();
    let info = Arc::new(move || weak.upgrade().map(|shared| shared.worker_info(&host)).unwrap_or_default());
    let methods = shared.service.methods().iter().map(|method| method.name.to_owned()).collect();
    let announcement = crate::health::Announcement::new(shared.service.name(), shared.queue.clone(), methods, info);
    match shared.transport.announce(announcement).await {
        Ok(announced) => announced,
        Err(error) => {
            tracing::warn!(%error, service = shared.service.name(), "the server could not be announced; it serves");
            None
        }
    }
}

/// Answers each ping on `pings` with this worker's [`WorkerInfo`](crate::health::WorkerInfo), until the
/// subscription ends or the server stops.
async fn answer_pings(shared: Arc<Shared>, mut pings: Consumer) {
    let host = crate::health::host_name();
    while let Some(ping) = pings.next().await {
        let ping = ping.envelope;
        let Some(reply_to) = ping.reply_to.as_ref().filter(|_| ping.method == crate::health::PING_METHOD) else {
            tracing::debug!(method = %ping.method, "not a ping on a ping topic; dropped");
            continue;
        };
        let info = shared.worker_info(&host);
        let answer = match crate::codec::encode(&info) {
            Ok(body) => ping.reply(Ok(body)),
            Err(error) => ping.reply(Err(Status::new(crate::Code::Internal, error.to_string()))),
        };
        let confirm = transport::Confirm::for_reply(reply_to);
        if let Err(error) = shared.transport.publish(reply_to.address(), answer, confirm).await {
            tracing::debug!(%error, "an answer to a ping was not sent");
        }
    }
}

impl Shared {
    /// Remembers the last failure, for pings and discovery: `<code>:<message>`, as the NATS service API
    /// writes an endpoint's last error.
    fn failed_with(&self, code: crate::Code, message: &str) {
        let last = format!("{}:{message}", code.as_u16());
        *self.identity.last_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(last);
    }

    /// What this worker says of itself when pinged.
    fn worker_info(&self, host: &str) -> crate::health::WorkerInfo {
        let identity = &self.identity;
        let stats = ServerStats::of(&self.stats);
        let waiting = usize::from(identity.waiting.load(Ordering::Relaxed));
        let in_flight = identity.concurrency.saturating_sub(identity.permits.free() + waiting);
        let last_error = identity.last_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        crate::health::WorkerInfo {
            id: identity.id.to_string(),
            service: self.service.name().to_owned(),
            queue: self.queue.clone(),
            version: identity.version.clone(),
            mqrpc: env!("CARGO_PKG_VERSION").to_owned(),
            host: host.to_owned(),
            pid: std::process::id(),
            uptime_ms: u64::try_from(identity.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            started_ms: identity.started_ms,
            in_flight: u32::try_from(in_flight).unwrap_or(u32::MAX),
            concurrency: u32::try_from(identity.concurrency).unwrap_or(u32::MAX),
            handled: stats.handled,
            failed: stats.failed,
            processing_ns: self.stats.answered().1,
            last_error,
            system: self.transport.system().to_owned(),
        }
    }

    fn policy(&self, method: &str) -> &RetryPolicy {
        self.method_retry.get(method).unwrap_or(&self.retry)
    }
}

#[derive(Default)]
struct Counters {
    /// What every request adds to, by thread: two threads answering requests do not write one line.
    answered: Striped<Answered>,
    failed: AtomicU64,
    panicked: AtomicU64,
    expired: AtomicU64,
    rejected: AtomicU64,
    undeliverable: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    deduplicated: AtomicU64,
    fenced: AtomicU64,
    revoked: AtomicU64,
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
    /// Requests dropped unrun because the broker had taken them back before they started (this worker was
    /// away past its heartbeats, or its connection was lost, and another worker has them now).
    pub revoked: u64,
    /// Handlers stopped because their caller cancelled the call; the request is acked without a reply.
    pub cancelled: u64,
}

/// The counts of one stripe of threads that every request changes.
#[derive(Default)]
struct Answered {
    handled: AtomicU64,
    /// Nanoseconds from deliveries to their outcomes (before the reply's publish), summed over those answered.
    processing_ns: AtomicU64,
}

impl Counters {
    /// Counts the time from a request's delivery, at `received_at`, to its outcome, at `now`.
    fn processed(&self, received_at: Instant, now: Instant) {
        let took = u64::try_from(now.saturating_duration_since(received_at).as_nanos()).unwrap_or(u64::MAX);
        self.answered.get().processing_ns.fetch_add(took, Ordering::Relaxed);
    }

    /// Counts a request handled and settled, whatever its outcome.
    fn handled(&self) {
        self.answered.get().handled.fetch_add(1, Ordering::Relaxed);
    }

    /// The requests handled so far, and the nanoseconds they took: sums over the stripes.
    fn answered(&self) -> (u64, u64) {
        self.answered.iter().fold((0, 0), |(handled, ns), stripe| {
            (handled + stripe.handled.load(Ordering::Relaxed), ns + stripe.processing_ns.load(Ordering::Relaxed))
        })
    }
}

impl ServerStats {
    fn of(stats: &Counters) -> ServerStats {
        ServerStats {
            handled: stats.answered().0,
            failed: stats.failed.load(Ordering::Relaxed),
            panicked: stats.panicked.load(Ordering::Relaxed),
            expired: stats.expired.load(Ordering::Relaxed),
            rejected: stats.rejected.load(Ordering::Relaxed),
            undeliverable: stats.undeliverable.load(Ordering::Relaxed),
            retried: stats.retried.load(Ordering::Relaxed),
            dead_lettered: stats.dead_lettered.load(Ordering::Relaxed),
            deduplicated: stats.deduplicated.load(Ordering::Relaxed),
            fenced: stats.fenced.load(Ordering::Relaxed),
            revoked: stats.revoked.load(Ordering::Relaxed),
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
    (inline, mut direct): (Arc<Inline>, Option<Direct>),
    presence: Presence,
    mut stop: oneshot::Receiver<Duration>,
) -> ShutdownReport {
    let mut tasks = JoinSet::new();
    let grace = loop {
        let slot = tokio::select! {
            biased;
            grace = &mut stop => break grace.unwrap_or_default(),
            () = shared.identity.permits.take() => Slot::taken(Arc::clone(&shared)),
        };
        shared.identity.waiting.store(true, Ordering::Relaxed);
        let delivery = tokio::select! {
            biased;
            grace = &mut stop => break grace.unwrap_or_default(),
            delivery = requests.next() => delivery.map(|delivery| (delivery, Source::Queue)),
            Some(delivery) = next(direct.as_mut().map(|direct| &mut direct.overflow)) => Some((delivery, Source::Queue)),
            Some(delivery) = next(broadcasts.as_mut()) => Some((delivery, Source::Topic)),
        };
        shared.identity.waiting.store(false, Ordering::Relaxed);
        let Some((delivery, source)) = delivery else {
            tracing::warn!(service = shared.service.name(), "the request consumer closed; the server stops");
            break Duration::ZERO;
        };
        let mut work = handle(slot, delivery, source);
        if inline.allows() && inline.run(&mut work) {
            continue;
        }
        tasks.spawn(work);
        while tasks.try_join_next().is_some() {}
    };

    // No new deliveries from here on; those buffered and not started go back to the queue for other workers.
    if let Some(direct) = &direct {
        direct.stop();
    }
    let mut direct_tasks = direct.as_ref().map(Direct::take_tasks).unwrap_or_default();
    // Handlers that are done already are not counted as finishing within the grace period.
    for tasks in [&mut tasks, &mut direct_tasks] {
        while tasks.try_join_next().is_some() {}
    }
    let mut report = ShutdownReport::default();
    let overflow = direct.as_mut().map(|direct| &mut direct.overflow);
    for consumer in std::iter::once(&mut requests).chain(broadcasts.as_mut()).chain(overflow) {
        consumer.pause();
        while let Some(delivery) = consumer.try_next() {
            report.released += 1;
            settle(delivery.handle.release().await);
        }
    }
    let deadline = Instant::now().checked_add(grace);
    for tasks in [&mut tasks, &mut direct_tasks] {
        loop {
            let joined = match deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, tasks.join_next()).await,
                None => Ok(tasks.join_next().await),
            };
            match joined {
                Ok(Some(_)) => report.finished += 1,
                Ok(None) => break,
                Err(_) => {
                    report.aborted += tasks.len();
                    tasks.shutdown().await;
                    break;
                }
            }
        }
    }
    // Dropping the consumers after the handlers are done hands every unsettled delivery back to the broker.
    drop(requests);
    drop(broadcasts);
    drop(presence);
    if let Err(error) = shared.transport.flush().await {
        tracing::warn!(%error, "the broker may not have the last settles; it redelivers what it did not see");
    }
    report.stats = ServerStats::of(&shared.stats);
    report
}

async fn next(consumer: Option<&mut Consumer>) -> Option<Delivery> {
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
