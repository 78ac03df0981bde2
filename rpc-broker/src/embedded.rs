//! The engine in-process, as a [`Transport`]: the default broker for quickstarts, tests and single-process
//! applications. Nothing to install or start.

mod lane;

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use rpc_core::ReplyTo;
use rpc_core::transport::{
    AckHandle, Acker, Answered, BoxFuture, Cancellations, Confirm, Consumer, ConsumerControl, Delivery, DeliverySink,
    Inbox, Outcome, STRIPES, thread_stripe,
};
use rpc_core::{Capabilities, ConsumeOptions, Envelope, Error, QueueOptions, QueueStats, Transport};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::engine::{self, ConsumerId, Gate, Props, QueueConfig, Settle};
use crate::hub::{Handoff, Hub, Sink, declare, join_group, join_private, settle_of, to_error};
use crate::protocol::{CAPABILITIES, call_key};
use lane::{Holding, Lane, LaneBook, Lanes, is_lane_tag};

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
/// ([`Own`](crate::hub::Own)): a call's request and reply stay on the caller's thread. While nothing waits for
/// a direct consumer, calls go to it down its lane, without the lock ([`lane`]).
struct Shared {
    hub: Mutex<Hub<Message>>,
    handoff: Arc<Handoff<Message>>,
    /// Shared with the books of the lanes, so that an answer goes down a lane without a reference to the rest.
    lanes: Arc<Lanes>,
}

impl Default for Shared {
    fn default() -> Shared {
        let handoff = Arc::new(Handoff::default());
        let mut hub = Hub::default();
        hub.hand_off(Arc::clone(&handoff));
        Shared { hub: Mutex::new(hub), handoff, lanes: Arc::default() }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The lanes hold the consumers' sinks: gone with the broker, they end the consumers, as the hub's do.
        self.lanes.clear();
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

    /// Has the engine look at `book`'s queue again after a delivery down its lane was settled while the gate
    /// was closed: a message waiting there may have room now.
    fn touch(&self, book: &LaneBook) {
        let mut hub = self.lock();
        hub.engine.touch(&book.queue);
        hub.dispatch(Instant::now());
    }

    /// Takes a delivery made down a lane back into the engine, settled with `how` (see [`Engine::take_back`]).
    ///
    /// [`Engine::take_back`]: crate::engine::Engine::take_back
    fn take_back(&self, book: &LaneBook, holding: Holding, how: Settle) {
        let now = Instant::now();
        let mut hub = self.lock();
        let Holding { message, props, expires_at, cancelled, .. } = holding;
        hub.engine.take_back(&book.queue, book.incarnation, message, props, expires_at, cancelled, how, now);
        book.gate.release();
        hub.engine.touch(&book.queue);
        hub.dispatch(now);
    }
}

/// Publishes `message` to `queue`: down the lane of its consumer if the gate lets it, through the engine
/// otherwise.
fn publish(shared: &Arc<Shared>, queue: &str, message: Message) -> Result<(), Error> {
    match down_a_lane(&shared.lanes, queue, message) {
        Ok(()) => Ok(()),
        Err(Unlaned { message, props, now }) => through_engine(shared, queue, message, props, now),
    }
}

/// A message no lane took, for the engine.
struct Unlaned {
    message: Message,
    props: Props,
    now: Instant,
}

/// Hands `message` to the consumer of `queue` down its lane, if it has one and the gate lets it.
fn down_a_lane(lanes: &Lanes, queue: &str, mut message: Message) -> Result<(), Unlaned> {
    let props = props(&message);
    let now = Instant::now();
    // A delayed message waits in the engine; one whose TTL is already over is the engine's to expire.
    if props.delay.is_none_or(|delay| delay.is_zero())
        && props.ttl.is_none_or(|ttl| !ttl.is_zero())
        && let Some(lanes) = lanes.of(queue)
    {
        for lane in &lanes.0 {
            match lane.try_deliver(message, props, now) {
                Ok(()) => return Ok(()),
                Err(back) => message = back,
            }
        }
    }
    Err(Unlaned { message, props, now })
}

/// Publishes `message` to `queue` through the engine.
fn through_engine(
    shared: &Arc<Shared>,
    queue: &str,
    message: Message,
    props: Props,
    now: Instant,
) -> Result<(), Error> {
    let mut hub = shared.lock();
    hub.engine.publish(queue, message, props, now).map_err(to_error)?;
    hub.dispatch(now);
    start_timer(shared, &mut hub);
    Ok(())
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
    direct: OnceLock<DeliverySink>,
    /// The book of its lane, once it is direct.
    book: Arc<OnceLock<Arc<LaneBook>>>,
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
                book: Arc::clone(&self.book),
            })
        }))
    }
}

