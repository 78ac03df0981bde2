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

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rpc_core::QueueStats;

/// The engine's maps: foldhash with a random seed per process (queue names and call keys come from clients),
/// much cheaper than SipHash on the hot path.
type HashMap<K, V> = hashbrown::HashMap<K, V>;

/// Priority levels: 0 (default, last) to 9 (first).
pub const PRIORITY_LEVELS: usize = 10;

/// Names the messages of one call (its correlation id), so that [`Engine::cancel`] can find them.
pub type Key = [u8; 16];

/// A message's own id: a durable queue takes a message with an id it took within [`DEDUP_WINDOW`] once.
pub type MessageId = [u8; 16];

/// How long a durable queue remembers the ids of the messages it took.
pub const DEDUP_WINDOW: Duration = Duration::from_secs(120);

/// The most message ids a durable queue remembers; past it the oldest are forgotten before the window ends.
pub const DEDUP_CAPACITY: usize = 1 << 20;

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

/// What a log keeps of a message besides its bytes and its sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// As [`Props::priority`].
    pub priority: u8,
    /// When its TTL ends.
    pub expires_at: Option<Instant>,
    /// When its delay ends.
    pub due: Option<Instant>,
    /// As [`Props::key`].
    pub key: Option<Key>,
    /// As [`Props::id`].
    pub id: Option<MessageId>,
}

/// What the log of a durable queue must record, in the order the engine did it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Journal<M> {
    /// `queue` was created durable, with `config`.
    Declared {
        /// The queue.
        queue: Arc<str>,
        /// Its configuration.
        config: QueueConfig,
    },
    /// `queue` was deleted with its messages.
    Deleted {
        /// The queue.
        queue: Arc<str>,
    },
    /// A message entered `queue` as number `seq` (numbers grow within a queue).
    Stored {
        /// The queue.
        queue: Arc<str>,
        /// Its number in the queue.
        seq: u64,
        /// The message.
        message: M,
        /// Its properties.
        record: Record,
    },
    /// Message `seq` left `queue` for good: acked, expired, cancelled, dead-lettered or dropped.
    Removed {
        /// The queue.
        queue: Arc<str>,
        /// Its number in the queue.
        seq: u64,
    },
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

/// When a stored message's TTL ends, in 8 bytes instead of an `Option<Instant>`'s 16 (a million queued messages
/// hold 8 MB less): nanoseconds after an instant this process reads once, 0 for never.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Expiry(u64);

impl Expiry {
    const NEVER: Expiry = Expiry(0);

    /// The instant the offsets count from.
    fn epoch() -> Instant {
        static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *EPOCH.get_or_init(Instant::now)
    }

    /// `at`, or never. An instant before the epoch is 1 ns after it: passed as it was.
    fn at(at: Option<Instant>) -> Expiry {
        let Some(at) = at else { return Expiry::NEVER };
        let nanos = at.saturating_duration_since(Expiry::epoch()).as_nanos();
        Expiry(u64::try_from(nanos).unwrap_or(u64::MAX).max(1))
    }

    /// The instant, if any.
    fn instant(self) -> Option<Instant> {
        (self != Expiry::NEVER).then(|| Expiry::epoch() + Duration::from_nanos(self.0))
    }

    /// Whether it has come by `now`.
    fn passed(self, now: Instant) -> bool {
        self.instant().is_some_and(|at| at <= now)
    }
}

struct Stored<M> {
    message: M,
    size: usize,
    priority: u8,
    expires_at: Expiry,
    deliveries: u32,
    key: Option<Key>,
    /// Its number in a durable queue (0 elsewhere).
    seq: u64,
}

/// What a queue knows of one call's messages.
#[derive(Default)]
struct Keyed {
    /// Copies in `ready`, tombstones included.
    ready: u32,
    /// Copies waiting out a delay, tombstones included.
    delayed: u32,
    /// The first delivery of it not settled, as consumer and tag (most calls have at most one).
    holder: Option<(ConsumerId, u64)>,
    /// The others.
    more_holders: Vec<(ConsumerId, u64)>,
    /// The call was cancelled: its copies in `ready` are tombstones, and none of it is queued again.
    cancelled: bool,
}

