//! One STOMP 1.2 connection: the CONNECT handshake, heart-beating both ways, frames sent with or without a
//! receipt, and subscriptions whose MESSAGE frames come on a channel of their own.
//!
//! A reader task takes the server's frames apart and a writer task sends the frames queued to it, coalescing
//! them into as few writes as it can. When either side stops (the socket fails, the server sends an ERROR, or its
//! heart-beats stop), the connection is closed: every receipt waited for fails with [`Error::Disconnected`] (or
//! the server's ERROR) and every subscription ends. Reconnecting is the caller's: a new [`Connection`]. ActiveMQ
//! is the exception to the ERROR rule: it refuses a frame it cannot carry out (a SEND to a temporary queue that
//! is gone) with an ERROR and keeps the connection, so there an ERROR fails only the receipt it names.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use rpc_core::Error;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};

use super::codec::{Command, Frame, Item, Limits, StompCodec};

/// How a [`Connection`] connects and what it waits for.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// The heart-beat this side sends and asks of the server; zero turns heart-beating off. Default 10 s.
    pub heartbeat: Duration,
    /// How long the TCP connect and the CONNECT handshake may take. Default 10 s.
    pub connect_timeout: Duration,
    /// How long a frame sent with a receipt waits for it. Default 10 s.
    pub receipt_timeout: Duration,
    /// The codec's size limits on the server's frames.
    pub limits: Limits,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            heartbeat: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            receipt_timeout: Duration::from_secs(10),
            limits: Limits::default(),
        }
    }
}

/// Where a STOMP server is: `stomp://[login:passcode@]host[:port][/vhost]`. The vhost becomes the CONNECT
/// frame's `host` header (RabbitMQ's virtual host; ActiveMQ ignores it), `/` when the URL has none.
#[derive(Clone, PartialEq, Eq)]
pub struct StompUrl {
    /// The server's host name or address.
    pub host: String,
    /// Its port; 61613 when the URL has none.
    pub port: u16,
    /// The CONNECT frame's `login`, if any.
    pub login: Option<String>,
    /// The CONNECT frame's `passcode`, if any.
    pub passcode: Option<String>,
    /// The CONNECT frame's `host` header.
    pub vhost: String,
}

impl std::fmt::Debug for StompUrl {
    // The passcode is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StompUrl")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("login", &self.login)
            .field("vhost", &self.vhost)
            .finish_non_exhaustive()
    }
}

impl StompUrl {
    /// Reads a `stomp://` URL.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for another scheme, a missing host or a port that is not a number.
    pub fn parse(url: &str) -> Result<StompUrl, Error> {
        let invalid =
            |why: &str| Error::InvalidArgument(format!("stomp url `{}`: {why}", crate::adapter::redact_url(url)));
        let rest = url.strip_prefix("stomp://").ok_or_else(|| invalid("it must start with stomp://"))?;
        let (authority, path) = rest.split_once('/').map_or((rest, ""), |(authority, path)| (authority, path));
        let (credentials, address) = match authority.rsplit_once('@') {
            Some((credentials, address)) => (Some(credentials), address),
            None => (None, authority),
        };
        let (login, passcode) = match credentials {
            Some(credentials) => match credentials.split_once(':') {
                Some((login, passcode)) => (Some(decode(login)), Some(decode(passcode))),
                None => (Some(decode(credentials)), None),
            },
            None => (None, None),
        };
        let (host, port) = match address.rsplit_once(':') {
            Some((host, port)) => (host, port.parse().map_err(|_| invalid("the port is not a number"))?),
            None => (address, 61613),
        };
        if host.is_empty() {
            return Err(invalid("it names no host"));
        }
        let vhost = if path.is_empty() { "/".to_owned() } else { decode(path) };
        Ok(StompUrl { host: host.to_owned(), port, login, passcode, vhost })
    }
}

