// Every problem is reported in one pass, and the trait is still emitted: `Calc` below compiles against it.
#[rpc_core::service]
trait Calculator {
    fn add(&self, a: i64, b: i64) -> i64;
    async fn name(&self, who: &str) -> String;
    async fn consume(self);
}

struct Calc;

impl Calculator for Calc {
    fn add(&self, a: i64, b: i64) -> i64 {
        a + b
    }

    async fn name(&self, who: &str) -> String {
        who.to_owned()
    }

    async fn consume(self) {}
}

fn main() {}
