//! The engine behind TCP (optionally TLS): the `rpc-broker` server.
//!
//! Each connection has a reader that runs frames against the shared hub (the engine and its consumers) in
//! short critical sections, and a writer that drains everything queued for the connection into one buffer and
//! writes it with one syscall. With a data directory, the durable queues' journal goes to the
//! [`log`](crate::log), and the publishers of durable messages are answered once it has them. Limits: frame
//! size, handshake time, connections, unacked deliveries per connection, bytes waiting to be written per
//! connection (past which the connection's frames are not read), and a memory high-watermark on the bytes the
//! broker holds, past which publishes get `QueueFull`.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use rpc_core::codec::{self, Limits};
use rpc_core::{Code, Envelope, Error, Kind, QueueOptions, QueueStats};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio_util::codec::FramedRead;

use crate::access::{Access, Right, User, Users};
use crate::engine::{self, ConsumerId, EngineError, Props, QueueConfig};
use crate::hub::{Hub, Sink, declare, join_group, join_private, settle_of, to_error};
use crate::log::{Log, LogConfig, Recovery};
use crate::protocol::{
    self, ClientFrame, ErrorCode, Frame, FrameBudget, FrameCodec, INBOX_PREFIX, OLDEST_CLIENT_VERSION,
    PROTOCOL_VERSION, ProtocolError, QUIET_REFUSALS_IN_INBOX, ServerFrame,
};

/// How the server runs; every field has a sane default.
#[derive(Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Clients must present this token in their handshake; `None` accepts any. With [`ServerConfig::users`]
    /// set too, it is a credential with every right.
    pub token: Option<String>,
    /// Users and what each may do ([`crate::access`]): a client presents a user's token in its handshake and
    /// may then do what that user's grants allow. `None`: every connection may do everything.
    pub users: Option<Arc<Users>>,
    /// Largest frame accepted (default 16 MiB).
    pub max_frame: usize,
    /// Time a new connection has to complete its handshake (default 10 s).
    pub handshake_timeout: Duration,
    /// Heartbeat interval; a connection silent for three of them is closed (default 1 s).
    pub heartbeat: Duration,
    /// Connections open at once (default 1,024).
    pub max_connections: usize,
    /// Unacked deliveries per consumer (default 10,000): a larger prefetch, or an unlimited one (0), is
    /// lowered to it.
    pub max_unacked: u32,
    /// Bytes queued for writing to one connection past which its frames are not read (default 64 MiB).
    pub max_outbound: usize,
    /// Bytes of messages the broker holds past which publishes are refused with `QueueFull` (default 1 GiB).
    pub memory_high_watermark: usize,
    /// Bytes of large frames (over 64 KiB) being received, across all connections, past which a connection
    /// that starts another one is closed with the `Limit` error (default 256 MiB). A frame is counted at its
    /// announced length from its length prefix until its last byte arrives. Before its handshake a peer may
    /// send frames of at most [`protocol::HANDSHAKE_MAX_FRAME`] bytes.
    pub receive_budget: usize,
    /// TLS, if set.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Where durable queues are kept; `None` keeps every queue in memory only.
    pub log: Option<LogConfig>,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            token: None,
            users: None,
            max_frame: protocol::DEFAULT_MAX_FRAME,
            handshake_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_secs(1),
            max_connections: 1024,
            max_unacked: 10_000,
            max_outbound: 64 * 1024 * 1024,
            memory_high_watermark: 1024 * 1024 * 1024,
            receive_budget: 256 * 1024 * 1024,
            tls: None,
            log: None,
        }
    }
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfig")
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("users", &self.users.as_ref().map(|users| users.len()))
            .field("max_frame", &self.max_frame)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("heartbeat", &self.heartbeat)
            .field("max_connections", &self.max_connections)
            .field("max_unacked", &self.max_unacked)
            .field("max_outbound", &self.max_outbound)
            .field("memory_high_watermark", &self.memory_high_watermark)
            .field("receive_budget", &self.receive_budget)
            .field("tls", &self.tls.is_some())
            .field("log", &self.log)
            .finish()
    }
}

/// Counters of a running server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BrokerStats {
    /// Connections open now.
    pub connections: usize,
    /// Connections accepted since start.
    pub accepted: u64,
    /// Connections closed because of a protocol, auth or limit error.
    pub rejected: u64,
    /// Operations refused because the connection's user lacked the right ([`ServerConfig::users`]).
    pub denied: u64,
    /// Frames read.
    pub frames_in: u64,
    /// Bytes of messages held.
    pub bytes_held: usize,
    /// Bytes of large frames being received (see [`ServerConfig::receive_budget`]).
    pub receiving: usize,
}

/// One open connection, as [`Monitor::connections`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionInfo {
    /// The broker's number for it, in the order connections were accepted.
    pub id: u64,
    /// The peer's address.
    pub peer: SocketAddr,
    /// The name the client gave in its `Hello` (empty if none).
    pub name: String,
    /// The protocol version it speaks.
    pub version: u16,
    /// When its handshake was accepted, in milliseconds since the Unix epoch.
    pub connected_ms: u64,
    /// Bytes waiting to be written to it.
    pub outbound_bytes: usize,
}

/// A connection past its handshake.
struct Session {
    peer: SocketAddr,
    name: String,
    version: u16,
    connected_ms: u64,
    queued: Arc<AtomicUsize>,
}

