#[rpc_core::service]
trait Calculator {
    const async fn add(&self, a: i64, b: i64) -> i64;
}

fn main() {}
