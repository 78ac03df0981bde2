#[rpc_core::service]
auto trait Calculator {}

fn main() {}