struct State {
    hub: Mutex<Hub<Bytes>>,
    /// The connections past their handshake, by id.
    sessions: Mutex<std::collections::BTreeMap<u64, Session>>,
    next_session: AtomicU64,
    config: ServerConfig,
    log: Option<Arc<Log>>,
    connections: AtomicUsize,
    accepted: AtomicU64,
    rejected: AtomicU64,
    denied: AtomicU64,
    frames_in: AtomicU64,
    /// The users now (see [`Monitor::replace_users`]); starts as the configuration's.
    users: std::sync::RwLock<Option<Arc<Users>>>,
    /// Bumped at each replacement of the users: a connection sees it and takes its user's new grants.
    users_generation: AtomicU64,
    /// Large frames being received, across connections.
    receiving: Arc<FrameBudget>,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Hub<Bytes>> {
        self.hub.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Dispatches the delayed messages due now ([`Hub::tick`]).
    fn tick(&self) -> Option<Instant> {
        self.lock().tick(Instant::now())
    }

    fn stats(&self) -> BrokerStats {
        BrokerStats {
            connections: self.connections.load(Ordering::Relaxed),
            accepted: self.accepted.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            denied: self.denied.load(Ordering::Relaxed),
            frames_in: self.frames_in.load(Ordering::Relaxed),
            bytes_held: self.lock().engine.bytes(),
            receiving: self.receiving.used(),
        }
    }

    fn sessions(&self) -> MutexGuard<'_, std::collections::BTreeMap<u64, Session>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn connections(&self) -> Vec<ConnectionInfo> {
        self.sessions()
            .iter()
            .map(|(id, session)| ConnectionInfo {
                id: *id,
                peer: session.peer,
                name: session.name.clone(),
                version: session.version,
                connected_ms: session.connected_ms,
                outbound_bytes: session.queued.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Every queue with its counters, by name.
    fn queues(&self) -> Vec<(String, QueueStats)> {
        let hub = self.lock();
        let mut queues: Vec<_> = hub
            .engine
            .queue_names()
            .filter_map(|name| hub.engine.stats(name).map(|stats| (name.to_owned(), stats)))
            .collect();
        queues.sort_by(|a, b| a.0.cmp(&b.0));
        queues
    }
}

/// The figures of a running [`BrokerServer`] ([`BrokerServer::monitor`]), read while it runs.
#[derive(Clone)]
pub struct Monitor {
    state: Arc<State>,
}

impl Monitor {
    /// The server's counters.
    pub fn stats(&self) -> BrokerStats {
        self.state.stats()
    }

    /// Every queue with its counters, by name (as [`BrokerServer::queues`]).
    pub fn queues(&self) -> Vec<(String, QueueStats)> {
        self.state.queues()
    }

    /// The open connections past their handshake, oldest first.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        self.state.connections()
    }

    /// Whether the server has users ([`ServerConfig::users`]).
    pub fn has_users(&self) -> bool {
        self.state.users.read().unwrap_or_else(PoisonError::into_inner).is_some()
    }

    /// Whether `token` is a user's with the `admin` right on every name (`"names": "*"`), as the users are now:
    /// such a user may see and act on the whole broker, as the dashboard lets its visitors.
    pub fn is_admin_token(&self, token: &str) -> bool {
        let users = self.state.users.read().unwrap_or_else(PoisonError::into_inner).clone();
        users.and_then(|users| users.find(token)).is_some_and(|user| user.may(crate::access::Right::Admin, "*"))
    }

    /// Replaces the users (a reloaded users file): new connections are checked against `users`, and each open
    /// connection of a user takes that user's new grants with its next frame (none, if the user is gone: every
    /// operation it tries is then refused). Connections of the shared token are not affected. A server started
    /// without users stays without: this changes only a server that has them.
    pub fn replace_users(&self, users: Users) {
        let mut current = self.state.users.write().unwrap_or_else(PoisonError::into_inner);
        if current.is_some() {
            *current = Some(Arc::new(users));
            self.state.users_generation.fetch_add(1, Ordering::AcqRel);
        }
    }
}

impl fmt::Debug for Monitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Monitor").field("stats", &self.stats()).finish()
    }
}

/// A running broker server. Dropping it stops accepting and closes every connection; its log, if it has one,
/// is written, synced and closed before the drop returns.
pub struct BrokerServer {
    state: Arc<State>,
    local_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    recovery: Option<Recovery>,
}

impl fmt::Debug for BrokerServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerServer").field("local_addr", &self.local_addr).field("stats", &self.stats()).finish()
    }
}

impl BrokerServer {
    /// Listens on `addr` (port 0 picks a free port) and serves until dropped. With a [`ServerConfig::log`], the
    /// durable queues are read back from it first ([`BrokerServer::recovery`] says what was found).
    ///
    /// # Errors
    /// When the address cannot be bound, or the log cannot be opened (its error, as
    /// [`std::io::ErrorKind::InvalidData`] for a corrupt record).
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub async fn bind(addr: SocketAddr, config: ServerConfig) -> std::io::Result<BrokerServer> {
        let mut hub = Hub::default();
        let (log, recovery) = match &config.log {
            Some(log_config) => {
                if config.max_frame > crate::log::MAX_MESSAGE {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!(
                            "a frame of {} bytes would not fit in a log record: with a data directory the largest \
                             frame is {} bytes",
                            config.max_frame,
                            crate::log::MAX_MESSAGE
                        ),
                    ));
                }
                let (log, recovery) = Log::open(log_config.clone()).map_err(|error| {
                    let kind = match error {
                        crate::log::LogError::Corrupt { .. } => std::io::ErrorKind::InvalidData,
                        _ => std::io::ErrorKind::Other,
                    };
                    std::io::Error::new(kind, error)
                })?;
                let log = Arc::new(log);
                let sink = Arc::clone(&log);
                hub.set_journal(Box::new(move |entries| sink.append(entries)));
                (Some(log), Some(restore(&mut hub, recovery)?))
            }
            None => (None, None),
        };
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let receiving = Arc::new(FrameBudget::new(config.receive_budget));
        let users = std::sync::RwLock::new(config.users.clone());
        let state = Arc::new(State {
            hub: Mutex::new(hub),
            receiving,
            config,
            log,
            connections: AtomicUsize::new(0),
            sessions: Mutex::new(std::collections::BTreeMap::new()),
            next_session: AtomicU64::new(1),
            accepted: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            denied: AtomicU64::new(0),
            frames_in: AtomicU64::new(0),
            users,
            users_generation: AtomicU64::new(0),
        });
        let wake = state.lock().timer_started();
        tokio::spawn(crate::hub::run_timer(Arc::downgrade(&state), State::tick, wake));
        let task = tokio::spawn(accept(listener, Arc::clone(&state)));
        Ok(BrokerServer { state, local_addr, task, recovery })
    }

    /// What was read back from the log when the server started: the queues, records, bytes truncated and
    /// records quarantined, and the time it took (the messages themselves are in the queues now).
    pub fn recovery(&self) -> Option<&Recovery> {
        self.recovery.as_ref()
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The URL clients connect to (`mqrpc://` or `mqrpcs://`, with the token if there is one).
    pub fn url(&self) -> String {
        let scheme = if self.state.config.tls.is_some() { "mqrpcs" } else { "mqrpc" };
        match &self.state.config.token {
            Some(token) => format!("{scheme}://{token}@{}", self.local_addr),
            None => format!("{scheme}://{}", self.local_addr),
        }
    }

    /// The server's counters.
    pub fn stats(&self) -> BrokerStats {
        self.state.stats()
    }

    /// A handle to the server's figures, for metrics and monitoring: it can be cloned and sent to other tasks,
    /// and reads what the server reads while the server runs.
    pub fn monitor(&self) -> Monitor {
        Monitor { state: Arc::clone(&self.state) }
    }

    /// Every queue with its counters, by name: service queues, dead-letter queues, subscriber groups and
    /// callers' inboxes (`inbox.` names) alike.
    pub fn queues(&self) -> Vec<(String, QueueStats)> {
        self.state.queues()
    }

    /// Runs until the task serving it ends (it does not, unless the listener fails).
    pub async fn run(&mut self) {
        let _ = (&mut self.task).await;
    }
}

impl Drop for BrokerServer {
    fn drop(&mut self) {
        self.task.abort();
        // What was handed to the log is written and synced, and the data directory released, before this returns.
        if let Some(log) = &self.state.log {
            log.close();
        }
    }
}

