//! The engine in-process, as a [`Transport`]: the default broker for quickstarts, tests and single-process
//! applications. Nothing to install or start.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use rpc_core::ReplyTo;
use rpc_core::transport::{
    AckHandle, Acker, Answered, BoxFuture, Cancellations, Confirm, Consumer, ConsumerControl, Delivery, DeliverySink,
    Inbox, Outcome, STRIPES, thread_stripe,
};
use rpc_core::{Capabilities, ConsumeOptions, Envelope, Error, QueueOptions, QueueStats, Transport};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::engine::{self, ConsumerId, Props, QueueConfig, Settle};
use crate::hub::{Handoff, Hub, Sink, declare, join_group, join_private, settle_of, to_error};
use crate::protocol::{CAPABILITIES, call_key};

/// A message as the engine holds it: shared, so that queueing, dispatching and keeping an unacked copy move
/// and clone a pointer, not the envelope's fields.
type Message = Arc<Envelope>;

/// An in-process broker. Clones share one broker: hand a clone to each client and server.
#[derive(Clone, Default)]
pub struct Embedded {
    shared: Arc<Shared>,
}

/// The hub, and its deliveries on their way to their consumers: they are handed out after the lock is let go
/// (see [`Handoff`]), since a client and its workers take it from every thread of the runtime, for every call.
/// A delivery to a direct consumer (a server's, a client's inbox) is handed out by the thread that made it
/// ([`Own`](crate::hub::Own)): a call's request and reply stay on the caller's thread.
struct Shared {
    hub: Mutex<Hub<Message>>,
    handoff: Arc<Handoff<Message>>,
}

impl Default for Shared {
    fn default() -> Shared {
        let handoff = Arc::new(Handoff::default());
        let mut hub = Hub::default();
        hub.hand_off(Arc::clone(&handoff));
        Shared { hub: Mutex::new(hub), handoff }
    }
}

impl Shared {
    /// The hub, until the guard is dropped; then what its operations made deliverable is handed out.
    fn lock(&self) -> Locked<'_> {
        Locked { hub: Some(self.hub.lock().unwrap_or_else(PoisonError::into_inner)), handoff: &self.handoff }
    }

    /// Dispatches the delayed messages due now ([`Hub::tick`]).
    fn tick(&self) -> Option<Instant> {
        self.lock().tick(Instant::now())
    }
}

/// The hub's lock; dropping it lets go of the hub, then hands out the deliveries made meanwhile.
struct Locked<'a> {
    /// `Some` until dropped.
    hub: Option<MutexGuard<'a, Hub<Message>>>,
    handoff: &'a Handoff<Message>,
}

impl std::ops::Deref for Locked<'_> {
    type Target = Hub<Message>;

    fn deref(&self) -> &Hub<Message> {
        self.hub.as_ref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut Hub<Message> {
        self.hub.as_mut().expect("held until dropped")
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let own = self.hub.as_mut().map(|hub| hub.take_own());
        drop(self.hub.take());
        if let Some(own) = own {
            own.deliver();
        }
        self.handoff.deliver();
    }
}

impl fmt::Debug for Embedded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hub = self.shared.lock();
        f.debug_struct("Embedded").field("engine", &hub.engine).finish()
    }
}

/// Hands deliveries to an in-process [`Consumer`]: to its stream, or to the function it took them with.
struct ChannelSink {
    sender: mpsc::UnboundedSender<Delivery>,
    direct: Arc<std::sync::OnceLock<DeliverySink>>,
    /// The consumer's acker, once per stripe of threads, made when a thread of the stripe first hands out one
    /// of its deliveries: each delivery's handle counts a reference to its thread's, an allocation of its own,
    /// rather than to one that every thread would write for every delivery.
    ackers: [std::sync::OnceLock<Arc<dyn Acker>>; STRIPES],
    shared: Weak<Shared>,
    consumer: ConsumerId,
    cancellations: Arc<Cancellations>,
}

impl ChannelSink {
    /// The current thread's acker.
    fn acker(&self) -> Arc<dyn Acker> {
        let stripe = &self.ackers[thread_stripe() % STRIPES];
        Arc::clone(stripe.get_or_init(|| {
            Arc::new(EmbeddedAcker {
                shared: self.shared.clone(),
                consumer: self.consumer,
                cancellations: Arc::clone(&self.cancellations),
            })
        }))
    }
}

