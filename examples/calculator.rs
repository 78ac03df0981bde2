//! The `Calculator` service shared by the `remote_*`, `rabbitmq`, `nats`, `kafka`, `activemq`, `zeromq` and
//! `observability` examples, and its implementation.

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

/// The calculator's implementation the examples serve.
#[derive(Debug)]
pub struct Calc;

impl Calculator for Calc {
    async fn add(&self, a: i64, b: i64) -> i64 {
        a + b
    }

    async fn div(&self, a: f64, b: f64) -> Result<f64, MathError> {
        if b == 0.0 { Err(MathError::DivideByZero) } else { Ok(a / b) }
    }
}