/// Puts what the log read back into the engine; returns the report without the messages.
///
/// # Errors
/// A queue the engine refuses ([`std::io::ErrorKind::InvalidData`]): starting without it would leave its
/// messages in the log and number new ones over them.
fn restore(hub: &mut Hub<Bytes>, mut recovery: Recovery) -> std::io::Result<Recovery> {
    let now = Instant::now();
    let mut restored = 0usize;
    for queue in &mut recovery.queues {
        hub.engine.declare_queue(&queue.name, queue.config.clone()).map_err(|error| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("the log's durable queue `{}` cannot be restored: {error}", queue.name),
            )
        })?;
        for id in queue.acked_ids.drain(..) {
            hub.engine.remember(&queue.name, id, now);
        }
        for message in queue.messages.drain(..) {
            let size = message.payload.len();
            if hub.engine.restore(&queue.name, message.seq, message.payload, size, message.record, now).is_ok() {
                restored += 1;
            }
        }
    }
    hub.flush_journal();
    tracing::info!(
        queues = recovery.queues.len(),
        messages = restored,
        records = recovery.records,
        truncated = recovery.truncated,
        quarantined = recovery.quarantined.len(),
        elapsed = ?recovery.elapsed,
        "durable queues read back from the log"
    );
    Ok(recovery)
}

async fn accept(listener: TcpListener, state: Arc<State>) {
    let mut connections = JoinSet::new();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        let _ = stream.set_nodelay(true);
        state.accepted.fetch_add(1, Ordering::Relaxed);
        let state = Arc::clone(&state);
        if state.connections.load(Ordering::Relaxed) >= state.config.max_connections {
            state.rejected.fetch_add(1, Ordering::Relaxed);
            connections.spawn(refuse(stream, ErrorCode::Limit, "too many connections; try again later"));
            continue;
        }
        state.connections.fetch_add(1, Ordering::Relaxed);
        connections.spawn(async move {
            match state.config.tls.clone() {
                Some(tls) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                    match tokio::time::timeout(state.config.handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            // A client certificate, verified by the TLS configuration, names a user.
                            let certificate = stream.get_ref().1.peer_certificates().and_then(|chain| chain.first());
                            let fingerprint =
                                certificate.map(|certificate| crate::access::sha256(certificate.as_ref()));
                            serve(&state, stream, peer, fingerprint).await;
                        }
                        _ => {
                            state.rejected.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(%peer, "TLS handshake failed or timed out");
                        }
                    }
                }
                None => serve(&state, stream, peer, None).await,
            }
            state.connections.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

async fn refuse(mut stream: TcpStream, code: ErrorCode, message: &str) {
    let mut buf = BytesMut::new();
    ServerFrame::Error { req: 0, code, message: message.to_owned() }.encode(&mut buf);
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&buf)).await;
}

/// What a connection's writer sends.
enum Outbound {
    Frame(ServerFrame),
    Deliver(engine::Delivery<Bytes>),
}

/// The connection's side of its consumers: deliveries queued for the writer, counted in bytes.
struct ConnectionSink {
    out: mpsc::UnboundedSender<Outbound>,
    queued: Arc<AtomicUsize>,
    consumer: u64,
}

impl Sink<Bytes> for ConnectionSink {
    fn deliver(&self, delivery: engine::Delivery<Bytes>, _now: Instant) {
        self.queued.fetch_add(delivery.message.len(), Ordering::Relaxed);
        // A closed writer means the connection is going; its consumers are detached right after.
        let _ = self.out.send(Outbound::Deliver(delivery));
    }

    fn abort(&self, tag: u64) {
        let _ = self.out.send(Outbound::Frame(ServerFrame::Abort { consumer: self.consumer, tag }));
    }

    fn ended(&self) {
        let _ = self.out.send(Outbound::Frame(ServerFrame::Cancelled { consumer: self.consumer }));
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    // The length is not secret; the contents are compared without an early exit.
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn error_code(error: &Error) -> ErrorCode {
    match error {
        Error::NoRoute(_) => ErrorCode::NoRoute,
        Error::QueueFull(_) => ErrorCode::QueueFull,
        Error::InvalidArgument(_) => ErrorCode::Invalid,
        Error::DeliveryLost => ErrorCode::Gone,
        Error::Forbidden(_) => ErrorCode::Forbidden,
        _ => ErrorCode::Internal,
    }
}

fn failure(req: u32, error: &Error) -> ServerFrame {
    ServerFrame::Error { req, code: error_code(error), message: error.to_string() }
}

fn protocol_failure(error: &ProtocolError) -> ServerFrame {
    let code = match error {
        ProtocolError::TooLarge { .. } => ErrorCode::TooLarge,
        ProtocolError::OverBudget { .. } => ErrorCode::Limit,
        ProtocolError::Io(_) => ErrorCode::Internal,
        _ => ErrorCode::Malformed,
    };
    ServerFrame::Error { req: 0, code, message: error.to_string() }
}

/// Serves one connection; `certificate` is the SHA-256 of the client certificate its TLS handshake verified.
async fn serve<S>(state: &Arc<State>, stream: S, peer: SocketAddr, certificate: Option<[u8; 32]>)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (read, write) = tokio::io::split(stream);
    // Until the handshake is accepted, frames are no larger than a handshake.
    let codec = FrameCodec::with_budget(protocol::HANDSHAKE_MAX_FRAME, Arc::clone(&state.receiving));
    let mut frames = FramedRead::new(read, codec);
    let (out, outbound) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let drained = Arc::new(Notify::new());
    let writer = tokio::spawn(write_frames(write, outbound, Arc::clone(&queued), Arc::clone(&drained)));

    let mut connection = Connection {
        state: Arc::clone(state),
        version: PROTOCOL_VERSION,
        out: out.clone(),
        queued: Arc::clone(&queued),
        consumers: HashSet::new(),
        inboxes: HashSet::new(),
        access: Access::Everything,
        users_generation: state.users_generation.load(Ordering::Acquire),
    };
    match handshake(state, &mut frames, certificate).await {
        Ok((version, name, access)) => {
            connection.access = access;
            connection.version = version;
            let id = state.next_session.fetch_add(1, Ordering::Relaxed);
            let session = Session { peer, name, version, connected_ms: unix_ms(), queued };
            state.sessions().insert(id, session);
            let _session = Unregister { state, id };
            frames.decoder_mut().set_max_frame(state.config.max_frame);
            let welcome = ServerFrame::Welcome {
                version,
                heartbeat_ms: u32::try_from(state.config.heartbeat.as_millis()).unwrap_or(u32::MAX),
                max_frame: u32::try_from(state.config.max_frame).unwrap_or(u32::MAX),
                flags: if state.log.is_some() { protocol::WELCOME_DURABLE } else { 0 },
            };
            let _ = out.send(Outbound::Frame(welcome));
            if let Err(closing) = connection.run(&mut frames, &drained).await {
                state.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, ?closing, "closing connection");
                let _ = out.send(Outbound::Frame(closing));
            }
        }
        Err(refusal) => {
            state.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, ?refusal, "handshake refused");
            let _ = out.send(Outbound::Frame(refusal));
        }
    }
    connection.detach_all();
    drop(connection);
    drop(out);
    // Give the writer a moment to flush the last frame (an error, usually), then let it go.
    let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
}

/// Removes a session from the list as its connection ends.
struct Unregister<'a> {
    state: &'a State,
    id: u64,
}

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        self.state.sessions().remove(&self.id);
    }
}

/// Milliseconds since the Unix epoch, by this host's clock.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}

