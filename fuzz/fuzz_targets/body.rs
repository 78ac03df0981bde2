//! Any bytes given to the body decoder as a recursive user type: the depth check stops a deep value before
//! serde recurses into it.
//!
//! Run: `cargo fuzz run -s none body -- -max_total_time=60` (from the repository root).
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use rpc_core::codec::{self, Limits};

#[derive(Debug, serde::Deserialize)]
#[allow(dead_code)]
enum Tree {
    Leaf(i64),
    Text(String),
    Node(Vec<Tree>),
    Map(BTreeMap<String, Tree>),
}

fuzz_target!(|data: &[u8]| {
    let _ = codec::check(data, &Limits::default());
    let _ = codec::decode::<Tree>(data, &Limits::default());
    let _ = codec::decode::<BTreeMap<String, Vec<i64>>>(data, &Limits::default());
});
