//! The [`Transport`] that connects to a running `rpc-broker` server.
//!
//! One TCP (or TLS) connection carries everything, pipelined: a writer task drains every queued frame into
//! one write, a reader task routes answers to their requests and deliveries to their consumers. When the
//! connection is lost, every request waiting on it fails with [`Error::Disconnected`] at once; a supervisor
//! reconnects with exponential backoff and jitter and re-creates every consumer and inbox, so that streams
//! of deliveries resume by themselves. Deliveries received on a lost connection were requeued by the broker;
//! settling them reports [`Error::Disconnected`].

use std::collections::HashMap;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use futures::{FutureExt, StreamExt};
use rpc_core::codec::{self, Limits};
use rpc_core::transport::{
    AckHandle, Acker, Answered, BoxFuture, Cancellations, Confirm, Consumer, ConsumerControl, Delivery, DeliverySink,
    Inbox, Outcome,
};
use rpc_core::{Capabilities, ConsumeOptions, Envelope, Error, QueueOptions, QueueStats, ReplyTo, Transport};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::protocol::{
    self, CAPABILITIES, ClientFrame, ErrorCode, Frame, FrameCodec, INBOX_PREFIX, PROTOCOL_VERSION, ServerFrame,
    call_key,
};

/// How a [`Remote`] connects.
#[derive(Clone)]
#[non_exhaustive]
pub struct RemoteOptions {
    /// Certificates to trust for `mqrpcs://` (default: none, so TLS needs this).
    pub tls_roots: Vec<rustls_pki_types::CertificateDer<'static>>,
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

/// Where to connect: `mqrpc://[token@]host:port`, or `mqrpcs://` for TLS.
#[derive(Clone, PartialEq, Eq)]
struct Target {
    host: String,
    port: u16,
    token: String,
    tls: bool,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqrpcs" } else { "mqrpc" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

fn parse_url(url: &str) -> Result<Target, Error> {
    let bad = |why: &str| Error::InvalidArgument(format!("bad broker URL `{url}`: {why}"));
    let (tls, rest) = if let Some(rest) = url.strip_prefix("mqrpcs://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("mqrpc://") {
        (false, rest)
    } else {
        return Err(bad("it starts with mqrpc:// or mqrpcs://"));
    };
    let rest = rest.trim_end_matches('/');
    let (token, address) = match rest.rsplit_once('@') {
        Some((token, address)) => (token.to_owned(), address),
        None => (String::new(), rest),
    };
    let (host, port) = address.rsplit_once(':').ok_or_else(|| bad("it names a port"))?;
    let port = port.parse().map_err(|_| bad("the port is a number"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    if host.is_empty() {
        return Err(bad("it names a host"));
    }
    Ok(Target { host, port, token, tls })
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
    current: Mutex<Option<Arc<Conn>>>,
    next_logical: AtomicU64,
    consumers: Mutex<HashMap<u64, Logical>>,
    /// Queues declared through this transport, declared again after reconnecting (a restarted broker may have
    /// lost them).
    declared: Mutex<HashMap<String, QueueOptions>>,
    closed: AtomicBool,
    reconnected: Notify,
    /// Bumped whenever a connection is lost, and its inboxes with it.
    losses: watch::Sender<u64>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(conn) = self.current.lock().unwrap_or_else(PoisonError::into_inner).take() {
            conn.dead.cancel();
        }
    }
}

/// A consumer as the application sees it: it outlives connections.
struct Logical {
    kind: LogicalKind,
    prefetch: u32,
    auto_ack: bool,
    paused: bool,
    sender: mpsc::UnboundedSender<Delivery>,
    /// Takes the deliveries instead of the stream, once set ([`ConsumerControl::direct`]).
    direct: Option<DeliverySink>,
}

#[derive(Clone)]
enum LogicalKind {
    Queue(String),
    Group { topic: String, group: String },
    Inbox(String),
}

/// What the reader does with the answer to a request.
enum Waiter {
    Answer(oneshot::Sender<Result<Bytes, (ErrorCode, String)>>),
    /// The answer to Consume, Subscribe or OpenInbox: routes the consumer before any of its deliveries is read.
    Consumer {
        logical: u64,
        sender: mpsc::UnboundedSender<Delivery>,
        direct: Option<DeliverySink>,
        answer: oneshot::Sender<Result<Bytes, (ErrorCode, String)>>,
    },
}

struct Route {
    logical: u64,
    sender: mpsc::UnboundedSender<Delivery>,
    direct: Option<DeliverySink>,
    acker: Arc<dyn Acker>,
    cancellations: Arc<Cancellations>,
}

struct Conn {
    /// Frames for the writer, which encodes them into its buffer.
    out: mpsc::UnboundedSender<ClientFrame>,
    pending: DashMap<u32, Waiter>,
    routes: DashMap<u64, Route>,
    dead: CancellationToken,
    next_req: AtomicU32,
    /// How long a request on it waits for its answer.
    request_timeout: Duration,
}

impl Conn {
    fn new(out: mpsc::UnboundedSender<ClientFrame>, request_timeout: Duration) -> Conn {
        Conn {
            out,
            pending: DashMap::new(),
            routes: DashMap::new(),
            dead: CancellationToken::new(),
            next_req: AtomicU32::new(1),
            request_timeout,
        }
    }

    fn send(&self, frame: ClientFrame) -> Result<(), Error> {
        self.out.send(frame).map_err(|_| Error::Disconnected)
    }

    fn req(&self) -> u32 {
        // 0 is the connection-level error's id.
        loop {
            let req = self.next_req.fetch_add(1, Ordering::Relaxed);
            if req != 0 {
                return req;
            }
        }
    }

    /// Sends a request and waits at most `timeout` for its answer.
    async fn request(
        &self,
        frame: impl FnOnce(u32) -> ClientFrame,
        waiter: impl FnOnce(oneshot::Sender<Result<Bytes, (ErrorCode, String)>>) -> Waiter,
        timeout: Duration,
    ) -> Result<Result<Bytes, (ErrorCode, String)>, Error> {
        let req = self.req();
        let (answer, answered) = oneshot::channel();
        self.pending.insert(req, waiter(answer));
        // However this ends (answer, error, timeout, or the caller dropping the future), the entry goes.
        let _waiting = Waiting { conn: self, req };
        self.send(frame(req))?;
        match tokio::time::timeout(timeout, answered).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(Error::Disconnected),
            Err(_) => Err(Error::Timeout(timeout)),
        }
    }

    /// Sends a request that the broker answers only if it fails, and waits for that answer: the future stays
    /// pending once the request is taken, until its caller drops it. It fails with [`Error::Disconnected`]
    /// only when the request could not be sent; once sent, a connection that goes leaves it pending, since
    /// the request may have arrived, and the caller learns the rest from the reply's side (the inbox goes
    /// with the connection). No timer: its caller bounds the wait.
    async fn request_quiet(&self, frame: ClientFrame) -> Result<Result<Bytes, (ErrorCode, String)>, Error> {
        let req = frame.req();
        let (answer, answered) = oneshot::channel();
        self.pending.insert(req, Waiter::Answer(answer));
        let _waiting = Waiting { conn: self, req };
        self.send(frame)?;
        match answered.await {
            Ok(answer) => Ok(answer),
            Err(_) => std::future::pending().await,
        }
    }
}

impl Inner {
    fn current(&self) -> Option<Arc<Conn>> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner).clone().filter(|conn| !conn.dead.is_cancelled())
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

