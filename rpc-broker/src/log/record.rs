//! The bytes of the log: records in segment files, and each queue's meta file.
//!
//! A record is a 10-byte header and a body:
//!
//! ```text
//! magic u8 (0xa7) | kind u8 | len u32 (of the body) | crc u32 (CRC-32 of kind, len and body) | body
//! kind 1, publish: seq u64 | flags u8 | priority u8 | [expires_ms u64] | [due_ms u64] | [key 16] | [id 16] | payload
//! kind 2, ack:     seq u64
//! kind 3, meta:    name str | max_len opt | max_deliveries opt | auto_delete u8 | dead_letter str (empty: none)
//! ```
//!
//! Integers are big-endian; a `str` is a `u16` length and UTF-8; an `opt` is a `u64`, `u64::MAX` for none. The
//! flags say which optional fields follow: 1 expires, 2 due, 4 key, 8 id. Times are milliseconds since the
//! Unix epoch.

use bytes::{BufMut, Bytes, BytesMut};

use crate::engine::{Key, MessageId, QueueConfig};

/// Starts every record.
pub(crate) const MAGIC: u8 = 0xa7;
/// Header bytes before a record's body.
pub(crate) const HEADER: usize = 10;
/// The largest body a record may have: a frame's payload and its fields.
pub(crate) const MAX_BODY: usize = 64 * 1024 * 1024;

const PUBLISH: u8 = 1;
const ACK: u8 = 2;
const META: u8 = 3;
const ABSENT: u64 = u64::MAX;

/// A message as its log keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Published {
    pub(crate) seq: u64,
    pub(crate) priority: u8,
    pub(crate) expires_ms: Option<u64>,
    pub(crate) due_ms: Option<u64>,
    pub(crate) key: Option<Key>,
    pub(crate) id: Option<MessageId>,
    pub(crate) payload: Bytes,
}

/// One record of a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Record {
    /// A message entered the queue.
    Publish(Published),
    /// Message `seq` left it.
    Ack(u64),
}

fn header(dst: &mut BytesMut, kind: u8, body: &[u8]) {
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&[kind]);
    crc.update(&len.to_be_bytes());
    crc.update(body);
    dst.put_u8(MAGIC);
    dst.put_u8(kind);
    dst.put_u32(len);
    dst.put_u32(crc.finalize());
}

/// Appends the publish record of `message` to `dst`.
pub(crate) fn put_publish(dst: &mut BytesMut, message: &Published) {
    let mut body = BytesMut::with_capacity(64 + message.payload.len());
    body.put_u64(message.seq);
    let flags = u8::from(message.expires_ms.is_some())
        | u8::from(message.due_ms.is_some()) << 1
        | u8::from(message.key.is_some()) << 2
        | u8::from(message.id.is_some()) << 3;
    body.put_u8(flags);
    body.put_u8(message.priority);
    if let Some(expires) = message.expires_ms {
        body.put_u64(expires);
    }
    if let Some(due) = message.due_ms {
        body.put_u64(due);
    }
    if let Some(key) = &message.key {
        body.put_slice(key);
    }
    if let Some(id) = &message.id {
        body.put_slice(id);
    }
    body.put_slice(&message.payload);
    header(dst, PUBLISH, &body);
    dst.put_slice(&body);
}

/// Appends the ack record of message `seq` to `dst`.
pub(crate) fn put_ack(dst: &mut BytesMut, seq: u64) {
    let body = seq.to_be_bytes();
    header(dst, ACK, &body);
    dst.put_slice(&body);
}

/// The meta file of queue `name`.
pub(crate) fn meta(name: &str, config: &QueueConfig) -> Bytes {
    let mut body = BytesMut::new();
    put_str(&mut body, name);
    body.put_u64(config.max_len.map_or(ABSENT, |max| max as u64));
    body.put_u64(config.max_deliveries.map_or(ABSENT, u64::from));
    body.put_u8(u8::from(config.auto_delete));
    put_str(&mut body, config.dead_letter.as_deref().unwrap_or(""));
    let mut dst = BytesMut::with_capacity(HEADER + body.len());
    header(&mut dst, META, &body);
    dst.put_slice(&body);
    dst.freeze()
}

