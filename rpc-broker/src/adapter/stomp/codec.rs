//! STOMP 1.2 frames on a byte stream: a [`tokio_util::codec`] decoder and encoder.
//!
//! A frame is a command line, header lines `name:value`, a blank line, the body and a NUL byte; lines end with
//! LF or CR LF. A body with a `content-length` header is exactly that many bytes, NUL bytes included (binary
//! MessagePack bodies have them); a body without one ends at the first NUL. End-of-lines between frames are
//! heart-beats ([`Item::Heartbeat`]).
//!
//! The bytes come from a server, so nothing is allocated before it is checked against [`Limits`]: a header
//! block that grows past [`Limits::max_header_bytes`] without its blank line fails as soon as it does; a body
//! whose `content-length` is past [`Limits::max_frame_bytes`] is read and dropped as it comes, and the frame is
//! handed out with its headers and no body ([`Frame::oversized`]), so that the message it carries can be
//! settled rather than delivered again to a reader that cannot take it; a body without a `content-length` that
//! grows past the limit without a NUL fails (its end cannot be found). Bytes that arrive a few at a time are each searched once.
//! The encoder holds frames to the same limits, so that a codec with them reads what it writes.
//!
//! Header names and values are UTF-8 and unescaped (`\r`, `\n`, `\c` for a colon, `\\`; any other escape is
//! an error), except in CONNECT and CONNECTED frames, which the spec leaves unescaped. A repeated header keeps
//! every occurrence; [`Frame::get`] returns the first, which is the one that counts.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// A STOMP 1.2 command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    /// Client: opens a session.
    Connect,
    /// Client: opens a session (the 1.2 name of CONNECT).
    Stomp,
    /// Client: a message for a destination.
    Send,
    /// Client: starts a subscription.
    Subscribe,
    /// Client: ends a subscription.
    Unsubscribe,
    /// Client: acknowledges a message.
    Ack,
    /// Client: gives a message back.
    Nack,
    /// Client: starts a transaction.
    Begin,
    /// Client: commits a transaction.
    Commit,
    /// Client: rolls a transaction back.
    Abort,
    /// Client: ends the session.
    Disconnect,
    /// Server: the session is open.
    Connected,
    /// Server: a message of a subscription.
    Message,
    /// Server: a frame with a `receipt` header was handled.
    Receipt,
    /// Server: something went wrong; the server closes the connection after it.
    Error,
}

impl Command {
    const ALL: [Command; 15] = [
        Command::Connect,
        Command::Stomp,
        Command::Send,
        Command::Subscribe,
        Command::Unsubscribe,
        Command::Ack,
        Command::Nack,
        Command::Begin,
        Command::Commit,
        Command::Abort,
        Command::Disconnect,
        Command::Connected,
        Command::Message,
        Command::Receipt,
        Command::Error,
    ];

    /// The command as it is written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Connect => "CONNECT",
            Command::Stomp => "STOMP",
            Command::Send => "SEND",
            Command::Subscribe => "SUBSCRIBE",
            Command::Unsubscribe => "UNSUBSCRIBE",
            Command::Ack => "ACK",
            Command::Nack => "NACK",
            Command::Begin => "BEGIN",
            Command::Commit => "COMMIT",
            Command::Abort => "ABORT",
            Command::Disconnect => "DISCONNECT",
            Command::Connected => "CONNECTED",
            Command::Message => "MESSAGE",
            Command::Receipt => "RECEIPT",
            Command::Error => "ERROR",
        }
    }

    fn parse(text: &[u8]) -> Option<Command> {
        Command::ALL.into_iter().find(|command| command.as_str().as_bytes() == text)
    }

    /// Whether the frame's headers are escaped: all but CONNECT and CONNECTED (and STOMP, its alias).
    fn escapes(self) -> bool {
        !matches!(self, Command::Connect | Command::Stomp | Command::Connected)
    }
}

/// One STOMP frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The command.
    pub command: Command,
    /// The headers in their order, unescaped; a repeated name keeps each occurrence.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Bytes,
}

impl Frame {
    /// A frame of `command` without headers or body.
    pub fn new(command: Command) -> Frame {
        Frame { command, headers: Vec::new(), body: Bytes::new() }
    }

