//! Any multipart message a ZeroMQ peer sends, given to the protocol's parser: a typed error, or a command that
//! writes back to frames that read the same; never a panic, an abort or unbounded memory. The input is cut into
//! frames by one length byte each; an even first byte puts the protocol frame in front, so that the fuzzer
//! spends its time past it.
//!
//! Run: `cargo fuzz run -s none zmq_frames -- -max_total_time=60` (from the repository root).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use rpc_broker::adapter::zmq::wire::{Command, PROTOCOL, Published};
use rpc_core::codec::Limits;

/// Limits small enough that the fuzzer reaches them.
fn small() -> Limits {
    Limits { max_frame: 64, max_depth: 8 }
}

fn frames(data: &[u8]) -> Vec<Bytes> {
    let mut frames = Vec::new();
    if data.first().is_some_and(|first| first % 2 == 0) {
        frames.push(Bytes::from_static(PROTOCOL));
    }
    let mut rest = data.get(1..).unwrap_or_default();
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len).min(tail.len());
        frames.push(Bytes::copy_from_slice(&tail[..len]));
        rest = &tail[len..];
    }
    frames
}

fuzz_target!(|data: &[u8]| {
    let frames = frames(data);
    if let Ok(command) = Command::parse(&frames, &small()) {
        assert_eq!(Command::parse(&command.frames(), &small()), Ok(command), "a command that does not read back");
    }
    let _ = Published::parse(&frames, &small());
});
