//! NATS through async-nats: feature `nats`, in two modes.
//!
//! **Core NATS** ([`NatsOptions::new`]): a queue is a subject, its consumers a queue group of that name, so
//! workers compete; a topic is a subject and each subscriber group a queue group on it. Core NATS holds no
//! message: there are no acks and no redelivery, and a queue length, a delivery limit or a durable queue is
//! refused with [`Error::Unsupported`]. A call to a service nobody serves fails at once with
//! [`Error::NoResponders`]: each request's reply subject is `<inbox>.<correlation id>`, and the server's
//! no-responders status on it becomes that error. A requeued or released delivery is published again to
//! its subject, so a stopping worker hands its buffered requests to the others.
//!
//! **JetStream** ([`NatsOptions::jetstream`]): a queue is a work-queue stream (file storage) capturing the
//! subject of the queue's name, consumed through one durable pull consumer that all workers share, with
//! explicit acks, redelivery (a dropped consumer naks what it held; a crashed one's messages come back after
//! [`NatsOptions::ack_wait`], which running handlers keep extending) and deduplication by `Nats-Msg-Id` (the
//! envelope id) within the stream's duplicate window. A maximum length is the stream's `max_msgs` with
//! `discard: new` ([`Error::QueueFull`]); the dead-letter queue `<queue>.dlq` is a stream too, and a delivery
//! past the queue's maximum number of deliveries is moved there. A topic is an interest-retention stream with
//! one durable consumer per subscriber group. Replies go through core NATS to the caller's inbox.
//!
//! Between mqrpc processes in core mode, the body of a request, a oneway message or a reply to an mqrpc inbox
//! carries the whole envelope: the byte `0xc1` (which no MessagePack value starts with), the sending time in
//! milliseconds since the Unix epoch (8 bytes, big-endian), then the envelope's MessagePack, size-checked
//! before it is decoded. No headers: the server and both clients skip building, sending and parsing them. An
//! mqrpc inbox is `<inbox>.mqrpc`, which tells a worker to answer in that form.
//!
//! Otherwise headers carry the envelope (see [`crate::adapter::headers`]): `mqrpc-method` (required), `mqrpc-service`,
//! `mqrpc-kind`, `mqrpc-correlation-id`, `mqrpc-deadline-ms`, `mqrpc-sent-at-ms`, `mqrpc-attempt`,
//! `mqrpc-idempotency-key`, and `mqrpc-status` / `mqrpc-status-message` on replies; `Nats-Msg-Id` is the envelope
//! id; in JetStream mode the reply address is `mqrpc-reply-to`, with `mqrpc-reply-inbox: true` for an inbox (the reply
//! subject carries the stream's ack).
//! The payload is the MessagePack of the arguments or the result. A plain NATS client calls a service with
//! `request_with_headers(subject, {mqrpc-method: add}, msgpack_args)` in core mode.
//!
//! Connection loss: the client reconnects with exponential backoff and jitter and resubscribes; while it is
//! disconnected, publishes fail at once with [`Error::Disconnected`] and calls resolve by their deadline.
//!
//! ```no_run
//! # async fn run() -> Result<(), rpc_core::Error> {
//! use rpc_broker::adapter::nats::{Nats, NatsOptions};
//! let transport = Nats::connect_with("nats://127.0.0.1:4222", NatsOptions::jetstream()).await?;
//! let client = rpc_core::Client::builder(transport).connect().await?;
//! # drop(client);
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer, stream};
use async_nats::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use bytes::Bytes;
use futures::{FutureExt, Stream, StreamExt};
use rpc_core::transport::{AckHandle, Acker, BoxFuture, Confirm, Consumer, ConsumerControl, Delivery, Inbox, Outcome};
use rpc_core::{
    Capabilities, Code, ConsumeOptions, Envelope, Error, Kind, QueueOptions, QueueStats, ReplyTo, Transport, codec,
    naming,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{CounterMap, Counters, headers};

/// The header of the message id that JetStream deduplicates on.
const MSG_ID: &str = "Nats-Msg-Id";
/// JetStream's error code for a stream at its maximum number of messages.
const MAXIMUM_MESSAGES_EXCEEDED: u64 = 10_077;
/// The most messages one pull asks for.
const MAX_BATCH: usize = 256;
/// How long one pull waits for messages before asking again.
const PULL_EXPIRES: Duration = Duration::from_secs(1);
/// Unsettled deliveries a JetStream consumer without a prefetch limit holds at most.
const UNLIMITED_PREFETCH: usize = 4_096;

/// How a [`Nats`] transport maps queues.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct NatsOptions {
    /// Queues are JetStream streams (durable, acked) instead of core NATS subjects.
    pub jetstream: bool,
    /// The prefix of the stream names this transport creates (stream names cannot hold the queues' dots).
    pub stream_prefix: String,
    /// How long JetStream waits for an ack before redelivering; a running handler's delivery is extended every
    /// third of it.
    pub ack_wait: Duration,
    /// JetStream streams are kept in memory rather than in files (faster; lost on a server restart).
    pub memory_storage: bool,
    /// The longest wait between two reconnection attempts.
    pub max_backoff: Duration,
}

impl Default for NatsOptions {
    fn default() -> NatsOptions {
        NatsOptions {
            jetstream: false,
            stream_prefix: "MQRPC".to_owned(),
            ack_wait: Duration::from_secs(30),
            memory_storage: false,
            max_backoff: Duration::from_secs(5),
        }
    }
}

impl NatsOptions {
    /// Core NATS.
    pub fn new() -> NatsOptions {
        NatsOptions::default()
    }

    /// JetStream work-queue streams.
    pub fn jetstream() -> NatsOptions {
        NatsOptions { jetstream: true, ..NatsOptions::default() }
    }

    /// Sets [`NatsOptions::stream_prefix`].
    pub fn stream_prefix(mut self, prefix: impl Into<String>) -> NatsOptions {
        self.stream_prefix = prefix.into();
        self
    }

    /// Sets [`NatsOptions::ack_wait`].
    pub fn ack_wait(mut self, ack_wait: Duration) -> NatsOptions {
        self.ack_wait = ack_wait;
        self
    }

    /// Sets [`NatsOptions::memory_storage`].
    pub fn memory_storage(mut self, memory: bool) -> NatsOptions {
        self.memory_storage = memory;
        self
    }

    /// Sets [`NatsOptions::max_backoff`].
    pub fn max_backoff(mut self, backoff: Duration) -> NatsOptions {
        self.max_backoff = backoff;
        self
    }
}

/// A transport on NATS. Cheap to clone: clones share one connection.
#[derive(Clone)]
pub struct Nats {
    inner: Arc<Inner>,
}

impl fmt::Debug for Nats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Nats")
            .field("jetstream", &self.inner.options.jetstream)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

struct Inner {
    client: async_nats::Client,
    /// Core publishes of whole envelopes, on their way to the client in batches.
    outbox: Outbox,
    jetstream: jetstream::Context,
    options: NatsOptions,
    /// Set by the client's events; read by every publish (an atomic, not a lock both runtime threads take).
    connected: Arc<AtomicBool>,
    /// Bumped at every disconnection: replies published to an inbox meanwhile are gone.
    losses: watch::Sender<u64>,
    /// Queues (streams) this transport made sure of, with the options they were declared with.
    streams: Mutex<HashMap<String, QueueOptions>>,
    counters: CounterMap,
    /// The subjects of the queues published to, made once: a subject shared with the client costs no
    /// allocation per publish, where one made from the name costs a copy and the client's clone of it another.
    subjects: dashmap::DashMap<String, async_nats::Subject>,
    closed: AtomicBool,
}

