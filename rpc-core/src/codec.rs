//! Encoding and decoding with limits: every untrusted byte string is size-checked and structure-checked by
//! our own non-recursive scanner before serde sees it.
//!
//! The scanner walks the MessagePack once, iteratively, and rejects truncated input, trailing bytes, the
//! reserved marker `0xc1`, container lengths larger than the bytes left, and nesting deeper than
//! [`Limits::max_depth`]. rmp-serde's own depth limit can be bypassed (a recursive enum 30,000 levels deep
//! aborts the process), so it is not relied on.
//!
//! Envelopes, which every message carries, are written and read by hand in one pass instead (no serde, the
//! body shared with the input where it is [`Bytes`]); the tests check the bytes against what serde writes for
//! the field table of docs/wire-format.md, and that both read back alike.

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::envelope::Envelope;

/// Default largest frame, envelope or body: 16 MiB.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// Default deepest nesting of MessagePack containers.
pub const DEFAULT_MAX_DEPTH: usize = 64;

/// Limits applied before decoding untrusted bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest input in bytes.
    pub max_frame: usize,
    /// Deepest nesting of arrays and maps.
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { max_frame: DEFAULT_MAX_FRAME, max_depth: DEFAULT_MAX_DEPTH }
    }
}

/// Why bytes could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The input is longer than [`Limits::max_frame`].
    #[error("{len} bytes is over the {max}-byte limit")]
    TooLarge {
        /// The input's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Containers nest deeper than [`Limits::max_depth`].
    #[error("nesting is deeper than {max} levels")]
    TooDeep {
        /// The limit.
        max: usize,
    },
    /// The bytes are not one well-formed MessagePack value.
    #[error("malformed MessagePack: {0}")]
    Malformed(&'static str),
    /// The envelope's version is not one this build reads.
    #[error("envelope version {0} is not supported; this build reads version 1")]
    Version(u8),
    /// Well-formed MessagePack of the wrong shape.
    #[error("cannot decode: {0}")]
    Decode(String),
    /// A value could not be serialized.
    #[error("cannot encode: {0}")]
    Encode(String),
}

/// Encodes `value` as MessagePack with structs as maps keyed by field name.
///
/// # Errors
/// [`CodecError::Encode`] when serialization fails (a map with non-string keys is fine; a failing `Serialize`
/// implementation is not).
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Bytes, CodecError> {
    with_scratch(|out| {
        rmp_serde::encode::write_named(out, value).map_err(|error| CodecError::Encode(error.to_string()))
    })
}

/// Runs `write` on this thread's scratch buffer and returns what it wrote in one allocation of its exact size.
///
/// A `Vec` written in place and turned into [`Bytes`] costs two allocations (the vector, grown as it goes, then
/// the shared header `Bytes` needs for a vector with spare capacity); every call and every reply is encoded,
/// so the buffer is kept instead. It keeps at most [`SCRATCH_KEEP`] bytes between uses; a `write` that encodes
/// again on the same thread (a `Serialize` implementation that calls [`encode`]) gets a buffer of its own.
fn with_scratch(write: impl FnOnce(&mut Vec<u8>) -> Result<(), CodecError>) -> Result<Bytes, CodecError> {
    SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut out) => {
            out.clear();
            let written = write(&mut out).map(|()| Bytes::copy_from_slice(&out));
            if out.capacity() > SCRATCH_KEEP {
                *out = Vec::new();
            }
            written
        }
        Err(_) => {
            let mut out = Vec::new();
            write(&mut out)?;
            Ok(Bytes::from(out))
        }
    })
}

/// The largest scratch buffer kept between encodings: a larger one is freed after its use.
const SCRATCH_KEEP: usize = 64 * 1024;

thread_local! {
    /// The buffer of [`with_scratch`].
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Checks `bytes` against `limits`, then decodes one value from them.
///
/// # Errors
/// [`CodecError::TooLarge`], [`CodecError::TooDeep`] or [`CodecError::Malformed`] from the checks, then
/// [`CodecError::Decode`] when the value has the wrong shape.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], limits: &Limits) -> Result<T, CodecError> {
    check(bytes, limits)?;
    rmp_serde::from_slice(bytes).map_err(|error| CodecError::Decode(error.to_string()))
}

/// Encodes an envelope (docs/wire-format.md), written by hand and returned in one allocation of its exact size.
///
/// # Errors
/// [`CodecError::Encode`] for a string, body or header map longer than MessagePack can carry (4 GiB).
pub fn encode_envelope(envelope: &Envelope) -> Result<Bytes, CodecError> {
    with_scratch(|out| envelope_codec::encode_into(out, envelope))
}

/// The bytes `prefix` followed by the encoding of `envelope` (as [`encode_envelope`]), in one allocation of
/// their exact size: a transport's own header before the envelope, say.
///
/// # Errors
/// As [`encode_envelope`].
pub fn encode_envelope_after(prefix: &[u8], envelope: &Envelope) -> Result<Bytes, CodecError> {
    with_scratch(|out| {
        out.extend_from_slice(prefix);
        envelope_codec::encode_into(out, envelope)
    })
}

/// Appends the encoding of `envelope` to `out` (as [`encode_envelope`]), after whatever `out` holds: a frame
/// header, say.
///
/// # Errors
/// As [`encode_envelope`].
pub fn encode_envelope_into(out: &mut Vec<u8>, envelope: &Envelope) -> Result<(), CodecError> {
    envelope_codec::encode_into(out, envelope)
}

