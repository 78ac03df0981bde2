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
//! mqrpc inbox is `<inbox>.mqrpc`, which tells a worker to answer in that form. Requests and oneway messages
//! carry the envelope's compact form (version 2, [`NatsOptions::compact_envelopes`]); a worker answers in its
//! request's form.
//!
//! Otherwise headers carry the envelope (see [`crate::adapter::headers`]): `mqrpc-method` (required), `mqrpc-service`,
//! `mqrpc-kind`, `mqrpc-correlation-id`, `mqrpc-deadline-ms`, `mqrpc-sent-at-ms`, `mqrpc-attempt`,
//! `mqrpc-idempotency-key`, and `mqrpc-status` / `mqrpc-status-message` on replies; in JetStream mode
//! `Nats-Msg-Id` is the envelope id (core NATS does not deduplicate, and it is not sent there), and the reply address is `mqrpc-reply-to`, with `mqrpc-reply-inbox: true` for an inbox (the reply
//! subject carries the stream's ack).
//! The payload is the MessagePack of the arguments or the result. A plain NATS client calls a service with
//! `request_with_headers(subject, {mqrpc-method: add}, msgpack_args)` in core mode.
//!
//! Discovery: each server answers the NATS service API (`$SRV.PING`, `$SRV.INFO`, `$SRV.STATS`, with the
//! service named after its queue, `.` made `_`), so `nats micro ls` lists mqrpc workers; pings
//! ([`rpc_core::health`]) go through a plain subscription to `<service>.ping`.
//!
//! Credentials and TLS: [`NatsOptions::auth`] (a user and password, a token, an NKey seed or a `.creds` file)
//! and [`NatsOptions::tls`] (the authorities to trust, a client certificate; TLS is required once set). No
//! secret is printed: `Debug` shows the kind only. A user the server limits to its own subjects needs, in core
//! mode, publish and subscribe on its namespace's subjects (`<namespace>.>`), on `_INBOX.>` (replies, and the
//! private subject a new subscription waits on until the server has it) and on `$SRV.>` (the service API);
//! JetStream mode also uses `$JS.API.>` and the stream's ack subjects (`$JS.ACK.>`).
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

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_nats::{HeaderMap, StatusCode};
use futures::StreamExt;
use rpc_core::transport::{AckHandle, BoxFuture, Confirm, Consumer, ConsumerControl, Delivery, Inbox};
use rpc_core::{
    COMPACT_VERSION, Capabilities, Code, ConsumeOptions, Envelope, Error, Kind, QueueOptions, QueueStats, Transport,
    naming,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use self::core::{Outbox, Outgoing, shared_subject};
use self::jetstream::{DUPLICATE_WINDOW, StreamAcker, is_not_found, stream_error, stream_name};
use self::mapping::{
    ENVELOPE_INBOX, Mode, Origin, check_reply, check_subject, correlation_of_subject, envelope_body, from_message_at,
    is_envelope_inbox, is_stream_ack, reply_subject, to_headers,
};
use super::{CounterMap, Counters};

mod core;
mod jetstream;
mod mapping;
mod micro;

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
    /// How many servers of a JetStream cluster keep each stream this transport creates (default 1; at most 5).
    /// With 3, a stream survives the loss of one server: its leader moves to another, and publishes and
    /// deliveries go on after a pause. The servers are given as a list in the URL
    /// (`nats://a:4222,nats://b:4222`), and the client learns the others from the cluster. With more than one,
    /// a publish that no stream leader answers (an election under way) is tried again, for up to 10 s.
    pub replicas: usize,
    /// How this client proves who it is to the server (default: nothing, or what the URL carries:
    /// `nats://user:password@host`, `nats://token@host`).
    pub auth: NatsAuth,
    /// TLS to the server: required, with these certificates. `tls://` URLs require it too, with the system's roots.
    pub tls: Option<NatsTls>,
    /// Core mode: requests and oneway messages carry their envelope in the compact form, version 2 (default
    /// true): about 60 bytes fewer per request, which the server copies to the worker. A worker that reads
    /// version 1 only (mqrpc before the compact form) answers such a request with status 8 (invalid request):
    /// set it to false while such workers still serve. Replies take their request's form whatever this says.
    pub compact_envelopes: bool,
}

