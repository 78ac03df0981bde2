//! The frames that `rpc-broker` servers and their clients exchange: one definition, both sides.
//! `docs/protocol.md` specifies them byte by byte.
//!
//! A frame is a big-endian `u32` length, then that many bytes: a one-byte type and the body. Strings are a
//! `u16` length and UTF-8; optional integers use `u64::MAX` for "absent"; a payload (an encoded envelope) is
//! the rest of the frame, forwarded by the broker without decoding.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use rpc_core::transport::Outcome;
use rpc_core::{Capabilities, Envelope, Kind, QueueStats, Text};
use tokio_util::codec::{Decoder, Encoder};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 9;

/// The first version whose clients get the refusal of a quiet `Publish` naming one of their inboxes in that
/// inbox, as a reply with the refusal's status, rather than as an `Error` frame: such a client waits for
/// nothing per call but the reply.
pub const QUIET_REFUSALS_IN_INBOX: u16 = 9;

/// The oldest client version the broker still accepts: version 5 differs only in a `Welcome` without its flags,
/// which the broker leaves out for it, and version 4 also in lacking the quiet `Publish` (0x12), which a
/// version-4 client never sends.
pub const OLDEST_CLIENT_VERSION: u16 = 4;

/// `Welcome` flag: the broker keeps durable queues on disk (it runs with a data directory).
pub const WELCOME_DURABLE: u8 = 1;

/// Default largest frame: 16 MiB.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// Every inbox's name starts with this; other queues cannot have it.
pub const INBOX_PREFIX: &str = "inbox.";

const ABSENT: u64 = u64::MAX;

/// What our broker offers, through either face: the embedded transport or the server and its clients.
pub(crate) const CAPABILITIES: Capabilities = Capabilities::none()
    .acks(true)
    .priority(true)
    .delayed_delivery(true)
    .max_length(true)
    .dead_letter(true)
    .cancel(true)
    .requeue(true)
    .subscriber_groups(true)
    .queue_stats(true);

/// The key under which a request can be cancelled: its correlation id. Replies and oneway messages have none.
pub(crate) fn call_key(envelope: &Envelope) -> Option<[u8; 16]> {
    match (envelope.kind, envelope.correlation_id) {
        (Kind::Request, Some(id)) => Some(*id.as_bytes()),
        _ => None,
    }
}

/// Why bytes are not a valid frame.
#[derive(Debug)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The length prefix is 0: a frame has at least its type byte.
    Empty,
    /// The length prefix is over the limit.
    TooLarge {
        /// The announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A frame that would take the frames being received over their budget.
    OverBudget {
        /// The announced length.
        len: usize,
    },
    /// A frame type this build does not know.
    UnknownType(u8),
    /// The body does not match its type.
    Malformed(&'static str),
    /// The socket failed.
    Io(std::io::Error),
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::Empty => f.write_str("a frame of length 0"),
            ProtocolError::TooLarge { len, max } => write!(f, "a frame of {len} bytes is over the {max}-byte limit"),
            ProtocolError::OverBudget { len } => {
                write!(f, "a frame of {len} bytes would take the frames being received over the broker's budget")
            }
            ProtocolError::UnknownType(kind) => write!(f, "unknown frame type 0x{kind:02x}"),
            ProtocolError::Malformed(why) => write!(f, "malformed frame: {why}"),
            ProtocolError::Io(error) => write!(f, "i/o error: {error}"),
        }
    }
}

impl std::error::Error for ProtocolError {}

impl From<std::io::Error> for ProtocolError {
    fn from(error: std::io::Error) -> ProtocolError {
        ProtocolError::Io(error)
    }
}

/// The largest frame a peer may send before its handshake is accepted: a `Hello` with a token and a name of a
/// few kilobytes fits. An unauthenticated peer cannot make the broker hold more than this for it.
pub const HANDSHAKE_MAX_FRAME: usize = 8 * 1024;

/// How much of a frame's announced length a decoder makes room for ahead of its bytes: room for the rest
/// grows as they arrive, so a length prefix alone costs the broker nothing.
const RESERVE_AHEAD: usize = 64 * 1024;

/// Splits a byte stream into frames (type byte + body), checking the length before reading the body.
///
/// A frame longer than 64 KiB is charged to its [`FrameBudget`] (if it has one) from its length
/// prefix until it is whole: frames being received on every connection together stay within the budget.
#[derive(Debug)]
pub struct FrameCodec {
    max_frame: usize,
    budget: Option<Arc<FrameBudget>>,
    /// What the frame being received is charged to the budget.
    charged: usize,
}

/// Bytes of frames being received, across the connections that share it, and their limit.
#[derive(Debug)]
pub struct FrameBudget {
    used: AtomicUsize,
    max: usize,
}

impl FrameBudget {
    /// A budget of `max` bytes.
    pub fn new(max: usize) -> FrameBudget {
        FrameBudget { used: AtomicUsize::new(0), max }
    }

    /// Bytes charged now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn charge(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|&total| total <= self.max)
            })
            .is_ok()
    }

    fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
    }
}

impl FrameCodec {
    /// A codec refusing frames longer than `max_frame`.
    pub fn new(max_frame: usize) -> FrameCodec {
        FrameCodec { max_frame, budget: None, charged: 0 }
    }

    /// A codec refusing frames longer than `max_frame`, its large frames charged to `budget` while they arrive.
    pub fn with_budget(max_frame: usize, budget: Arc<FrameBudget>) -> FrameCodec {
        FrameCodec { max_frame, budget: Some(budget), charged: 0 }
    }

    /// Changes the longest frame accepted from here on (after a handshake, say).
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame;
    }

    fn release(&mut self) {
        if let Some(budget) = &self.budget
            && self.charged > 0
        {
            budget.release(std::mem::take(&mut self.charged));
        }
    }
}

impl Drop for FrameCodec {
    fn drop(&mut self) {
        self.release();
    }
}

impl Decoder for FrameCodec {
    type Item = Bytes;
    type Error = ProtocolError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, ProtocolError> {
        if src.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len == 0 {
            return Err(ProtocolError::Empty);
        }
        if len > self.max_frame {
            return Err(ProtocolError::TooLarge { len, max: self.max_frame });
        }
        if src.len() < 4 + len {
            if len > RESERVE_AHEAD
                && self.charged == 0
                && let Some(budget) = &self.budget
            {
                if !budget.charge(len) {
                    return Err(ProtocolError::OverBudget { len });
                }
                self.charged = len;
            }
            src.reserve((4 + len - src.len()).min(RESERVE_AHEAD));
            return Ok(None);
        }
        self.release();
        src.advance(4);
        Ok(Some(src.split_to(len).freeze()))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, ProtocolError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(ProtocolError::Malformed("a frame cut off by the end of the stream")),
        }
    }
}

