//! Any bytes given to the envelope decoder: a typed error or an envelope that re-encodes, never a panic, an
//! abort or unbounded memory.
//!
//! Run: `cargo fuzz run -s none envelope -- -max_total_time=60` (from the repository root).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rpc_core::codec::{self, Limits};

fuzz_target!(|data: &[u8]| {
    if let Ok(envelope) = codec::decode_envelope(data, &Limits::default()) {
        let again = codec::encode_envelope(&envelope).expect("a decoded envelope encodes");
        assert_eq!(codec::decode_envelope(&again, &Limits::default()).as_ref(), Ok(&envelope));
        let _ = envelope.status();
    }
});