/// A NATS credential. `Debug` shows the user and the kind, never a secret.
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum NatsAuth {
    /// None beyond what the URL carries.
    #[default]
    None,
    /// A user and its password (`authorization { users = [{user, password}] }` on the server).
    UserPassword {
        /// The user's name.
        user: String,
        /// Its password.
        password: String,
    },
    /// A token (`authorization { token }`).
    Token(String),
    /// An NKey seed (`SU...`): the client signs the server's nonce, the seed never leaves the process.
    NKey(String),
    /// A `.creds` file (a user JWT and its NKey seed), as an operator-mode server issues them.
    CredentialsFile(std::path::PathBuf),
}

impl std::fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NatsAuth::None => f.write_str("None"),
            NatsAuth::UserPassword { user, .. } => {
                f.debug_struct("UserPassword").field("user", user).field("password", &"***").finish()
            }
            NatsAuth::Token(_) => f.write_str("Token(***)"),
            NatsAuth::NKey(_) => f.write_str("NKey(***)"),
            NatsAuth::CredentialsFile(path) => f.debug_tuple("CredentialsFile").field(path).finish(),
        }
    }
}

/// TLS to a NATS server, required once set.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct NatsTls {
    /// PEM file of the certificate authorities that sign the server's certificate (the system's roots when
    /// `None`).
    pub root_certificates: Option<std::path::PathBuf>,
    /// PEM files of this client's certificate and key, for a server that verifies clients (`verify: true`).
    pub client_certificate: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl NatsTls {
    /// TLS with the system's roots and no client certificate.
    pub fn new() -> NatsTls {
        NatsTls::default()
    }

    /// Trusts the authorities in the PEM file at `path` for the server's certificate.
    pub fn root_certificates(mut self, path: impl Into<std::path::PathBuf>) -> NatsTls {
        self.root_certificates = Some(path.into());
        self
    }

    /// Presents the certificate and key in these PEM files.
    pub fn client_certificate(
        mut self,
        certificate: impl Into<std::path::PathBuf>,
        key: impl Into<std::path::PathBuf>,
    ) -> NatsTls {
        self.client_certificate = Some((certificate.into(), key.into()));
        self
    }
}

impl Default for NatsOptions {
    fn default() -> NatsOptions {
        NatsOptions {
            jetstream: false,
            stream_prefix: "MQRPC".to_owned(),
            ack_wait: Duration::from_secs(30),
            memory_storage: false,
            max_backoff: Duration::from_secs(5),
            replicas: 1,
            auth: NatsAuth::None,
            tls: None,
            compact_envelopes: true,
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

    /// Sets [`NatsOptions::replicas`] (1 to 5).
    pub fn replicas(mut self, replicas: usize) -> NatsOptions {
        self.replicas = replicas.clamp(1, 5);
        self
    }

    /// Sets [`NatsOptions::max_backoff`].
    pub fn max_backoff(mut self, backoff: Duration) -> NatsOptions {
        self.max_backoff = backoff;
        self
    }

    /// Sets [`NatsOptions::auth`].
    pub fn auth(mut self, auth: NatsAuth) -> NatsOptions {
        self.auth = auth;
        self
    }

    /// Sets [`NatsOptions::tls`].
    pub fn tls(mut self, tls: NatsTls) -> NatsOptions {
        self.tls = Some(tls);
        self
    }

    /// Sets [`NatsOptions::compact_envelopes`].
    pub fn compact_envelopes(mut self, compact: bool) -> NatsOptions {
        self.compact_envelopes = compact;
        self
    }
}

/// How long [`Inner::settle`] waits for its message to come back.
const SETTLE_WAIT: Duration = Duration::from_secs(2);

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
    jetstream: async_nats::jetstream::Context,
    options: NatsOptions,
    /// Set by the client's events; read by every publish (an atomic, not a lock both runtime threads take).
    connected: Arc<AtomicBool>,
    /// Bumped at every disconnection: replies published to an inbox meanwhile are gone.
    losses: watch::Sender<u64>,
    /// Queues (streams) this transport made sure of, with the options they were declared with.
    streams: Mutex<HashMap<String, QueueOptions>>,
    /// Reply subjects found captured by a stream ([`Inner::stream_captures`]).
    captured: Mutex<std::collections::HashSet<String>>,
    counters: CounterMap,
    /// The subjects of the queues published to, made once: a subject shared with the client costs no
    /// allocation per publish, where one made from the name costs a copy and the client's clone of it another.
    /// Each with the queue's counters (those of `counters`), so that a publish finds both at once.
    subjects: dashmap::DashMap<String, (async_nats::Subject, Arc<Counters>)>,
    closed: AtomicBool,
}

impl Inner {
    /// Returns once the server has processed what this connection sent before (its subscriptions above all):
    /// a message to a private subject of its own comes back only after them, as a server handles one
    /// connection's operations in order. The client's `flush` only writes them out, and another connection's
    /// publish handled before them finds no subscriber (a call answered "no responders", or a reply lost).
    /// Past [`SETTLE_WAIT`] (a user whose permissions deny it the inbox subjects) it goes on, as a flush would.
    async fn settle(&self) -> Result<(), Error> {
        let subject = self.client.new_inbox();
        let mut probe = self.client.subscribe(subject.clone()).await.map_err(|_| Error::Disconnected)?;
        self.client.publish(subject, bytes::Bytes::new()).await.map_err(|_| Error::Disconnected)?;
        self.client.flush().await.map_err(|_| Error::Disconnected)?;
        if tokio::time::timeout(SETTLE_WAIT, probe.next()).await.is_err() {
            tracing::warn!("the NATS server did not echo a message to a private inbox; going on without it");
        }
        Ok(())
    }

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

