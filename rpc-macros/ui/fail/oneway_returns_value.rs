#[rpc_core::service]
trait Logger {
    #[rpc(oneway)]
    async fn log(&self, line: String) -> bool;
}

fn main() {}
