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

/// Runs `write` on this thread's scratch buffer and returns a copy of what it wrote: cut from a chunk that small
/// copies share ([`cut_small`]), or in one allocation of its exact size.
///
/// A `Vec` written in place and turned into [`Bytes`] costs two allocations (the vector, grown as it goes, then
/// the shared header `Bytes` needs for a vector with spare capacity); every call and every reply is encoded,
/// so the buffer is kept instead. It keeps at most [`SCRATCH_KEEP`] bytes between uses; a `write` that encodes
/// again on the same thread (a `Serialize` implementation that calls [`encode`]) gets a buffer of its own.
fn with_scratch(write: impl FnOnce(&mut Vec<u8>) -> Result<(), CodecError>) -> Result<Bytes, CodecError> {
    SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut out) => {
            out.clear();
            let written = write(&mut out).map(|()| cut_small(&out));
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
    /// The chunk [`cut_small`] cuts from.
    static CHUNK: std::cell::RefCell<bytes::BytesMut> = std::cell::RefCell::new(bytes::BytesMut::new());
}

/// The longest copy [`cut_small`] cuts from a shared chunk; a longer one gets an allocation of its own.
const SMALL: usize = 128;

/// The size of the chunks [`cut_small`] cuts from.
const CHUNK_SIZE: usize = 1_024;

/// A copy of `bytes`, for the small ones cut from a chunk that the copies made on this thread share, [`CHUNK_SIZE`]
/// bytes at a time.
///
/// Every call encodes its arguments, its result and, on a broker's wire, its envelopes: a chunk costs two
/// allocations (its buffer and its reference count) for all the copies cut from it, where a copy of its own
/// costs one, and a second when it is first cloned (the shared header of a `Bytes` made from a `Vec`). A clone of
/// a copy cut from a chunk counts a reference. A chunk is freed with the last of its copies: a copy kept for long
/// (the outcome of a call that the dedup store keeps, the arguments of a call that waits minutes) holds at most
/// one chunk.
pub(crate) fn cut_small(bytes: &[u8]) -> Bytes {
    if bytes.len() > SMALL {
        return Bytes::copy_from_slice(bytes);
    }
    CHUNK.with_borrow_mut(|chunk| {
        if chunk.capacity() < bytes.len() {
            *chunk = bytes::BytesMut::with_capacity(CHUNK_SIZE);
        }
        chunk.extend_from_slice(bytes);
        chunk.split().freeze()
    })
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
    with_scratch(|out| envelope::encode_into(out, envelope, false))
}

/// The bytes `prefix` followed by the encoding of `envelope` (as [`encode_envelope`]), in one allocation of
/// their exact size: a transport's own header before the envelope, say.
///
/// # Errors
/// As [`encode_envelope`].
pub fn encode_envelope_after(prefix: &[u8], envelope: &Envelope) -> Result<Bytes, CodecError> {
    with_scratch(|out| {
        out.extend_from_slice(prefix);
        envelope::encode_into(out, envelope, false)
    })
}

/// As [`encode_envelope_after`], in the envelope's compact form, version 2
/// ([`COMPACT_VERSION`](crate::COMPACT_VERSION)): a request's id and idempotency key are left out where they are
/// its correlation id, a reply does not echo the service and method, and the attempt is left out when it is
/// the first. Only for a reader known to read version 2: a reader of version 1 alone refuses it.
///
/// # Errors
/// As [`encode_envelope`].
pub fn encode_compact_envelope_after(prefix: &[u8], envelope: &Envelope) -> Result<Bytes, CodecError> {
    with_scratch(|out| {
        out.extend_from_slice(prefix);
        envelope::encode_into(out, envelope, true)
    })
}