/// Checks and decodes an envelope, rejecting versions other than [`VERSION`](crate::VERSION). The body is copied out of
/// `bytes`; [`decode_envelope_bytes`] shares it instead.
///
/// # Errors
/// [`CodecError::TooLarge`] first; then [`CodecError::Malformed`] or [`CodecError::TooDeep`] for bytes that are
/// not one well-formed value within the limits, [`CodecError::Version`], and [`CodecError::Decode`] for a
/// value that is not an envelope.
pub fn decode_envelope(bytes: &[u8], limits: &Limits) -> Result<Envelope, CodecError> {
    envelope_codec::decode(bytes, limits, |range| Bytes::copy_from_slice(&bytes[range]))
}

/// As [`decode_envelope`], with the body a slice of `bytes` rather than a copy.
///
/// # Errors
/// As [`decode_envelope`].
pub fn decode_envelope_bytes(bytes: &Bytes, limits: &Limits) -> Result<Envelope, CodecError> {
    envelope_codec::decode(bytes, limits, |range| bytes.slice(range))
}

/// Checks that `bytes` is exactly one well-formed MessagePack value within `limits`, without recursion and
/// without allocating more than one counter per nesting level.
///
/// # Errors
/// [`CodecError::TooLarge`], [`CodecError::TooDeep`] or [`CodecError::Malformed`].
pub fn check(bytes: &[u8], limits: &Limits) -> Result<(), CodecError> {
    if bytes.len() > limits.max_frame {
        return Err(CodecError::TooLarge { len: bytes.len(), max: limits.max_frame });
    }
    let mut reader = Reader { bytes, pos: 0, last_was_container: false };
    reader.skip_one(limits.max_depth, 0)?;
    if reader.remaining() != 0 {
        return Err(CodecError::Malformed("trailing bytes after the value"));
    }
    Ok(())
}

/// The counts of values still to read per open level, kept on the stack for the nesting the default limit allows
/// (every value checked would otherwise cost an allocation).
struct Pending {
    inline: [u64; 72],
    len: usize,
    spilled: Vec<u64>,
}

impl Pending {
    /// One value to read at the top level.
    fn new() -> Pending {
        let mut inline = [0; 72];
        inline[0] = 1;
        Pending { inline, len: 1, spilled: Vec::new() }
    }

    fn len(&self) -> usize {
        self.len + self.spilled.len()
    }

    fn last_mut(&mut self) -> Option<&mut u64> {
        match self.spilled.last_mut() {
            Some(last) => Some(last),
            None => self.len.checked_sub(1).map(|top| &mut self.inline[top]),
        }
    }

    fn push(&mut self, items: u64) {
        if self.spilled.is_empty() && self.len < self.inline.len() {
            self.inline[self.len] = items;
            self.len += 1;
        } else {
            self.spilled.push(items);
        }
    }

    fn pop(&mut self) {
        if self.spilled.pop().is_none() {
            self.len = self.len.saturating_sub(1);
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    last_was_container: bool,
}

impl Reader<'_> {
    /// Skips exactly one value, nested `depth` levels deep already, rejecting nesting deeper than `max_depth`.
    fn skip_one(&mut self, max_depth: usize, depth: usize) -> Result<(), CodecError> {
        // Values still to read at each open level; the bottom entry is the one value.
        let mut pending = Pending::new();
        while let Some(last) = pending.last_mut() {
            if *last == 0 {
                pending.pop();
                continue;
            }
            *last -= 1;
            let items = self.skip_value()?;
            let levels = pending.len() + depth;
            if items > 0 {
                if levels > max_depth {
                    return Err(CodecError::TooDeep { max: max_depth });
                }
                if items > self.remaining() as u64 {
                    return Err(CodecError::Malformed("container longer than the input"));
                }
                pending.push(items);
            } else if items == 0 && self.last_was_container && levels > max_depth {
                return Err(CodecError::TooDeep { max: max_depth });
            }
        }
        Ok(())
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&[u8], CodecError> {
        if n > self.remaining() {
            return Err(CodecError::Malformed("truncated input"));
        }
        let slice = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(slice)
    }

    fn uint(&mut self, width: usize) -> Result<u64, CodecError> {
        Ok(self.take(width)?.iter().fold(0u64, |acc, byte| (acc << 8) | u64::from(*byte)))
    }

    /// Skips one value's header and payload; returns how many nested values follow (array items, map keys
    /// and values), 0 for scalars.
    fn skip_value(&mut self) -> Result<u64, CodecError> {
        self.last_was_container = false;
        let marker = self.take(1)?[0];
        let (skip, items) = match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
            0x80..=0x8f => (0, 2 * u64::from(marker & 0x0f)),
            0x90..=0x9f => (0, u64::from(marker & 0x0f)),
            0xa0..=0xbf => (u64::from(marker & 0x1f), 0),
            0xc1 => return Err(CodecError::Malformed("reserved marker 0xc1")),
            0xc4 | 0xd9 => (self.uint(1)?, 0),
            0xc5 | 0xda => (self.uint(2)?, 0),
            0xc6 | 0xdb => (self.uint(4)?, 0),
            0xc7 => (self.uint(1)? + 1, 0),
            0xc8 => (self.uint(2)? + 1, 0),
            0xc9 => (self.uint(4)? + 1, 0),
            0xca => (4, 0),
            0xcb => (8, 0),
            0xcc | 0xd0 => (1, 0),
            0xcd | 0xd1 => (2, 0),
            0xce | 0xd2 => (4, 0),
            0xcf | 0xd3 => (8, 0),
            0xd4 => (2, 0),
            0xd5 => (3, 0),
            0xd6 => (5, 0),
            0xd7 => (9, 0),
            0xd8 => (17, 0),
            0xdc => (0, self.uint(2)?),
            0xdd => (0, self.uint(4)?),
            0xde => (0, 2 * self.uint(2)?),
            0xdf => (0, 2 * self.uint(4)?),
        };
        self.last_was_container = matches!(marker, 0x80..=0x9f | 0xdc..=0xdf);
        let skip = usize::try_from(skip).map_err(|_| CodecError::Malformed("length does not fit in memory"))?;
        self.take(skip)?;
        Ok(items)
    }
}

/// The envelope's MessagePack, by hand: one pass, no serde, the body shared rather than copied where the input
/// allows. The tests check it against serde writing the document's field table.
mod envelope_codec {
    use std::collections::BTreeMap;
    use std::ops::Range;