    /// Starts `logical` on `conn`.
    async fn start_consumer(&self, conn: &Conn, id: u64) -> Result<(), Error> {
        let Some((kind, prefetch, auto_ack, sender, direct)) = self.consumers().get(&id).map(|logical| {
            let (kind, sender, direct) = (logical.kind.clone(), logical.sender.clone(), logical.direct.clone());
            (kind, logical.prefetch, logical.auto_ack, sender, direct)
        }) else {
            return Ok(());
        };
        let (what, frame): (String, Box<dyn FnOnce(u32) -> ClientFrame + Send>) = match kind {
            LogicalKind::Queue(queue) => {
                (queue.clone(), Box::new(move |req| ClientFrame::Consume { req, queue, prefetch, auto_ack }))
            }
            LogicalKind::Group { topic, group } => {
                (topic.clone(), Box::new(move |req| ClientFrame::Subscribe { req, topic, group, prefetch, auto_ack }))
            }
            LogicalKind::Inbox(name) => (name.clone(), Box::new(move |req| ClientFrame::OpenInbox { req, name })),
        };
        match self.request_on(conn, frame, |answer| Waiter::Consumer { logical: id, sender, direct, answer }).await? {
            Ok(_) => Ok(()),
            Err((code, message)) => Err(code.to_error(&what, message)),
        }
    }