/// Reads and checks the client's `Hello`; returns the protocol version to speak with it, the client's name and
/// what it may do.
async fn handshake<R>(
    state: &State,
    frames: &mut FramedRead<R, FrameCodec>,
    certificate: Option<[u8; 32]>,
) -> Result<(u16, String, Access), ServerFrame>
where
    R: AsyncRead + Unpin,
{
    let refuse = |code, message: &str| ServerFrame::Error { req: 0, code, message: message.to_owned() };
    let first = match tokio::time::timeout(state.config.handshake_timeout, frames.next()).await {
        Err(_) => return Err(refuse(ErrorCode::Timeout, "no handshake within the time limit")),
        Ok(None) => return Err(refuse(ErrorCode::Malformed, "the connection closed before the handshake")),
        Ok(Some(Err(error))) => return Err(protocol_failure(&error)),
        Ok(Some(Ok(frame))) => frame,
    };
    state.frames_in.fetch_add(1, Ordering::Relaxed);
    match ClientFrame::parse(first) {
        Ok(ClientFrame::Hello { version, token, name }) => {
            if !(OLDEST_CLIENT_VERSION..=PROTOCOL_VERSION).contains(&version) {
                return Err(refuse(
                    ErrorCode::Version,
                    &format!(
                        "unsupported protocol version {version}; this broker speaks versions \
                         {OLDEST_CLIENT_VERSION} to {PROTOCOL_VERSION}"
                    ),
                ));
            }
            let shared =
                state.config.token.as_ref().map(|expected| constant_time_eq(expected.as_bytes(), token.as_bytes()));
            // A user's certificate first, whatever the token; then the shared token, then a user's token.
            let users = state.users.read().unwrap_or_else(PoisonError::into_inner).clone();
            let by_certificate =
                certificate.zip(users.as_ref()).and_then(|(fingerprint, users)| users.find_certificate(&fingerprint));
            let access = match (by_certificate, shared, &users) {
                (Some(user), _, _) => Some(Access::User(user)),
                (None, Some(true), _) | (None, None, None) => Some(Access::Everything),
                (None, _, Some(users)) => users.find(&token).map(Access::User),
                (None, Some(false), None) => None,
            };
            match access {
                Some(access) => Ok((version, name, access)),
                None => Err(refuse(ErrorCode::Unauthorized, "wrong or missing token")),
            }
        }
        Ok(_) => Err(refuse(ErrorCode::Malformed, "the first frame must be a handshake (Hello)")),
        Err(error) => Err(protocol_failure(&error)),
    }
}

async fn write_frames<W>(
    mut write: W,
    mut outbound: mpsc::UnboundedReceiver<Outbound>,
    queued: Arc<AtomicUsize>,
    drained: Arc<Notify>,
) where
    W: AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut last_write = Instant::now();
    while let Some(first) = outbound.recv().await {
        let mut written = 0;
        protocol::gather(first, &mut outbound, &mut buf, last_write, |item, buf| match item {
            Outbound::Frame(frame) => frame.encode(buf),
            Outbound::Deliver(delivery) => {
                written += delivery.message.len();
                ServerFrame::Deliver {
                    consumer: delivery.consumer.as_u64(),
                    tag: delivery.tag,
                    delivery_count: delivery.delivery_count,
                    ttl_ms: delivery.remaining_ttl.map(|ttl| u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
                    payload: delivery.message,
                }
                .encode(buf);
            }
        })
        .await;
        if write.write_all(&buf).await.is_err() {
            return;
        }
        last_write = Instant::now();
        buf.clear();
        queued.fetch_sub(written, Ordering::Relaxed);
        drained.notify_waiters();
        if outbound.is_empty() && write.flush().await.is_err() {
            return;
        }
    }
    let _ = write.shutdown().await;
}

/// A connection's frames, each with the instant it was read at: the frames that come without a wait (read
/// together, or decoded from what was read) share one reading of the clock, at most [`Clocked::SHARED`] of them;
/// the first frame after a wait reads it again.
struct Clocked<'a, R> {
    frames: &'a mut FramedRead<R, FrameCodec>,
    /// The reading the frames since the last wait share, and how many have.
    read: Option<(Instant, u32)>,
}

impl<'a, R: AsyncRead + Unpin> Clocked<'a, R> {
    /// The most frames that share a reading: some tens of microseconds of handling.
    const SHARED: u32 = 32;

    fn new(frames: &'a mut FramedRead<R, FrameCodec>) -> Clocked<'a, R> {
        Clocked { frames, read: None }
    }

    /// The next frame, and when it was read.
    async fn next(&mut self) -> Option<(Instant, Result<Bytes, ProtocolError>)> {
        let frame = std::future::poll_fn(|cx| {
            let polled = self.frames.poll_next_unpin(cx);
            if polled.is_pending() {
                self.read = None;
            }
            polled
        })
        .await?;
        let now = match &mut self.read {
            Some((at, shared)) if *shared < Self::SHARED => {
                *shared += 1;
                *at
            }
            read => {
                let now = Instant::now();
                *read = Some((now, 1));
                now
            }
        };
        Some((now, frame))
    }

    /// Forgets the shared reading: time passes in what comes next.
    fn forget(&mut self) {
        self.read = None;
    }
}

struct Connection {
    state: Arc<State>,
    /// The protocol version the connection speaks, from its handshake.
    version: u16,
    out: mpsc::UnboundedSender<Outbound>,
    queued: Arc<AtomicUsize>,
    consumers: HashSet<ConsumerId>,
    /// The inboxes it opened: the only ones its requests may name as their reply address, under users.
    inboxes: HashSet<String>,
    /// What the connection's user may do.
    access: Access,
    /// The generation of the users its `access` was taken from.
    users_generation: u64,
}

impl Connection {
    /// Serves frames until the peer leaves (`Ok`) or breaks a rule (`Err` with the frame that says why).
    async fn run<R>(&mut self, frames: &mut FramedRead<R, FrameCodec>, drained: &Notify) -> Result<(), ServerFrame>
    where
        R: AsyncRead + Unpin,
    {
        let mut frames = Clocked::new(frames);
        let heartbeat = self.state.config.heartbeat;
        let mut ticks = tokio::time::interval(heartbeat);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Set at each frame and cleared at each tick: no clock reading per frame. Three ticks in a row without
        // a frame (three to four intervals of silence) close the connection.
        let mut heard = true;
        let mut silent_ticks = 0u32;
        // Whether its consumers are held back for its silence.
        let mut held = false;
        loop {
            // A peer that does not read its deliveries stops being read from, until its backlog drains.
            while self.queued.load(Ordering::Relaxed) > self.state.config.max_outbound {
                let drain = drained.notified();
                // Time passes in the wait: the next frame reads the clock again.
                frames.forget();
                if tokio::time::timeout(heartbeat * 3, drain).await.is_err() {
                    return Err(ServerFrame::Error {
                        req: 0,
                        code: ErrorCode::Timeout,
                        message: "the connection does not read what it is sent".into(),
                    });
                }
            }
            tokio::select! {
                frame = frames.next() => {
                    let (now, frame) = match frame {
                        None => return Ok(()),
                        Some((_, Err(error))) => return Err(protocol_failure(&error)),
                        Some((now, Ok(frame))) => (now, frame),
                    };
                    heard = true;
                    if held {
                        held = false;
                        self.hold(false);
                    }
                    self.state.frames_in.fetch_add(1, Ordering::Relaxed);
                    let frame = ClientFrame::parse(frame).map_err(|error| protocol_failure(&error))?;
                    if let Some(answer) = self.handle(frame, now)? {
                        let _ = self.out.send(Outbound::Frame(answer));
                    }
                }
                _ = ticks.tick() => {
                    silent_ticks = if std::mem::take(&mut heard) { 0 } else { silent_ticks + 1 };
                    if silent_ticks == 1 && !held && !self.consumers.is_empty() {
                        // Silent for an interval: nothing new goes to its consumers until it is heard from, so
                        // that a peer that stopped (paused, starved) does not take in work that it may never
                        // run and that the broker would hand to others only once it drops the connection.
                        held = true;
                        self.hold(true);
                    }
                    if silent_ticks >= 3 {
                        return Err(ServerFrame::Error {
                            req: 0,
                            code: ErrorCode::Timeout,
                            message: "no complete frame for three heartbeats".into(),
                        });
                    }
                    let _ = self.out.send(Outbound::Frame(ServerFrame::Ping));
                }
            }
        }
    }