    use bytes::Bytes;
    use uuid::Uuid;

    use super::{CodecError, Limits, Reader};
    use crate::envelope::{Envelope, Kind, ReplyTo, VERSION};

    pub(super) fn encode_into(out: &mut Vec<u8>, envelope: &Envelope) -> Result<(), CodecError> {
        let strings = envelope.service.len()
            + envelope.method.len()
            + envelope.reply_to.as_ref().map_or(0, |reply_to| reply_to.address().len())
            + envelope.idempotency_key.as_ref().map_or(0, String::len)
            + envelope.status_message.as_ref().map_or(0, String::len)
            + envelope.caller.as_ref().map_or(0, String::len)
            + envelope.headers.iter().map(|(name, value)| name.len() + value.len() + 10).sum::<usize>();
        out.reserve(128 + strings + envelope.body.len());
        let e = envelope;
        let fields = 5
            + usize::from(e.correlation_id.is_some())
            + usize::from(!e.service.is_empty())
            + usize::from(!e.method.is_empty())
            + usize::from(e.reply_to.is_some())
            + usize::from(e.reply_to.as_ref().is_some_and(ReplyTo::is_inbox))
            + usize::from(e.deadline_ms.is_some())
            + usize::from(e.delay_ms.is_some())
            + usize::from(e.idempotency_key.is_some())
            + usize::from(e.priority.is_some())
            + usize::from(e.status != 0)
            + usize::from(e.status_message.is_some())
            + usize::from(e.caller.is_some())
            + usize::from(!e.headers.is_empty());
        map_len(out, fields)?;
        str(out, "v")?;
        uint(out, u64::from(e.version));
        str(out, "k")?;
        uint(out, u64::from(u8::from(e.kind)));
        str(out, "i")?;
        bin(out, e.id.as_bytes())?;
        if let Some(id) = &e.correlation_id {
            str(out, "c")?;
            bin(out, id.as_bytes())?;
        }
        if !e.service.is_empty() {
            str(out, "s")?;
            str(out, &e.service)?;
        }
        if !e.method.is_empty() {
            str(out, "m")?;
            str(out, &e.method)?;
        }
        if let Some(reply_to) = &e.reply_to {
            str(out, "r")?;
            str(out, reply_to.address())?;
            if reply_to.is_inbox() {
                str(out, "ri")?;
                out.push(0xc3);
            }
        }
        if let Some(deadline) = e.deadline_ms {
            str(out, "d")?;
            uint(out, deadline);
        }
        if let Some(delay) = e.delay_ms {
            str(out, "dl")?;
            uint(out, delay);
        }
        str(out, "a")?;
        uint(out, u64::from(e.attempt));
        if let Some(key) = &e.idempotency_key {
            str(out, "ik")?;
            str(out, key)?;
        }
        if let Some(priority) = e.priority {
            str(out, "p")?;
            uint(out, u64::from(priority));
        }
        if e.status != 0 {
            str(out, "st")?;
            uint(out, u64::from(e.status));
        }
        if let Some(message) = &e.status_message {
            str(out, "sm")?;
            str(out, message)?;
        }
        if let Some(caller) = &e.caller {
            str(out, "cl")?;
            str(out, caller)?;
        }
        if !e.headers.is_empty() {
            str(out, "h")?;
            map_len(out, e.headers.len())?;
            for (name, value) in &e.headers {
                str(out, name)?;
                str(out, value)?;
            }
        }
        str(out, "b")?;
        bin(out, &e.body)?;
        Ok(())
    }

    fn uint(out: &mut Vec<u8>, value: u64) {
        match value {
            0..=0x7f => out.push(value as u8),
            0x80..=0xff => out.extend_from_slice(&[0xcc, value as u8]),
            0x100..=0xffff => {
                out.push(0xcd);
                out.extend_from_slice(&(value as u16).to_be_bytes());
            }
            0x1_0000..=0xffff_ffff => {
                out.push(0xce);
                out.extend_from_slice(&(value as u32).to_be_bytes());
            }
            _ => {
                out.push(0xcf);
                out.extend_from_slice(&value.to_be_bytes());
            }
        }
    }

    fn too_long(what: &str) -> CodecError {
        CodecError::Encode(format!("{what} longer than MessagePack can carry"))
    }

    fn str(out: &mut Vec<u8>, value: &str) -> Result<(), CodecError> {
        let len = value.len();
        match len {
            0..=31 => out.push(0xa0 | len as u8),
            32..=0xff => out.extend_from_slice(&[0xd9, len as u8]),
            0x100..=0xffff => {
                out.push(0xda);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                let len = u32::try_from(len).map_err(|_| too_long("a string"))?;
                out.push(0xdb);
                out.extend_from_slice(&len.to_be_bytes());
            }
        }
        out.extend_from_slice(value.as_bytes());
        Ok(())
    }

    fn bin(out: &mut Vec<u8>, value: &[u8]) -> Result<(), CodecError> {
        let len = value.len();
        match len {
            0..=0xff => out.extend_from_slice(&[0xc4, len as u8]),
            0x100..=0xffff => {
                out.push(0xc5);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                let len = u32::try_from(len).map_err(|_| too_long("a body"))?;
                out.push(0xc6);
                out.extend_from_slice(&len.to_be_bytes());
            }
        }
        out.extend_from_slice(value);
        Ok(())
    }

