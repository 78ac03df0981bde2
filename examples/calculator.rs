//! The `Calculator` service shared by the `remote_*`, `rabbitmq`, `nats`, `kafka` and `activemq` examples.

use serde::{Deserialize, Serialize};

/// The error `div` returns.
#[derive(Debug, Serialize, Deserialize)]
pub enum MathError {
    /// The divisor was zero.
    DivideByZero,
}

/// A calculator, served over a queue.
#[rpc_core::service]
pub trait Calculator {
    /// Adds two numbers.
    async fn add(&self, a: i64, b: i64) -> i64;
    /// Divides `a` by `b`, or says why not.
    async fn div(&self, a: f64, b: f64) -> Result<f64, MathError>;
}
