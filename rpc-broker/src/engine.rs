//! The broker engine, sans-IO: queues, topics with subscriber groups, prefetch, acks, redelivery, TTL,
//! delayed delivery, maximum length and dead-lettering, as plain data driven by method calls.
//!
//! It reads no clock and touches no socket: every operation that depends on time takes `now`, and the
//! deliveries an operation makes possible are collected by [`Engine::dispatch`]. A driver that holds delayed
//! messages calls [`Engine::dispatch`] again at [`Engine::next_due`]. The embedded transport and the TCP
//! server are two drivers of this one engine.
//!
//! Durable queues ([`QueueConfig::durable`]) also keep a journal of what a log must record for them: each
//! message that enters one, as a numbered [`Journal::Stored`], and each that leaves it for good, as
//! [`Journal::Removed`]. The driver drains it with [`Engine::drain_journal`] after each operation, in order,
//! and reads it back into a new engine with [`Engine::restore`].

mod delayed;
mod gate;
mod journal;
mod queue;
mod seen;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rpc_core::QueueStats;

use delayed::Delayed;
use journal::Books;
use queue::{Expiry, Queue, Stored, dispatch_queue, hand_out_now, mark_dirty};

pub use gate::Gate;
pub use journal::{Journal, Record};
pub use queue::PRIORITY_LEVELS;
pub use seen::{DEDUP_CAPACITY, DEDUP_WINDOW};

/// The engine's maps: foldhash with a random seed per process (queue names and call keys come from clients),
/// much cheaper than SipHash on the hot path.
type HashMap<K, V> = hashbrown::HashMap<K, V>;

/// Names the messages of one call (its correlation id), so that [`Engine::cancel`] can find them.
pub type Key = [u8; 16];

/// A message's own id: a durable queue takes a message with an id it took within [`DEDUP_WINDOW`] once.
pub type MessageId = [u8; 16];

/// Identifies a consumer for as long as the engine lives; ids are never reused, so a stale ack from a consumer
/// that is gone cannot settle another consumer's delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConsumerId(u64);

impl ConsumerId {
    /// The id as a number, for the wire.
    pub fn as_u64(self) -> u64 {
        self.0
    }

    /// The id a number on the wire stands for.
    pub fn from_u64(raw: u64) -> ConsumerId {
        ConsumerId(raw)
    }
}

/// How a queue behaves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueConfig {
    /// Ready messages held at most; a publish beyond is refused with [`EngineError::QueueFull`].
    pub max_len: Option<usize>,
    /// Deliveries after which an unacked message is dead-lettered instead of requeued.
    pub max_deliveries: Option<u32>,
    /// The queue is deleted when its last consumer goes (inboxes).
    pub auto_delete: bool,
    /// Where dead-lettered messages go; `None` drops them (and counts them).
    pub dead_letter: Option<String>,
    /// Its messages are journaled for a log, and a publish whose message id it took within [`DEDUP_WINDOW`]
    /// is taken once.
    pub durable: bool,
}

/// Per-message properties the engine acts on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Props {
    /// 0 (default) to 9 (delivered first); higher values count as 9.
    pub priority: u8,
    /// The message is dropped if not delivered within this time.
    pub ttl: Option<Duration>,
    /// The message's size in bytes, for [`Engine::bytes`].
    pub size: usize,
    /// The call the message belongs to, if it can be cancelled.
    pub key: Option<Key>,
    /// The message waits this long before it can be delivered. Its TTL counts from the publish, so a message
    /// whose TTL runs out first is never delivered.
    pub delay: Option<Duration>,
    /// The message's own id, by which a durable queue drops a second copy (a publisher's retry).
    pub id: Option<MessageId>,
}

/// A message handed to a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery<M> {
    /// Who receives it.
    pub consumer: ConsumerId,
    /// Settles it, with [`Engine::settle`]; 0 for auto-ack consumers.
    pub tag: u64,
    /// The message.
    pub message: M,
    /// Deliveries so far, this one included.
    pub delivery_count: u32,
    /// Time left of its TTL at delivery, if it has one.
    pub remaining_ttl: Option<Duration>,
}

/// How a delivery is settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settle {
    /// Done.
    Ack,
    /// Deliver again; dead-lettered instead once it reached the queue's `max_deliveries`.
    Requeue,
    /// Move to the dead-letter queue.
    DeadLetter,
    /// Back to the front without counting as a delivery: the consumer never processed it.
    Release,
}

/// Why an operation was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EngineError {
    /// No such queue.
    NoQueue(String),
    /// The queue is at its maximum length.
    QueueFull(String),
    /// The queue exists with other options.
    Mismatch(String),
    /// No such consumer (it was cancelled).
    NoConsumer,
    /// No such unacked delivery for that consumer (already settled, or requeued when its consumer went).
    UnknownTag(u64),
    /// The queue's configuration makes no sense.
    InvalidConfig(String),
}

impl std::fmt::Display for EngineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EngineError::NoQueue(queue) => write!(f, "no queue named `{queue}`"),
            EngineError::QueueFull(queue) => write!(f, "queue `{queue}` is full"),
            EngineError::Mismatch(queue) => write!(f, "queue `{queue}` exists with other options"),
            EngineError::NoConsumer => f.write_str("the consumer is gone"),
            EngineError::UnknownTag(tag) => write!(f, "no unacked delivery with tag {tag}"),
            EngineError::InvalidConfig(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for EngineError {}

struct Consumer<M> {
    queue: String,
    prefetch: u32,
    auto_ack: bool,
    paused: bool,
    /// Held back while its connection is silent: it gets nothing new until it is heard from again.
    held: bool,
    unacked: HashMap<u64, Stored<M>>,
    /// Its way around the engine, if its driver hands it messages itself ([`Gate`]).
    gate: Option<Arc<Gate>>,
}

impl<M> Consumer<M> {
    /// Whether it may take another delivery now: not while its gate is open (its driver hands it messages
    /// then), and the deliveries made around the engine count against its prefetch.
    pub(super) fn has_room(&self) -> bool {
        if self.paused || self.held {
            return false;
        }
        let around = match &self.gate {
            Some(gate) if gate.is_open() => return false,
            Some(gate) => usize::try_from(gate.count()).unwrap_or(usize::MAX),
            None => 0,
        };
        self.prefetch == 0 || self.unacked.len().saturating_add(around) < self.prefetch as usize
    }

    /// Whether its gate may open, given that its queue allows it: active, and holding nothing from the engine.
    pub(super) fn may_bypass(&self) -> bool {
        !self.paused && !self.held && self.unacked.is_empty()
    }
}

/// The engine: queues, topics and consumers, for messages of type `M` (cloned on delivery, so make it cheap:
/// `Bytes` or an `Arc`).
pub struct Engine<M> {
    queues: HashMap<String, Queue<M>>,
    /// Topic -> the queues of its subscriber groups.
    topics: HashMap<String, Vec<String>>,
    consumers: HashMap<ConsumerId, Consumer<M>>,
    next_consumer: u64,
    next_tag: u64,
    dirty: Vec<Arc<str>>,
    /// Deliveries made as their messages were published (to a queue with nothing waiting and a consumer with
    /// room), handed out first by the next [`Engine::dispatch`].
    handed: Vec<Delivery<M>>,
    books: Books<M>,
    /// Messages waiting out a delay, across queues, earliest due on top.
    delayed: BinaryHeap<Reverse<Delayed<M>>>,
    /// Entries of `delayed` whose call was cancelled, swept once they outnumber the live ones.
    delayed_tombstones: usize,
    next_order: u64,
    next_queue_id: u64,
}

impl<M> std::fmt::Debug for Engine<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("queues", &self.queues.len())
            .field("topics", &self.topics.len())
            .field("consumers", &self.consumers.len())
            .finish()
    }
}