    fn map_len(out: &mut Vec<u8>, len: usize) -> Result<(), CodecError> {
        match len {
            0..=15 => out.push(0x80 | len as u8),
            16..=0xffff => {
                out.push(0xde);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                let len = u32::try_from(len).map_err(|_| too_long("a header map"))?;
                out.push(0xdf);
                out.extend_from_slice(&len.to_be_bytes());
            }
        }
        Ok(())
    }

    fn wrong(what: &str) -> CodecError {
        CodecError::Decode(what.to_owned())
    }

    /// The keys of the envelope's fields, in the bit each takes in the set of fields seen.
    const KEYS: [&str; 18] =
        ["v", "k", "i", "c", "s", "m", "r", "d", "dl", "a", "ik", "p", "st", "sm", "cl", "h", "b", "ri"];

    /// The slot in [`KEYS`] of the field named `key`: one comparison of the length and at most two bytes.
    fn slot_of(key: &[u8]) -> Option<usize> {
        Some(match key {
            b"v" => 0,
            b"k" => 1,
            b"i" => 2,
            b"c" => 3,
            b"s" => 4,
            b"m" => 5,
            b"r" => 6,
            b"d" => 7,
            b"dl" => 8,
            b"a" => 9,
            b"ik" => 10,
            b"p" => 11,
            b"st" => 12,
            b"sm" => 13,
            b"cl" => 14,
            b"h" => 15,
            b"b" => 16,
            b"ri" => 17,
            _ => return None,
        })
    }

    /// Decodes an envelope from `bytes`, taking the body with `body` (a copy, or a shared slice).
    pub(super) fn decode(
        bytes: &[u8],
        limits: &Limits,
        body: impl FnOnce(Range<usize>) -> Bytes,
    ) -> Result<Envelope, CodecError> {
        if bytes.len() > limits.max_frame {
            return Err(CodecError::TooLarge { len: bytes.len(), max: limits.max_frame });
        }
        let mut r = Reader { bytes, pos: 0, last_was_container: false };
        let fields = match r.byte()? {
            marker @ 0x80..=0x8f => u64::from(marker & 0x0f),
            0xde => r.uint(2)?,
            0xdf => r.uint(4)?,
            0xc1 => return Err(CodecError::Malformed("reserved marker 0xc1")),
            _ => {
                // Not a map: what is wrong with it, if anything, before saying so.
                r.pos = 0;
                r.skip_one(limits.max_depth, 0)?;
                return Err(wrong("invalid type: expected an envelope map"));
            }
        };
        if fields > r.remaining() as u64 {
            return Err(CodecError::Malformed("container longer than the input"));
        }
        if limits.max_depth == 0 {
            return Err(CodecError::TooDeep { max: 0 });
        }
        // Not `Envelope::new`: its fresh id would cost a clock read and random bytes, and be overwritten.
        let mut envelope = Envelope::with_id(Kind::Oneway, Uuid::nil());
        let mut seen = 0u32;
        let mut body_range = 0..0;
        let (mut reply_address, mut reply_inbox) = (None, false);
        for _ in 0..fields {
            let Some(key) = r.str_bytes()? else {
                r.skip_one(limits.max_depth, 1)?;
                r.skip_one(limits.max_depth, 1)?;
                continue;
            };
            let Some(slot) = slot_of(key) else {
                std::str::from_utf8(key).map_err(|_| wrong("invalid utf-8 in a field name"))?;
                r.skip_one(limits.max_depth, 1)?;
                continue;
            };
            let field = KEYS[slot];
            if seen & (1 << slot) != 0 {
                return Err(CodecError::Decode(format!("duplicate field `{field}`")));
            }
            seen |= 1 << slot;
            match slot {
                0 => envelope.version = r.number(field)?,
                1 => {
                    let kind: u8 = r.number(field)?;
                    envelope.kind = Kind::try_from(kind).map_err(CodecError::Decode)?;
                }
                2 => envelope.id = r.uuid(field)?,
                3 => envelope.correlation_id = r.optional(|r| r.uuid(field))?,
                4 => envelope.service = r.string(field)?,
                5 => envelope.method = r.string(field)?,
                6 => reply_address = r.optional(|r| r.string(field))?,
                7 => envelope.deadline_ms = r.optional(|r| r.number(field))?,
                8 => envelope.delay_ms = r.optional(|r| r.number(field))?,
                9 => envelope.attempt = r.number(field)?,
                10 => envelope.idempotency_key = r.optional(|r| r.string(field))?,
                11 => envelope.priority = r.optional(|r| r.number(field))?,
                12 => envelope.status = r.number(field)?,
                13 => envelope.status_message = r.optional(|r| r.string(field))?,
                14 => envelope.caller = r.optional(|r| r.string(field))?,
                15 => envelope.headers = r.headers(limits)?,
                16 => body_range = r.binary(field)?,
                _ => reply_inbox = r.optional(|r| r.boolean(field))?.unwrap_or(false),
            }
        }
        if r.remaining() != 0 {
            return Err(CodecError::Malformed("trailing bytes after the value"));
        }
        for (slot, key) in KEYS.iter().enumerate().take(3) {
            if seen & (1 << slot) == 0 {
                return Err(CodecError::Decode(format!("missing field `{key}`")));
            }
        }
        if envelope.version != VERSION {
            return Err(CodecError::Version(envelope.version));
        }
        envelope.reply_to = reply_address.map(|address| match reply_inbox {
            true => ReplyTo::Inbox(address),
            false => ReplyTo::Queue(address),
        });
        envelope.body = if body_range.is_empty() { Bytes::new() } else { body(body_range) };
        Ok(envelope)
    }

    impl<'a> Reader<'a> {
        fn byte(&mut self) -> Result<u8, CodecError> {
            Ok(self.take(1)?[0])
        }

        fn peek(&self) -> Result<u8, CodecError> {
            self.bytes.get(self.pos).copied().ok_or(CodecError::Malformed("truncated input"))
        }

