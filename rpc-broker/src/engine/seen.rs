//! The message ids a durable queue took lately, by which it takes a publisher's retry once.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{HashMap, MessageId};

/// How long a durable queue remembers the ids of the messages it took.
pub const DEDUP_WINDOW: Duration = Duration::from_secs(120);

/// The most message ids a durable queue remembers; past it the oldest are forgotten before the window ends.
pub const DEDUP_CAPACITY: usize = 1 << 20;

/// The message ids a durable queue took lately, oldest first.
#[derive(Default)]
pub(super) struct Seen {
    ids: HashMap<MessageId, Instant>,
    order: VecDeque<(MessageId, Instant)>,
}

impl Seen {
    /// Records `id` at `now`; `false` if it was taken within the window already.
    pub(super) fn take(&mut self, id: MessageId, now: Instant) -> bool {
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
}
