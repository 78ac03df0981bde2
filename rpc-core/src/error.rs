//! The local error of every fallible operation.

use std::time::Duration;

use crate::codec::CodecError;
use crate::status::Status;

/// What went wrong with a call, a publish or a consumer. The remote side's answer is [`Error::Remote`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No reply arrived within the call's time budget.
    #[error("no reply within {0:?}; the call may still run: make it idempotent or raise the timeout")]
    Timeout(Duration),
    /// The destination queue does not exist.
    #[error("no queue named `{0}`: start a server for the service or declare the queue first")]
    NoRoute(String),
    /// The destination queue is at its maximum length.
    #[error("queue `{0}` is full: its consumers are behind; retry later or raise its max length")]
    QueueFull(String),
    /// The remote side answered with a status other than ok (unknown method, handler panic, ...).
    #[error("remote error: {0}")]
    Remote(Status),
    /// Bytes could not be encoded or decoded.
    #[error("codec error: {0}")]
    Codec(#[from] CodecError),
    /// The call was cancelled with [`Client::cancel`](crate::Client::cancel).
    #[error("the call was cancelled")]
    Cancelled,
    /// The client or server is shut down.
    #[error("shut down")]
    Shutdown,
    /// The connection to the broker is lost.
    #[error("disconnected from the broker")]
    Disconnected,
    /// The reply address was lost while the call waited (the connection dropped, the broker restarted, the
    /// reply queue expired): its reply cannot arrive. Unlike [`Error::Timeout`], this is known at once; the call
    /// may have run, so retry it with the same idempotency key.
    #[error(
        "the reply address was lost (reconnection or broker restart); the call may have run: retry it with the same idempotency key"
    )]
    ReplyLost,
    /// The delivery being settled or answered is no longer this consumer's: the broker took it back when the
    /// consumer's connection or channel was lost, and redelivers it. A worker that sees this must not answer
    /// for the request; another delivery does.
    #[error("the delivery was taken back by the broker (the consumer's connection was lost); it is redelivered")]
    DeliveryLost,
    /// The broker refused the credentials.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// The broker knows who this is, and refuses them this operation on the queue or topic named: ask its
    /// operator for the right (our broker's users file; a broker's own permissions).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// Nobody consumes the destination.
    #[error("no responders for `{0}`: start a server for the service")]
    NoResponders(String),
    /// The transport lacks a capability the operation needs.
    #[error("the transport does not support {0}")]
    Unsupported(&'static str),
    /// An argument of the operation is out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A failure inside a transport.
    #[error("transport error: {0}")]
    Transport(Box<dyn std::error::Error + Send + Sync>),
}

impl Error {
    /// A short snake-case name of the error's kind, stable across versions: for metric labels and span
    /// attributes (`timeout`, `queue_full`, ...). A remote error is its status code's
    /// [`label`](crate::Code::label).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Timeout(_) => "timeout",
            Error::NoRoute(_) => "no_route",
            Error::QueueFull(_) => "queue_full",
            Error::Remote(status) => status.code().label(),
            Error::Codec(_) => "codec",
            Error::Cancelled => "cancelled",
            Error::Shutdown => "shutdown",
            Error::Disconnected => "disconnected",
            Error::ReplyLost => "reply_lost",
            Error::DeliveryLost => "delivery_lost",
            Error::Unauthorized(_) => "unauthorized",
            Error::Forbidden(_) => "forbidden",
            Error::NoResponders(_) => "no_responders",
            Error::Unsupported(_) => "unsupported",
            Error::InvalidArgument(_) => "invalid_argument",
            Error::Transport(_) => "transport",
        }
    }
}

impl From<Status> for Error {
    fn from(status: Status) -> Error {
        Error::Remote(status)
    }
}