impl Sink<Message> for ChannelSink {
    fn deliver(&self, delivery: engine::Delivery<Message>, now: Instant) {
        // Shared with the engine's unacked copy until the ack: neither changes it.
        let envelope = delivery.message;
        // The engine counts the budget exactly; what it used up is the time queued.
        let queued = match (envelope.deadline_ms, delivery.remaining_ttl) {
            (Some(budget), Some(remaining)) => Duration::from_millis(budget).saturating_sub(remaining),
            _ => Duration::ZERO,
        };
        let handle = if delivery.tag == 0 { AckHandle::auto() } else { AckHandle::new(self.acker(), delivery.tag) };
        let delivery = Delivery { envelope, delivery_count: delivery.delivery_count, queued, received_at: now, handle };
        if let Some(sink) = self.direct.get() {
            sink(delivery);
            return;
        }
        // A closed receiver means the consumer is being dropped; its unacked deliveries are requeued when its
        // guard detaches it.
        let _ = self.sender.send(delivery);
    }

    fn abort(&self, tag: u64) {
        self.cancellations.cancel(tag);
    }

    fn unordered(&self) -> bool {
        // A direct consumer (a server's, or a client's inbox) takes deliveries from any thread; the server
        // handles requests concurrently and a client matches replies by correlation id.
        self.direct.get().is_some()
    }
}

impl Embedded {
    /// A new, empty broker.
    pub fn new() -> Embedded {
        Embedded::default()
    }

    fn attach(&self, hub: &mut Hub<Message>, queue: &str, options: ConsumeOptions) -> Result<Consumer, Error> {
        let (sender, receiver) = mpsc::unbounded_channel();
        let shared = Arc::downgrade(&self.shared);
        let direct = Arc::new(std::sync::OnceLock::new());
        let sink_direct = Arc::clone(&direct);
        let make_sink = |consumer| -> Box<dyn Sink<Message>> {
            Box::new(ChannelSink {
                sender,
                direct: sink_direct,
                ackers: Default::default(),
                shared: shared.clone(),
                consumer,
                cancellations: Arc::new(Cancellations::new()),
            })
        };
        let consumer = hub.attach(queue, options.prefetch, options.auto_ack, make_sink).map_err(to_error)?;
        hub.dispatch(Instant::now());
        let guard = ConsumerGuard { shared, consumer, direct };
        Ok(Consumer::from_channel(receiver, Some(Box::new(guard))))
    }

    fn publish_now(&self, queue: &str, envelope: Envelope) -> Result<(), Error> {
        let props = props(&envelope);
        let message = Arc::new(envelope);
        let now = Instant::now();
        let mut hub = self.shared.lock();
        hub.engine.publish(queue, message, props, now).map_err(to_error)?;
        hub.dispatch(now);
        self.start_timer(&mut hub);
        Ok(())
    }

    fn start_timer(&self, hub: &mut Hub<Message>) {
        start_timer(&self.shared, hub);
    }
}

/// Starts the delay timer once a delayed message waits (publishing runs inside a runtime; outside one, delayed
/// messages join their queue at the next operation that finds them due).
fn start_timer(shared: &Arc<Shared>, hub: &mut Hub<Message>) {
    if hub.wants_timer()
        && let Ok(runtime) = tokio::runtime::Handle::try_current()
    {
        let wake = hub.timer_started();
        runtime.spawn(crate::hub::run_timer(Arc::downgrade(shared), Shared::tick, wake));
    }
}

fn props(envelope: &Envelope) -> Props {
    Props {
        priority: envelope.priority.unwrap_or(0),
        ttl: envelope.deadline_ms.map(Duration::from_millis),
        size: envelope.body.len(),
        key: call_key(envelope),
        delay: envelope.delay_ms.map(Duration::from_millis),
        id: None,
    }
}

impl Transport for Embedded {
    fn capabilities(&self) -> Capabilities {
        // Deliveries are handed out after the hub's lock, on the publisher's thread (see `Handoff`).
        CAPABILITIES.in_process(true)
    }

