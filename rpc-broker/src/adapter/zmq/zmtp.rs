//! ZMTP 3 (the ZeroMQ wire protocol, RFC 23/ZMTP and 37/ZMTP) for every connection of a node (DEALER, ROUTER,
//! PUB, SUB): the greeting, the NULL mechanism's READY, and multipart messages. Ours rather than the `zeromq`
//! crate's for three reasons:
//! - a frame's declared length is checked against the limit before anything is reserved for it (the crate
//!   reserves it as the frame starts to arrive);
//! - writes are gathered: a sender encodes its message into the connection's buffer (a short lock, no
//!   allocation of its own), and the writer task writes the buffer whole with one system call, yielding once
//!   first when the connection is busy so that concurrent calls share it; a message its sender knows to be alone
//!   on an idle connection is written by the sender itself, with no task woken. With the crate's sockets the
//!   system calls took two thirds of a worker's CPU (docs/performance.md, "ZeroMQ");
//! - the crate's PUB socket can deadlock a runtime: its fan-out task holds a lock of its subscriber map across
//!   an `.await` while the subscriber tasks and the socket's drop wait for that lock, blocking their threads; with
//!   every worker thread so blocked the fan-out task never runs again (seen as a test process hung for an hour).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::codec::{Decoder, FramedRead};
use tokio_util::sync::CancellationToken;

use super::wire::{MAX_FRAMES, WireError};

/// A message: its frames.
pub(super) type Message = Vec<Bytes>;

/// The socket types this module speaks as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SocketType {
    Dealer,
    Router,
    Pub,
    Sub,
}

impl SocketType {
    fn name(self) -> &'static [u8] {
        match self {
            SocketType::Dealer => b"DEALER",
            SocketType::Router => b"ROUTER",
            SocketType::Pub => b"PUB",
            SocketType::Sub => b"SUB",
        }
    }

    /// Whether a peer of type `peer` may talk to this one (RFC 28: DEALER and ROUTER with each other and with
    /// REQ, REP; RFC 29: PUB with SUB and XSUB, SUB with PUB and XPUB).
    fn accepts(self, peer: &[u8]) -> bool {
        match self {
            SocketType::Dealer => matches!(peer, b"ROUTER" | b"DEALER" | b"REP"),
            SocketType::Router => matches!(peer, b"DEALER" | b"ROUTER" | b"REQ"),
            SocketType::Pub => matches!(peer, b"SUB" | b"XSUB"),
            SocketType::Sub => matches!(peer, b"PUB" | b"XPUB"),
        }
    }
}

/// The greeting: signature, version 3.0, mechanism NULL, as-server (ignored by NULL), filler.
fn greeting() -> [u8; 64] {
    let mut greeting = [0u8; 64];
    greeting[0] = 0xff;
    greeting[9] = 0x7f;
    greeting[10] = 3;
    greeting[11] = 0;
    greeting[12..16].copy_from_slice(b"NULL");
    greeting
}

/// The READY command of the NULL mechanism, as a command frame.
fn ready(socket_type: SocketType) -> Vec<u8> {
    let mut body = Vec::with_capacity(64);
    body.push(5);
    body.extend_from_slice(b"READY");
    for (name, value) in [(&b"Socket-Type"[..], socket_type.name()), (&b"Identity"[..], &b""[..])] {
        body.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
        body.extend_from_slice(name);
        body.extend_from_slice(&u32::try_from(value.len()).unwrap_or(u32::MAX).to_be_bytes());
        body.extend_from_slice(value);
    }
    let mut frame = Vec::with_capacity(body.len() + 2);
    frame.push(0x04);
    frame.push(u8::try_from(body.len()).unwrap_or(u8::MAX));
    frame.extend_from_slice(&body);
    frame
}

/// The value of property `name` in a READY command's body (after `\x05READY`).
fn property<'a>(mut properties: &'a [u8], name: &[u8]) -> Result<Option<&'a [u8]>, WireError> {
    while let Some((&len, rest)) = properties.split_first() {
        let len = usize::from(len);
        let (key, rest) = rest.split_at_checked(len).ok_or(WireError("a truncated READY property name"))?;
        let (size, rest) = rest.split_first_chunk::<4>().ok_or(WireError("a truncated READY property"))?;
        let size = usize::try_from(u32::from_be_bytes(*size)).map_err(|_| WireError("a READY property too long"))?;
        let (value, rest) = rest.split_at_checked(size).ok_or(WireError("a truncated READY property value"))?;
        if key.eq_ignore_ascii_case(name) {
            return Ok(Some(value));
        }
        properties = rest;
    }
    Ok(None)
}

