//! The engine in-process, as a [`Transport`]: the default broker for quickstarts, tests and single-process
//! applications. Nothing to install or start.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rpc_core::{
    AckHandle, Acker, BoxFuture, Capabilities, ConsumeOptions, Consumer, ConsumerControl, Delivery, Envelope, Error,
    Inbox, Outcome, QueueOptions, QueueStats, Transport, naming,
};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::engine::{self, ConsumerId, Engine, EngineError, Props, QueueConfig, Settle};

/// An in-process broker. Clones share one broker: hand a clone to each client and server.
#[derive(Clone, Default)]
pub struct Embedded {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    engine: Engine<Envelope>,
    consumers: HashMap<ConsumerId, Attached>,
    out: Vec<engine::Delivery<Envelope>>,
}

struct Attached {
    sender: mpsc::UnboundedSender<Delivery>,
    acker: Arc<dyn Acker>,
}

impl fmt::Debug for Embedded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("Embedded").field("engine", &state.engine).finish()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    /// Hands every delivery the last operation made possible to its consumer.
    fn dispatch(&mut self, now: Instant) {
        let mut out = std::mem::take(&mut self.out);
        self.engine.dispatch(now, &mut out);
        for delivery in out.drain(..) {
            let Some(attached) = self.consumers.get(&delivery.consumer) else { continue };
            let mut envelope = delivery.message;
            if let Some(remaining) = delivery.remaining_ttl {
                envelope.deadline_ms = Some(u64::try_from(remaining.as_millis()).unwrap_or(u64::MAX));
            }
            let handle = if delivery.tag == 0 {
                AckHandle::auto()
            } else {
                AckHandle::new(Arc::clone(&attached.acker), delivery.tag)
            };
            // A closed receiver means the consumer is being dropped; its unacked deliveries are requeued
            // when its guard removes it.
            let delivery = Delivery { envelope, delivery_count: delivery.delivery_count, received_at: now, handle };
            let _ = attached.sender.send(delivery);
        }
        self.out = out;
    }

    fn attach(&mut self, shared: &Arc<Shared>, queue: &str, options: ConsumeOptions) -> Result<Consumer, Error> {
        let id = self.engine.add_consumer(queue, options.prefetch, options.auto_ack).map_err(to_error)?;
        let (sender, receiver) = mpsc::unbounded_channel();
        let acker: Arc<dyn Acker> = Arc::new(EmbeddedAcker { shared: Arc::downgrade(shared), consumer: id });
        self.consumers.insert(id, Attached { sender, acker });
        self.dispatch(Instant::now());
        let guard = ConsumerGuard { shared: Arc::downgrade(shared), consumer: id };
        Ok(Consumer::new(UnboundedStream(receiver).boxed(), Some(Box::new(guard))))
    }
}

fn to_error(error: EngineError) -> Error {
    match error {
        EngineError::NoQueue(queue) => Error::NoRoute(queue),
        EngineError::QueueFull(queue) => Error::QueueFull(queue),
        EngineError::Mismatch(queue) => {
            Error::InvalidArgument(format!("queue `{queue}` exists with other options; declare it with the same ones"))
        }
        EngineError::InvalidConfig(why) => Error::InvalidArgument(why),
        other => Error::Transport(Box::new(other)),
    }
}

fn props(envelope: &Envelope) -> Props {
    Props { priority: envelope.priority.unwrap_or(0), ttl: envelope.deadline_ms.map(Duration::from_millis) }
}

fn queue_config(queue: &str, options: &QueueOptions) -> QueueConfig {
    QueueConfig {
        max_len: options.max_len,
        max_deliveries: options.max_deliveries,
        auto_delete: false,
        dead_letter: Some(naming::dead_letter_queue(queue)),
    }
}

impl Embedded {
    /// A new, empty broker.
    pub fn new() -> Embedded {
        Embedded::default()
    }

    fn declare(&self, queue: &str, options: &QueueOptions) -> Result<(), Error> {
        let mut state = self.shared.lock();
        if *options == QueueOptions::default() && state.engine.has_queue(queue) {
            return Ok(());
        }
        state.engine.declare_queue(queue, queue_config(queue, options)).map_err(to_error)
    }

    fn publish_now(&self, queue: &str, envelope: Envelope) -> Result<(), Error> {
        let now = Instant::now();
        let mut state = self.shared.lock();
        let props = props(&envelope);
        state.engine.publish(queue, envelope, props, now).map_err(to_error)?;
        state.dispatch(now);
        Ok(())
    }
}