/// The most a writer gathers into one write.
const BATCH: usize = 1024 * 1024;

/// How soon after a write a frame finds a connection busy: well under the round trip of a lone call over
/// loopback (about 100 µs), well over the time between the frames of concurrent calls.
const BUSY: std::time::Duration = std::time::Duration::from_micros(50);

/// Encodes `first` into `buf`, then whatever else is queued on `outbound` by then, up to [`BATCH`] bytes: the
/// writers of both ends send a batch of frames with one write. On a busy connection (its last write ended at
/// `written`, within [`BUSY`]) the tasks that are ready run first, so that their frames join this write; after
/// a pause, a lone frame is not held back.
pub(crate) async fn gather<T>(
    first: T,
    outbound: &mut tokio::sync::mpsc::UnboundedReceiver<T>,
    buf: &mut BytesMut,
    written: std::time::Instant,
    mut encode: impl FnMut(T, &mut BytesMut),
) {
    if written.elapsed() < BUSY {
        tokio::task::yield_now().await;
    }
    let mut next = Some(first);
    while let Some(item) = next {
        encode(item, buf);
        next = if buf.len() < BATCH { outbound.try_recv().ok() } else { None };
    }
}

/// Frames encode themselves with their length prefix.
pub trait Frame {
    /// Appends the frame, length prefix included, to `dst`.
    fn encode(&self, dst: &mut BytesMut);
}

impl<F: Frame> Encoder<F> for FrameCodec {
    type Error = ProtocolError;

    fn encode(&mut self, frame: F, dst: &mut BytesMut) -> Result<(), ProtocolError> {
        frame.encode(dst);
        Ok(())
    }
}

/// What a client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    /// The first frame: protocol version and credentials.
    Hello {
        /// [`PROTOCOL_VERSION`].
        version: u16,
        /// The shared token, empty for none.
        token: String,
        /// A name for logs.
        name: String,
    },
    /// Makes sure a queue exists.
    Declare {
        /// Request id, echoed in the answer.
        req: u32,
        /// The queue.
        queue: String,
        /// Its maximum length.
        max_len: Option<u64>,
        /// Its maximum deliveries before dead-lettering.
        max_deliveries: Option<u32>,
        /// Whether it should survive a restart.
        durable: bool,
    },
    /// Puts a payload on a queue.
    Publish {
        /// Request id.
        req: u32,
        /// The queue.
        queue: String,
        /// 0 to 9.
        priority: u8,
        /// Dropped if not delivered within this many milliseconds.
        ttl_ms: Option<u64>,
        /// Held this many milliseconds before it can be delivered.
        delay_ms: Option<u64>,
        /// The call the payload belongs to (its correlation id), for `CancelCall`.
        key: Option<[u8; 16]>,
        /// The message's own id (its envelope's): a durable queue takes a message with an id it took lately
        /// once, so that a publisher can send again what it got no confirm for.
        id: Option<[u8; 16]>,
        /// The encoded envelope.
        payload: Bytes,
        /// Answered only if it fails (type 0x12 on the wire; 0x03 otherwise): a call's request, whose reply
        /// proves that it arrived. Nothing answers it once it is taken, durably or not.
        quiet: bool,
    },
    /// Puts a copy of a payload in every subscriber group of a topic.
    PublishTopic {
        /// Request id.
        req: u32,
        /// The topic.
        topic: String,
        /// 0 to 9.
        priority: u8,
        /// As in `Publish`.
        ttl_ms: Option<u64>,
        /// As in `Publish`.
        delay_ms: Option<u64>,
        /// The encoded envelope.
        payload: Bytes,
    },
    /// Starts a consumer on a queue.
    Consume {
        /// Request id.
        req: u32,
        /// The queue.
        queue: String,
        /// Unacked deliveries at most (0: the broker's limit per consumer).
        prefetch: u32,
        /// Deliveries count as acked when sent.
        auto_ack: bool,
    },
    /// Joins a subscriber group of a topic and starts a consumer on it.
    Subscribe {
        /// Request id.
        req: u32,
        /// The topic.
        topic: String,
        /// The group.
        group: String,
        /// As in `Consume`.
        prefetch: u32,
        /// As in `Consume`.
        auto_ack: bool,
    },
    /// Settles a delivery.
    Settle {
        /// The consumer it was delivered to.
        consumer: u64,
        /// Its tag.
        tag: u64,
        /// How (on the wire: 0 ack, 1 requeue, 2 dead-letter, 3 release).
        outcome: Outcome,
    },
    /// Ends a consumer; its unacked deliveries are requeued.
    Cancel {
        /// Request id.
        req: u32,
        /// The consumer.
        consumer: u64,
    },
    /// Stops new deliveries to a consumer.
    Pause {
        /// The consumer.
        consumer: u64,
    },
    /// Creates the auto-delete inbox `name` and an auto-ack consumer on it.
    OpenInbox {
        /// Request id.
        req: u32,
        /// The inbox's name.
        name: String,
    },
    /// A queue's counters.
    Stats {
        /// Request id.
        req: u32,
        /// The queue.
        queue: String,
    },
    /// Deletes a queue with its messages; its consumers end (`Cancelled`). From version 7.
    DeleteQueue {
        /// Request id.
        req: u32,
        /// The queue.
        queue: String,
    },
    /// Every queue's counters.
    ListQueues {
        /// Request id.
        req: u32,
    },
    /// A heartbeat.
    Ping,
    /// Answered once every frame sent before it was handled (settles included, which have no answer).
    Sync {
        /// Request id.
        req: u32,
    },
    /// Cancels a call: its messages still waiting on the queue are removed, and the consumers holding a
    /// delivery of it get `Abort`. No answer.
    CancelCall {
        /// The queue the call was published to.
        queue: String,
        /// The key it was published with.
        key: [u8; 16],
    },
    /// Publishes a payload in place of a delivery the connection holds, and acks that delivery, as one step:
    /// a worker retrying a request puts the next attempt on the queue this way. If the delivery is no longer
    /// held (the connection lost it and it was requeued) nothing happens and the answer is `Error{Gone}`; if
    /// the publish is refused, the delivery stays held.
    Republish {
        /// Request id.
        req: u32,
        /// The consumer that holds the delivery.
        consumer: u64,
        /// The delivery.
        tag: u64,
        /// Where the payload goes.
        queue: String,
        /// As in `Publish`.
        priority: u8,
        /// As in `Publish`.
        ttl_ms: Option<u64>,
        /// As in `Publish`.
        delay_ms: Option<u64>,
        /// As in `Publish`.
        key: Option<[u8; 16]>,
        /// As in `Publish`.
        id: Option<[u8; 16]>,
        /// The encoded envelope.
        payload: Bytes,
    },
    /// Publishes a reply to an inbox and acks the delivery it answers, as one step, unanswered: the end of a
    /// worker's handling of a request. If the delivery is no longer held (the connection lost it and it was
    /// requeued), nothing happens: the delivery that holds it now answers. A reply whose inbox is gone is
    /// dropped and the delivery acked all the same.
    Answer {
        /// The consumer that holds the delivery.
        consumer: u64,
        /// The delivery.
        tag: u64,
        /// The inbox.
        reply_to: Text,
        /// As in `Publish`.
        ttl_ms: Option<u64>,
        /// The encoded reply envelope.
        payload: Bytes,
    },
    /// A frame written ahead, length prefix included, such as a publish written with its envelope in one buffer
    /// ([`PublishHeader::with_envelope`]). Only sent: it is read as the frame it holds.
    Encoded {
        /// The request id of the frame it holds.
        req: u32,
        /// The frame.
        frame: Bytes,
    },
}