/// Greets the peer on `stream` and exchanges READY as `socket_type`, within `timeout`; the stream's halves,
/// the read half already past the handshake.
///
/// # Errors
/// What went wrong, as text: the peer speaks another protocol, version or mechanism, is of a socket type this
/// one does not talk to, or was silent past `timeout`.
pub(super) async fn handshake(
    stream: TcpStream,
    socket_type: SocketType,
    limits: Limits,
    timeout: std::time::Duration,
) -> Result<(FramedRead<OwnedReadHalf, Codec>, OwnedWriteHalf), String> {
    let _ = stream.set_nodelay(true);
    let (mut read, mut write) = stream.into_split();
    let exchange = async {
        write.write_all(&greeting()).await.map_err(|error| error.to_string())?;
        write.write_all(&ready(socket_type)).await.map_err(|error| error.to_string())?;
        let mut theirs = [0u8; 64];
        read.read_exact(&mut theirs).await.map_err(|error| error.to_string())?;
        if theirs[0] != 0xff || theirs[9] & 0x01 != 0x01 {
            return Err("the peer does not speak ZMTP".to_owned());
        }
        if theirs[10] < 3 {
            return Err(format!("the peer speaks ZMTP {}, not 3", theirs[10]));
        }
        if &theirs[12..32] != b"NULL\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0" {
            return Err("the peer asks for a security mechanism other than NULL".to_owned());
        }
        // Their READY: a command frame.
        let mut head = [0u8; 2];
        read.read_exact(&mut head).await.map_err(|error| error.to_string())?;
        let size = match head[0] {
            0x04 => usize::from(head[1]),
            0x06 => {
                let mut rest = [0u8; 7];
                read.read_exact(&mut rest).await.map_err(|error| error.to_string())?;
                let mut size = [0u8; 8];
                size[0] = head[1];
                size[1..].copy_from_slice(&rest);
                usize::try_from(u64::from_be_bytes(size)).unwrap_or(usize::MAX)
            }
            _ => return Err("the peer's first frame is not a command".to_owned()),
        };
        if size > 4_096 {
            return Err("the peer's READY is too long".to_owned());
        }
        let mut body = vec![0u8; size];
        read.read_exact(&mut body).await.map_err(|error| error.to_string())?;
        let properties = body.strip_prefix(b"\x05READY").ok_or("the peer's first command is not READY")?;
        match property(properties, b"Socket-Type").map_err(|WireError(why)| why.to_owned())? {
            Some(peer) if socket_type.accepts(peer) => Ok(()),
            Some(peer) => Err(format!("a peer of socket type {}", String::from_utf8_lossy(peer))),
            None => Err("the peer's READY has no Socket-Type".to_owned()),
        }
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| "the peer did not finish the handshake".to_owned())??;
    Ok((FramedRead::new(read, Codec::new(limits)), write))
}

/// Limits on what a peer sends.
#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    /// The longest frame.
    pub(super) max_frame: usize,
}

/// Reads messages, checking every frame's declared length before reserving room for it; commands (ZMTP 3.1
/// PING and the like) are skipped.
#[derive(Debug)]
pub(super) struct Codec {
    limits: Limits,
    frames: Vec<Bytes>,
    /// The message being read has more frames than any of the protocol's: the rest of it is skipped.
    skipping: bool,
}

impl Codec {
    fn new(limits: Limits) -> Codec {
        Codec { limits, frames: Vec::new(), skipping: false }
    }
}

