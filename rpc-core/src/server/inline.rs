//! The inline scheduler: a request's first poll runs in the server's own task, and slow first polls send
//! the next requests straight to tasks of their own for a while.

use std::cell::Cell;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use futures::FutureExt;

use super::outcome::panic_message;
use crate::transport::BoxFuture;

thread_local! {
    /// The instant the inline poll under way on this thread counts from, if one is: a handling polled there
    /// takes it as the time it starts at, for its deadline check, rather than reading the clock again.
    static POLL_STARTED: Cell<Option<std::time::Instant>> = const { Cell::new(None) };
    /// The last reading of the clock that the handling polled inline on this thread made (after its handler),
    /// which ends the poll's time if the handling finished.
    static POLL_READ: Cell<Option<std::time::Instant>> = const { Cell::new(None) };
}

/// The instant the inline poll under way on this thread started at, if a request's handling is polled inline
/// here: a moment ago, the clock's reading at the start of its first poll (or the instant an in-process broker
/// made its delivery).
pub(super) fn poll_started() -> Option<std::time::Instant> {
    POLL_STARTED.with(Cell::get)
}

/// The latest reading of the clock that the inline poll under way on this thread made or was given: the
/// handling's after its handler, or else the poll's start. `None` outside an inline poll.
pub(crate) fn latest_reading() -> Option<std::time::Instant> {
    POLL_READ.with(Cell::get).or_else(poll_started)
}

/// Notes `now`, a reading of the clock a handling made after its handler: if the handling is polled inline
/// and finishes in that poll, the poll's time ends there (the reply's publish after it is not counted, a few
/// microseconds against [`Inline::SLOW`]). Outside an inline poll (a handling running in a task of its own) it
/// notes nothing: a reading left on the thread would be taken as recent by whatever runs there later.
pub(super) fn note_reading(now: std::time::Instant) {
    if poll_started().is_some() {
        POLL_READ.with(|read| read.set(Some(now)));
    }
}

/// Runs requests in the server's own task while their handlers finish at once.
///
/// A request is first polled here, in the loop that takes deliveries: a handler that completes without waiting
/// (most do: decode, compute, publish the reply, ack) costs no task and no wake-up, and the replies of a batch
/// of deliveries leave in one write. One that waits (on I/O, a timer, a lock) is moved to a task of its own
/// and runs in parallel with the next. A handler that computes for long in its first poll would hold the
/// loop: after one first poll longer than [`Inline::LONG`], or [`Inline::STRIKES`] longer than
/// [`Inline::SLOW`] in a row, every request goes straight to a task for [`Inline::BACKOFF`]. Slow polls between
/// fast ones do not count: the thread was preempted (on a busy machine, at every end of its time slice), or a
/// store grew its table, and a second of spawned tasks would cost more than the slow poll did.
///
/// Shared by the server's loop and, on an in-process transport, by the threads that hand it requests as they
/// publish them: its state is atomics, written only when a poll is slow or the backoff ends.
pub(super) struct Inline {
    /// What `spawn_until` counts from.
    epoch: std::time::Instant,
    /// Until when requests go straight to tasks: microseconds after `epoch`, plus one; 0 when they do not.
    spawn_until: AtomicU64,
    /// Slow first polls in a row.
    strikes: AtomicU32,
}

impl Default for Inline {
    fn default() -> Inline {
        Inline { epoch: std::time::Instant::now(), spawn_until: AtomicU64::new(0), strikes: AtomicU32::new(0) }
    }
}

impl Inline {
    /// A first poll longer than this is slow.
    pub(super) const SLOW: Duration = Duration::from_micros(500);
    /// How many slow first polls in a row take the server off inline polling.
    pub(super) const STRIKES: u32 = 3;
    /// A first poll longer than this takes the server off inline polling at once: longer than a preemption
    /// lasts even on a busy machine (a few time slices), it is a handler that computes.
    pub(super) const LONG: Duration = Duration::from_millis(50);
    /// How long the server stays off inline polling after that.
    pub(super) const BACKOFF: Duration = Duration::from_secs(1);