    async fn consumer(self: &Arc<Self>, kind: LogicalKind, options: ConsumeOptions) -> Result<Consumer, Error> {
        let id = self.next_logical.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = mpsc::unbounded_channel();
        let logical = Logical {
            kind,
            prefetch: options.prefetch,
            auto_ack: options.auto_ack,
            paused: false,
            sender,
            direct: None,
        };
        self.consumers().insert(id, logical);
        let conn = self.current().ok_or(Error::Disconnected);
        let started = match conn {
            Ok(conn) => self.start_consumer(&conn, id).await,
            Err(error) => Err(error),
        };
        if let Err(error) = started {
            self.consumers().remove(&id);
            return Err(error);
        }
        let guard = LogicalGuard { inner: Arc::clone(self), id };
        Ok(Consumer::from_channel(receiver, Some(Box::new(guard))))
    }
}

impl Remote {
    /// Connects to the broker at `url` (`mqrpc://[token@]host:port`, `mqrpcs://` for TLS).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad URL, [`Error::Unauthorized`] for a refused token, or
    /// [`Error::Disconnected`] when the broker cannot be reached.
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
            current: Mutex::new(None),
            next_logical: AtomicU64::new(1),
            consumers: Mutex::new(HashMap::new()),
            declared: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            reconnected: Notify::new(),
            losses: watch::Sender::new(0),
        });
        let conn = open(&inner).await?;
        *inner.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&conn));
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

    /// A request published quietly: the broker answers only a failure.
    fn publish_quiet<'a>(&'a self, queue: &'a str, envelope: Envelope) -> BoxFuture<'a, Result<(), Error>> {
        // Quiet: the broker answers only a failure, and the reply to the inbox proves the request arrived. A
        // connection lost meanwhile takes the inbox with it, which fails the call with `ReplyLost` (and the
        // client sends it again if told to): nothing is sent again here.
        let payload = match codec::encode_envelope(&envelope) {
            Ok(payload) => payload,
            Err(error) => return Box::pin(std::future::ready(Err(error.into()))),
        };
        let Some(conn) = self.inner.current() else { return Box::pin(std::future::ready(Err(Error::Disconnected))) };
        let frame = PublishProps::of(&envelope).frame(conn.req(), queue, payload, true);
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

/// Reconnects whenever the connection dies, until the transport is dropped or closed.
async fn supervise(inner: Weak<Inner>, mut conn: Arc<Conn>) {
    loop {
        conn.dead.cancelled().await;
        if let Some(strong) = inner.upgrade() {
            // The broker drops a connection's inboxes with it: replies on their way are gone.
            strong.losses.send_modify(|losses| *losses += 1);
        }
        let mut attempt = 0u32;
        conn = loop {
            let Some(strong) = inner.upgrade() else { return };
            if strong.closed.load(Ordering::Acquire) {
                return;
            }
            let backoff = rpc_core::retry::reconnect_backoff(attempt, strong.options.max_backoff);
            drop(strong);
            tokio::time::sleep(backoff).await;
            attempt = attempt.saturating_add(1);
            let Some(strong) = inner.upgrade() else { return };
            match open(&strong).await {
                Ok(conn) => {
                    if strong.restore_queues(&conn).await.is_err() {
                        conn.dead.cancel();
                        continue;
                    }
                    let ids: Vec<u64> =
                        strong.consumers().iter().filter(|(_, logical)| !logical.paused).map(|(id, _)| *id).collect();
                    let mut restored = true;
                    for id in ids {
                        if let Err(error) = strong.start_consumer(&conn, id).await {
                            tracing::warn!(%error, "could not restore a consumer after reconnecting");
                            restored = !matches!(error, Error::Disconnected | Error::Timeout(_));
                            if !restored {
                                break;
                            }
                        }
                    }
                    if !restored || conn.dead.is_cancelled() {
                        conn.dead.cancel();
                        continue;
                    }
                    *strong.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&conn));
                    strong.reconnected.notify_waiters();
                    tracing::info!(target = ?strong.target, attempt, "reconnected to the broker");
                    break conn;
                }
                Err(error) => tracing::debug!(%error, attempt, "reconnecting to the broker failed"),
            }
        };
    }
}