    /// Publishes `envelope` to `queue`: a reply to an inbox ([`Confirm::Sent`]) through core NATS in either
    /// mode; anything else to the queue's subject in core mode, or to its stream in JetStream mode,
    /// acknowledged by the server.
    ///
    /// Not an `async fn`: the message is made before the future, and a core publish awaits only room in the
    /// [`Outbox`] (in core mode, a message without headers: every call and every reply to an mqrpc inbox) or in
    /// the client's queue, so that its future (one allocation per message) stays small; a JetStream publish,
    /// which waits for the stream's ack, has a future of its own.
    fn publish<'a>(&'a self, queue: &'a str, envelope: Envelope, confirm: Confirm) -> BoxFuture<'a, Result<(), Error>> {
        self.publish_with(queue, None, envelope, confirm)
    }

    /// As [`publish`](Inner::publish), with `queue` made a subject already where the caller had it shared (a
    /// reply's inbox): a subject made here is a copy of `queue`.
    fn publish_with<'a>(
        &'a self,
        queue: &'a str,
        subject: Option<async_nats::Subject>,
        mut envelope: Envelope,
        confirm: Confirm,
    ) -> BoxFuture<'a, Result<(), Error>> {
        let checked = self.check().and_then(|()| super::refuse_delay(&envelope)).and_then(|()| check_subject(queue));
        if let Err(error) = checked {
            return Box::pin(std::future::ready(Err(error)));
        }
        // Before the headers are made: the envelope's reply address becomes this subject.
        let reply = reply_subject(&mut envelope, self.options.jetstream);
        let to_inbox = confirm == Confirm::Sent;
        if self.options.jetstream && !to_inbox {
            return Box::pin(async move {
                if envelope.kind == Kind::Reply && !self.stream_captures(queue).await? {
                    // A reply address that no stream captures is a plain subscriber's subject (a caller that
                    // left out `mqrpc-reply-inbox`): answered on core NATS, as the inbox it is.
                    return self.publish_core(queue, subject, envelope, reply, true).await;
                }
                let counters = self.counters.of(queue);
                let headers = to_headers(&envelope, Mode::Stream)?;
                self.publish_stream(queue, headers, envelope.body).await?;
                Counters::bump(&counters.published);
                Ok(())
            });
        }
        self.publish_core(queue, subject, envelope, reply, to_inbox)
    }

    /// Publishes on core NATS (in JetStream mode: replies to inboxes).
    fn publish_core<'a>(
        &'a self,
        queue: &'a str,
        subject: Option<async_nats::Subject>,
        mut envelope: Envelope,
        reply: Option<async_nats::Subject>,
        to_inbox: bool,
    ) -> BoxFuture<'a, Result<(), Error>> {
        // Counters not per inbox subject: a reply's subject names its call, and a counter per call would never
        // be freed.
        let (queue_subject, counters) = match to_inbox {
            true => (None, None),
            false => {
                let (subject, counters) = shared_subject(&self.subjects, &self.counters, queue);
                (Some(subject), Some(counters))
            }
        };
        // Whole in the body between mqrpc processes: a request or a oneway message, and a reply to an mqrpc
        // inbox. A reply to any other subject (a plain client's, whatever its inbox prefix) has headers.
        let framed = if envelope.kind == Kind::Reply { is_envelope_inbox(queue) } else { true };
        let message = if framed {
            envelope.reply_to = None;
            // A reply in its request's form; a request or a oneway message as the options say.
            let compact = match envelope.kind {
                Kind::Reply => envelope.version == COMPACT_VERSION,
                Kind::Request | Kind::Oneway => self.options.compact_envelopes,
            };
            envelope_body(&envelope, compact).map(|body| (HeaderMap::new(), body))
        } else {
            let mut buffer = [0u8; uuid::fmt::Simple::LENGTH];
            let correlation = envelope.correlation_id.map(|id| &*id.simple().encode_lower(&mut buffer));
            let in_subject =
                |subject: Option<&str>| subject.zip(correlation).is_some_and(|(subject, id)| subject.ends_with(id));
            let mode = Mode::Core {
                to_inbox,
                correlation_in_subject: in_subject(if to_inbox { Some(queue) } else { reply.as_deref() }),
            };
            to_headers(&envelope, mode).map(|headers| (headers, envelope.body))
        };
        let (headers, body) = match message {
            Ok(message) => message,
            Err(error) => return Box::pin(std::future::ready(Err(error))),
        };
        // Not in JetStream mode: there a reply is followed by the ack of its request, which goes to the client
        // directly, and must not reach the server before the reply (a crash in between would lose the call).
        if headers.is_empty() && !self.options.jetstream {
            // The whole envelope in the body: through the outbox.
            let outbox = &self.outbox;
            if let Err(error) = outbox.check(queue, reply.as_deref(), body.len()) {
                return Box::pin(std::future::ready(Err(error)));
            }
            let subject = queue_subject.or(subject).unwrap_or_else(|| queue.into());
            let gone = || if self.closed.load(Ordering::Acquire) { Error::Shutdown } else { Error::Disconnected };
            // With room in the outbox, as nearly always, the message is queued here and the future is done: no
            // future of its own to allocate. A publish waiting for room keeps its place: the ones after it find
            // none either.
            let message = match outbox.try_send(Outgoing::Message { subject, reply, body }) {
                Ok(()) => {
                    if let Some(counters) = counters {
                        Counters::bump(&counters.published);
                    }
                    return rpc_core::transport::finished(Ok(()));
                }
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                    return Box::pin(std::future::ready(Err(gone())));
                }
                Err(tokio::sync::mpsc::error::TrySendError::Full(message)) => message,
            };
            return Box::pin(async move {
                outbox.send(message).await.map_err(|()| gone())?;
                if let Some(counters) = counters {
                    Counters::bump(&counters.published);
                }
                Ok(())
            });
        }
        if let Err(error) = check_reply(reply.as_deref()) {
            return Box::pin(std::future::ready(Err(error)));
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
}