        /// A string's bytes, or `None` (the marker not consumed) for another type.
        fn str_bytes(&mut self) -> Result<Option<&'a [u8]>, CodecError> {
            let len = match self.peek()? {
                marker @ 0xa0..=0xbf => {
                    self.pos += 1;
                    usize::from(marker & 0x1f)
                }
                0xd9 => {
                    self.pos += 1;
                    self.uint(1)? as usize
                }
                0xda => {
                    self.pos += 1;
                    self.uint(2)? as usize
                }
                0xdb => {
                    self.pos += 1;
                    usize::try_from(self.uint(4)?).map_err(|_| CodecError::Malformed("truncated input"))?
                }
                _ => return Ok(None),
            };
            if len > self.remaining() {
                return Err(CodecError::Malformed("truncated input"));
            }
            let slice = &self.bytes[self.pos..self.pos + len];
            self.pos += len;
            Ok(Some(slice))
        }

        /// The string value of `field`, owned.
        fn string(&mut self, field: &str) -> Result<String, CodecError> {
            match self.str_bytes()? {
                Some(bytes) => std::str::from_utf8(bytes)
                    .map(str::to_owned)
                    .map_err(|_| CodecError::Decode(format!("invalid utf-8 in field `{field}`"))),
                None => Err(CodecError::Decode(format!("invalid type for field `{field}`: expected a string"))),
            }
        }

        /// `None` for nil, else what `read` makes of the value.
        fn optional<T>(
            &mut self,
            read: impl FnOnce(&mut Self) -> Result<T, CodecError>,
        ) -> Result<Option<T>, CodecError> {
            if self.peek()? == 0xc0 {
                self.pos += 1;
                return Ok(None);
            }
            read(self).map(Some)
        }

        /// A boolean.
        fn boolean(&mut self, field: &str) -> Result<bool, CodecError> {
            match self.byte()? {
                0xc2 => Ok(false),
                0xc3 => Ok(true),
                _ => Err(CodecError::Decode(format!("invalid type for field `{field}`: expected a boolean"))),
            }
        }

        /// An integer of any width that fits `T`.
        fn number<T: TryFrom<u64>>(&mut self, field: &str) -> Result<T, CodecError> {
            let value = match self.byte()? {
                marker @ 0x00..=0x7f => u64::from(marker),
                0xcc => self.uint(1)?,
                0xcd => self.uint(2)?,
                0xce => self.uint(4)?,
                0xcf => self.uint(8)?,
                0xd0 => non_negative(self.uint(1)? as u8 as i8 as i64, field)?,
                0xd1 => non_negative(self.uint(2)? as u16 as i16 as i64, field)?,
                0xd2 => non_negative(self.uint(4)? as u32 as i32 as i64, field)?,
                0xd3 => non_negative(self.uint(8)? as i64, field)?,
                0xe0..=0xff => return Err(CodecError::Decode(format!("negative value in field `{field}`"))),
                _ => return Err(CodecError::Decode(format!("invalid type for field `{field}`: expected an integer"))),
            };
            T::try_from(value).map_err(|_| CodecError::Decode(format!("value {value} out of range in field `{field}`")))
        }

        /// The range of a binary (or string) value in the input.
        fn binary(&mut self, field: &str) -> Result<Range<usize>, CodecError> {
            let len = match self.peek()? {
                0xc4 => {
                    self.pos += 1;
                    self.uint(1)? as usize
                }
                0xc5 => {
                    self.pos += 1;
                    self.uint(2)? as usize
                }
                0xc6 => {
                    self.pos += 1;
                    usize::try_from(self.uint(4)?).map_err(|_| CodecError::Malformed("truncated input"))?
                }
                _ => {
                    return match self.str_bytes()? {
                        Some(bytes) => Ok(self.pos - bytes.len()..self.pos),
                        None => Err(CodecError::Decode(format!("invalid type for field `{field}`: expected bytes"))),
                    };
                }
            };
            if len > self.remaining() {
                return Err(CodecError::Malformed("truncated input"));
            }
            let range = self.pos..self.pos + len;
            self.pos += len;
            Ok(range)
        }

        fn uuid(&mut self, field: &str) -> Result<Uuid, CodecError> {
            let bad = || CodecError::Decode(format!("invalid value for field `{field}`: expected a UUID"));
            if let Some(text) = self.str_bytes()? {
                return std::str::from_utf8(text).ok().and_then(|text| Uuid::parse_str(text).ok()).ok_or_else(bad);
            }
            let range = self.binary(field)?;
            Uuid::from_slice(&self.bytes[range]).map_err(|_| bad())
        }

        fn headers(&mut self, limits: &Limits) -> Result<BTreeMap<String, String>, CodecError> {
            let len = match self.peek()? {
                marker @ 0x80..=0x8f => {
                    self.pos += 1;
                    u64::from(marker & 0x0f)
                }
                0xde => {
                    self.pos += 1;
                    self.uint(2)?
                }
                0xdf => {
                    self.pos += 1;
                    self.uint(4)?
                }
                0xc0 => {
                    self.pos += 1;
                    return Ok(BTreeMap::new());
                }
                _ => return Err(wrong("invalid type for field `h`: expected a map")),
            };
            if limits.max_depth < 2 {
                return Err(CodecError::TooDeep { max: limits.max_depth });
            }
            if len.saturating_mul(2) > self.remaining() as u64 {
                return Err(CodecError::Malformed("container longer than the input"));
            }
            let mut headers = BTreeMap::new();
            for _ in 0..len {
                let name = self.string("h")?;
                let value = self.string("h")?;
                headers.insert(name, value);
            }
            Ok(headers)
        }
    }

    fn non_negative(value: i64, field: &str) -> Result<u64, CodecError> {
        u64::try_from(value).map_err(|_| CodecError::Decode(format!("negative value in field `{field}`")))
    }