impl Decoder for Codec {
    type Item = Message;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, std::io::Error> {
        let invalid = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_owned());
        loop {
            let Some(&flags) = src.first() else { return Ok(None) };
            if flags & !0x07 != 0 {
                return Err(invalid("a frame with reserved flags set"));
            }
            let long = flags & 0x02 != 0;
            let head = if long { 9 } else { 2 };
            if src.len() < head {
                src.reserve(head);
                return Ok(None);
            }
            let size = if long {
                let mut size = [0u8; 8];
                size.copy_from_slice(&src[1..9]);
                usize::try_from(u64::from_be_bytes(size)).unwrap_or(usize::MAX)
            } else {
                usize::from(src[1])
            };
            if size > self.limits.max_frame {
                return Err(invalid("a frame over the size limit"));
            }
            if src.len() < head + size {
                src.reserve(head + size - src.len());
                return Ok(None);
            }
            src.advance(head);
            let body = src.split_to(size).freeze();
            if flags & 0x04 != 0 {
                // A command (PING, PONG, ...): nothing this module answers.
                continue;
            }
            let last = flags & 0x01 == 0;
            if !self.skipping && self.frames.len() > MAX_FRAMES {
                // More frames than any message of the protocol: the message is dropped, the connection kept.
                tracing::warn!("a ZeroMQ peer sent a message of too many frames; dropped");
                self.frames.clear();
                self.skipping = true;
            }
            if self.skipping {
                self.skipping = !last;
                continue;
            }
            self.frames.push(body);
            if last {
                return Ok(Some(std::mem::take(&mut self.frames)));
            }
        }
    }
}

/// Appends `message`'s frames to `out`.
fn encode(message: &[Bytes], out: &mut BytesMut) {
    let last = message.len().saturating_sub(1);
    for (n, frame) in message.iter().enumerate() {
        let more = u8::from(n < last);
        match u8::try_from(frame.len()) {
            Ok(size) => {
                out.put_u8(more);
                out.put_u8(size);
            }
            Err(_) => {
                out.put_u8(more | 0x02);
                out.put_u64(u64::try_from(frame.len()).unwrap_or(u64::MAX));
            }
        }
        out.put_slice(frame);
    }
}

/// Writes what `outgoing` gets to `write` until it closes or `closed` is cancelled: it takes everything queued
/// (up to 256 KiB) and writes it with one system call, after [`gather`]. Cancels `closed` when it ends. The
/// writer of a PUB socket, whose queue per subscriber is bounded by its high-water mark; DEALER and ROUTER
/// connections write from a buffer ([`Outgoing`]).
pub(super) async fn write_messages(mut write: OwnedWriteHalf, mut outgoing: impl Queued, closed: CancellationToken) {
    const BATCH: usize = 256 * 1024;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut written = std::time::Instant::now();
    loop {
        let first = tokio::select! {
            () = closed.cancelled() => break,
            first = outgoing.next() => match first {
                Some(first) => first,
                None => break,
            },
        };
        gather(written).await;
        encode(&first, &mut buf);
        while buf.len() < BATCH {
            match outgoing.try_next() {
                Some(message) => encode(&message, &mut buf),
                None => break,
            }
        }
        if write.write_all(&buf).await.is_err() {
            break;
        }
        written = std::time::Instant::now();
        buf.clear();
    }
    closed.cancel();
    let _ = write.shutdown().await;
}

/// How soon after a write a message finds a connection busy: well under the round trip of a lone call over
/// loopback (about 100 µs), well over the time between the messages of concurrent calls.
const BUSY: std::time::Duration = std::time::Duration::from_micros(50);

/// Before a writer woken by a message writes: after a pause (its last write ended at `written`), nothing, for the
/// latency of a lone call; within [`BUSY`] of it (the connection is busy), one yield, so that what the tasks of
/// this thread are about to send joins the write instead of taking a system call each.
async fn gather(written: std::time::Instant) {
    if written.elapsed() < BUSY {
        tokio::task::yield_now().await;
    }
}

/// The receiving end of a PUB connection's outgoing messages, bounded by its high-water mark.
pub(super) trait Queued: Send + 'static {
    /// The next message; `None` when every sender is gone.
    fn next(&mut self) -> impl Future<Output = Option<Message>> + Send;
    /// A message queued now, if there is one.
    fn try_next(&mut self) -> Option<Message>;
}

impl Queued for tokio::sync::mpsc::Receiver<Message> {
    fn next(&mut self) -> impl Future<Output = Option<Message>> + Send {
        self.recv()
    }

    fn try_next(&mut self) -> Option<Message> {
        self.try_recv().ok()
    }
}

/// A connection's sending side. A message its sender knows to be alone (a request to a worker that holds no
/// other of this node's, the answer of a worker's only delivery) is written at once by the sender when nothing
/// is buffered or being written, with one non-blocking system call and no task woken: a lone call pays for no
/// hand-off. Otherwise, and for what that call could not take, it is encoded into the connection's buffer, and
/// its writer task writes everything buffered with one system call, so that concurrent calls share it.
/// Unbounded: the windows bound what DEALER and ROUTER send.
#[derive(Debug)]
pub(super) struct Outgoing {
    buffered: std::sync::Arc<Buffered>,
    /// Cancelled when the connection ends.
    pub(super) closed: CancellationToken,
}

