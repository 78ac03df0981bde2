//! The [`Transport`] that connects to a running `rpc-broker` server.
//!
//! One TCP (or TLS) connection carries everything, pipelined: a writer task drains every queued frame into
//! one write, a reader task routes answers to their requests and deliveries to their consumers. When the
//! connection is lost, every request waiting on it fails with [`Error::Disconnected`] at once; a supervisor
//! reconnects with exponential backoff and jitter and re-creates every consumer and inbox, so that streams
//! of deliveries resume by themselves. Deliveries received on a lost connection were requeued by the broker;
//! settling them reports [`Error::Disconnected`].

mod acker;
mod connection;
mod consumer;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use rpc_core::codec;
use rpc_core::transport::{BoxFuture, Confirm, Consumer, Inbox};
use rpc_core::{Capabilities, ConsumeOptions, Envelope, Error, QueueOptions, QueueStats, Transport};
use tokio::sync::{Notify, oneshot, watch};
use uuid::Uuid;

use crate::protocol::{self, CAPABILITIES, ClientFrame, ErrorCode, INBOX_PREFIX, PublishHeader, call_key};

use connection::{Conn, QUIET_REQ, Target, Waiter, open, parse_url, supervise};
use consumer::{Logical, LogicalKind};

/// A certificate chain and its private key, presented by a client in TLS handshakes.
pub struct TlsIdentity {
    chain: Vec<rustls_pki_types::CertificateDer<'static>>,
    key: rustls_pki_types::PrivateKeyDer<'static>,
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity").field("chain", &self.chain.len()).finish_non_exhaustive()
    }
}

/// How a [`Remote`] connects.
#[derive(Clone)]
#[non_exhaustive]
pub struct RemoteOptions {
    /// Certificates to trust for `mqrpcs://` (default: none, so TLS needs this).
    pub tls_roots: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// The certificate chain and key this client presents in a TLS handshake, for a broker that verifies
    /// clients (mutual TLS; see [`RemoteOptions::tls_client_pem`]).
    pub tls_client: Option<Arc<TlsIdentity>>,
    /// Time to open a connection and complete the handshake (default 5 s).
    pub connect_timeout: Duration,
    /// Time to wait for the broker's answer to one request (default 10 s).
    pub request_timeout: Duration,
    /// Longest wait between two reconnection attempts (default 5 s).
    pub max_backoff: Duration,
    /// A name for the broker's logs.
    pub name: String,
}

impl Default for RemoteOptions {
    fn default() -> RemoteOptions {
        RemoteOptions {
            tls_roots: Vec::new(),
            tls_client: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            max_backoff: Duration::from_secs(5),
            name: "mqrpc".into(),
        }
    }
}

impl fmt::Debug for RemoteOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteOptions")
            .field("tls_roots", &self.tls_roots.len())
            .field("tls_client", &self.tls_client.is_some())
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("max_backoff", &self.max_backoff)
            .field("name", &self.name)
            .finish()
    }
}

impl RemoteOptions {
    /// The defaults.
    pub fn new() -> RemoteOptions {
        RemoteOptions::default()
    }

    /// Trusts the certificates in `pem` (PEM text) for `mqrpcs://`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `pem` holds no certificate.
    pub fn tls_roots_pem(mut self, pem: &[u8]) -> Result<RemoteOptions, Error> {
        use rustls_pki_types::pem::PemObject;
        let certificates: Vec<_> = rustls_pki_types::CertificateDer::pem_slice_iter(pem)
            .collect::<Result<_, _>>()
            .map_err(|error| Error::InvalidArgument(format!("cannot read the certificates: {error}")))?;
        if certificates.is_empty() {
            return Err(Error::InvalidArgument("no certificate in the PEM".into()));
        }
        self.tls_roots.extend(certificates);
        Ok(self)
    }

    /// Presents the certificate chain in `cert_pem` and the private key in `key_pem` (PEM text) in TLS
    /// handshakes: a broker that verifies clients (mutual TLS) knows this client by its certificate.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the PEM holds no certificate or no key.
    pub fn tls_client_pem(mut self, cert_pem: &[u8], key_pem: &[u8]) -> Result<RemoteOptions, Error> {
        use rustls_pki_types::pem::PemObject;
        let chain: Vec<_> = rustls_pki_types::CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|error| Error::InvalidArgument(format!("cannot read the certificates: {error}")))?;
        if chain.is_empty() {
            return Err(Error::InvalidArgument("no certificate in the PEM".into()));
        }
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|error| Error::InvalidArgument(format!("cannot read the private key: {error}")))?;
        self.tls_client = Some(Arc::new(TlsIdentity { chain, key }));
        Ok(self)
    }

    /// Sets [`RemoteOptions::request_timeout`].
    pub fn request_timeout(mut self, timeout: Duration) -> RemoteOptions {
        self.request_timeout = timeout;
        self
    }

    /// Sets [`RemoteOptions::max_backoff`].
    pub fn max_backoff(mut self, backoff: Duration) -> RemoteOptions {
        self.max_backoff = backoff;
        self
    }
}

