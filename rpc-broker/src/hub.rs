//! The engine with its consumers attached: what the embedded transport and the server share, so that both are
//! faces of one broker. Callers hold it behind a mutex and keep each critical section short.

type HashMap<K, V> = hashbrown::HashMap<K, V>;
use std::sync::{Arc, MutexGuard, Weak};
use std::time::Instant;

use rpc_core::transport::Outcome;
use rpc_core::{Error, QueueOptions, naming};
use tokio::sync::Notify;

use crate::engine::{self, ConsumerId, Engine, EngineError, Journal, QueueConfig, Settle};

/// Where the journal of durable queues goes: the server's log.
pub(crate) type JournalSink<M> = Box<dyn Fn(Vec<Journal<M>>) + Send>;

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
pub(crate) trait Sink<M>: Send {
    /// Takes one delivery; must not block (it runs under the hub's lock).
    fn deliver(&self, delivery: engine::Delivery<M>, now: Instant);

    /// Tells the consumer that the call of its delivery `tag` was cancelled; must not block either.
    fn abort(&self, tag: u64);

    /// Tells the consumer that its queue is gone; it is dropped right after (which ends an in-process consumer).
    fn ended(&self) {}
}

pub(crate) struct Hub<M> {
    pub(crate) engine: Engine<M>,
    sinks: HashMap<ConsumerId, Box<dyn Sink<M>>>,
    out: Vec<engine::Delivery<M>>,
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
            if let Some(sink) = self.sinks.remove(&consumer) {
                sink.ended();
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
            let mut entries = Vec::new();
            self.engine.drain_journal(&mut entries);
            if let Some(sink) = &self.journal {
                sink(entries);
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
        self.flush_journal();
        if let Some(due) = self.engine.next_due()
            && self.armed_for.is_none_or(|armed| due < armed)
        {
            self.armed_for = Some(due);
            self.wake.notify_one();
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
    fn tick(&mut self, now: Instant) -> Option<Instant> {
        // Nothing is due before `now` after this dispatch, so it does not wake the timer that runs it.
        self.armed_for = Some(now);
        self.dispatch(now);
        self.armed_for = self.engine.next_due();
        self.armed_for
    }
}

/// A hub's delay timer: dispatches delayed messages when they are due, until `host` is gone. `lock` reaches the
/// hub inside its host; `wake` is what [`Hub::timer_started`] returned.
pub(crate) async fn run_timer<H, M: Clone>(
    host: Weak<H>,
    lock: for<'a> fn(&'a H) -> MutexGuard<'a, Hub<M>>,
    wake: Arc<Notify>,
) {
    loop {
        let due = {
            let Some(host) = host.upgrade() else { return };
            let mut hub = lock(&host);
            hub.tick(Instant::now())
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