    #[cfg(test)]
    mod keys {
        #[test]
        fn every_key_has_its_own_slot_and_nothing_else_has_one() {
            for (slot, key) in super::KEYS.iter().enumerate() {
                assert_eq!(super::slot_of(key.as_bytes()), Some(slot), "{key}");
            }
            for other in ["", "V", "x", "ikk", "b ", "body"] {
                assert_eq!(super::slot_of(other.as_bytes()), None, "{other}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn nested_arrays(depth: usize) -> Vec<u8> {
        let mut bytes = vec![0x91; depth];
        bytes.push(0x01);
        bytes
    }

    /// Encodes itself through [`encode`] while being encoded: the scratch buffer is in use then.
    struct Nested(u32);

    impl Serialize for Nested {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let inner = encode(&self.0).map_err(serde::ser::Error::custom)?;
            serializer.serialize_bytes(&inner)
        }
    }

    #[test]
    fn an_encoding_inside_an_encoding_gets_a_buffer_of_its_own() {
        let bytes = encode(&(Nested(300), "after")).expect("encodes");
        let (inner, after): (Bytes, String) = decode(&bytes, &Limits::default()).expect("decodes");
        assert_eq!(inner.as_ref(), &[0xcd, 0x01, 0x2c]);
        assert_eq!(after, "after");
    }

    #[test]
    fn encodings_after_a_large_one_are_whole_and_exact() {
        let large = Bytes::from(vec![7u8; SCRATCH_KEEP * 2]);
        let bytes = encode(&large).expect("encodes");
        assert_eq!(bytes.len(), large.len() + 5);
        assert_eq!(decode::<Bytes>(&bytes, &Limits::default()), Ok(large));
        // The large buffer was not kept, and what it held does not leak into the next encodings.
        assert!(SCRATCH.with(|scratch| scratch.borrow().capacity()) <= SCRATCH_KEEP);
        for value in [1u64, 70_000, u64::MAX] {
            let bytes = encode(&value).expect("encodes");
            assert_eq!(decode::<u64>(&bytes, &Limits::default()), Ok(value));
        }
        let mut envelope = Envelope::new(crate::Kind::Request);
        envelope.service = "Calculator".into();
        let plain = encode_envelope(&envelope).expect("encodes");
        let after = encode_envelope_after(b"\xc1prefix", &envelope).expect("encodes");
        assert_eq!(&after[..7], b"\xc1prefix");
        assert_eq!(after[7..], plain[..]);
        assert_eq!(decode_envelope(&plain, &Limits::default()), Ok(envelope));
    }

    #[test]
    fn depth_at_the_limit_passes_and_one_more_fails() {
        let limits = Limits::default();
        assert_eq!(check(&nested_arrays(64), &limits), Ok(()));
        assert_eq!(check(&nested_arrays(65), &limits), Err(CodecError::TooDeep { max: 64 }));
        let mut empty_innermost = vec![0x91; 64];
        empty_innermost.push(0x90);
        assert_eq!(check(&empty_innermost, &limits), Err(CodecError::TooDeep { max: 64 }));
    }

    #[test]
    fn a_depth_bomb_is_rejected_without_recursion() {
        let bomb = nested_arrays(1_000_000);
        assert_eq!(check(&bomb, &Limits::default()), Err(CodecError::TooDeep { max: 64 }));
        let result: Result<Vec<u8>, _> = decode(&bomb, &Limits::default());
        assert_eq!(result, Err(CodecError::TooDeep { max: 64 }));
    }

    #[test]
    fn size_is_checked_first() {
        let limits = Limits { max_frame: 4, max_depth: 64 };
        assert_eq!(check(&[0xc0; 5], &limits), Err(CodecError::TooLarge { len: 5, max: 4 }));
    }

    #[test]
    fn malformed_inputs_get_typed_errors() {
        let limits = Limits::default();
        assert_eq!(check(&[], &limits), Err(CodecError::Malformed("truncated input")));
        assert_eq!(check(&[0xc1], &limits), Err(CodecError::Malformed("reserved marker 0xc1")));
        assert_eq!(check(&[0xa5, b'a'], &limits), Err(CodecError::Malformed("truncated input")));
        assert_eq!(check(&[0xc0, 0xc0], &limits), Err(CodecError::Malformed("trailing bytes after the value")));
        // An array claiming 2^32-1 items in a 5-byte input.
        assert_eq!(
            check(&[0xdd, 0xff, 0xff, 0xff, 0xff], &limits),
            Err(CodecError::Malformed("container longer than the input"))
        );
        assert_eq!(check(&[0xdb, 0xff, 0xff, 0xff, 0xff], &limits), Err(CodecError::Malformed("truncated input")));
    }

    #[test]
    fn every_scalar_kind_passes() {
        let value = (
            1u8,
            -1i8,
            300u16,
            -300i16,
            70_000u32,
            -70_000i32,
            u64::MAX,
            i64::MIN,
            1.5f32,
            2.5f64,
            "text",
            serde_bytes_like(),
            Option::<u8>::None,
            true,
        );
        let bytes = encode(&value).expect("encodes");
        assert_eq!(check(&bytes, &Limits::default()), Ok(()));
    }

    fn serde_bytes_like() -> Bytes {
        Bytes::from_static(&[1, 2, 3])
    }

    #[test]
    fn an_envelope_round_trips() {
        let mut envelope = Envelope::new(crate::envelope::Kind::Request);
        envelope.correlation_id = Some(uuid::Uuid::new_v4());
        envelope.service = "Calculator".into();
        envelope.method = "add".into();
        envelope.reply_to = Some(crate::ReplyTo::Inbox("inbox.1".into()));
        envelope.deadline_ms = Some(5_000);
        envelope.headers = BTreeMap::from([("tenant".to_owned(), "a".to_owned())]);
        envelope.body = encode(&BTreeMap::from([("a", 2), ("b", 3)])).expect("encodes");
        let bytes = encode_envelope(&envelope).expect("encodes");
        assert_eq!(decode_envelope(&bytes, &Limits::default()), Ok(envelope));
    }

    #[test]
    fn an_unknown_version_is_rejected() {
        let mut envelope = Envelope::new(crate::envelope::Kind::Reply);
        envelope.version = 2;
        let bytes = encode_envelope(&envelope).expect("encodes");
        assert_eq!(decode_envelope(&bytes, &Limits::default()), Err(CodecError::Version(2)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_envelope(&bytes, &Limits::default());
            let _ = decode::<Vec<BTreeMap<String, i64>>>(&bytes, &Limits::default());
        }

        #[test]
        fn mutated_envelopes_never_panic(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut envelope = Envelope::new(crate::envelope::Kind::Request);
            envelope.method = "add".into();
            envelope.reply_to = Some(crate::ReplyTo::Inbox("inbox".into()));
            let mut bytes = encode_envelope(&envelope).expect("encodes").to_vec();
            for (index, byte) in flips {
                let at = index.index(bytes.len());
                bytes[at] = byte;
            }
            bytes.truncate(cut.index(bytes.len() + 1));
            let _ = decode_envelope(&bytes, &Limits::default());
        }

        #[test]
        fn the_envelope_codec_writes_and_reads_what_serde_does(envelope in arbitrary_envelope()) {
            let by_hand = encode_envelope(&envelope).expect("encodes");
            let by_serde = rmp_serde::to_vec_named(&SerdeForm::of(&envelope)).expect("serde encodes");
            prop_assert_eq!(&by_hand[..], &by_serde[..]);
            let limits = Limits::default();
            let decoded = decode_envelope(&by_hand, &limits).expect("decodes");
            prop_assert_eq!(&decoded, &envelope);
            prop_assert_eq!(decode_envelope_bytes(&by_hand, &limits).expect("decodes"), envelope);
        }

        #[test]
        fn whatever_the_checker_accepts_rmp_can_walk(value in arbitrary_value()) {
            let bytes = encode(&value).expect("encodes");
            prop_assert_eq!(check(&bytes, &Limits::default()), Ok(()));
        }
    }

    fn arbitrary_envelope() -> impl Strategy<Value = Envelope> {
        let text = || proptest::option::of(".{0,40}");
        (
            (0u8..3, any::<u128>(), proptest::option::of(any::<u128>()), ".{0,300}", ".{0,12}", text()),
            (proptest::option::of(any::<u64>()), proptest::option::of(any::<u64>()), any::<u32>(), text()),
            (proptest::option::of(0u8..10), any::<u16>(), text(), text()),
            (
                proptest::collection::btree_map(".{0,8}", ".{0,70}", 0..20),
                proptest::collection::vec(any::<u8>(), 0..600),
                any::<bool>(),
            ),
        )
            .prop_map(
                |((kind, id, correlation, service, method, reply_to), numbers, reply, (headers, body, inbox))| {
                    let (deadline_ms, delay_ms, attempt, idempotency_key) = numbers;
                    let (priority, status, status_message, caller) = reply;
                    let mut envelope = Envelope::new(crate::envelope::Kind::try_from(kind).expect("a kind"));
                    envelope.id = uuid::Uuid::from_u128(id);
                    envelope.correlation_id = correlation.map(uuid::Uuid::from_u128);
                    envelope.service = service;
                    envelope.method = method;
                    envelope.reply_to = reply_to.map(|address| match inbox {
                        true => crate::ReplyTo::Inbox(address),
                        false => crate::ReplyTo::Queue(address),
                    });
                    envelope.deadline_ms = deadline_ms;
                    envelope.delay_ms = delay_ms;
                    envelope.attempt = attempt;
                    envelope.idempotency_key = idempotency_key;
                    envelope.priority = priority;
                    envelope.status = status;
                    envelope.status_message = status_message;
                    envelope.caller = caller;
                    envelope.headers = headers;
                    envelope.body = Bytes::from(body);
                    envelope
                },
            )
    }

    /// The envelope as docs/wire-format.md tables it, written by serde: the reference for the hand-written codec.
    #[derive(serde::Serialize)]
    struct SerdeForm<'a> {
        v: u8,
        k: u8,
        i: uuid::Uuid,
        #[serde(skip_serializing_if = "Option::is_none")]
        c: Option<uuid::Uuid>,
        #[serde(skip_serializing_if = "str::is_empty")]
        s: &'a str,
        #[serde(skip_serializing_if = "str::is_empty")]
        m: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        r: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        ri: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        d: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        dl: Option<u64>,
        a: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        ik: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        p: Option<u8>,
        #[serde(skip_serializing_if = "Option::is_none")]
        st: Option<u16>,
        #[serde(skip_serializing_if = "Option::is_none")]
        sm: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        cl: Option<&'a str>,
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        h: &'a BTreeMap<String, String>,
        b: &'a Bytes,
    }

    impl<'a> SerdeForm<'a> {
        fn of(e: &'a Envelope) -> SerdeForm<'a> {
            SerdeForm {
                v: e.version,
                k: u8::from(e.kind),
                i: e.id,
                c: e.correlation_id,
                s: &e.service,
                m: &e.method,
                r: e.reply_to.as_ref().map(crate::ReplyTo::address),
                ri: e.reply_to.as_ref().filter(|reply_to| reply_to.is_inbox()).map(|_| true),
                d: e.deadline_ms,
                dl: e.delay_ms,
                a: e.attempt,
                ik: e.idempotency_key.as_deref(),
                p: e.priority,
                st: Some(e.status).filter(|status| *status != 0),
                sm: e.status_message.as_deref(),
                cl: e.caller.as_deref(),
                h: &e.headers,
                b: &e.body,
            }
        }
    }

    #[test]
    fn a_reply_address_without_the_inbox_flag_names_a_queue() {
        let mut envelope = Envelope::new(crate::envelope::Kind::Request);
        envelope.reply_to = Some(crate::ReplyTo::Queue("callbacks".into()));
        let bytes = encode_envelope(&envelope).expect("encodes");
        assert!(!bytes.windows(3).any(|window| window == [0xa2, b'r', b'i']), "a queue carries no inbox flag");
        assert_eq!(decode_envelope(&bytes, &Limits::default()).expect("decodes").reply_to, envelope.reply_to);
        envelope.reply_to = Some(crate::ReplyTo::Inbox("inbox.1".into()));
        let bytes = encode_envelope(&envelope).expect("encodes");
        assert_eq!(decode_envelope(&bytes, &Limits::default()).expect("decodes").reply_to, envelope.reply_to);
    }

    #[test]
    fn the_envelope_decoder_reads_what_other_writers_may_send() {
        // Keys in another order, a field this build does not know (nested), nil for an absent field, the ids
        // as strings, a body as a string, integers wider than needed.
        let id = uuid::Uuid::from_u128(7);
        let value = rmp_serde::to_vec_named(&serde_json_like(id)).expect("encodes");
        let envelope = decode_envelope(&value, &Limits::default()).expect("decodes");
        assert_eq!(envelope.id, id);
        assert_eq!(envelope.kind, crate::envelope::Kind::Request);
        assert_eq!(envelope.reply_to, None);
        assert_eq!(envelope.deadline_ms, Some(70_000));
        assert_eq!(&envelope.body[..], b"xy");
        // What serde would refuse, refused.
        let missing = rmp_serde::to_vec_named(&BTreeMap::from([("v", 1u8), ("k", 0)])).expect("encodes");
        assert_eq!(decode_envelope(&missing, &Limits::default()), Err(CodecError::Decode("missing field `i`".into())));
        let mut twice = vec![0x83, 0xa1, b'v', 0x01, 0xa1, b'v', 0x01, 0xa1, b'k'];
        twice.push(0x00);
        assert!(
            matches!(decode_envelope(&twice, &Limits::default()), Err(CodecError::Decode(why)) if why.contains("duplicate"))
        );
        assert!(matches!(decode_envelope(&[0x93, 1, 2, 3], &Limits::default()), Err(CodecError::Decode(_))));
    }

    fn serde_json_like(id: uuid::Uuid) -> BTreeMap<&'static str, Field> {
        BTreeMap::from([
            ("zz", Field::Nested(vec![vec![1, 2], vec![]])),
            ("b", Field::Text("xy".into())),
            ("r", Field::Nil(())),
            ("d", Field::Wide(70_000)),
            ("i", Field::Text(id.to_string())),
            ("k", Field::Wide(0)),
            ("v", Field::Wide(1)),
        ])
    }

    #[derive(serde::Serialize)]
    #[serde(untagged)]
    enum Field {
        Nested(Vec<Vec<u8>>),
        Text(String),
        Nil(()),
        Wide(u64),
    }

    #[derive(Debug, Clone, serde::Serialize)]
    #[serde(untagged)]
    enum Value {
        Int(i64),
        Text(String),
        List(Vec<Value>),
        Map(BTreeMap<String, Value>),
    }

    fn arbitrary_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![any::<i64>().prop_map(Value::Int), ".{0,40}".prop_map(Value::Text)];
        leaf.prop_recursive(6, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::List),
                proptest::collection::btree_map(".{0,8}", inner, 0..8).prop_map(Value::Map),
            ]
        })
    }
}