    /// Holds this connection's consumers back, or lets them take deliveries again.
    fn hold(&self, held: bool) {
        let mut hub = self.state.lock();
        for &consumer in &self.consumers {
            hub.engine.hold_consumer(consumer, held);
        }
        if !held {
            hub.dispatch(Instant::now());
        }
    }

    /// Whether the connection's user may do what `frame` asks: `Err` with the denial (logged) if not.
    fn permit(&mut self, frame: &ClientFrame) -> Result<(), Error> {
        if matches!(self.access, Access::Everything) {
            return Ok(());
        }
        let generation = self.state.users_generation.load(Ordering::Acquire);
        if generation != self.users_generation {
            // The users were replaced: this user's grants now, or none if it is gone.
            self.users_generation = generation;
            if let Access::User(user) = &self.access {
                let users = self.state.users.read().unwrap_or_else(PoisonError::into_inner).clone();
                let now = users.and_then(|users| users.by_name(user.name()));
                self.access = Access::User(now.unwrap_or_else(|| Arc::new(User::without_grants(user.name()))));
            }
        }
        let Access::User(user) = &self.access else { return Ok(()) };
        let (right, name, what): (Right, &str, &str) = match frame {
            ClientFrame::Declare { queue, .. } => (Right::Consume, queue, "declare"),
            // A publish to an inbox is a reply: allowed to a connection that holds a request naming that inbox.
            ClientFrame::Publish { queue, .. } if queue.starts_with(INBOX_PREFIX) => {
                if self.holds_request_for(queue) {
                    return Ok(());
                }
                tracing::info!(user = user.name(), inbox = %queue, "denied: a reply to an inbox no request it holds names");
                self.state.denied.fetch_add(1, Ordering::Relaxed);
                return Err(Error::Forbidden(format!(
                    "user `{}` may not publish to the inbox `{queue}`: it holds no request that names it",
                    user.name()
                )));
            }
            ClientFrame::Publish { queue, .. } | ClientFrame::CancelCall { queue, .. } => {
                (Right::Publish, queue, "publish to")
            }
            // A worker's retry of a delivery it holds: serving the queue is enough.
            ClientFrame::Republish { queue, .. } if user.may(Right::Consume, queue) => return Ok(()),
            ClientFrame::Republish { queue, .. } => (Right::Publish, queue, "publish to"),
            ClientFrame::PublishTopic { topic, .. } => (Right::Publish, topic, "broadcast to"),
            ClientFrame::Consume { queue, .. } if queue.ends_with(".dlq") => {
                (Right::Admin, queue, "read the dead letters of")
            }
            ClientFrame::Consume { queue, .. } => (Right::Consume, queue, "consume"),
            ClientFrame::Subscribe { topic, .. } => (Right::Consume, topic, "subscribe to"),
            ClientFrame::Stats { queue, .. } => (Right::Admin, queue, "read the stats of"),
            ClientFrame::DeleteQueue { queue, .. } => (Right::Admin, queue, "delete"),
            _ => return Ok(()),
        };
        if user.may(right, name) {
            return match frame {
                // An admin of the name may send what names any reply address: a replay of dead letters, whose
                // callers' inboxes are not its own.
                ClientFrame::Publish { payload, .. } | ClientFrame::PublishTopic { payload, .. }
                    if !user.may(Right::Admin, name) =>
                {
                    self.check_reply_address(user.name(), payload)
                }
                _ => Ok(()),
            };
        }
        tracing::info!(user = user.name(), right = right.name(), name, "denied");
        self.state.denied.fetch_add(1, Ordering::Relaxed);
        Err(Error::Forbidden(format!("user `{}` may not {what} `{name}` (it needs `{}`)", user.name(), right.name())))
    }

    /// A user's request or broadcast may name as its reply address only an inbox this connection opened: a
    /// caller cannot have a worker answer into another caller's inbox.
    fn check_reply_address(&self, user: &str, payload: &Bytes) -> Result<(), Error> {
        let limits = Limits { max_frame: self.state.config.max_frame, ..Limits::default() };
        let Some((reply_to, _)) = codec::reply_address_of(payload, &limits) else { return Ok(()) };
        let address = reply_to.address();
        if !address.starts_with(INBOX_PREFIX) || self.inboxes.contains(address) {
            return Ok(());
        }
        tracing::info!(user, reply_to = address, "denied: a request naming an inbox of another connection");
        self.state.denied.fetch_add(1, Ordering::Relaxed);
        Err(Error::Forbidden(format!(
            "user `{user}` may not name `{address}` as a reply address: only the inboxes this connection opened"
        )))
    }

    /// Whether one of this connection's consumers holds a request whose reply address is `inbox`: a worker
    /// answers only the callers whose requests it took. A scan of what the connection holds, made only for a
    /// user's publish to an inbox (replies go in `Answer` frames, checked against their own request).
    fn holds_request_for(&self, inbox: &str) -> bool {
        let limits = Limits { max_frame: self.state.config.max_frame, ..Limits::default() };
        let hub = self.state.lock();
        self.consumers.iter().any(|consumer| {
            hub.engine.held_by(*consumer).any(|request| {
                codec::reply_address_of(request, &limits).is_some_and(|(address, _)| address.address() == inbox)
            })
        })
    }

