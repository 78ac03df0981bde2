//! The `#[service]` attribute of mqrpc.
//!
//! Use it through `rpc_core::service`; this crate holds only the macro. The macro is a pipeline:
//!
//! 1. [`parse`](crate::parse): the attribute arguments and the trait, as syn sees them;
//! 2. [`model`](crate::model): the service as the rest of the pipeline needs it (methods, arguments, outputs);
//! 3. [`check`](crate::check): rules across the model (generated names, oneway outputs);
//! 4. [`expand`](crate::expand): the trait, the client, the server dispatcher and the descriptors.
//!
//! Every problem found is reported at once, at the offending tokens, and the user's trait is still emitted so
//! that an IDE keeps working.

use proc_macro::TokenStream;

mod check;
mod errors;
mod expand;
mod model;
mod parse;

/// Turns a trait into an mqrpc service: a `Send`-future trait, a typed client `<Trait>Client`, a dispatcher
/// `<Trait>Server`, and one method descriptor per method (`<Trait>Client::ADD` for `add`).
///
/// Arguments: `name = "..."` sets the service name on the wire (default: the trait's name).
/// Method attributes: `#[rpc(oneway)]` (fire-and-forget), `#[rpc(broadcast)]` (oneway, delivered to every
/// subscriber group).
#[proc_macro_attribute]
pub fn service(args: TokenStream, input: TokenStream) -> TokenStream {
    expand::service(args.into(), input.into()).into()
}