impl<M> Default for Engine<M> {
    fn default() -> Self {
        Engine {
            queues: HashMap::default(),
            topics: HashMap::default(),
            consumers: HashMap::default(),
            next_consumer: 1,
            next_tag: 1,
            dirty: Vec::new(),
            handed: Vec::new(),
            books: Books { bytes: 0, journal: Vec::new() },
            delayed: BinaryHeap::new(),
            delayed_tombstones: 0,
            next_order: 0,
            next_queue_id: 0,
        }
    }
}

/// The name of the queue that holds subscriber group `group` of `topic`.
pub fn group_queue(topic: &str, group: &str) -> String {
    format!("{topic}@{group}")
}

impl<M: Clone> Engine<M> {
    /// An empty engine.
    pub fn new() -> Engine<M> {
        Engine::default()
    }

    /// Creates `queue` with `config`, or checks an existing one: a default `config` accepts it as it is, any
    /// other must equal its config. Declaring a queue with a dead-letter queue declares that one too (durable
    /// if the queue is).
    ///
    /// # Errors
    /// [`EngineError::Mismatch`] for an existing queue with another config; [`EngineError::InvalidConfig`] for a
    /// queue that would be its own dead-letter queue.
    pub fn declare_queue(&mut self, queue: &str, config: QueueConfig) -> Result<(), EngineError> {
        if config.dead_letter.as_deref() == Some(queue) {
            return Err(EngineError::InvalidConfig(format!("queue `{queue}` cannot be its own dead-letter queue")));
        }
        if let Some(existing) = self.queues.get(queue) {
            return if config == QueueConfig::default() || existing.config == config {
                Ok(())
            } else {
                Err(EngineError::Mismatch(queue.to_owned()))
            };
        }
        if let Some(dead_letter) = &config.dead_letter
            && !self.queues.contains_key(dead_letter)
        {
            let dead_letter_config = QueueConfig { durable: config.durable, ..QueueConfig::default() };
            self.insert_queue(dead_letter.clone(), dead_letter_config);
        }
        self.insert_queue(queue.to_owned(), config);
        Ok(())
    }

    fn insert_queue(&mut self, name: String, config: QueueConfig) {
        let id = self.next_queue_id;
        self.next_queue_id += 1;
        let shared: Arc<str> = Arc::from(name.as_str());
        if config.durable {
            self.books.journal.push(Journal::Declared { queue: Arc::clone(&shared), config: config.clone() });
        }
        self.queues.insert(name, Queue::new(shared, id, config));
    }

    /// Whether consumer `id` is attached.
    pub fn has_consumer(&self, id: ConsumerId) -> bool {
        self.consumers.contains_key(&id)
    }

    /// Whether consumer `id` holds the unacked delivery `tag`.
    pub fn holds(&self, id: ConsumerId, tag: u64) -> bool {
        self.consumers.get(&id).is_some_and(|consumer| consumer.unacked.contains_key(&tag))
    }

    /// The message consumer `id` holds under `tag`, if it holds it.
    pub fn held(&self, id: ConsumerId, tag: u64) -> Option<&M> {
        self.consumers.get(&id)?.unacked.get(&tag).map(|stored| &stored.message)
    }

    /// The messages consumer `id` holds (none for a consumer that does not exist).
    pub fn held_by(&self, id: ConsumerId) -> impl Iterator<Item = &M> {
        self.consumers.get(&id).into_iter().flat_map(|consumer| consumer.unacked.values().map(|stored| &stored.message))
    }

    /// Whether `queue` exists.
    pub fn has_queue(&self, queue: &str) -> bool {
        self.queues.contains_key(queue)
    }

    /// Whether a subscriber group of `topic` is a durable queue.
    pub fn has_durable_group(&self, topic: &str) -> bool {
        self.topics.get(topic).is_some_and(|groups| groups.iter().any(|group| self.is_durable(group)))
    }

    /// Whether `queue` exists and is durable.
    pub fn is_durable(&self, queue: &str) -> bool {
        self.queues.get(queue).is_some_and(|queue| queue.config.durable)
    }

    /// The consumers attached to `queue`.
    pub fn consumers_of(&self, queue: &str) -> Vec<ConsumerId> {
        self.queues.get(queue).map(|queue| queue.consumers.clone()).unwrap_or_default()
    }

    /// Deletes `queue` with its messages; its consumers are removed.
    pub fn delete_queue(&mut self, queue: &str) -> bool {
        let Some(removed) = self.queues.remove(queue) else { return false };
        let ready: usize = removed.ready.iter().flatten().map(|stored| stored.size).sum();
        self.books.bytes -= ready;
        for consumer in removed.consumers {
            self.handed.retain(|delivery| delivery.consumer != consumer);
            if let Some(consumer) = self.consumers.remove(&consumer) {
                self.books.bytes -= consumer.unacked.values().map(|stored| stored.size).sum::<usize>();
                if let Some(gate) = &consumer.gate {
                    gate.close();
                }
            }
        }
        for groups in self.topics.values_mut() {
            groups.retain(|group| group != queue);
        }
        if removed.config.durable {
            self.books.journal.push(Journal::Deleted { queue: removed.name });
        }
        true
    }

    /// The names of all queues.
    pub fn queue_names(&self) -> impl Iterator<Item = &str> {
        self.queues.keys().map(String::as_str)
    }

    /// Puts `message` at the back of `queue`, or, with a [`Props::delay`], holds it until the delay is over
    /// and then puts it at the back. Where nothing waits in a queue that is not durable and a consumer has
    /// room, the message goes to that consumer at once, as a dispatch would hand it out, and the next
    /// [`Engine::dispatch`] hands out that delivery first. A full queue first drops its expired messages;
    /// delayed messages count against the maximum length. A durable queue takes a message whose [`Props::id`] it took within
    /// [`DEDUP_WINDOW`] once: the second publish succeeds and adds nothing (counted in `deduplicated`).
    ///
    /// # Errors
    /// [`EngineError::NoQueue`], or [`EngineError::QueueFull`] when the queue is at its maximum length.
    pub fn publish(&mut self, queue: &str, message: M, props: Props, now: Instant) -> Result<(), EngineError> {
        let Some(target) = self.queues.get_mut(queue) else {
            return Err(EngineError::NoQueue(queue.to_owned()));
        };
        if target.config.max_len.is_some_and(|max| target.waiting() >= max) {
            // Messages whose TTL ran out still hold room until dropped.
            target.sweep(Some(now), &mut self.books);
        }
        if target.config.max_len.is_some_and(|max| target.waiting() >= max) {
            target.stats.rejected += 1;
            return Err(EngineError::QueueFull(queue.to_owned()));
        }
        if target.config.durable
            && let Some(id) = props.id
            && !target.seen.take(id, now)
        {
            target.stats.deduplicated += 1;
            return Ok(());
        }
        target.stats.published += 1;
        if target.is_cancelled(props.key) {
            // A copy of a call cancelled while another copy of it was still here (a resend).
            target.stats.cancelled += 1;
            return Ok(());
        }
        self.books.bytes += props.size;
        let stored = Stored {
            message,
            size: props.size,
            priority: props.priority.min(9),
            expires_at: Expiry::at(props.ttl.map(|ttl| now + ttl)),
            deliveries: 0,
            key: props.key,
            seq: target.number(),
        };
        let due = props.delay.filter(|delay| !delay.is_zero()).map(|delay| now + delay);
        self.books.entered(&target.name, target.config.durable, &stored, due, props.id);
        match due {
            Some(due) => self.hold(queue, stored, due),
            // Nothing waits before it: handed to a consumer now, as the next dispatch would, without a turn
            // through the queue. A durable queue's messages all take that turn, in the order its log has them.
            None if target.ready_len == 0 && !target.config.durable => {
                let consumers = &mut self.consumers;
                let handed =
                    hand_out_now(target, consumers, &mut self.next_tag, now, &mut self.handed, &mut self.books, stored);
                if let Err(stored) = handed {
                    target.push_back(stored);
                    mark_dirty(target, &mut self.dirty);
                }
            }
            None => {
                target.push_back(stored);
                mark_dirty(target, &mut self.dirty);
            }
        }
        Ok(())
    }