    /// Runs one frame, read at `now`; returns the answer to send, or `Err` to close the connection.
    fn handle(&mut self, frame: ClientFrame, now: Instant) -> Result<Option<ServerFrame>, ServerFrame> {
        let req = frame.req();
        let ok = |body: Bytes| Some(ServerFrame::Ok { req, body });
        if let ClientFrame::Consume { queue, .. } = &frame
            && queue.starts_with(INBOX_PREFIX)
        {
            // An inbox is consumed by the connection that opened it, through `OpenInbox` only.
            let why = format!("`{queue}` is an inbox: only the connection that opened it reads it");
            return Ok(Some(failure(req, &Error::Forbidden(why))));
        }
        if let Err(denied) = self.permit(&frame) {
            if let ClientFrame::Publish { quiet: true, payload, .. } = &frame
                && self.refuse_in_inbox(payload, &denied)
            {
                return Ok(None);
            }
            // Refused, the connection kept; an unconfirmed publish (request id 0) is answered neither way.
            return Ok((req != 0).then(|| failure(req, &denied)));
        }
        let answer = match frame {
            ClientFrame::Hello { .. } => {
                return Err(ServerFrame::Error {
                    req: 0,
                    code: ErrorCode::Malformed,
                    message: "a second handshake".into(),
                });
            }
            ClientFrame::Ping => None,
            // Frames are handled in order, so answering now answers for everything before; with a log, once
            // what they wrote is durable.
            ClientFrame::Sync { .. } => match &self.state.log {
                Some(_) => {
                    self.confirm_when_durable(req);
                    None
                }
                None => ok(Bytes::new()),
            },
            ClientFrame::Declare { queue, .. } if queue.starts_with(INBOX_PREFIX) => Some(failure(
                req,
                &Error::InvalidArgument(format!("`{queue}`: names starting with `{INBOX_PREFIX}` are inboxes'")),
            )),
            ClientFrame::Declare { queue, max_len, max_deliveries, durable, .. } => {
                let mut options = QueueOptions::new().durable(durable);
                if let Some(max_len) = max_len {
                    options = options.max_len(usize::try_from(max_len).unwrap_or(usize::MAX));
                }
                if let Some(max_deliveries) = max_deliveries {
                    options = options.max_deliveries(max_deliveries);
                }
                let declared = self.check_name(&queue).and_then(|()| {
                    let mut hub = self.state.lock();
                    let logged = hub.is_logged();
                    let declared = declare(&mut hub.engine, &queue, &options, logged);
                    hub.flush_journal();
                    declared
                });
                match declared {
                    Ok(()) if options.durable && self.state.log.is_some() => {
                        // Answered once its meta file is written.
                        self.confirm_when_durable(req);
                        None
                    }
                    Ok(()) => ok(Bytes::new()),
                    Err(error) => Some(failure(req, &error)),
                }
            }
            ClientFrame::Publish { queue, priority, ttl_ms, delay_ms, key, id, payload, quiet, .. } => {
                let props = frame_props(priority, ttl_ms, delay_ms, key, id, &payload);
                // Kept for a refusal: a slice of the frame, no copy.
                let request = quiet.then(|| payload.clone());
                match self.publish(Target::Queue(&queue), props, payload, None, now) {
                    // Request id 0: unconfirmed (a reply to an inbox), answered neither way.
                    Err(error) if req == 0 => {
                        tracing::debug!(%error, queue, "dropped an unconfirmed publish");
                        None
                    }
                    _ if req == 0 => None,
                    // Quiet (a call's request): answered only if it fails, from version 9 in the caller's inbox.
                    Ok(_) if quiet => None,
                    Err(error) if request.as_ref().is_some_and(|request| self.refuse_in_inbox(request, &error)) => None,
                    Ok(Stored::Durably) => {
                        self.confirm_when_durable(req);
                        None
                    }
                    Ok(Stored::InMemory) => ok(Bytes::new()),
                    Err(error) => Some(failure(req, &error)),
                }
            }
            ClientFrame::PublishTopic { topic, priority, ttl_ms, delay_ms, payload, .. } => {
                let props = frame_props(priority, ttl_ms, delay_ms, None, None, &payload);
                match self.publish(Target::Topic(&topic), props, payload, None, now) {
                    Ok(_) => ok(Bytes::new()),
                    Err(error) => Some(failure(req, &error)),
                }
            }
            ClientFrame::Republish { consumer, tag, queue, priority, ttl_ms, delay_ms, key, id, payload, .. } => {
                let consumer = ConsumerId::from_u64(consumer);
                let props = frame_props(priority, ttl_ms, delay_ms, key, id, &payload);
                // Only the connection's own consumers' deliveries.
                let held = self.consumers.contains(&consumer).then_some((consumer, tag));
                match held.ok_or(Error::DeliveryLost) {
                    Ok(held) => match self.publish(Target::Queue(&queue), props, payload, Some(held), now) {
                        Ok(Stored::Durably) => {
                            self.confirm_when_durable(req);
                            None
                        }
                        Ok(Stored::InMemory) => ok(Bytes::new()),
                        Err(error) => Some(failure(req, &error)),
                    },
                    Err(error) => Some(failure(req, &error)),
                }
            }
            // Never decoded: only sent.
            ClientFrame::Encoded { .. } => None,
            ClientFrame::Answer { consumer, tag, reply_to, ttl_ms, payload } => {
                let consumer = ConsumerId::from_u64(consumer);
                // Only the connection's own consumers' deliveries; a stale one (requeued already) is ignored,
                // its reply with it.
                if self.consumers.contains(&consumer) {
                    self.answer(consumer, tag, &reply_to, ttl_ms, payload, now);
                }
                None
            }
            ClientFrame::Consume { queue, prefetch, auto_ack, .. } => {
                match self.attach(req, &queue, prefetch, auto_ack) {
                    Ok(()) => None,
                    Err(error) => Some(failure(req, &error)),
                }
            }
            ClientFrame::Subscribe { topic, group, prefetch, auto_ack, .. } => {
                let joined = self.check_name(&topic).and_then(|()| self.check_name(&group)).and_then(|()| {
                    let engine = &mut self.state.lock().engine;
                    // A group named like an inbox is private: it goes with this consumer.
                    if group.starts_with(INBOX_PREFIX) {
                        join_private(engine, &topic, &group)
                    } else {
                        join_group(engine, &topic, &group)
                    }
                });
                match joined.and_then(|queue| self.attach(req, &queue, prefetch, auto_ack)) {
                    Ok(()) => None,
                    Err(error) => Some(failure(req, &error)),
                }
            }
            ClientFrame::Settle { consumer, tag, outcome } => {
                let consumer = ConsumerId::from_u64(consumer);
                // Only the connection's own consumers; a stale tag (requeued already) is ignored.
                if self.consumers.contains(&consumer) {
                    let mut hub = self.state.lock();
                    if let Err(error) = hub.engine.settle(consumer, tag, settle_of(outcome), now) {
                        tracing::debug!(%error, "ignoring a settle");
                    }
                    hub.dispatch(now);
                }
                None
            }
            ClientFrame::Cancel { consumer, .. } => {
                let consumer = ConsumerId::from_u64(consumer);
                if self.consumers.remove(&consumer) {
                    self.state.lock().detach(consumer, now);
                }
                ok(Bytes::new())
            }
            ClientFrame::CancelCall { queue, key } => {
                let mut hub = self.state.lock();
                // A queue that is gone holds nothing to cancel.
                let _ = hub.cancel(&queue, key);
                hub.dispatch(now);
                None
            }
            ClientFrame::Pause { consumer } => {
                let consumer = ConsumerId::from_u64(consumer);
                if self.consumers.contains(&consumer) {
                    self.state.lock().engine.pause_consumer(consumer);
                }
                None
            }
            ClientFrame::OpenInbox { name, .. } => match self.open_inbox(req, &name) {
                Ok(()) => None,
                Err(error) => Some(failure(req, &error)),
            },
            ClientFrame::Stats { queue, .. } => {
                let mut hub = self.state.lock();
                hub.engine.expire_queue(&queue, now);
                hub.flush_journal();
                match hub.engine.stats(&queue) {
                    Some(stats) => ok(protocol::stats_body(&stats)),
                    None => Some(failure(req, &Error::NoRoute(queue))),
                }
            }
            ClientFrame::DeleteQueue { queue, .. } if queue.starts_with(INBOX_PREFIX) => Some(failure(
                req,
                &Error::InvalidArgument(format!("`{queue}` is an inbox; it goes with its connection")),
            )),
            ClientFrame::DeleteQueue { queue, .. } => {
                let mut hub = self.state.lock();
                let durable = hub.engine.is_durable(&queue);
                hub.delete_queue(&queue);
                drop(hub);
                if durable && self.state.log.is_some() {
                    // Answered once the deletion is in the log.
                    self.confirm_when_durable(req);
                    None
                } else {
                    ok(Bytes::new())
                }
            }
            ClientFrame::ListQueues { .. } => {
                let mut queues = self.state.queues();
                queues.retain(|(name, _)| self.access.may(Right::Admin, name));
                ok(protocol::list_body(&queues))
            }
        };
        Ok(answer)
    }

