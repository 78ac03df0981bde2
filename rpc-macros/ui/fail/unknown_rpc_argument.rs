#[rpc_core::service]
trait Logger {
    #[rpc(fire_and_forget)]
    async fn log(&self, line: String);
}

fn main() {}
