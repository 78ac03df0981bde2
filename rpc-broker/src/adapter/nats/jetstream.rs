//! JetStream: queue and topic streams, their pull consumers (`Pull`), `StreamAcker` and the keep-alive of
//! running deliveries.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, consumer, stream};
use bytes::Bytes;
use futures::StreamExt;
use rpc_core::transport::{AckHandle, Acker, BoxFuture, Confirm, Consumer, Delivery, Outcome};
use rpc_core::{ConsumeOptions, Envelope, Error, QueueOptions, naming};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::mapping::{Origin, from_message};
use super::{CancelOnDrop, Inner, Nats, transport};
use crate::adapter::Counters;

/// JetStream's error code for a stream at its maximum number of messages.
const MAXIMUM_MESSAGES_EXCEEDED: u64 = 10_077;
/// The most messages one pull asks for.
const MAX_BATCH: usize = 256;
/// How long one pull waits for messages before asking again.
const PULL_EXPIRES: Duration = Duration::from_secs(1);
/// Unsettled deliveries a JetStream consumer without a prefetch limit holds at most.
const UNLIMITED_PREFETCH: usize = 4_096;

/// How long a publish to a replicated stream is tried again while the cluster elects a new stream leader.
pub(super) const FAILOVER: Duration = Duration::from_secs(10);

/// How long a JetStream stream remembers message ids to drop duplicates.
pub(super) const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

impl Inner {
    pub(super) fn stream_name(&self, queue: &str) -> String {
        stream_name(&self.options.stream_prefix, queue)
    }

    fn storage(&self) -> stream::StorageType {
        if self.options.memory_storage { stream::StorageType::Memory } else { stream::StorageType::File }
    }

    /// Creates the work-queue stream of `queue` (and of its dead-letter queue) with `options`.
    pub(super) async fn create_queue_stream(&self, queue: &str, options: &QueueOptions) -> Result<(), Error> {
        if !queue.ends_with(".dlq") {
            let dead_letters = naming::dead_letter_queue(queue);
            let config = self.queue_config(&dead_letters, &QueueOptions::new());
            self.jetstream.create_stream(config).await.map_err(|error| stream_error(&dead_letters, &error))?;
        }
        let config = self.queue_config(queue, options);
        self.jetstream.create_stream(config).await.map_err(|error| stream_error(queue, &error))?;
        Ok(())
    }

    pub(super) fn queue_config(&self, queue: &str, options: &QueueOptions) -> stream::Config {
        let mut description = format!("mqrpc queue {queue}");
        if let Some(max) = options.max_deliveries {
            description.push_str(&format!("; max deliveries {max}"));
        }
        stream::Config {
            name: self.stream_name(queue),
            subjects: vec![queue.to_owned()],
            retention: stream::RetentionPolicy::WorkQueue,
            max_messages: options.max_len.map_or(-1, |max| i64::try_from(max).unwrap_or(i64::MAX)),
            discard: stream::DiscardPolicy::New,
            storage: self.storage(),
            num_replicas: self.options.replicas,
            description: Some(description),
            duplicate_window: DUPLICATE_WINDOW,
            ..stream::Config::default()
        }
    }

    pub(super) async fn ensure_topic(&self, topic: &str) -> Result<stream::Stream, Error> {
        let config = stream::Config {
            name: self.stream_name(topic),
            subjects: vec![topic.to_owned()],
            retention: stream::RetentionPolicy::Interest,
            storage: self.storage(),
            num_replicas: self.options.replicas,
            description: Some(format!("mqrpc topic {topic}")),
            duplicate_window: DUPLICATE_WINDOW,
            ..stream::Config::default()
        };
        self.jetstream.get_or_create_stream(config).await.map_err(|error| stream_error(topic, &error))
    }