impl Transport for Embedded {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            durable: false,
            acks: true,
            priority: true,
            delayed_delivery: false,
            max_length: true,
            dead_letter: true,
            dedup_window: None,
        }
    }

    fn declare_queue<'a>(&'a self, queue: &'a str, options: &'a QueueOptions) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(std::future::ready(self.declare(queue, options)))
    }

    fn publish<'a>(&'a self, queue: &'a str, envelope: Envelope) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(std::future::ready(self.publish_now(queue, envelope)))
    }

    fn publish_topic<'a>(&'a self, topic: &'a str, envelope: Envelope) -> BoxFuture<'a, Result<(), Error>> {
        let now = Instant::now();
        let mut state = self.shared.lock();
        let props = props(&envelope);
        let result = state.engine.publish_topic(topic, envelope, props, now).map(drop).map_err(to_error);
        state.dispatch(now);
        Box::pin(std::future::ready(result))
    }

    fn consume<'a>(&'a self, queue: &'a str, options: ConsumeOptions) -> BoxFuture<'a, Result<Consumer, Error>> {
        let result = self.shared.lock().attach(&self.shared, queue, options);
        Box::pin(std::future::ready(result))
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        options: ConsumeOptions,
    ) -> BoxFuture<'a, Result<Consumer, Error>> {
        let mut state = self.shared.lock();
        let queue = engine::group_queue(topic, group);
        if !state.engine.has_queue(&queue) {
            let declared = state.engine.declare_queue(&queue, queue_config(&queue, &QueueOptions::default()));
            if let Err(error) = declared {
                return Box::pin(std::future::ready(Err(to_error(error))));
            }
        }
        state.engine.subscribe_group(topic, group);
        let result = state.attach(&self.shared, &queue, options);
        Box::pin(std::future::ready(result))
    }

    fn open_inbox(&self) -> BoxFuture<'_, Result<Inbox, Error>> {
        let address = format!("inbox.{}", Uuid::new_v4());
        let mut state = self.shared.lock();
        let config = QueueConfig { auto_delete: true, ..QueueConfig::default() };
        let result = state
            .engine
            .declare_queue(&address, config)
            .map_err(to_error)
            .and_then(|()| state.attach(&self.shared, &address, ConsumeOptions::new().prefetch(0).auto_ack(true)))
            .map(|consumer| Inbox { address, consumer });
        Box::pin(std::future::ready(result))
    }

    fn queue_stats<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<QueueStats, Error>> {
        let mut state = self.shared.lock();
        state.engine.expire_queue(queue, Instant::now());
        let result = state.engine.stats(queue).ok_or_else(|| Error::NoRoute(queue.to_owned()));
        Box::pin(std::future::ready(result))
    }
}

/// Settles the deliveries of one consumer. Holds the broker weakly: acks after the broker is gone are void.
struct EmbeddedAcker {
    shared: Weak<Shared>,
    consumer: ConsumerId,
}

impl fmt::Debug for EmbeddedAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedAcker").field("consumer", &self.consumer).finish()
    }
}

impl Acker for EmbeddedAcker {
    fn settle(&self, tag: u64, outcome: Outcome) -> BoxFuture<'_, Result<(), Error>> {
        let how = match outcome {
            Outcome::Ack => Settle::Ack,
            Outcome::Requeue => Settle::Requeue,
            Outcome::DeadLetter => Settle::DeadLetter,
            Outcome::Release => Settle::Release,
        };
        let result = match self.shared.upgrade() {
            Some(shared) => {
                let now = Instant::now();
                let mut state = shared.lock();
                let result = state.engine.settle(self.consumer, tag, how, now).map_err(to_error);
                state.dispatch(now);
                result
            }
            None => Err(Error::Disconnected),
        };
        Box::pin(std::future::ready(result))
    }
}

/// Cancels the consumer when its [`Consumer`] is dropped, requeueing what it held unacked.
struct ConsumerGuard {
    shared: Weak<Shared>,
    consumer: ConsumerId,
}

impl ConsumerControl for ConsumerGuard {
    fn pause(&self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.lock().engine.pause_consumer(self.consumer);
        }
    }
}

impl Drop for ConsumerGuard {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            let now = Instant::now();
            let mut state = shared.lock();
            state.consumers.remove(&self.consumer);
            state.engine.remove_consumer(self.consumer, now);
            state.dispatch(now);
        }
    }
}

/// An unbounded receiver as a stream.
struct UnboundedStream<T>(mpsc::UnboundedReceiver<T>);

impl<T> futures::Stream for UnboundedStream<T> {
    type Item = T;

    fn poll_next(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}