    /// Adds header `name` with `value`.
    #[must_use]
    pub fn header(mut self, name: &str, value: &str) -> Frame {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// The value of header `name`: its first occurrence, the one the spec says counts.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }

    /// The `content-length` of a body the decoder dropped because it was past [`Limits::max_frame_bytes`]: the
    /// frame came with its headers only. `None` for a frame read whole.
    pub fn oversized(&self) -> Option<u64> {
        let length = self.get("content-length")?.parse::<u64>().ok()?;
        (length != self.body.len() as u64).then_some(length)
    }
}

/// What the decoder reads and the encoder writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// A frame.
    Frame(Frame),
    /// An end-of-line between frames: a heart-beat.
    Heartbeat,
}

/// Size limits on the frames a [`StompCodec`] reads and writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The largest body read or written. Default 16 MiB + 64 KiB: the envelope's limit and room for what of
    /// it travels in the body.
    pub max_frame_bytes: usize,
    /// The largest command line and header block (its blank line included) read or written. Default 64 KiB.
    pub max_header_bytes: usize,
    /// The most header lines read or written, a `content-length` the encoder adds included. Default 128.
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_frame_bytes: 16 * 1024 * 1024 + 64 * 1024, max_header_bytes: 64 * 1024, max_headers: 128 }
    }
}