    /// Puts a message read back from a log into durable `queue` as number `seq`, without journaling it: ready,
    /// or delayed until `record.due`; dropped (and journaled as removed) if its TTL ended meanwhile. Restore a
    /// queue's messages in the order of their numbers.
    ///
    /// # Errors
    /// [`EngineError::NoQueue`].
    pub fn restore(
        &mut self,
        queue: &str,
        seq: u64,
        message: M,
        size: usize,
        record: Record,
        now: Instant,
    ) -> Result<(), EngineError> {
        let Some(target) = self.queues.get_mut(queue) else {
            return Err(EngineError::NoQueue(queue.to_owned()));
        };
        target.next_seq = target.next_seq.max(seq + 1);
        if let Some(id) = record.id {
            target.seen.take(id, now);
        }
        if record.expires_at.is_some_and(|at| at <= now) {
            target.stats.expired += 1;
            if target.config.durable {
                self.books.journal.push(Journal::Removed { queue: Arc::clone(&target.name), seq });
            }
            return Ok(());
        }
        self.books.bytes += size;
        let stored = Stored {
            message,
            size,
            priority: record.priority.min(9),
            expires_at: Expiry::at(record.expires_at),
            deliveries: 0,
            key: record.key,
            seq,
        };
        match record.due.filter(|due| *due > now) {
            Some(due) => self.hold(queue, stored, due),
            None => {
                target.push_back(stored);
                mark_dirty(target, &mut self.dirty);
            }
        }
        Ok(())
    }

    /// Makes durable `queue` take a message with id `id` once from `now` on, for the dedup window: the id of a
    /// message a log read back as acked, which a publisher may send again after a crash.
    pub fn remember(&mut self, queue: &str, id: MessageId, now: Instant) {
        if let Some(target) = self.queues.get_mut(queue).filter(|target| target.config.durable) {
            target.seen.take(id, now);
        }
    }

    /// Takes what the logs of durable queues must record since the last call, in order.
    pub fn drain_journal(&mut self, out: &mut Vec<Journal<M>>) {
        out.append(&mut self.books.journal);
    }

    /// The journal entries waiting to be drained, for a sink that takes them out (the vector keeps its room).
    pub fn journal_mut(&mut self) -> &mut Vec<Journal<M>> {
        &mut self.books.journal
    }

    /// Whether journal entries wait to be drained.
    pub fn has_journal(&self) -> bool {
        !self.books.journal.is_empty()
    }

    /// When the earliest delayed message is due: the driver calls [`Engine::dispatch`] then.
    pub fn next_due(&self) -> Option<Instant> {
        self.delayed.peek().map(|Reverse(delayed)| delayed.due)
    }

    /// Puts a copy of `message` in every subscriber group of `topic`; returns how many groups took it (0 for a
    /// topic without groups).
    ///
    /// # Errors
    /// [`EngineError::QueueFull`] naming a group at its maximum length; the other groups still get their copy.
    pub fn publish_topic(&mut self, topic: &str, message: M, props: Props, now: Instant) -> Result<usize, EngineError> {
        let Some(groups) = self.topics.get(topic) else { return Ok(0) };
        let mut delivered = 0;
        let mut refused = None;
        for group in groups.clone() {
            match self.publish(&group, message.clone(), props, now) {
                Ok(()) => delivered += 1,
                Err(error) => refused = refused.or(Some(error)),
            }
        }
        refused.map_or(Ok(delivered), Err)
    }

    /// Creates (if needed) the queue of subscriber group `group` on `topic` and returns its name.
    pub fn subscribe_group(&mut self, topic: &str, group: &str) -> String {
        let queue = group_queue(topic, group);
        if !self.queues.contains_key(&queue) {
            self.insert_queue(queue.clone(), QueueConfig::default());
        }
        let groups = self.topics.entry(topic.to_owned()).or_default();
        if !groups.contains(&queue) {
            groups.push(queue.clone());
        }
        queue
    }

    /// Attaches a consumer to `queue` holding at most `prefetch` unacked deliveries (0: no limit).
    /// With `auto_ack`, deliveries are settled when handed out.
    ///
    /// # Errors
    /// [`EngineError::NoQueue`].
    pub fn add_consumer(&mut self, queue: &str, prefetch: u32, auto_ack: bool) -> Result<ConsumerId, EngineError> {
        let Some(target) = self.queues.get_mut(queue) else {
            return Err(EngineError::NoQueue(queue.to_owned()));
        };
        let id = ConsumerId(self.next_consumer);
        self.next_consumer += 1;
        target.consumers.push(id);
        mark_dirty(target, &mut self.dirty);
        self.consumers.insert(
            id,
            Consumer {
                queue: queue.to_owned(),
                prefetch,
                auto_ack,
                paused: false,
                held: false,
                unacked: HashMap::default(),
                gate: None,
            },
        );
        Ok(id)
    }

    /// Gives consumer `id` a way around the engine ([`Gate`]): the engine opens the gate whenever a message
    /// published to the consumer's queue would go straight to it, and delivers nothing to it while it is open.
    /// False if there is no such consumer.
    pub fn set_gate(&mut self, id: ConsumerId, gate: Arc<Gate>) -> bool {
        let Some(consumer) = self.consumers.get_mut(&id) else { return false };
        consumer.gate = Some(gate);
        if let Some(queue) = self.queues.get_mut(&consumer.queue) {
            mark_dirty(queue, &mut self.dirty);
        }
        true
    }

    /// The incarnation of `queue`: a queue deleted and declared again under its name is another, with another
    /// number.
    pub fn incarnation(&self, queue: &str) -> Option<u64> {
        self.queues.get(queue).map(|queue| queue.id)
    }

    /// Adds to the counters of `queue` (what a driver counted of the deliveries it made around the engine, when
    /// it stops counting them itself).
    pub fn add_to_stats(&mut self, queue: &str, add: impl FnOnce(&mut QueueStats)) {
        if let Some(queue) = self.queues.get_mut(queue) {
            add(&mut queue.stats);
        }
    }