/// The hub's share of a sink that a lane shares too.
struct SharedSink(Arc<ChannelSink>);

impl Sink<Message> for SharedSink {
    fn deliver(&self, delivery: engine::Delivery<Message>, now: Instant) {
        self.0.deliver(delivery, now);
    }

    fn abort(&self, tag: u64) {
        self.0.abort(tag);
    }

    fn unordered(&self) -> bool {
        self.0.unordered()
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
        let mut made = None;
        let make_sink = |consumer| -> Box<dyn Sink<Message>> {
            let sink = Arc::new(ChannelSink {
                sender,
                direct: OnceLock::new(),
                book: Arc::new(OnceLock::new()),
                ackers: Default::default(),
                shared: shared.clone(),
                consumer,
                cancellations: Arc::new(Cancellations::new()),
            });
            made = Some(Arc::clone(&sink));
            Box::new(SharedSink(sink))
        };
        let consumer = hub.attach(queue, options.prefetch, options.auto_ack, make_sink).map_err(to_error)?;
        let sink = made.ok_or_else(|| Error::Transport("the consumer's sink was not made".into()))?;
        hub.dispatch(Instant::now());
        let guard = ConsumerGuard {
            shared,
            lanes: Arc::clone(&self.shared.lanes),
            consumer,
            queue: Arc::from(queue),
            prefetch: options.prefetch,
            auto_ack: options.auto_ack,
            book: Arc::clone(&sink.book),
            sink: Arc::downgrade(&sink),
        };
        Ok(Consumer::from_channel(receiver, Some(Box::new(guard))))
    }

    fn publish_now(&self, queue: &str, envelope: Envelope) -> Result<(), Error> {
        publish(&self.shared, queue, Arc::new(envelope))
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
        let mut result = hub.engine.stats(queue).ok_or_else(|| Error::NoRoute(queue.to_owned()));
        if let Ok(stats) = &mut result
            && let Some(lanes) = self.shared.lanes.of(queue)
        {
            for lane in &lanes.0 {
                lane.book.add_to(stats);
            }
        }
        Box::pin(std::future::ready(result))
    }

    fn delete_queue<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        if queue.starts_with(crate::protocol::INBOX_PREFIX) {
            let error = Error::InvalidArgument(format!("`{queue}` is an inbox; it goes with its consumer"));
            return Box::pin(std::future::ready(Err(error)));
        }
        let mut hub = self.shared.lock();
        hub.delete_queue(queue);
        // Its consumers are gone with it, and what they held down their lanes too.
        for lane in self.shared.lanes.remove(queue, |_| false) {
            lane.book.close();
        }
        drop(hub);
        Box::pin(std::future::ready(Ok(())))
    }

    fn cancel<'a>(&'a self, queue: &'a str, correlation_id: Uuid) -> BoxFuture<'a, Result<(), Error>> {
        let mut hub = self.shared.lock();
        let key = *correlation_id.as_bytes();
        let result = hub.cancel(queue, key).map_err(to_error);
        if result.is_ok()
            && let Some(lanes) = self.shared.lanes.of(queue)
        {
            for lane in &lanes.0 {
                lane.cancel(key);
            }
        }
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
    /// The book of the consumer's lane, once it is direct: it holds the deliveries whose tags are a lane's.
    book: Arc<OnceLock<Arc<LaneBook>>>,
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
        let shared = self.shared.upgrade().ok_or_else(|| Error::DeliveryLost)?;
        let now = Instant::now();
        let mut hub = shared.lock();
        let result =
            if hub.engine.holds(self.consumer, tag) { step(&mut hub.engine, now) } else { Err(Error::DeliveryLost) };
        hub.dispatch(now);
        start_timer(&shared, &mut hub);
        result
    }
}