/// A publish frame's fields before its payload, to write the frame and its envelope at once.
#[derive(Clone, Copy, Debug)]
pub struct PublishHeader<'a> {
    /// As in [`ClientFrame::Publish`].
    pub req: u32,
    /// The queue.
    pub queue: &'a str,
    /// As in [`ClientFrame::Publish`].
    pub priority: u8,
    /// As in [`ClientFrame::Publish`].
    pub ttl_ms: Option<u64>,
    /// As in [`ClientFrame::Publish`].
    pub delay_ms: Option<u64>,
    /// As in [`ClientFrame::Publish`].
    pub key: Option<[u8; 16]>,
    /// As in [`ClientFrame::Publish`].
    pub id: Option<[u8; 16]>,
    /// As in [`ClientFrame::Publish`].
    pub quiet: bool,
}

impl PublishHeader<'_> {
    /// The publish frame with `envelope` as its payload, written in one allocation of its exact size (a
    /// [`ClientFrame::Publish`] holds its queue's name and its payload in two more).
    ///
    /// # Errors
    /// As [`codec::encode_envelope`](rpc_core::codec::encode_envelope).
    pub fn with_envelope(&self, envelope: &Envelope) -> Result<ClientFrame, rpc_core::codec::CodecError> {
        let frame = rpc_core::codec::encode_with(|out| {
            Writer::new(out, if self.quiet { 0x12 } else { 0x03 })
                .u32(self.req)
                .str(self.queue)
                .u8(self.priority)
                .opt(self.ttl_ms)
                .opt(self.delay_ms)
                .key(self.key.as_ref())
                .key(self.id.as_ref());
            rpc_core::codec::encode_envelope_into(out, envelope)?;
            // The prefix counts the payload too.
            let len = u32::try_from(out.len() - 4)
                .map_err(|_| rpc_core::codec::CodecError::TooLarge { len: out.len(), max: u32::MAX as usize })?;
            out[..4].copy_from_slice(&len.to_be_bytes());
            Ok(())
        })?;
        Ok(ClientFrame::Encoded { req: self.req, frame })
    }
}

/// Error codes in [`ServerFrame::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorCode {
    /// No such queue.
    NoRoute,
    /// The queue is full, or the broker is over its memory watermark.
    QueueFull,
    /// An argument is refused: a queue name, a priority, or a payload that is not one well-formed MessagePack
    /// value within the limits.
    Invalid,
    /// Missing or wrong credentials.
    Unauthorized,
    /// A frame over the size limit.
    TooLarge,
    /// A frame that does not parse.
    Malformed,
    /// A protocol version the broker does not speak.
    Version,
    /// A per-connection or per-broker limit.
    Limit,
    /// The handshake took too long, or the connection went silent.
    Timeout,
    /// A failure inside the broker.
    Internal,
    /// The delivery a frame names is no longer held by the connection.
    Gone,
    /// The connection's user lacks the right for the operation on the queue or topic it names.
    Forbidden,
    /// A code this build does not know.
    Other(u8),
}

impl ErrorCode {
    fn to_u8(self) -> u8 {
        match self {
            ErrorCode::NoRoute => 1,
            ErrorCode::QueueFull => 2,
            ErrorCode::Invalid => 3,
            ErrorCode::Unauthorized => 4,
            ErrorCode::TooLarge => 5,
            ErrorCode::Malformed => 6,
            ErrorCode::Version => 7,
            ErrorCode::Limit => 8,
            ErrorCode::Timeout => 9,
            ErrorCode::Internal => 10,
            ErrorCode::Gone => 11,
            ErrorCode::Forbidden => 12,
            ErrorCode::Other(code) => code,
        }
    }

    fn from_u8(code: u8) -> ErrorCode {
        match code {
            1 => ErrorCode::NoRoute,
            2 => ErrorCode::QueueFull,
            3 => ErrorCode::Invalid,
            4 => ErrorCode::Unauthorized,
            5 => ErrorCode::TooLarge,
            6 => ErrorCode::Malformed,
            7 => ErrorCode::Version,
            8 => ErrorCode::Limit,
            9 => ErrorCode::Timeout,
            10 => ErrorCode::Internal,
            11 => ErrorCode::Gone,
            12 => ErrorCode::Forbidden,
            other => ErrorCode::Other(other),
        }
    }
}

/// What the server sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFrame {
    /// The answer to `Hello`.
    Welcome {
        /// [`PROTOCOL_VERSION`].
        version: u16,
        /// How often each side sends a heartbeat; silence for three of them closes the connection.
        heartbeat_ms: u32,
        /// The largest frame the server accepts.
        max_frame: u32,
        /// What the broker offers ([`WELCOME_DURABLE`]); sent from version 6 on, 0 before.
        flags: u8,
    },
    /// A request succeeded; the body depends on the request (see `docs/protocol.md`).
    Ok {
        /// The request id.
        req: u32,
        /// Request-specific.
        body: Bytes,
    },
    /// A request failed; with `req` 0, the connection failed and the server closes it.
    Error {
        /// The request id, or 0.
        req: u32,
        /// What kind of failure.
        code: ErrorCode,
        /// For humans.
        message: String,
    },
    /// A message for a consumer.
    Deliver {
        /// The consumer.
        consumer: u64,
        /// Settles it; 0 for auto-ack consumers.
        tag: u64,
        /// Deliveries so far, this one included.
        delivery_count: u32,
        /// What remains of its TTL.
        ttl_ms: Option<u64>,
        /// The encoded envelope.
        payload: Bytes,
    },
    /// A heartbeat.
    Ping,
    /// The server ended a consumer (its queue was deleted).
    Cancelled {
        /// The consumer.
        consumer: u64,
    },
    /// The call of a delivery this connection holds was cancelled: its handler may stop. The delivery is
    /// still settled as usual.
    Abort {
        /// The consumer.
        consumer: u64,
        /// The delivery.
        tag: u64,
    },
}

