#[rpc_core::service]
trait Calculator {
    async fn sum(&self, args: ...) -> i64;
}

fn main() {}
