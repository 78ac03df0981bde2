//! Lanes: calls handed from thread to consumer around the engine, without the lock its threads share.
//!
//! A server's consumer and a client's inbox take their deliveries straight from the thread that publishes
//! them (they are direct: [`ConsumerControl::direct`](rpc_core::transport::ConsumerControl::direct)). While
//! such a consumer is the only one of its queue and nothing waits there, the engine opens its [`Gate`], and a
//! publish to that queue goes down the consumer's lane: counted in the gate against the consumer's prefetch,
//! kept in the lane's book until it is settled, and handed to the consumer, with no turn of the engine's lock.
//! A settle of it takes it out of the book. Whatever else happens to it goes back to the engine, as the engine
//! would have done it: a requeue, a release or a dead-lettering; a cancel of its call; the consumer going
//! (what it holds is queued again).
//!
//! The book is kept per stripe of threads ([`Striped`]): the thread that publishes a call keeps its delivery
//! in its own stripe, and the answer, which the server makes on the same thread, takes it out again, so that
//! the threads share no line for it but the gate's count.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use rpc_core::QueueStats;
use rpc_core::transport::{STRIPES, Striped, thread_stripe};

use super::{ChannelSink, Message};
use crate::engine::{self, ConsumerId, Gate, Key, Props};
use crate::hub::Sink;

type HashMap<K, V> = hashbrown::HashMap<K, V>;

/// Marks the tags of deliveries made down a lane, apart from the engine's (which count up from 1). The stripe
/// that keeps the delivery is in the low bits.
pub(super) const LANE_TAG: u64 = 1 << 63;

/// Bits of a lane's tag that name its stripe.
const STRIPE_BITS: u32 = STRIPES.trailing_zeros();

/// Whether `tag` names a delivery made down a lane.
pub(super) fn is_lane_tag(tag: u64) -> bool {
    tag & LANE_TAG != 0
}

/// Locks `mutex`, poisoned or not: what the lanes keep under their locks stays whole between statements.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A direct consumer's lane.
pub(super) struct Lane {
    pub(super) consumer: ConsumerId,
    prefetch: u32,
    auto_ack: bool,
    sink: Arc<ChannelSink>,
    pub(super) book: Arc<LaneBook>,
}

impl Lane {
    pub(super) fn new(
        consumer: ConsumerId,
        prefetch: u32,
        auto_ack: bool,
        sink: Arc<ChannelSink>,
        book: Arc<LaneBook>,
    ) -> Lane {
        Lane { consumer, prefetch, auto_ack, sink, book }
    }

    /// Hands `message` to the consumer down the lane, if its gate lets it; gives it back otherwise, for the
    /// engine. A message of a call cancelled while the lane holds a delivery of it is dropped, as the engine
    /// drops a resend of a cancelled call.
    pub(super) fn try_deliver(&self, message: Message, props: Props, now: Instant) -> Result<(), Message> {
        let book = &*self.book;
        let index = thread_stripe() % STRIPES;
        let mut stripe = lock(book.stripes.at(index));
        if stripe.closed {
            return Err(message);
        }
        if book.any_cancelled.load(Ordering::Acquire)
            && let Some(key) = props.key
            && lock(&book.cancelled).contains_key(&key)
        {
            stripe.counts.published += 1;
            stripe.counts.cancelled += 1;
            return Ok(());
        }
        let tag = if self.auto_ack {
            if !book.gate.is_open() {
                return Err(message);
            }
            stripe.counts.acked += 1;
            0
        } else {
            if !book.gate.try_claim(self.prefetch) {
                return Err(message);
            }
            let tag = LANE_TAG | (stripe.next << STRIPE_BITS) | index as u64;
            stripe.next += 1;
            let expires_at = props.ttl.map(|ttl| now + ttl);
            let holding = Holding { message: Arc::clone(&message), props, at: now, expires_at, cancelled: false };
            stripe.held.insert(tag, holding);
            tag
        };
        stripe.counts.published += 1;
        stripe.counts.delivered += 1;
        drop(stripe);
        let delivery =
            engine::Delivery { consumer: self.consumer, tag, message, delivery_count: 1, remaining_ttl: props.ttl };
        self.sink.deliver(delivery, now);
        Ok(())
    }

    /// Marks the deliveries the lane holds of call `key` cancelled, and tells the consumer.
    pub(super) fn cancel(&self, key: Key) {
        for tag in self.book.cancel(key) {
            self.sink.abort(tag);
        }
    }
}

