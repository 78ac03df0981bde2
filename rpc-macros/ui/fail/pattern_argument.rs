#[rpc_core::service]
trait Geometry {
    async fn area(&self, (w, h): (f64, f64)) -> f64;
}

fn main() {}