    fn check_name(&self, name: &str) -> Result<(), Error> {
        if name.is_empty() || name.len() > 255 || name.chars().any(char::is_control) {
            Err(Error::InvalidArgument("names are 1 to 255 characters, without control characters".into()))
        } else {
            Ok(())
        }
    }

    /// Answers `req` once everything the log was handed so far is durable, or with the log's error.
    fn confirm_when_durable(&self, req: u32) {
        let Some(log) = &self.state.log else { return };
        let out = self.out.clone();
        log.barrier(Box::new(move |result| {
            let frame = match result {
                Ok(()) => ServerFrame::Ok { req, body: Bytes::new() },
                Err(message) => ServerFrame::Error { req, code: ErrorCode::Internal, message },
            };
            let _ = out.send(Outbound::Frame(frame));
        }));
    }

    /// Publishes `payload`, at `now`; with `replacing`, only while that delivery is held, which is then acked.
    /// Says whether the message went to a durable queue, whose publisher is answered once the log has it.
    fn publish(
        &self,
        target: Target<'_>,
        props: Props,
        payload: Bytes,
        replacing: Option<(ConsumerId, u64)>,
        now: Instant,
    ) -> Result<Stored, Error> {
        if props.priority > 9 {
            return Err(Error::InvalidArgument(format!("priority {} is above the highest, 9", props.priority)));
        }
        // The broker does not decode envelopes, but it refuses what no consumer could decode.
        let limits = Limits { max_frame: self.state.config.max_frame, ..Limits::default() };
        codec::check(&payload, &limits)
            .map_err(|error| Error::InvalidArgument(format!("the payload is not an envelope: {error}")))?;
        let mut hub = self.state.lock();
        if let Some((consumer, tag)) = replacing
            && !hub.engine.holds(consumer, tag)
        {
            return Err(Error::DeliveryLost);
        }
        if hub.engine.bytes().saturating_add(payload.len()) > self.state.config.memory_high_watermark {
            let name = match target {
                Target::Queue(name) | Target::Topic(name) => name,
            };
            return Err(Error::QueueFull(format!("{name} (the broker is at its memory high-watermark)")));
        }
        let mut result = match target {
            Target::Queue(queue) => hub.engine.publish(queue, payload, props, now),
            Target::Topic(topic) => hub.engine.publish_topic(topic, payload, props, now).map(drop),
        };
        if let (Ok(()), Some((consumer, tag))) = (&result, replacing) {
            result = hub.engine.settle(consumer, tag, engine::Settle::Ack, now);
        }
        let durable = match target {
            Target::Queue(queue) => hub.engine.is_durable(queue),
            Target::Topic(topic) => hub.engine.has_durable_group(topic),
        };
        hub.dispatch(now);
        result.map_err(to_error)?;
        Ok(if durable { Stored::Durably } else { Stored::InMemory })
    }

    /// Answers the refusal of a quiet publish (a call's request) in the caller's inbox, as a reply with the
    /// refusal's status ([`Code::NoRoute`] and the codes after it), when the connection speaks version 9 or
    /// later and the request names as its reply address an inbox this connection opened, with a correlation
    /// id. Says whether it did; if not, the publish is answered with an `Error` frame.
    fn refuse_in_inbox(&self, request: &Bytes, error: &Error) -> bool {
        if self.version < QUIET_REFUSALS_IN_INBOX {
            return false;
        }
        let limits = Limits { max_frame: self.state.config.max_frame, ..Limits::default() };
        let Some((reply_to, Some(correlation_id))) = codec::reply_address_of(request, &limits) else { return false };
        let inbox = reply_to.address();
        if !reply_to.is_inbox() || !self.inboxes.contains(inbox) {
            return false;
        }
        let code = match error {
            Error::NoRoute(_) => Code::NoRoute,
            Error::QueueFull(_) => Code::QueueFull,
            Error::Forbidden(_) => Code::Forbidden,
            _ => Code::Refused,
        };
        let mut reply = Envelope::new(Kind::Reply);
        reply.correlation_id = Some(correlation_id);
        reply.status = code.as_u16();
        reply.status_message = Some(error.to_string());
        let Ok(payload) = codec::encode_envelope(&reply) else { return false };
        let props = frame_props(0, None, None, None, None, &payload);
        let now = Instant::now();
        let mut hub = self.state.lock();
        let published = hub.engine.publish(inbox, payload, props, now);
        hub.dispatch(now);
        match published {
            Ok(()) => true,
            Err(refused) => {
                tracing::debug!(error = ?refused, inbox, "could not answer a refused request in its inbox");
                false
            }
        }
    }

