//! What generated code uses, by absolute path (`::rpc_core::__private::...`). Not a public API.

pub use std::boxed::Box;
pub use std::sync::Arc;

pub use bytes::Bytes;
pub use futures::future::BoxFuture;
pub use serde;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::client::{Call, Client, Notify};
use crate::codec::{self, Limits};
use crate::envelope::Envelope;
use crate::error::Error;
use crate::method::{DecodeFn, Method, MethodKind};
use crate::status::{Code, Status};

/// A method descriptor.
pub const fn method<O>(service: &'static str, name: &'static str, kind: MethodKind, decode: DecodeFn<O>) -> Method<O> {
    Method { service, name, kind, decode }
}

/// A call of `method` with `args`.
pub fn call<O: Send + 'static, A: Serialize>(client: &Client, method: Method<O>, args: &A) -> Call<O> {
    let args = codec::encode(args).map_err(Error::from);
    Call::new(client.handle(), method.service.into(), method.name.into(), method.decode, args)
}

/// A oneway or broadcast call of `method` with `args`.
pub fn notify<A: Serialize>(client: &Client, method: Method<()>, args: &A) -> Notify {
    Notify::new(client.clone(), method, codec::encode(args).map_err(Error::from))
}

/// Decodes the reply of a method returning `T`.
///
/// # Errors
/// [`Error::Remote`] for a status other than ok, [`Error::Codec`] for a body that is not a `T`.
pub fn decode_value<T: DeserializeOwned>(reply: &Envelope) -> Result<T, Error> {
    match Code::from_u16(reply.status) {
        Code::Ok => Ok(codec::decode(&reply.body, &Limits::default())?),
        _ => Err(Error::Remote(reply.status())),
    }
}

/// Decodes the reply of a method returning `Result<T, E>`: the application error arrives as `Ok(Err(e))`.
///
/// # Errors
/// As [`decode_value`].
pub fn decode_result<T: DeserializeOwned, E: DeserializeOwned>(reply: &Envelope) -> Result<Result<T, E>, Error> {
    match Code::from_u16(reply.status) {
        Code::Ok => Ok(Ok(codec::decode(&reply.body, &Limits::default())?)),
        Code::Application => Ok(Err(codec::decode(&reply.body, &Limits::default())?)),
        _ => Err(Error::Remote(reply.status())),
    }
}

/// Decodes a request's arguments.
///
/// # Errors
/// A [`Code::InvalidArgument`] status saying why.
pub fn decode_args<A: DeserializeOwned>(body: &Bytes) -> Result<A, Status> {
    codec::decode(body, &Limits::default())
        .map_err(|error| Status::new(Code::InvalidArgument, format!("the arguments do not decode: {error}")))
}

/// Encodes a handler's output.
///
/// # Errors
/// A [`Code::Internal`] status when the output cannot be encoded.
pub fn encode_value<T: Serialize>(output: &T) -> Result<Bytes, Status> {
    codec::encode(output).map_err(|error| Status::new(Code::Internal, format!("the result does not encode: {error}")))
}

/// Encodes a handler's `Result`: `Err` becomes a [`Code::Application`] status carrying the error value.
///
/// # Errors
/// The application error, or [`Code::Internal`] when a value cannot be encoded.
pub fn encode_result<T: Serialize, E: Serialize>(output: &Result<T, E>) -> Result<Bytes, Status> {
    match output {
        Ok(value) => encode_value(value),
        Err(error) => {
            let details = encode_value(error)?;
            Err(Status::new(Code::Application, "the method returned its error type").with_details(details))
        }
    }
}

/// The answer to a method the service does not have.
pub fn unknown_method(service: &str, method: &str) -> BoxFuture<'static, Result<Bytes, Status>> {
    ready(Err(Status::new(Code::UnknownMethod, format!("service `{service}` has no method `{method}`"))))
}

/// A future that is ready with `value`.
pub fn ready<T: Send + 'static>(value: T) -> BoxFuture<'static, T> {
    Box::pin(std::future::ready(value))
}