/// Percent-decodes `text`; a `%` not followed by two hex digits stays as it is.
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |at: usize| bytes.get(at).and_then(|byte| (*byte as char).to_digit(16));
        match (bytes[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (byte, _, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What the tasks and the handles of one connection share.
struct Shared {
    /// Frames for the writer task.
    out: mpsc::UnboundedSender<Item>,
    /// Receipts waited for, by receipt id.
    receipts: Mutex<HashMap<String, oneshot::Sender<Result<(), Error>>>>,
    /// Live subscriptions, by subscription id.
    subscriptions: Mutex<HashMap<String, mpsc::UnboundedSender<Frame>>>,
    next_id: AtomicU64,
    closed: AtomicBool,
    /// Set once the connection is closed, for [`Connection::closed`].
    ended: tokio::sync::watch::Sender<bool>,
    server: String,
    receipt_timeout: Duration,
}

impl Shared {
    fn id(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// Ends the connection: receipts fail (with the server's ERROR when it sent one, else
    /// [`Error::Disconnected`]), subscriptions end, the writer stops.
    fn close(&self, why: &str, server_error: Option<&str>) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::debug!(server = %self.server, why, "stomp connection closed");
        self.ended.send_replace(true);
        for (_, waiter) in self.receipts.lock().unwrap_or_else(PoisonError::into_inner).drain() {
            let error = match server_error {
                Some(text) => Error::Transport(format!("the server refused: {text}").into()),
                None => Error::Disconnected,
            };
            let _ = waiter.send(Err(error));
        }
        self.subscriptions.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }

    fn send(&self, item: Item) -> Result<(), Error> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Disconnected);
        }
        self.out.send(item).map_err(|_| Error::Disconnected)
    }

    /// Sends `frame` with a `receipt` header and waits for the server's RECEIPT (or its ERROR naming it).
    async fn send_with_receipt(&self, mut frame: Frame) -> Result<(), Error> {
        let receipt = self.id("r");
        frame.headers.push(("receipt".to_owned(), receipt.clone()));
        let (sender, receiver) = oneshot::channel();
        self.receipts.lock().unwrap_or_else(PoisonError::into_inner).insert(receipt.clone(), sender);
        if let Err(error) = self.send(Item::Frame(frame)) {
            self.receipts.lock().unwrap_or_else(PoisonError::into_inner).remove(&receipt);
            return Err(error);
        }
        match tokio::time::timeout(self.receipt_timeout, receiver).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Disconnected),
            Err(_) => {
                self.receipts.lock().unwrap_or_else(PoisonError::into_inner).remove(&receipt);
                Err(Error::Timeout(self.receipt_timeout))
            }
        }
    }
}

/// A STOMP 1.2 connection to a server. Cheap to clone; the connection closes when the last clone and the last
/// [`Subscription`] are dropped.
#[derive(Clone)]
pub struct Connection {
    /// Closes the connection when the last handle goes (dropped first: it needs `shared` alive).
    _guard: Arc<Guard>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("server", &self.shared.server).finish_non_exhaustive()
    }
}

struct Guard(Weak<Shared>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(shared) = self.0.upgrade() {
            let _ = shared.out.send(Item::Frame(Frame::new(Command::Disconnect)));
            shared.close("dropped", None);
        }
    }
}

impl Connection {
    /// Connects to the server at `url` (see [`StompUrl`]) and makes the CONNECT handshake.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad URL, [`Error::Unauthorized`] when the server answers the CONNECT
    /// with an ERROR, [`Error::Timeout`] past [`ConnectOptions::connect_timeout`], [`Error::Transport`] when
    /// the server cannot be reached.
    pub async fn connect(url: &str, options: &ConnectOptions) -> Result<Connection, Error> {
        let url = StompUrl::parse(url)?;
        tokio::time::timeout(options.connect_timeout, Connection::handshake(&url, options))
            .await
            .map_err(|_| Error::Timeout(options.connect_timeout))?
    }