/// Subjects kept in [`Inner::subjects`] at most; a publish to a queue past them makes its own subject.
const SUBJECTS: usize = 1_024;

/// The subject of `queue`, from `subjects` (kept there on first use, while they number under [`SUBJECTS`]).
fn shared_subject(subjects: &dashmap::DashMap<String, async_nats::Subject>, queue: &str) -> async_nats::Subject {
    if let Some(subject) = subjects.get(queue) {
        return subject.clone();
    }
    let subject = async_nats::Subject::from(queue);
    if subjects.len() < SUBJECTS {
        // The clone makes the kept subject's buffer shared: from here on a clone only counts a reference.
        subjects.insert(queue.to_owned(), subject.clone());
    }
    subject
}

impl Inner {
    fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
        mutex.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn check(&self) -> Result<(), Error> {
        if self.closed.load(Ordering::Acquire) {
            Err(Error::Shutdown)
        } else if self.connected.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(Error::Disconnected)
        }
    }

    fn stream_name(&self, queue: &str) -> String {
        stream_name(&self.options.stream_prefix, queue)
    }

    fn storage(&self) -> stream::StorageType {
        if self.options.memory_storage { stream::StorageType::Memory } else { stream::StorageType::File }
    }

    /// Creates the work-queue stream of `queue` (and of its dead-letter queue) with `options`.
    async fn create_queue_stream(&self, queue: &str, options: &QueueOptions) -> Result<(), Error> {
        if !queue.ends_with(".dlq") {
            let dead_letters = naming::dead_letter_queue(queue);
            let config = self.queue_config(&dead_letters, &QueueOptions::new());
            self.jetstream.create_stream(config).await.map_err(|error| stream_error(&dead_letters, &error))?;
        }
        let config = self.queue_config(queue, options);
        self.jetstream.create_stream(config).await.map_err(|error| stream_error(queue, &error))?;
        Ok(())
    }

    fn queue_config(&self, queue: &str, options: &QueueOptions) -> stream::Config {
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
            description: Some(description),
            duplicate_window: DUPLICATE_WINDOW,
            ..stream::Config::default()
        }
    }

    async fn ensure_topic(&self, topic: &str) -> Result<stream::Stream, Error> {
        let config = stream::Config {
            name: self.stream_name(topic),
            subjects: vec![topic.to_owned()],
            retention: stream::RetentionPolicy::Interest,
            storage: self.storage(),
            description: Some(format!("mqrpc topic {topic}")),
            duplicate_window: DUPLICATE_WINDOW,
            ..stream::Config::default()
        };
        self.jetstream.get_or_create_stream(config).await.map_err(|error| stream_error(topic, &error))
    }

    /// Publishes to a JetStream subject and waits for the stream's ack.
    async fn publish_stream(&self, subject: &str, headers: HeaderMap, body: Bytes) -> Result<(), Error> {
        let ack = self
            .jetstream
            .publish_with_headers(subject.to_owned(), headers, body)
            .await
            .map_err(|error| publish_error(subject, &error))?;
        ack.await.map_err(|error| publish_error(subject, &error))?;
        Ok(())
    }

    /// Publishes an envelope to `queue` (a stream in JetStream mode, a subject in core mode, an inbox).
    ///
    /// Not an `async fn`: the message is made before the future, and a core publish awaits only room in the
    /// [`Outbox`] (in core mode, a message without headers: every call and every reply to an mqrpc inbox) or in
    /// the client's queue, so that its future (one allocation per message) stays small; a JetStream publish,
    /// which waits for the stream's ack, has a future of its own.
    /// Publishes `envelope` to `queue`: a reply to an inbox ([`Confirm::Sent`]) through core NATS in either
    /// mode; anything else to the queue's stream in JetStream mode, acknowledged by the server.
    fn publish<'a>(
        &'a self,
        queue: &'a str,
        mut envelope: Envelope,
        confirm: Confirm,
    ) -> BoxFuture<'a, Result<(), Error>> {
        let checked = self.check().and_then(|()| super::refuse_delay(&envelope)).and_then(|()| check_subject(queue));
        if let Err(error) = checked {
            return Box::pin(std::future::ready(Err(error)));
        }
        // Before the headers are made: the envelope's reply address becomes this subject.
        let reply = reply_subject(&mut envelope);
        let to_inbox = confirm == Confirm::Sent;
        if self.options.jetstream && !to_inbox {
            return Box::pin(async move {
                let counters = self.counters.of(queue);
                let headers = to_headers(&envelope, Mode::Stream)?;
                self.publish_stream(queue, headers, envelope.body).await?;
                Counters::bump(&counters.published);
                Ok(())
            });
        }
        // Not per inbox subject: a reply's subject names its call, and a counter per call would never be freed.
        let counters = (!to_inbox).then(|| self.counters.of(queue));
        let mut buffer = [0u8; uuid::fmt::Simple::LENGTH];
        let correlation = envelope.correlation_id.map(|id| &*id.simple().encode_lower(&mut buffer));
        let in_subject =
            |subject: Option<&str>| subject.zip(correlation).is_some_and(|(subject, id)| subject.ends_with(id));
        let mode = Mode::Core {
            to_inbox,
            correlation_in_subject: in_subject(if to_inbox { Some(queue) } else { reply.as_deref() }),
        };
        // Whole in the body between mqrpc processes: a request or a oneway message, and a reply to an mqrpc
        // inbox. A reply to any other subject (a plain client's, whatever its inbox prefix) has headers.
        let framed = if envelope.kind == Kind::Reply { is_envelope_inbox(queue) } else { true };
        let message = if framed {
            envelope.reply_to = None;
            envelope_body(&envelope).map(|body| (HeaderMap::new(), body))
        } else {
            to_headers(&envelope, mode).map(|headers| (headers, envelope.body))
        };
        let (headers, body) = match message {
            Ok(message) => message,
            Err(error) => return Box::pin(std::future::ready(Err(error))),
        };
        // Not in JetStream mode: there a reply is followed by the ack of its request, which goes to the client
        // directly, and must not reach the server before the reply (a crash in between would lose the call).
        if headers.is_empty() && !self.options.jetstream {
            // The whole envelope in the body: through the outbox, which hands the connection batches.
            let outbox = &self.outbox;
            let size_checked = outbox.check(queue, reply.as_deref(), body.len());
            return Box::pin(async move {
                size_checked?;
                let subject = if to_inbox { queue.into() } else { shared_subject(&self.subjects, queue) };
                let message = Outgoing::Message { subject, reply, body };
                outbox.send(message).await.map_err(|_| {
                    if self.closed.load(Ordering::Acquire) { Error::Shutdown } else { Error::Disconnected }
                })?;
                if let Some(counters) = counters {
                    Counters::bump(&counters.published);
                }
                Ok(())
            });
        }
        let subject = queue.to_owned();
        let client = &self.client;
        Box::pin(async move {
            if self.closed.load(Ordering::Acquire) {
                return Err(Error::Shutdown);
            }
            let result = match reply {
                Some(reply) => client.publish_with_reply_and_headers(subject, reply, headers, body).await,
                None => client.publish_with_headers(subject, headers, body).await,
            };
            result.map_err(|error| match error.kind() {
                async_nats::client::PublishErrorKind::Send if self.closed.load(Ordering::Acquire) => Error::Shutdown,
                async_nats::client::PublishErrorKind::Send => Error::Disconnected,
                _ => Error::InvalidArgument(format!("cannot publish to `{queue}`: {error}")),
            })?;
            if let Some(counters) = counters {
                Counters::bump(&counters.published);
            }
            Ok(())
        })
    }

    /// The pull consumer of a queue's stream, shared by all its workers, and the queue's maximum deliveries.
    async fn queue_consumer(&self, queue: &str) -> Result<(consumer::PullConsumer, Option<u32>), Error> {
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

    fn pull_config(&self, durable: String) -> consumer::pull::Config {
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

/// How long a JetStream stream remembers message ids to drop duplicates.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// A stream name for a queue: its characters other than letters, digits and `-` escaped as `_XX`.
fn stream_name(prefix: &str, queue: &str) -> String {
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

/// The first byte of a body that carries a whole envelope: `0xc1` is never used in MessagePack, so no
/// argument or result body (one MessagePack value) starts with it.
const ENVELOPE_MARK: u8 = 0xc1;
/// The bytes before the envelope in such a body: the mark and the sending time.
const ENVELOPE_PREFIX: usize = 1 + 8;
/// The last token of an mqrpc client's inbox address: replies to it carry the whole envelope.
const ENVELOPE_INBOX: &str = "mqrpc";

/// Whether a reply subject `<inbox>.<correlation id>` belongs to an mqrpc inbox.
fn is_envelope_inbox(subject: &str) -> bool {
    subject.rsplit('.').nth(1) == Some(ENVELOPE_INBOX)
}

/// A body carrying `envelope` whole (its reply address travels as the message's reply subject).
fn envelope_body(envelope: &Envelope) -> Result<Bytes, Error> {
    let mut prefix = [0u8; ENVELOPE_PREFIX];
    prefix[0] = ENVELOPE_MARK;
    prefix[1..].copy_from_slice(&super::now_ms().to_be_bytes());
    Ok(codec::encode_envelope_after(&prefix, envelope)?)
}

/// The envelope a message carries whole in its body, if it is such a message.
fn from_envelope_body(message: &async_nats::Message) -> Option<Result<Envelope, Error>> {
    let payload = &message.payload;
    let plain = message.headers.as_ref().is_none_or(HeaderMap::is_empty);
    if !plain || payload.first() != Some(&ENVELOPE_MARK) {
        return None;
    }
    let decoded = (|| {
        let sent_at = payload
            .get(1..ENVELOPE_PREFIX)
            .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
            .map(u64::from_be_bytes)
            .ok_or(codec::CodecError::Malformed("a body marked as an envelope is shorter than its prefix"))?;
        let mut envelope = codec::decode_envelope_bytes(&payload.slice(ENVELOPE_PREFIX..), &codec::Limits::default())?;
        if let Some(budget) = envelope.deadline_ms {
            envelope.deadline_ms = Some(super::remaining_ms(budget, Some(sent_at), super::now_ms()));
        }
        Ok::<_, codec::CodecError>(envelope)
    })();
    Some(decoded.map_err(Error::from).map(|mut envelope| {
        if let Some(reply) = &message.reply {
            envelope.reply_to = Some(ReplyTo::Inbox(reply.as_str().to_owned()));
        }
        envelope
    }))
}

/// The reply subject of a request: `<inbox>.<correlation id>` for a call through an inbox (so that the
/// server's no-responders status names the call), else the envelope's reply address. The envelope's reply
/// address becomes that subject.
fn reply_subject(envelope: &mut Envelope) -> Option<async_nats::Subject> {
    let call = (envelope.kind == Kind::Request).then_some(envelope.correlation_id).flatten();
    let reply_to = match envelope.reply_to.as_mut()? {
        ReplyTo::Inbox(inbox) => {
            if let Some(correlation_id) = call {
                let mut buffer = [0u8; uuid::fmt::Simple::LENGTH];
                let id = correlation_id.simple().encode_lower(&mut buffer);
                if !inbox.ends_with(&*id) {
                    inbox.push('.');
                    inbox.push_str(id);
                }
            }
            inbox
        }
        ReplyTo::Queue(queue) => queue,
    };
    // Copied at its exact size: a subject made from the `String` itself would cost a second allocation.
    Some(async_nats::Subject::from(reply_to.as_str()))
}

/// Refuses a subject NATS would not route as one: empty, an empty token, whitespace, or a wildcard. One pass
/// over the bytes (every publish checks its subject).
fn check_subject(subject: &str) -> Result<(), Error> {
    // The byte before the first counts as a dot: a leading dot is an empty first token.
    let mut previous = b'.';
    let mut valid = true;
    for &byte in subject.as_bytes() {
        let empty_token = byte == b'.' && previous == b'.';
        valid &= !(empty_token || matches!(byte, b' ' | b'\t' | b'\r' | b'\n' | b'*' | b'>'));
        previous = byte;
    }
    // Empty, or a trailing dot: an empty last token.
    valid &= previous != b'.';
    if valid { Ok(()) } else { Err(Error::InvalidArgument(format!("`{subject}` is not a valid NATS subject"))) }
}

fn header(headers: &mut HeaderMap, name: &str, value: &str) -> Result<(), Error> {
    let name = HeaderName::from_str(name).map_err(|_| Error::InvalidArgument(format!("bad header name `{name}`")))?;
    let value = HeaderValue::from_str(value)
        .map_err(|_| Error::InvalidArgument(format!("the value of header `{name}` holds a line break")))?;
    headers.insert(name, value);
    Ok(())
}

/// How a message travels, which decides the headers it needs.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// Into a JetStream stream: every field in a header, the message id for deduplication.
    Stream,
    /// Core NATS: what the subjects already say is left out, since headers cost on every hop.
    Core {
        /// The message goes to a caller's inbox (a reply).
        to_inbox: bool,
        /// The subject the reply goes to (a request) or comes on (a reply) ends with the correlation id.
        correlation_in_subject: bool,
    },
}

/// The headers of an envelope.
fn to_headers(envelope: &Envelope, mode: Mode) -> Result<HeaderMap, Error> {
    let mut map = HeaderMap::new();
    let (stream, to_inbox, correlation_in_subject) = match mode {
        Mode::Stream => (true, false, false),
        Mode::Core { to_inbox, correlation_in_subject } => (false, to_inbox, correlation_in_subject),
    };
    if stream {
        header(&mut map, MSG_ID, &envelope.id.to_string())?;
    }
    // The receiver takes a message with a reply subject for a request, one without for a oneway call, and
    // one on its inbox for a reply: the kind is written only where it says something else.
    let implied = match envelope.kind {
        Kind::Request => envelope.reply_to.is_some(),
        Kind::Oneway => envelope.reply_to.is_none() && !to_inbox,
        Kind::Reply => to_inbox,
    };
    if stream || !implied {
        header(&mut map, headers::KIND, super::kind_name(envelope.kind))?;
    }
    // A reply on an inbox is matched by its correlation id alone: its service and method are not echoed.
    let echo = !(to_inbox && envelope.kind == Kind::Reply);
    if echo && !envelope.service.is_empty() {
        header(&mut map, headers::SERVICE, &envelope.service)?;
    }
    if echo && !envelope.method.is_empty() {
        header(&mut map, headers::METHOD, &envelope.method)?;
    }
    if let Some(correlation_id) = envelope.correlation_id
        && !correlation_in_subject
    {
        header(&mut map, headers::CORRELATION_ID, &correlation_id.to_string())?;
    }
    if stream && let Some(reply_to) = &envelope.reply_to {
        header(&mut map, headers::REPLY_TO, reply_to.address())?;
        if reply_to.is_inbox() {
            header(&mut map, headers::REPLY_TO_INBOX, "true")?;
        }
    }
    if envelope.attempt > 1 {
        header(&mut map, headers::ATTEMPT, &envelope.attempt.to_string())?;
    }
    if let Some(budget) = envelope.deadline_ms {
        header(&mut map, headers::DEADLINE_MS, &budget.to_string())?;
        header(&mut map, headers::SENT_AT_MS, &super::now_ms().to_string())?;
    }
    if let Some(key) = &envelope.idempotency_key {
        header(&mut map, headers::IDEMPOTENCY_KEY, key)?;
    }
    if let Some(caller) = &envelope.caller {
        header(&mut map, headers::CALLER, caller)?;
    }
    if envelope.status != 0 {
        header(&mut map, headers::STATUS, &envelope.status.to_string())?;
    }
    if let Some(message) = &envelope.status_message {
        header(&mut map, headers::STATUS_MESSAGE, &message.replace(['\r', '\n'], " "))?;
    }
    for (name, value) in super::user_headers(&envelope.headers) {
        header(&mut map, name, value)?;
    }
    Ok(map)
}

/// The envelope of a NATS message. `stored_at_ms`: when JetStream stored it (the time queued counts from there).
fn from_message(message: &async_nats::Message, stored_at_ms: Option<u64>) -> Envelope {
    match from_envelope_body(message) {
        Some(Ok(envelope)) => return envelope,
        // Handled as a message without an envelope: a request gets an error reply naming no method.
        Some(Err(error)) => {
            tracing::warn!(%error, subject = %message.subject, "a body marked as an envelope does not decode")
        }
        None => {}
    }
    // One pass over the headers: a lookup by name would build a header name per field.
    let mut fields = Fields::default();
    let mut user = BTreeMap::new();
    for (name, values) in message.headers.iter().flat_map(HeaderMap::iter) {
        let Some(value) = values.first().map(HeaderValue::as_str) else { continue };
        let name: &str = name.as_ref();
        match name {
            headers::REPLY_TO => fields.reply_to = Some(value),
            headers::REPLY_TO_INBOX => fields.reply_to_inbox = value == "true",
            headers::KIND => fields.kind = Some(value),
            MSG_ID => fields.id = Some(value),
            headers::CORRELATION_ID => fields.correlation_id = Some(value),
            headers::SERVICE => fields.service = Some(value),
            headers::METHOD => fields.method = Some(value),
            headers::ATTEMPT => fields.attempt = Some(value),
            headers::DEADLINE_MS => fields.deadline_ms = Some(value),
            headers::SENT_AT_MS => fields.sent_at_ms = Some(value),
            headers::IDEMPOTENCY_KEY => fields.idempotency_key = Some(value),
            headers::CALLER => fields.caller = Some(value),
            headers::STATUS => fields.status = Some(value),
            headers::STATUS_MESSAGE => fields.status_message = Some(value),
            name if super::is_user_header(name) => {
                user.insert(name.to_owned(), value.to_owned());
            }
            _ => {}
        }
    }
    // A message's own reply subject is where its requester waits: an inbox, by NATS's definition.
    let reply_to = match fields.reply_to {
        Some(address) if fields.reply_to_inbox => Some(ReplyTo::Inbox(address.to_owned())),
        Some(address) => Some(ReplyTo::Queue(address.to_owned())),
        None => message.reply.as_ref().map(|reply| ReplyTo::Inbox(reply.as_str().to_owned())),
    };
    let mut envelope = Envelope::new(super::kind_of(fields.kind, reply_to.is_some()));
    if let Some(id) = fields.id.and_then(|id| Uuid::parse_str(id).ok()) {
        envelope.id = id;
    }
    envelope.correlation_id = fields
        .correlation_id
        .and_then(|id| Uuid::parse_str(id).ok())
        .or_else(|| correlation_of_subject(&message.subject))
        .or_else(|| message.reply.as_deref().and_then(correlation_of_subject));
    envelope.reply_to = reply_to;
    envelope.service = fields.service.unwrap_or_default().to_owned();
    envelope.method = fields.method.unwrap_or_default().to_owned();
    envelope.attempt = fields.attempt.and_then(|n| n.parse().ok()).unwrap_or(1).max(1);
    if let Some(budget) = fields.deadline_ms.and_then(|budget| budget.parse::<u64>().ok()) {
        let sent_at = stored_at_ms.or_else(|| fields.sent_at_ms.and_then(|sent| sent.parse().ok()));
        envelope.deadline_ms = Some(super::remaining_ms(budget, sent_at, super::now_ms()));
    }
    envelope.idempotency_key = fields.idempotency_key.map(str::to_owned);
    envelope.caller = fields.caller.map(str::to_owned);
    envelope.status = fields.status.and_then(|code| code.parse().ok()).unwrap_or(0);
    envelope.status_message = fields.status_message.map(str::to_owned);
    envelope.headers = user;
    envelope.body = message.payload.clone();
    envelope
}

/// The envelope's fields among a message's headers.
#[derive(Default)]
struct Fields<'a> {
    reply_to: Option<&'a str>,
    reply_to_inbox: bool,
    kind: Option<&'a str>,
    id: Option<&'a str>,
    correlation_id: Option<&'a str>,
    service: Option<&'a str>,
    method: Option<&'a str>,
    attempt: Option<&'a str>,
    deadline_ms: Option<&'a str>,
    sent_at_ms: Option<&'a str>,
    idempotency_key: Option<&'a str>,
    caller: Option<&'a str>,
    status: Option<&'a str>,
    status_message: Option<&'a str>,
}

/// Whether a reply is JetStream's publish ack rather than an answer (no envelope headers, a JSON ack body).
fn is_stream_ack(message: &async_nats::Message) -> bool {
    let ours = message.headers.as_ref().is_some_and(|map| map.get(headers::KIND).is_some());
    !ours && message.payload.starts_with(b"{\"stream\":")
}

/// The correlation id that ends an inbox subject `<inbox>.<correlation id>`.
fn correlation_of_subject(subject: &str) -> Option<Uuid> {
    subject.rsplit('.').next().and_then(|last| Uuid::parse_str(last).ok())
}

impl Nats {
    /// Connects to NATS at `url` (`nats://host:port`, several separated by commas) in core mode.
    ///
    /// # Errors
    /// [`Error::Transport`] when the server cannot be reached, [`Error::Unauthorized`] when it refuses.
    pub async fn connect(url: &str) -> Result<Nats, Error> {
        Nats::connect_with(url, NatsOptions::default()).await
    }

    /// Connects with `options`.
    ///
    /// # Errors
    /// As [`Nats::connect`]. In JetStream mode, a server without JetStream makes declaring a queue fail with
    /// [`Error::Unsupported`].
    pub async fn connect_with(url: &str, options: NatsOptions) -> Result<Nats, Error> {
        let connected = Arc::new(AtomicBool::new(true));
        let state = Arc::clone(&connected);
        let losses = watch::Sender::new(0u64);
        let lost = losses.clone();
        let max_backoff = options.max_backoff;
        let client = async_nats::ConnectOptions::new()
            .name("mqrpc")
            .max_reconnects(None)
            .reconnect_delay_callback(move |attempts| {
                if attempts <= 1 {
                    Duration::ZERO
                } else {
                    rpc_core::retry::reconnect_backoff(u32::try_from(attempts).unwrap_or(u32::MAX), max_backoff)
                }
            })
            .event_callback(move |event| {
                match &event {
                    async_nats::Event::Connected => {
                        state.store(true, Ordering::Release);
                    }
                    async_nats::Event::Disconnected => {
                        tracing::warn!("lost the connection to NATS; reconnecting");
                        state.store(false, Ordering::Release);
                        // Core NATS holds nothing for a disconnected subscriber: replies sent meanwhile are gone.
                        lost.send_modify(|losses| *losses += 1);
                    }
                    other => tracing::debug!(event = %other, "NATS connection event"),
                }
                async {}
            })
            .connect(url)
            .await
            .map_err(|error| match error.kind() {
                async_nats::ConnectErrorKind::Authentication | async_nats::ConnectErrorKind::AuthorizationViolation => {
                    Error::Unauthorized(error.to_string())
                }
                _ => transport(error),
            })?;
        let jetstream = jetstream::new(client.clone());
        let outbox = Outbox::start(client.clone());
        let inner = Arc::new(Inner {
            client,
            outbox,
            jetstream,
            options,
            connected,
            losses,
            streams: Mutex::new(HashMap::new()),
            counters: CounterMap::default(),
            subjects: dashmap::DashMap::new(),
            closed: AtomicBool::new(false),
        });
        Ok(Nats { inner })
    }

    /// Whether the connection is up now.
    pub fn is_connected(&self) -> bool {
        self.inner.connected.load(Ordering::Acquire)
    }

    /// The underlying client, for what this transport does not cover.
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// Closes the connection after flushing what was published; later operations fail with [`Error::Shutdown`].
    ///
    /// In core mode, a call, a oneway message or a reply to an mqrpc caller goes through the transport's outbox,
    /// and a publish of one that returned `Ok` reached the connection before it closed; one begun before the
    /// close that the outbox had not taken yet (still waiting for room when it closed, or first polled after)
    /// fails with [`Error::Shutdown`]. A publish of another kind (with headers, or in JetStream mode) fails so
    /// when first polled after the close began; one already waiting for room in the client's own buffer as the
    /// connection drains may return `Ok` and still be lost. Concurrent closes each return once everything is
    /// flushed.
    ///
    /// The task that closes must not hold a publish of its own that waits for room in the outbox (polled once,
    /// then set aside): the close waits for every publish that was given room, and would wait for that one for
    /// ever. Finish or drop such publishes first.
    pub async fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.outbox.close().await;
        // Written before the drain: a drain does not wait for what the connection has not written yet.
        let _ = self.inner.client.flush().await;
        let _ = self.inner.client.drain().await;
    }

    fn core_consumer(&self, subscriber: async_nats::Subscriber, options: ConsumeOptions) -> Consumer {
        let acker = Arc::new(CoreAcker { inner: Arc::clone(&self.inner), held: Mutex::new(HashMap::new()) });
        let cancel = CancellationToken::new();
        let stream = CoreStream {
            subscriber: Some(subscriber),
            cancel: cancel.clone(),
            acker,
            manual: !options.auto_ack,
            next_tag: 0,
        };
        let control = CancelOnDrop { cancel, held_by: None };
        Consumer::new(stream.boxed(), Some(Box::new(control)))
    }

    async fn stream_consumer(
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

/// Publishes on their way to the client's connection handler, handed over by one task in batches.
///
/// async-nats writes what its connection task finds queued when it runs, and a publish wakes that task: from a
/// runtime worker, into the slot that runs next. Calls publishing one by one from their own tasks would each
/// be written alone, a system call and a read on the server per message. Here the first publish wakes the
/// forwarding task, which yields once (tokio runs it again when its worker has nothing else ready, or after at
/// most one maintenance interval of polls: by then the tasks ready on that worker have published too) and then
/// hands over everything queued: the connection task writes the batch at once.
///
/// Used in core mode only (see [`Inner::publish`]). What goes to the client directly (a republished or
/// dead-lettered delivery, a message with headers) may overtake what waits here; core NATS promises no order
/// between publishers either.
struct Outbox {
    sender: mpsc::Sender<Outgoing>,
    /// For the server's maximum payload, as the client knows it now.
    client: async_nats::Client,
    /// Cancelled once the forwarding task has handed over everything it took and ended.
    finished: CancellationToken,
}

/// What goes through the outbox.
enum Outgoing {
    /// A message without headers.
    Message { subject: async_nats::Subject, reply: Option<async_nats::Subject>, body: Bytes },
    /// Answered once everything queued before it is with the client.
    Drained(tokio::sync::oneshot::Sender<()>),
    /// Closes the outbox: later sends fail. Answered once everything the outbox took before it closed is with
    /// the client.
    Close(tokio::sync::oneshot::Sender<()>),
}

impl Outbox {
    /// Messages the outbox holds at most; a publish past it waits for room.
    const CAPACITY: usize = 2_048;
    /// The most messages handed to the client between two yields.
    const BATCH: usize = 256;

    /// An outbox forwarding to `client`, its task on the current runtime.
    fn start(client: async_nats::Client) -> Outbox {
        let (sender, receiver) = mpsc::channel(Outbox::CAPACITY);
        let finished = CancellationToken::new();
        tokio::spawn(Outbox::forward(client.clone(), receiver, finished.clone()));
        Outbox { sender, client, finished }
    }

    /// What the client would refuse, refused before the message is queued: the forwarding task has no one
    /// to tell.
    fn check(&self, subject: &str, reply: Option<&str>, size: usize) -> Result<(), Error> {
        if let Some(reply) = reply
            && (reply.is_empty() || reply.contains([' ', '\t', '\r', '\n']))
        {
            return Err(Error::InvalidArgument(format!("`{reply}` is not a valid NATS reply subject")));
        }
        let max = self.client.max_payload();
        if size > max {
            return Err(Error::InvalidArgument(format!(
                "a message of {size} bytes to `{subject}` is over the server's maximum payload of {max} bytes"
            )));
        }
        Ok(())
    }

    /// Queues `outgoing`; fails once the outbox is closed or its forwarding task is gone (its runtime shut
    /// down).
    async fn send(&self, outgoing: Outgoing) -> Result<(), ()> {
        self.sender.send(outgoing).await.map_err(|_| ())
    }

    /// Once everything queued so far is with the client (once the outbox is closed: everything it took).
    async fn drained(&self) {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.answered(Outgoing::Drained(done), wait).await;
    }

    /// Closes the outbox; returns once every message it took is with the client. A send still waiting for room
    /// when it closes, or begun later, fails.
    ///
    /// The forwarding task waits for a sender that was given room to use it, so the task that closes must not
    /// hold a publish of its own that waits for room (one polled once, then set aside): the close would wait for
    /// it for ever.
    async fn close(&self) {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.answered(Outgoing::Close(done), wait).await;
    }

    /// Sends a barrier and waits for its answer; when the outbox is closed already, for the forwarding task to
    /// finish what it took.
    async fn answered(&self, barrier: Outgoing, wait: tokio::sync::oneshot::Receiver<()>) {
        if self.sender.send(barrier).await.is_ok() {
            let _ = wait.await;
        } else {
            self.finished.cancelled().await;
        }
    }

    /// Hands the queued messages to `client` until the outbox is closed and empty, or every sender is gone;
    /// then answers the closers and cancels `finished` (also when the task is dropped with its runtime).
    async fn forward(client: async_nats::Client, mut receiver: mpsc::Receiver<Outgoing>, finished: CancellationToken) {
        let _finished = finished.drop_guard();
        let mut closers = Vec::new();
        let mut batch = Vec::with_capacity(Outbox::BATCH);
        // Once the outbox is closed, `recv_many` returns 0 only when it is empty and no sender holds room in it:
        // what was let in before the close is forwarded like the rest.
        while receiver.recv_many(&mut batch, Outbox::BATCH).await > 0 {
            tokio::task::yield_now().await;
            while batch.len() < Outbox::BATCH {
                match receiver.try_recv() {
                    Ok(outgoing) => batch.push(outgoing),
                    Err(_) => break,
                }
            }
            let mut refused = None;
            for outgoing in batch.drain(..) {
                match outgoing {
                    Outgoing::Message { subject, reply, body } => {
                        let sent = match reply {
                            Some(reply) => client.publish_with_reply(subject, reply, body).await,
                            None => client.publish(subject, body).await,
                        };
                        // A closed client refuses what `check` let through, and so does one that reconnected to
                        // a server with a smaller maximum payload.
                        if let Err(error) = sent {
                            refused.get_or_insert((0usize, error)).0 += 1;
                        }
                    }
                    Outgoing::Drained(done) => {
                        let _ = done.send(());
                    }
                    Outgoing::Close(done) => {
                        // No send is let in from here on; the closer hears once what was is with the client.
                        receiver.close();
                        closers.push(done);
                    }
                }
            }
            if let Some((count, error)) = refused {
                tracing::warn!(count, %error, "the NATS client refused messages; they are lost");
            }
        }
        for done in closers {
            let _ = done.send(());
        }
    }
}

/// The deliveries of a core NATS subscription, read straight from it (no task in between: a batch of messages
/// reaches the server in one wake-up). A request whose deadline passed while it waited in the subscription's
/// buffer is dropped, as a broker drops an expired message. Pausing hands out what the subscription already
/// buffered, then unsubscribes; dropping it unsubscribes.
struct CoreStream {
    subscriber: Option<async_nats::Subscriber>,
    cancel: CancellationToken,
    acker: Arc<CoreAcker>,
    manual: bool,
    next_tag: u64,
}

impl Stream for CoreStream {
    type Item = Delivery;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        let this = self.get_mut();
        loop {
            let Some(subscriber) = this.subscriber.as_mut() else { return Poll::Ready(None) };
            let message = if this.cancel.is_cancelled() {
                // Paused: only what is already buffered, without waiting.
                match subscriber.next().now_or_never().flatten() {
                    Some(message) => message,
                    None => {
                        // Dropping the subscriber unsubscribes.
                        this.subscriber = None;
                        return Poll::Ready(None);
                    }
                }
            } else {
                match subscriber.poll_next_unpin(cx) {
                    Poll::Ready(Some(message)) => message,
                    Poll::Ready(None) => {
                        this.subscriber = None;
                        return Poll::Ready(None);
                    }
                    Poll::Pending => return Poll::Pending,
                }
            };
            let envelope = from_message(&message, None);
            if envelope.deadline_ms == Some(0) {
                continue;
            }
            this.next_tag += 1;
            let handle = if this.manual {
                Inner::lock(&this.acker.held).insert(this.next_tag, message);
                AckHandle::new(Arc::clone(&this.acker) as Arc<dyn Acker>, this.next_tag)
            } else {
                AckHandle::auto()
            };
            return Poll::Ready(Some(Delivery { envelope, delivery_count: 1, received_at: Instant::now(), handle }));
        }
    }
}

/// Stops a consumer's task: on pause, it stops taking messages; on drop, a JetStream consumer also hands back
/// what it held, for immediate redelivery.
struct CancelOnDrop {
    cancel: CancellationToken,
    held_by: Option<Arc<StreamAcker>>,
}

impl ConsumerControl for CancelOnDrop {
    fn pause(&self) {
        self.cancel.cancel();
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(acker) = &self.held_by {
            acker.release_all();
        }
    }
}

/// Settles core NATS deliveries: there is nothing to ack, but a requeued or released message is published
/// again to its subject and a dead-lettered one to `<subject>.dlq`.
struct CoreAcker {
    inner: Arc<Inner>,
    held: Mutex<HashMap<u64, async_nats::Message>>,
}

impl fmt::Debug for CoreAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoreAcker").finish_non_exhaustive()
    }
}

