//! A gate: a consumer's way around the engine, for a driver that hands it messages without the engine's lock.
//!
//! While nothing waits in a queue and a consumer is its only one, a message published there would go straight
//! to that consumer; a driver whose threads share the engine behind a lock can then hand it over itself,
//! without taking the lock, if it keeps the engine's promises to the delivery on its own (see the embedded
//! transport's lanes). The gate is what the engine and such a driver agree on:
//!
//! - the engine opens it when the consumer could take a message the moment it is published (the queue's only
//!   consumer, active, holding nothing from the engine, nothing waiting or cancelled in its queue, which is
//!   not durable), and closes it the moment that stops (a message waits, another consumer joins, the consumer
//!   is paused, held back or removed);
//! - while it is open, the engine delivers nothing to the consumer: a message published through the engine
//!   waits, which closes the gate;
//! - the driver counts the deliveries it made around the engine in the gate, against the consumer's prefetch,
//!   and the engine counts them too, so that the prefetch holds over both ways.
//!
//! The open flag and the count are one atomic word: a driver claims a delivery only while the gate is open,
//! and once the engine closed it no claim gets through, so that the engine reads a count that can only fall.

use std::sync::atomic::{AtomicU64, Ordering};

/// The open flag, above the count.
const OPEN: u64 = 1 << 63;

/// A consumer's way around the engine; see the [module](self).
#[derive(Debug, Default)]
pub struct Gate {
    /// [`OPEN`] and the deliveries made around the engine that are not settled yet.
    state: AtomicU64,
}

impl Gate {
    /// A closed gate, with nothing counted.
    pub fn new() -> Gate {
        Gate::default()
    }

    /// Whether the engine lets deliveries around it now.
    pub fn is_open(&self) -> bool {
        self.state.load(Ordering::Acquire) & OPEN != 0
    }

    /// Counts a delivery about to be made around the engine, if the gate is open and fewer than `prefetch`
    /// (0: no limit) are counted; false otherwise, and the message goes through the engine.
    pub fn try_claim(&self, prefetch: u32) -> bool {
        let mut state = self.state.load(Ordering::Acquire);
        loop {
            if state & OPEN == 0 || (prefetch != 0 && state & !OPEN >= u64::from(prefetch)) {
                return false;
            }
            match self.state.compare_exchange_weak(state, state + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(now) => state = now,
            }
        }
    }

    /// A delivery made around the engine was settled: one fewer counted. Returns whether the gate was open;
    /// if it was closed, the engine may have messages waiting for the room this made, and the driver asks it
    /// to dispatch.
    pub fn release(&self) -> bool {
        self.state.fetch_sub(1, Ordering::AcqRel) & OPEN != 0
    }

    /// The deliveries made around the engine that are not settled yet.
    pub fn count(&self) -> u64 {
        self.state.load(Ordering::Acquire) & !OPEN
    }

    /// Opens the gate.
    pub(super) fn open(&self) {
        if !self.is_open() {
            self.state.fetch_or(OPEN, Ordering::AcqRel);
        }
    }

    /// Closes the gate: no claim gets through after this returns.
    pub(super) fn close(&self) {
        if self.is_open() {
            self.state.fetch_and(!OPEN, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_pass_an_open_gate_up_to_the_prefetch_and_none_pass_a_closed_one() {
        let gate = Gate::new();
        assert!(!gate.try_claim(2), "a new gate is closed");
        gate.open();
        assert!(gate.try_claim(2));
        assert!(gate.try_claim(2));
        assert!(!gate.try_claim(2), "the prefetch is full");
        assert_eq!(gate.count(), 2);
        assert!(gate.release(), "released while open");
        gate.close();
        assert!(!gate.try_claim(2), "closed, though there is room");
        assert_eq!(gate.count(), 1, "closing keeps the count");
        assert!(!gate.release(), "released while closed: the engine is asked to dispatch");
        assert_eq!(gate.count(), 0);
        gate.open();
        for _ in 0..1_000 {
            assert!(gate.try_claim(0), "0 is no limit");
        }
        assert_eq!(gate.count(), 1_000);
    }

    #[test]
    fn threads_claiming_at_once_never_pass_the_prefetch() {
        let gate = std::sync::Arc::new(Gate::new());
        gate.open();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let gate = std::sync::Arc::clone(&gate);
                std::thread::spawn(move || (0..10_000).filter(|_| gate.try_claim(64)).count())
            })
            .collect();
        let claimed: usize = threads.into_iter().map(|thread| thread.join().expect("joins")).sum();
        assert_eq!(claimed, 64);
        assert_eq!(gate.count(), 64);
    }
}