/// A frame that could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// A body read or written over [`Limits::max_frame_bytes`].
    #[error("a frame body of {size} bytes is over the limit of {limit}")]
    FrameTooLarge {
        /// The size found, or at least reached.
        size: u64,
        /// The limit.
        limit: usize,
    },
    /// A command line and headers over [`Limits::max_header_bytes`].
    #[error("frame headers over the limit of {limit} bytes")]
    HeadersTooLarge {
        /// The limit.
        limit: usize,
    },
    /// More header lines than [`Limits::max_headers`].
    #[error("more than {limit} frame headers")]
    TooManyHeaders {
        /// The limit.
        limit: usize,
    },
    /// A command line that is no STOMP 1.2 command.
    #[error("unknown stomp command `{0}`")]
    UnknownCommand(String),
    /// A header line without a colon.
    #[error("header line `{0}` has no colon")]
    BadHeader(String),
    /// A backslash not followed by `r`, `n`, `c` or a backslash.
    #[error("undefined escape in header `{0}`")]
    BadEscape(String),
    /// A command or header that is not UTF-8.
    #[error("a frame's command or header is not utf-8")]
    NotUtf8,
    /// A `content-length` that is not a decimal number (digits only) that fits in 64 bits.
    #[error("content-length `{0}` is not a length")]
    BadContentLength(String),
    /// The `content-length` bytes of a body not followed by a NUL.
    #[error("a body of content-length {0} is not followed by a nul byte")]
    MissingNul(usize),
    /// A header that a CONNECT or CONNECTED frame cannot carry (they are not escaped): a line break, or a
    /// colon in a name.
    #[error("header `{0}` cannot be written unescaped in a {1} frame")]
    Unrepresentable(String, &'static str),
    /// The stream failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A frame whose command line and headers are read, waiting for its body.
#[derive(Debug)]
struct Pending {
    frame: Frame,
    /// Bytes of the command line, the headers and the blank line.
    head: usize,
    /// The body's `content-length`, if it has one.
    length: Option<usize>,
    /// Body bytes already searched for a NUL (bodies without a length).
    scanned: usize,
    /// Bytes still to drop of a body past the limit.
    skip: Option<u64>,
}

/// How far the search for the blank line that ends a header block has gone, kept between calls so that
/// bytes arriving one at a time are each looked at once.
#[derive(Debug, Default)]
struct HeadScan {
    /// Where the line being read starts.
    line: usize,
    /// Bytes already searched for a line feed.
    scanned: usize,
}

impl HeadScan {
    /// Where the header block at the start of `src` ends (one past its blank line), if it is there. `src` is
    /// the same buffer as in the previous calls, grown at its end.
    fn end(&mut self, src: &[u8]) -> Option<usize> {
        while let Some(at) = src[self.scanned..].iter().position(|byte| *byte == b'\n') {
            let feed = self.scanned + at;
            let line = &src[self.line..feed];
            // The command line is never empty (heart-beats are taken off first), so an empty line ends the headers.
            if self.line > 0 && (line.is_empty() || line == b"\r") {
                *self = HeadScan::default();
                return Some(feed + 1);
            }
            self.line = feed + 1;
            self.scanned = feed + 1;
        }
        self.scanned = src.len();
        None
    }
}

/// The STOMP 1.2 codec: decodes [`Item`]s from a server's bytes and encodes them for it.
#[derive(Debug)]
pub struct StompCodec {
    limits: Limits,
    scan: HeadScan,
    pending: Option<Pending>,
}

impl StompCodec {
    /// A codec that holds frames to `limits`.
    pub fn new(limits: Limits) -> StompCodec {
        StompCodec { limits, scan: HeadScan::default(), pending: None }
    }

    /// Reads a frame's command line and headers from `src`, once the blank line that ends them is there.
    fn head(&mut self, src: &[u8]) -> Result<Option<Pending>, FrameError> {
        let limit = self.limits.max_header_bytes;
        let Some(head) = self.scan.end(&src[..src.len().min(limit.saturating_add(1))]) else {
            return if src.len() > limit { Err(FrameError::HeadersTooLarge { limit }) } else { Ok(None) };
        };
        if head > limit {
            return Err(FrameError::HeadersTooLarge { limit });
        }
        let mut lines = src[..head].split(|byte| *byte == b'\n').map(|line| line.strip_suffix(b"\r").unwrap_or(line));
        let command_line = lines.next().unwrap_or_default();
        let command = Command::parse(command_line)
            .ok_or_else(|| FrameError::UnknownCommand(String::from_utf8_lossy(command_line).into_owned()))?;
        let mut frame = Frame::new(command);
        for line in lines.filter(|line| !line.is_empty()) {
            if frame.headers.len() == self.limits.max_headers {
                return Err(FrameError::TooManyHeaders { limit: self.limits.max_headers });
            }
            let line = std::str::from_utf8(line).map_err(|_| FrameError::NotUtf8)?;
            let (name, value) = line.split_once(':').ok_or_else(|| FrameError::BadHeader(line.to_owned()))?;
            let header = match command.escapes() {
                true => (unescape(name)?, unescape(value)?),
                false => (name.to_owned(), value.to_owned()),
            };
            frame.headers.push(header);
        }
        let (length, skip) = match frame.get("content-length") {
            Some(text) => {
                let size = text
                    .bytes()
                    .all(|byte| byte.is_ascii_digit())
                    .then(|| text.parse::<u64>().ok())
                    .flatten()
                    .ok_or_else(|| FrameError::BadContentLength(text.to_owned()))?;
                let limit = self.limits.max_frame_bytes;
                match usize::try_from(size).ok().filter(|length| *length <= limit) {
                    // The body's end and its NUL must also be indices, whatever the limits.
                    Some(length) if head.checked_add(length).is_some_and(|end| end < usize::MAX) => {
                        (Some(length), None)
                    }
                    Some(_) => return Err(FrameError::FrameTooLarge { size, limit }),
                    None => (None, Some(size)),
                }
            }
            None => (None, None),
        };
        Ok(Some(Pending { frame, head, length, scanned: 0, skip }))
    }
}

fn unescape(text: &str) -> Result<String, FrameError> {
    if !text.contains('\\') {
        return Ok(text.to_owned());
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        out.push(match chars.next() {
            Some('r') => '\r',
            Some('n') => '\n',
            Some('c') => ':',
            Some('\\') => '\\',
            _ => return Err(FrameError::BadEscape(text.to_owned())),
        });
    }
    Ok(out)
}

/// Writes `text` with STOMP's header escapes. The escaped characters are ASCII, which no byte of a longer UTF-8
/// sequence equals, so the runs between them are copied as bytes, whole.
fn escape(text: &str, out: &mut BytesMut) {
    let bytes = text.as_bytes();
    let mut run = 0;
    for (at, byte) in bytes.iter().enumerate() {
        let escaped: &[u8] = match byte {
            b'\r' => b"\\r",
            b'\n' => b"\\n",
            b':' => b"\\c",
            b'\\' => b"\\\\",
            _ => continue,
        };
        out.put_slice(&bytes[run..at]);
        out.put_slice(escaped);
        run = at + 1;
    }
    out.put_slice(&bytes[run..]);
}

impl Decoder for StompCodec {
    type Item = Item;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Item>, FrameError> {
        if self.pending.is_none() {
            if src.starts_with(b"\n") {
                src.advance(1);
                self.scan = HeadScan::default();
                return Ok(Some(Item::Heartbeat));
            }
            if src.starts_with(b"\r\n") {
                src.advance(2);
                self.scan = HeadScan::default();
                return Ok(Some(Item::Heartbeat));
            }
            if src.as_ref() == b"\r" {
                return Ok(None);
            }
            match self.head(src)? {
                Some(pending) => self.pending = Some(pending),
                None => return Ok(None),
            }
        }
        let Some(pending) = self.pending.as_mut() else { return Ok(None) };
        if let Some(left) = pending.skip {
            // A body past the limit: dropped as it arrives, never held.
            src.advance(std::mem::take(&mut pending.head));
            let dropped = usize::try_from(left).unwrap_or(usize::MAX).min(src.len());
            src.advance(dropped);
            let left = left - dropped as u64;
            pending.skip = Some(left);
            if left > 0 || src.is_empty() {
                return Ok(None);
            }
            if src[0] != 0 {
                let size = pending.frame.oversized().unwrap_or(u64::MAX);
                return Err(FrameError::MissingNul(usize::try_from(size).unwrap_or(usize::MAX)));
            }
            src.advance(1);
            return Ok(self.pending.take().map(|pending| Item::Frame(pending.frame)));
        }
        let body_end = match pending.length {
            Some(length) => {
                let end = pending.head + length;
                if src.len() <= end {
                    src.reserve(end + 1 - src.len());
                    return Ok(None);
                }
                if src[end] != 0 {
                    return Err(FrameError::MissingNul(length));
                }
                end
            }
            None => {
                let from = pending.head + pending.scanned;
                match src[from..].iter().position(|byte| *byte == 0) {
                    Some(at) => from + at,
                    None => {
                        pending.scanned = src.len() - pending.head;
                        let limit = self.limits.max_frame_bytes;
                        if pending.scanned > limit {
                            return Err(FrameError::FrameTooLarge { size: pending.scanned as u64, limit });
                        }
                        return Ok(None);
                    }
                }
            }
        };
        let Some(Pending { mut frame, head, .. }) = self.pending.take() else { return Ok(None) };
        src.advance(head);
        frame.body = src.split_to(body_end - head).freeze();
        src.advance(1);
        Ok(Some(Item::Frame(frame)))
    }
}

impl Encoder<Item> for StompCodec {
    type Error = FrameError;

    fn encode(&mut self, item: Item, dst: &mut BytesMut) -> Result<(), FrameError> {
        match item {
            Item::Heartbeat => {
                dst.put_u8(b'\n');
                Ok(())
            }
            Item::Frame(frame) => self.encode(&frame, dst),
        }
    }
}

impl Encoder<&Frame> for StompCodec {
    type Error = FrameError;

    /// Writes `frame`, with a `content-length` of its body when it has one (any `content-length` among its
    /// headers is left out, so that it is never wrong). A frame refused writes nothing.
    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        let limit = self.limits.max_frame_bytes;
        if frame.body.len() > limit {
            return Err(FrameError::FrameTooLarge { size: frame.body.len() as u64, limit });
        }
        let written = frame.headers.iter().filter(|(name, _)| name != "content-length").count();
        let lines = written + usize::from(!frame.body.is_empty());
        if lines > self.limits.max_headers {
            return Err(FrameError::TooManyHeaders { limit: self.limits.max_headers });
        }
        let start = dst.len();
        dst.put_slice(frame.command.as_str().as_bytes());
        dst.put_u8(b'\n');
        for (name, value) in frame.headers.iter().filter(|(name, _)| name != "content-length") {
            if frame.command.escapes() {
                escape(name, dst);
                dst.put_u8(b':');
                escape(value, dst);
            } else {
                let breaks = |text: &str| text.contains(['\r', '\n']);
                if breaks(name) || breaks(value) || name.contains(':') {
                    dst.truncate(start);
                    return Err(FrameError::Unrepresentable(name.clone(), frame.command.as_str()));
                }
                dst.put_slice(name.as_bytes());
                dst.put_u8(b':');
                dst.put_slice(value.as_bytes());
            }
            dst.put_u8(b'\n');
        }
        if !frame.body.is_empty() {
            dst.put_slice(format!("content-length:{}\n", frame.body.len()).as_bytes());
        }
        dst.put_u8(b'\n');
        if dst.len() - start > self.limits.max_header_bytes {
            dst.truncate(start);
            return Err(FrameError::HeadersTooLarge { limit: self.limits.max_header_bytes });
        }
        dst.put_slice(&frame.body);
        dst.put_u8(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn decode_all(codec: &mut StompCodec, bytes: &[u8]) -> Result<Vec<Item>, FrameError> {
        let mut src = BytesMut::from(bytes);
        let mut items = Vec::new();
        while let Some(item) = codec.decode(&mut src)? {
            items.push(item);
        }
        Ok(items)
    }

    /// Feeds `bytes` one at a time, as a slow socket would.
    fn decode_bytewise(bytes: &[u8]) -> Result<Vec<Item>, FrameError> {
        let mut codec = StompCodec::new(Limits::default());
        let mut src = BytesMut::new();
        let mut items = Vec::new();
        for byte in bytes {
            src.put_u8(*byte);
            while let Some(item) = codec.decode(&mut src)? {
                items.push(item);
            }
        }
        Ok(items)
    }

    fn encode(frame: &Frame) -> BytesMut {
        let mut dst = BytesMut::new();
        StompCodec::new(Limits::default()).encode(frame, &mut dst).expect("encodes");
        dst
    }

    fn frame(item: &Item) -> &Frame {
        match item {
            Item::Frame(frame) => frame,
            Item::Heartbeat => panic!("a heart-beat, not a frame"),
        }
    }

    #[test]
    fn the_specs_connected_and_message_frames_read_with_heart_beats_between() {
        let bytes =
            b"CONNECTED\nversion:1.2\nheart-beat:0,0\n\n\0\n\r\nMESSAGE\r\nsubscription:0\r\nmessage-id:007\r\n\
destination:/queue/a\r\ncontent-type:text/plain\r\n\r\nhello queue a\0";
        let items = decode_all(&mut StompCodec::new(Limits::default()), bytes).expect("reads");
        assert_eq!(items.len(), 4);
        assert_eq!(frame(&items[0]).command, Command::Connected);
        assert_eq!(frame(&items[0]).get("version"), Some("1.2"));
        assert_eq!(&items[1..3], [Item::Heartbeat, Item::Heartbeat]);
        let message = frame(&items[3]);
        assert_eq!((message.command, message.get("message-id")), (Command::Message, Some("007")));
        assert_eq!(message.body, Bytes::from_static(b"hello queue a"));
        assert_eq!(decode_bytewise(bytes).expect("reads byte by byte"), items);
    }

    #[test]
    fn a_body_with_nul_bytes_travels_by_content_length() {
        let mut send = Frame::new(Command::Send).header("destination", "/queue/q");
        send.body = Bytes::from_static(b"\x82\xa1a\x00\x00\xa1b\0");
        let bytes = encode(&send);
        assert!(bytes.starts_with(b"SEND\ndestination:/queue/q\ncontent-length:8\n\n"));
        let items = decode_all(&mut StompCodec::new(Limits::default()), &bytes).expect("reads");
        let back = frame(&items[0]);
        assert_eq!(back.body, send.body);
        assert_eq!(back.get("content-length"), Some("8"), "kept as received");
    }

    #[test]
    fn headers_are_escaped_except_in_connect_frames() {
        let send = Frame::new(Command::Send).header("a:b", "line\none\r\\two:x");
        let bytes = encode(&send);
        assert!(bytes.starts_with(b"SEND\na\\cb:line\\none\\r\\\\two\\cx\n\n\0"), "{bytes:?}");
        assert_eq!(decode_all(&mut StompCodec::new(Limits::default()), &bytes).expect("reads"), [Item::Frame(send)]);
        // CONNECT is not escaped: a backslash is itself, and a value may hold a colon.
        let items =
            decode_all(&mut StompCodec::new(Limits::default()), b"CONNECT\npasscode:a\\c:b\n\n\0").expect("reads");
        assert_eq!(frame(&items[0]).get("passcode"), Some("a\\c:b"));
        let mut dst = BytesMut::new();
        let refused =
            StompCodec::new(Limits::default()).encode(&Frame::new(Command::Connect).header("login", "a\nb"), &mut dst);
        assert!(matches!(refused, Err(FrameError::Unrepresentable(name, "CONNECT")) if name == "login"));
        assert!(dst.is_empty(), "nothing written of a refused frame");
    }

    #[test]
    fn the_first_of_a_repeated_header_counts() {
        let items =
            decode_all(&mut StompCodec::new(Limits::default()), b"MESSAGE\nfoo:World\nfoo:Hello\n\n\0").expect("reads");
        assert_eq!(frame(&items[0]).get("foo"), Some("World"));
        assert_eq!(frame(&items[0]).headers.len(), 2);
    }

    #[test]
    fn bad_frames_are_typed_errors() {
        type Check = fn(&FrameError) -> bool;
        let cases: [(&[u8], Check); 9] = [
            (b"SNED\n\n\0", |error| matches!(error, FrameError::UnknownCommand(command) if command == "SNED")),
            (b"SEND\nno colon\n\n\0", |error| matches!(error, FrameError::BadHeader(_))),
            (b"SEND\na:\\t\n\n\0", |error| matches!(error, FrameError::BadEscape(_))),
            (b"SEND\na:b\\\n\n\0", |error| matches!(error, FrameError::BadEscape(_))),
            (b"SEND\ncontent-length:x\n\n\0", |error| matches!(error, FrameError::BadContentLength(_))),
            (b"SEND\ncontent-length:+1\n\nx\0", |error| matches!(error, FrameError::BadContentLength(_))),
            (b"SEND\ncontent-length: 1\n\nx\0", |error| matches!(error, FrameError::BadContentLength(_))),
            (b"SEND\ncontent-length:99999999999999999999\n\n", |error| {
                matches!(error, FrameError::BadContentLength(_))
            }),
            (b"SEND\ncontent-length:2\n\nabc\0", |error| matches!(error, FrameError::MissingNul(2))),
        ];
        for (bytes, expected) in cases {
            let error = decode_all(&mut StompCodec::new(Limits::default()), bytes).expect_err("refused");
            assert!(expected(&error), "{:?}: {error}", String::from_utf8_lossy(bytes));
        }
        let error = decode_all(&mut StompCodec::new(Limits::default()), b"SEND\na:\xff\n\n\0").expect_err("refused");
        assert!(matches!(error, FrameError::NotUtf8));
    }

    #[test]
    fn limits_are_checked_before_the_bytes_arrive() {
        let limits = Limits { max_frame_bytes: 100, max_header_bytes: 64, max_headers: 2 };
        // A body past the limit is dropped as it comes, bytes at a time; the frame comes with its headers only,
        // and the next frame after it.
        let mut oversized = b"MESSAGE\nack:1\ncontent-length:150\n\n".to_vec();
        oversized.extend([7; 150]);
        oversized.extend(b"\0MESSAGE\nack:2\n\nok\0");
        let mut codec = StompCodec::new(limits.clone());
        let mut src = BytesMut::new();
        let mut items = Vec::new();
        for chunk in oversized.chunks(7) {
            src.extend_from_slice(chunk);
            while let Some(item) = codec.decode(&mut src).expect("reads") {
                items.push(item);
            }
            assert!(src.len() <= 64 + 7, "{} bytes held", src.len());
        }
        let [Item::Frame(first), Item::Frame(second)] = items.as_slice() else { panic!("{items:?}") };
        assert_eq!((first.get("ack"), first.body.len(), first.oversized()), (Some("1"), 0, Some(150)));
        assert_eq!((second.get("ack"), &second.body[..], second.oversized()), (Some("2"), &b"ok"[..], None));
        // A terabyte is dropped the same way, without waiting for it to be held; its NUL must follow it.
        let mut codec = StompCodec::new(limits.clone());
        let mut src = BytesMut::from(&b"SEND\ncontent-length:1000000000000\n\nxyz"[..]);
        assert_eq!(codec.decode(&mut src).expect("reads"), None);
        assert!(src.is_empty());
        let error = decode_all(&mut StompCodec::new(limits.clone()), b"SEND\ncontent-length:101\n\n")
            .map(|items| items.is_empty());
        assert!(matches!(error, Ok(true)));
        // A header block past its limit with no blank line yet.
        let error = decode_all(&mut StompCodec::new(limits.clone()), &[b'a'; 65]).expect_err("refused");
        assert!(matches!(error, FrameError::HeadersTooLarge { limit: 64 }));
        let error =
            decode_all(&mut StompCodec::new(limits.clone()), b"SEND\na:1\nb:2\nc:3\n\n\0").expect_err("refused");
        assert!(matches!(error, FrameError::TooManyHeaders { limit: 2 }));
        // A body without a length that grows past the limit with no NUL.
        let mut unended = b"SEND\n\n".to_vec();
        unended.extend([b'x'; 101]);
        let error = decode_all(&mut StompCodec::new(limits.clone()), &unended).expect_err("refused");
        assert!(matches!(error, FrameError::FrameTooLarge { size: 101, limit: 100 }));
        // Limits as large as they go: a content-length whose end is past any index still fails, not overflows.
        let unlimited = Limits { max_frame_bytes: usize::MAX, max_header_bytes: usize::MAX, max_headers: usize::MAX };
        let huge = format!("SEND\ncontent-length:{}\n\n", usize::MAX - 1);
        let error = decode_all(&mut StompCodec::new(unlimited), huge.as_bytes()).expect_err("refused");
        assert!(matches!(error, FrameError::FrameTooLarge { limit: usize::MAX, .. }), "{error}");
    }

    #[test]
    fn nothing_is_written_that_the_limits_would_not_read() {
        let limits = Limits { max_frame_bytes: 100, max_header_bytes: 64, max_headers: 2 };
        let refused = |frame: &Frame| {
            let mut dst = BytesMut::from(&b"\n"[..]);
            let error = StompCodec::new(limits.clone()).encode(frame, &mut dst).expect_err("refused");
            assert_eq!(dst, b"\n"[..], "nothing written of a refused frame");
            error
        };
        let mut big = Frame::new(Command::Send);
        big.body = Bytes::from(vec![0; 101]);
        assert!(matches!(refused(&big), FrameError::FrameTooLarge { size: 101, limit: 100 }));
        // Two headers and the content-length the encoder adds are three lines.
        let mut three = Frame::new(Command::Send).header("a", "1").header("b", "2");
        three.body = Bytes::from_static(b"x");
        assert!(matches!(refused(&three), FrameError::TooManyHeaders { limit: 2 }));
        // 60 bytes of value, escaped to 120.
        let long = Frame::new(Command::Send).header("a", &":".repeat(60));
        assert!(matches!(refused(&long), FrameError::HeadersTooLarge { limit: 64 }));
        // "SEND\n", "a:" and 37 bytes and "\n", "content-length:100\n", "\n": 65 bytes of head.
        let mut over = Frame::new(Command::Send).header("a", &"v".repeat(37));
        over.body = Bytes::from(vec![7; 100]);
        assert!(matches!(refused(&over), FrameError::HeadersTooLarge { limit: 64 }));
        // Right at the limits: 64 bytes of head, two lines, a body of 100 bytes.
        let mut edge = Frame::new(Command::Send).header("a", &"v".repeat(36));
        edge.body = Bytes::from(vec![7; 100]);
        let mut bytes = BytesMut::new();
        StompCodec::new(limits.clone()).encode(&edge, &mut bytes).expect("encodes");
        assert_eq!(bytes.len(), 64 + 100 + 1);
        let items = decode_all(&mut StompCodec::new(limits), &bytes).expect("reads");
        assert_eq!(frame(&items[0]).body, edge.body);
    }

    #[test]
    fn a_header_block_arriving_byte_by_byte_is_searched_once() {
        let bytes = b"MESSAGE\r\ndestination:/queue/a\r\nmessage-id:1\r\n\r\nbody\0";
        let head = bytes.len() - b"body\0".len();
        let mut codec = StompCodec::new(Limits::default());
        let mut src = BytesMut::new();
        for byte in &bytes[..head - 1] {
            src.put_u8(*byte);
            assert_eq!(codec.decode(&mut src).expect("reads"), None);
            assert_eq!(codec.scan.scanned, src.len(), "every byte searched, none twice");
        }
        src.put_slice(&bytes[head - 1..]);
        let items = decode_all(&mut codec, &src).expect("reads");
        assert_eq!(frame(&items[0]).get("message-id"), Some("1"));
        assert_eq!(frame(&items[0]).body, Bytes::from_static(b"body"));
    }

    fn command() -> impl Strategy<Value = Command> {
        proptest::sample::select(Command::ALL.to_vec())
    }

    /// Any bytes; a SEND frame's head of the bytes that matter to it; an encoded frame with bytes changed.
    fn server_bytes() -> impl Strategy<Value = Vec<u8>> {
        let special = prop_oneof![Just(b'\n'), Just(b'\r'), Just(b':'), Just(b'\\'), Just(0), Just(b'a')];
        let mutated = (
            proptest::collection::vec(any::<u8>(), 0..32),
            proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 1..4),
        )
            .prop_map(|(body, changes)| {
                let mut message =
                    Frame::new(Command::Message).header("destination", "/queue/a").header("subscription", "0");
                message.body = Bytes::from(body);
                let mut bytes = encode(&message).to_vec();
                for (at, byte) in changes {
                    let at = at.index(bytes.len());
                    bytes[at] = byte;
                }
                bytes
            });
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..96),
            proptest::collection::vec(special, 0..48).prop_map(|tail| [&b"SEND\n"[..], &tail].concat()),
            mutated,
        ]
    }

    /// `item` without its `content-length` headers, which the encoder writes of its own.
    fn without_length(item: Item) -> Item {
        match item {
            Item::Frame(mut frame) => {
                frame.headers.retain(|(name, _)| name != "content-length");
                Item::Frame(frame)
            }
            heartbeat => heartbeat,
        }
    }

    proptest! {
        /// Any frame encodes and decodes back to itself, whole or byte by byte, with a heart-beat around it
        /// (the content-length the encoder adds aside).
        #[test]
        fn frames_round_trip(
            command in command(),
            headers in proptest::collection::vec(("[^\r\n:]{0,8}|(?s).{0,8}", "(?s).{0,16}"), 0..8),
            body in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut frame = Frame::new(command);
            for (name, value) in headers {
                let breaks = name.contains([':', '\r', '\n']) || value.contains(['\r', '\n']);
                if name == "content-length" || (breaks && !command.escapes()) {
                    continue;
                }
                frame.headers.push((name, value));
            }
            frame.body = Bytes::from(body);
            let mut bytes = BytesMut::from(&b"\n"[..]);
            StompCodec::new(Limits::default()).encode(&frame, &mut bytes).expect("encodes");
            bytes.put_slice(b"\r\n");
            let strip = |items: Vec<Item>| items.into_iter().map(without_length).collect::<Vec<_>>();
            let whole = decode_all(&mut StompCodec::new(Limits::default()), &bytes).expect("decodes");
            let expected = vec![Item::Heartbeat, Item::Frame(frame), Item::Heartbeat];
            prop_assert_eq!(strip(whole), expected.clone());
            prop_assert_eq!(strip(decode_bytewise(&bytes).expect("decodes byte by byte")), expected);
        }

        /// Any bytes, or an encoded frame with some of its bytes changed: the same items or the same error
        /// whole and byte by byte, and what reads writes back to itself (what a CONNECT frame cannot carry
        /// aside).
        #[test]
        fn any_bytes_read_the_same_whole_and_byte_by_byte(bytes in server_bytes()) {
            let whole = decode_all(&mut StompCodec::new(Limits::default()), &bytes).map_err(|error| error.to_string());
            prop_assert_eq!(&whole, &decode_bytewise(&bytes).map_err(|error| error.to_string()));
            for item in whole.unwrap_or_default() {
                let mut again = BytesMut::new();
                if StompCodec::new(Limits::default()).encode(item.clone(), &mut again).is_err() {
                    continue;
                }
                let back = decode_all(&mut StompCodec::new(Limits::default()), &again).expect("what is written reads");
                prop_assert_eq!(back.into_iter().map(without_length).collect::<Vec<_>>(), vec![without_length(item)]);
            }
        }
    }
}
