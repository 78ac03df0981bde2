//! The engine with its consumers attached: what the embedded transport and the server share, so that both are
//! faces of one broker. Callers hold it behind a mutex and keep each critical section short.

type HashMap<K, V> = hashbrown::HashMap<K, V>;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Instant;

use rpc_core::transport::{Outcome, STRIPES, thread_stripe};
use rpc_core::{Error, QueueOptions, naming};
use tokio::sync::Notify;

use crate::engine::{self, ConsumerId, Engine, EngineError, Journal, QueueConfig, Settle};

/// Where the journal of durable queues goes: the server's log, which takes the entries out of the vector.
pub(crate) type JournalSink<M> = Box<dyn Fn(&mut Vec<Journal<M>>) + Send>;

/// Engine refusals as the framework's typed errors.
pub(crate) fn to_error(error: EngineError) -> Error {
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

/// The engine's view of a queue's options: every queue but an inbox has a dead-letter queue; a durable queue
/// is durable where the broker keeps a log (`logged`).
pub(crate) fn queue_config(queue: &str, options: &QueueOptions, logged: bool) -> QueueConfig {
    QueueConfig {
        max_len: options.max_len,
        max_deliveries: options.max_deliveries,
        auto_delete: false,
        dead_letter: Some(naming::dead_letter_queue(queue)),
        durable: options.durable && logged,
    }
}

/// The engine's settle outcome for the framework's.
pub(crate) fn settle_of(outcome: Outcome) -> Settle {
    match outcome {
        Outcome::Ack => Settle::Ack,
        Outcome::Requeue => Settle::Requeue,
        Outcome::DeadLetter => Settle::DeadLetter,
        Outcome::Release => Settle::Release,
    }
}

/// Declares `queue` in `engine`, accepting an existing queue as it is when `options` are the defaults.
pub(crate) fn declare<M: Clone>(
    engine: &mut engine::Engine<M>,
    queue: &str,
    options: &QueueOptions,
    logged: bool,
) -> Result<(), Error> {
    if *options == QueueOptions::default() && engine.has_queue(queue) {
        return Ok(());
    }
    engine.declare_queue(queue, queue_config(queue, options, logged)).map_err(to_error)
}

/// Creates subscriber group `group` of `topic` if needed; returns its queue.
pub(crate) fn join_group<M: Clone>(engine: &mut engine::Engine<M>, topic: &str, group: &str) -> Result<String, Error> {
    let queue = engine::group_queue(topic, group);
    if !engine.has_queue(&queue) {
        engine.declare_queue(&queue, queue_config(&queue, &QueueOptions::default(), false)).map_err(to_error)?;
    }
    Ok(engine.subscribe_group(topic, group))
}

/// Creates the private subscriber group `group` of `topic`: a group queue that goes with its consumer (see
/// [`Transport::subscribe_private`](rpc_core::Transport::subscribe_private)); returns its queue. A group of
/// that name that exists already is another's, and refused.
pub(crate) fn join_private<M: Clone>(
    engine: &mut engine::Engine<M>,
    topic: &str,
    group: &str,
) -> Result<String, Error> {
    let queue = engine::group_queue(topic, group);
    if engine.has_queue(&queue) {
        return Err(Error::InvalidArgument(format!("the private subscription `{group}` is in use")));
    }
    let config = engine::QueueConfig { auto_delete: true, ..engine::QueueConfig::default() };
    engine.declare_queue(&queue, config).map_err(to_error)?;
    Ok(engine.subscribe_group(topic, group))
}

/// Where a consumer's deliveries go: a channel to an in-process consumer, or a connection's writer.
pub(crate) trait Sink<M>: Send + Sync {
    /// Takes one delivery; must not block (it runs under the hub's lock, or right after it with a
    /// [`Handoff`]).
    fn deliver(&self, delivery: engine::Delivery<M>, now: Instant);

    /// Tells the consumer that the call of its delivery `tag` was cancelled; must not block either.
    fn abort(&self, tag: u64);

    /// Tells the consumer that its queue is gone; it is dropped right after (which ends an in-process consumer).
    fn ended(&self) {}

    /// Whether the consumer takes its deliveries in any order and from several threads at once (it matches them
    /// by id, or handles them concurrently): with a [`Handoff`], the thread whose operation made such a
    /// delivery then hands it out itself, right after it lets go of the hub, rather than in the hub's order by
    /// whichever thread hands out.
    fn unordered(&self) -> bool {
        false
    }
}

pub(crate) struct Hub<M> {
    pub(crate) engine: Engine<M>,
    sinks: HashMap<ConsumerId, Attached<M>>,
    out: Vec<engine::Delivery<M>>,
    /// The deliveries to [`Sink::unordered`] sinks that the last operation made, for the thread that made them
    /// to hand out ([`Hub::take_own`]).
    own: Vec<Ready<M>>,
    /// Where deliveries wait for their sinks until the lock is let go, if the host hands them out after it.
    handoff: Option<Arc<Handoff<M>>>,
    /// Wakes the delay timer ([`run_timer`]) when a delayed message is due before the time it sleeps until.
    wake: Arc<Notify>,
    /// When the delay timer wakes up next, if it sleeps until a due message.
    armed_for: Option<Instant>,
    timer_started: bool,
    /// Takes the journal after each operation; without one, nothing is durable and it is dropped.
    journal: Option<JournalSink<M>>,
}

impl<M> Default for Hub<M> {
    fn default() -> Self {
        Hub {
            engine: Engine::default(),
            sinks: HashMap::default(),
            out: Vec::new(),
            own: Vec::new(),
            handoff: None,
            wake: Arc::new(Notify::new()),
            armed_for: None,
            timer_started: false,
            journal: None,
        }
    }
}

impl<M> Drop for Hub<M> {
    fn drop(&mut self) {
        // The timer holds its hub weakly: woken, it finds it gone and ends.
        self.wake.notify_one();
    }
}

impl<M: Clone> Hub<M> {
    /// Deletes `queue` with its messages, and ends its consumers; false if there was no such queue.
    pub(crate) fn delete_queue(&mut self, queue: &str) -> bool {
        let consumers = self.engine.consumers_of(queue);
        if !self.engine.delete_queue(queue) {
            return false;
        }
        for consumer in consumers {
            if let Some(attached) = self.sinks.remove(&consumer) {
                attached.sink.ended();
            }
        }
        self.flush_journal();
        true
    }

    /// Sends the journal of durable queues to `sink`, in order, after each operation.
    pub(crate) fn set_journal(&mut self, sink: JournalSink<M>) {
        self.journal = Some(sink);
    }

    /// Whether a log keeps durable queues.
    pub(crate) fn is_logged(&self) -> bool {
        self.journal.is_some()
    }

    /// Hands what the last operations journaled to the sink.
    pub(crate) fn flush_journal(&mut self) {
        if self.engine.has_journal() {
            match &self.journal {
                Some(sink) => sink(self.engine.journal_mut()),
                None => self.engine.journal_mut().clear(),
            }
        }
    }

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
        self.sinks.insert(id, Attached { sink: Arc::from(make_sink(id)), stripes: Default::default() });
        Ok(id)
    }

    /// Detaches a consumer; what it held unacked goes to other consumers.
    pub(crate) fn detach(&mut self, id: ConsumerId, now: Instant) {
        self.detach_with(id, now, |_| {});
    }

    /// Detaches a consumer as [`Hub::detach`] does, running `then` on the engine once it is gone and before
    /// what it held is handed out again: for a driver to take back the deliveries it made around the engine.
    pub(crate) fn detach_with(&mut self, id: ConsumerId, now: Instant, then: impl FnOnce(&mut Engine<M>)) {
        self.sinks.remove(&id);
        self.engine.remove_consumer(id, now);
        then(&mut self.engine);
        self.dispatch(now);
    }

    /// Cancels the call `key` on `queue` ([`Engine::cancel`]) and tells the consumers holding it.
    pub(crate) fn cancel(&mut self, queue: &str, key: engine::Key) -> Result<(), EngineError> {
        for (consumer, tag) in self.engine.cancel(queue, key)? {
            if let Some(attached) = self.sinks.get(&consumer) {
                attached.sink.abort(tag);
            }
        }
        Ok(())
    }

    /// Deliveries go to `handoff` from now on, for the host to hand to their sinks once it lets go of the hub
    /// ([`Handoff::deliver`]), instead of to the sinks under the lock.
    pub(crate) fn hand_off(&mut self, handoff: Arc<Handoff<M>>) {
        self.handoff = Some(handoff);
    }

    /// Hands every delivery the last operation made possible to its sink, or to the handoff.
    pub(crate) fn dispatch(&mut self, now: Instant) {
        let mut out = std::mem::take(&mut self.out);
        self.engine.dispatch(now, &mut out);
        match &self.handoff {
            Some(handoff) if !out.is_empty() => {
                let own = own_allowed();
                let mut ready = None;
                for delivery in out.drain(..) {
                    if let Some(attached) = self.sinks.get_mut(&delivery.consumer) {
                        let item = Ready { sink: attached.stripe(), delivery, now };
                        if own && item.sink.0.unordered() {
                            self.own.push(item);
                        } else {
                            handoff.push(ready.get_or_insert_with(|| handoff.lock()), item);
                        }
                    }
                }
            }
            _ => {
                for delivery in out.drain(..) {
                    if let Some(attached) = self.sinks.get(&delivery.consumer) {
                        attached.sink.deliver(delivery, now);
                    }
                }
            }
        }
        self.out = out;
        self.flush_journal();
        if let Some(due) = self.engine.next_due()
            && self.armed_for.is_none_or(|armed| due < armed)
        {
            self.armed_for = Some(due);
            self.wake.notify_one();
        }
    }

    /// The deliveries to unordered sinks that the last operations made ([`Sink::unordered`]), for the caller to
    /// hand out with [`Own::deliver`] once it lets go of the hub.
    pub(crate) fn take_own(&mut self) -> Own<M> {
        match self.own.len() {
            0 => Own::None,
            1 => self.own.pop().map_or(Own::None, Own::One),
            _ => Own::Many(std::mem::take(&mut self.own)),
        }
    }

    /// Whether delayed messages wait and no timer runs for them yet: the driver then calls
    /// [`Hub::timer_started`] and spawns [`run_timer`].
    pub(crate) fn wants_timer(&self) -> bool {
        !self.timer_started && self.engine.next_due().is_some()
    }

    /// Records that the driver runs the timer; returns what wakes it.
    pub(crate) fn timer_started(&mut self) -> Arc<Notify> {
        self.timer_started = true;
        Arc::clone(&self.wake)
    }

    /// Dispatches what is due at `now`; returns when the next delayed message is due.
    pub(crate) fn tick(&mut self, now: Instant) -> Option<Instant> {
        // Nothing is due before `now` after this dispatch, so it does not wake the timer that runs it.
        self.armed_for = Some(now);
        self.dispatch(now);
        self.armed_for = self.engine.next_due();
        self.armed_for
    }
}