type BoxRead = Pin<Box<dyn AsyncRead + Send>>;
type BoxWrite = Pin<Box<dyn AsyncWrite + Send>>;

async fn dial(inner: &Inner) -> Result<(BoxRead, BoxWrite), Error> {
    let target = &inner.target;
    let tcp = TcpStream::connect((target.host.as_str(), target.port)).await.map_err(|error| {
        tracing::debug!(%error, "connect failed");
        Error::Disconnected
    })?;
    let _ = tcp.set_nodelay(true);
    if !target.tls {
        let (read, write) = tokio::io::split(tcp);
        return Ok((Box::pin(read), Box::pin(write)));
    }
    let mut roots = rustls::RootCertStore::empty();
    for certificate in &inner.options.tls_roots {
        roots.add(certificate.clone()).map_err(|error| Error::InvalidArgument(format!("bad TLS root: {error}")))?;
    }
    let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from(target.host.clone())
        .map_err(|_| Error::InvalidArgument(format!("`{}` is not a TLS server name", target.host)))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|error| Error::Transport(format!("TLS handshake failed: {error}").into()))?;
    let (read, write) = tokio::io::split(tls);
    Ok((Box::pin(read), Box::pin(write)))
}

/// Opens a connection: dial, handshake, then the reader, writer and heartbeat tasks.
async fn open(inner: &Inner) -> Result<Arc<Conn>, Error> {
    let connect = async {
        let (read, mut write) = dial(inner).await?;
        let mut hello = BytesMut::new();
        ClientFrame::Hello {
            version: PROTOCOL_VERSION,
            token: inner.target.token.clone(),
            name: inner.options.name.clone(),
        }
        .encode(&mut hello);
        write.write_all(&hello).await.map_err(|_| Error::Disconnected)?;
        let mut frames = FramedRead::new(read, FrameCodec::new(protocol::DEFAULT_MAX_FRAME));
        let first =
            frames.next().await.ok_or(Error::Disconnected)?.map_err(|error| Error::Transport(Box::new(error)))?;
        match ServerFrame::parse(first).map_err(|error| Error::Transport(Box::new(error)))? {
            ServerFrame::Welcome { heartbeat_ms, .. } => Ok((frames, write, heartbeat_ms)),
            ServerFrame::Error { code, message, .. } => Err(code.to_error("", message)),
            _ => Err(Error::Transport("the broker did not answer the handshake".into())),
        }
    };
    let (frames, write, heartbeat_ms) = tokio::time::timeout(inner.options.connect_timeout, connect)
        .await
        .map_err(|_| Error::Timeout(inner.options.connect_timeout))??;
    let heartbeat = Duration::from_millis(u64::from(heartbeat_ms.max(100)));
    let (out, outbound) = mpsc::unbounded_channel();
    let conn = Arc::new(Conn::new(out, inner.options.request_timeout));
    let heard = Arc::new(AtomicBool::new(true));
    tokio::spawn(write_frames(write, outbound, conn.dead.clone()));
    tokio::spawn(read_frames(frames, Arc::clone(&conn), Arc::clone(&heard)));
    tokio::spawn(heartbeats(Arc::downgrade(&conn), heartbeat, heard));
    Ok(conn)
}

