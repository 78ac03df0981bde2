//! Any bytes given to the checker our broker runs on every payload it takes (`codec::check`): a typed error,
//! never a panic; it accepts exactly what rmp walks to its end as one MessagePack value, but for the depth
//! limit; and every envelope the decoder accepts, the checker accepts too (the broker never refuses what a
//! worker would read).
//!
//! The first byte picks the depth limit (0 to 7, or the default from 8 up); the rest is the input.
//!
//! Run: `cargo fuzz run -s none check -- -max_total_time=60` (from the repository root).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rpc_core::codec::{self, CodecError, Limits};
use serde::Deserialize;

fuzz_target!(|data: &[u8]| {
    let Some((&depth, bytes)) = data.split_first() else { return };
    let limits = match depth {
        0..=7 => Limits { max_depth: usize::from(depth), ..Limits::default() },
        _ => Limits::default(),
    };
    let mut rest = bytes;
    let walked = serde::de::IgnoredAny::deserialize(&mut rmp_serde::Deserializer::new(&mut rest)).is_ok();
    match codec::check(bytes, &limits) {
        Ok(()) => {
            assert!(walked, "the checker accepted what rmp cannot walk");
            assert!(rest.is_empty(), "the checker accepted bytes after the value");
        }
        // What rmp walks to its end is refused only for its depth: under the default limit, it passes or is
        // still too deep.
        Err(CodecError::TooDeep { .. }) => {
            if walked && rest.is_empty() {
                let again = codec::check(bytes, &Limits::default());
                assert!(matches!(again, Ok(()) | Err(CodecError::TooDeep { .. })), "{again:?} at the default depth");
            }
        }
        Err(CodecError::TooLarge { .. } | CodecError::Malformed(_)) => {
            assert!(!(walked && rest.is_empty()), "the checker refused a value rmp walks to its end");
        }
        Err(other) => panic!("the checker failed with {other:?}"),
    }
    if codec::decode_envelope(bytes, &Limits::default()).is_ok() {
        assert_eq!(
            codec::check(bytes, &Limits::default()),
            Ok(()),
            "the checker refused an envelope the decoder reads"
        );
    }
});
