//! Any bytes a STOMP server sends, given to the frame decoder in one piece and split in two: a typed error or
//! frames that re-encode and decode the same, never a panic, an abort or unbounded memory.
//!
//! Run: `cargo fuzz run -s none stomp_frame -- -max_total_time=60` (from the repository root).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use rpc_broker::adapter::stomp::codec::{Item, Limits, StompCodec};
use tokio_util::codec::{Decoder, Encoder};

/// Limits small enough that the fuzzer reaches them.
fn small() -> Limits {
    Limits { max_frame_bytes: 1 << 16, max_header_bytes: 4096, max_headers: 32 }
}

fn decode(chunks: &[&[u8]], limits: Limits) -> Result<Vec<Item>, String> {
    let mut codec = StompCodec::new(limits);
    let mut src = BytesMut::new();
    let mut items = Vec::new();
    for chunk in chunks {
        src.extend_from_slice(chunk);
        loop {
            match codec.decode(&mut src) {
                Ok(Some(item)) => items.push(item),
                Ok(None) => break,
                Err(error) => return Err(error.to_string()),
            }
        }
    }
    Ok(items)
}

fuzz_target!(|data: &[u8]| {
    let whole = decode(&[data], small());
    let split = data.len() / 2;
    let halves = decode(&[&data[..split], &data[split..]], small());
    assert_eq!(whole.is_ok(), halves.is_ok(), "splitting the bytes changed whether they read");
    if let (Ok(whole), Ok(halves)) = (&whole, &halves) {
        assert_eq!(whole, halves);
        for item in whole {
            let mut bytes = BytesMut::new();
            // A frame that was read escaped may hold what a CONNECT frame cannot carry: then it is refused.
            if StompCodec::new(Limits::default()).encode(item.clone(), &mut bytes).is_ok() {
                let again = decode(&[&bytes], Limits::default()).expect("an encoded frame reads");
                let mut again = again.into_iter();
                let Some(mut back) = again.next() else { panic!("nothing read back") };
                if let (Item::Frame(back), Item::Frame(original)) = (&mut back, item) {
                    back.headers.retain(|(name, _)| name != "content-length");
                    let mut original = original.clone();
                    original.headers.retain(|(name, _)| name != "content-length");
                    assert_eq!(back, &original);
                } else {
                    assert_eq!(&back, item);
                }
            }
        }
    }
});