    /// Publishes to a JetStream subject and waits for the stream's ack. With replicated streams
    /// ([`NatsOptions::replicas`](super::NatsOptions::replicas) above 1), a publish that finds no stream (no
    /// leader answers while the cluster elects a new one) or times out is sent again, the same message id
    /// (deduplicated by the stream), for up to [`FAILOVER`].
    pub(super) async fn publish_stream(&self, subject: &str, headers: HeaderMap, body: Bytes) -> Result<(), Error> {
        let started = std::time::Instant::now();
        let mut pause = Duration::from_millis(50);
        loop {
            let sent = async {
                let ack = self
                    .jetstream
                    .publish_with_headers(subject.to_owned(), headers.clone(), body.clone())
                    .await
                    .map_err(|error| publish_error(subject, &error))?;
                ack.await.map_err(|error| publish_error(subject, &error))
            };
            match sent.await {
                Ok(_) => return Ok(()),
                Err(Error::NoRoute(_) | Error::Transport(_))
                    if self.options.replicas > 1 && started.elapsed() + pause < FAILOVER =>
                {
                    tracing::debug!(subject, "no stream leader answered the publish; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Whether a stream captures `subject`: a callback queue of a transport in JetStream mode does, a plain
    /// subscriber's subject does not. Remembered once found.
    pub(super) async fn stream_captures(&self, subject: &str) -> Result<bool, Error> {
        if Inner::lock(&self.streams).contains_key(subject) || Inner::lock(&self.captured).contains(subject) {
            return Ok(true);
        }
        match self.jetstream.stream_by_subject(subject).await {
            Ok(_) => {
                let mut captured = Inner::lock(&self.captured);
                if captured.len() >= CAPTURED_MAX {
                    captured.clear();
                }
                captured.insert(subject.to_owned());
                Ok(true)
            }
            Err(error) if matches!(error.kind(), jetstream::context::GetStreamByNameErrorKind::NotFound) => Ok(false),
            Err(error) => Err(transport(error)),
        }
    }

    /// The pull consumer of a queue's stream, shared by all its workers, and the queue's maximum deliveries.
    pub(super) async fn queue_consumer(&self, queue: &str) -> Result<(consumer::PullConsumer, Option<u32>), Error> {
        let mut found = match self.jetstream.get_stream(self.stream_name(queue)).await {
            Ok(found) => found,
            Err(error) if is_not_found(&error.kind()) => return Err(Error::NoRoute(queue.to_owned())),
            Err(error) => return Err(transport(error)),
        };
        let max_deliveries =
            found.info().await.map_err(transport)?.config.description.as_deref().and_then(max_deliveries_of);
        let durable = "mqrpc".to_owned();
        let consumer =
            found.get_or_create_consumer(&durable, self.pull_config(durable.clone())).await.map_err(transport)?;
        Ok((consumer, max_deliveries))
    }

    pub(super) fn pull_config(&self, durable: String) -> consumer::pull::Config {
        consumer::pull::Config {
            durable_name: Some(durable),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.options.ack_wait,
            max_deliver: -1,
            max_ack_pending: 65_536,
            deliver_policy: consumer::DeliverPolicy::All,
            ..consumer::pull::Config::default()
        }
    }
}

/// Subjects found captured by a stream are remembered up to this many; past it the memory starts again.
const CAPTURED_MAX: usize = 4_096;

/// A stream name for a queue: its characters other than letters, digits and `-` escaped as `_XX`.
pub(super) fn stream_name(prefix: &str, queue: &str) -> String {
    let mut name = String::with_capacity(prefix.len() + 1 + queue.len() * 2);
    name.push_str(prefix);
    name.push('_');
    for byte in queue.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' {
            name.push(char::from(byte));
        } else {
            name.push_str(&format!("_{byte:02X}"));
        }
    }
    name
}

fn max_deliveries_of(description: &str) -> Option<u32> {
    description.split("; ").find_map(|part| part.strip_prefix("max deliveries ")).and_then(|max| max.parse().ok())
}

impl Nats {
    pub(super) async fn stream_consumer(
        &self,
        queue: &str,
        puller: consumer::PullConsumer,
        max_deliveries: Option<u32>,
        options: ConsumeOptions,
    ) -> Consumer {
        let prefetch = match options.prefetch {
            0 => UNLIMITED_PREFETCH,
            prefetch => usize::try_from(prefetch).unwrap_or(UNLIMITED_PREFETCH),
        };
        let acker = Arc::new(StreamAcker {
            inner: Arc::clone(&self.inner),
            queue: queue.to_owned(),
            counters: self.inner.counters.of(queue),
            max_deliveries,
            held: Mutex::new(HashMap::new()),
        });
        let (sender, receiver) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let pull = Pull {
            puller,
            acker: Arc::clone(&acker),
            permits: Arc::new(Semaphore::new(prefetch)),
            sender,
            cancel: cancel.clone(),
            auto_ack: options.auto_ack,
            next_tag: AtomicU64::new(1),
        };
        tokio::spawn(pull.run());
        tokio::spawn(keep_alive(Arc::downgrade(&acker), self.inner.options.ack_wait / 3));
        let control = CancelOnDrop { cancel, held_by: Some(acker) };
        Consumer::from_channel(receiver, Some(Box::new(control)))
    }
}

/// One unsettled JetStream delivery.
struct Held {
    message: jetstream::Message,
    delivered: u32,
    _permit: OwnedSemaphorePermit,
}

/// Settles JetStream deliveries of one consumer.
pub(super) struct StreamAcker {
    inner: Arc<Inner>,
    queue: String,
    counters: Arc<Counters>,
    max_deliveries: Option<u32>,
    held: Mutex<HashMap<u64, Held>>,
}

impl fmt::Debug for StreamAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamAcker").field("queue", &self.queue).finish_non_exhaustive()
    }
}

impl StreamAcker {
    /// Naks every held delivery: the consumer went away, so they are redelivered now rather than after the
    /// ack wait.
    pub(super) fn release_all(&self) {
        let held: Vec<Held> = Inner::lock(&self.held).drain().map(|(_, held)| held).collect();
        if held.is_empty() {
            return;
        }
        let counters = Arc::clone(&self.counters);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                for held in held {
                    counters.unacked.fetch_sub(1, Ordering::Relaxed);
                    let _ = held.message.ack_with(AckKind::Nak(None)).await;
                }
            });
        }
    }

    /// Moves a message to the queue's dead-letter stream, then terminates it in the queue.
    async fn dead_letter(&self, message: &jetstream::Message) -> Result<(), Error> {
        let dead_letters = naming::dead_letter_queue(&self.queue);
        let headers = message.headers.clone().unwrap_or_default();
        self.inner.publish_stream(&dead_letters, headers, message.payload.clone()).await?;
        message.ack_with(AckKind::Term).await.map_err(|_| Error::Disconnected)?;
        Counters::bump(&self.counters.dead_lettered);
        Ok(())
    }
}