impl Keyed {
    fn is_idle(&self) -> bool {
        self.ready == 0 && self.delayed == 0 && self.holder.is_none() && self.more_holders.is_empty()
    }

    fn hold(&mut self, holder: (ConsumerId, u64)) {
        if self.holder.is_none() {
            self.holder = Some(holder);
        } else {
            self.more_holders.push(holder);
        }
    }

    fn release(&mut self, holder: (ConsumerId, u64)) {
        if self.holder == Some(holder) {
            self.holder = self.more_holders.pop();
        } else if let Some(at) = self.more_holders.iter().position(|other| *other == holder) {
            self.more_holders.swap_remove(at);
        }
    }

    /// The deliveries of it not settled.
    fn holders(&self) -> impl Iterator<Item = (ConsumerId, u64)> + '_ {
        self.holder.iter().chain(&self.more_holders).copied()
    }
}

/// A ready copy of `key` leaves the queue; `true` if its call was cancelled (the copy was a tombstone).
fn leave(keys: &mut HashMap<Key, Keyed>, key: Key) -> bool {
    let Some(keyed) = keys.get_mut(&key) else { return false };
    keyed.ready = keyed.ready.saturating_sub(1);
    let cancelled = keyed.cancelled;
    if keyed.is_idle() {
        keys.remove(&key);
    }
    cancelled
}

/// A delayed copy of `key` is due or swept; `true` if its call was cancelled.
fn leave_delayed(keys: &mut HashMap<Key, Keyed>, key: Key) -> bool {
    let Some(keyed) = keys.get_mut(&key) else { return false };
    keyed.delayed = keyed.delayed.saturating_sub(1);
    let cancelled = keyed.cancelled;
    if keyed.is_idle() {
        keys.remove(&key);
    }
    cancelled
}

/// A message waiting out its delay, ordered by when it is due (then by publish order).
struct Delayed<M> {
    due: Instant,
    order: u64,
    /// The queue it goes to, and that queue's incarnation: a queue deleted and declared again does not
    /// receive the messages delayed for the one before.
    queue: Arc<str>,
    queue_id: u64,
    stored: Stored<M>,
}

impl<M> PartialEq for Delayed<M> {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.order) == (other.due, other.order)
    }
}

impl<M> Eq for Delayed<M> {}

impl<M> PartialOrd for Delayed<M> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<M> Ord for Delayed<M> {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.due, self.order).cmp(&(other.due, other.order))
    }
}

/// The message ids a durable queue took lately, oldest first.
#[derive(Default)]
struct Seen {
    ids: HashMap<MessageId, Instant>,
    order: VecDeque<(MessageId, Instant)>,
}

impl Seen {
    /// Records `id` at `now`; `false` if it was taken within the window already.
    fn take(&mut self, id: MessageId, now: Instant) -> bool {
        while let Some(&(oldest, at)) = self.order.front() {
            if now.saturating_duration_since(at) < DEDUP_WINDOW && self.order.len() < DEDUP_CAPACITY {
                break;
            }
            self.order.pop_front();
            if self.ids.get(&oldest) == Some(&at) {
                self.ids.remove(&oldest);
            }
        }
        if self.ids.contains_key(&id) {
            return false;
        }
        self.ids.insert(id, now);
        self.order.push_back((id, now));
        true
    }
}

struct Queue<M> {
    name: Arc<str>,
    /// This incarnation of the name.
    id: u64,
    config: QueueConfig,
    ready: [VecDeque<Stored<M>>; PRIORITY_LEVELS],
    ready_len: usize,
    consumers: Vec<ConsumerId>,
    next_consumer: usize,
    unacked: usize,
    stats: QueueStats,
    dirty: bool,
    /// The calls with messages here, waiting or delivered.
    keys: HashMap<Key, Keyed>,
    /// Cancelled messages still in `ready`, not counted in `ready_len`.
    tombstones: usize,
    /// Live messages waiting out a delay (in the engine's heap), cancelled ones not counted.
    delayed: usize,
    /// The number the next message gets (durable queues).
    next_seq: u64,
    /// Message ids taken lately (durable queues).
    seen: Seen,
}