    async fn handshake(url: &StompUrl, options: &ConnectOptions) -> Result<Connection, Error> {
        let stream =
            TcpStream::connect((url.host.as_str(), url.port)).await.map_err(|error| Error::Transport(error.into()))?;
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        let mut reader = FramedRead::new(read, StompCodec::new(options.limits.clone()));
        let mut writer = FramedWrite::new(write, StompCodec::new(options.limits.clone()));
        let beat = options.heartbeat.as_millis().to_string();
        let mut connect = Frame::new(Command::Connect)
            .header("accept-version", "1.2")
            .header("host", &url.vhost)
            .header("heart-beat", &format!("{beat},{beat}"));
        if let Some(login) = &url.login {
            connect = connect.header("login", login);
        }
        if let Some(passcode) = &url.passcode {
            connect = connect.header("passcode", passcode);
        }
        writer.send(Item::Frame(connect)).await.map_err(transport)?;
        let connected = loop {
            match reader.next().await {
                Some(Ok(Item::Heartbeat)) => continue,
                Some(Ok(Item::Frame(frame))) => break frame,
                Some(Err(error)) => return Err(transport(error)),
                None => return Err(Error::Disconnected),
            }
        };
        match connected.command {
            Command::Connected => {}
            Command::Error => {
                return Err(Error::Unauthorized(connected.get("message").unwrap_or("refused").to_owned()));
            }
            other => {
                return Err(Error::Transport(format!("the server answered CONNECT with {other:?}").into()));
            }
        }
        if connected.get("version") != Some("1.2") {
            return Err(Error::Transport(
                format!("the server speaks STOMP {}, not 1.2", connected.get("version").unwrap_or("1.0")).into(),
            ));
        }
        // heart-beat: the server's `sx,sy` against ours `cx,cy`: we send every max(cx, sy), it every max(sx, cy).
        let (server_sends, server_wants) = heartbeat(connected.get("heart-beat"));
        let ours = options.heartbeat;
        let send_every = (!ours.is_zero() && !server_wants.is_zero()).then(|| ours.max(server_wants));
        let expect_every = (!ours.is_zero() && !server_sends.is_zero()).then(|| ours.max(server_sends));
        let server = connected.get("server").unwrap_or("unknown").to_owned();
        let (out, queued) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            out,
            receipts: Mutex::default(),
            subscriptions: Mutex::default(),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            ended: tokio::sync::watch::Sender::new(false),
            server,
            receipt_timeout: options.receipt_timeout,
        });
        tokio::spawn(write_frames(writer, queued, send_every, Arc::downgrade(&shared)));
        // ActiveMQ answers a frame it cannot carry out (a SEND to a temporary queue that is gone) with an ERROR and
        // keeps the connection; other servers close it, as the spec says they must.
        let errors_close = !shared.server.starts_with("ActiveMQ");
        tokio::spawn(read_frames(reader, expect_every, errors_close, Arc::downgrade(&shared)));
        let guard = Arc::new(Guard(Arc::downgrade(&shared)));
        Ok(Connection { _guard: guard, shared })
    }

    /// The server's `server` header (`ActiveMQ/5.17.2`, `RabbitMQ/3.10.8`).
    pub fn server(&self) -> &str {
        &self.shared.server
    }

    /// Whether the connection is closed; everything sent on it then fails with [`Error::Disconnected`].
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    /// Completes once the connection is closed (at once if it is).
    pub async fn closed(&self) {
        let mut ended = self.shared.ended.subscribe();
        let _ = ended.wait_for(|ended| *ended).await;
    }

    /// Ends the connection with a DISCONNECT and waits for its receipt: the server has handled every frame
    /// sent before (acks included), and gives back the messages left unacknowledged.
    ///
    /// # Errors
    /// As [`Connection::send`]; the connection is closed either way.
    pub async fn disconnect(&self) -> Result<(), Error> {
        let result = self.shared.send_with_receipt(Frame::new(Command::Disconnect)).await;
        self.shared.close("disconnected", None);
        result
    }

    /// Sends `frame` with a receipt and waits for it: for a SEND, the server has the message.
    ///
    /// # Errors
    /// [`Error::Disconnected`]; [`Error::Timeout`] past [`ConnectOptions::receipt_timeout`]; [`Error::Transport`]
    /// with the server's message when it answers with an ERROR (which also closes the connection).
    pub async fn send(&self, frame: Frame) -> Result<(), Error> {
        self.shared.send_with_receipt(frame).await
    }

    /// Queues `frame` for the server without waiting for anything.
    ///
    /// # Errors
    /// [`Error::Disconnected`].
    pub fn send_unconfirmed(&self, frame: Frame) -> Result<(), Error> {
        self.shared.send(Item::Frame(frame))
    }

    /// Subscribes to `destination` with `ack` mode (`auto`, `client` or `client-individual`) and further
    /// headers (a prefetch, a selector), and waits for the server's receipt. Dropped before the receipt comes,
    /// it unsubscribes.
    ///
    /// # Errors
    /// As [`Connection::send`].
    pub async fn subscribe(
        &self,
        destination: &str,
        ack: &str,
        headers: &[(&str, &str)],
    ) -> Result<Subscription, Error> {
        let id = self.shared.id("s");
        let mut frame =
            Frame::new(Command::Subscribe).header("id", &id).header("destination", destination).header("ack", ack);
        for (name, value) in headers {
            frame = frame.header(name, value);
        }
        let (sender, messages) = mpsc::unbounded_channel();
        self.shared.subscriptions.lock().unwrap_or_else(PoisonError::into_inner).insert(id.clone(), sender);
        // Made now, so that a future dropped while it waits for the receipt unsubscribes (in its `Drop`).
        let mut subscription = Subscription { id, messages, connection: self.clone(), subscribed: true };
        match self.shared.send_with_receipt(frame).await {
            Ok(()) => Ok(subscription),
            Err(error) => {
                // Refused, or the connection is gone: there is nothing to unsubscribe. After a timeout there may be.
                subscription.subscribed = matches!(error, Error::Timeout(_));
                Err(error)
            }
        }
    }

    /// Takes the MESSAGE frames whose `subscription` header is `id` without sending a SUBSCRIBE: RabbitMQ's
    /// replies to a `reply-to:/temp-queue/x` of this connection come so, with `subscription:/temp-queue/x`.
    /// Dropping it sends no UNSUBSCRIBE.
    ///
    /// # Errors
    /// [`Error::Disconnected`]; [`Error::InvalidArgument`] when `id` is taken already.
    pub fn listen(&self, id: &str) -> Result<Subscription, Error> {
        if self.is_closed() {
            return Err(Error::Disconnected);
        }
        let (sender, messages) = mpsc::unbounded_channel();
        let mut subscriptions = self.shared.subscriptions.lock().unwrap_or_else(PoisonError::into_inner);
        if subscriptions.contains_key(id) {
            return Err(Error::InvalidArgument(format!("subscription `{id}` is taken")));
        }
        subscriptions.insert(id.to_owned(), sender);
        Ok(Subscription { id: id.to_owned(), messages, connection: self.clone(), subscribed: false })
    }

    /// Acknowledges the message whose MESSAGE frame carried `ack` as its `ack` header, without a receipt.
    ///
    /// # Errors
    /// [`Error::Disconnected`].
    pub fn ack(&self, ack: &str) -> Result<(), Error> {
        self.shared.send(Item::Frame(Frame::new(Command::Ack).header("id", ack)))
    }

    /// Gives the message back to the server (NACK), without a receipt; what the server does with it is its
    /// own (ActiveMQ redelivers it and dead-letters it after its redelivery policy; RabbitMQ requeues it).
    ///
    /// # Errors
    /// [`Error::Disconnected`].
    pub fn nack(&self, ack: &str) -> Result<(), Error> {
        self.shared.send(Item::Frame(Frame::new(Command::Nack).header("id", ack)))
    }

    /// Sends `frames` (SENDs, ACKs) in one transaction and waits for the COMMIT's receipt: the server applies
    /// all of them or, if the connection goes first, none.
    ///
    /// # Errors
    /// As [`Connection::send`].
    pub async fn transaction(&self, frames: impl IntoIterator<Item = Frame>) -> Result<(), Error> {
        let transaction = self.shared.id("t");
        self.shared.send(Item::Frame(Frame::new(Command::Begin).header("transaction", &transaction)))?;
        for frame in frames {
            self.shared.send(Item::Frame(frame.header("transaction", &transaction)))?;
        }
        self.shared.send_with_receipt(Frame::new(Command::Commit).header("transaction", &transaction)).await
    }

    /// Waits until the server has taken every frame sent before (the ACKs and NACKs, which have no answer):
    /// frames are handled in order, so the receipt of a frame sent after them says so. The frame is the ABORT
    /// of a transaction begun for it, which changes nothing.
    ///
    /// # Errors
    /// As [`Connection::send`].
    pub async fn sync(&self) -> Result<(), Error> {
        let transaction = self.shared.id("t");
        self.shared.send(Item::Frame(Frame::new(Command::Begin).header("transaction", &transaction)))?;
        self.shared.send_with_receipt(Frame::new(Command::Abort).header("transaction", &transaction)).await
    }
}