async fn write_frames(
    mut write: BoxWrite,
    mut outbound: mpsc::UnboundedReceiver<ClientFrame>,
    dead: CancellationToken,
) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        let first = tokio::select! {
            _ = dead.cancelled() => break,
            first = outbound.recv() => match first {
                Some(first) => first,
                None => break,
            },
        };
        first.encode(&mut buf);
        // Let the tasks that are ready now queue their frames too, so that they go out in this one write.
        tokio::task::yield_now().await;
        while buf.len() < 1024 * 1024 {
            match outbound.try_recv() {
                Ok(frame) => frame.encode(&mut buf),
                Err(_) => break,
            }
        }
        if write.write_all(&buf).await.is_err() || write.flush().await.is_err() {
            break;
        }
        buf.clear();
    }
    dead.cancel();
    // Closing: frames already queued (the last acks, a cancel) still go out, or the broker would redeliver
    // work that was done. A connection that is really gone fails this write at once.
    while let Ok(frame) = outbound.try_recv() {
        frame.encode(&mut buf);
    }
    if !buf.is_empty() {
        let _ = tokio::time::timeout(Duration::from_secs(1), write.write_all(&buf)).await;
    }
    let _ = write.shutdown().await;
}

/// Reads the broker's frames. `heard` is set at each frame, for [`heartbeats`].
async fn read_frames(mut frames: FramedRead<BoxRead, FrameCodec>, conn: Arc<Conn>, heard: Arc<AtomicBool>) {
    let limits = Limits::default();
    // When the frames read without waiting arrived: one clock reading per read from the socket (or per
    // `CLOCK_EVERY` frames under a stream that never waits), not per frame.
    const CLOCK_EVERY: u32 = 32;
    let mut now = Instant::now();
    let mut unclocked = 0u32;
    loop {
        let frame = match frames.next().now_or_never() {
            Some(frame) => {
                unclocked += 1;
                if unclocked == CLOCK_EVERY {
                    unclocked = 0;
                    now = Instant::now();
                    if conn.dead.is_cancelled() {
                        break;
                    }
                }
                frame
            }
            // Waits, and stops on the connection's end, only once no frame is ready.
            None => {
                let frame = tokio::select! {
                    _ = conn.dead.cancelled() => break,
                    frame = frames.next() => frame,
                };
                now = Instant::now();
                unclocked = 0;
                frame
            }
        };
        let Some(Ok(frame)) = frame else { break };
        heard.store(true, Ordering::Relaxed);
        let frame = match ServerFrame::parse(frame) {
            Ok(frame) => frame,
            Err(error) => {
                tracing::warn!(%error, "the broker sent a malformed frame; reconnecting");
                break;
            }
        };
        match frame {
            ServerFrame::Ok { req, body } => answer(&conn, req, Ok(body)),
            ServerFrame::Error { req: 0, code, message } => {
                tracing::warn!(?code, %message, "the broker closed the connection");
                break;
            }
            ServerFrame::Error { req, code, message } => answer(&conn, req, Err((code, message))),
            ServerFrame::Deliver { consumer, tag, delivery_count, ttl_ms, payload } => {
                let Some(route) = conn.routes.get(&consumer) else { continue };
                match codec::decode_envelope_bytes(&payload, &limits) {
                    Ok(mut envelope) => {
                        envelope.deadline_ms = ttl_ms;
                        let handle =
                            if tag == 0 { AckHandle::auto() } else { AckHandle::new(Arc::clone(&route.acker), tag) };
                        let delivery = Delivery { envelope, delivery_count, received_at: now, handle };
                        match &route.direct {
                            Some(sink) => sink(delivery),
                            None => drop(route.sender.send(delivery)),
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "dead-lettering a delivery that is not an envelope");
                        if tag != 0 {
                            let _ = conn.send(ClientFrame::Settle { consumer, tag, outcome: Outcome::DeadLetter });
                        }
                    }
                }
            }
            ServerFrame::Cancelled { consumer } => {
                conn.routes.remove(&consumer);
            }
            ServerFrame::Abort { consumer, tag } => {
                if let Some(route) = conn.routes.get(&consumer) {
                    route.cancellations.cancel(tag);
                }
            }
            ServerFrame::Ping | ServerFrame::Welcome { .. } => {}
        }
    }
    conn.dead.cancel();
    // Every request waiting on this connection fails now rather than at its timeout.
    conn.pending.clear();
}

