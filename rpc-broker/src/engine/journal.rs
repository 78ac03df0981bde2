//! The journal of durable queues (what their log must record, in order), and the books that every message
//! entering or leaving a queue updates.

use std::sync::Arc;
use std::time::Instant;

use super::queue::{Queue, Stored};
use super::{Key, MessageId, QueueConfig};

/// What a log keeps of a message besides its bytes and its sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// As [`Props::priority`](super::Props::priority).
    pub priority: u8,
    /// When its TTL ends.
    pub expires_at: Option<Instant>,
    /// When its delay ends.
    pub due: Option<Instant>,
    /// As [`Props::key`](super::Props::key).
    pub key: Option<Key>,
    /// As [`Props::id`](super::Props::id).
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

/// Bytes held and the journal: what every message that leaves the engine updates.
pub(super) struct Books<M> {
    /// Bytes of all messages held (ready, delayed, unacked and dead-lettered).
    pub(super) bytes: usize,
    pub(super) journal: Vec<Journal<M>>,
}

impl<M> Books<M> {
    /// `stored` left queue `queue` for good.
    pub(super) fn gone(&mut self, queue: &Arc<str>, durable: bool, stored: &Stored<M>) {
        self.bytes -= stored.size;
        if durable {
            self.journal.push(Journal::Removed { queue: Arc::clone(queue), seq: stored.seq });
        }
    }
}

impl<M: Clone> Books<M> {
    /// `stored` entered queue `queue` (already counted in `bytes`).
    pub(super) fn entered(
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::engine::tests::{drain, durable_queue, messages};
    use crate::engine::{Engine, Props, Settle};

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