/// What a connection's senders and its writer share.
#[derive(Debug)]
struct Buffered {
    pending: std::sync::Mutex<Pending>,
    /// Told when `pending` was empty and is not.
    wake: tokio::sync::Notify,
    /// Written by the writer task, and by a sender that finds the connection idle (under `pending`'s lock, so
    /// that bytes go out in the order they were sent).
    write: OwnedWriteHalf,
}

/// What waits to be written, and whether the connection is busy.
#[derive(Debug)]
struct Pending {
    bytes: BytesMut,
    /// The writer holds bytes it took and has not written yet: a sender must not write before them.
    writing: bool,
    /// When the last write ended.
    written: std::time::Instant,
}

impl Outgoing {
    /// Starts the writer task of `write`.
    pub(super) fn start(write: OwnedWriteHalf) -> Outgoing {
        let pending = Pending { bytes: BytesMut::new(), writing: false, written: std::time::Instant::now() };
        let buffered = std::sync::Arc::new(Buffered {
            pending: std::sync::Mutex::new(pending),
            wake: tokio::sync::Notify::new(),
            write,
        });
        let closed = CancellationToken::new();
        tokio::spawn(write_buffered(std::sync::Arc::clone(&buffered), closed.clone()));
        Outgoing { buffered, closed }
    }

    /// Sends the message that `fill` puts together (in a vector of this thread's, kept for the next one),
    /// written at once if `alone` and the connection is idle; false when the connection is gone.
    pub(super) fn send_with(&self, alone: bool, fill: impl FnOnce(&mut Vec<Bytes>)) -> bool {
        thread_local! {
            static FRAMES: std::cell::RefCell<Vec<Bytes>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        FRAMES.with(|frames| match frames.try_borrow_mut() {
            Ok(mut frames) => {
                frames.clear();
                fill(&mut frames);
                let sent = self.send(&frames, alone);
                frames.clear();
                sent
            }
            // Not reached: nothing sends while it sends.
            Err(_) => {
                let mut frames = Vec::new();
                fill(&mut frames);
                self.send(&frames, alone)
            }
        })
    }

    /// Sends the message `frames`: written at once if `alone` and the connection is idle, else queued for the
    /// writer; false when the connection is gone.
    pub(super) fn send(&self, frames: &[Bytes], alone: bool) -> bool {
        if self.closed.is_cancelled() {
            return false;
        }
        let was_empty = {
            let mut pending = self.buffered.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let was_empty = pending.bytes.is_empty();
            encode(frames, &mut pending.bytes);
            if alone && was_empty && !pending.writing {
                match self.buffered.write.try_write(&pending.bytes) {
                    Ok(written) => {
                        pending.bytes.advance(written);
                        pending.written = std::time::Instant::now();
                    }
                    // The socket's buffer is full: the writer waits for room.
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => {
                        pending.bytes.clear();
                        drop(pending);
                        self.closed.cancel();
                        return false;
                    }
                }
            }
            was_empty && !pending.bytes.is_empty()
        };
        if was_empty {
            self.buffered.wake.notify_one();
        }
        true
    }
}

/// The writer of an [`Outgoing`]: woken when its buffer fills, it takes the buffer whole (after [`gather`]) and
/// writes it, until `closed` is cancelled or a write fails; then it cancels `closed` and shuts the connection's
/// sending side.
async fn write_buffered(buffered: std::sync::Arc<Buffered>, closed: CancellationToken) {
    let mut taken = BytesMut::with_capacity(64 * 1024);
    loop {
        tokio::select! {
            () = closed.cancelled() => break,
            () = buffered.wake.notified() => {}
        }
        // The last write, its own or a sender's.
        let written = buffered.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner).written;
        gather(written).await;
        {
            let mut pending = buffered.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            std::mem::swap(&mut pending.bytes, &mut taken);
            pending.writing = !taken.is_empty();
        }
        if taken.is_empty() {
            continue;
        }
        let result = tokio::select! {
            () = closed.cancelled() => break,
            result = write_all(&buffered.write, &mut taken) => result,
        };
        {
            let mut pending = buffered.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            pending.writing = false;
            pending.written = std::time::Instant::now();
        }
        if result.is_err() {
            break;
        }
    }
    closed.cancel();
    let stream: &TcpStream = buffered.write.as_ref();
    let _ = socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write);
}