#[cfg(test)]
mod wire_format_document {
    use std::collections::BTreeMap;

    use super::*;
    use crate::envelope::Kind;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|byte| format!("{byte:02x}")).collect::<Vec<_>>().join(" ")
    }

    /// The document's example request: `add(a: 2, b: 3)` to service `Calculator`.
    fn example_request() -> Envelope {
        let mut envelope = Envelope::new(Kind::Request);
        envelope.id = uuid::Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0001);
        envelope.correlation_id = Some(uuid::Uuid::from_u128(0x0000_0000_0000_4000_8000_0000_0000_0002));
        envelope.service = "Calculator".into();
        envelope.method = "add".into();
        envelope.reply_to = Some(crate::ReplyTo::Inbox("inbox.7".into()));
        envelope.deadline_ms = Some(5_000);
        envelope.body = encode(&BTreeMap::from([("a", 2), ("b", 3)])).expect("encodes");
        envelope
    }

    /// Wraps the hex in lines of 16 bytes, as the document shows it.
    fn wrapped(bytes: &[u8]) -> String {
        bytes.chunks(16).map(hex).collect::<Vec<_>>().join("\n")
    }

    #[test]
    fn the_document_shows_the_bytes_this_build_writes() {
        let document = include_str!("../../docs/wire-format.md");
        let request = example_request();
        let request_bytes = encode_envelope(&request).expect("encodes");
        let reply = request.reply(Ok(encode(&5i64).expect("encodes")));
        let mut reply = reply;
        reply.id = uuid::Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0003);
        let reply_bytes = encode_envelope(&reply).expect("encodes");
        for (name, bytes) in [("request", &request_bytes), ("reply", &reply_bytes)] {
            let shown = wrapped(bytes);
            assert!(document.contains(&shown), "docs/wire-format.md must show the {name} as:\n{shown}\n");
        }
        assert_eq!(decode_envelope(&request_bytes, &Limits::default()), Ok(request));
        assert_eq!(decode_envelope(&reply_bytes, &Limits::default()), Ok(reply));
    }
}
