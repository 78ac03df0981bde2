#[rpc_core::service]
trait Calculator {
    async fn add(&self) -> i64;
    #[allow(non_snake_case)]
    async fn ADD(&self) -> i64;
}

fn main() {}