impl EmbeddedAcker {
    /// The book of the consumer's lane, for a delivery made down the lane, while the broker is there.
    ///
    /// The broker is not held: an answer down a lane reaches the next lane through the book, and only what
    /// goes through the engine takes a reference to the broker, so that the threads do not write its count
    /// for every call.
    /// `gone` is the error once the broker is gone: as the engine's way reports it for the same step.
    /// (Made only when it is returned: dropping an `Error` unused costs a call on the path of every answer.)
    fn lane(&self, gone: fn() -> Error) -> Result<&Arc<LaneBook>, Error> {
        let book = self.book.get().ok_or_else(|| Error::DeliveryLost)?;
        if self.shared.strong_count() == 0 {
            return Err(gone());
        }
        Ok(book)
    }

    fn shared(&self) -> Result<Arc<Shared>, Error> {
        self.shared.upgrade().ok_or(Error::Disconnected)
    }

    /// Publishes `message` to `queue` on behalf of a delivery down the lane of `book`.
    fn publish_from(&self, book: &LaneBook, queue: &str, message: Message) -> Result<(), Error> {
        match down_a_lane(&book.lanes, queue, message) {
            Ok(()) => Ok(()),
            Err(Unlaned { message, props, now }) => through_engine(&self.shared()?, queue, message, props, now),
        }
    }

    /// A delivery down `book`'s lane, taken out of it, is settled: one fewer counted against the prefetch.
    fn released(&self, book: &LaneBook) {
        if !book.gate.release()
            && let Ok(shared) = self.shared()
        {
            shared.touch(book);
        }
    }

    /// Takes delivery `tag` out of its lane's book, runs `step`, and acks the delivery if `step` succeeded;
    /// puts it back otherwise. [`Error::DeliveryLost`] if the lane does not hold it.
    fn settle_lane<T>(&self, tag: u64, step: impl FnOnce(&LaneBook) -> Result<T, Error>) -> Result<T, Error> {
        let book = self.lane(|| Error::DeliveryLost)?;
        let holding = book.take(tag, true).ok_or_else(|| Error::DeliveryLost)?;
        match step(book) {
            Ok(value) => {
                book.forget(&holding);
                self.released(book);
                Ok(value)
            }
            Err(error) => {
                if let Some(holding) = book.put_back(tag, holding)
                    && let Ok(shared) = self.shared()
                {
                    // The consumer went meanwhile: queued again, as what it held was.
                    shared.take_back(book, holding, Settle::Requeue);
                }
                Err(error)
            }
        }
    }

    /// Settles delivery `tag`, made down the lane, with `outcome`.
    fn settle_down_lane(&self, tag: u64, outcome: Outcome) -> Result<(), Error> {
        let book = self.lane(|| Error::Disconnected)?;
        let acked = matches!(outcome, Outcome::Ack);
        let holding = book.take(tag, acked).ok_or_else(|| to_error(engine::EngineError::UnknownTag(tag)))?;
        book.forget(&holding);
        if acked {
            self.released(book);
        } else {
            self.shared()?.take_back(book, holding, settle_of(outcome));
        }
        Ok(())
    }
}

