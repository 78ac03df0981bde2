//! How many requests a server handles at once: its free slots, each taken and given back with one atomic
//! operation while nobody waits for one.
//!
//! A tokio `Semaphore` takes the lock of its waiters' list at every release, and an `OwnedSemaphorePermit`
//! counts a reference to the semaphore: three more writes per request to lines that every thread handling
//! requests writes. A slot here is held by the handling's own reference to the server ([`Slot`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

use super::Shared;

/// A server's free slots, and whoever waits for one.
pub(super) struct Permits {
    free: AtomicUsize,
    /// How many wait in [`Permits::take`]: a slot given back wakes one of them only when there are any.
    waiting: AtomicUsize,
    freed: Notify,
}

impl Permits {
    pub(super) fn new(slots: usize) -> Permits {
        Permits { free: AtomicUsize::new(slots), waiting: AtomicUsize::new(0), freed: Notify::new() }
    }

    /// The slots free now.
    pub(super) fn free(&self) -> usize {
        self.free.load(Ordering::Relaxed)
    }

    /// Takes a free slot if there is one, at once.
    pub(super) fn try_take(&self) -> bool {
        let mut free = self.free.load(Ordering::Relaxed);
        while free > 0 {
            // Sequentially consistent, as the waiter's retry in `take` must see a slot given back before it
            // counted itself, or be counted before the slot's giver looks.
            match self.free.compare_exchange_weak(free, free - 1, Ordering::SeqCst, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(now) => free = now,
            }
        }
        false
    }

    /// Waits for a free slot and takes it. Dropped while it waits, it takes none, and a wake-up it was given
    /// goes on to the next waiter.
    pub(super) async fn take(&self) {
        loop {
            if self.try_take() {
                return;
            }
            let freed = self.freed.notified();
            let mut freed = std::pin::pin!(freed);
            freed.as_mut().enable();
            self.waiting.fetch_add(1, Ordering::SeqCst);
            let _counted = Counted(&self.waiting);
            // A slot given back before this waiter was counted is seen here; one given back after, by a giver
            // who saw the count, wakes it.
            if self.try_take() {
                return;
            }
            freed.await;
        }
    }

    /// Gives a slot back, and wakes a waiter if there is one.
    fn give_back(&self) {
        self.free.fetch_add(1, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) != 0 {
            self.freed.notify_one();
        }
    }
}

/// One waiter counted in [`Permits::waiting`] while it lives.
struct Counted<'a>(&'a AtomicUsize);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A slot taken from the server's [`Permits`], held by a handling with its reference to the server: it gives
/// the slot back when it is dropped.
pub(super) struct Slot {
    pub(super) shared: Arc<Shared>,
}

impl Slot {
    /// A slot of `shared`'s, taken already.
    pub(super) fn taken(shared: Arc<Shared>) -> Slot {
        Slot { shared }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shared.identity.permits.give_back();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::FutureExt;

    use super::*;

    #[test]
    fn slots_are_taken_until_none_is_free_and_given_back() {
        let permits = Permits::new(2);
        assert!(permits.try_take() && permits.try_take());
        assert!(!permits.try_take());
        assert_eq!(permits.free(), 0);
        // Nobody waits: a waiter comes later and takes the slot at once.
        permits.give_back();
        assert_eq!(permits.take().now_or_never(), Some(()));
        assert!(!permits.try_take());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiter_gets_the_slot_given_back_and_a_dropped_one_takes_none() {
        let permits = Arc::new(Permits::new(1));
        assert!(permits.try_take());
        // Given up while it waits: it holds no slot and leaves no count behind.
        assert!(tokio::time::timeout(Duration::from_millis(20), permits.take()).await.is_err());
        assert_eq!(permits.waiting.load(Ordering::SeqCst), 0);
        let waiter = tokio::spawn({
            let permits = Arc::clone(&permits);
            async move { permits.take().await }
        });
        // Let the waiter count itself, then give the slot back: it wakes with it.
        while permits.waiting.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        permits.give_back();
        tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woken").expect("took it");
        assert_eq!(permits.free(), 0);
    }

    #[test]
    fn threads_taking_and_giving_back_at_once_never_hold_more_than_the_slots() {
        let permits = Arc::new(Permits::new(3));
        let held = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().expect("a runtime");
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (permits, held, most) = (Arc::clone(&permits), Arc::clone(&held), Arc::clone(&most));
                let runtime = runtime.handle().clone();
                std::thread::spawn(move || {
                    for n in 0..20_000 {
                        // Half of the takes wait for a slot, half try and go on.
                        if n % 2 == 0 {
                            runtime.block_on(permits.take());
                        } else if !permits.try_take() {
                            continue;
                        }
                        let now = held.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        held.fetch_sub(1, Ordering::SeqCst);
                        permits.give_back();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("the thread ran");
        }
        assert!(most.load(Ordering::SeqCst) <= 3, "{} held at once", most.load(Ordering::SeqCst));
        assert_eq!(permits.free(), 3);
        assert_eq!(permits.waiting.load(Ordering::SeqCst), 0);
    }
}