    /// Has the next [`Engine::dispatch`] look at `queue` again: a delivery made around the engine was
    /// settled while its gate was closed, so that a message waiting there may now have room.
    pub fn touch(&mut self, queue: &str) {
        if let Some(queue) = self.queues.get_mut(queue) {
            mark_dirty(queue, &mut self.dirty);
        }
    }

    /// Takes back into `queue` a message that was delivered around the engine ([`Gate`]) and settled there
    /// with `how`, as [`Engine::settle`] would have settled it: requeued (or dead-lettered once it reached
    /// `max_deliveries`), dead-lettered, released to the front, or acked. `incarnation` is the queue's when the
    /// message was delivered ([`Engine::incarnation`]): a queue deleted since takes nothing back, not even a
    /// new one of the same name. `expires_at` is when its TTL ends; `cancelled` says that its call was cancelled
    /// meanwhile, which drops it rather than queue it again, as does a cancel the queue knows of.
    #[expect(clippy::too_many_arguments, reason = "the parts of a delivery the engine did not keep")]
    pub fn take_back(
        &mut self,
        queue: &str,
        incarnation: u64,
        message: M,
        props: Props,
        expires_at: Option<Instant>,
        cancelled: bool,
        how: Settle,
        now: Instant,
    ) {
        let Some(target) = self.queues.get_mut(queue).filter(|target| target.id == incarnation) else { return };
        let cancelled = cancelled || target.is_cancelled(props.key);
        match how {
            Settle::Ack => {
                target.stats.acked += 1;
                return;
            }
            Settle::Requeue | Settle::Release if cancelled => {
                target.stats.cancelled += 1;
                return;
            }
            _ => {}
        }
        self.books.bytes += props.size;
        let stored = Stored {
            message,
            size: props.size,
            priority: props.priority.min(9),
            expires_at: Expiry::at(expires_at),
            deliveries: 1,
            key: props.key,
            seq: 0,
        };
        match how {
            Settle::Requeue | Settle::Ack => self.requeue(queue, stored, now),
            Settle::DeadLetter => self.dead_letter(queue, stored, now),
            Settle::Release => {
                let mut stored = stored;
                stored.deliveries = 0;
                target.push_front(stored);
                mark_dirty(target, &mut self.dirty);
            }
        }
    }

    /// Stops new deliveries to a consumer; the deliveries it holds stay settleable.
    pub fn pause_consumer(&mut self, id: ConsumerId) {
        if let Some(consumer) = self.consumers.get_mut(&id) {
            consumer.paused = true;
            if let Some(gate) = &consumer.gate {
                gate.close();
            }
        }
    }

    /// Holds a consumer back (`held`: it gets nothing new, its deliveries stay settleable) or lets it take
    /// deliveries again: for a consumer whose connection went silent, whom the broker may be about to drop.
    pub fn hold_consumer(&mut self, id: ConsumerId, held: bool) {
        let Some(consumer) = self.consumers.get_mut(&id) else { return };
        consumer.held = held;
        if held && let Some(gate) = &consumer.gate {
            gate.close();
        }
        if !held && let Some(queue) = self.queues.get_mut(&consumer.queue) {
            mark_dirty(queue, &mut self.dirty);
        }
    }

    /// Detaches a consumer; its unacked deliveries go back to the front of the queue (or to the dead-letter
    /// queue once they reached `max_deliveries`). An auto-delete queue goes with its last consumer.
    pub fn remove_consumer(&mut self, id: ConsumerId, now: Instant) {
        let Some(consumer) = self.consumers.remove(&id) else { return };
        if let Some(gate) = &consumer.gate {
            gate.close();
        }
        // Deliveries made to it at a publish and not handed out yet: their messages go back with the rest.
        self.handed.retain(|delivery| delivery.consumer != id);
        let mut unacked: Vec<(u64, Stored<M>)> = consumer.unacked.into_iter().collect();
        // Oldest delivery first back to the front, so that the original order is kept.
        unacked.sort_by_key(|(tag, _)| std::cmp::Reverse(*tag));
        let Some(queue) = self.queues.get_mut(&consumer.queue) else { return };
        queue.consumers.retain(|other| *other != id);
        queue.unacked -= unacked.len();
        if queue.config.auto_delete && queue.consumers.is_empty() {
            self.books.bytes -= unacked.iter().map(|(_, stored)| stored.size).sum::<usize>();
            let name = consumer.queue;
            self.delete_queue(&name);
            return;
        }
        for (tag, stored) in unacked {
            let Some(queue) = self.queues.get_mut(&consumer.queue) else { break };
            if queue.settled(&stored, id, tag) {
                queue.stats.cancelled += 1;
                self.books.gone(&queue.name, queue.config.durable, &stored);
                continue;
            }
            self.requeue(&consumer.queue, stored, now);
        }
        if let Some(queue) = self.queues.get_mut(&consumer.queue) {
            mark_dirty(queue, &mut self.dirty);
        }
    }

    /// Settles delivery `tag` of consumer `id`.
    ///
    /// # Errors
    /// [`EngineError::NoConsumer`] or [`EngineError::UnknownTag`]: the delivery was already settled or went
    /// back to the queue with its consumer (a stale ack, fenced off).
    pub fn settle(&mut self, id: ConsumerId, tag: u64, how: Settle, now: Instant) -> Result<(), EngineError> {
        let consumer = self.consumers.get_mut(&id).ok_or(EngineError::NoConsumer)?;
        let stored = consumer.unacked.remove(&tag).ok_or(EngineError::UnknownTag(tag))?;
        let Some(queue) = self.queues.get_mut(&consumer.queue) else { return Ok(()) };
        queue.unacked -= 1;
        // The consumer has room again: what waits in its queue may go (nothing to look at when nothing waits),
        // or its gate may open.
        if queue.ready_len > 0 || consumer.gate.is_some() {
            mark_dirty(queue, &mut self.dirty);
        }
        if queue.settled(&stored, id, tag) && matches!(how, Settle::Requeue | Settle::Release) {
            // Its call was cancelled: nobody waits for it any more.
            queue.stats.cancelled += 1;
            self.books.gone(&queue.name, queue.config.durable, &stored);
            return Ok(());
        }
        match how {
            Settle::Ack => {
                queue.stats.acked += 1;
                self.books.gone(&queue.name, queue.config.durable, &stored);
            }
            Settle::Requeue => {
                let queue_name = consumer.queue.clone();
                self.requeue(&queue_name, stored, now);
            }
            Settle::DeadLetter => {
                let queue_name = consumer.queue.clone();
                self.dead_letter(&queue_name, stored, now);
            }
            Settle::Release => {
                let mut stored = stored;
                stored.deliveries = stored.deliveries.saturating_sub(1);
                queue.push_front(stored);
                mark_dirty(queue, &mut self.dirty);
            }
        }
        Ok(())
    }

    fn requeue(&mut self, queue_name: &str, stored: Stored<M>, now: Instant) {
        let Some(queue) = self.queues.get_mut(queue_name) else {
            self.books.bytes -= stored.size;
            return;
        };
        if queue.config.max_deliveries.is_some_and(|max| stored.deliveries >= max) {
            self.dead_letter(queue_name, stored, now);
        } else {
            queue.push_front(stored);
            mark_dirty(queue, &mut self.dirty);
        }
    }

