#[rpc_core::service]
trait Calculator {
    async fn add(self: &Self, a: i64, b: i64) -> i64;
}

fn main() {}