/// A connection to a broker server, as a transport. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Remote {
    inner: Arc<Inner>,
}

impl fmt::Debug for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Remote")
            .field("target", &self.inner.target)
            .field("connected", &self.inner.current().is_some())
            .finish_non_exhaustive()
    }
}

struct Inner {
    target: Target,
    options: RemoteOptions,
    /// Read by every call, written when a connection comes or goes.
    current: RwLock<Option<Arc<Conn>>>,
    next_logical: AtomicU64,
    consumers: Mutex<HashMap<u64, Logical>>,
    /// Queues declared through this transport, declared again after reconnecting (a restarted broker may have
    /// lost them).
    declared: Mutex<HashMap<String, QueueOptions>>,
    closed: AtomicBool,
    reconnected: Notify,
    /// Bumped whenever a connection is lost, and its inboxes with it.
    losses: watch::Sender<u64>,
    /// The broker said it keeps durable queues on disk (at the last handshake).
    durable: AtomicBool,
    /// The first inbox opened through the transport (a client's): every connection opens it again before it
    /// carries calls, so a broker of version 9 or later answers the refusal of a request naming it there.
    inbox: OnceLock<String>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(conn) = self.current.write().unwrap_or_else(PoisonError::into_inner).take() {
            conn.dead.cancel();
        }
    }
}

impl Inner {
    fn current(&self) -> Option<Arc<Conn>> {
        self.current.read().unwrap_or_else(PoisonError::into_inner).clone().filter(|conn| !conn.dead.is_cancelled())
    }

    fn consumers(&self) -> MutexGuard<'_, HashMap<u64, Logical>> {
        self.consumers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends a request on `conn` and waits for its answer.
    async fn request_on(
        &self,
        conn: &Conn,
        frame: impl FnOnce(u32) -> ClientFrame,
        waiter: impl FnOnce(oneshot::Sender<Result<Bytes, (ErrorCode, String)>>) -> Waiter,
    ) -> Result<Result<Bytes, (ErrorCode, String)>, Error> {
        conn.request(frame, waiter, self.options.request_timeout).await
    }

    async fn request(&self, what: &str, frame: impl FnOnce(u32) -> ClientFrame) -> Result<Bytes, Error> {
        let conn = self.current().ok_or(Error::Disconnected)?;
        match self.request_on(&conn, frame, Waiter::Answer).await? {
            Ok(body) => Ok(body),
            Err((code, message)) => Err(code.to_error(what, message)),
        }
    }

    fn declare_frame(queue: &str, options: &QueueOptions) -> impl FnOnce(u32) -> ClientFrame + use<> {
        let (queue, options) = (queue.to_owned(), options.clone());
        move |req| ClientFrame::Declare {
            req,
            queue,
            max_len: options.max_len.map(|max| max as u64),
            max_deliveries: options.max_deliveries,
            durable: options.durable,
        }
    }

    /// Declares again, on a new connection, every queue declared before.
    async fn restore_queues(&self, conn: &Conn) -> Result<(), Error> {
        let declared: Vec<(String, QueueOptions)> = self
            .declared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(queue, options)| (queue.clone(), options.clone()))
            .collect();
        for (queue, options) in declared {
            if let Err((code, message)) =
                self.request_on(conn, Inner::declare_frame(&queue, &options), Waiter::Answer).await?
            {
                tracing::warn!(%queue, ?code, %message, "could not declare a queue again after reconnecting");
            }
        }
        Ok(())
    }
}