/// A delivery made down a lane, until it is settled.
pub(super) struct Holding {
    pub(super) message: Message,
    pub(super) props: Props,
    /// When it was published: the order it goes back to the queue in, if its consumer goes.
    pub(super) at: Instant,
    /// When its TTL ends, if it has one.
    pub(super) expires_at: Option<Instant>,
    /// Its call was cancelled.
    pub(super) cancelled: bool,
}

/// A queue's counters for what went down a lane, added to the engine's.
#[derive(Clone, Copy, Default)]
pub(super) struct Counts {
    published: u64,
    delivered: u64,
    acked: u64,
    cancelled: u64,
}

impl Counts {
    /// Adds these counts to `stats`.
    pub(super) fn add_to(self, stats: &mut QueueStats) {
        stats.published += self.published;
        stats.delivered += self.delivered;
        stats.acked += self.acked;
        stats.cancelled += self.cancelled;
    }
}

/// One stripe of a lane's book.
#[derive(Default)]
struct LaneStripe {
    /// The number in the next tag.
    next: u64,
    held: HashMap<u64, Holding>,
    /// The consumer went or its queue was deleted: what was held here went back to the engine or with the
    /// queue, and nothing goes down the lane any more.
    closed: bool,
    counts: Counts,
}

/// What a lane holds, shared with the consumer's ackers.
pub(super) struct LaneBook {
    pub(super) queue: Arc<str>,
    /// The queue's incarnation ([`Engine::incarnation`](crate::engine::Engine::incarnation)): what goes back
    /// to the engine goes back to this queue, not to one declared under its name after it was deleted.
    pub(super) incarnation: u64,
    pub(super) gate: Arc<Gate>,
    /// The broker's lanes, where an answer to a delivery of this lane looks for the lane of its reply.
    pub(super) lanes: Arc<Lanes>,
    stripes: Striped<Mutex<LaneStripe>>,
    /// Calls cancelled while the lane holds deliveries of them, with how many of those.
    cancelled: Mutex<HashMap<Key, u32>>,
    /// Whether `cancelled` holds any, read by every publish down the lane.
    any_cancelled: AtomicBool,
}

impl LaneBook {
    pub(super) fn new(queue: Arc<str>, incarnation: u64, gate: Arc<Gate>, lanes: Arc<Lanes>) -> LaneBook {
        LaneBook {
            queue,
            incarnation,
            gate,
            lanes,
            stripes: Striped::default(),
            cancelled: Mutex::new(HashMap::default()),
            any_cancelled: AtomicBool::new(false),
        }
    }

    fn stripe_of(&self, tag: u64) -> &Mutex<LaneStripe> {
        // The low bits of a lane's tag, under STRIPES.
        self.stripes.at((tag & (STRIPES as u64 - 1)) as usize)
    }

    /// Whether the lane holds delivery `tag`.
    pub(super) fn holds(&self, tag: u64) -> bool {
        lock(self.stripe_of(tag)).held.contains_key(&tag)
    }

    /// Takes delivery `tag` out of the book, to settle it, counted as acked if `ack`; `None` if it is not held
    /// (settled already, or taken back to the engine when its consumer went).
    pub(super) fn take(&self, tag: u64, ack: bool) -> Option<Holding> {
        let mut stripe = lock(self.stripe_of(tag));
        let holding = stripe.held.remove(&tag)?;
        stripe.counts.acked += u64::from(ack);
        Some(holding)
    }

    /// Puts back a delivery taken out to ack it whose ack failed; gives it back if the lane closed meanwhile,
    /// for the engine to queue again.
    pub(super) fn put_back(&self, tag: u64, holding: Holding) -> Option<Holding> {
        let mut stripe = lock(self.stripe_of(tag));
        if stripe.closed {
            // The lane's counts went to the engine's when it closed, this ack among them if it was counted
            // before: one ack too many there, in this rare race, and none taken off here.
            stripe.counts.acked = stripe.counts.acked.saturating_sub(1);
            return Some(holding);
        }
        stripe.counts.acked -= 1;
        stripe.held.insert(tag, holding);
        None
    }