impl Acker for CoreAcker {
    fn settle(&self, tag: u64, outcome: Outcome) -> BoxFuture<'_, Result<(), Error>> {
        if outcome == Outcome::Ack {
            // An ack (nearly every settle) is done here, without a future to wait on.
            Inner::lock(&self.held).remove(&tag);
            return rpc_core::transport::finished(Ok(()));
        }
        // The message is taken when the future runs: one dropped unpolled leaves it held.
        Box::pin(async move {
            let Some(message) = Inner::lock(&self.held).remove(&tag) else { return Ok(()) };
            let subject = match outcome {
                Outcome::Requeue | Outcome::Release => message.subject.as_str().to_owned(),
                Outcome::Ack | Outcome::DeadLetter => naming::dead_letter_queue(&message.subject),
            };
            let headers = message.headers.unwrap_or_default();
            let result = match message.reply {
                Some(reply) => {
                    self.inner.client.publish_with_reply_and_headers(subject, reply, headers, message.payload).await
                }
                None => self.inner.client.publish_with_headers(subject, headers, message.payload).await,
            };
            result.map_err(|_| Error::Disconnected)
        })
    }

    fn publish<'a>(
        &'a self,
        _tag: u64,
        queue: &'a str,
        envelope: Envelope,
        confirm: Confirm,
    ) -> BoxFuture<'a, Result<(), Error>> {
        // Core NATS holds no delivery that the server could take back: there is nothing to fence by.
        self.inner.publish(queue, envelope, confirm)
    }
}