impl Remote {
    /// Connects to the broker at `url` (`mqrpc://[token@]host:port`, `mqrpcs://` for TLS).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad URL, [`Error::Unauthorized`] for a refused token,
    /// [`Error::Transport`] naming the address and the cause when the broker cannot be reached, or
    /// [`Error::Timeout`] when it does not answer the handshake in time.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub async fn connect(url: &str) -> Result<Remote, Error> {
        Remote::connect_with(url, RemoteOptions::default()).await
    }

    /// As [`Remote::connect`], with options.
    ///
    /// # Errors
    /// As [`Remote::connect`].
    pub async fn connect_with(url: &str, options: RemoteOptions) -> Result<Remote, Error> {
        let target = parse_url(url)?;
        let inner = Arc::new(Inner {
            target,
            options,
            current: RwLock::new(None),
            next_logical: AtomicU64::new(1),
            consumers: Mutex::new(HashMap::new()),
            declared: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            reconnected: Notify::new(),
            losses: watch::Sender::new(0),
            durable: AtomicBool::new(false),
            inbox: OnceLock::new(),
        });
        let conn = open(&inner).await?;
        *inner.current.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&conn));
        tokio::spawn(supervise(Arc::downgrade(&inner), conn));
        Ok(Remote { inner })
    }

    /// Every queue with its counters, sorted by name.
    ///
    /// # Errors
    /// [`Error::Disconnected`] or [`Error::Timeout`].
    pub async fn list_queues(&self) -> Result<Vec<(String, QueueStats)>, Error> {
        let body = self.inner.request("", |req| ClientFrame::ListQueues { req }).await?;
        protocol::parse_list_body(body).map_err(|error| Error::Transport(Box::new(error)))
    }

    /// Waits until the broker has handled every frame this transport sent before, settles included (they
    /// have no answer of their own). Call it before exiting a process that just acked or released deliveries.
    ///
    /// # Errors
    /// [`Error::Disconnected`] or [`Error::Timeout`]: the broker may not have seen them; unsettled deliveries
    /// are then redelivered.
    pub async fn sync(&self) -> Result<(), Error> {
        self.inner.request("", |req| ClientFrame::Sync { req }).await.map(drop)
    }

    /// A publish confirmed by the broker, sent again with the same id on the next connection if the one it went
    /// on is lost before the confirm.
    fn publish_confirmed<'a>(&'a self, queue: &'a str, envelope: Envelope) -> BoxFuture<'a, Result<(), Error>> {
        // Encoded before the future, which then holds the frame's parts and not the envelope.
        let payload = match codec::encode_envelope(&envelope) {
            Ok(payload) => payload,
            Err(error) => return Box::pin(std::future::ready(Err(error.into()))),
        };
        let frame = publish_frame(queue, &envelope, payload, false);
        drop(envelope);
        Box::pin(async move {
            let conn = self.inner.current().ok_or(Error::Disconnected)?;
            let give_up = tokio::time::Instant::now() + self.inner.options.request_timeout;
            let mut conn = conn;
            for _ in 0..MAX_RESENDS {
                match self.inner.request_on(&conn, &frame, Waiter::Answer).await {
                    Ok(answer) => return answer.map(drop).map_err(|(code, message)| code.to_error(queue, message)),
                    // The connection went while the confirm was on its way: the broker may have the message or
                    // not. It goes again, with the same id, on the next connection; a durable queue takes it
                    // once.
                    Err(Error::Disconnected) => {
                        tracing::debug!(
                            queue,
                            "the connection went before the publish was confirmed; sending it again"
                        );
                        if tokio::time::timeout_at(give_up, self.connected()).await.is_err() {
                            return Err(Error::Disconnected);
                        }
                        conn = self.inner.current().ok_or(Error::Disconnected)?;
                    }
                    Err(error) => return Err(error),
                }
            }
            Err(Error::Disconnected)
        })
    }

    /// A request published quietly: the broker answers only a failure. From protocol version 9, it answers the
    /// failure of a request naming this transport's inbox in that inbox: nothing waits here, and the request goes
    /// with the request id kept for that ([`QUIET_REQ`]), so that a call takes no shared counter either.
    fn publish_quiet<'a>(&'a self, queue: &'a str, envelope: Envelope) -> BoxFuture<'a, Result<(), Error>> {
        // A connection lost meanwhile takes the inbox with it, which fails the call with `ReplyLost` (and the
        // client sends it again if told to): nothing is sent again here.
        let props = PublishProps::of(&envelope);
        let names_inbox = envelope.reply_to.as_ref().is_some_and(|reply_to| {
            reply_to.is_inbox() && self.inner.inbox.get().is_some_and(|inbox| inbox == reply_to.address())
        });
        if names_inbox {
            let frame = match props.header(QUIET_REQ, queue, true).with_envelope(&envelope) {
                Ok(frame) => frame,
                Err(error) => return Box::pin(std::future::ready(Err(error.into()))),
            };
            // Sent under the lock on the current connection: no reference to it taken and dropped per call.
            let sent = {
                let current = self.inner.current.read().unwrap_or_else(PoisonError::into_inner);
                match current.as_ref().filter(|conn| !conn.dead.is_cancelled()) {
                    None => Some(Err(Error::Disconnected)),
                    Some(conn) if conn.version >= protocol::QUIET_REFUSALS_IN_INBOX => Some(conn.send(frame)),
                    // A broker of an older version answers the refusal as an `Error` frame, which needs a waiter.
                    Some(_) => None,
                }
            };
            if let Some(sent) = sent {
                return rpc_core::transport::finished(sent);
            }
        }
        let Some(conn) = self.inner.current() else { return Box::pin(std::future::ready(Err(Error::Disconnected))) };
        let frame = match props.header(conn.req(), queue, true).with_envelope(&envelope) {
            Ok(frame) => frame,
            Err(error) => return Box::pin(std::future::ready(Err(error.into()))),
        };
        Box::pin(async move {
            match conn.request_quiet(frame).await? {
                Ok(_) => Ok(()),
                Err((code, message)) => Err(code.to_error(queue, message)),
            }
        })
    }

    /// Whether a connection is up now.
    pub fn is_connected(&self) -> bool {
        self.inner.current().is_some()
    }

    /// Waits until a connection is up (at once if it is).
    pub async fn connected(&self) {
        loop {
            let notified = self.inner.reconnected.notified();
            if self.is_connected() {
                return;
            }
            notified.await;
        }
    }

    /// Closes the connection and stops reconnecting.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        if let Some(conn) = self.inner.current() {
            conn.dead.cancel();
        }
    }
}

