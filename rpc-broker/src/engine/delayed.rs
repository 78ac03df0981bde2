//! Delayed messages: one heap across queues, earliest due first, from which they join their queues.

use std::cmp::{Ordering, Reverse};
use std::sync::Arc;
use std::time::Instant;

use super::Engine;
use super::queue::{Stored, leave_delayed, mark_dirty};

/// A message waiting out its delay, ordered by when it is due (then by publish order).
pub(super) struct Delayed<M> {
    pub(super) due: Instant,
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

impl<M: Clone> Engine<M> {
    /// Puts `stored` of `queue` (which exists) in the delay heap until `due`.
    pub(super) fn hold(&mut self, queue: &str, stored: Stored<M>, due: Instant) {
        let Some(target) = self.queues.get_mut(queue) else { return };
        target.delayed += 1;
        if let Some(key) = stored.key {
            target.keys.entry(key).or_default().delayed += 1;
            // The queue knows a call now: its consumer's gate closes at the next dispatch (see `refresh_gates`).
            super::queue::mark_dirty(target, &mut self.dirty);
        }
        let order = self.next_order;
        self.next_order += 1;
        let (queue, queue_id) = (Arc::clone(&target.name), target.id);
        self.delayed.push(Reverse(Delayed { due, order, queue, queue_id, stored }));
    }

    /// Moves the delayed messages that are due to the back of their queues.
    pub(super) fn promote(&mut self, now: Instant) {
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
    pub(super) fn sweep_delayed(&mut self) {
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
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::engine::tests::{drain, engine_with, messages};
    use crate::engine::{ConsumerId, EngineError, Props, QueueConfig};

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
}