/// Writes a frame's fields after its length prefix, which it fills in when dropped; into the codec's buffer, or
/// into a buffer of its own for a frame written ahead ([`PublishHeader::with_envelope`]).
struct Writer<'a, D: BufMut + std::ops::DerefMut<Target = [u8]>> {
    dst: &'a mut D,
    start: usize,
}

impl<'a, D: BufMut + std::ops::DerefMut<Target = [u8]>> Writer<'a, D> {
    fn new(dst: &'a mut D, kind: u8) -> Writer<'a, D> {
        let start = dst.len();
        dst.put_u32(0);
        dst.put_u8(kind);
        Writer { dst, start }
    }

    fn u8(&mut self, value: u8) -> &mut Self {
        self.dst.put_u8(value);
        self
    }

    fn u16(&mut self, value: u16) -> &mut Self {
        self.dst.put_u16(value);
        self
    }

    fn u32(&mut self, value: u32) -> &mut Self {
        self.dst.put_u32(value);
        self
    }

    fn u64(&mut self, value: u64) -> &mut Self {
        self.dst.put_u64(value);
        self
    }

    fn opt(&mut self, value: Option<u64>) -> &mut Self {
        self.u64(value.unwrap_or(ABSENT))
    }

    /// Strings longer than a `u16` are cut at a character boundary: names are short by construction, and
    /// messages are for humans.
    fn key(&mut self, value: Option<&[u8; 16]>) -> &mut Self {
        match value {
            Some(key) => {
                self.dst.put_u8(1);
                self.dst.put_slice(key);
            }
            None => self.dst.put_u8(0),
        }
        self
    }

    fn str(&mut self, value: &str) -> &mut Self {
        let mut end = value.len().min(usize::from(u16::MAX));
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        self.u16(end as u16);
        self.dst.put_slice(&value.as_bytes()[..end]);
        self
    }

    fn bytes(&mut self, value: &[u8]) -> &mut Self {
        self.dst.put_slice(value);
        self
    }
}

impl<D: BufMut + std::ops::DerefMut<Target = [u8]>> Drop for Writer<'_, D> {
    fn drop(&mut self) {
        let len = (self.dst.len() - self.start - 4) as u32;
        self.dst[self.start..self.start + 4].copy_from_slice(&len.to_be_bytes());
    }
}

struct Reader {
    buf: Bytes,
}

impl Reader {
    fn need(&self, n: usize) -> Result<(), ProtocolError> {
        if self.buf.len() < n { Err(ProtocolError::Malformed("the frame ends early")) } else { Ok(()) }
    }

    fn u8(&mut self) -> Result<u8, ProtocolError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }

    fn u16(&mut self) -> Result<u16, ProtocolError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }

    fn u32(&mut self) -> Result<u32, ProtocolError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }

    fn u64(&mut self) -> Result<u64, ProtocolError> {
        self.need(8)?;
        Ok(self.buf.get_u64())
    }

    fn opt(&mut self) -> Result<Option<u64>, ProtocolError> {
        Ok(Some(self.u64()?).filter(|value| *value != ABSENT))
    }

    fn bool(&mut self) -> Result<bool, ProtocolError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(ProtocolError::Malformed("a flag other than 0 or 1")),
        }
    }

    fn key16(&mut self) -> Result<[u8; 16], ProtocolError> {
        self.need(16)?;
        let mut key = [0; 16];
        self.buf.copy_to_slice(&mut key);
        Ok(key)
    }

    fn key(&mut self) -> Result<Option<[u8; 16]>, ProtocolError> {
        if self.bool()? { Ok(Some(self.key16()?)) } else { Ok(None) }
    }

    fn str(&mut self) -> Result<String, ProtocolError> {
        let len = usize::from(self.u16()?);
        self.need(len)?;
        let bytes = self.buf.split_to(len);
        String::from_utf8(bytes.to_vec()).map_err(|_| ProtocolError::Malformed("a string that is not UTF-8"))
    }

    /// As [`Reader::str`], a slice of the frame rather than a copy.
    fn text(&mut self) -> Result<Text, ProtocolError> {
        let len = usize::from(self.u16()?);
        self.need(len)?;
        Text::from_utf8(self.buf.split_to(len)).map_err(|_| ProtocolError::Malformed("a string that is not UTF-8"))
    }

    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    fn end(self) -> Result<(), ProtocolError> {
        if self.buf.is_empty() { Ok(()) } else { Err(ProtocolError::Malformed("bytes after the frame's fields")) }
    }
}

impl Frame for ClientFrame {
    fn encode(&self, dst: &mut BytesMut) {
        match self {
            ClientFrame::Hello { version, token, name } => {
                Writer::new(dst, 0x01).u16(*version).str(token).str(name);
            }
            ClientFrame::Declare { req, queue, max_len, max_deliveries, durable } => {
                Writer::new(dst, 0x02)
                    .u32(*req)
                    .str(queue)
                    .opt(*max_len)
                    .u32(max_deliveries.unwrap_or(0))
                    .u8(u8::from(*durable));
            }
            ClientFrame::Publish { req, queue, priority, ttl_ms, delay_ms, key, id, payload, quiet } => {
                Writer::new(dst, if *quiet { 0x12 } else { 0x03 })
                    .u32(*req)
                    .str(queue)
                    .u8(*priority)
                    .opt(*ttl_ms)
                    .opt(*delay_ms)
                    .key(key.as_ref())
                    .key(id.as_ref())
                    .bytes(payload);
            }
            ClientFrame::PublishTopic { req, topic, priority, ttl_ms, delay_ms, payload } => {
                Writer::new(dst, 0x04).u32(*req).str(topic).u8(*priority).opt(*ttl_ms).opt(*delay_ms).bytes(payload);
            }
            ClientFrame::Consume { req, queue, prefetch, auto_ack } => {
                Writer::new(dst, 0x05).u32(*req).str(queue).u32(*prefetch).u8(u8::from(*auto_ack));
            }
            ClientFrame::Subscribe { req, topic, group, prefetch, auto_ack } => {
                Writer::new(dst, 0x06).u32(*req).str(topic).str(group).u32(*prefetch).u8(u8::from(*auto_ack));
            }
            ClientFrame::Settle { consumer, tag, outcome } => {
                let outcome = match outcome {
                    Outcome::Ack => 0,
                    Outcome::Requeue => 1,
                    Outcome::DeadLetter => 2,
                    Outcome::Release => 3,
                };
                Writer::new(dst, 0x07).u64(*consumer).u64(*tag).u8(outcome);
            }
            ClientFrame::Cancel { req, consumer } => {
                Writer::new(dst, 0x08).u32(*req).u64(*consumer);
            }
            ClientFrame::Pause { consumer } => {
                Writer::new(dst, 0x09).u64(*consumer);
            }
            ClientFrame::OpenInbox { req, name } => {
                Writer::new(dst, 0x0a).u32(*req).str(name);
            }
            ClientFrame::Stats { req, queue } => {
                Writer::new(dst, 0x0b).u32(*req).str(queue);
            }
            ClientFrame::ListQueues { req } => {
                Writer::new(dst, 0x0c).u32(*req);
            }
            ClientFrame::DeleteQueue { req, queue } => {
                Writer::new(dst, 0x13).u32(*req).str(queue);
            }
            ClientFrame::Ping => {
                Writer::new(dst, 0x0d);
            }
            ClientFrame::Sync { req } => {
                Writer::new(dst, 0x0e).u32(*req);
            }
            ClientFrame::CancelCall { queue, key } => {
                Writer::new(dst, 0x0f).str(queue).bytes(key);
            }
            ClientFrame::Encoded { frame, .. } => dst.put_slice(frame),
            ClientFrame::Answer { consumer, tag, reply_to, ttl_ms, payload } => {
                Writer::new(dst, 0x11).u64(*consumer).u64(*tag).str(reply_to).opt(*ttl_ms).bytes(payload);
            }
            ClientFrame::Republish { req, consumer, tag, queue, priority, ttl_ms, delay_ms, key, id, payload } => {
                Writer::new(dst, 0x10)
                    .u32(*req)
                    .u64(*consumer)
                    .u64(*tag)
                    .str(queue)
                    .u8(*priority)
                    .opt(*ttl_ms)
                    .opt(*delay_ms)
                    .key(key.as_ref())
                    .key(id.as_ref())
                    .bytes(payload);
            }
        }
    }
}