impl Acker for EmbeddedAcker {
    fn settle(&self, tag: u64, outcome: Outcome) -> BoxFuture<'_, Result<(), Error>> {
        self.cancellations.forget(tag);
        if is_lane_tag(tag) {
            return rpc_core::transport::finished(self.settle_down_lane(tag, outcome));
        }
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
        if is_lane_tag(tag) {
            let message = Arc::new(envelope);
            let result = self.lane(|| Error::DeliveryLost).and_then(|book| {
                if !book.holds(tag) {
                    return Err(Error::DeliveryLost);
                }
                self.publish_from(book, queue, message)
            });
            return rpc_core::transport::finished(result);
        }
        let props = props(&envelope);
        let message = Arc::new(envelope);
        let result = self.while_held(tag, |engine, now| engine.publish(queue, message, props, now).map_err(to_error));
        rpc_core::transport::finished(result)
    }

    fn republish<'a>(&'a self, tag: u64, queue: &'a str, envelope: Envelope) -> BoxFuture<'a, Result<(), Error>> {
        if is_lane_tag(tag) {
            let message = Arc::new(envelope);
            let result = self.settle_lane(tag, |book| self.publish_from(book, queue, message));
            if result.is_ok() {
                self.cancellations.forget(tag);
            }
            return Box::pin(std::future::ready(result));
        }
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
        if is_lane_tag(tag) {
            let message = Arc::new(reply);
            let result =
                self.settle_lane(tag, |book| Answered::of(self.publish_from(book, reply_to.address(), message)));
            self.cancellations.forget(tag);
            return rpc_core::transport::answered(result);
        }
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
    /// The broker's lanes, held so that the consumer's lane goes with it even after the broker: the lane and
    /// the consumer's ackers hold one another.
    lanes: Arc<Lanes>,
    consumer: ConsumerId,
    queue: Arc<str>,
    prefetch: u32,
    auto_ack: bool,
    /// Held weakly: the hub's reference (and the lane's, once it is direct) keeps the sink, and with it the
    /// consumer's stream, open; a queue deleted, or the broker gone, drops them and ends the stream.
    sink: Weak<ChannelSink>,
    /// The book of the consumer's lane, once it is direct.
    book: Arc<OnceLock<Arc<LaneBook>>>,
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
        let mut hub = shared.lock();
        // Gone with its queue: the consumer's stream has ended.
        let Some(own) = self.sink.upgrade() else { return false };
        if own.direct.set(sink).is_err() {
            return false;
        }
        // Direct: the consumer takes its deliveries from the publishing thread, so a lane may hand them over.
        let Some(incarnation) = hub.engine.incarnation(&self.queue) else { return true };
        let gate = Arc::new(Gate::new());
        let lanes = Arc::clone(&self.lanes);
        let book = Arc::new(LaneBook::new(Arc::clone(&self.queue), incarnation, Arc::clone(&gate), lanes));
        if self.book.set(Arc::clone(&book)).is_ok() && hub.engine.set_gate(self.consumer, gate) {
            let lane = Lane::new(self.consumer, self.prefetch, self.auto_ack, own, book);
            shared.lanes.add(&self.queue, &Arc::new(lane));
            hub.dispatch(Instant::now());
        }
        true
    }
}