impl Transport for Remote {
    fn capabilities(&self) -> Capabilities {
        CAPABILITIES.durable(self.inner.durable.load(Ordering::Relaxed))
    }

    fn declare_queue<'a>(&'a self, queue: &'a str, options: &'a QueueOptions) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.inner.request(queue, Inner::declare_frame(queue, options)).await?;
            let mut declared = self.inner.declared.lock().unwrap_or_else(PoisonError::into_inner);
            // The first options that worked are the ones to restore; a later declare with the defaults accepted
            // the queue as it was.
            declared.entry(queue.to_owned()).or_insert_with(|| options.clone());
            Ok(())
        })
    }

    fn publish<'a>(&'a self, queue: &'a str, envelope: Envelope, confirm: Confirm) -> BoxFuture<'a, Result<(), Error>> {
        match confirm {
            Confirm::Broker => self.publish_confirmed(queue, envelope),
            Confirm::ByReply => self.publish_quiet(queue, envelope),
            _ => {
                // Unconfirmed (request id 0): the broker handles this connection's frames in order, so a settle
                // sent next cannot overtake it; an inbox that is gone drops it.
                let sent = reply_frame(queue, &envelope).and_then(|frame| {
                    let conn = self.inner.current().ok_or(Error::Disconnected)?;
                    conn.send(frame)
                });
                rpc_core::transport::finished(sent)
            }
        }
    }

    fn publish_topic<'a>(&'a self, topic: &'a str, envelope: Envelope) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let payload = codec::encode_envelope(&envelope)?;
            let (priority, ttl_ms, delay_ms) =
                (envelope.priority.unwrap_or(0), envelope.deadline_ms, envelope.delay_ms);
            self.inner
                .request(topic, |req| ClientFrame::PublishTopic {
                    req,
                    topic: topic.to_owned(),
                    priority,
                    ttl_ms,
                    delay_ms,
                    payload,
                })
                .await
                .map(drop)
        })
    }

    fn consume<'a>(&'a self, queue: &'a str, options: ConsumeOptions) -> BoxFuture<'a, Result<Consumer, Error>> {
        Box::pin(self.inner.consumer(LogicalKind::Queue(queue.to_owned()), options))
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        options: ConsumeOptions,
    ) -> BoxFuture<'a, Result<Consumer, Error>> {
        let kind = LogicalKind::Group { topic: topic.to_owned(), group: group.to_owned() };
        Box::pin(self.inner.consumer(kind, options))
    }

    /// A subscriber group named like an inbox (`inbox.<uuid>`), which the server makes private: it goes with
    /// the consumer (docs/protocol.md, `Subscribe`).
    fn subscribe_private<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Consumer, Error>> {
        let kind = LogicalKind::Group { topic: topic.to_owned(), group: format!("{INBOX_PREFIX}{}", Uuid::new_v4()) };
        Box::pin(self.inner.consumer(kind, ConsumeOptions::new().prefetch(0).auto_ack(true)))
    }

    fn open_inbox(&self) -> BoxFuture<'_, Result<Inbox, Error>> {
        Box::pin(async move {
            let address = format!("{INBOX_PREFIX}{}", Uuid::new_v4());
            let options = ConsumeOptions::new().prefetch(0).auto_ack(true);
            let consumer = self.inner.consumer(LogicalKind::Inbox(address.clone()), options).await?;
            let _ = self.inner.inbox.set(address.clone());
            Ok(Inbox { address, consumer, losses: Some(self.inner.losses.subscribe()) })
        })
    }

    fn queue_stats<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<QueueStats, Error>> {
        Box::pin(async move {
            let body = self.inner.request(queue, |req| ClientFrame::Stats { req, queue: queue.to_owned() }).await?;
            protocol::parse_stats_body(body).map_err(|error| Error::Transport(Box::new(error)))
        })
    }

    fn delete_queue<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            // Not declared again after a reconnect.
            self.inner.declared.lock().unwrap_or_else(PoisonError::into_inner).remove(queue);
            self.inner.request(queue, |req| ClientFrame::DeleteQueue { req, queue: queue.to_owned() }).await.map(drop)
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(self.sync())
    }

    fn cancel<'a>(&'a self, queue: &'a str, correlation_id: Uuid) -> BoxFuture<'a, Result<(), Error>> {
        // On the current connection, after the publish if it went on the same one. A publish still on an
        // older connection was lost with it, or is redelivered from there; the cancel is best effort then.
        let result = match self.inner.current() {
            Some(conn) => {
                conn.send(ClientFrame::CancelCall { queue: queue.to_owned(), key: *correlation_id.as_bytes() })
            }
            None => Err(Error::Disconnected),
        };
        Box::pin(std::future::ready(result))
    }
}