impl ClientFrame {
    /// Parses one frame (type byte and body, without the length prefix).
    ///
    /// # Errors
    /// [`ProtocolError::UnknownType`] or [`ProtocolError::Malformed`].
    pub fn parse(frame: Bytes) -> Result<ClientFrame, ProtocolError> {
        let mut r = Reader { buf: frame };
        let frame = match r.u8()? {
            0x01 => ClientFrame::Hello { version: r.u16()?, token: r.str()?, name: r.str()? },
            0x02 => ClientFrame::Declare {
                req: r.u32()?,
                queue: r.str()?,
                max_len: r.opt()?,
                max_deliveries: Some(r.u32()?).filter(|max| *max != 0),
                durable: r.bool()?,
            },
            kind @ (0x03 | 0x12) => {
                let (req, queue, priority) = (r.u32()?, r.str()?, r.u8()?);
                let (ttl_ms, delay_ms, key, id) = (r.opt()?, r.opt()?, r.key()?, r.key()?);
                let quiet = kind == 0x12;
                let payload = r.rest();
                return Ok(ClientFrame::Publish { req, queue, priority, ttl_ms, delay_ms, key, id, payload, quiet });
            }
            0x04 => {
                let (req, topic, priority, ttl_ms, delay_ms) = (r.u32()?, r.str()?, r.u8()?, r.opt()?, r.opt()?);
                return Ok(ClientFrame::PublishTopic { req, topic, priority, ttl_ms, delay_ms, payload: r.rest() });
            }
            0x05 => ClientFrame::Consume { req: r.u32()?, queue: r.str()?, prefetch: r.u32()?, auto_ack: r.bool()? },
            0x06 => ClientFrame::Subscribe {
                req: r.u32()?,
                topic: r.str()?,
                group: r.str()?,
                prefetch: r.u32()?,
                auto_ack: r.bool()?,
            },
            0x07 => ClientFrame::Settle {
                consumer: r.u64()?,
                tag: r.u64()?,
                outcome: match r.u8()? {
                    0 => Outcome::Ack,
                    1 => Outcome::Requeue,
                    2 => Outcome::DeadLetter,
                    3 => Outcome::Release,
                    _ => return Err(ProtocolError::Malformed("an unknown settle outcome")),
                },
            },
            0x08 => ClientFrame::Cancel { req: r.u32()?, consumer: r.u64()? },
            0x09 => ClientFrame::Pause { consumer: r.u64()? },
            0x0a => ClientFrame::OpenInbox { req: r.u32()?, name: r.str()? },
            0x0b => ClientFrame::Stats { req: r.u32()?, queue: r.str()? },
            0x0c => ClientFrame::ListQueues { req: r.u32()? },
            0x13 => ClientFrame::DeleteQueue { req: r.u32()?, queue: r.str()? },
            0x0d => ClientFrame::Ping,
            0x0e => ClientFrame::Sync { req: r.u32()? },
            0x0f => ClientFrame::CancelCall { queue: r.str()?, key: r.key16()? },
            0x10 => {
                let (req, consumer, tag, queue) = (r.u32()?, r.u64()?, r.u64()?, r.str()?);
                let (priority, ttl_ms, delay_ms, key, id) = (r.u8()?, r.opt()?, r.opt()?, r.key()?, r.key()?);
                let payload = r.rest();
                return Ok(ClientFrame::Republish {
                    req,
                    consumer,
                    tag,
                    queue,
                    priority,
                    ttl_ms,
                    delay_ms,
                    key,
                    id,
                    payload,
                });
            }
            0x11 => {
                let (consumer, tag, reply_to, ttl_ms) = (r.u64()?, r.u64()?, r.text()?, r.opt()?);
                return Ok(ClientFrame::Answer { consumer, tag, reply_to, ttl_ms, payload: r.rest() });
            }
            other => return Err(ProtocolError::UnknownType(other)),
        };
        r.end()?;
        Ok(frame)
    }

    /// The request id, for frames that have one.
    pub fn req(&self) -> u32 {
        match self {
            ClientFrame::Declare { req, .. }
            | ClientFrame::Publish { req, .. }
            | ClientFrame::PublishTopic { req, .. }
            | ClientFrame::Consume { req, .. }
            | ClientFrame::Subscribe { req, .. }
            | ClientFrame::Cancel { req, .. }
            | ClientFrame::OpenInbox { req, .. }
            | ClientFrame::Stats { req, .. }
            | ClientFrame::DeleteQueue { req, .. }
            | ClientFrame::ListQueues { req }
            | ClientFrame::Sync { req }
            | ClientFrame::Republish { req, .. }
            | ClientFrame::Encoded { req, .. } => *req,
            ClientFrame::Hello { .. }
            | ClientFrame::Settle { .. }
            | ClientFrame::Pause { .. }
            | ClientFrame::Ping
            | ClientFrame::CancelCall { .. }
            | ClientFrame::Answer { .. } => 0,
        }
    }
}

