//! Method descriptors: what the generated code knows about each method at compile time.

use std::fmt;

use crate::envelope::Envelope;
use crate::error::Error;

/// Turns a reply into the method's typed output.
pub type DecodeFn<O> = fn(&Envelope) -> Result<O, Error>;

/// How a method is called.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MethodKind {
    /// Request and reply.
    Call,
    /// Fire-and-forget to the service's queue: one worker runs it.
    Oneway,
    /// Fire-and-forget to the service's topic: one worker of every subscriber group runs it.
    Broadcast,
}

/// A method's name and kind, as a dispatcher lists them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MethodInfo {
    /// The method's name on the wire.
    pub name: &'static str,
    /// How it is called.
    pub kind: MethodKind,
}

/// Describes one method of a service, with its output type: generated as `<Trait>Client::<METHOD>`.
///
/// Durable callbacks use it to decode a reply that arrives in another process:
/// `DurableCallbacks::new("sums").on(CalculatorClient::ADD, handler)`.
pub struct Method<O> {
    pub(crate) service: &'static str,
    pub(crate) name: &'static str,
    pub(crate) kind: MethodKind,
    pub(crate) decode: DecodeFn<O>,
}

impl<O> Method<O> {
    /// The service's name on the wire.
    pub fn service(&self) -> &'static str {
        self.service
    }

    /// The method's name on the wire.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// How it is called.
    pub fn kind(&self) -> MethodKind {
        self.kind
    }
}

impl<O> Clone for Method<O> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<O> Copy for Method<O> {}

impl<O> fmt::Debug for Method<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Method")
            .field("service", &self.service)
            .field("name", &self.name)
            .field("kind", &self.kind)
            .finish()
    }
}