impl<M> Queue<M> {
    fn new(name: Arc<str>, id: u64, config: QueueConfig) -> Queue<M> {
        Queue {
            name,
            id,
            config,
            ready: std::array::from_fn(|_| VecDeque::new()),
            ready_len: 0,
            consumers: Vec::new(),
            next_consumer: 0,
            unacked: 0,
            stats: QueueStats::new(),
            dirty: false,
            keys: HashMap::default(),
            tombstones: 0,
            delayed: 0,
            next_seq: 1,
            seen: Seen::default(),
        }
    }

    /// Messages that count against `max_len`: ready and delayed.
    fn waiting(&self) -> usize {
        self.ready_len + self.delayed
    }

    /// The next number, for a message entering a durable queue; 0 elsewhere.
    fn number(&mut self) -> u64 {
        if !self.config.durable {
            return 0;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// The next message to deliver. Tombstones on the way are dropped.
    fn pop(&mut self, books: &mut Books<M>) -> Option<Stored<M>> {
        loop {
            let level = self.ready.iter_mut().rev().find(|level| !level.is_empty())?;
            let stored = level.pop_front()?;
            if let Some(key) = stored.key
                && leave(&mut self.keys, key)
            {
                self.tombstones -= 1;
                books.gone(&self.name, self.config.durable, &stored);
                continue;
            }
            self.ready_len -= 1;
            return Some(stored);
        }
    }

    /// Whether `key`'s call was cancelled while some of it is still here.
    fn is_cancelled(&self, key: Option<Key>) -> bool {
        key.is_some_and(|key| self.keys.get(&key).is_some_and(|keyed| keyed.cancelled))
    }

    fn push_back(&mut self, stored: Stored<M>) {
        self.push(stored, false);
    }

    fn push_front(&mut self, stored: Stored<M>) {
        self.push(stored, true);
    }

    /// Puts a message in `ready`; callers drop messages of cancelled calls first.
    fn push(&mut self, stored: Stored<M>, front: bool) {
        if let Some(key) = stored.key {
            self.keys.entry(key).or_default().ready += 1;
        }
        self.ready_len += 1;
        let level = &mut self.ready[usize::from(stored.priority)];
        if front {
            level.push_front(stored);
        } else {
            level.push_back(stored);
        }
    }

    /// A delivery of `key` to `consumer` as `tag`.
    fn delivered(&mut self, key: Key, consumer: ConsumerId, tag: u64) {
        self.keys.entry(key).or_default().hold((consumer, tag));
    }

    /// The delivery `tag` of `stored` to `consumer` was settled or taken back; `true` if its call was
    /// cancelled, so that it must not be queued again.
    fn settled(&mut self, stored: &Stored<M>, consumer: ConsumerId, tag: u64) -> bool {
        let Some(key) = stored.key else { return false };
        let Some(keyed) = self.keys.get_mut(&key) else { return false };
        keyed.release((consumer, tag));
        let cancelled = keyed.cancelled;
        if keyed.is_idle() {
            self.keys.remove(&key);
        }
        cancelled
    }

    /// Removes the tombstones and, given `now`, the messages whose TTL ran out.
    fn sweep(&mut self, now: Option<Instant>, books: &mut Books<M>) {
        let (mut expired, mut tombstones) = (0, 0);
        let Queue { ready, keys, name, config, .. } = self;
        for level in ready.iter_mut() {
            level.retain(|stored| {
                let cancelled = stored.key.is_some_and(|key| keys.get(&key).is_some_and(|keyed| keyed.cancelled));
                let timed_out = now.is_some_and(|now| stored.expires_at.passed(now));
                if !cancelled && !timed_out {
                    return true;
                }
                if let Some(key) = stored.key {
                    leave(keys, key);
                }
                books.gone(name, config.durable, stored);
                if cancelled {
                    tombstones += 1;
                } else {
                    expired += 1;
                }
                false
            });
        }
        self.tombstones -= tombstones;
        self.ready_len -= expired;
        self.stats.expired += expired as u64;
    }

    /// The log's view of a message of this queue.
    fn record(stored: &Stored<M>, due: Option<Instant>, id: Option<MessageId>) -> Record {
        Record { priority: stored.priority, expires_at: stored.expires_at.instant(), due, key: stored.key, id }
    }
}

/// Bytes held and the journal: what every message that leaves the engine updates.
struct Books<M> {
    /// Bytes of all messages held (ready, delayed, unacked and dead-lettered).
    bytes: usize,
    journal: Vec<Journal<M>>,
}

impl<M> Books<M> {
    /// `stored` left queue `queue` for good.
    fn gone(&mut self, queue: &Arc<str>, durable: bool, stored: &Stored<M>) {
        self.bytes -= stored.size;
        if durable {
            self.journal.push(Journal::Removed { queue: Arc::clone(queue), seq: stored.seq });
        }
    }
}

impl<M: Clone> Books<M> {
    /// `stored` entered queue `queue` (already counted in `bytes`).
    fn entered(
        &mut self,
        queue: &Arc<str>,
        durable: bool,
        stored: &Stored<M>,
        due: Option<Instant>,
        id: Option<MessageId>,
    ) {
        if durable {
            self.journal.push(Journal::Stored {
                queue: Arc::clone(queue),
                seq: stored.seq,
                message: stored.message.clone(),
                record: Queue::record(stored, due, id),
            });
        }
    }
}

struct Consumer<M> {
    queue: String,
    prefetch: u32,
    auto_ack: bool,
    paused: bool,
    unacked: HashMap<u64, Stored<M>>,
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

    /// Deletes `queue` with its messages; its consumers are removed.
    pub fn delete_queue(&mut self, queue: &str) -> bool {
        let Some(removed) = self.queues.remove(queue) else { return false };
        let ready: usize = removed.ready.iter().flatten().map(|stored| stored.size).sum();
        self.books.bytes -= ready;
        for consumer in removed.consumers {
            if let Some(consumer) = self.consumers.remove(&consumer) {
                self.books.bytes -= consumer.unacked.values().map(|stored| stored.size).sum::<usize>();
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
    /// and then puts it at the back. A full queue first drops its expired messages; delayed messages count
    /// against the maximum length. A durable queue takes a message whose [`Props::id`] it took within
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
            None => {
                target.push_back(stored);
                mark_dirty(target, &mut self.dirty);
            }
        }
        Ok(())
    }

    /// Puts `stored` of `queue` (which exists) in the delay heap until `due`.
    fn hold(&mut self, queue: &str, stored: Stored<M>, due: Instant) {
        let Some(target) = self.queues.get_mut(queue) else { return };
        target.delayed += 1;
        if let Some(key) = stored.key {
            target.keys.entry(key).or_default().delayed += 1;
        }
        let order = self.next_order;
        self.next_order += 1;
        let (queue, queue_id) = (Arc::clone(&target.name), target.id);
        self.delayed.push(Reverse(Delayed { due, order, queue, queue_id, stored }));
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

    /// Whether journal entries wait to be drained.
    pub fn has_journal(&self) -> bool {
        !self.books.journal.is_empty()
    }

    /// When the earliest delayed message is due: the driver calls [`Engine::dispatch`] then.
    pub fn next_due(&self) -> Option<Instant> {
        self.delayed.peek().map(|Reverse(delayed)| delayed.due)
    }

    /// Moves the delayed messages that are due to the back of their queues.
    fn promote(&mut self, now: Instant) {
        while self.delayed.peek().is_some_and(|Reverse(delayed)| delayed.due <= now) {
            let Some(Reverse(delayed)) = self.delayed.pop() else { break };
            let stored = delayed.stored;
            let Some(queue) = self.queues.get_mut(&*delayed.queue).filter(|queue| queue.id == delayed.queue_id) else {
                // Its queue was deleted (and journaled so) meanwhile.
                self.books.bytes -= stored.size;
                continue;
            };
            if let Some(key) = stored.key
                && leave_delayed(&mut queue.keys, key)
            {
                // Cancelled while it waited: counted then.
                self.delayed_tombstones = self.delayed_tombstones.saturating_sub(1);
                self.books.gone(&queue.name, queue.config.durable, &stored);
                continue;
            }
            queue.delayed -= 1;
            if stored.expires_at.passed(now) {
                queue.stats.expired += 1;
                self.books.gone(&queue.name, queue.config.durable, &stored);
                continue;
            }
            queue.push_back(stored);
            mark_dirty(queue, &mut self.dirty);
        }
    }

    /// Drops the delayed messages of cancelled calls.
    fn sweep_delayed(&mut self) {
        let Engine { delayed, queues, books, .. } = self;
        delayed.retain(|Reverse(entry)| {
            let Some(key) = entry.stored.key else { return true };
            let Some(queue) = queues.get_mut(&*entry.queue).filter(|queue| queue.id == entry.queue_id) else {
                return true;
            };
            if !queue.keys.get(&key).is_some_and(|keyed| keyed.cancelled) {
                return true;
            }
            leave_delayed(&mut queue.keys, key);
            books.gone(&queue.name, queue.config.durable, &entry.stored);
            false
        });
        self.delayed_tombstones = 0;
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
            Consumer { queue: queue.to_owned(), prefetch, auto_ack, paused: false, unacked: HashMap::default() },
        );
        Ok(id)
    }

    /// Stops new deliveries to a consumer; the deliveries it holds stay settleable.
    pub fn pause_consumer(&mut self, id: ConsumerId) {
        if let Some(consumer) = self.consumers.get_mut(&id) {
            consumer.paused = true;
        }
    }

    /// Detaches a consumer; its unacked deliveries go back to the front of the queue (or to the dead-letter
    /// queue once they reached `max_deliveries`). An auto-delete queue goes with its last consumer.
    pub fn remove_consumer(&mut self, id: ConsumerId, now: Instant) {
        let Some(consumer) = self.consumers.remove(&id) else { return };
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
        let queue_name = consumer.queue.clone();
        let Some(queue) = self.queues.get_mut(&queue_name) else { return Ok(()) };
        queue.unacked -= 1;
        mark_dirty(queue, &mut self.dirty);
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
            Settle::Requeue => self.requeue(&queue_name, stored, now),
            Settle::DeadLetter => self.dead_letter(&queue_name, stored, now),
            Settle::Release => {
                let mut stored = stored;
                stored.deliveries = stored.deliveries.saturating_sub(1);
                queue.push_front(stored);
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

fn mark_dirty<M>(queue: &mut Queue<M>, dirty: &mut Vec<Arc<str>>) {
    if !queue.dirty {
        queue.dirty = true;
        dirty.push(Arc::clone(&queue.name));
    }
}

/// Delivers what `queue` can deliver now, dropping expired messages (and, for auto-ack consumers, the
/// messages handed out) from the books.
fn dispatch_queue<M: Clone>(
    queue: &mut Queue<M>,
    consumers: &mut HashMap<ConsumerId, Consumer<M>>,
    next_tag: &mut u64,
    now: Instant,
    out: &mut Vec<Delivery<M>>,
    books: &mut Books<M>,
) {
    while queue.ready_len > 0 && !queue.consumers.is_empty() {
        // The next consumer, round-robin, that has room.
        let count = queue.consumers.len();
        let Some(slot) = (0..count).map(|step| (queue.next_consumer + step) % count).find(|&slot| {
            consumers.get(&queue.consumers[slot]).is_some_and(|consumer| {
                !consumer.paused && (consumer.prefetch == 0 || consumer.unacked.len() < consumer.prefetch as usize)
            })
        }) else {
            return;
        };
        queue.next_consumer = (slot + 1) % count;
        let id = queue.consumers[slot];
        let Some(mut stored) = queue.pop(books) else { return };
        if stored.expires_at.passed(now) {
            queue.stats.expired += 1;
            books.gone(&queue.name, queue.config.durable, &stored);
            continue;
        }
        let Some(consumer) = consumers.get_mut(&id) else {
            queue.push_front(stored);
            return;
        };
        stored.deliveries += 1;
        let remaining_ttl = stored.expires_at.instant().map(|at| at.saturating_duration_since(now));
        let delivery_count = stored.deliveries;
        if consumer.auto_ack {
            queue.stats.acked += 1;
            books.gone(&queue.name, queue.config.durable, &stored);
            out.push(Delivery { consumer: id, tag: 0, message: stored.message, delivery_count, remaining_ttl });
        } else {
            let tag = *next_tag;
            *next_tag += 1;
            out.push(Delivery { consumer: id, tag, message: stored.message.clone(), delivery_count, remaining_ttl });
            if let Some(key) = stored.key {
                queue.delivered(key, id, tag);
            }
            consumer.unacked.insert(tag, stored);
            queue.unacked += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queued_message_costs_at_most_80_bytes_besides_its_own() {
        // The broker holds a million queued 100-byte messages within 300 MiB with a few MiB to spare.
        assert!(std::mem::size_of::<Stored<bytes::Bytes>>() <= 80, "{}", std::mem::size_of::<Stored<bytes::Bytes>>());
    }

    #[test]
    fn an_expiry_keeps_its_instant_to_the_nanosecond() {
        let now = Instant::now();
        assert_eq!(Expiry::at(None), Expiry::NEVER);
        assert_eq!(Expiry::NEVER.instant(), None);
        assert!(!Expiry::NEVER.passed(now + Duration::from_secs(3_600)));
        let at = now + Duration::from_nanos(1_500_000_001);
        assert_eq!(Expiry::at(Some(at)).instant(), Some(at));
        assert!(!Expiry::at(Some(at)).passed(now));
        assert!(Expiry::at(Some(at)).passed(at));
        // Before the epoch: passed already.
        let before = Expiry::epoch().checked_sub(Duration::from_secs(1)).unwrap_or_else(Expiry::epoch);
        assert!(Expiry::at(Some(before)).passed(Expiry::epoch() + Duration::from_nanos(1)));
    }

    fn engine_with(queue: &str, config: QueueConfig) -> Engine<u32> {
        let mut engine = Engine::new();
        engine.declare_queue(queue, config).expect("declares");
        engine
    }

    fn drain(engine: &mut Engine<u32>, now: Instant) -> Vec<Delivery<u32>> {
        let mut out = Vec::new();
        engine.dispatch(now, &mut out);
        out
    }

    fn messages(deliveries: &[Delivery<u32>]) -> Vec<u32> {
        deliveries.iter().map(|delivery| delivery.message).collect()
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

    fn delayed(delay_ms: u64) -> Props {
        Props { size: 10, delay: Some(Duration::from_millis(delay_ms)), ..Props::default() }
    }

    #[test]
    fn a_delayed_message_waits_its_delay_then_joins_the_back_of_the_queue() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        let mut engine = engine_with("q", QueueConfig::default());
        engine.add_consumer("q", 0, true).expect("consumes");
        engine.publish("q", 1, delayed(200), now).expect("publishes");
        engine.publish("q", 2, delayed(100), now).expect("publishes");
        assert_eq!(engine.next_due(), Some(now + ms(100)));
        assert!(drain(&mut engine, now + ms(99)).is_empty());
        let stats = engine.stats("q").expect("exists");
        assert_eq!((stats.ready, stats.delayed, stats.published), (0, 2, 2));
        assert_eq!(engine.bytes(), 20);
        assert_eq!(messages(&drain(&mut engine, now + ms(100))), [2]);
        assert_eq!(engine.next_due(), Some(now + ms(200)));
        // Due, it queues behind what was published meanwhile without a delay.
        engine.pause_consumer(ConsumerId(1));
        engine.publish("q", 3, Props::default(), now + ms(150)).expect("publishes");
        assert!(drain(&mut engine, now + ms(250)).is_empty());
        let stats = engine.stats("q").expect("exists");
        assert_eq!((stats.ready, stats.delayed), (2, 0));
        assert_eq!(engine.next_due(), None);
        engine.add_consumer("q", 0, true).expect("consumes");
        assert_eq!(messages(&drain(&mut engine, now + ms(250))), [3, 1]);
        assert_eq!(engine.bytes(), 0);
    }

    #[test]
    fn a_delayed_message_whose_ttl_ends_first_is_never_delivered() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        let mut engine = engine_with("q", QueueConfig::default());
        engine.add_consumer("q", 0, true).expect("consumes");
        let props = Props { ttl: Some(ms(50)), ..delayed(100) };
        engine.publish("q", 1, props, now).expect("publishes");
        assert!(drain(&mut engine, now + ms(100)).is_empty());
        let stats = engine.stats("q").expect("exists");
        assert_eq!((stats.ready, stats.delayed, stats.expired), (0, 0, 1));
        assert_eq!(engine.bytes(), 0);
        // A TTL longer than the delay is what remains at delivery.
        let props = Props { ttl: Some(ms(300)), ..delayed(100) };
        engine.publish("q", 2, props, now).expect("publishes");
        let out = drain(&mut engine, now + ms(100));
        assert_eq!(out[0].remaining_ttl, Some(ms(200)));
    }

    #[test]
    fn delayed_messages_count_against_the_maximum_length() {
        let now = Instant::now();
        let mut engine = engine_with("q", QueueConfig { max_len: Some(2), ..QueueConfig::default() });
        engine.publish("q", 1, delayed(100), now).expect("publishes");
        engine.publish("q", 2, Props::default(), now).expect("publishes");
        assert_eq!(engine.publish("q", 3, delayed(100), now), Err(EngineError::QueueFull("q".into())));
    }

    #[test]
    fn cancel_removes_a_delayed_message_and_a_flood_stays_bounded() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        let mut engine = engine_with("q", QueueConfig::default());
        engine.add_consumer("q", 0, true).expect("consumes");
        engine.publish("q", 1, Props { key: Some([1; 16]), ..delayed(100) }, now).expect("publishes");
        engine.publish("q", 2, delayed(100), now).expect("publishes");
        assert_eq!(engine.cancel("q", [1; 16]), Ok(Vec::new()));
        let stats = engine.stats("q").expect("exists");
        assert_eq!((stats.delayed, stats.cancelled), (1, 1));
        assert_eq!(messages(&drain(&mut engine, now + ms(100))), [2]);
        assert_eq!(engine.bytes(), 0);
        assert!(engine.queues["q"].keys.is_empty());
        // 100,000 delayed calls published and cancelled: the cancelled ones are swept, not held until due.
        let mut most = 0;
        for n in 0..100_000u32 {
            let mut key = [0; 16];
            key[..4].copy_from_slice(&n.to_be_bytes());
            engine.publish("q", n, Props { key: Some(key), ..delayed(60_000) }, now).expect("publishes");
            engine.cancel("q", key).expect("cancels");
            most = most.max(engine.delayed.len().max(engine.queues["q"].keys.len()));
        }
        assert!(most <= 2, "the engine held {most} delayed messages or keys");
        assert_eq!(engine.stats("q").expect("exists").cancelled, 100_001);
        assert_eq!(engine.next_due(), None);
        assert_eq!(engine.bytes(), 0);
    }

    #[test]
    fn a_queue_declared_again_does_not_receive_what_was_delayed_for_the_one_before() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        let mut engine = engine_with("q", QueueConfig::default());
        engine.publish("q", 1, delayed(100), now).expect("publishes");
        assert!(engine.delete_queue("q"));
        engine.declare_queue("q", QueueConfig::default()).expect("declares");
        engine.add_consumer("q", 0, true).expect("consumes");
        assert!(drain(&mut engine, now + ms(100)).is_empty());
        assert_eq!(engine.bytes(), 0);
    }

    fn durable_queue(engine: &mut Engine<u32>, queue: &str) {
        let config = QueueConfig { durable: true, dead_letter: Some(format!("{queue}.dlq")), ..QueueConfig::default() };
        engine.declare_queue(queue, config).expect("declares");
    }

    fn journal(engine: &mut Engine<u32>) -> Vec<String> {
        let mut entries = Vec::new();
        engine.drain_journal(&mut entries);
        entries
            .into_iter()
            .map(|entry| match entry {
                Journal::Declared { queue, config } => format!("declared {queue} durable={}", config.durable),
                Journal::Deleted { queue } => format!("deleted {queue}"),
                Journal::Stored { queue, seq, message, .. } => format!("stored {queue} {seq} {message}"),
                Journal::Removed { queue, seq } => format!("removed {queue} {seq}"),
            })
            .collect()
    }

    #[test]
    fn a_durable_queue_journals_every_message_in_and_out() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        let mut engine = Engine::new();
        durable_queue(&mut engine, "q");
        engine.declare_queue("mem", QueueConfig::default()).expect("declares");
        assert_eq!(journal(&mut engine), ["declared q.dlq durable=true", "declared q durable=true"]);
        engine.publish("mem", 0, Props::default(), now).expect("publishes");
        for n in 1..=4 {
            engine.publish("q", n, Props { size: 1, ..Props::default() }, now).expect("publishes");
        }
        engine.publish("q", 5, Props { ttl: Some(ms(10)), ..Props::default() }, now).expect("publishes");
        assert_eq!(
            journal(&mut engine),
            ["stored q 1 1", "stored q 2 2", "stored q 3 3", "stored q 4 4", "stored q 5 5"]
        );
        let consumer = engine.add_consumer("q", 3, false).expect("consumes");
        let held = drain(&mut engine, now + ms(20));
        assert_eq!(messages(&held), [1, 2, 3]);
        engine.settle(consumer, held[0].tag, Settle::Ack, now).expect("acks");
        engine.settle(consumer, held[1].tag, Settle::DeadLetter, now).expect("dead-letters");
        engine.settle(consumer, held[2].tag, Settle::Requeue, now).expect("requeues");
        engine.remove_consumer(consumer, now);
        engine.expire(now + ms(20));
        assert_eq!(journal(&mut engine), ["removed q 1", "stored q.dlq 1 2", "removed q 2", "removed q 5"]);
        let auto = engine.add_consumer("q", 0, true).expect("consumes");
        assert_eq!(messages(&drain(&mut engine, now)), [3, 4]);
        engine.remove_consumer(auto, now);
        assert_eq!(journal(&mut engine), ["removed q 3", "removed q 4"]);
        assert!(engine.delete_queue("q"));
        assert_eq!(journal(&mut engine), ["deleted q"]);
    }

    #[test]
    fn a_durable_queue_takes_a_message_id_once_within_the_window() {
        let now = Instant::now();
        let mut engine = Engine::new();
        durable_queue(&mut engine, "q");
        let with_id = |id: u8| Props { id: Some([id; 16]), ..Props::default() };
        engine.publish("q", 1, with_id(1), now).expect("publishes");
        engine.publish("q", 1, with_id(1), now + Duration::from_secs(1)).expect("a retry succeeds");
        engine.publish("q", 2, with_id(2), now).expect("publishes");
        let stats = engine.stats("q").expect("exists");
        assert_eq!((stats.ready, stats.published, stats.deduplicated), (2, 2, 1));
        // Past the window the id is forgotten.
        engine.publish("q", 1, with_id(1), now + DEDUP_WINDOW + Duration::from_secs(1)).expect("publishes");
        assert_eq!(engine.stats("q").expect("exists").ready, 3);
    }

    #[test]
    fn restored_messages_come_back_ready_delayed_or_expired() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        let mut engine = Engine::new();
        durable_queue(&mut engine, "q");
        journal(&mut engine);
        let record = |expires_at, due| Record { priority: 0, expires_at, due, key: None, id: Some([9; 16]) };
        engine.restore("q", 3, 30, 1, record(None, None), now).expect("restores");
        engine.restore("q", 7, 70, 1, record(Some(now), None), now).expect("restores");
        engine.restore("q", 9, 90, 1, record(None, Some(now + ms(50))), now).expect("restores");
        assert_eq!(journal(&mut engine), ["removed q 7"], "an expired message is dropped, and the log told");
        let stats = engine.stats("q").expect("exists");
        assert_eq!((stats.ready, stats.delayed, stats.expired), (1, 1, 1));
        engine.add_consumer("q", 0, true).expect("consumes");
        assert_eq!(messages(&drain(&mut engine, now)), [30]);
        assert_eq!(messages(&drain(&mut engine, now + ms(50))), [90]);
        // Numbers go on after the highest restored, and a restored id still counts against duplicates.
        journal(&mut engine);
        engine.publish("q", 10, Props { id: Some([9; 16]), ..Props::default() }, now).expect("publishes");
        engine.publish("q", 11, Props::default(), now).expect("publishes");
        assert_eq!(journal(&mut engine), ["stored q 10 11"]);
    }
}