/// One unsettled JetStream delivery.
struct Held {
    message: jetstream::Message,
    delivered: u32,
    _permit: OwnedSemaphorePermit,
}

/// Settles JetStream deliveries of one consumer.
struct StreamAcker {
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
    fn release_all(&self) {
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
        let envelope = from_message(&message.message, stored_at);
        let counters = &self.acker.counters;
        if envelope.deadline_ms == Some(0) {
            Counters::bump(&counters.expired);
            let _ = message.ack().await;
            return true;
        }
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
        let delivery = Delivery { envelope, delivery_count: delivered, received_at: Instant::now(), handle };
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

impl Transport for Nats {
    fn capabilities(&self) -> Capabilities {
        if self.inner.options.jetstream {
            Capabilities::none()
                .durable(!self.inner.options.memory_storage)
                .acks(true)
                .max_length(true)
                .dead_letter(true)
                .dedup_window(Some(DUPLICATE_WINDOW))
                .requeue(true)
                .subscriber_groups(true)
                .queue_stats(true)
        } else {
            // A requeue is a publish of a copy: core NATS holds no message to put back.
            Capabilities::none().subscriber_groups(true)
        }
    }

    fn declare_queue<'a>(&'a self, queue: &'a str, options: &'a QueueOptions) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.inner.check()?;
            check_subject(queue)?;
            if !self.inner.options.jetstream {
                return if options.max_len.is_some() {
                    Err(Error::Unsupported("a maximum queue length on core NATS (use JetStream mode)"))
                } else if options.max_deliveries.is_some() {
                    Err(Error::Unsupported("a maximum number of deliveries on core NATS (use JetStream mode)"))
                } else if options.durable {
                    Err(Error::Unsupported("durable queues on core NATS (use JetStream mode)"))
                } else {
                    Ok(())
                };
            }
            if Inner::lock(&self.inner.streams).contains_key(queue) {
                return Ok(());
            }
            let exists = self.inner.jetstream.get_stream(self.inner.stream_name(queue)).await.is_ok();
            if !(exists && *options == QueueOptions::new()) {
                let mut options = options.clone();
                // Streams are kept in files (or in memory, by the transport's options) whatever the queue says.
                options.durable = false;
                self.inner.create_queue_stream(queue, &options).await?;
            }
            Inner::lock(&self.inner.streams).insert(queue.to_owned(), options.clone());
            Ok(())
        })
    }

    fn publish<'a>(&'a self, queue: &'a str, envelope: Envelope, confirm: Confirm) -> BoxFuture<'a, Result<(), Error>> {
        self.inner.publish(queue, envelope, confirm)
    }

    fn publish_topic<'a>(&'a self, topic: &'a str, envelope: Envelope) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            if self.inner.options.jetstream {
                self.inner.check()?;
                check_subject(topic)?;
                let known = Inner::lock(&self.inner.streams).contains_key(topic);
                if !known {
                    self.inner.ensure_topic(topic).await?;
                    Inner::lock(&self.inner.streams).insert(topic.to_owned(), QueueOptions::new());
                }
            }
            self.inner.publish(topic, envelope, Confirm::Broker).await
        })
    }

    fn consume<'a>(&'a self, queue: &'a str, options: ConsumeOptions) -> BoxFuture<'a, Result<Consumer, Error>> {
        Box::pin(async move {
            self.inner.check()?;
            check_subject(queue)?;
            if !self.inner.options.jetstream {
                let subscriber = self
                    .inner
                    .client
                    .queue_subscribe(queue.to_owned(), queue.to_owned())
                    .await
                    .map_err(|_| Error::Disconnected)?;
                // The server has the subscription once the flush returns: a call made next finds the worker.
                self.inner.client.flush().await.map_err(|_| Error::Disconnected)?;
                return Ok(self.core_consumer(subscriber, options));
            }
            let (puller, max_deliveries) = self.inner.queue_consumer(queue).await?;
            Ok(self.stream_consumer(queue, puller, max_deliveries, options).await)
        })
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        options: ConsumeOptions,
    ) -> BoxFuture<'a, Result<Consumer, Error>> {
        Box::pin(async move {
            self.inner.check()?;
            check_subject(topic)?;
            if !self.inner.options.jetstream {
                let subscriber = self
                    .inner
                    .client
                    .queue_subscribe(topic.to_owned(), group.to_owned())
                    .await
                    .map_err(|_| Error::Disconnected)?;
                // The server has the subscription once the flush returns: a call made next finds the worker.
                self.inner.client.flush().await.map_err(|_| Error::Disconnected)?;
                return Ok(self.core_consumer(subscriber, options));
            }
            let found = self.inner.ensure_topic(topic).await?;
            let group_queue = format!("{topic}@{group}");
            let dead_letters = naming::dead_letter_queue(&group_queue);
            let config = self.inner.queue_config(&dead_letters, &QueueOptions::new());
            self.inner.jetstream.create_stream(config).await.map_err(|error| stream_error(&dead_letters, &error))?;
            let durable = stream_name("G", group);
            let puller = found
                .get_or_create_consumer(&durable, self.inner.pull_config(durable.clone()))
                .await
                .map_err(transport)?;
            Ok(self.stream_consumer(&group_queue, puller, None, options).await)
        })
    }

    fn open_inbox(&self) -> BoxFuture<'_, Result<Inbox, Error>> {
        Box::pin(async move {
            self.inner.check()?;
            // The last token tells workers that replies may carry the whole envelope.
            let address = format!("{}.{ENVELOPE_INBOX}", self.inner.client.new_inbox());
            let subscriber =
                self.inner.client.subscribe(format!("{address}.*")).await.map_err(|_| Error::Disconnected)?;
            self.inner.client.flush().await.map_err(|_| Error::Disconnected)?;
            let replies = subscriber.map(|message| {
                let envelope = if message.status == Some(StatusCode::NO_RESPONDERS) {
                    // The server's answer to a request nobody consumes: the call fails at once.
                    let mut reply = Envelope::new(Kind::Reply);
                    reply.correlation_id = correlation_of_subject(&message.subject);
                    reply.status = Code::NoResponders.as_u16();
                    reply.status_message = Some("no responders".to_owned());
                    reply
                } else if is_stream_ack(&message) {
                    // A core request to a subject a JetStream stream captures: the stream stored it and acked.
                    let mut reply = Envelope::new(Kind::Reply);
                    reply.correlation_id = correlation_of_subject(&message.subject);
                    reply.status = Code::Unavailable.as_u16();
                    reply.status_message = Some(
                        "a JetStream stream stored the request instead of a worker answering it: the service runs \
                         in JetStream mode, so connect with NatsOptions::jetstream()"
                            .to_owned(),
                    );
                    reply
                } else {
                    let mut reply = from_message(&message, None);
                    reply.kind = Kind::Reply;
                    reply
                };
                Delivery { envelope, delivery_count: 1, received_at: Instant::now(), handle: AckHandle::auto() }
            });
            let losses = Some(self.inner.losses.subscribe());
            Ok(Inbox { address, consumer: Consumer::new(replies.boxed(), None), losses })
        })
    }

    fn queue_stats<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<QueueStats, Error>> {
        Box::pin(async move {
            self.inner.check()?;
            if !self.inner.options.jetstream {
                return Err(Error::Unsupported("queue statistics on core NATS (it holds no messages)"));
            }
            let mut found = match self.inner.jetstream.get_stream(self.inner.stream_name(queue)).await {
                Ok(found) => found,
                Err(error) if is_not_found(&error.kind()) => return Err(Error::NoRoute(queue.to_owned())),
                Err(error) => return Err(transport(error)),
            };
            let info = found.info().await.map_err(transport)?;
            let messages = usize::try_from(info.state.messages).unwrap_or(usize::MAX);
            let consumers = info.state.consumer_count;
            let pending = match found.consumer_info("mqrpc").await {
                Ok(consumer) => consumer.num_ack_pending,
                Err(_) => 0,
            };
            let counters = self.inner.counters.of(queue);
            Ok(counters.stats(messages.saturating_sub(pending), consumers))
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), Error>> {
        // Acks are publishes buffered by the client: flushing it hands them to the server.
        Box::pin(async move {
            if self.inner.closed.load(Ordering::Acquire) {
                return Err(Error::Shutdown);
            }
            self.inner.outbox.drained().await;
            self.inner.client.flush().await.map_err(|_| {
                if self.inner.closed.load(Ordering::Acquire) { Error::Shutdown } else { Error::Disconnected }
            })
        })
    }
}

fn is_not_found(kind: &jetstream::context::GetStreamErrorKind) -> bool {
    matches!(kind, jetstream::context::GetStreamErrorKind::JetStream(error)
        if error.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

fn stream_error(name: &str, error: &jetstream::context::CreateStreamError) -> Error {
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

fn transport(error: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Transport(Box::new(error))
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

    #[test]
    fn an_envelope_round_trips_through_headers() {
        let mut envelope = Envelope::new(Kind::Request);
        envelope.correlation_id = Some(Uuid::new_v4());
        envelope.service = "Calculator".into();
        envelope.method = "add".into();
        envelope.reply_to = Some(ReplyTo::Inbox("_INBOX.abc".into()));
        envelope.deadline_ms = Some(5_000);
        envelope.attempt = 2;
        envelope.idempotency_key = Some("key".into());
        envelope.caller = Some("billing".into());
        envelope.headers.insert("order".into(), "7".into());
        envelope.body = Bytes::from_static(b"\x81\xa1a\x01");
        let mut sent = envelope.clone();
        let reply = reply_subject(&mut sent).expect("a reply subject");
        assert_eq!(reply.as_str(), format!("_INBOX.abc.{}", envelope.correlation_id.expect("set").simple()));
        for mode in [Mode::Stream, Mode::Core { to_inbox: false, correlation_in_subject: true }] {
            let message = async_nats::Message {
                subject: "ns.Calculator".into(),
                reply: Some(reply.clone()),
                payload: sent.body.clone(),
                headers: Some(to_headers(&sent, mode).expect("maps")),
                status: None,
                description: None,
                length: 0,
            };
            let back = from_message(&message, None);
            assert!(back.deadline_ms.is_some_and(|left| left > 4_000 && left <= 5_000), "{:?}", back.deadline_ms);
            let mut expected = sent.clone();
            expected.deadline_ms = back.deadline_ms;
            if matches!(mode, Mode::Core { .. }) {
                // Core NATS has no deduplication: the message id is not sent, and the receiver makes its own.
                expected.id = back.id;
            }
            assert_eq!(back, expected, "{mode:?}");
        }
    }

    fn plain_message(subject: &str, reply: Option<&str>, payload: Bytes) -> async_nats::Message {
        async_nats::Message {
            subject: subject.into(),
            reply: reply.map(Into::into),
            payload,
            headers: None,
            status: None,
            description: None,
            length: 0,
        }
    }

    #[test]
    fn an_envelope_round_trips_whole_in_the_body() {
        let mut envelope = Envelope::new(Kind::Request);
        envelope.correlation_id = Some(Uuid::new_v4());
        envelope.service = "Calculator".into();
        envelope.method = "add".into();
        envelope.reply_to = Some(ReplyTo::Inbox("_INBOX.abc.mqrpc".into()));
        envelope.deadline_ms = Some(5_000);
        envelope.attempt = 2;
        envelope.idempotency_key = Some("key".into());
        envelope.headers.insert("order".into(), "7".into());
        envelope.body = Bytes::from_static(b"\x81\xa1a\x01");
        let mut sent = envelope.clone();
        let reply = reply_subject(&mut sent).expect("a reply subject");
        assert!(is_envelope_inbox(&reply), "{reply}");
        assert!(!is_envelope_inbox("_INBOX.abc.0123"));
        sent.reply_to = None;
        let body = envelope_body(&sent).expect("encodes");
        assert_eq!(body[0], ENVELOPE_MARK);
        let back = from_message(&plain_message("ns.Calculator", Some(&reply), body), None);
        assert!(back.deadline_ms.is_some_and(|left| left > 4_000 && left <= 5_000), "{:?}", back.deadline_ms);
        let mut expected = envelope.clone();
        expected.reply_to = Some(ReplyTo::Inbox(reply.to_string()));
        expected.deadline_ms = back.deadline_ms;
        assert_eq!(back, expected);
    }

    #[test]
    fn a_damaged_envelope_body_is_an_error_not_a_panic() {
        let mut envelope = Envelope::new(Kind::Request);
        envelope.method = "add".into();
        envelope.body = Bytes::from_static(b"\x92\x01\x02");
        let body = envelope_body(&envelope).expect("encodes");
        // Every cut, and every byte flipped: never a panic; a cut one is refused.
        for cut in 0..body.len() {
            let message = plain_message("ns.Calculator", None, body.slice(..cut));
            match from_envelope_body(&message) {
                None => assert_eq!(cut, 0),
                Some(decoded) => assert!(decoded.is_err(), "cut at {cut} decoded"),
            }
        }
        for at in 1..body.len() {
            let mut flipped = body.to_vec();
            flipped[at] ^= 0xff;
            let _ = from_message(&plain_message("ns.Calculator", None, Bytes::from(flipped)), None);
        }
        // A body of a plain client's request that is not marked is left to the headers.
        assert!(
            from_envelope_body(&plain_message("ns.Calculator", None, Bytes::from_static(b"\x92\x01\x02"))).is_none()
        );
    }

    #[test]
    fn a_reply_on_an_inbox_carries_only_what_the_subject_does_not() {
        let mut request = Envelope::new(Kind::Request);
        request.correlation_id = Some(Uuid::new_v4());
        request.service = "Calculator".into();
        request.method = "add".into();
        let reply = request.reply(Ok(Bytes::from_static(b"\x05")));
        let headers = to_headers(&reply, Mode::Core { to_inbox: true, correlation_in_subject: true }).expect("maps");
        assert_eq!(headers.iter().count(), 0, "{headers:?}");
        let subject = format!("_INBOX.abc.{}", request.correlation_id.expect("set").simple());
        let message = async_nats::Message {
            subject: subject.into(),
            reply: None,
            payload: reply.body.clone(),
            headers: Some(headers),
            status: None,
            description: None,
            length: 0,
        };
        let back = from_message(&message, None);
        assert_eq!(back.correlation_id, request.correlation_id);
        assert_eq!(back.status, 0);
        assert_eq!(back.body, reply.body);
    }

    #[test]
    fn line_breaks_in_header_values_are_refused_not_sent() {
        let mut envelope = Envelope::new(Kind::Oneway);
        envelope.headers.insert("note".into(), "two\r\nlines".into());
        assert!(matches!(to_headers(&envelope, Mode::Stream), Err(Error::InvalidArgument(_))));
        assert!(matches!(check_subject("has space"), Err(Error::InvalidArgument(_))));
        assert!(check_subject("ns.svc").is_ok());
    }

    #[test]
    fn the_subject_of_a_queue_is_made_once_and_shared_up_to_the_bound() {
        let subjects = dashmap::DashMap::new();
        let first = shared_subject(&subjects, "ns.Calculator");
        let second = shared_subject(&subjects, "ns.Calculator");
        assert_eq!((first.as_str(), second.as_str()), ("ns.Calculator", "ns.Calculator"));
        assert_eq!(first.as_str().as_ptr(), second.as_str().as_ptr(), "not shared");
        for n in 1..SUBJECTS + 10 {
            assert_eq!(shared_subject(&subjects, &format!("q.{n}")).as_str(), format!("q.{n}"));
        }
        assert_eq!(subjects.len(), SUBJECTS);
        let past = format!("q.{}", SUBJECTS + 5);
        assert_ne!(
            shared_subject(&subjects, &past).as_str().as_ptr(),
            shared_subject(&subjects, &past).as_str().as_ptr()
        );
    }

    #[test]
    fn subjects_with_an_empty_token_whitespace_or_a_wildcard_are_refused() {
        for bad in ["", ".", "a.", ".a", "a..b", "a.*", "a.>", "a\tb", "a\rb", "a\nb", "a b", "\u{e9}.."] {
            assert!(matches!(check_subject(bad), Err(Error::InvalidArgument(_))), "{bad:?} passed");
        }
        for good in ["a", "a.b", "_INBOX.x.mqrpc.0123abcd", "ns.svc.dlq", "\u{e9}t\u{e9}.caf\u{e9}", "a-b_c"] {
            assert!(check_subject(good).is_ok(), "{good:?} refused");
        }
    }
}
