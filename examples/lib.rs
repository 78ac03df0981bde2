//! What the `remote_*`, `rabbitmq`, `nats`, `kafka` and `activemq` examples share: the `Calculator` service, and
//! the worker and the client they run on every transport. Each example is a program of its own; this library is
//! their common part.

pub mod calculator;
pub mod roles;