    /// A settled delivery's call no longer stops a resend of it, once no delivery of it is held.
    pub(super) fn forget(&self, holding: &Holding) {
        let (true, Some(key)) = (holding.cancelled, holding.props.key) else { return };
        let mut cancelled = lock(&self.cancelled);
        if let Some(count) = cancelled.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                cancelled.remove(&key);
            }
        }
        self.any_cancelled.store(!cancelled.is_empty(), Ordering::Release);
    }

    /// Marks the deliveries held of call `key` cancelled; returns their tags.
    fn cancel(&self, key: Key) -> Vec<u64> {
        let mut tags = Vec::new();
        for stripe in self.stripes.iter() {
            let mut stripe = lock(stripe);
            for (tag, holding) in &mut stripe.held {
                if holding.props.key == Some(key) && !holding.cancelled {
                    holding.cancelled = true;
                    tags.push(*tag);
                }
            }
        }
        if !tags.is_empty() {
            let mut cancelled = lock(&self.cancelled);
            *cancelled.entry(key).or_default() += u32::try_from(tags.len()).unwrap_or(u32::MAX);
            self.any_cancelled.store(true, Ordering::Release);
        }
        tags
    }

    /// Closes the lane and takes out everything it holds, oldest first, with what it counted: from now on the
    /// queue's counters are the engine's alone.
    pub(super) fn close(&self) -> (Vec<Holding>, Counts) {
        let mut all = Vec::new();
        let mut total = Counts::default();
        for stripe in self.stripes.iter() {
            let mut stripe = lock(stripe);
            stripe.closed = true;
            all.extend(stripe.held.drain().map(|(tag, holding)| (holding.at, tag, holding)));
            let counts = std::mem::take(&mut stripe.counts);
            total.published += counts.published;
            total.delivered += counts.delivered;
            total.acked += counts.acked;
            total.cancelled += counts.cancelled;
        }
        all.sort_by_key(|(at, tag, _)| (*at, *tag));
        (all.into_iter().map(|(_, _, holding)| holding).collect(), total)
    }

    /// Adds what went down the lane to the engine's counters of its queue. What it holds counts as unacked: a
    /// delivery leaves the book as its ack is counted, before its reply is published (the gate gives its slot
    /// back after), so that whoever the reply wakes reads the ack.
    pub(super) fn add_to(&self, stats: &mut QueueStats) {
        for stripe in self.stripes.iter() {
            let stripe = lock(stripe);
            stripe.counts.add_to(stats);
            stats.unacked += stripe.held.len();
        }
    }
}

/// The lanes by queue, once per stripe of threads, so that a publish looks its lane up without touching a
/// line that another thread writes.
#[derive(Default)]
pub(super) struct Lanes {
    stripes: Striped<Mutex<HashMap<Arc<str>, Arc<QueueLanes>>>>,
}

/// The lanes of one queue (its direct consumers'; the gate lets at most one through at a time), in one
/// stripe's own allocation: the reference a publish takes is counted on its stripe's line.
#[repr(align(128))]
pub(super) struct QueueLanes(pub(super) Vec<Arc<Lane>>);

impl Lanes {
    /// The lanes of `queue`, if it has any.
    pub(super) fn of(&self, queue: &str) -> Option<Arc<QueueLanes>> {
        lock(self.stripes.get()).get(queue).cloned()
    }

    /// Adds a lane for `queue`.
    pub(super) fn add(&self, queue: &Arc<str>, lane: &Arc<Lane>) {
        for stripe in self.stripes.iter() {
            let mut stripe = lock(stripe);
            let mut lanes = stripe.get(&**queue).map(|lanes| lanes.0.clone()).unwrap_or_default();
            lanes.push(Arc::clone(lane));
            stripe.insert(Arc::clone(queue), Arc::new(QueueLanes(lanes)));
        }
    }

    /// Removes every lane: the broker is gone, and with the lanes go their references to the consumers' sinks,
    /// which ends the consumers.
    pub(super) fn clear(&self) {
        for stripe in self.stripes.iter() {
            lock(stripe).clear();
        }
    }

    /// Removes the lanes of `queue` that `keep` refuses; returns them.
    pub(super) fn remove(&self, queue: &str, keep: impl Fn(&Lane) -> bool) -> Vec<Arc<Lane>> {
        let mut removed = Vec::new();
        for (index, stripe) in self.stripes.iter().enumerate() {
            let mut stripe = lock(stripe);
            let Some(lanes) = stripe.get(queue) else { continue };
            let (kept, gone): (Vec<_>, Vec<_>) = lanes.0.iter().cloned().partition(|lane| keep(lane));
            if index == 0 {
                removed = gone;
            }
            if kept.is_empty() {
                stripe.remove(queue);
            } else {
                let name = Arc::clone(&lanes.0[0].book.queue);
                stripe.insert(name, Arc::new(QueueLanes(kept)));
            }
        }
        removed
    }
}