/// Writes `bytes` whole to `write`, which senders share, waiting for room as needed; `bytes` is empty after.
async fn write_all(write: &OwnedWriteHalf, bytes: &mut BytesMut) -> std::io::Result<()> {
    while !bytes.is_empty() {
        write.writable().await?;
        match write.try_write(bytes) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(written) => bytes.advance(written),
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// Reads the next message, or `None` when the connection ended or sent what is not ZMTP within the limits.
pub(super) async fn next(read: &mut FramedRead<OwnedReadHalf, Codec>) -> Option<Message> {
    match read.next().await {
        Some(Ok(message)) => Some(message),
        Some(Err(error)) => {
            tracing::warn!(%error, "a ZeroMQ peer sent what is not ZMTP within the limits; closing the connection");
            None
        }
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_back_as_written_and_oversized_frames_are_refused_before_reading() {
        let message = vec![Bytes::from_static(b"MQRPC-ZMQ/1"), Bytes::from(vec![7u8; 300]), Bytes::new()];
        let mut buf = BytesMut::new();
        encode(&message, &mut buf);
        encode(&message[..1], &mut buf);
        let mut codec = Codec::new(Limits { max_frame: 1_000 });
        assert_eq!(codec.decode(&mut buf).expect("reads"), Some(message.clone()));
        assert_eq!(codec.decode(&mut buf).expect("reads"), Some(message[..1].to_vec()));
        assert_eq!(codec.decode(&mut buf).expect("reads"), None);
        // A message of more frames than the protocol has is skipped whole; the next one reads.
        let mut buf = BytesMut::new();
        encode(&vec![Bytes::from_static(b"x"); MAX_FRAMES + 5], &mut buf);
        encode(&message[..1], &mut buf);
        assert_eq!(codec.decode(&mut buf).expect("reads"), Some(message[..1].to_vec()));
        // A frame declaring 1 GiB is refused from its header alone.
        let mut huge = BytesMut::from(&[0x02u8, 0, 0, 0, 0, 0x40, 0, 0, 0][..]);
        assert!(codec.decode(&mut huge).is_err());
        assert!(huge.capacity() < 1_024);
    }

    /// Messages written at once by their senders and messages left to the writer arrive in the order sent,
    /// a message too large for one non-blocking write included, and a closed connection refuses sending.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn messages_written_at_once_and_by_the_writer_arrive_in_the_order_sent() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let address = listener.local_addr().expect("an address");
        let (connected, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        let (read, write) = connected.expect("connects").into_split();
        let (peer, _) = accepted.expect("accepts");
        let outgoing = Outgoing::start(write);
        let message = |n: u32, size: usize| vec![Bytes::from(n.to_be_bytes().to_vec()), Bytes::from(vec![7u8; size])];
        let sent: Vec<(u32, usize)> = (0..200u32)
            .map(|n| (n, if n % 50 == 7 { 8 * 1024 * 1024 } else { usize::try_from(n).unwrap_or(0) * 10 }))
            .collect();
        for &(n, size) in &sent {
            assert!(outgoing.send(&message(n, size), n % 3 != 0), "the connection is open");
        }
        let mut frames = FramedRead::new(peer, Codec::new(Limits { max_frame: 16 * 1024 * 1024 }));
        for &(n, size) in &sent {
            let received = frames.next().await.expect("a message").expect("well formed");
            assert_eq!(received, message(n, size), "message {n} arrives whole and in order");
        }
        drop((frames, read));
        outgoing.closed.cancel();
        assert!(!outgoing.send(&message(0, 1), true), "a closed connection refuses");
    }

    #[test]
    fn ready_names_the_socket_type_and_a_peer_is_checked_by_it() {
        let frame = ready(SocketType::Dealer);
        let properties = frame[2..].strip_prefix(b"\x05READY").expect("a READY");
        assert_eq!(property(properties, b"socket-type"), Ok(Some(&b"DEALER"[..])));
        assert_eq!(property(properties, b"Identity"), Ok(Some(&b""[..])));
        assert!(SocketType::Router.accepts(b"DEALER"));
        assert!(!SocketType::Router.accepts(b"PUB"));
        assert!(property(&[5, b'a'], b"x").is_err());
    }
}