/// What `write` writes, returned in one allocation of its exact size: `write` gets an empty buffer that this
/// thread reuses (as every encoding here does), to write a transport's frame around an envelope
/// ([`encode_envelope_into`]), say.
///
/// # Errors
/// Whatever `write` returns.
pub fn encode_with(write: impl FnOnce(&mut Vec<u8>) -> Result<(), CodecError>) -> Result<Bytes, CodecError> {
    with_scratch(write)
}

/// Appends the encoding of `envelope` to `out` (as [`encode_envelope`]), after whatever `out` holds: a frame
/// header, say.
///
/// # Errors
/// As [`encode_envelope`].
pub fn encode_envelope_into(out: &mut Vec<u8>, envelope: &Envelope) -> Result<(), CodecError> {
    envelope::encode_into(out, envelope, false)
}

/// Checks and decodes an envelope of either form, version 1 ([`VERSION`](crate::VERSION)) or the compact
/// version 2 ([`COMPACT_VERSION`](crate::COMPACT_VERSION)), rejecting other versions; the envelope's `version`
/// says which it was read from. The body and the strings are copied out of `bytes`; [`decode_envelope_bytes`]
/// shares them instead.
///
/// # Errors
/// [`CodecError::TooLarge`] first; then [`CodecError::Malformed`] or [`CodecError::TooDeep`] for bytes that are
/// not one well-formed value within the limits, [`CodecError::Version`], and [`CodecError::Decode`] for a
/// value that is not an envelope.
pub fn decode_envelope(bytes: &[u8], limits: &Limits) -> Result<Envelope, CodecError> {
    envelope::decode(bytes, limits, |range| Bytes::copy_from_slice(&bytes[range]))
}

/// The reply address and correlation id (`r`, `ri`, `c`) of a message that is not an envelope this build can
/// decode (another version, a missing or mistyped field), so that its sender can be told so: `None` unless
/// `bytes` are one well-formed MessagePack map within `limits` with a string `r`.
pub fn reply_address_of(bytes: &[u8], limits: &Limits) -> Option<(crate::ReplyTo, Option<uuid::Uuid>)> {
    envelope::reply_address(bytes, limits)
}

/// As [`decode_envelope`], with the body and the strings slices of `bytes` rather than copies: they keep
/// `bytes` alive.
///
/// # Errors
/// As [`decode_envelope`].
pub fn decode_envelope_bytes(bytes: &Bytes, limits: &Limits) -> Result<Envelope, CodecError> {
    envelope::decode(bytes, limits, |range| bytes.slice(range))
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
    let mut reader = Reader { bytes, pos: 0 };
    reader.skip_one(limits.max_depth, 0)?;
    if reader.remaining() != 0 {
        return Err(CodecError::Malformed("trailing bytes after the value"));
    }
    Ok(())
}

mod envelope;
mod scan;