/// A subscription's MESSAGE frames; dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    id: String,
    messages: mpsc::UnboundedReceiver<Frame>,
    connection: Connection,
    /// Made by a SUBSCRIBE, which an UNSUBSCRIBE ends.
    subscribed: bool,
}

impl Subscription {
    /// The subscription's id (the `subscription` header of its MESSAGE frames).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The next MESSAGE frame; `None` once the connection is closed. The server bounds how many wait here
    /// unacknowledged by the subscription's prefetch (`activemq.prefetchSize`, `prefetch-count`).
    pub async fn next(&mut self) -> Option<Frame> {
        self.messages.recv().await
    }

    /// The connection the subscription is on.
    pub fn connection(&self) -> &Connection {
        &self.connection
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let shared = &self.connection.shared;
        let removed = shared.subscriptions.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.id);
        if removed.is_some() && self.subscribed {
            let _ = shared.send(Item::Frame(Frame::new(Command::Unsubscribe).header("id", &self.id)));
        }
    }
}

/// `sx,sy` of a `heart-beat` header, zero where absent or unreadable.
fn heartbeat(header: Option<&str>) -> (Duration, Duration) {
    let mut parts = header.unwrap_or("0,0").split(',').map(|part| part.trim().parse::<u64>().unwrap_or(0));
    let first = parts.next().unwrap_or(0);
    let second = parts.next().unwrap_or(0);
    (Duration::from_millis(first), Duration::from_millis(second))
}

