//! One connection to the broker and the tasks around it: dial (TCP or TLS) and handshake, requests and their
//! answers, the reader and writer tasks, heartbeats, and the supervisor that reconnects.

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, Weak};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use futures::{FutureExt, StreamExt};
use rpc_core::Error;
use rpc_core::codec::{self, Limits};
use rpc_core::transport::{AckHandle, Acker, Cancellations, Delivery, DeliverySink, Outcome};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use super::Inner;
use super::acker::RemoteAcker;
use super::consumer::Route;
use crate::protocol::{self, ClientFrame, ErrorCode, Frame, FrameCodec, PROTOCOL_VERSION, ServerFrame};

/// Where to connect: `mqrpc://[token@]host:port`, or `mqrpcs://` for TLS.
#[derive(Clone, PartialEq, Eq)]
pub(super) struct Target {
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

pub(super) fn parse_url(url: &str) -> Result<Target, Error> {
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

/// What the reader does with the answer to a request.
pub(super) enum Waiter {
    Answer(oneshot::Sender<Result<Bytes, (ErrorCode, String)>>),
    /// The answer to Consume, Subscribe or OpenInbox: routes the consumer before any of its deliveries is read.
    Consumer {
        logical: u64,
        sender: mpsc::UnboundedSender<Delivery>,
        direct: Option<DeliverySink>,
        answer: oneshot::Sender<Result<Bytes, (ErrorCode, String)>>,
    },
}

/// When this process last wrote to the broker, which tells whether the broker still counts the connection alive:
/// it hands a connection's deliveries to other consumers once it has heard nothing on it for three heartbeat
/// intervals. A process that was stopped (SIGSTOP, a VM paused, a long stall) finds out when it runs again, by
/// the clock, before it starts a delivery it may have lost: the writer and [`Acker::revoked`] both look.
pub(super) struct Liveness {
    opened: Instant,
    /// Milliseconds from `opened` to the end of the last write.
    last_write_ms: AtomicU64,
    /// Silence past which the broker may have closed the connection: two and a half intervals, half an
    /// interval short of the broker's three for the way the bytes take.
    lapse: Duration,
}

impl Liveness {
    fn new(heartbeat: Duration) -> Liveness {
        Liveness { opened: Instant::now(), last_write_ms: AtomicU64::new(0), lapse: heartbeat * 5 / 2 }
    }

    fn wrote(&self, at: Instant) {
        let ms = u64::try_from(at.saturating_duration_since(self.opened).as_millis()).unwrap_or(u64::MAX);
        self.last_write_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// How long nothing was written, as of `now`.
    fn silent(&self, now: Instant) -> Duration {
        let last = self.opened + Duration::from_millis(self.last_write_ms.load(Ordering::Relaxed));
        now.saturating_duration_since(last)
    }

    /// Whether the broker may have given up on the connection by `now`.
    pub(super) fn lapsed(&self, now: Instant) -> bool {
        self.silent(now) > self.lapse
    }
}

/// The request id of every quiet publish whose refusal the broker answers in the caller's inbox (version 9):
/// no waiter is registered under it, so an `Error` frame with it (a broker that could not reach the inbox) is
/// dropped, and [`Conn::req`] never hands it out.
pub(super) const QUIET_REQ: u32 = u32::MAX;

/// A connection's end, shared by its tasks and handles: cancelled once, when the connection is lost or closed.
/// Every call asks whether it happened, so that is a flag read, not the token's lock.
#[derive(Clone, Default)]
pub(super) struct Dead {
    flag: Arc<AtomicBool>,
    token: CancellationToken,
}

impl Dead {
    pub(super) fn cancel(&self) {
        self.flag.store(true, Ordering::Release);
        self.token.cancel();
    }

    pub(super) fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// Resolves once it is cancelled.
    pub(super) fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }
}

pub(super) struct Conn {
    /// Frames for the writer, which encodes them into its buffer.
    out: mpsc::UnboundedSender<ClientFrame>,
    pending: DashMap<u32, Waiter>,
    pub(super) routes: DashMap<u64, Route>,
    pub(super) dead: Dead,
    pub(super) liveness: Arc<Liveness>,
    /// The transport, for what outlives the connection (consumers the broker ended).
    transport: Weak<Inner>,
    next_req: AtomicU32,
    /// How long a request on it waits for its answer.
    pub(super) request_timeout: Duration,
    /// The protocol version the broker answered the handshake in.
    pub(super) version: u16,
}

impl Conn {
    fn new(
        out: mpsc::UnboundedSender<ClientFrame>,
        request_timeout: Duration,
        heartbeat: Duration,
        transport: Weak<Inner>,
        version: u16,
    ) -> Conn {
        Conn {
            version,
            transport,
            out,
            pending: DashMap::new(),
            routes: DashMap::new(),
            dead: Dead::default(),
            liveness: Arc::new(Liveness::new(heartbeat)),
            next_req: AtomicU32::new(1),
            request_timeout,
        }
    }

    pub(super) fn send(&self, frame: ClientFrame) -> Result<(), Error> {
        self.out.send(frame).map_err(|_| Error::Disconnected)
    }

    pub(super) fn req(&self) -> u32 {
        // 0 is the connection-level error's id, and `QUIET_REQ` is kept for the requests nothing waits on.
        loop {
            let req = self.next_req.fetch_add(1, Ordering::Relaxed);
            if req != 0 && req != QUIET_REQ {
                return req;
            }
        }
    }

    /// Sends a request and waits at most `timeout` for its answer.
    pub(super) async fn request(
        &self,
        frame: impl FnOnce(u32) -> ClientFrame,
        waiter: impl FnOnce(oneshot::Sender<Result<Bytes, (ErrorCode, String)>>) -> Waiter,
        timeout: Duration,
    ) -> Result<Result<Bytes, (ErrorCode, String)>, Error> {
        let req = self.req();
        let (answer, answered) = oneshot::channel();
        self.pending.insert(req, waiter(answer));
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
    pub(super) async fn request_quiet(&self, frame: ClientFrame) -> Result<Result<Bytes, (ErrorCode, String)>, Error> {
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

/// Reconnects whenever the connection dies, until the transport is dropped or closed.
pub(super) async fn supervise(inner: Weak<Inner>, mut conn: Arc<Conn>) {
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
                    *strong.current.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&conn));
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
    let tcp = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|error| Error::Transport(format!("cannot connect to the broker at {target:?}: {error}").into()))?;
    let _ = tcp.set_nodelay(true);
    if !target.tls {
        let (read, write) = tokio::io::split(tcp);
        return Ok((Box::pin(read), Box::pin(write)));
    }
    let mut roots = rustls::RootCertStore::empty();
    for certificate in &inner.options.tls_roots {
        roots.add(certificate.clone()).map_err(|error| Error::InvalidArgument(format!("bad TLS root: {error}")))?;
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match &inner.options.tls_client {
        Some(identity) => builder
            .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
            .map_err(|error| Error::InvalidArgument(format!("bad TLS client certificate or key: {error}")))?,
        None => builder.with_no_client_auth(),
    };
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
pub(super) async fn open(inner: &Arc<Inner>) -> Result<Arc<Conn>, Error> {
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
            ServerFrame::Welcome { version, heartbeat_ms, flags, .. } => {
                Ok((frames, write, version, heartbeat_ms, flags))
            }
            ServerFrame::Error { code, message, .. } => Err(code.to_error("", message)),
            _ => Err(Error::Transport("the broker did not answer the handshake".into())),
        }
    };
    let (frames, write, version, heartbeat_ms, flags) = tokio::time::timeout(inner.options.connect_timeout, connect)
        .await
        .map_err(|_| Error::Timeout(inner.options.connect_timeout))??;
    inner.durable.store(flags & protocol::WELCOME_DURABLE != 0, Ordering::Relaxed);
    let heartbeat = Duration::from_millis(u64::from(heartbeat_ms.max(100)));
    let (out, outbound) = mpsc::unbounded_channel();
    let conn = Arc::new(Conn::new(out, inner.options.request_timeout, heartbeat, Arc::downgrade(inner), version));
    let heard = Arc::new(AtomicBool::new(true));
    tokio::spawn(write_frames(write, outbound, conn.dead.clone(), Arc::clone(&conn.liveness)));
    tokio::spawn(read_frames(frames, Arc::clone(&conn), Arc::clone(&heard)));
    tokio::spawn(heartbeats(Arc::downgrade(&conn), heartbeat, heard));
    Ok(conn)
}

async fn write_frames(
    mut write: BoxWrite,
    mut outbound: mpsc::UnboundedReceiver<ClientFrame>,
    dead: Dead,
    liveness: Arc<Liveness>,
) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut written = Instant::now();
    loop {
        let first = tokio::select! {
            _ = dead.cancelled() => break,
            first = outbound.recv() => match first {
                Some(first) => first,
                None => break,
            },
        };
        protocol::gather(first, &mut outbound, &mut buf, written, |frame, buf| frame.encode(buf)).await;
        if liveness.lapsed(Instant::now()) {
            // This process was away longer than the broker waits: it has most likely closed the connection and
            // handed its deliveries to other consumers. Nothing more goes out on it (a settle or a reply would
            // be for a delivery it may no longer hold); the supervisor reconnects.
            tracing::warn!(silent = ?liveness.silent(Instant::now()), "this process was silent past the heartbeats; reconnecting");
            dead.cancel();
            return;
        }
        if write.write_all(&buf).await.is_err() || write.flush().await.is_err() {
            break;
        }
        written = Instant::now();
        liveness.wrote(written);
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
                        // The broker counts the budget it was given exactly (`ttl_ms` is what remains of it).
                        let queued = match (envelope.deadline_ms, ttl_ms) {
                            (Some(budget), Some(remaining)) => Duration::from_millis(budget.saturating_sub(remaining)),
                            (None, remaining) => {
                                envelope.deadline_ms = remaining;
                                Duration::ZERO
                            }
                            (Some(_), None) => Duration::ZERO,
                        };
                        let handle =
                            if tag == 0 { AckHandle::auto() } else { AckHandle::new(Arc::clone(&route.acker), tag) };
                        let delivery =
                            Delivery { envelope: Arc::new(envelope), delivery_count, queued, received_at: now, handle };
                        match &route.direct {
                            Some(sink) => sink(delivery),
                            None => drop(route.sender.send(delivery)),
                        }
                    }
                    Err(error) => match codec::reply_address_of(&payload, &limits).filter(|_| tag != 0) {
                        // Its sender can be told: the worker answers it with status 8 and acks it.
                        Some((reply_to, correlation_id)) => {
                            tracing::debug!(%error, "answering a delivery that is not an envelope this build reads");
                            let envelope = rpc_core::transport::invalid_request(
                                reply_to,
                                correlation_id,
                                format!("not an envelope this worker reads: {error}"),
                            );
                            let handle = AckHandle::new(Arc::clone(&route.acker), tag);
                            let (queued, received_at) = (Duration::ZERO, now);
                            let delivery =
                                Delivery { envelope: Arc::new(envelope), delivery_count, queued, received_at, handle };
                            match &route.direct {
                                Some(sink) => sink(delivery),
                                None => drop(route.sender.send(delivery)),
                            }
                        }
                        None => {
                            tracing::warn!(%error, "dead-lettering a delivery that is not an envelope");
                            if tag != 0 {
                                let _ = conn.send(ClientFrame::Settle { consumer, tag, outcome: Outcome::DeadLetter });
                            }
                        }
                    },
                }
            }
            ServerFrame::Cancelled { consumer } => {
                // The broker ended it (its queue was deleted): the application's consumer ends too, and is not
                // started again on the next connection.
                if let Some((_, route)) = conn.routes.remove(&consumer)
                    && let Some(transport) = conn.transport.upgrade()
                {
                    transport.consumers().remove(&route.logical);
                }
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
                            liveness: Arc::clone(&conn.liveness),
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
