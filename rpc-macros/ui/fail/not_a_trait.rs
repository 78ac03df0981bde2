#[rpc_core::service]
struct Calculator;

fn main() {}
