//! NATS (placeholder while being written).