fn answer(conn: &Arc<Conn>, req: u32, result: Result<Bytes, (ErrorCode, String)>) {
    let Some((_, waiter)) = conn.pending.remove(&req) else { return };
    match waiter {
        Waiter::Answer(answer) => {
            let _ = answer.send(result);
        }
        Waiter::Consumer { logical, sender, direct, answer } => {
            let result = result.and_then(|body| {
                protocol::parse_consumer_body(body.clone())
                    .map(|consumer| {
                        let cancellations = Arc::new(Cancellations::new());
                        let acker: Arc<dyn Acker> = Arc::new(RemoteAcker {
                            conn: conn.out.clone(),
                            link: Arc::downgrade(conn),
                            dead: conn.dead.clone(),
                            consumer,
                            cancellations: Arc::clone(&cancellations),
                        });
                        conn.routes.insert(consumer, Route { logical, sender, direct, acker, cancellations });
                        body
                    })
                    .map_err(|error| (ErrorCode::Malformed, error.to_string()))
            });
            let _ = answer.send(result);
        }
    }
}

/// Pings the broker every `interval`, and drops the connection once nothing was `heard` from it (a flag the
/// reader sets; cleared here) at three ticks in a row: a dead broker is noticed after three to four intervals
/// of silence.
async fn heartbeats(conn: Weak<Conn>, interval: Duration, heard: Arc<AtomicBool>) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut silent_ticks = 0u32;
    loop {
        ticks.tick().await;
        let Some(conn) = conn.upgrade() else { return };
        if conn.dead.is_cancelled() {
            return;
        }
        silent_ticks = if heard.swap(false, Ordering::Relaxed) { 0 } else { silent_ticks + 1 };
        if silent_ticks >= 3 {
            let silent = interval * silent_ticks;
            tracing::warn!(?silent, "the broker went silent; reconnecting");
            conn.dead.cancel();
            conn.pending.clear();
            return;
        }
        let _ = conn.send(ClientFrame::Ping);
    }
}

/// Settles the deliveries of one consumer on one connection; once that connection is gone they were requeued.
struct RemoteAcker {
    conn: mpsc::UnboundedSender<ClientFrame>,
    /// The connection the deliveries came on, for requests that only it may make ([`Acker::republish`]).
    link: Weak<Conn>,
    dead: CancellationToken,
    consumer: u64,
    cancellations: Arc<Cancellations>,
}

impl fmt::Debug for RemoteAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteAcker").field("consumer", &self.consumer).finish()
    }
}

