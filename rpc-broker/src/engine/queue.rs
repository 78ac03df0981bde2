//! One queue: its ready messages by priority, the calls it holds (for cancel), and its deliveries to
//! consumers under their prefetch.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rpc_core::QueueStats;

use super::journal::{Books, Record};
use super::seen::Seen;
use super::{Consumer, ConsumerId, Delivery, HashMap, Key, MessageId, QueueConfig};

/// Priority levels: 0 (default, last) to 9 (first).
pub const PRIORITY_LEVELS: usize = 10;

/// When a stored message's TTL ends, in 8 bytes instead of an `Option<Instant>`'s 16 (a million queued messages
/// hold 8 MB less): nanoseconds after an instant this process reads once, 0 for never.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Expiry(u64);

impl Expiry {
    pub(super) const NEVER: Expiry = Expiry(0);

    /// The instant the offsets count from: an hour before it was first asked for (where the clock goes back
    /// that far), so that the instants a caller read just before, such as the `now` of the operation that asks
    /// first, come after it.
    fn epoch() -> Instant {
        static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *EPOCH.get_or_init(|| {
            let now = Instant::now();
            now.checked_sub(Duration::from_secs(3_600)).unwrap_or(now)
        })
    }

    /// `at`, or never. An instant before the epoch is 1 ns after it: passed as it was.
    pub(super) fn at(at: Option<Instant>) -> Expiry {
        let Some(at) = at else { return Expiry::NEVER };
        let nanos = at.saturating_duration_since(Expiry::epoch()).as_nanos();
        Expiry(u64::try_from(nanos).unwrap_or(u64::MAX).max(1))
    }

    /// The instant, if any.
    pub(super) fn instant(self) -> Option<Instant> {
        (self != Expiry::NEVER).then(|| Expiry::epoch() + Duration::from_nanos(self.0))
    }

    /// Whether it has come by `now`.
    pub(super) fn passed(self, now: Instant) -> bool {
        self.instant().is_some_and(|at| at <= now)
    }
}

pub(super) struct Stored<M> {
    pub(super) message: M,
    pub(super) size: usize,
    pub(super) priority: u8,
    pub(super) expires_at: Expiry,
    pub(super) deliveries: u32,
    pub(super) key: Option<Key>,
    /// Its number in a durable queue (0 elsewhere).
    pub(super) seq: u64,
}

