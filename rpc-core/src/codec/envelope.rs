//! The envelope's MessagePack, by hand: one pass, no serde, the body and the strings shared rather than copied
//! where the input allows. The tests check it against serde writing the document's field table.

use std::collections::BTreeMap;
use std::ops::Range;

use bytes::Bytes;
use uuid::Uuid;

use super::{CodecError, Limits, Reader};
use crate::envelope::{COMPACT_VERSION, Envelope, Kind, ReplyTo, VERSION, default_key};
use crate::text::Text;

/// Writes `envelope` in the full form of version 1 ([`VERSION`]), or, with `compact`, in the compact form of
/// version 2 ([`COMPACT_VERSION`]): a request's `i` and `ik` are left out where they are its correlation id
/// (an `ik` it lacks is written as nil), a reply's `i` is left out (its reader takes the correlation id for it)
/// and it does not echo `s` and `m`, and `a` is left out when it is 1.
pub(super) fn encode_into(out: &mut Vec<u8>, envelope: &Envelope, compact: bool) -> Result<(), CodecError> {
    let strings = envelope.service.len()
        + envelope.method.len()
        + envelope.reply_to.as_ref().map_or(0, |reply_to| reply_to.address().len())
        + envelope.idempotency_key.as_ref().map_or(0, |key| key.len())
        + envelope.status_message.as_ref().map_or(0, String::len)
        + envelope.caller.as_ref().map_or(0, |caller| caller.len())
        + envelope.headers.iter().map(|(name, value)| name.len() + value.len() + 10).sum::<usize>();
    out.reserve(128 + strings + envelope.body.len());
    let e = envelope;
    let request = e.kind == Kind::Request;
    // What the compact form leaves out: the request's id and key where they are its correlation id (the
    // reader puts them back), a reply's id (read back as its correlation id: nothing reads a reply's own id)
    // and its echo of the service and method.
    let write_id = !(compact
        && match e.kind {
            Kind::Request => e.correlation_id == Some(e.id),
            Kind::Reply => e.correlation_id.is_some(),
            Kind::Oneway => false,
        });
    let write_key = match (&e.idempotency_key, e.correlation_id) {
        (Some(key), Some(id)) if compact && request => !is_key_of(key, id),
        (None, Some(_)) => compact && request,
        (key, _) => key.is_some(),
    };
    let echo = !(compact && e.kind == Kind::Reply);
    let fields = 3
        + usize::from(write_id)
        + usize::from(!compact || e.attempt != 1)
        + usize::from(e.correlation_id.is_some())
        + usize::from(echo && !e.service.is_empty())
        + usize::from(echo && !e.method.is_empty())
        + usize::from(e.reply_to.is_some())
        + usize::from(e.reply_to.as_ref().is_some_and(ReplyTo::is_inbox))
        + usize::from(e.deadline_ms.is_some())
        + usize::from(e.delay_ms.is_some())
        + usize::from(write_key)
        + usize::from(e.priority.is_some())
        + usize::from(e.status != 0)
        + usize::from(e.status_message.is_some())
        + usize::from(e.last_status.is_some())
        + usize::from(e.caller.is_some())
        + usize::from(!e.headers.is_empty());
    map_len(out, fields)?;
    str(out, "v")?;
    // An envelope read from the compact form is written in whichever form is asked for, as that form's version.
    let version = match (compact, e.version) {
        (true, _) => COMPACT_VERSION,
        (false, COMPACT_VERSION) => VERSION,
        (false, version) => version,
    };
    uint(out, u64::from(version));
    str(out, "k")?;
    uint(out, u64::from(u8::from(e.kind)));
    if write_id {
        str(out, "i")?;
        bin(out, e.id.as_bytes())?;
    }
    if let Some(id) = &e.correlation_id {
        str(out, "c")?;
        bin(out, id.as_bytes())?;
    }
    if echo && !e.service.is_empty() {
        str(out, "s")?;
        str(out, &e.service)?;
    }
    if echo && !e.method.is_empty() {
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
    if !compact || e.attempt != 1 {
        str(out, "a")?;
        uint(out, u64::from(e.attempt));
    }
    if write_key {
        str(out, "ik")?;
        match &e.idempotency_key {
            Some(key) => str(out, key)?,
            None => out.push(0xc0),
        }
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
    if let Some(last) = e.last_status {
        str(out, "ls")?;
        uint(out, u64::from(last));
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

/// Whether `key` is `id` in 32 lowercase hex digits, the key a call is given when it is given none.
fn is_key_of(key: &str, id: Uuid) -> bool {
    let mut buffer = Uuid::encode_buffer();
    key == id.simple().encode_lower(&mut buffer)
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
const KEYS: [&str; 19] =
    ["v", "k", "i", "c", "s", "m", "r", "d", "dl", "a", "ik", "p", "st", "sm", "cl", "h", "b", "ri", "ls"];

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
        b"ls" => 18,
        _ => return None,
    })
}

/// Decodes an envelope from `bytes`, taking its body and strings with `share` (copies, or shared slices).
pub(super) fn decode(
    bytes: &[u8],
    limits: &Limits,
    share: impl Fn(Range<usize>) -> Bytes,
) -> Result<Envelope, CodecError> {
    if bytes.len() > limits.max_frame {
        return Err(CodecError::TooLarge { len: bytes.len(), max: limits.max_frame });
    }
    let mut r = Reader { bytes, pos: 0 };
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
    // `ik` written as nil: in the compact form, a request without a key (rather than one keyed by `c`).
    let mut key_nil = false;
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
            4 => envelope.service = r.text(field, &share)?,
            5 => envelope.method = r.text(field, &share)?,
            6 => reply_address = r.optional(|r| r.text(field, &share))?,
            7 => envelope.deadline_ms = r.optional(|r| r.number(field))?,
            8 => envelope.delay_ms = r.optional(|r| r.number(field))?,
            9 => envelope.attempt = r.number(field)?,
            10 => {
                envelope.idempotency_key = r.optional(|r| r.text(field, &share))?;
                key_nil = envelope.idempotency_key.is_none();
            }
            11 => envelope.priority = r.optional(|r| r.number(field))?,
            12 => envelope.status = r.number(field)?,
            13 => envelope.status_message = r.optional(|r| r.string(field))?,
            14 => envelope.caller = r.optional(|r| r.text(field, &share))?,
            15 => envelope.headers = r.headers(limits)?,
            16 => body_range = r.binary(field)?,
            17 => reply_inbox = r.optional(|r| r.boolean(field))?.unwrap_or(false),
            _ => envelope.last_status = r.optional(|r| r.number(field))?,
        }
    }
    if r.remaining() != 0 {
        return Err(CodecError::Malformed("trailing bytes after the value"));
    }
    // `v` first: what else is required depends on it.
    if seen & 1 == 0 {
        return Err(CodecError::Decode("missing field `v`".to_owned()));
    }
    if envelope.version != VERSION && envelope.version != COMPACT_VERSION {
        return Err(CodecError::Version(envelope.version));
    }
    // The compact form: a request's id or key left out is its correlation id, and so is a reply's id.
    if let (COMPACT_VERSION, Some(id)) = (envelope.version, envelope.correlation_id) {
        if envelope.kind != Kind::Oneway && seen & (1 << 2) == 0 {
            envelope.id = id;
            seen |= 1 << 2;
        }
        if envelope.kind == Kind::Request && envelope.idempotency_key.is_none() && !key_nil {
            envelope.idempotency_key = Some(default_key(id));
        }
    }
    for (slot, key) in KEYS.iter().enumerate().take(3) {
        if seen & (1 << slot) == 0 {
            return Err(CodecError::Decode(format!("missing field `{key}`")));
        }
    }
    envelope.reply_to = reply_address.map(|address| match reply_inbox {
        true => ReplyTo::Inbox(address),
        false => ReplyTo::Queue(address),
    });
    envelope.body = if body_range.is_empty() { Bytes::new() } else { share(body_range) };
    Ok(envelope)
}