impl Acker for StreamAcker {
    fn settle(&self, tag: u64, outcome: Outcome) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let Some(held) = Inner::lock(&self.held).remove(&tag) else {
                // Released when the consumer went away: JetStream redelivers it.
                return Err(Error::Disconnected);
            };
            self.counters.unacked.fetch_sub(1, Ordering::Relaxed);
            let outcome = match (outcome, self.max_deliveries) {
                (Outcome::Requeue, Some(max)) if held.delivered >= max => Outcome::DeadLetter,
                (outcome, _) => outcome,
            };
            match outcome {
                Outcome::Ack => {
                    held.message.ack().await.map_err(|_| Error::Disconnected)?;
                    Counters::bump(&self.counters.acked);
                    Ok(())
                }
                Outcome::Requeue | Outcome::Release => {
                    held.message.ack_with(AckKind::Nak(None)).await.map_err(|_| Error::Disconnected)
                }
                Outcome::DeadLetter => self.dead_letter(&held.message).await,
            }
        })
    }

    fn publish<'a>(
        &'a self,
        tag: u64,
        queue: &'a str,
        envelope: Envelope,
        confirm: Confirm,
    ) -> BoxFuture<'a, Result<(), Error>> {
        // A delivery this consumer no longer holds was handed back (its consumer went away): JetStream
        // redelivers it, and that delivery answers.
        if !Inner::lock(&self.held).contains_key(&tag) {
            return rpc_core::transport::finished(Err(Error::DeliveryLost));
        }
        self.inner.publish(queue, envelope, confirm)
    }
}