fn put_str(dst: &mut BytesMut, value: &str) {
    let len = value.len().min(usize::from(u16::MAX));
    dst.put_u16(len as u16);
    dst.put_slice(&value.as_bytes()[..len]);
}

/// Why bytes are not a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Bad {
    /// Fewer bytes left than the header or the body it announces: a write cut short.
    Truncated,
    /// The bytes are there but are not a record.
    Invalid(&'static str),
}

impl Bad {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Bad::Truncated => "the record is cut short",
            Bad::Invalid(why) => why,
        }
    }
}

/// Reads the record at the start of `bytes` (a shared slice, so payloads are not copied); returns it and its
/// length.
pub(crate) fn parse(bytes: &Bytes) -> Result<(Record, usize), Bad> {
    let (kind, body) = frame(bytes)?;
    let len = HEADER + body.len();
    let record = match kind {
        PUBLISH => Record::Publish(publish(body)?),
        ACK => {
            let seq: [u8; 8] = body[..].try_into().map_err(|_| Bad::Invalid("an ack record of the wrong length"))?;
            Record::Ack(u64::from_be_bytes(seq))
        }
        _ => return Err(Bad::Invalid("a record of an unknown kind")),
    };
    Ok((record, len))
}

/// Checks the header and CRC of the record at the start of `bytes`; returns its kind and body.
fn frame(bytes: &Bytes) -> Result<(u8, Bytes), Bad> {
    if bytes.len() < HEADER {
        return Err(Bad::Truncated);
    }
    if bytes[0] != MAGIC {
        return Err(Bad::Invalid("no record starts here (wrong magic byte)"));
    }
    let kind = bytes[1];
    let len_bytes = [bytes[2], bytes[3], bytes[4], bytes[5]];
    let len = u32::from_be_bytes(len_bytes) as usize;
    let crc = u32::from_be_bytes([bytes[6], bytes[7], bytes[8], bytes[9]]);
    if len > MAX_BODY {
        return Err(Bad::Invalid("a record longer than the largest a log writes"));
    }
    if bytes.len() - HEADER < len {
        return Err(Bad::Truncated);
    }
    let body = bytes.slice(HEADER..HEADER + len);
    let mut check = crc32fast::Hasher::new();
    check.update(&[kind]);
    check.update(&len_bytes);
    check.update(&body);
    if check.finalize() != crc {
        return Err(Bad::Invalid("the record's checksum does not match its bytes"));
    }
    Ok((kind, body))
}

/// Whether a whole, intact record starts at the beginning of `bytes`.
pub(crate) fn is_record(bytes: &Bytes) -> bool {
    bytes.first() == Some(&MAGIC) && frame(bytes).is_ok()
}

/// What is at the start of bytes that are not an intact record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Damage {
    /// A plausible header whose record runs past the end, or less than a header: a write cut short.
    Truncated,
    /// A plausible header and all the bytes it announces, which do not check out: the record's extent.
    Extent(usize),
    /// No plausible header: where the next record starts is unknown.
    Unframed,
}

/// Classifies the damaged bytes at the start of `bytes` (which [`parse`] refused).
pub(crate) fn damage(bytes: &[u8]) -> Damage {
    if bytes.len() < HEADER {
        return Damage::Truncated;
    }
    let len = u32::from_be_bytes([bytes[2], bytes[3], bytes[4], bytes[5]]) as usize;
    if bytes[0] != MAGIC || !matches!(bytes[1], PUBLISH | ACK) || len > MAX_BODY {
        return Damage::Unframed;
    }
    if bytes.len() - HEADER < len { Damage::Truncated } else { Damage::Extent(HEADER + len) }
}

/// Whether `bytes` are whole, intact records to their end (or empty).
pub(crate) fn all_records(bytes: &Bytes) -> bool {
    let mut pos = 0;
    while pos < bytes.len() {
        match parse(&bytes.slice(pos..)) {
            Ok((_, len)) => pos += len,
            Err(_) => return false,
        }
    }
    true
}

struct Cursor {
    body: Bytes,
    pos: usize,
}