/// A hub's delay timer: dispatches delayed messages when they are due, until `host` is gone. `tick` runs
/// [`Hub::tick`] on the hub inside its host, now; `wake` is what [`Hub::timer_started`] returned.
pub(crate) async fn run_timer<H>(host: Weak<H>, tick: fn(&H) -> Option<Instant>, wake: Arc<Notify>) {
    loop {
        let due = {
            let Some(host) = host.upgrade() else { return };
            tick(&host)
        };
        match due {
            Some(due) => {
                tokio::select! {
                    () = tokio::time::sleep_until(tokio::time::Instant::from_std(due)) => {}
                    () = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

/// Deliveries made under a hub's lock, handed to their sinks after it, in the order they were made, by the first
/// thread to let go of the hub while none does it: a sink wakes a task, and a wake may unpark a thread with a
/// system call, which must not lengthen the turns of a lock that several threads take for every call.
///
/// Deliveries to a sink that takes them unordered ([`Sink::unordered`]) skip it: the thread that made them hands
/// them out ([`Own`]), so that a call published on one thread is not handled, and its caller woken, by another.
pub(crate) struct Handoff<M> {
    ready: Mutex<Vec<Ready<M>>>,
    /// Whether `ready` holds anything: written only under its lock, and only when that changes, so that a
    /// thread with nothing to hand out (the usual case, when sinks take their deliveries unordered) reads it
    /// and goes on without writing a line that the other threads read.
    waiting: AtomicBool,
    /// The emptied batch of the thread handing out, kept for the next.
    spare: Mutex<Vec<Ready<M>>>,
    /// A thread hands out: the others leave what they add to it.
    draining: AtomicBool,
}

/// A consumer's sink as the hub keeps it.
struct Attached<M> {
    sink: Arc<dyn Sink<M>>,
    /// A reference to `sink` per stripe of threads, made when a thread of the stripe first hands a delivery
    /// out after the lock ([`Ready`]): each is an allocation of its own, so that the thread counts references
    /// on a line of its own rather than on the sink's, which every thread would write for every delivery.
    stripes: [Option<Arc<SinkRef<M>>>; STRIPES],
}

/// A reference to a sink, alone on its cache lines.
#[repr(align(128))]
struct SinkRef<M>(Arc<dyn Sink<M>>);

impl<M> Attached<M> {
    /// The current thread's reference to the sink.
    fn stripe(&mut self) -> Arc<SinkRef<M>> {
        let sink = &self.sink;
        let stripe = &mut self.stripes[thread_stripe() % STRIPES];
        Arc::clone(stripe.get_or_insert_with(|| Arc::new(SinkRef(Arc::clone(sink)))))
    }
}

/// A delivery waiting for its sink.
pub(crate) struct Ready<M> {
    sink: Arc<SinkRef<M>>,
    delivery: engine::Delivery<M>,
    now: Instant,
}

impl<M> Default for Handoff<M> {
    fn default() -> Self {
        Handoff {
            ready: Mutex::new(Vec::new()),
            waiting: AtomicBool::new(false),
            spare: Mutex::new(Vec::new()),
            draining: AtomicBool::new(false),
        }
    }
}

impl<M> Handoff<M> {
    fn lock(&self) -> MutexGuard<'_, Vec<Ready<M>>> {
        self.ready.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues deliveries for [`Handoff::deliver`], under the lock `ready` (from [`Handoff::lock`]).
    fn push(&self, ready: &mut Vec<Ready<M>>, item: Ready<M>) {
        if ready.is_empty() {
            self.waiting.store(true, Ordering::Release);
        }
        ready.push(item);
    }

    /// Takes what waits into `batch` (empty), under the lock.
    fn take(&self, batch: &mut Vec<Ready<M>>) {
        let mut ready = self.lock();
        if !ready.is_empty() {
            self.waiting.store(false, Ordering::Release);
        }
        std::mem::swap(&mut *ready, batch);
    }

    /// Hands what waits to its sinks, unless another thread is doing that; then that thread hands out what
    /// waits when it sees it, this call's included. Call it after letting go of the hub.
    pub(crate) fn deliver(&self) {
        // Nothing waits, or what this thread queued was taken already by the thread handing out.
        if !self.waiting.load(Ordering::Acquire) {
            return;
        }
        loop {
            if self.draining.swap(true, Ordering::SeqCst) {
                return;
            }
            {
                // Let go also if a sink panics, or nothing would be handed out again.
                let _draining = Draining(&self.draining);
                let mut batch = std::mem::take(&mut *self.spare.lock().unwrap_or_else(PoisonError::into_inner));
                loop {
                    self.take(&mut batch);
                    if batch.is_empty() {
                        break;
                    }
                    for ready in batch.drain(..) {
                        ready.sink.0.deliver(ready.delivery, ready.now);
                    }
                }
                *self.spare.lock().unwrap_or_else(PoisonError::into_inner) = batch;
            }
            // What another thread added after the last batch, while this one still handed out.
            if self.lock().is_empty() {
                return;
            }
        }
    }
}

/// Deliveries to unordered sinks taken from the hub ([`Hub::take_own`]), handed out by the thread that made
/// them: one without an allocation, as an operation (a call's publish, or its answer) makes at most one.
pub(crate) enum Own<M> {
    None,
    One(Ready<M>),
    Many(Vec<Ready<M>>),
}

thread_local! {
    /// How deep this thread is in handing out its own deliveries: a sink's handling may publish, and hand out
    /// what that made in turn.
    static OWN_DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// How deep own deliveries nest at most; below, they join the [`Handoff`], which hands out in a loop (a handler
/// that publishes to its own queue would otherwise recurse without end).
const MAX_OWN_DEPTH: u32 = 4;

/// Whether an operation on this thread may keep its deliveries to unordered sinks for itself.
fn own_allowed() -> bool {
    OWN_DEPTH.with(std::cell::Cell::get) < MAX_OWN_DEPTH
}

impl<M> Own<M> {
    /// Hands the deliveries to their sinks. Call it after letting go of the hub.
    pub(crate) fn deliver(self) {
        if matches!(self, Own::None) {
            return;
        }
        let _depth = Depth::enter();
        match self {
            Own::None => {}
            Own::One(ready) => ready.sink.0.deliver(ready.delivery, ready.now),
            Own::Many(batch) => {
                for ready in batch {
                    ready.sink.0.deliver(ready.delivery, ready.now);
                }
            }
        }
    }
}

/// One level of [`OWN_DEPTH`], left also if a sink panics.
struct Depth;

impl Depth {
    fn enter() -> Depth {
        OWN_DEPTH.with(|depth| depth.set(depth.get() + 1));
        Depth
    }
}

impl Drop for Depth {
    fn drop(&mut self) {
        OWN_DEPTH.with(|depth| depth.set(depth.get().saturating_sub(1)));
    }
}

/// Ends a thread's turn at handing out.
struct Draining<'a>(&'a AtomicBool);

impl Drop for Draining<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::engine::Props;

    /// Records the messages it is handed.
    struct Recorder(Arc<Mutex<Vec<u64>>>);

    impl Sink<u64> for Recorder {
        fn deliver(&self, delivery: engine::Delivery<u64>, _now: Instant) {
            self.0.lock().expect("not poisoned").push(delivery.message);
        }

        fn abort(&self, _tag: u64) {}
    }

    /// A hub that hands deliveries off through the handoff it returns, with queue `q` and one consumer on it.
    fn handing_off(sink: Box<dyn Sink<u64>>) -> (Hub<u64>, Arc<Handoff<u64>>) {
        let handoff = Arc::new(Handoff::default());
        let mut hub = Hub::default();
        hub.hand_off(Arc::clone(&handoff));
        hub.engine.declare_queue("q", QueueConfig::default()).expect("declares");
        hub.attach("q", 0, true, move |_| sink).expect("attaches");
        (hub, handoff)
    }

    #[test]
    fn deliveries_handed_off_by_several_threads_reach_their_sink_in_the_order_they_were_made() {
        const THREADS: u64 = 4;
        const EACH: u64 = 5_000;
        let received = Arc::new(Mutex::new(Vec::new()));
        let (hub, handoff) = handing_off(Box::new(Recorder(Arc::clone(&received))));
        // The message is the order in which the engine took it: the hub's lock numbers them.
        let hub = Arc::new(Mutex::new((hub, 0u64)));
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                let (hub, handoff) = (Arc::clone(&hub), Arc::clone(&handoff));
                std::thread::spawn(move || {
                    for _ in 0..EACH {
                        {
                            let mut locked = hub.lock().expect("not poisoned");
                            let (hub, next) = &mut *locked;
                            let now = Instant::now();
                            hub.engine.publish("q", *next, Props::default(), now).expect("publishes");
                            *next += 1;
                            hub.dispatch(now);
                        }
                        handoff.deliver();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("the thread ran");
        }
        let received = received.lock().expect("not poisoned");
        assert_eq!(*received, (0..THREADS * EACH).collect::<Vec<u64>>());
        assert!(handoff.lock().is_empty(), "nothing left waiting");
    }

    /// Records the messages it is handed with the thread that handed each, taking them unordered.
    struct Unordered(Arc<Mutex<Vec<(std::thread::ThreadId, u64)>>>);

    impl Sink<u64> for Unordered {
        fn deliver(&self, delivery: engine::Delivery<u64>, _now: Instant) {
            self.0.lock().expect("not poisoned").push((std::thread::current().id(), delivery.message));
        }

        fn abort(&self, _tag: u64) {}

        fn unordered(&self) -> bool {
            true
        }
    }

    /// Publishes `message` to `q` as a host does: under the hub's lock, then hands out what that made.
    fn publish(hub: &Mutex<Hub<u64>>, handoff: &Handoff<u64>, message: u64) {
        let own = {
            let mut hub = hub.lock().expect("not poisoned");
            let now = Instant::now();
            hub.engine.publish("q", message, Props::default(), now).expect("publishes");
            hub.dispatch(now);
            hub.take_own()
        };
        own.deliver();
        handoff.deliver();
    }

    #[test]
    fn deliveries_to_an_unordered_sink_are_handed_out_by_the_thread_that_made_them() {
        const THREADS: u64 = 4;
        const EACH: u64 = 5_000;
        let received = Arc::new(Mutex::new(Vec::new()));
        let (hub, handoff) = handing_off(Box::new(Unordered(Arc::clone(&received))));
        let hub = Arc::new(Mutex::new(hub));
        let threads: Vec<_> = (0..THREADS)
            .map(|thread| {
                let (hub, handoff) = (Arc::clone(&hub), Arc::clone(&handoff));
                std::thread::spawn(move || {
                    for n in 0..EACH {
                        publish(&hub, &handoff, thread * EACH + n);
                    }
                    std::thread::current().id()
                })
            })
            .collect();
        let ids: Vec<_> = threads.into_iter().map(|thread| thread.join().expect("the thread ran")).collect();
        let received = received.lock().expect("not poisoned");
        assert_eq!(received.len() as u64, THREADS * EACH);
        for (thread, id) in ids.into_iter().enumerate() {
            let own: Vec<u64> = received.iter().filter(|(by, _)| *by == id).map(|&(_, message)| message).collect();
            let published = thread as u64 * EACH..(thread as u64 + 1) * EACH;
            assert_eq!(own, published.collect::<Vec<_>>(), "thread {thread} did not hand out its own");
        }
        assert!(!handoff.waiting.load(Ordering::Acquire), "the handoff was used");
    }

    /// An unordered sink that says when it is dropped.
    struct Watched {
        received: Arc<Mutex<Vec<(std::thread::ThreadId, u64)>>>,
        dropped: Arc<AtomicBool>,
    }

    impl Sink<u64> for Watched {
        fn deliver(&self, delivery: engine::Delivery<u64>, now: Instant) {
            Unordered(Arc::clone(&self.received)).deliver(delivery, now);
        }

        fn abort(&self, _tag: u64) {}

        fn unordered(&self) -> bool {
            true
        }
    }

    impl Drop for Watched {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn threads_hand_out_through_references_of_their_own_and_a_detached_sink_goes_with_the_last_delivery() {
        let received = Arc::new(Mutex::new(Vec::new()));
        let dropped = Arc::new(AtomicBool::new(false));
        let handoff = Arc::new(Handoff::default());
        let mut hub = Hub::default();
        hub.hand_off(Arc::clone(&handoff));
        hub.engine.declare_queue("q", QueueConfig::default()).expect("declares");
        let sink = Watched { received: Arc::clone(&received), dropped: Arc::clone(&dropped) };
        let consumer = hub.attach("q", 0, true, move |_| Box::new(sink)).expect("attaches");
        let hub = Arc::new(Mutex::new(hub));
        let stripes: Vec<usize> = (0..2u64)
            .map(|thread| {
                let (hub, handoff) = (Arc::clone(&hub), Arc::clone(&handoff));
                let thread = std::thread::spawn(move || {
                    for n in 0..100 {
                        publish(&hub, &handoff, thread * 100 + n);
                    }
                    thread_stripe()
                });
                thread.join().expect("the thread ran")
            })
            .collect();
        assert_eq!(received.lock().expect("not poisoned").len(), 200);
        {
            let hub = hub.lock().expect("not poisoned");
            let attached = hub.sinks.get(&consumer).expect("attached");
            let made: Vec<usize> = (0..STRIPES).filter(|&stripe| attached.stripes[stripe].is_some()).collect();
            let mut expected = stripes.clone();
            expected.sort_unstable();
            expected.dedup();
            assert_eq!(made, expected, "a reference per stripe that handed out, and no other");
            // The threads are gone: only the hub holds their references, and each holds the sink once.
            assert_eq!(Arc::strong_count(&attached.sink), 1 + expected.len());
        }
        // A delivery made, then the consumer detached before it is handed out: the sink stays for it.
        let own = {
            let mut hub = hub.lock().expect("not poisoned");
            let now = Instant::now();
            hub.engine.publish("q", 1_000, Props::default(), now).expect("publishes");
            hub.dispatch(now);
            let own = hub.take_own();
            hub.detach(consumer, now);
            own
        };
        assert!(!dropped.load(Ordering::SeqCst), "dropped under a delivery still to hand out");
        own.deliver();
        assert_eq!(received.lock().expect("not poisoned").last().map(|&(_, message)| message), Some(1_000));
        assert!(dropped.load(Ordering::SeqCst), "the sink outlived its consumer and its deliveries");
    }

    /// Publishes the next message from inside the delivery of the one before, up to `last`, recording how deep
    /// it was handed out.
    struct Chain {
        hub: std::sync::OnceLock<std::sync::Weak<Mutex<Hub<u64>>>>,
        handoff: Arc<Handoff<u64>>,
        last: u64,
        seen: Mutex<Vec<(u64, u32)>>,
    }

    impl Sink<u64> for Arc<Chain> {
        fn deliver(&self, delivery: engine::Delivery<u64>, _now: Instant) {
            let depth = OWN_DEPTH.with(std::cell::Cell::get);
            self.seen.lock().expect("not poisoned").push((delivery.message, depth));
            if delivery.message < self.last
                && let Some(hub) = self.hub.get().and_then(std::sync::Weak::upgrade)
            {
                publish(&hub, &self.handoff, delivery.message + 1);
            }
        }

        fn abort(&self, _tag: u64) {}

        fn unordered(&self) -> bool {
            true
        }
    }

    #[test]
    fn a_sink_that_publishes_as_it_is_handed_out_nests_only_so_deep() {
        let handoff = Arc::new(Handoff::default());
        let mut hub = Hub::default();
        hub.hand_off(Arc::clone(&handoff));
        hub.engine.declare_queue("q", QueueConfig::default()).expect("declares");
        let chain = Arc::new(Chain {
            hub: std::sync::OnceLock::new(),
            handoff: Arc::clone(&handoff),
            last: 100_000,
            seen: Mutex::new(Vec::new()),
        });
        let sink = Arc::clone(&chain);
        hub.attach("q", 0, true, move |_| Box::new(sink)).expect("attaches");
        let hub = Arc::new(Mutex::new(hub));
        chain.hub.set(Arc::downgrade(&hub)).expect("set once");
        publish(&hub, &handoff, 0);
        let seen = chain.seen.lock().expect("not poisoned");
        assert_eq!(seen.iter().map(|&(message, _)| message).collect::<Vec<_>>(), (0..=100_000).collect::<Vec<_>>());
        let deepest = seen.iter().map(|&(_, depth)| depth).max();
        assert_eq!(deepest, Some(MAX_OWN_DEPTH), "nested deeper than the bound");
        assert_eq!(OWN_DEPTH.with(std::cell::Cell::get), 0, "the depth was not given back");
    }
}