/// Keeps a consumer's unsettled deliveries from being redelivered while their handlers run.
async fn keep_alive(acker: Weak<StreamAcker>, every: Duration) {
    let every = every.max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(every).await;
        let Some(acker) = acker.upgrade() else { return };
        let messages: Vec<jetstream::Message> =
            Inner::lock(&acker.held).values().map(|held| held.message.clone()).collect();
        drop(acker);
        for message in messages {
            let _ = message.ack_with(AckKind::Progress).await;
        }
    }
}

/// Pulls a JetStream consumer's messages into a consumer's stream, at most `permits` unsettled at a time.
struct Pull {
    puller: consumer::PullConsumer,
    acker: Arc<StreamAcker>,
    permits: Arc<Semaphore>,
    sender: mpsc::UnboundedSender<Delivery>,
    cancel: CancellationToken,
    auto_ack: bool,
    next_tag: AtomicU64,
}

impl Pull {
    async fn run(self) {
        let mut failures = 0u32;
        loop {
            let first = tokio::select! {
                // Checked first: a consumer dropped while holding every permit frees them as it naks what it
                // held, and a pull made with one would take those messages back once more (another delivery,
                // handed back again).
                biased;
                () = self.cancel.cancelled() => return,
                permit = Arc::clone(&self.permits).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            let wanted = (self.permits.available_permits() + 1).min(MAX_BATCH);
            // Not cancelled midway: a pull request sent and then forgotten would hold messages until the ack
            // wait. Cancelling is handled while reading the batch.
            let batch = self.puller.fetch().max_messages(wanted).expires(PULL_EXPIRES).messages().await;
            let mut batch = match batch {
                Ok(batch) => {
                    failures = 0;
                    batch
                }
                Err(error) => {
                    tracing::debug!(%error, queue = %self.acker.queue, "pulling from JetStream failed; retrying");
                    failures = failures.saturating_add(1);
                    drop(first);
                    tokio::select! {
                        () = self.cancel.cancelled() => return,
                        () = tokio::time::sleep(rpc_core::retry::reconnect_backoff(failures, Duration::from_secs(2))) => {}
                    }
                    continue;
                }
            };
            let mut first = Some(first);
            loop {
                let item = tokio::select! {
                    // Checked first: a consumer paused or gone takes nothing more.
                    biased;
                    () = self.cancel.cancelled() => {
                        Pull::hand_back(batch).await;
                        return;
                    }
                    item = batch.next() => item,
                };
                let Some(item) = item else { break };
                let Ok(message) = item else { break };
                let permit = match first.take() {
                    Some(permit) => permit,
                    None => match Arc::clone(&self.permits).try_acquire_owned() {
                        Ok(permit) => permit,
                        // More than asked for: hand it back for redelivery.
                        Err(_) => {
                            let _ = message.ack_with(AckKind::Nak(None)).await;
                            continue;
                        }
                    },
                };
                if !self.forward(message, permit).await {
                    Pull::hand_back(batch).await;
                    return;
                }
            }
            if self.cancel.is_cancelled() {
                return;
            }
        }
    }

    /// Hands back what the rest of `batch` brings: the pull request stays open on the server until it expires,
    /// and its messages must not wait out the ack wait.
    async fn hand_back(mut batch: consumer::pull::Batch) {
        while let Some(Ok(message)) = batch.next().await {
            let _ = message.ack_with(AckKind::Nak(None)).await;
        }
    }

    /// Hands one message on; false when the consumer is gone (the message is handed back then).
    async fn forward(&self, message: jetstream::Message, permit: OwnedSemaphorePermit) -> bool {
        let (delivered, stored_at) = match message.info() {
            Ok(info) => (
                u32::try_from(info.delivered).unwrap_or(1).max(1),
                u64::try_from(info.published.unix_timestamp_nanos() / 1_000_000).ok(),
            ),
            Err(_) => (1, None),
        };
        let (envelope, queued) = from_message(&message.message, Origin::Stream { stored_at_ms: stored_at });
        let counters = &self.acker.counters;
        if self.acker.max_deliveries.is_some_and(|max| delivered > max) {
            if let Err(error) = self.acker.dead_letter(&message).await {
                tracing::warn!(%error, "could not dead-letter a message past its maximum deliveries");
            }
            return true;
        }
        let handle = if self.auto_ack {
            let _ = message.ack().await;
            AckHandle::auto()
        } else {
            let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
            counters.unacked.fetch_add(1, Ordering::Relaxed);
            Inner::lock(&self.acker.held).insert(tag, Held { message, delivered, _permit: permit });
            AckHandle::new(Arc::clone(&self.acker) as Arc<dyn Acker>, tag)
        };
        let delivery = Delivery {
            envelope: Arc::new(envelope),
            delivery_count: delivered,
            queued,
            received_at: Instant::now(),
            handle,
        };
        match self.sender.send(delivery) {
            Ok(()) => true,
            Err(mpsc::error::SendError(delivery)) => {
                // The consumer went away, and released what it held, after this one was taken: without a nak
                // here it would wait out the ack wait.
                let _ = delivery.handle.release().await;
                false
            }
        }
    }
}

pub(super) fn is_not_found(kind: &jetstream::context::GetStreamErrorKind) -> bool {
    matches!(kind, jetstream::context::GetStreamErrorKind::JetStream(error)
        if error.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

pub(super) fn stream_error(name: &str, error: &jetstream::context::CreateStreamError) -> Error {
    match error.kind() {
        jetstream::context::CreateStreamErrorKind::JetStream(inner)
            if inner.error_code() == jetstream::ErrorCode::STREAM_NAME_EXIST =>
        {
            Error::InvalidArgument(format!(
                "`{name}` exists with other options than these: declare it with the defaults to use it as it is"
            ))
        }
        jetstream::context::CreateStreamErrorKind::JetStreamUnavailable => {
            Error::Unsupported("JetStream (start nats-server with -js)")
        }
        _ => Error::Transport(error.to_string().into()),
    }
}

fn publish_error(subject: &str, error: &jetstream::context::PublishError) -> Error {
    use jetstream::context::PublishErrorKind;
    match error.kind() {
        PublishErrorKind::StreamNotFound => Error::NoRoute(subject.to_owned()),
        PublishErrorKind::BrokenPipe => Error::Disconnected,
        PublishErrorKind::TimedOut => Error::Transport(error.to_string().into()),
        _ => {
            let code = std::error::Error::source(error)
                .and_then(|source| source.downcast_ref::<jetstream::Error>())
                .map(jetstream::Error::error_code);
            if code == Some(jetstream::ErrorCode(MAXIMUM_MESSAGES_EXCEEDED)) {
                Error::QueueFull(subject.to_owned())
            } else {
                Error::Transport(error.to_string().into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names_escape_what_stream_names_cannot_hold() {
        assert_eq!(stream_name("MQRPC", "ns.Calc"), "MQRPC_ns_2ECalc");
        assert_eq!(stream_name("MQRPC", "a_b"), "MQRPC_a_5Fb");
        assert_ne!(stream_name("MQRPC", "a.b"), stream_name("MQRPC", "a_2Eb"));
        assert_eq!(max_deliveries_of("mqrpc queue q; max deliveries 3"), Some(3));
        assert_eq!(max_deliveries_of("mqrpc queue q"), None);
    }
}