/// The reply address and correlation id of a map that has them (`r`, `ri`, `c`), whatever else is wrong with
/// it; `None` for bytes that are not one well-formed map within the limits, or have no `r`.
pub(super) fn reply_address(bytes: &[u8], limits: &Limits) -> Option<(ReplyTo, Option<Uuid>)> {
    super::check(bytes, limits).ok()?;
    let mut r = Reader { bytes, pos: 0 };
    let fields = match r.byte().ok()? {
        marker @ 0x80..=0x8f => u64::from(marker & 0x0f),
        0xde => r.uint(2).ok()?,
        0xdf => r.uint(4).ok()?,
        _ => return None,
    };
    let (mut address, mut inbox, mut correlation) = (None, false, None);
    for _ in 0..fields {
        let key = match r.str_bytes().ok()? {
            Some(key) => key,
            None => {
                r.skip_one(limits.max_depth, 1).ok()?;
                b""
            }
        };
        let value = r.pos;
        let read = match key {
            b"r" => r.string("r").map(|text| address = Some(text)),
            b"ri" => r.boolean("ri").map(|flag| inbox = flag),
            b"c" => r.uuid("c").map(|id| correlation = Some(id)),
            _ => Err(CodecError::Malformed("skipped")),
        };
        // Any other field, or one of these of another type, is skipped.
        if read.is_err() {
            r.pos = value;
            r.skip_one(limits.max_depth, 1).ok()?;
        }
    }
    let address = Text::from(address?);
    Some((if inbox { ReplyTo::Inbox(address) } else { ReplyTo::Queue(address) }, correlation))
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

    /// The string value of `field`, taken with `share`.
    fn text(&mut self, field: &str, share: &impl Fn(Range<usize>) -> Bytes) -> Result<Text, CodecError> {
        match self.str_bytes()? {
            Some([]) => Ok(Text::new()),
            Some(bytes) => Text::from_utf8(share(self.pos - bytes.len()..self.pos))
                .map_err(|_| CodecError::Decode(format!("invalid utf-8 in field `{field}`"))),
            None => Err(CodecError::Decode(format!("invalid type for field `{field}`: expected a string"))),
        }
    }

    /// `None` for nil, else what `read` makes of the value.
    fn optional<T>(&mut self, read: impl FnOnce(&mut Self) -> Result<T, CodecError>) -> Result<Option<T>, CodecError> {
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

#[cfg(test)]
mod wire_format_document {
    use std::collections::BTreeMap;

    use crate::codec::*;
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
        let document = include_str!("../../../docs/wire-format.md");
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

    #[test]
    fn the_document_shows_the_compact_bytes_this_build_writes() {
        let document = include_str!("../../../docs/wire-format.md");
        // As our client sends it on core NATS: its id and key its correlation id, no reply address.
        let correlation = uuid::Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0002);
        let mut request = example_request();
        request.id = correlation;
        request.correlation_id = Some(correlation);
        request.idempotency_key = Some(correlation.simple().to_string().into());
        request.reply_to = None;
        let request_bytes = encode_compact_envelope_after(b"", &request).expect("encodes");
        let mut reply = request.reply(Ok(encode(&5i64).expect("encodes")));
        let reply_bytes = encode_compact_envelope_after(b"", &reply).expect("encodes");
        for (name, bytes) in [("compact request", &request_bytes), ("compact reply", &reply_bytes)] {
            let shown = wrapped(bytes);
            assert!(document.contains(&shown), "docs/wire-format.md must show the {name} as:\n{shown}\n");
        }
        assert_eq!((request_bytes.len(), reply_bytes.len()), (62, 32));
        request.version = crate::COMPACT_VERSION;
        assert_eq!(decode_envelope(&request_bytes, &Limits::default()), Ok(request));
        // The reply's id, left out, reads back as its correlation id.
        reply.id = correlation;
        reply.version = crate::COMPACT_VERSION;
        reply.service = crate::Text::new();
        reply.method = crate::Text::new();
        assert_eq!(decode_envelope(&reply_bytes, &Limits::default()), Ok(reply));
    }
}