fn transport(error: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Transport(error.into())
}

type Writer = FramedWrite<tokio::net::tcp::OwnedWriteHalf, StompCodec>;
type Reader = FramedRead<tokio::net::tcp::OwnedReadHalf, StompCodec>;

/// Writes what is queued, a heart-beat after `every` without a frame, until the connection closes.
async fn write_frames(
    mut writer: Writer,
    mut queued: mpsc::UnboundedReceiver<Item>,
    every: Option<Duration>,
    shared: Weak<Shared>,
) {
    let every = every.unwrap_or(Duration::MAX);
    loop {
        let item = match tokio::time::timeout(every, queued.recv()).await {
            Ok(Some(item)) => item,
            Ok(None) => break,
            Err(_) => Item::Heartbeat,
        };
        let disconnect = matches!(&item, Item::Frame(frame) if frame.command == Command::Disconnect);
        // Coalesce what is queued already into one write.
        let mut written = writer.feed(item).await;
        while written.is_ok() {
            match queued.try_recv() {
                Ok(item) => written = writer.feed(item).await,
                Err(_) => break,
            }
        }
        if let Err(error) = written.and(SinkExt::<Item>::flush(&mut writer).await) {
            if let Some(shared) = shared.upgrade() {
                shared.close(&format!("write failed: {error}"), None);
            }
            break;
        }
        if disconnect {
            break;
        }
    }
}