impl Acker for RemoteAcker {
    fn settle(&self, tag: u64, outcome: Outcome) -> BoxFuture<'_, Result<(), Error>> {
        self.cancellations.forget(tag);
        let result = if self.dead.is_cancelled() {
            Err(Error::Disconnected)
        } else {
            self.conn
                .send(ClientFrame::Settle { consumer: self.consumer, tag, outcome })
                .map_err(|_| Error::Disconnected)
        };
        rpc_core::transport::finished(result)
    }

    fn publish<'a>(
        &'a self,
        _tag: u64,
        queue: &'a str,
        envelope: Envelope,
        confirm: Confirm,
    ) -> BoxFuture<'a, Result<(), Error>> {
        if self.dead.is_cancelled() {
            // The broker requeued this connection's deliveries when it went.
            return rpc_core::transport::finished(Err(Error::DeliveryLost));
        }
        // On the delivery's own connection: once the broker has dropped it (and requeued the request), it reads
        // nothing more from it, so a stale reply never reaches the caller.
        if confirm == Confirm::Sent {
            let sent =
                reply_frame(queue, &envelope).and_then(|frame| self.conn.send(frame).map_err(|_| Error::DeliveryLost));
            return rpc_core::transport::finished(sent);
        }
        Box::pin(async move {
            let conn = self.link.upgrade().filter(|conn| !conn.dead.is_cancelled()).ok_or(Error::DeliveryLost)?;
            let payload = codec::encode_envelope(&envelope)?;
            let frame = publish_frame(queue, &envelope, payload, false);
            match conn.request(frame, Waiter::Answer, conn.request_timeout).await {
                Ok(answer) => answer.map(drop).map_err(|(code, message)| code.to_error(queue, message)),
                // Whether the broker took it is unknown; it redelivers the request, whose next delivery answers.
                Err(Error::Disconnected) => Err(Error::DeliveryLost),
                Err(error) => Err(error),
            }
        })
    }

    fn answer<'a>(
        &'a self,
        tag: u64,
        reply_to: &'a ReplyTo,
        reply: Envelope,
    ) -> BoxFuture<'a, Result<Answered, Error>> {
        if self.dead.is_cancelled() {
            return Box::pin(std::future::ready(Err(Error::DeliveryLost)));
        }
        if !reply_to.is_inbox() {
            // A durable callback queue: a confirmed publish, then the ack.
            return rpc_core::transport::reply_then_ack(self, tag, reply_to, reply);
        }
        // One frame, on the delivery's own connection (see `publish`): the broker publishes the reply and acks
        // the delivery only while this connection holds it.
        self.cancellations.forget(tag);
        let sent = codec::encode_envelope(&reply).map_err(Error::from).and_then(|payload| {
            let frame = ClientFrame::Answer {
                consumer: self.consumer,
                tag,
                reply_to: reply_to.address().to_owned(),
                ttl_ms: reply.deadline_ms,
                payload,
            };
            self.conn.send(frame).map_err(|_| Error::DeliveryLost)
        });
        rpc_core::transport::answered(sent.map(|()| Answered::Sent))
    }

    fn republish<'a>(&'a self, tag: u64, queue: &'a str, envelope: Envelope) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let conn = self.link.upgrade().filter(|conn| !conn.dead.is_cancelled()).ok_or(Error::DeliveryLost)?;
            let payload = codec::encode_envelope(&envelope)?;
            let (priority, ttl_ms, delay_ms) =
                (envelope.priority.unwrap_or(0), envelope.deadline_ms, envelope.delay_ms);
            let key = call_key(&envelope);
            let consumer = self.consumer;
            let id = Some(*envelope.id.as_bytes());
            let frame = |req| ClientFrame::Republish {
                req,
                consumer,
                tag,
                queue: queue.to_owned(),
                priority,
                ttl_ms,
                delay_ms,
                key,
                id,
                payload,
            };
            // On the delivery's own connection: once the broker dropped it (and requeued the request), it reads
            // nothing more from it; while it holds it, it publishes and acks in one step.
            match conn.request(frame, Waiter::Answer, conn.request_timeout).await {
                Ok(Ok(_)) => {
                    self.cancellations.forget(tag);
                    Ok(())
                }
                Ok(Err((code, message))) => Err(code.to_error(queue, message)),
                // Whether the broker took it is unknown: the request is redelivered if not, and the copy then
                // finds the key executed or runs as the next attempt.
                Err(Error::Disconnected) => Err(Error::DeliveryLost),
                Err(error) => Err(error),
            }
        })
    }

    fn cancelled(&self, tag: u64) -> Option<BoxFuture<'static, ()>> {
        Some(self.cancellations.watch(tag))
    }
}