impl Drop for ConsumerGuard {
    fn drop(&mut self) {
        let Some(shared) = self.shared.upgrade() else {
            self.lanes.remove(&self.queue, |lane| lane.consumer != self.consumer);
            return;
        };
        let mut hub = shared.lock();
        self.lanes.remove(&self.queue, |lane| lane.consumer != self.consumer);
        let now = Instant::now();
        let Some(book) = self.book.get() else {
            hub.detach(self.consumer, now);
            return;
        };
        // What it holds down its lane goes back to the queue with what it holds from the engine, the newest
        // first to the front, so that the oldest comes out first; what its lane counted goes to the queue's
        // counters, which the engine keeps alone from now on.
        let (held, counts) = book.close();
        if hub.engine.incarnation(&self.queue) == Some(book.incarnation) {
            hub.engine.add_to_stats(&self.queue, |stats| counts.add_to(stats));
        }
        hub.detach_with(self.consumer, now, |engine| {
            for Holding { message, props, expires_at, cancelled, .. } in held.into_iter().rev() {
                let incarnation = book.incarnation;
                engine.take_back(&self.queue, incarnation, message, props, expires_at, cancelled, Settle::Requeue, now);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use rpc_core::Kind;
    use rpc_core::naming;

    use super::*;

    /// What a direct consumer was handed, in order.
    type Taken = Arc<Mutex<Vec<Delivery>>>;

    fn request(n: u8) -> Envelope {
        let mut envelope = Envelope::new(Kind::Request);
        envelope.correlation_id = Some(Uuid::from_bytes([n; 16]));
        envelope.body = Bytes::from(vec![n]);
        envelope
    }

    fn body(delivery: &Delivery) -> u8 {
        delivery.envelope.body[0]
    }

    async fn direct(broker: &Embedded, queue: &str, prefetch: u32) -> (Consumer, Taken) {
        let mut consumer = broker.consume(queue, ConsumeOptions::new().prefetch(prefetch)).await.expect("consumes");
        let taken = Taken::default();
        let into = Arc::clone(&taken);
        assert!(consumer.direct(Arc::new(move |delivery| into.lock().expect("not poisoned").push(delivery))));
        (consumer, taken)
    }

    async fn publish_all(broker: &Embedded, queue: &str, numbers: impl IntoIterator<Item = u8>) {
        for n in numbers {
            broker.publish(queue, request(n), Confirm::Broker).await.expect("publishes");
        }
    }

    /// The deliveries handed over so far, taken out; their bodies.
    fn take(taken: &Taken) -> Vec<Delivery> {
        std::mem::take(&mut *taken.lock().expect("not poisoned"))
    }

    /// The publishes the engine itself took for `queue` (those down a lane not counted).
    fn through_engine(broker: &Embedded, queue: &str) -> u64 {
        broker.shared.lock().engine.stats(queue).expect("exists").published
    }

    #[tokio::test]
    async fn a_direct_consumer_takes_calls_down_its_lane_within_its_prefetch_and_the_engine_takes_the_rest() {
        let broker = Embedded::new();
        broker.declare_queue("q", &QueueOptions::new()).await.expect("declares");
        let (_consumer, taken) = direct(&broker, "q", 2).await;
        publish_all(&broker, "q", [1, 2]).await;
        let first = take(&taken);
        assert_eq!(first.iter().map(body).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(through_engine(&broker, "q"), 0, "both went down the lane");
        publish_all(&broker, "q", [3]).await;
        assert!(take(&taken).is_empty(), "the prefetch is full: it waits");
        let stats = broker.queue_stats("q").await.expect("stats");
        assert_eq!((stats.published, stats.ready, stats.unacked), (3, 1, 2));

        let mut first = first.into_iter();
        first.next().expect("one").handle.ack().await.expect("acks");
        let third = take(&taken);
        assert_eq!(third.iter().map(body).collect::<Vec<_>>(), [3], "the ack made room for the waiting one");
        assert_eq!(through_engine(&broker, "q"), 1);
        first.next().expect("two").handle.ack().await.expect("acks");
        for delivery in third {
            delivery.handle.ack().await.expect("acks");
        }
        let stats = broker.queue_stats("q").await.expect("stats");
        assert_eq!((stats.published, stats.delivered, stats.acked, stats.unacked, stats.ready), (3, 3, 3, 0, 0));

        publish_all(&broker, "q", [4]).await;
        assert_eq!(take(&taken).iter().map(body).collect::<Vec<_>>(), [4]);
        assert_eq!(through_engine(&broker, "q"), 1, "nothing waits any more: down the lane again");
    }

    #[tokio::test]
    async fn what_a_lane_holds_goes_back_to_the_queue_in_order_when_its_consumer_goes() {
        let broker = Embedded::new();
        broker.declare_queue("q", &QueueOptions::new()).await.expect("declares");
        let (consumer, taken) = direct(&broker, "q", 8).await;
        publish_all(&broker, "q", [1, 2, 3]).await;
        let held = take(&taken);
        assert_eq!(held.len(), 3);
        drop(consumer);
        assert_eq!(broker.queue_stats("q").await.expect("stats").ready, 3);
        let stale = held.into_iter().next().expect("one").handle.ack().await;
        assert!(stale.is_err(), "a delivery taken back cannot be acked: {stale:?}");

        let mut next = broker.consume("q", ConsumeOptions::new().prefetch(8)).await.expect("consumes");
        for n in 1..=3 {
            let delivery = next.next().await.expect("redelivered");
            assert_eq!((body(&delivery), delivery.delivery_count), (n, 2));
            delivery.handle.ack().await.expect("acks");
        }
    }

    #[tokio::test]
    async fn a_cancel_reaches_a_call_down_the_lane_and_drops_its_resends_until_it_is_settled() {
        let broker = Embedded::new();
        broker.declare_queue("q", &QueueOptions::new()).await.expect("declares");
        let (_consumer, taken) = direct(&broker, "q", 8).await;
        publish_all(&broker, "q", [1]).await;
        let delivery = take(&taken).pop().expect("delivered");
        let cancelled = delivery.handle.cancelled().expect("the embedded broker tells");
        broker.cancel("q", Uuid::from_bytes([1; 16])).await.expect("cancels");
        tokio::time::timeout(Duration::from_secs(5), cancelled).await.expect("the consumer hears of it");

        publish_all(&broker, "q", [1]).await;
        assert!(take(&taken).is_empty(), "a resend of the cancelled call is dropped");
        delivery.handle.requeue().await.expect("settles");
        let stats = broker.queue_stats("q").await.expect("stats");
        assert_eq!((stats.ready, stats.unacked, stats.cancelled), (0, 0, 2), "requeued, a cancelled call goes");

        publish_all(&broker, "q", [1]).await;
        assert_eq!(take(&taken).len(), 1, "settled, the call no longer stops its key");
    }

    #[tokio::test]
    async fn a_delivery_down_the_lane_is_requeued_released_and_dead_lettered_as_the_engine_would() {
        let broker = Embedded::new();
        let options = QueueOptions::new().max_deliveries(2);
        broker.declare_queue("q", &options).await.expect("declares");
        let (_consumer, taken) = direct(&broker, "q", 8).await;
        publish_all(&broker, "q", [1]).await;
        let first = take(&taken).pop().expect("delivered");
        assert_eq!(first.delivery_count, 1);
        first.handle.release().await.expect("releases");
        let released = take(&taken).pop().expect("delivered again");
        assert_eq!(released.delivery_count, 1, "a release does not count as a delivery");
        released.handle.requeue().await.expect("requeues");
        let requeued = take(&taken).pop().expect("delivered again");
        assert_eq!(requeued.delivery_count, 2);
        requeued.handle.requeue().await.expect("requeues");
        assert!(take(&taken).is_empty(), "at max_deliveries it is dead-lettered");
        let dead = broker.queue_stats(&naming::dead_letter_queue("q")).await.expect("stats");
        assert_eq!(dead.ready, 1);

        publish_all(&broker, "q", [2]).await;
        take(&taken).pop().expect("delivered").handle.dead_letter().await.expect("dead-letters");
        let dead = broker.queue_stats(&naming::dead_letter_queue("q")).await.expect("stats");
        assert_eq!(dead.ready, 2);
        let stats = broker.queue_stats("q").await.expect("stats");
        assert_eq!((stats.ready, stats.unacked, stats.dead_lettered), (0, 0, 2));
    }

    #[tokio::test]
    async fn a_second_consumer_or_a_pause_closes_the_lane() {
        let broker = Embedded::new();
        broker.declare_queue("q", &QueueOptions::new()).await.expect("declares");
        let (consumer, taken) = direct(&broker, "q", 8).await;
        let mut other = broker.consume("q", ConsumeOptions::new().prefetch(8)).await.expect("consumes");
        publish_all(&broker, "q", [1, 2]).await;
        assert_eq!(take(&taken).len(), 1, "round robin, as through the engine");
        other.next().await.expect("the other one's turn").handle.ack().await.expect("acks");
        drop(other);

        consumer.pause();
        publish_all(&broker, "q", [3]).await;
        assert!(take(&taken).is_empty(), "paused: it takes nothing new");
        assert_eq!(broker.queue_stats("q").await.expect("stats").ready, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn publishers_on_two_threads_and_acks_on_others_never_pass_the_prefetch_and_lose_nothing() {
        use std::sync::atomic::{AtomicUsize, Ordering};

        const PREFETCH: usize = 4;
        const CALLS: u32 = 5_000;
        let broker = Embedded::new();
        broker.declare_queue("q", &QueueOptions::new()).await.expect("declares");
        let mut consumer = broker.consume("q", ConsumeOptions::new().prefetch(4)).await.expect("consumes");
        let holding = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
        let (held, peak) = (Arc::clone(&holding), Arc::clone(&most));
        assert!(consumer.direct(Arc::new(move |delivery: Delivery| {
            let now = held.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            let held = Arc::clone(&held);
            let seen = seen_tx.clone();
            // Acked later, from whichever thread runs the task: some down the lane, some through the engine.
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                let n = u32::from_be_bytes(delivery.envelope.body[..4].try_into().expect("4 bytes"));
                held.fetch_sub(1, Ordering::SeqCst);
                delivery.handle.ack().await.expect("acks");
                seen.send(n).expect("the test listens");
            });
        })));
        let publishers: Vec<_> = (0..2u32)
            .map(|half| {
                let broker = broker.clone();
                tokio::spawn(async move {
                    for n in (half * CALLS / 2)..((half + 1) * CALLS / 2) {
                        let mut envelope = Envelope::new(Kind::Request);
                        envelope.correlation_id = Some(Uuid::new_v4());
                        envelope.body = Bytes::copy_from_slice(&n.to_be_bytes());
                        broker.publish("q", envelope, Confirm::Broker).await.expect("publishes");
                        // Now and then a burst that fills the prefetch and waits in the engine; otherwise
                        // paced, so that the lane opens again.
                        if n % 16 != 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                })
            })
            .collect();
        for publisher in publishers {
            publisher.await.expect("joins");
        }
        let mut seen = vec![false; CALLS as usize];
        for _ in 0..CALLS {
            let n =
                tokio::time::timeout(Duration::from_secs(30), seen_rx.recv()).await.expect("in time").expect("open");
            assert!(!std::mem::replace(&mut seen[n as usize], true), "{n} was delivered twice");
        }
        assert!(most.load(Ordering::SeqCst) <= PREFETCH, "{} held at once", most.load(Ordering::SeqCst));
        let stats = broker.queue_stats("q").await.expect("stats");
        assert_eq!(
            (stats.published, stats.acked, stats.unacked, stats.ready),
            (u64::from(CALLS), u64::from(CALLS), 0, 0)
        );
        let down_the_lane = u64::from(CALLS) - through_engine(&broker, "q");
        assert!(down_the_lane > 0 && down_the_lane < u64::from(CALLS), "{down_the_lane} went down the lane");
    }

    #[tokio::test]
    async fn a_consumer_ends_when_its_queue_is_deleted_or_the_broker_goes_direct_or_not() {
        let broker = Embedded::new();
        for direct_too in [false, true] {
            broker.declare_queue("q", &QueueOptions::new()).await.expect("declares");
            let mut consumer = broker.consume("q", ConsumeOptions::new()).await.expect("consumes");
            if direct_too {
                assert!(consumer.direct(Arc::new(drop)));
            }
            broker.delete_queue("q").await.expect("deletes");
            let next = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await.expect("in time");
            assert!(next.is_none(), "the stream ends with its queue (direct: {direct_too})");
        }
        broker.declare_queue("q", &QueueOptions::new()).await.expect("declares");
        let (mut consumer, _taken) = direct(&broker, "q", 8).await;
        drop(broker);
        let next = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await.expect("in time");
        assert!(next.is_none(), "the stream ends with the broker");
    }

    #[tokio::test]
    async fn what_went_down_a_lane_stays_counted_after_its_consumer_goes() {
        let broker = Embedded::new();
        broker.declare_queue("q", &QueueOptions::new()).await.expect("declares");
        let (consumer, taken) = direct(&broker, "q", 8).await;
        publish_all(&broker, "q", [1, 2, 3]).await;
        for delivery in take(&taken) {
            delivery.handle.ack().await.expect("acks");
        }
        drop(consumer);
        let stats = broker.queue_stats("q").await.expect("stats");
        assert_eq!((stats.published, stats.delivered, stats.acked, stats.unacked), (3, 3, 3, 0));
        assert_eq!(through_engine(&broker, "q"), 3, "the engine's counters took the lane's");
    }

    #[tokio::test]
    async fn a_resend_of_a_call_cancelled_while_it_waited_out_a_delay_meets_the_engine_and_an_expired_one_too() {
        let broker = Embedded::new();
        broker.declare_queue("q", &QueueOptions::new()).await.expect("declares");
        let (_consumer, taken) = direct(&broker, "q", 8).await;
        // Two delayed calls, so that the engine keeps the cancelled one's tombstone among the live one.
        for n in [9, 1] {
            let mut delayed = request(n);
            delayed.delay_ms = Some(60_000);
            broker.publish("q", delayed, Confirm::Broker).await.expect("publishes");
        }
        broker.cancel("q", Uuid::from_bytes([1; 16])).await.expect("cancels");
        publish_all(&broker, "q", [1]).await;
        assert!(take(&taken).is_empty(), "the queue knows the call is cancelled");
        publish_all(&broker, "q", [3]).await;
        assert_eq!(take(&taken).iter().map(body).collect::<Vec<_>>(), [3], "another call goes through");
        assert_eq!(through_engine(&broker, "q"), 4, "through the engine, which knows of calls waiting");

        let mut expired = request(2);
        expired.deadline_ms = Some(0);
        broker.publish("q", expired, Confirm::Broker).await.expect("publishes");
        assert!(take(&taken).is_empty(), "no time left: the engine expires it");
        assert_eq!(broker.queue_stats("q").await.expect("stats").expired, 1);
    }
}
