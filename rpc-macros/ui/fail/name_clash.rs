#[rpc_core::service]
trait Factory {
    async fn new(&self) -> u64;
}

fn main() {}