    fn declare_queue<'a>(&'a self, queue: &'a str, options: &'a QueueOptions) -> BoxFuture<'a, Result<(), Error>> {
        let result = declare(&mut self.shared.lock().engine, queue, options, false);
        Box::pin(std::future::ready(result))
    }

    fn publish<'a>(&'a self, queue: &'a str, envelope: Envelope, _: Confirm) -> BoxFuture<'a, Result<(), Error>> {
        // In process: taken by the engine before this returns, whatever the confirmation asked.
        rpc_core::transport::finished(self.publish_now(queue, envelope))
    }

    fn publish_topic<'a>(&'a self, topic: &'a str, envelope: Envelope) -> BoxFuture<'a, Result<(), Error>> {
        let props = props(&envelope);
        let message = Arc::new(envelope);
        let now = Instant::now();
        let mut hub = self.shared.lock();
        let result = hub.engine.publish_topic(topic, message, props, now).map(drop).map_err(to_error);
        hub.dispatch(now);
        self.start_timer(&mut hub);
        Box::pin(std::future::ready(result))
    }

    fn consume<'a>(&'a self, queue: &'a str, options: ConsumeOptions) -> BoxFuture<'a, Result<Consumer, Error>> {
        let result = self.attach(&mut self.shared.lock(), queue, options);
        Box::pin(std::future::ready(result))
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        options: ConsumeOptions,
    ) -> BoxFuture<'a, Result<Consumer, Error>> {
        let mut hub = self.shared.lock();
        let result = join_group(&mut hub.engine, topic, group).and_then(|queue| self.attach(&mut hub, &queue, options));
        Box::pin(std::future::ready(result))
    }

    fn subscribe_private<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Consumer, Error>> {
        let group = format!("{}{}", crate::protocol::INBOX_PREFIX, Uuid::new_v4().simple());
        let mut hub = self.shared.lock();
        let options = ConsumeOptions::new().prefetch(0).auto_ack(true);
        let result =
            join_private(&mut hub.engine, topic, &group).and_then(|queue| self.attach(&mut hub, &queue, options));
        Box::pin(std::future::ready(result))
    }

    fn open_inbox(&self) -> BoxFuture<'_, Result<Inbox, Error>> {
        let address = format!("inbox.{}", Uuid::new_v4());
        let mut hub = self.shared.lock();
        let config = QueueConfig { auto_delete: true, ..QueueConfig::default() };
        let result = hub
            .engine
            .declare_queue(&address, config)
            .map_err(to_error)
            .and_then(|()| self.attach(&mut hub, &address, ConsumeOptions::new().prefetch(0).auto_ack(true)))
            .map(|consumer| Inbox { address, consumer, losses: None });
        Box::pin(std::future::ready(result))
    }

    fn queue_stats<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<QueueStats, Error>> {
        let mut hub = self.shared.lock();
        hub.engine.expire_queue(queue, Instant::now());
        let result = hub.engine.stats(queue).ok_or_else(|| Error::NoRoute(queue.to_owned()));
        Box::pin(std::future::ready(result))
    }

    fn delete_queue<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        if queue.starts_with(crate::protocol::INBOX_PREFIX) {
            let error = Error::InvalidArgument(format!("`{queue}` is an inbox; it goes with its consumer"));
            return Box::pin(std::future::ready(Err(error)));
        }
        self.shared.lock().delete_queue(queue);
        Box::pin(std::future::ready(Ok(())))
    }

    fn cancel<'a>(&'a self, queue: &'a str, correlation_id: Uuid) -> BoxFuture<'a, Result<(), Error>> {
        let mut hub = self.shared.lock();
        let result = hub.cancel(queue, *correlation_id.as_bytes()).map_err(to_error);
        hub.dispatch(Instant::now());
        Box::pin(std::future::ready(result))
    }
}

/// Settles the deliveries of one consumer. Holds the broker weakly: acks after the broker is gone are void.
/// Alone on its cache lines: a consumer has one per stripe of threads ([`ChannelSink::acker`]).
#[repr(align(128))]
struct EmbeddedAcker {
    shared: Weak<Shared>,
    consumer: ConsumerId,
    cancellations: Arc<Cancellations>,
}

