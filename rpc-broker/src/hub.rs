//! The engine with its consumers attached: what the embedded transport and the server share, so that both are
//! faces of one broker. Callers hold it behind a mutex and keep each critical section short.

use std::collections::HashMap;
use std::time::Instant;

use rpc_core::Capabilities;

use crate::engine::{self, ConsumerId, Engine, EngineError};

/// What the engine offers, through whichever face: the embedded transport or the server.
pub(crate) const CAPABILITIES: Capabilities = Capabilities {
    durable: false,
    acks: true,
    priority: true,
    delayed_delivery: false,
    max_length: true,
    dead_letter: true,
    dedup_window: None,
    cancel: true,
};

/// The key under which a request can be cancelled: its correlation id. Replies and oneway messages have none.
pub(crate) fn call_key(envelope: &rpc_core::Envelope) -> Option<engine::Key> {
    match (envelope.kind, envelope.correlation_id) {
        (rpc_core::Kind::Request, Some(id)) => Some(*id.as_bytes()),
        _ => None,
    }
}

/// Where a consumer's deliveries go: a channel to an in-process consumer, or a connection's writer.
pub(crate) trait Sink<M>: Send {
    /// Takes one delivery; must not block (it runs under the hub's lock).
    fn deliver(&self, delivery: engine::Delivery<M>, now: Instant);

    /// Tells the consumer that the call of its delivery `tag` was cancelled; must not block either.
    fn abort(&self, tag: u64);
}

pub(crate) struct Hub<M> {
    pub(crate) engine: Engine<M>,
    sinks: HashMap<ConsumerId, Box<dyn Sink<M>>>,
    out: Vec<engine::Delivery<M>>,
}

impl<M> Default for Hub<M> {
    fn default() -> Self {
        Hub { engine: Engine::default(), sinks: HashMap::new(), out: Vec::new() }
    }
}

impl<M: Clone> Hub<M> {
    /// Attaches a consumer to `queue` whose deliveries go to the sink `make_sink` builds for its id. What is
    /// waiting goes to it at the next [`Hub::dispatch`], so that the caller can first tell its peer the id.
    pub(crate) fn attach(
        &mut self,
        queue: &str,
        prefetch: u32,
        auto_ack: bool,
        make_sink: impl FnOnce(ConsumerId) -> Box<dyn Sink<M>>,
    ) -> Result<ConsumerId, EngineError> {
        let id = self.engine.add_consumer(queue, prefetch, auto_ack)?;
        self.sinks.insert(id, make_sink(id));
        Ok(id)
    }

    /// Detaches a consumer; what it held unacked goes to other consumers.
    pub(crate) fn detach(&mut self, id: ConsumerId, now: Instant) {
        self.sinks.remove(&id);
        self.engine.remove_consumer(id, now);
        self.dispatch(now);
    }

    /// Cancels the call `key` on `queue` ([`Engine::cancel`]) and tells the consumers holding it.
    pub(crate) fn cancel(&mut self, queue: &str, key: engine::Key) -> Result<(), EngineError> {
        for (consumer, tag) in self.engine.cancel(queue, key)? {
            if let Some(sink) = self.sinks.get(&consumer) {
                sink.abort(tag);
            }
        }
        Ok(())
    }

    /// Hands every delivery the last operation made possible to its sink.
    pub(crate) fn dispatch(&mut self, now: Instant) {
        let mut out = std::mem::take(&mut self.out);
        self.engine.dispatch(now, &mut out);
        for delivery in out.drain(..) {
            if let Some(sink) = self.sinks.get(&delivery.consumer) {
                sink.deliver(delivery, now);
            }
        }
        self.out = out;
    }
}
