#[rpc_core::service]
trait Calculator {
    async fn reset();
}

fn main() {}
