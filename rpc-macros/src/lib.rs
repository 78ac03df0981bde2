//! The `#[service]` attribute of mqrpc.
//!
//! Use it through `rpc_core::service`; this crate holds only the macro. The macro is a pipeline:
//!
//! 1. `parse`: the attribute arguments and the trait, as syn sees them;
//! 2. `model`: the service as the rest of the pipeline needs it (methods, arguments, outputs);
//! 3. `check`: rules across the model (generated names, oneway outputs);
//! 4. `expand`: the trait, the client, the server dispatcher and the descriptors.
//!
//! Every problem found is reported at once, at the offending tokens, and the user's trait is still emitted so
//! that an IDE keeps working.

use proc_macro::TokenStream;

mod check;
mod errors;
mod expand;
mod model;
mod parse;

/// Turns a trait into an mqrpc service. Use it as `#[rpc_core::service]`.
///
/// On a trait whose methods are `async fn name(&self, args...) -> Output`, it generates:
///
/// - **the trait**, each method returning `impl Future<Output = Output> + Send`, and the trait bound by
///   `Send + Sync + 'static`: implement it with plain `async fn`s, and a worker runs the handlers on any task;
/// - **`<Trait>Client`**, the typed stub: `<Trait>Client::new(&client)` over an `rpc_core::Client`, and one
///   method per trait method with the same arguments. A call returns `rpc_core::Call<Output>`: `.await` it for
///   `Result<Output, rpc_core::Error>` (an `Output` of `Result<T, E>` comes back as `Ok(Err(e))` with your `E`),
///   or set per-call options first (`.timeout(..)`, `.idempotency_key(..)`, `.priority(..)`, `.delay(..)`,
///   `.header(..)`), take the result in a callback (`.on_reply(..)`) or send it to a durable callback queue
///   (`.durable("queue")`). A `#[rpc(oneway)]` or `#[rpc(broadcast)]` method returns `rpc_core::Notify`, which
///   resolves once the message is on the queue. `Call` and `Notify` are `IntoFuture`: for `tokio::spawn` or
///   `join_all`, call `.into_future()`;
/// - **`<Trait>Server<S>`**, the dispatcher: `<Trait>Server::new(implementation)`, handed to
///   `rpc_core::Server::serve`;
/// - **one descriptor per method**, `<Trait>Client::ADD` for `add`, naming it for `DurableCallbacks::on`.
///
/// Argument and output types must be `serde::Serialize + serde::de::DeserializeOwned + Send + 'static`
/// (arguments travel as a MessagePack map keyed by parameter name). Arguments are taken by value: no
/// references, no patterns, no generics.
///
/// Arguments of the attribute: `name = "..."` sets the service name on the wire (default: the trait's name).
/// Method attributes: `#[rpc(oneway)]` (fire-and-forget), `#[rpc(broadcast)]` (oneway, delivered to every
/// subscriber group). Every misuse is reported at once, at the offending tokens.
#[proc_macro_attribute]
pub fn service(args: TokenStream, input: TokenStream) -> TokenStream {
    expand::service(args.into(), input.into()).into()
}
