//! The server: workers that consume a service's queue, run its handlers and publish the replies.

use std::any::Any;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use tokio::sync::{Semaphore, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tracing::Instrument;

use crate::context::{self, RequestContext};
use crate::envelope::{Envelope, Kind};
use crate::error::Error;
use crate::method::{MethodInfo, MethodKind};
use crate::naming;
use crate::status::{Code, Status};
use crate::transport::{self, AckHandle, BoxFuture, ConsumeOptions, Consumer, Delivery, QueueOptions, Transport};

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

/// Configures how a service is served; [`Server::serve`] starts it.
#[derive(Debug)]
pub struct Server {
    transport: Arc<dyn Transport>,
    concurrency: usize,
    prefetch: u32,
    group: Option<String>,
    namespace: Option<String>,
    queue_options: QueueOptions,
}

impl Server {
    /// A server on `transport`: 64 handlers at a time, prefetch 128.
    pub fn new(transport: impl Transport) -> Server {
        Server {
            transport: transport::shared(transport),
            concurrency: 64,
            prefetch: 128,
            group: None,
            namespace: None,
            queue_options: QueueOptions::new(),
        }
    }

    /// How many handlers run at once (at least 1).
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
        let shared =
            Arc::new(Shared { transport: self.transport, service: Box::new(service), stats: Counters::default() });
        let (stop, stop_rx) = oneshot::channel();
        let task = tokio::spawn(run(Arc::clone(&shared), requests, broadcasts, self.concurrency, stop_rx));
        Ok(ServerHandle { shared, stop: Some(stop), task: Some(task) })
    }
}

struct Shared {
    transport: Arc<dyn Transport>,
    service: Box<dyn Service>,
    stats: Counters,
}

#[derive(Default)]
struct Counters {
    handled: AtomicU64,
    failed: AtomicU64,
    panicked: AtomicU64,
    expired: AtomicU64,
    rejected: AtomicU64,
    undeliverable: AtomicU64,
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
        let stats = &self.shared.stats;
        ServerStats {
            handled: stats.handled.load(Ordering::Relaxed),
            failed: stats.failed.load(Ordering::Relaxed),
            panicked: stats.panicked.load(Ordering::Relaxed),
            expired: stats.expired.load(Ordering::Relaxed),
            rejected: stats.rejected.load(Ordering::Relaxed),
            undeliverable: stats.undeliverable.load(Ordering::Relaxed),
        }
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
            delivery = requests.next() => delivery,
            Some(delivery) = next(&mut broadcasts) => Some(delivery),
        };
        let Some(delivery) = delivery else {
            tracing::warn!(service = shared.service.name(), "the request consumer closed; the server stops");
            break Duration::ZERO;
        };
        let shared = Arc::clone(&shared);
        tasks.spawn(async move {
            handle(&shared, delivery).await;
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    };

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
    report
}

async fn next(consumer: &mut Option<Consumer>) -> Option<Delivery> {
    match consumer {
        Some(consumer) => consumer.next().await,
        None => std::future::pending().await,
    }
}

async fn handle(shared: &Shared, delivery: Delivery) {
    let Delivery { envelope, delivery_count, received_at, handle } = delivery;
    let stats = &shared.stats;
    if !matches!(envelope.kind, Kind::Request | Kind::Oneway) {
        stats.rejected.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(kind = ?envelope.kind, "dead-lettering a message that is not a request");
        settle(handle.dead_letter().await);
        return;
    }
    let span = tracing::info_span!(
        "rpc.handle",
        service = %envelope.service,
        method = %envelope.method,
        correlation_id = ?envelope.correlation_id,
        attempt = envelope.attempt.max(1) + delivery_count.saturating_sub(1),
    );
    let deadline =
        envelope.deadline_ms.and_then(|ms| Instant::from_std(received_at).checked_add(Duration::from_millis(ms)));
    handle_request(shared, envelope, delivery_count, deadline, handle).instrument(span).await;
}

async fn handle_request(
    shared: &Shared,
    envelope: Envelope,
    delivery_count: u32,
    deadline: Option<Instant>,
    handle: AckHandle,
) {
    let stats = &shared.stats;
    let result = if envelope.deadline_ms == Some(0) || deadline.is_some_and(|deadline| deadline <= Instant::now()) {
        stats.expired.fetch_add(1, Ordering::Relaxed);
        Err(Status::new(Code::DeadlineExceeded, "the deadline passed while the request was queued"))
    } else {
        let context = RequestContext {
            correlation_id: envelope.correlation_id,
            service: envelope.service.clone(),
            method: envelope.method.clone(),
            attempt: envelope.attempt.max(1) + delivery_count.saturating_sub(1),
            deadline,
            idempotency_key: envelope.idempotency_key.clone(),
            headers: envelope.headers.clone(),
        };
        let service = &shared.service;
        let body = envelope.body.clone();
        let run = AssertUnwindSafe(async { service.call(&envelope.method, body).await }).catch_unwind();
        let run = context::scope(context, run);
        let outcome = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, run).await.ok(),
            None => Some(run.await),
        };
        match outcome {
            Some(Ok(result)) => result,
            Some(Err(panic)) => {
                stats.panicked.fetch_add(1, Ordering::Relaxed);
                let message = panic_message(panic.as_ref());
                tracing::error!(%message, "handler panicked");
                Err(Status::new(Code::Internal, format!("handler panicked: {message}")))
            }
            None => {
                stats.expired.fetch_add(1, Ordering::Relaxed);
                Err(Status::new(Code::DeadlineExceeded, "the handler ran past the caller's deadline"))
            }
        }
    };
    if result.is_err() {
        stats.failed.fetch_add(1, Ordering::Relaxed);
    }
    if let (Kind::Request, Some(reply_to)) = (envelope.kind, envelope.reply_to.as_deref()) {
        let reply = envelope.reply(result);
        match shared.transport.publish(reply_to, reply).await {
            Ok(()) => {}
            Err(Error::NoRoute(_)) => {
                // The caller is gone (its inbox with it): nobody is left to answer.
                stats.undeliverable.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(reply_to, "reply undeliverable: the reply address is gone");
            }
            Err(error) => {
                tracing::warn!(%error, reply_to, "could not publish the reply; requeueing the request");
                settle(handle.requeue().await);
                return;
            }
        }
    }
    stats.handled.fetch_add(1, Ordering::Relaxed);
    settle(handle.ack().await);
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
