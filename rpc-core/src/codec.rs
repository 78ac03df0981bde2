//! Encoding and decoding with limits: every untrusted byte string is size-checked and structure-checked by
//! our own non-recursive scanner before serde sees it.
//!
//! The scanner walks the MessagePack once, iteratively, and rejects truncated input, trailing bytes, the
//! reserved marker `0xc1`, container lengths larger than the bytes left, and nesting deeper than
//! [`Limits::max_depth`]. rmp-serde's own depth limit can be bypassed (a recursive enum 30,000 levels deep
//! aborts the process), so it is not relied on.

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::envelope::{Envelope, VERSION};

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
    rmp_serde::to_vec_named(value).map(Bytes::from).map_err(|error| CodecError::Encode(error.to_string()))
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

/// Encodes an envelope.
///
/// # Errors
/// [`CodecError::Encode`] when serialization fails.
pub fn encode_envelope(envelope: &Envelope) -> Result<Bytes, CodecError> {
    encode(envelope)
}

/// Checks and decodes an envelope, rejecting versions other than [`VERSION`].
///
/// # Errors
/// As [`decode`], plus [`CodecError::Version`].
pub fn decode_envelope(bytes: &[u8], limits: &Limits) -> Result<Envelope, CodecError> {
    let envelope: Envelope = decode(bytes, limits)?;
    if envelope.version != VERSION {
        return Err(CodecError::Version(envelope.version));
    }
    Ok(envelope)
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
    // Values still to read at each open level; the bottom entry is the one top-level value.
    let mut pending: Vec<u64> = vec![1];
    while let Some(last) = pending.last_mut() {
        if *last == 0 {
            pending.pop();
            continue;
        }
        *last -= 1;
        let items = reader.skip_value()?;
        if items > 0 {
            if pending.len() > limits.max_depth {
                return Err(CodecError::TooDeep { max: limits.max_depth });
            }
            if items > reader.remaining() as u64 {
                return Err(CodecError::Malformed("container longer than the input"));
            }
            pending.push(items);
        } else if items == 0 && reader.last_was_container && pending.len() > limits.max_depth {
            return Err(CodecError::TooDeep { max: limits.max_depth });
        }
    }
    if reader.remaining() != 0 {
        return Err(CodecError::Malformed("trailing bytes after the value"));
    }
    Ok(())
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    last_was_container: bool,
}

impl Reader<'_> {
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
        envelope.reply_to = Some("inbox.1".into());
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
            envelope.reply_to = Some("inbox".into());
            let mut bytes = encode_envelope(&envelope).expect("encodes").to_vec();
            for (index, byte) in flips {
                let at = index.index(bytes.len());
                bytes[at] = byte;
            }
            bytes.truncate(cut.index(bytes.len() + 1));
            let _ = decode_envelope(&bytes, &Limits::default());
        }

        #[test]
        fn whatever_the_checker_accepts_rmp_can_walk(value in arbitrary_value()) {
            let bytes = encode(&value).expect("encodes");
            prop_assert_eq!(check(&bytes, &Limits::default()), Ok(()));
        }
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
        envelope.reply_to = Some("inbox.7".into());
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
