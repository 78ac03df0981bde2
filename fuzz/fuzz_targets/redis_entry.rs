//! Any Redis Streams entry (names and values as Redis returns them) read as a worker reads it: an envelope or the
//! reason it is not one, never a panic, an abort or unbounded memory; an envelope read from `mqrpc-envelope`
//! encodes and reads back the same.
//!
//! Run: `cargo fuzz run -s none redis_entry -- -max_total_time=60` (from the repository root).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rpc_broker::adapter::redis_streams::{ENVELOPE, read_entry};
use rpc_core::codec::{Limits, decode_envelope, encode_envelope};

/// Limits small enough that the fuzzer reaches them.
fn small() -> Limits {
    Limits { max_frame: 1 << 12, ..Limits::default() }
}

fuzz_target!(|fields: Vec<(Vec<u8>, Vec<u8>)>| {
    let whole = fields.iter().any(|(name, _)| name.as_slice() == ENVELOPE.as_bytes());
    if let Ok((envelope, count)) = read_entry(fields, &small()) {
        assert!(count >= 1, "a delivery count below 1");
        if whole {
            let bytes = encode_envelope(&envelope).expect("a read envelope encodes");
            let again = decode_envelope(&bytes, &Limits::default()).expect("an encoded envelope reads");
            assert_eq!(again, envelope);
        }
    }
});