use scan::Reader;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::Text;
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
    fn small_encodings_share_chunks_and_outlive_them() {
        let values: Vec<u64> = (0..200).map(|n| n * 1_000_003).collect();
        let encoded: Vec<Bytes> = values.iter().map(|value| encode(value).expect("encodes")).collect();
        // Side by side in one chunk, a new one started when it is full.
        let adjacent = encoded.windows(2).filter(|pair| pair[0].as_ptr_range().end == pair[1].as_ptr()).count();
        assert!(adjacent >= 180, "{adjacent} of 199 pairs adjacent");
        // A clone is the same bytes, not a copy.
        let clone = encoded[7].clone();
        assert_eq!(clone.as_ptr(), encoded[7].as_ptr());
        // Each reads back, and one outlives the others of its chunk.
        for (value, bytes) in values.iter().zip(&encoded) {
            assert_eq!(decode::<u64>(bytes, &Limits::default()), Ok(*value));
        }
        let mut encoded = encoded;
        let kept = encoded.swap_remove(3);
        drop(encoded);
        drop(clone);
        assert_eq!(decode::<u64>(&kept, &Limits::default()), Ok(values[3]));
        // A longer one is a copy of its own, of its exact size.
        let long = vec![1u8; SMALL * 2];
        let bytes = encode(&Bytes::from(long.clone())).expect("encodes");
        assert_eq!(decode::<Bytes>(&bytes, &Limits::default()), Ok(Bytes::from(long)));
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
    fn levels_with_values_after_a_container_are_come_back_to_at_any_depth() {
        // `[[[...[1], 2], 2]...]`: every level has a value after its container, 40 levels to come back to (past
        // the 16 kept on the stack); and the same with the container last, which leaves none.
        let mut after = vec![0x92; 40];
        after.push(0x01);
        after.extend(std::iter::repeat_n(0x02, 40));
        let mut last = Vec::new();
        for _ in 0..40 {
            last.extend([0x92, 0x02]);
        }
        last.push(0x01);
        for bytes in [after, last] {
            for max_depth in [39, 40, 64] {
                let limits = Limits { max_depth, ..Limits::default() };
                assert_eq!(check(&bytes, &limits), reference::check(&bytes, max_depth), "{max_depth}");
            }
            assert_eq!(check(&bytes, &Limits::default()), Ok(()));
            let mut cut = bytes.clone();
            cut.pop();
            assert!(check(&cut, &Limits::default()).is_err());
            assert_eq!(check(&cut, &Limits::default()), reference::check(&cut, 64));
            let mut trailing = bytes;
            trailing.push(0x03);
            assert_eq!(
                check(&trailing, &Limits::default()),
                Err(CodecError::Malformed("trailing bytes after the value"))
            );
        }
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
    fn a_calls_request_in_the_compact_form_leaves_out_its_id_key_and_first_attempt() {
        let correlation = uuid::Uuid::now_v7();
        let mut request = Envelope::with_id(crate::Kind::Request, correlation);
        request.correlation_id = Some(correlation);
        request.service = "Calculator".into();
        request.method = "add".into();
        request.deadline_ms = Some(5_000);
        request.idempotency_key = Some(correlation.simple().to_string().into());
        request.body = Bytes::from_static(b"\x92\x02\x03");
        let full = encode_envelope(&request).expect("encodes");
        let compact = encode_compact_envelope_after(b"", &request).expect("encodes");
        let keys = |bytes: &[u8]| -> Vec<String> {
            let map: BTreeMap<String, serde::de::IgnoredAny> = rmp_serde::from_slice(bytes).expect("a map");
            map.into_keys().collect()
        };
        assert_eq!(keys(&full), ["a", "b", "c", "d", "i", "ik", "k", "m", "s", "v"]);
        assert_eq!(keys(&compact), ["b", "c", "d", "k", "m", "s", "v"]);
        // "i" and its 16 bytes, "ik" and its 32 hex digits, "a": 1.
        assert_eq!(full.len() - compact.len(), (2 + 18) + (3 + 34) + 3);
        let decoded = decode_envelope(&compact, &Limits::default()).expect("decodes");
        assert_eq!((decoded.id, decoded.idempotency_key.as_deref()), (correlation, request.idempotency_key.as_deref()));
        assert_eq!(decoded.version, crate::COMPACT_VERSION);
        // A request without a key says so (nil); one with another key carries it.
        for key in [None, Some(Text::from("order-7"))] {
            request.idempotency_key = key.clone();
            let compact = encode_compact_envelope_after(b"", &request).expect("encodes");
            assert_eq!(decode_envelope(&compact, &Limits::default()).expect("decodes").idempotency_key, key);
        }
        // A reply leaves out its id and the service and method it would echo; its id reads back as its
        // correlation id.
        let reply = request.reply(Ok(Bytes::from_static(b"\x05")));
        let compact = encode_compact_envelope_after(b"", &reply).expect("encodes");
        assert_eq!(keys(&compact), ["b", "c", "k", "v"]);
        assert_eq!(decode_envelope(&compact, &Limits::default()).expect("decodes").id, correlation);
    }

    #[test]
    fn an_unknown_version_is_rejected() {
        let mut envelope = Envelope::new(crate::envelope::Kind::Reply);
        envelope.version = 3;
        let bytes = encode_envelope(&envelope).expect("encodes");
        assert_eq!(decode_envelope(&bytes, &Limits::default()), Err(CodecError::Version(3)));
    }

    #[test]
    fn the_sender_of_what_is_not_an_envelope_is_found_where_it_says() {
        let limits = Limits::default();
        let correlation = uuid::Uuid::new_v4();
        let mut envelope = Envelope::new(crate::envelope::Kind::Request);
        envelope.version = 3;
        envelope.correlation_id = Some(correlation);
        envelope.reply_to = Some(crate::ReplyTo::Inbox("inbox.7".into()));
        let bytes = encode_envelope(&envelope).expect("encodes");
        assert_eq!(
            reply_address_of(&bytes, &limits),
            Some((crate::ReplyTo::Inbox("inbox.7".into()), Some(correlation)))
        );
        // Fields of the wrong type, and fields this build does not know, are skipped; no `r`, no sender.
        let odd = encode(&BTreeMap::from([
            ("r", rmpv_like::Text("cb.q")),
            ("c", rmpv_like::Int(5)),
            ("x", rmpv_like::Int(1)),
        ]))
        .expect("encodes");
        assert_eq!(reply_address_of(&odd, &limits), Some((crate::ReplyTo::Queue("cb.q".into()), None)));
        let anonymous = encode(&BTreeMap::from([("v", 1), ("k", 0)])).expect("encodes");
        assert_eq!(reply_address_of(&anonymous, &limits), None);
        for garbage in [&b"\xc1"[..], b"\x92\x01\x02", b"", b"\x81\xa1r"] {
            assert_eq!(reply_address_of(garbage, &limits), None, "{garbage:?}");
        }
    }

    /// Values of mixed types for a test map.
    mod rmpv_like {
        #[derive(serde::Serialize)]
        #[serde(untagged)]
        pub(super) enum Value {
            Text(&'static str),
            Int(i64),
        }
        pub(super) use Value::{Int, Text};
    }

    /// `envelope` as it reads back from the compact form: version 2, and a reply without the service and method
    /// it would echo, its id its correlation id.
    fn as_compact_reads_it(mut envelope: Envelope) -> Envelope {
        envelope.version = crate::COMPACT_VERSION;
        if envelope.kind == crate::Kind::Reply {
            envelope.id = envelope.correlation_id.unwrap_or(envelope.id);
            envelope.service = Text::new();
            envelope.method = Text::new();
        }
        envelope
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_envelope(&bytes, &Limits::default());
            let _ = reply_address_of(&bytes, &Limits::default());
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
        fn what_decodes_of_a_mutated_compact_request_reads_back_in_both_forms(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            reply in any::<bool>(),
        ) {
            let correlation = uuid::Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0001);
            let mut envelope = Envelope::with_id(crate::Kind::Request, correlation);
            envelope.correlation_id = Some(correlation);
            envelope.service = "Calculator".into();
            envelope.method = "add".into();
            envelope.idempotency_key = Some(correlation.simple().to_string().into());
            let envelope = if reply { envelope.reply(Ok(Bytes::from_static(b"\x05"))) } else { envelope };
            let mut bytes = encode_compact_envelope_after(b"", &envelope).expect("encodes").to_vec();
            for (index, byte) in flips {
                let at = index.index(bytes.len());
                bytes[at] = byte;
            }
            // As the fuzz target `envelope` checks: whatever decodes re-encodes in either form and reads back.
            if let Ok(decoded) = decode_envelope(&bytes, &Limits::default()) {
                let mut full = decoded.clone();
                full.version = crate::VERSION;
                let again = encode_envelope(&decoded).expect("encodes");
                prop_assert_eq!(decode_envelope(&again, &Limits::default()), Ok(full.clone()));
                let compact = as_compact_reads_it(full);
                let again = encode_compact_envelope_after(b"", &decoded).expect("encodes");
                prop_assert_eq!(decode_envelope(&again, &Limits::default()), Ok(compact));
            }
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
        fn the_compact_form_reads_back_as_what_it_leaves_out_says(
            envelope in arbitrary_envelope(),
            keyed_by_call in any::<bool>(),
            keyless in any::<bool>(),
        ) {
            let mut envelope = envelope;
            if let (Some(id), true) = (envelope.correlation_id, keyed_by_call) {
                // A call's request as our clients make it: its id and key are its correlation id.
                envelope.id = id;
                envelope.idempotency_key = (!keyless).then(|| id.simple().to_string().into());
            }
            let compact = encode_compact_envelope_after(b"", &envelope).expect("encodes");
            let full = encode_envelope(&envelope).expect("encodes");
            // Never longer, but for a request without a key, which says so: `ik` nil, 4 bytes, and 2 more where
            // that field makes the map's 16th, whose length takes 3 bytes rather than 1.
            prop_assert!(compact.len() <= full.len() + 6, "{} > {} + 6", compact.len(), full.len());
            let decoded = decode_envelope_bytes(&compact, &Limits::default()).expect("decodes");
            let mut expected = as_compact_reads_it(envelope);
            prop_assert_eq!(&decoded, &expected);
            // Written in the full form again, it is version 1 and the fields it had.
            let again = decode_envelope(&encode_envelope(&decoded).expect("encodes"), &Limits::default());
            expected.version = crate::VERSION;
            prop_assert_eq!(again.expect("decodes"), expected);
        }

        #[test]
        fn the_checker_agrees_with_a_recursive_reading_of_the_format(
            value in arbitrary_value(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            cut in any::<prop::sample::Index>(),
            max_depth in 0usize..5,
        ) {
            let mut bytes = encode(&value).expect("encodes").to_vec();
            for (index, byte) in flips {
                let at = index.index(bytes.len());
                bytes[at] = byte;
            }
            bytes.truncate(cut.index(bytes.len() + 1).max(bytes.len() / 2));
            let limits = Limits { max_depth, ..Limits::default() };
            prop_assert_eq!(check(&bytes, &limits), reference::check(&bytes, max_depth));
        }

        #[test]
        fn whatever_the_checker_accepts_rmp_can_walk(value in arbitrary_value()) {
            let bytes = encode(&value).expect("encodes");
            prop_assert_eq!(check(&bytes, &Limits::default()), Ok(()));
        }
    }

    /// The MessagePack format read the plain way, one call per value, for the checker to agree with.
    mod reference {
        use super::CodecError;

        pub(super) fn check(bytes: &[u8], max_depth: usize) -> Result<(), CodecError> {
            let mut pos = 0;
            value(bytes, &mut pos, 0, max_depth)?;
            if pos != bytes.len() {
                return Err(CodecError::Malformed("trailing bytes after the value"));
            }
            Ok(())
        }

        fn take<'a>(bytes: &'a [u8], pos: &mut usize, n: u64) -> Result<&'a [u8], CodecError> {
            let n = usize::try_from(n).map_err(|_| CodecError::Malformed("length does not fit in memory"))?;
            let rest = &bytes[*pos..];
            if n > rest.len() {
                return Err(CodecError::Malformed("truncated input"));
            }
            *pos += n;
            Ok(&rest[..n])
        }

        fn uint(bytes: &[u8], pos: &mut usize, width: u64) -> Result<u64, CodecError> {
            Ok(take(bytes, pos, width)?.iter().fold(0, |acc, byte| (acc << 8) | u64::from(*byte)))
        }

        /// Reads one value that sits inside `level` containers.
        fn value(bytes: &[u8], pos: &mut usize, level: usize, max_depth: usize) -> Result<(), CodecError> {
            let marker = take(bytes, pos, 1)?[0];
            let (skip, items) = match marker {
                0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => return Ok(()),
                0xc1 => return Err(CodecError::Malformed("reserved marker 0xc1")),
                0xa0..=0xbf => (u64::from(marker & 0x1f), None),
                0x80..=0x8f => (0, Some(2 * u64::from(marker & 0x0f))),
                0x90..=0x9f => (0, Some(u64::from(marker & 0x0f))),
                0xc4 | 0xd9 => (uint(bytes, pos, 1)?, None),
                0xc5 | 0xda => (uint(bytes, pos, 2)?, None),
                0xc6 | 0xdb => (uint(bytes, pos, 4)?, None),
                0xc7 => (uint(bytes, pos, 1)? + 1, None),
                0xc8 => (uint(bytes, pos, 2)? + 1, None),
                0xc9 => (uint(bytes, pos, 4)? + 1, None),
                0xcc | 0xd0 => (1, None),
                0xcd | 0xd1 | 0xd4 => (2, None),
                0xd5 => (3, None),
                0xca | 0xce | 0xd2 => (4, None),
                0xd6 => (5, None),
                0xcb | 0xcf | 0xd3 => (8, None),
                0xd7 => (9, None),
                0xd8 => (17, None),
                0xdc => (0, Some(uint(bytes, pos, 2)?)),
                0xdd => (0, Some(uint(bytes, pos, 4)?)),
                0xde => (0, Some(2 * uint(bytes, pos, 2)?)),
                0xdf => (0, Some(2 * uint(bytes, pos, 4)?)),
            };
            let Some(items) = items else { return take(bytes, pos, skip).map(drop) };
            if level + 1 > max_depth {
                return Err(CodecError::TooDeep { max: max_depth });
            }
            if items > (bytes.len() - *pos) as u64 {
                return Err(CodecError::Malformed("container longer than the input"));
            }
            (0..items).try_for_each(|_| value(bytes, pos, level + 1, max_depth))
        }
    }

    fn arbitrary_envelope() -> impl Strategy<Value = Envelope> {
        let text = || proptest::option::of(".{0,40}");
        (
            (0u8..3, any::<u128>(), proptest::option::of(any::<u128>()), ".{0,300}", ".{0,12}", text()),
            (proptest::option::of(any::<u64>()), proptest::option::of(any::<u64>()), any::<u32>(), text()),
            (proptest::option::of(0u8..10), any::<u16>(), text(), text(), proptest::option::of(any::<u16>())),
            (
                proptest::collection::btree_map(".{0,8}", ".{0,70}", 0..20),
                proptest::collection::vec(any::<u8>(), 0..600),
                any::<bool>(),
            ),
        )
            .prop_map(
                |((kind, id, correlation, service, method, reply_to), numbers, reply, (headers, body, inbox))| {
                    let (deadline_ms, delay_ms, attempt, idempotency_key) = numbers;
                    let (priority, status, status_message, caller, last_status) = reply;
                    let mut envelope = Envelope::new(crate::envelope::Kind::try_from(kind).expect("a kind"));
                    envelope.id = uuid::Uuid::from_u128(id);
                    envelope.correlation_id = correlation.map(uuid::Uuid::from_u128);
                    envelope.service = service.into();
                    envelope.method = method.into();
                    envelope.reply_to = reply_to.map(|address| match inbox {
                        true => crate::ReplyTo::Inbox(address.into()),
                        false => crate::ReplyTo::Queue(address.into()),
                    });
                    envelope.deadline_ms = deadline_ms;
                    envelope.delay_ms = delay_ms;
                    envelope.attempt = attempt;
                    envelope.idempotency_key = idempotency_key.map(Into::into);
                    envelope.priority = priority;
                    envelope.status = status;
                    envelope.status_message = status_message;
                    envelope.last_status = last_status;
                    envelope.caller = caller.map(Into::into);
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
        ls: Option<u16>,
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
                ls: e.last_status,
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