    fn dead_letter(&mut self, queue_name: &str, mut stored: Stored<M>, now: Instant) {
        let Some(queue) = self.queues.get_mut(queue_name) else {
            self.books.bytes -= stored.size;
            return;
        };
        queue.stats.dead_lettered += 1;
        let (source, durable) = (Arc::clone(&queue.name), queue.config.durable);
        let target = queue.config.dead_letter.clone();
        // Into the dead-letter queue first, out of this one second: a crash in between keeps both copies.
        let Some(dead_letters) = target.and_then(|target| self.queues.get_mut(&target)) else {
            self.books.gone(&source, durable, &stored);
            return;
        };
        let seq = stored.seq;
        // A dead letter keeps its message but starts over: no TTL, no delivery count, no length limit.
        stored.deliveries = 0;
        stored.expires_at = Expiry::NEVER;
        stored.seq = dead_letters.number();
        dead_letters.stats.published += 1;
        self.books.entered(&dead_letters.name, dead_letters.config.durable, &stored, None, None);
        dead_letters.push_back(stored);
        mark_dirty(dead_letters, &mut self.dirty);
        if durable {
            self.books.journal.push(Journal::Removed { queue: source, seq });
        }
        let _ = now;
    }

    /// Hands out every delivery that became possible since the last call, in order, to `out`: round-robin
    /// over each queue's consumers that have room under their prefetch, highest priority first, dropping
    /// messages whose TTL ran out. Delayed messages that are due at `now` join their queues first.
    pub fn dispatch(&mut self, now: Instant, out: &mut Vec<Delivery<M>>) {
        out.append(&mut self.handed);
        self.promote(now);
        while let Some(name) = self.dirty.pop() {
            let Some(queue) = self.queues.get_mut(&*name) else { continue };
            queue.dirty = false;
            dispatch_queue(queue, &mut self.consumers, &mut self.next_tag, now, out, &mut self.books);
        }
    }

    /// Drops the messages of every queue whose TTL ran out, even where no consumer asks for them.
    pub fn expire(&mut self, now: Instant) {
        for queue in self.queues.values_mut() {
            queue.sweep(Some(now), &mut self.books);
        }
    }

    /// Drops the messages of `queue` whose TTL ran out.
    pub fn expire_queue(&mut self, queue: &str, now: Instant) {
        if let Some(queue) = self.queues.get_mut(queue) {
            queue.sweep(Some(now), &mut self.books);
        }
    }

    /// Cancels the call `key` on `queue`: its messages waiting there are removed, and none of it is queued
    /// again (a requeue or a resend of it is dropped). Returns the deliveries of it that consumers hold now, for
    /// the driver to tell them. A key the queue does not hold costs a lookup and leaves nothing behind, so a
    /// flood of cancels cannot grow the engine; removal is amortized O(1) (tombstones, swept once they
    /// outnumber the live messages). A durable queue journals the removal when the tombstone goes.
    ///
    /// # Errors
    /// [`EngineError::NoQueue`].
    pub fn cancel(&mut self, queue: &str, key: Key) -> Result<Vec<(ConsumerId, u64)>, EngineError> {
        let Some(target) = self.queues.get_mut(queue) else {
            return Err(EngineError::NoQueue(queue.to_owned()));
        };
        let Some(keyed) = target.keys.get_mut(&key) else { return Ok(Vec::new()) };
        if keyed.cancelled {
            return Ok(Vec::new());
        }
        keyed.cancelled = true;
        let (waiting, delayed) = (keyed.ready as usize, keyed.delayed as usize);
        target.ready_len -= waiting;
        target.tombstones += waiting;
        target.delayed -= delayed;
        target.stats.cancelled += (waiting + delayed) as u64;
        let running = keyed.holders().collect();
        if target.tombstones > target.ready_len {
            target.sweep(None, &mut self.books);
        }
        self.delayed_tombstones += delayed;
        if self.delayed_tombstones > self.delayed.len() / 2 {
            self.sweep_delayed();
        }
        Ok(running)
    }

    /// Bytes of all messages the engine holds: ready, delayed, unacked and dead-lettered.
    pub fn bytes(&self) -> usize {
        self.books.bytes
    }

