//! Any bytes given to the envelope decoder: a typed error or an envelope that re-encodes, never a panic, an
//! abort or unbounded memory.
//!
//! Run: `cargo fuzz run -s none envelope -- -max_total_time=60` (from the repository root).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rpc_core::codec::{self, Limits};

fuzz_target!(|data: &[u8]| {
    if let Ok(envelope) = codec::decode_envelope(data, &Limits::default()) {
        // In the full form it reads back as version 1, whichever version it was read from.
        let mut full = envelope.clone();
        full.version = rpc_core::VERSION;
        let again = codec::encode_envelope(&envelope).expect("a decoded envelope encodes");
        assert_eq!(codec::decode_envelope(&again, &Limits::default()).as_ref(), Ok(&full));
        // In the compact form, as version 2, a reply without the service and method it would echo, its id
        // read back as its correlation id.
        let mut compact = full;
        compact.version = rpc_core::COMPACT_VERSION;
        if compact.kind == rpc_core::Kind::Reply {
            compact.id = compact.correlation_id.unwrap_or(compact.id);
            compact.service = rpc_core::Text::new();
            compact.method = rpc_core::Text::new();
        }
        let again = codec::encode_compact_envelope_after(b"", &envelope).expect("a decoded envelope encodes");
        assert_eq!(codec::decode_envelope(&again, &Limits::default()).as_ref(), Ok(&compact));
        let _ = envelope.status();
    }
});