impl fmt::Debug for EmbeddedAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedAcker").field("consumer", &self.consumer).finish()
    }
}

impl EmbeddedAcker {
    /// Runs `step` on the engine, in one turn of its lock, if this consumer still holds delivery `tag`; then
    /// hands out what became deliverable. [`Error::DeliveryLost`] otherwise.
    fn while_held<T>(
        &self,
        tag: u64,
        step: impl FnOnce(&mut engine::Engine<Message>, Instant) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let shared = self.shared.upgrade().ok_or(Error::DeliveryLost)?;
        let now = Instant::now();
        let mut hub = shared.lock();
        let result =
            if hub.engine.holds(self.consumer, tag) { step(&mut hub.engine, now) } else { Err(Error::DeliveryLost) };
        hub.dispatch(now);
        start_timer(&shared, &mut hub);
        result
    }
}

impl Acker for EmbeddedAcker {
    fn settle(&self, tag: u64, outcome: Outcome) -> BoxFuture<'_, Result<(), Error>> {
        self.cancellations.forget(tag);
        let result = match self.shared.upgrade() {
            Some(shared) => {
                let now = Instant::now();
                let mut hub = shared.lock();
                let result = hub.engine.settle(self.consumer, tag, settle_of(outcome), now).map_err(to_error);
                hub.dispatch(now);
                result
            }
            None => Err(Error::Disconnected),
        };
        rpc_core::transport::finished(result)
    }

    fn publish<'a>(
        &'a self,
        tag: u64,
        queue: &'a str,
        envelope: Envelope,
        _: Confirm,
    ) -> BoxFuture<'a, Result<(), Error>> {
        let props = props(&envelope);
        let message = Arc::new(envelope);
        let result = self.while_held(tag, |engine, now| engine.publish(queue, message, props, now).map_err(to_error));
        rpc_core::transport::finished(result)
    }

    fn republish<'a>(&'a self, tag: u64, queue: &'a str, envelope: Envelope) -> BoxFuture<'a, Result<(), Error>> {
        let props = props(&envelope);
        let message = Arc::new(envelope);
        let result = self.while_held(tag, |engine, now| {
            engine
                .publish(queue, message, props, now)
                .and_then(|()| engine.settle(self.consumer, tag, Settle::Ack, now))
                .map_err(to_error)
        });
        if result.is_ok() {
            self.cancellations.forget(tag);
        }
        Box::pin(std::future::ready(result))
    }

    fn answer<'a>(
        &'a self,
        tag: u64,
        reply_to: &'a ReplyTo,
        reply: Envelope,
    ) -> BoxFuture<'a, Result<Answered, Error>> {
        let props = props(&reply);
        let message = Arc::new(reply);
        let result = self.while_held(tag, |engine, now| {
            let answered = Answered::of(engine.publish(reply_to.address(), message, props, now).map_err(to_error))?;
            engine.settle(self.consumer, tag, Settle::Ack, now).map_err(to_error)?;
            Ok(answered)
        });
        // Settled, or taken back: either way this consumer hears no more of its cancellation.
        self.cancellations.forget(tag);
        rpc_core::transport::answered(result)
    }

    fn cancelled(&self, tag: u64) -> Option<BoxFuture<'static, ()>> {
        Some(self.cancellations.watch(tag))
    }
}

/// Cancels the consumer when its [`Consumer`] is dropped, requeueing what it held unacked.
struct ConsumerGuard {
    shared: Weak<Shared>,
    consumer: ConsumerId,
    direct: Arc<std::sync::OnceLock<DeliverySink>>,
}

impl ConsumerControl for ConsumerGuard {
    fn pause(&self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.lock().engine.pause_consumer(self.consumer);
        }
    }

    fn direct(&self, sink: DeliverySink) -> bool {
        // Set under the hub's lock, so that no delivery is between the stream and the sink meanwhile.
        let Some(shared) = self.shared.upgrade() else { return false };
        let _hub = shared.lock();
        self.direct.set(sink).is_ok()
    }
}

impl Drop for ConsumerGuard {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.lock().detach(self.consumer, Instant::now());
        }
    }
}