    /// The counters of `queue`.
    pub fn stats(&self, queue: &str) -> Option<QueueStats> {
        self.queues.get(queue).map(|queue| {
            let mut stats = queue.stats;
            stats.ready = queue.ready_len;
            stats.delayed = queue.delayed;
            stats.unacked = queue.unacked;
            stats.consumers = queue.consumers.len();
            stats
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    // The helpers serve the tests of engine/ too.
    pub(super) fn engine_with(queue: &str, config: QueueConfig) -> Engine<u32> {
        let mut engine = Engine::new();
        engine.declare_queue(queue, config).expect("declares");
        engine
    }

    pub(super) fn drain(engine: &mut Engine<u32>, now: Instant) -> Vec<Delivery<u32>> {
        let mut out = Vec::new();
        engine.dispatch(now, &mut out);
        out
    }

    pub(super) fn messages(deliveries: &[Delivery<u32>]) -> Vec<u32> {
        deliveries.iter().map(|delivery| delivery.message).collect()
    }

    #[test]
    fn a_message_that_finds_nothing_waiting_goes_out_at_once_and_never_ahead_of_one_that_waits() {
        let now = Instant::now();
        let mut engine = engine_with("q", QueueConfig::default());
        let first = engine.add_consumer("q", 1, false).expect("consumes");
        engine.publish("q", 1, Props::default(), now).expect("publishes");
        let stats = engine.stats("q").expect("exists");
        assert_eq!((stats.ready, stats.unacked, stats.delivered), (0, 1, 1), "not handed to the consumer");
        let one = drain(&mut engine, now);
        assert_eq!((messages(&one), one[0].consumer), (vec![1], first));
        // The consumer is full: 2 waits, and 3 waits behind it.
        engine.publish("q", 2, Props::default(), now).expect("publishes");
        engine.publish("q", 3, Props::default(), now).expect("publishes");
        assert!(drain(&mut engine, now).is_empty());
        engine.settle(first, one[0].tag, Settle::Ack, now).expect("acks");
        let two = drain(&mut engine, now);
        assert_eq!(messages(&two), [2], "the one that waited longest goes first");
        let second = engine.add_consumer("q", 1, false).expect("consumes");
        let three = drain(&mut engine, now);
        assert_eq!((messages(&three), three[0].consumer), (vec![3], second));
        // Handed to a consumer that goes before the next dispatch: back to the queue, to the other consumer.
        engine.settle(first, two[0].tag, Settle::Ack, now).expect("acks");
        engine.publish("q", 4, Props::default(), now).expect("publishes");
        engine.remove_consumer(first, now);
        assert!(drain(&mut engine, now).is_empty(), "handed out to a consumer that is gone");
        engine.settle(second, three[0].tag, Settle::Ack, now).expect("acks");
        let four = drain(&mut engine, now);
        assert_eq!((messages(&four), four[0].consumer, four[0].delivery_count), (vec![4], second, 2));
        let stats = engine.stats("q").expect("exists");
        assert_eq!((stats.published, stats.acked, stats.ready, stats.unacked), (4, 3, 0, 1));
    }

    #[test]
    fn a_queue_deleted_before_the_dispatch_hands_out_nothing_it_held() {
        let now = Instant::now();
        for auto_ack in [true, false] {
            let mut engine = engine_with("q", QueueConfig::default());
            engine.add_consumer("q", 0, auto_ack).expect("consumes");
            engine.publish("q", 1, Props { size: 10, ..Props::default() }, now).expect("publishes");
            assert!(engine.delete_queue("q"));
            assert!(drain(&mut engine, now).is_empty(), "a deleted queue's consumer got a delivery");
            assert_eq!(engine.bytes(), 0);
        }
    }

    #[test]
    fn prefetch_bounds_unacked_and_an_ack_frees_a_slot() {
        let now = Instant::now();
        let mut engine = engine_with("q", QueueConfig::default());
        for n in 0..5 {
            engine.publish("q", n, Props::default(), now).expect("publishes");
        }
        let consumer = engine.add_consumer("q", 2, false).expect("consumes");
        let first = drain(&mut engine, now);
        assert_eq!(messages(&first), [0, 1]);
        assert!(drain(&mut engine, now).is_empty());
        engine.settle(consumer, first[0].tag, Settle::Ack, now).expect("acks");
        assert_eq!(messages(&drain(&mut engine, now)), [2]);
        let stats = engine.stats("q").expect("exists");
        assert_eq!((stats.ready, stats.unacked, stats.acked), (2, 2, 1));
    }

    #[test]
    fn competing_consumers_take_turns() {
        let now = Instant::now();
        let mut engine = engine_with("q", QueueConfig::default());
        let a = engine.add_consumer("q", 0, false).expect("consumes");
        let b = engine.add_consumer("q", 0, false).expect("consumes");
        for n in 0..4 {
            engine.publish("q", n, Props::default(), now).expect("publishes");
        }
        let out = drain(&mut engine, now);
        let owners: Vec<ConsumerId> = out.iter().map(|delivery| delivery.consumer).collect();
        assert_eq!(owners, [a, b, a, b]);
    }

    #[test]
    fn a_consumer_that_goes_away_hands_its_unacked_back_in_order() {
        let now = Instant::now();
        let mut engine = engine_with("q", QueueConfig::default());
        let gone = engine.add_consumer("q", 10, false).expect("consumes");
        for n in 0..3 {
            engine.publish("q", n, Props::default(), now).expect("publishes");
        }
        let first = drain(&mut engine, now);
        assert_eq!(messages(&first), [0, 1, 2]);
        engine.remove_consumer(gone, now);
        // Its stale ack is fenced off.
        assert_eq!(engine.settle(gone, first[0].tag, Settle::Ack, now), Err(EngineError::NoConsumer));
        let next = engine.add_consumer("q", 10, false).expect("consumes");
        let again = drain(&mut engine, now);
        assert_eq!(messages(&again), [0, 1, 2]);
        assert!(again.iter().all(|delivery| delivery.consumer == next && delivery.delivery_count == 2));
    }

    #[test]
    fn requeue_then_dead_letter_after_max_deliveries() {
        let now = Instant::now();
        let config =
            QueueConfig { max_deliveries: Some(3), dead_letter: Some("q.dlq".into()), ..QueueConfig::default() };
        let mut engine = engine_with("q", config);
        let consumer = engine.add_consumer("q", 1, false).expect("consumes");
        engine.publish("q", 7, Props::default(), now).expect("publishes");
        for attempt in 1..=3 {
            let out = drain(&mut engine, now);
            assert_eq!(out.len(), 1);
            assert_eq!(out[0].delivery_count, attempt);
            engine.settle(consumer, out[0].tag, Settle::Requeue, now).expect("requeues");
        }
        assert!(drain(&mut engine, now).is_empty());
        assert_eq!(engine.stats("q").expect("exists").dead_lettered, 1);
        assert_eq!(engine.stats("q.dlq").expect("exists").ready, 1);
        let reader = engine.add_consumer("q.dlq", 0, true).expect("consumes");
        let dead = drain(&mut engine, now);
        assert_eq!((dead[0].consumer, dead[0].message, dead[0].delivery_count), (reader, 7, 1));
    }

    #[test]
    fn explicit_dead_letter_and_unknown_tags() {
        let now = Instant::now();
        let config = QueueConfig { dead_letter: Some("dead".into()), ..QueueConfig::default() };
        let mut engine = engine_with("q", config);
        let consumer = engine.add_consumer("q", 0, false).expect("consumes");
        engine.publish("q", 1, Props::default(), now).expect("publishes");
        let out = drain(&mut engine, now);
        engine.settle(consumer, out[0].tag, Settle::DeadLetter, now).expect("dead-letters");
        assert_eq!(engine.settle(consumer, out[0].tag, Settle::Ack, now), Err(EngineError::UnknownTag(out[0].tag)));
        assert_eq!(engine.stats("dead").expect("exists").ready, 1);
    }

    #[test]
    fn max_len_rejects_with_queue_full_and_counts() {
        let now = Instant::now();
        let mut engine = engine_with("q", QueueConfig { max_len: Some(2), ..QueueConfig::default() });
        engine.publish("q", 1, Props::default(), now).expect("publishes");
        engine.publish("q", 2, Props::default(), now).expect("publishes");
        assert_eq!(engine.publish("q", 3, Props::default(), now), Err(EngineError::QueueFull("q".into())));
        assert_eq!(engine.stats("q").expect("exists").rejected, 1);
        // Delivered messages no longer count against the length.
        let consumer = engine.add_consumer("q", 1, false).expect("consumes");
        let out = drain(&mut engine, now);
        engine.publish("q", 3, Props::default(), now).expect("room again");
        engine.settle(consumer, out[0].tag, Settle::Ack, now).expect("acks");
        assert_eq!(messages(&drain(&mut engine, now)), [2]);
    }

    #[test]
    fn ttl_drops_expired_messages_at_delivery_and_on_expire() {
        let start = Instant::now();
        let mut engine = engine_with("q", QueueConfig::default());
        let ttl = Props { ttl: Some(Duration::from_millis(100)), ..Props::default() };
        engine.publish("q", 1, ttl, start).expect("publishes");
        engine.publish("q", 2, Props::default(), start).expect("publishes");
        engine.publish("q", 3, ttl, start + Duration::from_millis(50)).expect("publishes");
        let later = start + Duration::from_millis(120);
        engine.add_consumer("q", 0, true).expect("consumes");
        let out = drain(&mut engine, later);
        assert_eq!(messages(&out), [2, 3]);
        assert_eq!(out[1].remaining_ttl, Some(Duration::from_millis(30)));
        assert_eq!(engine.stats("q").expect("exists").expired, 1);

        let mut idle = engine_with("idle", QueueConfig::default());
        idle.publish("idle", 1, ttl, start).expect("publishes");
        idle.expire(start + Duration::from_millis(99));
        assert_eq!(idle.stats("idle").expect("exists").ready, 1);
        idle.expire(start + Duration::from_millis(100));
        let stats = idle.stats("idle").expect("exists");
        assert_eq!((stats.ready, stats.expired), (0, 1));
    }

    #[test]
    fn a_message_taken_back_goes_to_the_queue_it_came_from_and_not_to_one_of_its_name_declared_since() {
        let now = Instant::now();
        let mut engine = engine_with("q", QueueConfig::default());
        let first = engine.incarnation("q").expect("exists");
        assert!(engine.delete_queue("q"));
        engine.declare_queue("q", QueueConfig::default()).expect("declares");
        let second = engine.incarnation("q").expect("exists");
        assert_ne!(first, second);
        engine.take_back("q", first, 1, Props::default(), None, false, Settle::Requeue, now);
        assert_eq!(engine.stats("q").expect("exists").ready, 0, "the old queue's message stays out");
        engine.take_back("q", second, 2, Props::default(), None, false, Settle::Requeue, now);
        engine.take_back("q", second, 3, Props::default(), None, true, Settle::Requeue, now);
        let stats = engine.stats("q").expect("exists");
        assert_eq!((stats.ready, stats.cancelled), (1, 1), "a cancelled call is not queued again");
        engine.add_consumer("q", 0, true).expect("consumes");
        let out = drain(&mut engine, now);
        assert_eq!(messages(&out), [2]);
        assert_eq!(out[0].delivery_count, 2, "a delivery taken back counts as one made");
    }

    #[test]
    fn higher_priority_first_fifo_within_a_level() {
        let now = Instant::now();
        let mut engine = engine_with("q", QueueConfig::default());
        for (n, priority) in [(1, 0), (2, 5), (3, 9), (4, 5), (5, 200)] {
            engine.publish("q", n, Props { priority, ..Props::default() }, now).expect("publishes");
        }
        engine.add_consumer("q", 0, true).expect("consumes");
        assert_eq!(messages(&drain(&mut engine, now)), [3, 5, 2, 4, 1]);
    }

    #[test]
    fn each_subscriber_group_gets_one_copy_and_members_compete() {
        let now = Instant::now();
        let mut engine: Engine<u32> = Engine::new();
        assert_eq!(engine.publish_topic("t", 0, Props::default(), now), Ok(0));
        let groups: Vec<String> = ["a", "b", "c"].iter().map(|group| engine.subscribe_group("t", group)).collect();
        let a1 = engine.add_consumer(&groups[0], 0, false).expect("consumes");
        let a2 = engine.add_consumer(&groups[0], 0, false).expect("consumes");
        let b = engine.add_consumer(&groups[1], 0, false).expect("consumes");
        assert_eq!(engine.publish_topic("t", 1, Props::default(), now), Ok(3));
        assert_eq!(engine.publish_topic("t", 2, Props::default(), now), Ok(3));
        let out = drain(&mut engine, now);
        let to_a: Vec<_> = out.iter().filter(|d| d.consumer == a1 || d.consumer == a2).collect();
        let to_b: Vec<_> = out.iter().filter(|d| d.consumer == b).collect();
        assert_eq!(to_a.len(), 2);
        assert_ne!(to_a[0].consumer, to_a[1].consumer);
        assert_eq!(to_b.len(), 2);
        // Group c has no consumer yet and keeps its copies.
        assert_eq!(engine.stats(&groups[2]).expect("exists").ready, 2);
        assert_eq!(engine.subscribe_group("t", "a"), groups[0]);
    }

    #[test]
    fn auto_delete_queue_goes_with_its_consumer() {
        let now = Instant::now();
        let mut engine = engine_with("inbox", QueueConfig { auto_delete: true, ..QueueConfig::default() });
        let consumer = engine.add_consumer("inbox", 0, true).expect("consumes");
        engine.remove_consumer(consumer, now);
        assert!(!engine.has_queue("inbox"));
        assert_eq!(engine.publish("inbox", 1, Props::default(), now), Err(EngineError::NoQueue("inbox".into())));
    }

    #[test]
    fn a_held_consumer_gets_nothing_new_until_let_go_and_others_take_its_share() {
        let now = Instant::now();
        let mut engine = engine_with("q", QueueConfig::default());
        let silent = engine.add_consumer("q", 10, false).expect("consumes");
        engine.hold_consumer(silent, true);
        engine.publish("q", 1, Props::default(), now).expect("publishes");
        assert!(drain(&mut engine, now).is_empty(), "a held consumer got a delivery");
        let other = engine.add_consumer("q", 10, false).expect("consumes");
        let taken = drain(&mut engine, now);
        assert_eq!((messages(&taken), taken[0].consumer), (vec![1], other));
        engine.publish("q", 2, Props::default(), now).expect("publishes");
        engine.remove_consumer(other, now);
        engine.hold_consumer(silent, false);
        let after = drain(&mut engine, now);
        assert_eq!(messages(&after), [1, 2], "let go, it takes what waits");
        assert!(after.iter().all(|delivery| delivery.consumer == silent));
    }

    #[test]
    fn a_paused_consumer_gets_nothing_new_and_released_deliveries_do_not_count() {
        let now = Instant::now();
        let config =
            QueueConfig { max_deliveries: Some(1), dead_letter: Some("dead".into()), ..QueueConfig::default() };
        let mut engine = engine_with("q", config);
        let stopping = engine.add_consumer("q", 2, false).expect("consumes");
        for n in 0..3 {
            engine.publish("q", n, Props::default(), now).expect("publishes");
        }
        let held = drain(&mut engine, now);
        assert_eq!(messages(&held), [0, 1]);
        engine.pause_consumer(stopping);
        engine.settle(stopping, held[0].tag, Settle::Ack, now).expect("acks");
        assert!(drain(&mut engine, now).is_empty(), "a paused consumer got a new delivery");
        // Never processed: back to the front, and max_deliveries(1) does not dead-letter it.
        engine.settle(stopping, held[1].tag, Settle::Release, now).expect("releases");
        let next = engine.add_consumer("q", 0, false).expect("consumes");
        let out = drain(&mut engine, now);
        assert_eq!(messages(&out), [1, 2]);
        assert!(out.iter().all(|delivery| delivery.consumer == next && delivery.delivery_count == 1));
        assert_eq!(engine.stats("q").expect("exists").dead_lettered, 0);
    }

    #[test]
    fn a_full_group_refuses_its_copy_without_stopping_the_others() {
        let now = Instant::now();
        let mut engine: Engine<u32> = Engine::new();
        engine
            .declare_queue(&group_queue("t", "small"), QueueConfig { max_len: Some(1), ..QueueConfig::default() })
            .expect("declares");
        engine.subscribe_group("t", "small");
        engine.subscribe_group("t", "big");
        assert_eq!(engine.publish_topic("t", 1, Props::default(), now), Ok(2));
        assert_eq!(
            engine.publish_topic("t", 2, Props::default(), now),
            Err(EngineError::QueueFull(group_queue("t", "small")))
        );
        assert_eq!(engine.stats(&group_queue("t", "big")).expect("exists").ready, 2);
    }

    #[test]
    fn a_queue_cannot_dead_letter_into_itself() {
        let mut engine: Engine<u32> = Engine::new();
        let config = QueueConfig { dead_letter: Some("q".into()), ..QueueConfig::default() };
        assert!(matches!(engine.declare_queue("q", config), Err(EngineError::InvalidConfig(_))));
        assert!(!engine.has_queue("q"));
    }

    #[test]
    fn bytes_held_return_to_zero_on_every_way_out() {
        let start = Instant::now();
        let sized = |size| Props { size, ..Props::default() };
        let config = QueueConfig { max_deliveries: Some(1), dead_letter: Some("dlq".into()), ..QueueConfig::default() };
        let mut engine = engine_with("q", config);
        engine.declare_queue("auto", QueueConfig { auto_delete: true, ..QueueConfig::default() }).expect("declares");
        let consumer = engine.add_consumer("q", 0, false).expect("consumes");
        engine.publish("q", 1, sized(10), start).expect("publishes");
        engine.publish("q", 2, sized(20), start).expect("publishes");
        engine.publish("q", 3, sized(40), start).expect("publishes");
        assert_eq!(engine.bytes(), 70);
        let out = drain(&mut engine, start);
        engine.settle(consumer, out[0].tag, Settle::Ack, start).expect("acks");
        engine.settle(consumer, out[1].tag, Settle::Requeue, start).expect("dead-letters at max deliveries");
        assert_eq!(engine.bytes(), 60);
        engine.remove_consumer(consumer, start);
        let ttl = Props { size: 5, ttl: Some(Duration::from_millis(1)), ..Props::default() };
        engine.publish("q", 4, ttl, start).expect("publishes");
        engine.expire(start + Duration::from_millis(1));
        assert_eq!(engine.bytes(), 60);
        let auto = engine.add_consumer("auto", 0, false).expect("consumes");
        engine.publish("auto", 5, sized(7), start).expect("publishes");
        drain(&mut engine, start);
        engine.remove_consumer(auto, start);
        assert_eq!(engine.bytes(), 60);
        // Messages 2 and 3 reached max_deliveries(1): one requeued, one held by the consumer that went away.
        assert_eq!(engine.stats("dlq").expect("exists").ready, 2);
        let reader = engine.add_consumer("dlq", 0, true).expect("consumes");
        assert_eq!(messages(&drain(&mut engine, start)), [2, 3]);
        assert_eq!(engine.bytes(), 0);
        engine.remove_consumer(reader, start);
        engine.publish("q", 6, sized(9), start).expect("publishes");
        assert!(engine.delete_queue("q"));
        assert_eq!(engine.bytes(), 0);
    }

    #[test]
    fn declare_is_idempotent_and_rejects_other_options() {
        let mut engine = engine_with("q", QueueConfig { max_len: Some(5), ..QueueConfig::default() });
        assert_eq!(engine.declare_queue("q", QueueConfig::default()), Ok(()));
        assert_eq!(engine.declare_queue("q", QueueConfig { max_len: Some(5), ..QueueConfig::default() }), Ok(()));
        assert_eq!(
            engine.declare_queue("q", QueueConfig { max_len: Some(6), ..QueueConfig::default() }),
            Err(EngineError::Mismatch("q".into()))
        );
    }

    fn keyed(key: u8, size: usize) -> Props {
        Props { size, key: Some([key; 16]), ..Props::default() }
    }

    #[test]
    fn cancel_removes_waiting_copies_and_names_the_deliveries_held() {
        let now = Instant::now();
        let mut engine = engine_with("q", QueueConfig::default());
        let consumer = engine.add_consumer("q", 1, false).expect("consumes");
        engine.publish("q", 1, keyed(1, 10), now).expect("publishes");
        engine.publish("q", 2, keyed(2, 10), now).expect("publishes");
        engine.publish("q", 3, keyed(2, 10), now).expect("publishes a resend of the same call");
        engine.publish("q", 4, Props { size: 10, ..Props::default() }, now).expect("publishes");
        let first = drain(&mut engine, now);
        assert_eq!(messages(&first), [1]);
        // Key 1 is held by the consumer: it is named, and stays where it is until settled.
        assert_eq!(engine.cancel("q", [1; 16]), Ok(vec![(consumer, first[0].tag)]));
        // While some of a cancelled call is held, a later copy of it is dropped at once.
        engine.publish("q", 5, keyed(1, 10), now).expect("takes and drops it");
        // Key 2 waits, twice: both copies go.
        assert_eq!(engine.cancel("q", [2; 16]), Ok(vec![]));
        let stats = engine.stats("q").expect("exists");
        assert_eq!((stats.ready, stats.unacked, stats.cancelled), (1, 1, 3));
        // Unknown keys, and keys cancelled twice, change nothing.
        assert_eq!(engine.cancel("q", [9; 16]), Ok(vec![]));
        assert_eq!(engine.cancel("q", [2; 16]), Ok(vec![]));
        assert_eq!(engine.cancel("nope", [2; 16]), Err(EngineError::NoQueue("nope".into())));
        // The cancelled delivery, requeued, is dropped rather than delivered again.
        engine.settle(consumer, first[0].tag, Settle::Requeue, now).expect("settles");
        assert_eq!(messages(&drain(&mut engine, now)), [4]);
        assert_eq!(engine.stats("q").expect("exists").cancelled, 4);
        assert_eq!(engine.bytes(), 10);
        let queue = &engine.queues["q"];
        assert!(queue.keys.is_empty() && queue.tombstones == 0);
    }

    #[test]
    fn a_consumer_that_goes_away_does_not_requeue_a_cancelled_call() {
        let now = Instant::now();
        let mut engine = engine_with("q", QueueConfig::default());
        let consumer = engine.add_consumer("q", 0, false).expect("consumes");
        engine.publish("q", 1, keyed(1, 10), now).expect("publishes");
        engine.publish("q", 2, keyed(2, 10), now).expect("publishes");
        let held = drain(&mut engine, now);
        assert_eq!(engine.cancel("q", [1; 16]), Ok(vec![(consumer, held[0].tag)]));
        engine.remove_consumer(consumer, now);
        let stats = engine.stats("q").expect("exists");
        assert_eq!((stats.ready, stats.cancelled), (1, 1));
        assert_eq!(engine.bytes(), 10);
        let other = engine.add_consumer("q", 0, false).expect("consumes");
        let again = drain(&mut engine, now);
        assert_eq!(messages(&again), [2]);
        // An ack of a cancelled call's delivery is an ordinary ack.
        assert_eq!(engine.cancel("q", [2; 16]), Ok(vec![(other, again[0].tag)]));
        engine.settle(other, again[0].tag, Settle::Ack, now).expect("acks");
        assert_eq!(engine.bytes(), 0);
        assert!(engine.queues["q"].keys.is_empty());
    }

    #[test]
    fn a_flood_of_publish_and_cancel_pairs_stays_bounded() {
        let now = Instant::now();
        let mut engine = engine_with("q", QueueConfig::default());
        // One live message, then 100,000 calls published and cancelled with no consumer to take them.
        engine.publish("q", 0, Props { size: 1, ..Props::default() }, now).expect("publishes");
        let mut most = 0;
        for n in 0..100_000u32 {
            let mut key = [0; 16];
            key[..4].copy_from_slice(&n.to_be_bytes());
            engine.publish("q", n, Props { size: 1, key: Some(key), ..Props::default() }, now).expect("publishes");
            engine.cancel("q", key).expect("cancels");
            let queue = &engine.queues["q"];
            let held = queue.ready.iter().map(VecDeque::len).sum::<usize>();
            most = most.max(held.max(queue.keys.len()));
        }
        // Tombstones are swept once they outnumber the live messages: never more than two held here.
        assert!(most <= 2, "the queue held {most} messages or keys");
        assert_eq!(engine.bytes(), 1);
        assert_eq!(engine.stats("q").expect("exists").cancelled, 100_000);
        let consumer = engine.add_consumer("q", 0, true).expect("consumes");
        assert_eq!(messages(&drain(&mut engine, now)), [0]);
        engine.remove_consumer(consumer, now);
    }

    pub(super) fn durable_queue(engine: &mut Engine<u32>, queue: &str) {
        let config = QueueConfig { durable: true, dead_letter: Some(format!("{queue}.dlq")), ..QueueConfig::default() };
        engine.declare_queue(queue, config).expect("declares");
    }
}