impl Frame for ServerFrame {
    fn encode(&self, dst: &mut BytesMut) {
        match self {
            ServerFrame::Welcome { version, heartbeat_ms, max_frame, flags } => {
                let mut writer = Writer::new(dst, 0x81);
                writer.u16(*version).u32(*heartbeat_ms).u32(*max_frame);
                if *version >= 6 {
                    writer.u8(*flags);
                }
            }
            ServerFrame::Ok { req, body } => {
                Writer::new(dst, 0x82).u32(*req).bytes(body);
            }
            ServerFrame::Error { req, code, message } => {
                Writer::new(dst, 0x83).u32(*req).u8(code.to_u8()).str(message);
            }
            ServerFrame::Deliver { consumer, tag, delivery_count, ttl_ms, payload } => {
                Writer::new(dst, 0x84).u64(*consumer).u64(*tag).u32(*delivery_count).opt(*ttl_ms).bytes(payload);
            }
            ServerFrame::Ping => {
                Writer::new(dst, 0x85);
            }
            ServerFrame::Cancelled { consumer } => {
                Writer::new(dst, 0x86).u64(*consumer);
            }
            ServerFrame::Abort { consumer, tag } => {
                Writer::new(dst, 0x87).u64(*consumer).u64(*tag);
            }
        }
    }
}

impl ServerFrame {
    /// Parses one frame (type byte and body, without the length prefix).
    ///
    /// # Errors
    /// [`ProtocolError::UnknownType`] or [`ProtocolError::Malformed`].
    pub fn parse(frame: Bytes) -> Result<ServerFrame, ProtocolError> {
        let mut r = Reader { buf: frame };
        let frame = match r.u8()? {
            0x81 => {
                let (version, heartbeat_ms, max_frame) = (r.u16()?, r.u32()?, r.u32()?);
                let flags = if version >= 6 { r.u8()? } else { 0 };
                ServerFrame::Welcome { version, heartbeat_ms, max_frame, flags }
            }
            0x82 => {
                let req = r.u32()?;
                return Ok(ServerFrame::Ok { req, body: r.rest() });
            }
            0x83 => ServerFrame::Error { req: r.u32()?, code: ErrorCode::from_u8(r.u8()?), message: r.str()? },
            0x84 => {
                let (consumer, tag, delivery_count, ttl_ms) = (r.u64()?, r.u64()?, r.u32()?, r.opt()?);
                return Ok(ServerFrame::Deliver { consumer, tag, delivery_count, ttl_ms, payload: r.rest() });
            }
            0x85 => ServerFrame::Ping,
            0x86 => ServerFrame::Cancelled { consumer: r.u64()? },
            0x87 => ServerFrame::Abort { consumer: r.u64()?, tag: r.u64()? },
            other => return Err(ProtocolError::UnknownType(other)),
        };
        r.end()?;
        Ok(frame)
    }
}

/// The body of an `Ok` that answers `Consume`, `Subscribe` or `OpenInbox`: the consumer id.
pub fn consumer_body(consumer: u64) -> Bytes {
    Bytes::copy_from_slice(&consumer.to_be_bytes())
}

/// Reads a consumer id body.
///
/// # Errors
/// [`ProtocolError::Malformed`].
pub fn parse_consumer_body(body: Bytes) -> Result<u64, ProtocolError> {
    let mut r = Reader { buf: body };
    let consumer = r.u64()?;
    r.end()?;
    Ok(consumer)
}

fn put_stats(dst: &mut BytesMut, stats: &QueueStats) {
    for value in [
        stats.ready as u64,
        stats.unacked as u64,
        stats.consumers as u64,
        stats.published,
        stats.acked,
        stats.dead_lettered,
        stats.expired,
        stats.rejected,
        stats.cancelled,
        stats.delayed as u64,
        stats.deduplicated,
    ] {
        dst.put_u64(value);
    }
}

fn read_stats(r: &mut Reader) -> Result<QueueStats, ProtocolError> {
    let mut stats = QueueStats::new();
    stats.ready = usize::try_from(r.u64()?).map_err(|_| ProtocolError::Malformed("a count over usize"))?;
    stats.unacked = usize::try_from(r.u64()?).map_err(|_| ProtocolError::Malformed("a count over usize"))?;
    stats.consumers = usize::try_from(r.u64()?).map_err(|_| ProtocolError::Malformed("a count over usize"))?;
    stats.published = r.u64()?;
    stats.acked = r.u64()?;
    stats.dead_lettered = r.u64()?;
    stats.expired = r.u64()?;
    stats.rejected = r.u64()?;
    stats.cancelled = r.u64()?;
    stats.delayed = usize::try_from(r.u64()?).map_err(|_| ProtocolError::Malformed("a count over usize"))?;
    stats.deduplicated = r.u64()?;
    Ok(stats)
}

/// The body of an `Ok` that answers `Stats`.
pub fn stats_body(stats: &QueueStats) -> Bytes {
    let mut dst = BytesMut::with_capacity(64);
    put_stats(&mut dst, stats);
    dst.freeze()
}

/// Reads a `Stats` answer.
///
/// # Errors
/// [`ProtocolError::Malformed`].
pub fn parse_stats_body(body: Bytes) -> Result<QueueStats, ProtocolError> {
    let mut r = Reader { buf: body };
    let stats = read_stats(&mut r)?;
    r.end()?;
    Ok(stats)
}

/// The body of an `Ok` that answers `ListQueues`.
pub fn list_body(queues: &[(String, QueueStats)]) -> Bytes {
    let mut dst = BytesMut::new();
    dst.put_u32(queues.len() as u32);
    for (name, stats) in queues {
        let len = name.len().min(usize::from(u16::MAX));
        dst.put_u16(len as u16);
        dst.put_slice(&name.as_bytes()[..len]);
        put_stats(&mut dst, stats);
    }
    dst.freeze()
}

/// Reads a `ListQueues` answer.
///
/// # Errors
/// [`ProtocolError::Malformed`].
pub fn parse_list_body(body: Bytes) -> Result<Vec<(String, QueueStats)>, ProtocolError> {
    let mut r = Reader { buf: body };
    let count = r.u32()? as usize;
    // Each entry takes at least 66 bytes: never trust the count for an allocation.
    let mut queues = Vec::with_capacity(count.min(r.buf.len() / 66));
    for _ in 0..count {
        let name = r.str()?;
        queues.push((name, read_stats(&mut r)?));
    }
    r.end()?;
    Ok(queues)
}