    /// Publishes a reply to `reply_to` and acks the delivery it answers, if the delivery is held, at `now`. A
    /// reply that cannot go (its inbox is gone, it is not an envelope) is dropped; the delivery is acked all the
    /// same.
    fn answer(
        &self,
        consumer: ConsumerId,
        tag: u64,
        reply_to: &str,
        ttl_ms: Option<u64>,
        payload: Bytes,
        now: Instant,
    ) {
        let limits = Limits { max_frame: self.state.config.max_frame, ..Limits::default() };
        let checked = if reply_to.starts_with(INBOX_PREFIX) {
            codec::check(&payload, &limits)
                .map_err(|error| Error::InvalidArgument(format!("the reply is not an envelope: {error}")))
        } else {
            Err(Error::InvalidArgument(format!("`{reply_to}` is not an inbox")))
        };
        let props = frame_props(0, ttl_ms, None, None, None, &payload);
        let mut hub = self.state.lock();
        if !hub.engine.holds(consumer, tag) {
            tracing::debug!(reply_to, "dropped the reply of a delivery no longer held");
            return;
        }
        let checked = checked.and_then(|()| match &self.access {
            // A user answers only on the inbox its request names.
            Access::User(user) => {
                let named =
                    hub.engine.held(consumer, tag).and_then(|request| codec::reply_address_of(request, &limits));
                if named.is_some_and(|(address, _)| address.address() == reply_to) {
                    return Ok(());
                }
                tracing::info!(user = user.name(), reply_to, "denied: an answer to an inbox its request does not name");
                self.state.denied.fetch_add(1, Ordering::Relaxed);
                Err(Error::Forbidden(format!("`{reply_to}` is not the inbox the request names")))
            }
            Access::Everything => Ok(()),
        });
        let published = checked.and_then(|()| {
            if hub.engine.bytes().saturating_add(payload.len()) > self.state.config.memory_high_watermark {
                return Err(Error::QueueFull(format!("{reply_to} (the broker is at its memory high-watermark)")));
            }
            hub.engine.publish(reply_to, payload, props, now).map_err(to_error)
        });
        if let Err(error) = published {
            tracing::debug!(%error, reply_to, "dropped a reply");
        }
        if let Err(error) = hub.engine.settle(consumer, tag, engine::Settle::Ack, now) {
            tracing::debug!(%error, "ignoring a settle");
        }
        hub.dispatch(now);
    }

    fn attach(&mut self, req: u32, queue: &str, prefetch: u32, auto_ack: bool) -> Result<(), Error> {
        let unacked_limit = self.state.config.max_unacked;
        let prefetch = if prefetch == 0 || prefetch > unacked_limit { unacked_limit } else { prefetch };
        self.attach_with(req, queue, prefetch, auto_ack)
    }

    /// Attaches a consumer and answers `req` with its id before the first delivery goes out.
    fn attach_with(&mut self, req: u32, queue: &str, prefetch: u32, auto_ack: bool) -> Result<(), Error> {
        if self.consumers.len() >= MAX_CONSUMERS {
            return Err(Error::InvalidArgument(format!("a connection has at most {MAX_CONSUMERS} consumers")));
        }
        let (out, queued) = (self.out.clone(), Arc::clone(&self.queued));
        let mut hub = self.state.lock();
        let consumer = hub
            .attach(queue, prefetch, auto_ack, move |id| {
                Box::new(ConnectionSink { out, queued, consumer: id.as_u64() })
            })
            .map_err(to_error)?;
        self.consumers.insert(consumer);
        let body = protocol::consumer_body(consumer.as_u64());
        let _ = self.out.send(Outbound::Frame(ServerFrame::Ok { req, body }));
        hub.dispatch(Instant::now());
        Ok(())
    }

    fn open_inbox(&mut self, req: u32, name: &str) -> Result<(), Error> {
        self.check_name(name)?;
        if !name.starts_with(INBOX_PREFIX) {
            return Err(Error::InvalidArgument("inbox names start with `inbox.`".into()));
        }
        let config = QueueConfig { auto_delete: true, ..QueueConfig::default() };
        {
            let mut hub = self.state.lock();
            if hub.engine.has_queue(name) {
                return Err(Error::InvalidArgument(format!("inbox `{name}` is in use")));
            }
            hub.engine.declare_queue(name, config).map_err(|error: EngineError| to_error(error))?;
        }
        self.attach_with(req, name, 0, true)?;
        self.inboxes.insert(name.to_owned());
        Ok(())
    }

    fn detach_all(&mut self) {
        let now = Instant::now();
        let mut hub = self.state.lock();
        for consumer in self.consumers.drain() {
            hub.detach(consumer, now);
        }
    }
}

/// Consumers one connection may hold.
const MAX_CONSUMERS: usize = 1024;

/// The engine's properties of a message a frame carries.
fn frame_props(
    priority: u8,
    ttl_ms: Option<u64>,
    delay_ms: Option<u64>,
    key: Option<engine::Key>,
    id: Option<engine::MessageId>,
    payload: &Bytes,
) -> Props {
    Props {
        priority,
        ttl: ttl_ms.map(Duration::from_millis),
        delay: delay_ms.map(Duration::from_millis),
        key,
        size: payload.len(),
        id,
    }
}

/// Where a published message went.
enum Stored {
    /// A durable queue: the publisher is answered once the log has it.
    Durably,
    /// A queue in memory only: answered at once.
    InMemory,
}

#[derive(Clone, Copy)]
enum Target<'a> {
    Queue(&'a str),
    Topic(&'a str),
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    /// `bodies` as frames on the wire.
    fn on_the_wire(bodies: &[&[u8]]) -> Vec<u8> {
        let mut wire = Vec::new();
        for body in bodies {
            wire.extend_from_slice(&u32::try_from(body.len()).expect("a short body").to_be_bytes());
            wire.extend_from_slice(body);
        }
        wire
    }

    #[tokio::test]
    async fn frames_read_together_share_a_reading_of_the_clock_and_one_after_a_wait_reads_it_again() {
        let (mut peer, ours) = tokio::io::duplex(64 * 1024);
        let mut frames = FramedRead::new(ours, FrameCodec::new(1024));
        let mut clocked = Clocked::new(&mut frames);

        let bodies: Vec<Vec<u8>> = (0..Clocked::<tokio::io::DuplexStream>::SHARED + 2).map(|n| vec![n as u8]).collect();
        let bodies: Vec<&[u8]> = bodies.iter().map(Vec::as_slice).collect();
        peer.write_all(&on_the_wire(&bodies)).await.expect("written");
        let before = Instant::now();
        let mut readings = Vec::new();
        for body in &bodies {
            let (at, frame) = clocked.next().await.expect("a frame");
            assert_eq!(&frame.expect("whole")[..], *body);
            readings.push(at);
        }
        assert!(readings[0] >= before, "the first frame read the clock");
        let shared = Clocked::<tokio::io::DuplexStream>::SHARED as usize;
        assert!(readings[..shared].iter().all(|&at| at == readings[0]), "frames read together share a reading");
        assert!(readings[shared] > readings[0], "no more than SHARED frames share one");

        // Nothing left to read: the next frame comes after a wait, and reads the clock again.
        let last = readings[readings.len() - 1];
        let written = {
            let mut next = std::pin::pin!(clocked.next());
            assert!(futures::poll!(next.as_mut()).is_pending());
            let written = Instant::now();
            peer.write_all(&on_the_wire(&[b"late"])).await.expect("written");
            let (at, _) = next.await.expect("a frame");
            assert!(at >= written, "a frame after a wait shared the reading of the frames before it");
            written
        };
        assert!(written > last, "the clock did not move");

        // What the caller waits for between frames makes the next one read the clock too.
        peer.write_all(&on_the_wire(&[b"x", b"y"])).await.expect("written");
        let (x, _) = clocked.next().await.expect("a frame");
        clocked.forget();
        let forgotten = Instant::now();
        let (y, _) = clocked.next().await.expect("a frame");
        assert!(y >= forgotten && forgotten > x, "a frame after `forget` shared the reading before it");
    }
}
