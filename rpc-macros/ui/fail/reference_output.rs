#[rpc_core::service]
trait Greeter {
    async fn name(&self) -> &'static str;
}

fn main() {}