/// What a queue knows of one call's messages.
#[derive(Default)]
pub(super) struct Keyed {
    /// Copies in `ready`, tombstones included.
    pub(super) ready: u32,
    /// Copies waiting out a delay, tombstones included.
    pub(super) delayed: u32,
    /// The first delivery of it not settled, as consumer and tag (most calls have at most one).
    holder: Option<(ConsumerId, u64)>,
    /// The others.
    more_holders: Vec<(ConsumerId, u64)>,
    /// The call was cancelled: its copies in `ready` are tombstones, and none of it is queued again.
    pub(super) cancelled: bool,
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
    pub(super) fn holders(&self) -> impl Iterator<Item = (ConsumerId, u64)> + '_ {
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
pub(super) fn leave_delayed(keys: &mut HashMap<Key, Keyed>, key: Key) -> bool {
    let Some(keyed) = keys.get_mut(&key) else { return false };
    keyed.delayed = keyed.delayed.saturating_sub(1);
    let cancelled = keyed.cancelled;
    if keyed.is_idle() {
        keys.remove(&key);
    }
    cancelled
}

pub(super) struct Queue<M> {
    pub(super) name: Arc<str>,
    /// This incarnation of the name.
    pub(super) id: u64,
    pub(super) config: QueueConfig,
    pub(super) ready: [VecDeque<Stored<M>>; PRIORITY_LEVELS],
    pub(super) ready_len: usize,
    pub(super) consumers: Vec<ConsumerId>,
    next_consumer: usize,
    pub(super) unacked: usize,
    pub(super) stats: QueueStats,
    pub(super) dirty: bool,
    /// The calls with messages here, waiting or delivered.
    pub(super) keys: HashMap<Key, Keyed>,
    /// Cancelled messages still in `ready`, not counted in `ready_len`.
    pub(super) tombstones: usize,
    /// Live messages waiting out a delay (in the engine's heap), cancelled ones not counted.
    pub(super) delayed: usize,
    /// The number the next message gets (durable queues).
    pub(super) next_seq: u64,
    /// Message ids taken lately (durable queues).
    pub(super) seen: Seen,
}

impl<M> Queue<M> {
    pub(super) fn new(name: Arc<str>, id: u64, config: QueueConfig) -> Queue<M> {
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
    pub(super) fn waiting(&self) -> usize {
        self.ready_len + self.delayed
    }

    /// The next number, for a message entering a durable queue; 0 elsewhere.
    pub(super) fn number(&mut self) -> u64 {
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
    pub(super) fn is_cancelled(&self, key: Option<Key>) -> bool {
        key.is_some_and(|key| self.keys.get(&key).is_some_and(|keyed| keyed.cancelled))
    }

    pub(super) fn push_back(&mut self, stored: Stored<M>) {
        self.push(stored, false);
    }

    pub(super) fn push_front(&mut self, stored: Stored<M>) {
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
    pub(super) fn settled(&mut self, stored: &Stored<M>, consumer: ConsumerId, tag: u64) -> bool {
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
    pub(super) fn sweep(&mut self, now: Option<Instant>, books: &mut Books<M>) {
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
    pub(super) fn record(stored: &Stored<M>, due: Option<Instant>, id: Option<MessageId>) -> Record {
        Record { priority: stored.priority, expires_at: stored.expires_at.instant(), due, key: stored.key, id }
    }
}

pub(super) fn mark_dirty<M>(queue: &mut Queue<M>, dirty: &mut Vec<Arc<str>>) {
    if !queue.dirty {
        queue.dirty = true;
        dirty.push(Arc::clone(&queue.name));
    }
}

/// Delivers what `queue` can deliver now, dropping expired messages (and, for auto-ack consumers, the
/// messages handed out) from the books.
pub(super) fn dispatch_queue<M: Clone>(
    queue: &mut Queue<M>,
    consumers: &mut HashMap<ConsumerId, Consumer<M>>,
    next_tag: &mut u64,
    now: Instant,
    out: &mut Vec<Delivery<M>>,
    books: &mut Books<M>,
) {
    refresh_gates(queue, consumers);
    while queue.ready_len > 0 && !queue.consumers.is_empty() {
        let Some(id) = next_with_room(queue, consumers) else { break };
        let Some(stored) = queue.pop(books) else { break };
        if let Some(stored) = hand(queue, consumers, id, stored, next_tag, now, out, books) {
            queue.push_front(stored);
            break;
        }
    }
    refresh_gates(queue, consumers);
}

/// Opens the gate of the queue's consumer if a message published now would go straight to it (see
/// [`Gate`](super::Gate)), and closes the gates that may not be open: a message waits, or the queue knows a
/// call (waiting, delayed or cancelled: a resend of a cancelled call must meet the engine), or another consumer
/// shares the queue, or the consumer is paused, held back or holds deliveries from the engine. A durable
/// queue's messages all go through the engine, in the order its log has them, and a queue with a maximum
/// length counts what waits against it there.
fn refresh_gates<M>(queue: &Queue<M>, consumers: &HashMap<ConsumerId, Consumer<M>>) {
    let open = queue.ready_len == 0
        && queue.keys.is_empty()
        && !queue.config.durable
        && queue.config.max_len.is_none()
        && queue.consumers.len() == 1;
    for id in &queue.consumers {
        if let Some(consumer) = consumers.get(id)
            && let Some(gate) = &consumer.gate
        {
            if open && consumer.may_bypass() {
                gate.open();
            } else {
                gate.close();
            }
        }
    }
}

/// Hands `stored`, just published to `queue`, to the queue's next consumer with room, as [`dispatch_queue`]
/// would once it was queued; gives it back when no consumer has room. The caller makes sure that nothing waits
/// in the queue before it.
pub(super) fn hand_out_now<M: Clone>(
    queue: &mut Queue<M>,
    consumers: &mut HashMap<ConsumerId, Consumer<M>>,
    next_tag: &mut u64,
    now: Instant,
    out: &mut Vec<Delivery<M>>,
    books: &mut Books<M>,
    stored: Stored<M>,
) -> Result<(), Stored<M>> {
    match next_with_room(queue, consumers) {
        Some(id) => hand(queue, consumers, id, stored, next_tag, now, out, books).map_or(Ok(()), Err),
        None => Err(stored),
    }
}

/// The queue's next consumer, round-robin, that has room.
fn next_with_room<M>(queue: &mut Queue<M>, consumers: &HashMap<ConsumerId, Consumer<M>>) -> Option<ConsumerId> {
    let count = queue.consumers.len();
    let slot = (0..count)
        .map(|step| (queue.next_consumer + step) % count)
        .find(|&slot| consumers.get(&queue.consumers[slot]).is_some_and(Consumer::has_room))?;
    queue.next_consumer = (slot + 1) % count;
    Some(queue.consumers[slot])
}

/// Hands `stored`, out of `queue`'s ready messages, to consumer `id`, or drops it if its TTL ran out; gives it
/// back if the consumer is gone.
#[expect(clippy::too_many_arguments, reason = "the engine's parts that a delivery touches, borrowed apart")]
fn hand<M: Clone>(
    queue: &mut Queue<M>,
    consumers: &mut HashMap<ConsumerId, Consumer<M>>,
    id: ConsumerId,
    mut stored: Stored<M>,
    next_tag: &mut u64,
    now: Instant,
    out: &mut Vec<Delivery<M>>,
    books: &mut Books<M>,
) -> Option<Stored<M>> {
    if stored.expires_at.passed(now) {
        queue.stats.expired += 1;
        books.gone(&queue.name, queue.config.durable, &stored);
        return None;
    }
    let Some(consumer) = consumers.get_mut(&id) else { return Some(stored) };
    stored.deliveries += 1;
    queue.stats.delivered += 1;
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
    None
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
}