/// Ends a logical consumer when its [`Consumer`] is dropped. A consumer keeps its connection alive.
struct LogicalGuard {
    inner: Arc<Inner>,
    id: u64,
}

impl LogicalGuard {
    /// The connection and the broker's id of this consumer on it, if it has one now.
    fn on_broker(&self) -> Option<(Arc<Conn>, u64)> {
        let conn = self.inner.current()?;
        let consumer = conn.routes.iter().find(|route| route.logical == self.id).map(|route| *route.key())?;
        Some((conn, consumer))
    }
}

impl ConsumerControl for LogicalGuard {
    fn pause(&self) {
        if let Some(logical) = self.inner.consumers().get_mut(&self.id) {
            logical.paused = true;
        }
        if let Some((conn, consumer)) = self.on_broker() {
            let _ = conn.send(ClientFrame::Pause { consumer });
        }
    }

    fn direct(&self, sink: DeliverySink) -> bool {
        match self.inner.consumers().get_mut(&self.id) {
            Some(logical) => logical.direct = Some(Arc::clone(&sink)),
            None => return false,
        }
        // The route of the consumer on the current connection, if it has one; a new connection's routes take it
        // from the logical consumer.
        if let Some((conn, consumer)) = self.on_broker()
            && let Some(mut route) = conn.routes.get_mut(&consumer)
        {
            route.direct = Some(sink);
        }
        true
    }
}

impl Drop for LogicalGuard {
    fn drop(&mut self) {
        if let Some((conn, consumer)) = self.on_broker() {
            conn.routes.remove(&consumer);
            let _ = conn.send(ClientFrame::Cancel { req: conn.req(), consumer });
        }
        self.inner.consumers().remove(&self.id);
    }
}

impl Transport for Remote {
    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
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

    fn open_inbox(&self) -> BoxFuture<'_, Result<Inbox, Error>> {
        Box::pin(async move {
            let address = format!("{INBOX_PREFIX}{}", Uuid::new_v4());
            let options = ConsumeOptions::new().prefetch(0).auto_ack(true);
            let consumer = self.inner.consumer(LogicalKind::Inbox(address.clone()), options).await?;
            Ok(Inbox { address, consumer, losses: Some(self.inner.losses.subscribe()) })
        })
    }

    fn queue_stats<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<QueueStats, Error>> {
        Box::pin(async move {
            let body = self.inner.request(queue, |req| ClientFrame::Stats { req, queue: queue.to_owned() }).await?;
            protocol::parse_stats_body(body).map_err(|error| Error::Transport(Box::new(error)))
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
    key: Option<crate::engine::Key>,
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

/// A request waiting for its answer on a connection; dropping it forgets the request, so that an answer that
/// never comes (a lost confirm, a caller that gave up) leaves nothing behind.
struct Waiting<'a> {
    conn: &'a Conn,
    req: u32,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.conn.pending.remove(&self.req);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let plain = parse_url("mqrpc://127.0.0.1:7878").expect("parses");
        assert_eq!((plain.host.as_str(), plain.port, plain.token.as_str(), plain.tls), ("127.0.0.1", 7878, "", false));
        let secret = parse_url("mqrpcs://s3cret@broker.local:443/").expect("parses");
        assert_eq!((secret.host.as_str(), secret.token.as_str(), secret.tls), ("broker.local", "s3cret", true));
        let v6 = parse_url("mqrpc://[::1]:9000").expect("parses");
        assert_eq!(v6.host, "::1");
        for bad in ["http://x:1", "mqrpc://host", "mqrpc://:1", "mqrpc://host:port"] {
            assert!(matches!(parse_url(bad), Err(Error::InvalidArgument(_))), "{bad}");
        }
    }
}