impl ErrorCode {
    /// The framework error for this code, about `what` (a queue or topic) with the server's `message`.
    pub fn to_error(self, what: &str, message: String) -> rpc_core::Error {
        use rpc_core::Error;
        match self {
            ErrorCode::NoRoute => Error::NoRoute(what.to_owned()),
            ErrorCode::QueueFull => Error::QueueFull(what.to_owned()),
            ErrorCode::Unauthorized => Error::Unauthorized(message),
            ErrorCode::Forbidden => Error::Forbidden(message),
            ErrorCode::Invalid => Error::InvalidArgument(message),
            ErrorCode::Gone => Error::DeliveryLost,
            _ => Error::Transport(format!("broker error {self:?}: {message}").into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip_client(frame: ClientFrame) {
        let mut dst = BytesMut::new();
        frame.encode(&mut dst);
        let mut codec = FrameCodec::new(DEFAULT_MAX_FRAME);
        let raw = codec.decode(&mut dst).expect("decodes").expect("a whole frame");
        assert!(dst.is_empty());
        assert_eq!(ClientFrame::parse(raw).expect("parses"), frame);
    }

    #[test]
    fn a_publish_written_with_its_envelope_reads_as_the_publish_frame() {
        let mut envelope = Envelope::new(Kind::Request);
        envelope.service = Text::from_static("Calculator");
        envelope.method = Text::from_static("add");
        envelope.body = Bytes::from_static(b"\x92\x01\x02");
        for (quiet, ttl_ms, key) in [(true, Some(900), Some([5; 16])), (false, None, None)] {
            let header = PublishHeader {
                req: 7,
                queue: "mqrpc.Calculator",
                priority: 3,
                ttl_ms,
                delay_ms: None,
                key,
                id: Some(*envelope.id.as_bytes()),
                quiet,
            };
            let written = header.with_envelope(&envelope).expect("encodes");
            assert_eq!(written.req(), 7);
            let mut dst = BytesMut::new();
            written.encode(&mut dst);
            let raw = FrameCodec::new(DEFAULT_MAX_FRAME).decode(&mut dst).expect("decodes").expect("a whole frame");
            assert!(dst.is_empty());
            let expected = ClientFrame::Publish {
                req: 7,
                queue: "mqrpc.Calculator".into(),
                priority: 3,
                ttl_ms,
                delay_ms: None,
                key,
                id: header.id,
                payload: rpc_core::codec::encode_envelope(&envelope).expect("encodes"),
                quiet,
            };
            assert_eq!(ClientFrame::parse(raw).expect("parses"), expected);
        }
    }

    fn round_trip_server(frame: ServerFrame) {
        let mut dst = BytesMut::new();
        frame.encode(&mut dst);
        let raw = FrameCodec::new(DEFAULT_MAX_FRAME).decode(&mut dst).expect("decodes").expect("a whole frame");
        assert_eq!(ServerFrame::parse(raw).expect("parses"), frame);
    }

    #[test]
    fn every_frame_round_trips() {
        let payload = Bytes::from_static(b"\x81\xa1v\x01");
        round_trip_client(ClientFrame::Hello { version: 1, token: "secret".into(), name: "test".into() });
        round_trip_client(ClientFrame::Declare {
            req: 1,
            queue: "q".into(),
            max_len: Some(5),
            max_deliveries: Some(3),
            durable: true,
        });
        round_trip_client(ClientFrame::Declare {
            req: 1,
            queue: "q".into(),
            max_len: None,
            max_deliveries: None,
            durable: false,
        });
        round_trip_client(ClientFrame::Publish {
            req: 2,
            queue: "q".into(),
            priority: 9,
            ttl_ms: Some(100),
            delay_ms: Some(250),
            key: None,
            id: Some([1; 16]),
            payload: payload.clone(),
            quiet: false,
        });
        round_trip_client(ClientFrame::Publish {
            req: 2,
            queue: "q".into(),
            priority: 0,
            ttl_ms: None,
            delay_ms: None,
            key: Some([7; 16]),
            id: None,
            payload: payload.clone(),
            quiet: true,
        });
        round_trip_client(ClientFrame::PublishTopic {
            req: 3,
            topic: "t".into(),
            priority: 0,
            ttl_ms: None,
            delay_ms: Some(1),
            payload: payload.clone(),
        });
        round_trip_client(ClientFrame::Consume { req: 4, queue: "q".into(), prefetch: 64, auto_ack: false });
        round_trip_client(ClientFrame::Subscribe {
            req: 5,
            topic: "t".into(),
            group: "g".into(),
            prefetch: 1,
            auto_ack: true,
        });
        for outcome in [Outcome::Ack, Outcome::Requeue, Outcome::DeadLetter, Outcome::Release] {
            round_trip_client(ClientFrame::Settle { consumer: 7, tag: 8, outcome });
        }
        round_trip_client(ClientFrame::Cancel { req: 6, consumer: 7 });
        round_trip_client(ClientFrame::Pause { consumer: 7 });
        round_trip_client(ClientFrame::OpenInbox { req: 7, name: "inbox.x".into() });
        round_trip_client(ClientFrame::Stats { req: 8, queue: "q".into() });
        round_trip_client(ClientFrame::DeleteQueue { req: 8, queue: "q".into() });
        round_trip_client(ClientFrame::ListQueues { req: 9 });
        round_trip_client(ClientFrame::Ping);
        round_trip_client(ClientFrame::Sync { req: 10 });
        round_trip_client(ClientFrame::CancelCall { queue: "q".into(), key: [9; 16] });
        round_trip_client(ClientFrame::Republish {
            req: 11,
            consumer: 3,
            tag: 4,
            queue: "q".into(),
            priority: 2,
            ttl_ms: Some(900),
            delay_ms: Some(100),
            key: Some([5; 16]),
            id: Some([6; 16]),
            payload: payload.clone(),
        });
        round_trip_client(ClientFrame::Answer {
            consumer: 3,
            tag: 4,
            reply_to: "inbox.a".into(),
            ttl_ms: Some(900),
            payload: payload.clone(),
        });
        round_trip_client(ClientFrame::Answer {
            consumer: 3,
            tag: 4,
            reply_to: "inbox.a".into(),
            ttl_ms: None,
            payload: payload.clone(),
        });
        round_trip_server(ServerFrame::Welcome { version: 5, heartbeat_ms: 1000, max_frame: 1 << 24, flags: 0 });
        round_trip_server(ServerFrame::Welcome {
            version: 6,
            heartbeat_ms: 1000,
            max_frame: 1 << 24,
            flags: WELCOME_DURABLE,
        });
        round_trip_server(ServerFrame::Ok { req: 1, body: consumer_body(42) });
        round_trip_server(ServerFrame::Error { req: 0, code: ErrorCode::Unauthorized, message: "no".into() });
        round_trip_server(ServerFrame::Deliver { consumer: 1, tag: 2, delivery_count: 3, ttl_ms: None, payload });
        round_trip_server(ServerFrame::Ping);
        round_trip_server(ServerFrame::Cancelled { consumer: 9 });
        round_trip_server(ServerFrame::Abort { consumer: 9, tag: 10 });
    }

    #[test]
    fn bodies_round_trip() {
        assert_eq!(parse_consumer_body(consumer_body(5)).expect("parses"), 5);
        let mut stats = QueueStats::new();
        stats.ready = 3;
        stats.rejected = 9;
        stats.cancelled = 4;
        assert_eq!(parse_stats_body(stats_body(&stats)).expect("parses"), stats);
        let list = vec![("a".to_owned(), stats), ("b.dlq".to_owned(), QueueStats::new())];
        assert_eq!(parse_list_body(list_body(&list)).expect("parses"), list);
        // A count claiming four billion entries in a few bytes fails without allocating for them.
        assert!(parse_list_body(Bytes::from_static(&[0xff, 0xff, 0xff, 0xff])).is_err());
    }

    #[test]
    fn lengths_are_checked_before_the_body_is_read() {
        let mut codec = FrameCodec::new(1024);
        let mut empty = BytesMut::from(&[0u8, 0, 0, 0][..]);
        assert!(matches!(codec.decode(&mut empty), Err(ProtocolError::Empty)));
        let mut huge = BytesMut::from(&[0xffu8, 0xff, 0xff, 0xff][..]);
        assert!(matches!(codec.decode(&mut huge), Err(ProtocolError::TooLarge { len: 4_294_967_295, max: 1024 })));
        let mut partial = BytesMut::from(&[0u8, 0, 0, 5, 0x0d][..]);
        assert!(matches!(codec.decode(&mut partial), Ok(None)));
    }

    #[test]
    fn a_length_prefix_alone_reserves_no_more_than_a_chunk() {
        let mut codec = FrameCodec::new(DEFAULT_MAX_FRAME);
        let mut src = BytesMut::from(&(DEFAULT_MAX_FRAME as u32).to_be_bytes()[..]);
        assert!(matches!(codec.decode(&mut src), Ok(None)));
        assert!(src.capacity() <= 4 + RESERVE_AHEAD, "reserved {} bytes", src.capacity());
    }

    #[test]
    fn large_frames_being_received_share_one_budget() {
        let budget = Arc::new(FrameBudget::new(1 << 20));
        let header = |len: u32| BytesMut::from(&len.to_be_bytes()[..]);
        let mut first = FrameCodec::with_budget(DEFAULT_MAX_FRAME, Arc::clone(&budget));
        let mut second = FrameCodec::with_budget(DEFAULT_MAX_FRAME, Arc::clone(&budget));
        let mut first_src = header(800 << 10);
        assert!(matches!(first.decode(&mut first_src), Ok(None)));
        // Asked again as more bytes arrive, the frame is charged once.
        first_src.extend_from_slice(&[0x0d; 1024]);
        assert!(matches!(first.decode(&mut first_src), Ok(None)));
        assert_eq!(budget.used(), 800 << 10);
        assert!(matches!(second.decode(&mut header(800 << 10)), Err(ProtocolError::OverBudget { len: 819_200 })));
        // Small frames are not charged.
        assert!(matches!(second.decode(&mut header(1024)), Ok(None)));
        // A whole frame gives its charge back; so does a codec dropped with a frame half received.
        first_src.resize(4 + (800 << 10), 0x0d);
        assert_eq!(first.decode(&mut first_src).expect("decodes").map(|frame| frame.len()), Some(800 << 10));
        assert_eq!(budget.used(), 0);
        let mut third = FrameCodec::with_budget(DEFAULT_MAX_FRAME, Arc::clone(&budget));
        assert!(matches!(third.decode(&mut header(900 << 10)), Ok(None)));
        assert_eq!(budget.used(), 900 << 10);
        drop(third);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_frame_cut_off_by_the_end_of_the_stream_is_malformed() {
        let mut codec = FrameCodec::new(1024);
        let mut cut = BytesMut::from(&[0u8, 0, 0, 5, 0x0d][..]);
        assert!(matches!(codec.decode_eof(&mut cut), Err(ProtocolError::Malformed(_))));
        assert!(matches!(codec.decode_eof(&mut BytesMut::new()), Ok(None)));
    }

    #[test]
    fn malformed_bodies_are_typed_errors() {
        assert!(matches!(ClientFrame::parse(Bytes::from_static(&[0x7f])), Err(ProtocolError::UnknownType(0x7f))));
        assert!(matches!(ClientFrame::parse(Bytes::from_static(&[0x01, 0x00])), Err(ProtocolError::Malformed(_))));
        assert!(matches!(
            ClientFrame::parse(Bytes::from_static(&[0x0a, 0, 0, 0, 1, 0, 2, 0xff, 0xfe])),
            Err(ProtocolError::Malformed("a string that is not UTF-8"))
        ));
        assert!(matches!(ClientFrame::parse(Bytes::from_static(&[0x0d, 0x00])), Err(ProtocolError::Malformed(_))));
        let mut settle = vec![0x07];
        settle.extend_from_slice(&[0; 16]);
        settle.push(4);
        assert!(matches!(
            ClientFrame::parse(Bytes::from(settle)),
            Err(ProtocolError::Malformed("an unknown settle outcome"))
        ));
        assert!(matches!(
            ClientFrame::parse(Bytes::from_static(&[0x05, 0, 0, 0, 1, 0, 1, b'q', 0, 0, 0, 1, 7])),
            Err(ProtocolError::Malformed("a flag other than 0 or 1"))
        ));
    }

    #[test]
    fn the_document_shows_the_bytes_this_build_writes() {
        let document = include_str!("../../docs/protocol.md");
        let hex = |frame: &ClientFrame| {
            let mut dst = BytesMut::new();
            frame.encode(&mut dst);
            dst.iter().map(|byte| format!("{byte:02x}")).collect::<Vec<_>>().join(" ")
        };
        let hello = hex(&ClientFrame::Hello { version: PROTOCOL_VERSION, token: "s3cret".into(), name: "w1".into() });
        let consume = hex(&ClientFrame::Consume { req: 1, queue: "Calculator".into(), prefetch: 64, auto_ack: false });
        assert!(document.contains(&hello), "docs/protocol.md must show Hello as {hello}");
        assert!(document.contains(&consume), "docs/protocol.md must show Consume as {consume}");
    }

    proptest::proptest! {
        #[test]
        fn random_frames_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = ClientFrame::parse(Bytes::from(bytes.clone()));
            let _ = ServerFrame::parse(Bytes::from(bytes.clone()));
            let _ = FrameCodec::new(1 << 20).decode(&mut BytesMut::from(&bytes[..]));
        }
    }
}
