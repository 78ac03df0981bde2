//! The status a reply carries: a code, a message and optional details.

use std::fmt;

use bytes::Bytes;

/// What happened to a call, as it travels in a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Code {
    /// The handler ran and returned a value (the reply body).
    Ok,
    /// The handler returned the method's own error type (the reply body holds it).
    Application,
    /// The service has no method of that name.
    UnknownMethod,
    /// The arguments did not decode into the method's parameters.
    InvalidArgument,
    /// The deadline passed before the handler ran or finished.
    DeadlineExceeded,
    /// The handler panicked or its result could not be encoded.
    Internal,
    /// The server is shutting down.
    Unavailable,
    /// A limit on the server side was reached.
    ResourceExhausted,
    /// The envelope was not a request this server can handle.
    InvalidRequest,
    /// The call was cancelled.
    Cancelled,
    /// Nobody consumes the destination: the transport answered for a broker that reported no responders
    /// (NATS), so the call fails at once instead of waiting for its timeout.
    NoResponders,
    /// The request failed on every attempt its retry policy allows and went to the dead-letter queue; the
    /// message carries the last failure.
    DeadLettered,
    /// The broker has no queue of the request's destination: written by a broker, into the caller's inbox,
    /// for a request it did not take (our broker, for clients of its protocol version 9), never by a worker.
    /// The client fails the call with [`Error::NoRoute`](crate::Error::NoRoute).
    NoRoute,
    /// The broker refused the request because its queue is full, or the broker is at its memory limit; as
    /// [`Code::NoRoute`], the call fails with [`Error::QueueFull`](crate::Error::QueueFull).
    QueueFull,
    /// The caller's user may not publish the request where it went; as [`Code::NoRoute`], the call fails with
    /// [`Error::Forbidden`](crate::Error::Forbidden).
    Forbidden,
    /// The broker refused the request for another reason, which the message gives; as [`Code::NoRoute`], the
    /// call fails with [`Error::InvalidArgument`](crate::Error::InvalidArgument).
    Refused,
    /// A code this build does not know.
    Other(u16),
}

impl Code {
    /// The number of this code on the wire.
    pub fn as_u16(self) -> u16 {
        match self {
            Code::Ok => 0,
            Code::Application => 1,
            Code::UnknownMethod => 2,
            Code::InvalidArgument => 3,
            Code::DeadlineExceeded => 4,
            Code::Internal => 5,
            Code::Unavailable => 6,
            Code::ResourceExhausted => 7,
            Code::InvalidRequest => 8,
            Code::Cancelled => 9,
            Code::NoResponders => 10,
            Code::DeadLettered => 11,
            Code::NoRoute => 12,
            Code::QueueFull => 13,
            Code::Forbidden => 14,
            Code::Refused => 15,
            Code::Other(code) => code,
        }
    }

    /// The code for a number on the wire; unknown numbers become [`Code::Other`].
    pub fn from_u16(code: u16) -> Code {
        match code {
            0 => Code::Ok,
            1 => Code::Application,
            2 => Code::UnknownMethod,
            3 => Code::InvalidArgument,
            4 => Code::DeadlineExceeded,
            5 => Code::Internal,
            6 => Code::Unavailable,
            7 => Code::ResourceExhausted,
            8 => Code::InvalidRequest,
            9 => Code::Cancelled,
            10 => Code::NoResponders,
            11 => Code::DeadLettered,
            12 => Code::NoRoute,
            13 => Code::QueueFull,
            14 => Code::Forbidden,
            15 => Code::Refused,
            other => Code::Other(other),
        }
    }
}

impl Code {
    /// A short snake-case name, stable across versions: for metric labels and span attributes. A code this
    /// build does not know is `other`.
    pub fn label(self) -> &'static str {
        match self {
            Code::Ok => "ok",
            Code::Application => "application_error",
            Code::UnknownMethod => "unknown_method",
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::ResourceExhausted => "resource_exhausted",
            Code::InvalidRequest => "invalid_request",
            Code::Cancelled => "cancelled",
            Code::NoResponders => "no_responders",
            Code::DeadLettered => "dead_lettered",
            Code::NoRoute => "no_route",
            Code::QueueFull => "queue_full",
            Code::Forbidden => "forbidden",
            Code::Refused => "refused",
            Code::Other(_) => "other",
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Code::Ok => "ok",
            Code::Application => "application error",
            Code::UnknownMethod => "unknown method",
            Code::InvalidArgument => "invalid argument",
            Code::DeadlineExceeded => "deadline exceeded",
            Code::Internal => "internal error",
            Code::Unavailable => "unavailable",
            Code::ResourceExhausted => "resource exhausted",
            Code::InvalidRequest => "invalid request",
            Code::Cancelled => "cancelled",
            Code::NoResponders => "no responders",
            Code::DeadLettered => "dead-lettered",
            Code::NoRoute => "no route",
            Code::QueueFull => "queue full",
            Code::Forbidden => "forbidden",
            Code::Refused => "refused by the broker",
            Code::Other(code) => return write!(f, "code {code}"),
        };
        f.write_str(name)
    }
}

/// A reply's status: the code, a human-readable message and optional details (MessagePack).
///
/// A [`Code::DeadLettered`] status also carries the code of the last failure ([`Status::cause`]); when that
/// was the method's own error, the details are its value, which [`Status::application_error`] decodes:
///
/// ```
/// use rpc_core::{Code, Status};
///
/// let value = rmp_serde::to_vec_named(&"out of stock").expect("encodes");
/// let status = Status::new(Code::DeadLettered, "gave up after attempt 3 of 3")
///     .with_cause(Code::Application)
///     .with_details(value.into());
/// let error: Option<String> = status.application_error().transpose().expect("decodes");
/// assert_eq!(error.as_deref(), Some("out of stock"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    code: Code,
    message: String,
    details: Bytes,
    cause: Option<Code>,
}

impl Status {
    /// A status with `code` and `message` and no details.
    pub fn new(code: Code, message: impl Into<String>) -> Status {
        Status { code, message: message.into(), details: Bytes::new(), cause: None }
    }

    /// The same status naming `cause`, the code of the failure that led to it (the last attempt's, for
    /// [`Code::DeadLettered`]).
    pub fn with_cause(mut self, cause: Code) -> Status {
        self.cause = Some(cause);
        self
    }

    /// The code of the failure that led to this status, where it says: for [`Code::DeadLettered`], what the
    /// last attempt returned.
    pub fn cause(&self) -> Option<Code> {
        self.cause
    }

    /// The method's own error value `E`, where this status carries one: a [`Code::Application`] status, or a
    /// [`Code::DeadLettered`] one whose last attempt returned the method's error. `None` for any other status;
    /// `Some(Err(_))` when the details are not an `E`.
    pub fn application_error<E: serde::de::DeserializeOwned>(&self) -> Option<Result<E, crate::codec::CodecError>> {
        let carries = self.code == Code::Application || self.cause == Some(Code::Application);
        carries.then(|| crate::codec::decode(&self.details, &crate::codec::Limits::default()))
    }

    /// The same status carrying `details`.
    pub fn with_details(mut self, details: Bytes) -> Status {
        self.details = details;
        self
    }

    /// The code.
    pub fn code(&self) -> Code {
        self.code
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The details: for [`Code::Application`], the MessagePack of the method's error value.
    pub fn details(&self) -> &Bytes {
        &self.details
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.message.is_empty() { write!(f, "{}", self.code) } else { write!(f, "{}: {}", self.code, self.message) }
    }
}

impl std::error::Error for Status {}
