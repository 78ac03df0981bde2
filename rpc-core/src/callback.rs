//! Durable callbacks: replies that go to a named queue and are handled there, by whichever process registers
//! a handler under that name, even one started after the caller stopped.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::Instrument;
use uuid::Uuid;

use crate::envelope::{Envelope, Kind};
use crate::error::Error;
use crate::method::Method;
use crate::naming;
use crate::text::Text;
use crate::trace;
use crate::transport::{self, BoxFuture, ConsumeOptions, QueueOptions, Transport};

/// The reply a durable callback receives.
#[derive(Debug)]
#[non_exhaustive]
pub struct CallbackReply<O> {
    /// The call's correlation id, as [`Call::durable`](crate::Call::durable) returned it.
    pub correlation_id: Option<Uuid>,
    /// The typed result, or the remote error.
    pub result: Result<O, Error>,
    /// The headers the call was sent with.
    pub headers: BTreeMap<String, String>,
}

type Handler = Box<dyn Fn(Envelope) -> BoxFuture<'static, ()> + Send + Sync>;

/// Handlers for the replies sent to one durable callback queue, one per method.
///
/// ```no_run
/// # async fn example(transport: rpc_broker::Embedded) -> Result<(), rpc_core::Error> {
/// # #[rpc_core::service] trait Calculator { async fn add(&self, a: i64, b: i64) -> i64; }
/// let callbacks = rpc_core::DurableCallbacks::new("sums")
///     .on(CalculatorClient::ADD, |reply| async move { println!("sum: {:?}", reply.result) })
///     .start(transport)
///     .await?;
/// # Ok(()) }
/// ```
pub struct DurableCallbacks {
    name: String,
    namespace: Option<String>,
    handlers: HashMap<(Text, Text), Handler>,
}

impl fmt::Debug for DurableCallbacks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DurableCallbacks")
            .field("name", &self.name)
            .field("namespace", &self.namespace)
            .field("methods", &self.handlers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl DurableCallbacks {
    /// Handlers for the callback queue named `name`.
    pub fn new(name: impl Into<String>) -> DurableCallbacks {
        DurableCallbacks { name: name.into(), namespace: None, handlers: HashMap::new() }
    }

    /// The namespace the calls were made in.
    pub fn namespace(mut self, namespace: impl Into<String>) -> DurableCallbacks {
        self.namespace = Some(namespace.into());
        self
    }

    /// Handles the replies of `method` with `handler`; the reply is acked once the handler's future completes,
    /// and dead-lettered if it panics (so that one bad reply cannot stop the others).
    pub fn on<O, F, Fut>(mut self, method: Method<O>, handler: F) -> DurableCallbacks
    where
        O: Send + 'static,
        F: Fn(CallbackReply<O>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let handler: Handler = Box::new(move |envelope: Envelope| {
            let reply = CallbackReply {
                correlation_id: envelope.correlation_id,
                result: (method.decode)(&envelope),
                headers: envelope.headers,
            };
            Box::pin(handler(reply))
        });
        self.handlers.insert((Text::from_static(method.service), Text::from_static(method.name)), handler);
        self
    }

    /// Declares the callback queue and starts handling its replies, one at a time.
    ///
    /// A reply for a method without a handler goes to the queue's dead-letter queue, so nothing is lost.
    ///
    /// # Errors
    /// Whatever the transport reports when declaring or consuming.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub async fn start(self, transport: impl Transport) -> Result<CallbackHandle, Error> {
        let transport = transport::shared(transport);
        let queue = naming::callback_queue(self.namespace.as_deref(), &self.name);
        transport.declare_queue(&queue, &QueueOptions::new().durable(true)).await?;
        let mut consumer = transport.consume(&queue, ConsumeOptions::new().prefetch(16)).await?;
        let handlers = Arc::new(self.handlers);
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            loop {
                let delivery = tokio::select! {
                    biased;
                    _ = &mut stopped => break,
                    delivery = consumer.next() => delivery,
                };
                let Some(delivery) = delivery else { break };
                let envelope = Arc::unwrap_or_clone(delivery.envelope);
                let key = (envelope.service.clone(), envelope.method.clone());
                // A child of the durable call's span: the reply echoes the request's trace context.
                let span = trace::process_span(transport.as_ref(), &envelope, &queue, delivery.delivery_count.max(1));
                let outcome = match handlers.get(&key) {
                    Some(handler) if envelope.kind == Kind::Reply => {
                        match AssertUnwindSafe(handler(envelope)).catch_unwind().instrument(span).await {
                            Ok(()) => delivery.handle.ack().await,
                            Err(_) => {
                                tracing::error!(
                                    service = %key.0,
                                    method = %key.1,
                                    "durable callback handler panicked; dead-lettering the reply"
                                );
                                delivery.handle.dead_letter().await
                            }
                        }
                    }
                    _ => {
                        tracing::warn!(
                            service = %key.0,
                            method = %key.1,
                            "no durable callback handler for this reply; dead-lettering it"
                        );
                        delivery.handle.dead_letter().await
                    }
                };
                if let Err(error) = outcome {
                    tracing::warn!(%error, "could not settle a durable callback reply");
                }
            }
        });
        Ok(CallbackHandle { stop: Some(stop), task })
    }
}

/// Running durable callback handlers. Dropping it stops them; an unfinished reply is redelivered.
#[derive(Debug)]
pub struct CallbackHandle {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl CallbackHandle {
    /// Stops after the reply being handled, if any.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for CallbackHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}
