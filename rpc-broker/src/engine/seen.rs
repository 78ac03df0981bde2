//! The message ids a durable queue took lately, by which it takes a publisher's retry once.

use std::time::{Duration, Instant};

use super::MessageId;

type HashSet<T> = hashbrown::HashSet<T>;

/// How long a durable queue remembers the ids of the messages it took, at least (an id is forgotten between
/// one and two windows after it was taken).
pub const DEDUP_WINDOW: Duration = Duration::from_secs(120);

/// The most message ids one generation of a durable queue's seen ids holds (the queue holds up to twice as
/// many): past it the older ones are forgotten before the window ends, but never the last `DEDUP_CAPACITY`.
pub const DEDUP_CAPACITY: usize = 1 << 20;

/// The message ids a durable queue took lately, in two generations: the one taking ids, and the one before.
///
/// A generation ends once it is a window old or holds [`DEDUP_CAPACITY`] ids; then the one before is dropped
/// whole (every id in it is older than a window, or `DEDUP_CAPACITY` newer ones were taken since). No id is
/// forgotten one by one: taking an id costs a look in each generation and an insert, with no list in time
/// order beside them, and the tables see no removals.
#[derive(Default)]
pub(super) struct Seen {
    current: Generation,
    previous: Generation,
}

#[derive(Default)]
struct Generation {
    ids: HashSet<MessageId>,
    /// When it took its first id and its last.
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Generation {
    /// Whether it holds ids, all taken at least a window before `now`.
    fn expired(&self, now: Instant) -> bool {
        self.last.is_some_and(|last| now.saturating_duration_since(last) >= DEDUP_WINDOW)
    }
}

impl Seen {
    /// Records `id` at `now`; `false` if it was taken within the window already.
    pub(super) fn take(&mut self, id: MessageId, now: Instant) -> bool {
        let full = self.current.ids.len() >= DEDUP_CAPACITY;
        if full || self.current.first.is_some_and(|first| now.saturating_duration_since(first) >= DEDUP_WINDOW) {
            let mut dropped = std::mem::replace(&mut self.previous, std::mem::take(&mut self.current));
            if full {
                // Under that load the next generation fills as fast: it takes the dropped one's room rather than
                // growing into its own.
                dropped.ids.clear();
                self.current.ids = dropped.ids;
            }
        }
        if self.previous.expired(now) {
            self.previous = Generation::default();
        }
        if self.previous.ids.contains(&id) || !self.current.ids.insert(id) {
            return false;
        }
        self.current.first.get_or_insert(now);
        self.current.last = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::tests::durable_queue;
    use crate::engine::{Engine, Props};

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
    fn an_id_is_remembered_for_a_window_at_least_and_two_at_most() {
        let start = Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        let window = DEDUP_WINDOW.as_secs();
        let mut seen = Seen::default();
        assert!(seen.take([1; 16], at(0)));
        assert!(seen.take([2; 16], at(window - 1)));
        // The first generation ends a window after its first id; both ids are still known in the next.
        assert!(seen.take([3; 16], at(window)));
        assert!(!seen.take([1; 16], at(window + 1)), "forgotten before its window ended");
        assert!(!seen.take([2; 16], at(2 * window - 2)), "forgotten before its window ended");
        // A window after the last id of the first generation, the first generation is dropped whole.
        assert!(seen.take([1; 16], at(2 * window - 1)));
        assert!(seen.take([2; 16], at(2 * window - 1)));
        assert!(!seen.take([3; 16], at(2 * window - 1)), "the second generation is still held");
    }

    #[test]
    fn a_full_generation_keeps_the_last_capacity_ids() {
        let now = Instant::now();
        let mut seen = Seen::default();
        let id = |n: usize| {
            let mut id = [0; 16];
            id[..8].copy_from_slice(&(n as u64).to_le_bytes());
            id
        };
        for n in 0..DEDUP_CAPACITY + 10 {
            assert!(seen.take(id(n), now), "{n} taken twice");
        }
        // The first generation (the first DEDUP_CAPACITY ids) is still held beside the new one.
        assert!(!seen.take(id(0), now));
        assert!(!seen.take(id(DEDUP_CAPACITY + 9), now));
        for n in DEDUP_CAPACITY + 10..2 * DEDUP_CAPACITY + 10 {
            assert!(seen.take(id(n), now), "{n} taken twice");
        }
        // The second generation is full and became the previous one: the first is gone, the last
        // DEDUP_CAPACITY ids are known.
        assert!(seen.take(id(5), now), "the oldest generation is dropped");
        assert!(!seen.take(id(DEDUP_CAPACITY + 20), now));
        assert!(!seen.take(id(2 * DEDUP_CAPACITY + 9), now));
    }
}