impl Nats {
    /// Connects to NATS at `url` (`nats://host:port`, several separated by commas) in core mode.
    ///
    /// `url` is one server's (`nats://host:4222`), or a cluster's servers separated by commas: the client connects
    /// to one of them, and to another when it goes.
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
        // A cluster's servers as a list: `nats://a:4222,nats://b:4222`.
        let servers: Vec<&str> = url.split(',').map(str::trim).filter(|server| !server.is_empty()).collect();
        let connected = Arc::new(AtomicBool::new(true));
        let state = Arc::clone(&connected);
        let losses = watch::Sender::new(0u64);
        let lost = losses.clone();
        let max_backoff = options.max_backoff;
        let mut connect = match &options.auth {
            NatsAuth::None => async_nats::ConnectOptions::new(),
            NatsAuth::UserPassword { user, password } => {
                async_nats::ConnectOptions::with_user_and_password(user.clone(), password.clone())
            }
            NatsAuth::Token(token) => async_nats::ConnectOptions::with_token(token.clone()),
            NatsAuth::NKey(seed) => async_nats::ConnectOptions::with_nkey(seed.clone()),
            NatsAuth::CredentialsFile(path) => {
                async_nats::ConnectOptions::with_credentials_file(path).await.map_err(|error| {
                    Error::InvalidArgument(format!("NATS credentials file {}: {error}", path.display()))
                })?
            }
        };
        if let Some(tls) = &options.tls {
            connect = connect.require_tls(true);
            if let Some(roots) = &tls.root_certificates {
                connect = connect.add_root_certificates(roots.clone());
            }
            if let Some((certificate, key)) = &tls.client_certificate {
                connect = connect.add_client_certificate(certificate.clone(), key.clone());
            }
        }
        let client = connect
            .name("mqrpc")
            // Every subject this transport publishes to is checked before it reaches the client (`check_subject`,
            // `check_reply`) or came from the server; the client's own check of each publish would be a second
            // pass over both subjects, per message.
            .skip_subject_validation(true)
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
            .connect(servers.as_slice())
            .await
            .map_err(|error| match error.kind() {
                async_nats::ConnectErrorKind::Authentication | async_nats::ConnectErrorKind::AuthorizationViolation => {
                    Error::Unauthorized(error.to_string())
                }
                _ => transport(error),
            })?;
        let jetstream = async_nats::jetstream::new(client.clone());
        let outbox = Outbox::start(client.clone());
        let inner = Arc::new(Inner {
            client,
            outbox,
            jetstream,
            options,
            connected,
            losses,
            streams: Mutex::new(HashMap::new()),
            captured: Mutex::new(std::collections::HashSet::new()),
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
    /// which takes it when the publish is made if it has room, and a publish of one that returned `Ok` reached
    /// the connection before it closed; one made before the close that the outbox had not taken yet (still
    /// waiting for room when it closed) fails with [`Error::Shutdown`], as does one made after it. A publish of another kind (with headers, or in JetStream mode) fails so
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

impl Transport for Nats {
    fn system(&self) -> &'static str {
        "nats"
    }

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
                // A call made next finds the worker.
                self.inner.settle().await?;
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
                self.inner.settle().await?;
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

    /// A plain core subscription to the topic's subject, in JetStream mode too (a stream's publish reaches
    /// core subscribers of its subject): nothing stays on the server once it is dropped.
    fn subscribe_private<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Consumer, Error>> {
        Box::pin(async move {
            self.inner.check()?;
            check_subject(topic)?;
            let subscriber = self.inner.client.subscribe(topic.to_owned()).await.map_err(|_| Error::Disconnected)?;
            self.inner.settle().await?;
            Ok(self.core_consumer(subscriber, ConsumeOptions::new().auto_ack(true)))
        })
    }

    /// Answers the NATS service API for the server (`$SRV.PING`, `$SRV.INFO`, `$SRV.STATS`; see the `micro`
    /// module), so that `nats micro ls` and the other NATS tools list it.
    fn announce(
        &self,
        announcement: rpc_core::health::Announcement,
    ) -> BoxFuture<'_, Result<Option<rpc_core::health::Announced>, Error>> {
        Box::pin(async move {
            self.inner.check()?;
            // Core mode's workers share a queue group named after the queue; JetStream's pull from a stream.
            let queue_group = (!self.inner.options.jetstream).then(|| announcement.queue.clone());
            Ok(Some(micro::announce(&self.inner.client, announcement, queue_group).await?))
        })
    }

    fn open_inbox(&self) -> BoxFuture<'_, Result<Inbox, Error>> {
        Box::pin(async move {
            self.inner.check()?;
            // The last token tells workers that replies may carry the whole envelope.
            let address = format!("{}.{ENVELOPE_INBOX}", self.inner.client.new_inbox());
            let subscriber =
                self.inner.client.subscribe(format!("{address}.*")).await.map_err(|_| Error::Disconnected)?;
            self.inner.settle().await?;
            let replies = subscriber.map(|message| {
                let received_at = Instant::now();
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
                    let (mut reply, _) = from_message_at(&message, Origin::Core, received_at);
                    reply.kind = Kind::Reply;
                    reply
                };
                Delivery {
                    envelope: Arc::new(envelope),
                    delivery_count: 1,
                    queued: Duration::ZERO,
                    received_at,
                    handle: AckHandle::auto(),
                }
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
            let mut stats = counters.stats(messages.saturating_sub(pending), consumers);
            // The server's count, for every consumer of the stream: messages handed out (or handed back a moment
            // ago and not yet out again) and not acked.
            stats.unacked = pending;
            Ok(stats)
        })
    }

    fn delete_queue<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.inner.check()?;
            // Core NATS holds no queue: there is nothing to delete.
            if !self.inner.options.jetstream {
                return Ok(());
            }
            Inner::lock(&self.inner.streams).remove(queue);
            match self.inner.jetstream.delete_stream(self.inner.stream_name(queue)).await {
                Ok(_) => Ok(()),
                Err(error) if is_stream_missing(&error) => Ok(()),
                Err(error) => Err(transport(error)),
            }
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

/// Whether deleting a stream failed because there is no such stream.
fn is_stream_missing(error: &async_nats::jetstream::context::DeleteStreamError) -> bool {
    matches!(error.kind(), async_nats::jetstream::context::DeleteStreamErrorKind::JetStream(error)
        if error.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND)
}

fn transport(error: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Transport(Box::new(error))
}