    /// Whether a request may be polled here now. The clock is read only while inline polling is off.
    pub(super) fn allows(&self) -> bool {
        self.spawn_until.load(Ordering::Relaxed) == 0 || self.allows_at(std::time::Instant::now())
    }

    pub(super) fn allows_at(&self, now: std::time::Instant) -> bool {
        let until = self.spawn_until.load(Ordering::Relaxed);
        if until == 0 {
            return true;
        }
        if self.micros(now) < until {
            return false;
        }
        // Over: back on (unless another thread started a new backoff meanwhile).
        let _ = self.spawn_until.compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed);
        true
    }

    /// Polls `work` once; `true` when it finished (or panicked, which is logged and counts as finished).
    pub(super) fn run(&self, work: &mut BoxFuture<'static, ()>) -> bool {
        self.run_since(work, std::time::Instant::now())
    }

    /// [`Inline::run`], the poll counted from `started`: the instant a delivery handed over just now was made
    /// serves, and saves a reading of the clock.
    pub(super) fn run_since(&self, work: &mut BoxFuture<'static, ()>, started: std::time::Instant) -> bool {
        // A future polled here with a no-op waker and not ready is polled again by the task it moves to,
        // which registers that task's waker. Polled outside tokio's budget of the task it runs in (the
        // caller's, on the embedded broker), which that task spent on its own work: a handling otherwise found
        // it spent one time in 128 (the budget's size), said "not ready" and moved to a task of its own. The
        // calling task yields where its own work meets the budget instead.
        //
        // The poll's start and the handling's last reading are shared through the thread: saved and restored
        // around the poll, which may hold another (a handler that calls a service in the same process).
        let outer = (POLL_STARTED.with(|poll| poll.replace(Some(started))), POLL_READ.with(|read| read.take()));
        let outcome =
            std::panic::catch_unwind(AssertUnwindSafe(|| tokio::task::unconstrained(work.as_mut()).now_or_never()));
        let read = POLL_READ.with(|read| read.replace(outer.1));
        POLL_STARTED.with(|poll| poll.set(outer.0));
        let ended = match (&outcome, read) {
            (Ok(Some(())), Some(read)) if read >= started => read,
            _ => std::time::Instant::now(),
        };
        // Nearly every poll is fast, which a comparison of instants tells without working out how long it took.
        match started.checked_add(Self::SLOW) {
            Some(slow) if ended <= slow => self.polled_fast(),
            _ => self.polled(ended.saturating_duration_since(started), ended),
        }
        match outcome {
            Ok(done) => done.is_some(),
            Err(panic) => {
                tracing::error!(message = %panic_message(panic.as_ref()), "a request's handling panicked");
                true
            }
        }
    }

    /// Counts a first poll that took `took` and ended at `now`.
    pub(super) fn polled(&self, took: Duration, now: std::time::Instant) {
        if took <= Self::SLOW {
            self.polled_fast();
            return;
        }
        let strikes = self.strikes.fetch_add(1, Ordering::Relaxed) + 1;
        if strikes >= Self::STRIKES || took > Self::LONG {
            self.strikes.store(0, Ordering::Relaxed);
            let until = now.checked_add(Self::BACKOFF).map_or(u64::MAX, |until| self.micros(until).max(1));
            self.spawn_until.store(until, Ordering::Relaxed);
        }
    }

    /// Counts a first poll that was not slow: the slow ones in a row start again.
    fn polled_fast(&self) {
        // Written only when there is something to reset: the threads that share it keep reading it.
        if self.strikes.load(Ordering::Relaxed) != 0 {
            self.strikes.store(0, Ordering::Relaxed);
        }
    }

    /// Microseconds from the epoch to `at`, plus one.
    fn micros(&self, at: std::time::Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX - 1) + 1
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_first_poll_counts_from_the_instant_it_is_given() {
        let inline = Inline::default();
        let mut work: BoxFuture<'static, ()> = Box::pin(async {});
        assert!(inline.run_since(&mut work, std::time::Instant::now()));
        assert!(inline.allows());
        // Begun longer ago than a long poll: inline polling stops at once.
        let Some(started) = std::time::Instant::now().checked_sub(Inline::LONG * 2) else { return };
        let mut work: BoxFuture<'static, ()> = Box::pin(async {});
        assert!(inline.run_since(&mut work, started));
        assert!(!inline.allows(), "a poll counted from long ago left inline polling on");
    }

    #[test]
    fn a_poll_that_finishes_its_handling_ends_at_the_handlings_last_reading() {
        let inline = Arc::new(Inline::default());
        let Some(started) = std::time::Instant::now().checked_sub(Inline::LONG * 2) else { return };
        // The handling read the clock a moment after the poll started, and finished: the poll was fast.
        let mut work: BoxFuture<'static, ()> = Box::pin(async move {
            assert_eq!(poll_started(), Some(started), "the handling sees the poll's start");
            assert_eq!(latest_reading(), Some(started), "the latest reading, before the handling made one");
            note_reading(started + Duration::from_micros(5));
            assert_eq!(latest_reading(), Some(started + Duration::from_micros(5)), "the handling's own reading");
        });
        assert!(inline.run_since(&mut work, started));
        assert!(inline.allows(), "the poll was timed to the present, not to the handling's reading");
        assert_eq!((poll_started(), POLL_READ.with(Cell::get)), (None, None), "left behind after the poll");
        // Outside an inline poll, a recent reading is a fresh one.
        let before = std::time::Instant::now();
        assert_eq!(latest_reading(), None);
        assert!(crate::transport::recent_instant() >= before, "a reading from before, outside any poll");
        // A handling that runs in a task of its own reads the clock outside any inline poll: nothing is left on
        // the thread for later readers to take as recent (a NATS sending time from it would make every later
        // request look long queued, and expire).
        note_reading(started);
        assert_eq!(latest_reading(), None, "a reading noted outside an inline poll is kept");
        assert!(crate::transport::recent_instant() >= before, "a reading from long ago taken as recent");

        // A poll inside another (a handler calling a service in the same process) leaves the outer one's start
        // and reading as they were.
        let nested = Arc::clone(&inline);
        let outer_started = std::time::Instant::now();
        let mut work: BoxFuture<'static, ()> = Box::pin(async move {
            note_reading(outer_started);
            let inner_started = std::time::Instant::now();
            let mut inner: BoxFuture<'static, ()> = Box::pin(async move {
                assert_eq!(poll_started(), Some(inner_started));
                note_reading(inner_started);
            });
            assert!(nested.run_since(&mut inner, inner_started));
            assert_eq!(poll_started(), Some(outer_started));
            assert_eq!(POLL_READ.with(Cell::get), Some(outer_started));
        });
        assert!(inline.run_since(&mut work, outer_started));
        assert_eq!(poll_started(), None);

        // Without a reading from the handling, the poll ends when it returns: long after a start long ago.
        let mut work: BoxFuture<'static, ()> = Box::pin(async {});
        assert!(inline.run_since(&mut work, started));
        assert!(!inline.allows(), "a poll counted from long ago left inline polling on");
    }

    #[test]
    fn inline_polling_stops_only_after_several_slow_polls_in_a_row() {
        let start = std::time::Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let (slow, fast) = (Inline::SLOW * 10, Inline::SLOW / 10);
        let inline = Inline::default();
        // Slow polls between fast ones, however close together, never add up.
        for step in 0..20 {
            inline.polled(if step % 2 == 0 { slow } else { fast }, at(step));
            assert!(inline.allows_at(at(step)), "a lone slow poll stopped inline polling");
        }
        let inline = Inline::default();
        for strike in 1..Inline::STRIKES {
            inline.polled(slow, at(u64::from(strike)));
            assert!(inline.allows_at(at(u64::from(strike))));
        }
        inline.polled(slow, at(10));
        assert!(!inline.allows_at(at(11)), "slow polls in a row left inline polling on");
        assert!(!inline.allows_at(at(900)));
        assert!(inline.allows_at(at(1011)), "inline polling did not resume after the backoff");
        // The count starts again after a backoff.
        inline.polled(slow, at(1012));
        assert!(inline.allows_at(at(1013)));
        // A handler that computes for long stops it at once, between fast ones too.
        inline.polled(fast, at(1014));
        inline.polled(Inline::LONG * 2, at(1040));
        assert!(!inline.allows_at(at(1041)), "a long first poll left inline polling on");
    }
}