impl Cursor {
    fn take(&mut self, n: usize) -> Result<&[u8], Bad> {
        if self.body.len() - self.pos < n {
            return Err(Bad::Invalid("a record shorter than its fields"));
        }
        let slice = &self.body[self.pos..self.pos + n];
        self.pos += n;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, Bad> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, Bad> {
        let bytes = self.take(2)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    fn u64(&mut self) -> Result<u64, Bad> {
        let mut raw = [0; 8];
        raw.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(raw))
    }

    fn array(&mut self) -> Result<[u8; 16], Bad> {
        let mut raw = [0; 16];
        raw.copy_from_slice(self.take(16)?);
        Ok(raw)
    }

    fn opt(&mut self) -> Result<Option<u64>, Bad> {
        Ok(Some(self.u64()?).filter(|value| *value != ABSENT))
    }

    fn str(&mut self) -> Result<String, Bad> {
        let len = usize::from(self.u16()?);
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes).map(str::to_owned).map_err(|_| Bad::Invalid("a name that is not UTF-8"))
    }
}

fn publish(body: Bytes) -> Result<Published, Bad> {
    let mut cursor = Cursor { body, pos: 0 };
    let seq = cursor.u64()?;
    let flags = cursor.u8()?;
    if flags & !0x0f != 0 {
        return Err(Bad::Invalid("a publish record with unknown flags"));
    }
    let priority = cursor.u8()?;
    let expires_ms = if flags & 1 != 0 { Some(cursor.u64()?) } else { None };
    let due_ms = if flags & 2 != 0 { Some(cursor.u64()?) } else { None };
    let key = if flags & 4 != 0 { Some(cursor.array()?) } else { None };
    let id = if flags & 8 != 0 { Some(cursor.array()?) } else { None };
    let payload = cursor.body.slice(cursor.pos..);
    Ok(Published { seq, priority, expires_ms, due_ms, key, id, payload })
}

/// Reads a meta file: the queue's name and configuration.
pub(crate) fn parse_meta(bytes: &Bytes) -> Result<(String, QueueConfig), Bad> {
    let (kind, body) = frame(bytes)?;
    if kind != META || bytes.len() != HEADER + body.len() {
        return Err(Bad::Invalid("not a queue's meta record"));
    }
    let mut cursor = Cursor { body, pos: 0 };
    let name = cursor.str()?;
    let max_len = cursor.opt()?.map(|max| usize::try_from(max).unwrap_or(usize::MAX));
    let max_deliveries = cursor.opt()?.map(|max| u32::try_from(max).unwrap_or(u32::MAX));
    let auto_delete = cursor.u8()? != 0;
    let dead_letter = Some(cursor.str()?).filter(|name| !name.is_empty());
    Ok((name, QueueConfig { max_len, max_deliveries, auto_delete, dead_letter, durable: true }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(seq: u64) -> Published {
        Published {
            seq,
            priority: 3,
            expires_ms: Some(1_700_000_000_000),
            due_ms: None,
            key: Some([4; 16]),
            id: Some([5; 16]),
            payload: Bytes::from_static(b"\x81\xa1v\x01"),
        }
    }

    #[test]
    fn records_round_trip() {
        let mut dst = BytesMut::new();
        put_publish(&mut dst, &sample(7));
        put_ack(&mut dst, 7);
        let bytes = dst.freeze();
        let (first, len) = parse(&bytes).expect("a publish");
        assert_eq!(first, Record::Publish(sample(7)));
        let (second, rest) = parse(&bytes.slice(len..)).expect("an ack");
        assert_eq!(second, Record::Ack(7));
        assert_eq!(len + rest, bytes.len());
        let config = QueueConfig {
            max_len: Some(10),
            max_deliveries: None,
            auto_delete: false,
            dead_letter: Some("q.dlq".into()),
            durable: true,
        };
        assert_eq!(parse_meta(&meta("q", &config)), Ok(("q".to_owned(), config)));
    }

    #[test]
    fn every_cut_and_every_flipped_bit_is_refused() {
        let mut dst = BytesMut::new();
        put_publish(&mut dst, &sample(1));
        let bytes = dst.freeze();
        for cut in 0..bytes.len() {
            assert_eq!(parse(&bytes.slice(..cut)), Err(Bad::Truncated), "cut at {cut}");
        }
        for at in 0..bytes.len() {
            for bit in 0..8 {
                let mut flipped = bytes.to_vec();
                flipped[at] ^= 1 << bit;
                assert!(parse(&Bytes::from(flipped)).is_err(), "byte {at} bit {bit} went unnoticed");
            }
        }
    }
}
