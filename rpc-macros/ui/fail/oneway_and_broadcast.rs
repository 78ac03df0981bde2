#[rpc_core::service]
trait Events {
    #[rpc(oneway, broadcast)]
    async fn publish(&self, event: String);
}

fn main() {}
