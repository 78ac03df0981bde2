#[rpc_core::service]
trait Events {
    #[rpc(broadcast)]
    async fn publish(&self, event: String) -> bool;
}

fn main() {}