/// Reads the server's frames and hands them out, until the socket ends, an ERROR comes from a server that closes
/// the connection after one (`errors_close`), or nothing came for twice the server's heart-beat.
async fn read_frames(mut reader: Reader, every: Option<Duration>, errors_close: bool, shared: Weak<Shared>) {
    let patience = every.map_or(Duration::MAX, |every| every.saturating_mul(2));
    let mut server_error = None;
    let why = loop {
        let item = match tokio::time::timeout(patience, reader.next()).await {
            Ok(Some(Ok(item))) => item,
            Ok(Some(Err(error))) => break format!("bad frame from the server: {error}"),
            Ok(None) => break "the server closed the connection".to_owned(),
            Err(_) => break format!("no heart-beat from the server in {patience:?}"),
        };
        let Some(shared) = shared.upgrade() else { return };
        let Item::Frame(frame) = item else { continue };
        match frame.command {
            Command::Message => {
                let subscription = frame.get("subscription").unwrap_or_default().to_owned();
                let subscriptions = shared.subscriptions.lock().unwrap_or_else(PoisonError::into_inner);
                match subscriptions.get(&subscription) {
                    Some(sink) => {
                        let _ = sink.send(frame);
                    }
                    // Left unacknowledged: the server gives it to another consumer once it sees the UNSUBSCRIBE.
                    None => tracing::debug!(%subscription, "a message for a subscription that is gone"),
                }
            }
            Command::Receipt => {
                let id = frame.get("receipt-id").unwrap_or_default();
                let waiter = shared.receipts.lock().unwrap_or_else(PoisonError::into_inner).remove(id);
                if let Some(waiter) = waiter {
                    let _ = waiter.send(Ok(()));
                }
            }
            Command::Error => {
                let message = frame.get("message").unwrap_or("error").to_owned();
                // The first line: ActiveMQ puts a Java stack trace under it.
                let body = String::from_utf8_lossy(&frame.body);
                let detail = body.trim().lines().next().unwrap_or_default().to_owned();
                let text = if detail.is_empty() { message } else { format!("{message}: {detail}") };
                let waiter = frame
                    .get("receipt-id")
                    .and_then(|id| shared.receipts.lock().unwrap_or_else(PoisonError::into_inner).remove(id));
                let named = waiter.is_some();
                if let Some(waiter) = waiter {
                    let _ = waiter.send(Err(Error::Transport(format!("the server refused: {text}").into())));
                }
                if !errors_close {
                    if !named {
                        // The frame it refused had no receipt: nobody waits to hear of it.
                        tracing::warn!(server = %shared.server, error = %text, "the server refused a frame");
                    }
                    continue;
                }
                // The server closes the connection after an ERROR (the spec's rule); what waits for a receipt
                // fails with it, as the frame that caused it is one of them, when the ERROR does not say which.
                let why = format!("the server sent an ERROR: {text}");
                server_error = Some(text);
                break why;
            }
            other => tracing::debug!(?other, "an unexpected frame from the server"),
        }
    };
    if let Some(shared) = shared.upgrade() {
        shared.close(&why, server_error.as_deref());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_gives_credentials_port_and_vhost() {
        let url = StompUrl::parse("stomp://guest:gu%40st@127.0.0.1:61623/%2Fprod").expect("reads");
        assert_eq!(url.host, "127.0.0.1");
        assert_eq!(url.port, 61623);
        assert_eq!(url.login.as_deref(), Some("guest"));
        assert_eq!(url.passcode.as_deref(), Some("gu@st"));
        assert_eq!(url.vhost, "/prod");
        let bare = StompUrl::parse("stomp://broker").expect("reads");
        assert_eq!((bare.port, bare.vhost.as_str(), bare.login), (61613, "/", None));
        assert!(!format!("{url:?}").contains("gu@st"), "the passcode is not printed");
    }

    #[test]
    fn a_bad_url_is_refused_without_its_passcode() {
        for url in ["amqp://x", "stomp://:1", "stomp://host:port"] {
            assert!(matches!(StompUrl::parse(url), Err(Error::InvalidArgument(_))), "{url}");
        }
        let Err(Error::InvalidArgument(message)) = StompUrl::parse("stomp://me:secret@host:x") else {
            panic!("refused")
        };
        assert!(!message.contains("secret"), "{message}");
    }

    #[test]
    fn heart_beats_are_read_leniently() {
        assert_eq!(heartbeat(Some("0,10000")), (Duration::ZERO, Duration::from_secs(10)));
        assert_eq!(heartbeat(Some("x")), (Duration::ZERO, Duration::ZERO));
        assert_eq!(heartbeat(None), (Duration::ZERO, Duration::ZERO));
    }
}