/// The publish of `envelope`, encoded as `payload`, to `queue`, for whatever request id it is sent with.
fn publish_frame<'q>(
    queue: &'q str,
    envelope: &Envelope,
    payload: Bytes,
    quiet: bool,
) -> impl Fn(u32) -> ClientFrame + Send + Sync + use<'q> {
    let props = PublishProps::of(envelope);
    move |req| props.frame(req, queue, payload.clone(), quiet)
}

/// What a publish frame carries of its envelope besides the payload.
#[derive(Clone, Copy)]
struct PublishProps {
    priority: u8,
    ttl_ms: Option<u64>,
    delay_ms: Option<u64>,
    key: Option<[u8; 16]>,
    id: Option<[u8; 16]>,
}

impl PublishProps {
    fn of(envelope: &Envelope) -> PublishProps {
        PublishProps {
            priority: envelope.priority.unwrap_or(0),
            ttl_ms: envelope.deadline_ms,
            delay_ms: envelope.delay_ms,
            key: call_key(envelope),
            id: Some(*envelope.id.as_bytes()),
        }
    }

    /// The frame's header, for a frame written with its envelope at once.
    fn header(self, req: u32, queue: &str, quiet: bool) -> PublishHeader<'_> {
        let PublishProps { priority, ttl_ms, delay_ms, key, id } = self;
        PublishHeader { req, queue, priority, ttl_ms, delay_ms, key, id, quiet }
    }

    /// The frame, taking `payload`: a publish sent once passes its own, where a clone of it would turn it into
    /// a shared buffer (an allocation).
    fn frame(self, req: u32, queue: &str, payload: Bytes, quiet: bool) -> ClientFrame {
        let PublishProps { priority, ttl_ms, delay_ms, key, id } = self;
        ClientFrame::Publish { req, queue: queue.to_owned(), priority, ttl_ms, delay_ms, key, id, payload, quiet }
    }
}

/// The unconfirmed publish of a reply to an inbox (request id 0: nothing answers it).
fn reply_frame(reply_to: &str, reply: &Envelope) -> Result<ClientFrame, Error> {
    let payload = codec::encode_envelope(reply)?;
    let (priority, ttl_ms) = (reply.priority.unwrap_or(0), reply.deadline_ms);
    Ok(ClientFrame::Publish {
        req: 0,
        queue: reply_to.to_owned(),
        priority,
        ttl_ms,
        delay_ms: None,
        key: None,
        id: None,
        payload,
        quiet: false,
    })
}

/// Times a publish whose connection went before its confirm is sent again.
const MAX_RESENDS: usize = 4;
