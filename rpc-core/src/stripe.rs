//! Per-thread stripes: what every call would otherwise write in one place, kept once per stripe of threads.
//!
//! A counter or a reference count that every call changes is one cache line that the threads of a runtime take
//! from one another, call after call: an atomic write to a line another core wrote last waits for that line.
//! Striped, each thread writes the copy of its own stripe, and a reader sums the stripes.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// How many stripes there are: a power of two. Threads past it share stripes, round robin.
pub const STRIPES: usize = 16;

thread_local! {
    /// This thread's stripe, once it asked for one.
    static STRIPE: Cell<Option<u8>> = const { Cell::new(None) };
}

/// The stripe of the current thread, in `0..STRIPES`: threads take stripes in turn as they first ask, so that
/// the threads of a runtime (fewer than [`STRIPES`]) each have one of their own.
pub fn thread_stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    STRIPE.with(|stripe| match stripe.get() {
        Some(index) => usize::from(index),
        None => {
            let index = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
            // Under STRIPES, which fits a byte.
            let short = u8::try_from(index).unwrap_or(0);
            stripe.set(Some(short));
            usize::from(short)
        }
    })
}

/// A value kept once per stripe, each copy on cache lines of its own: a thread uses its stripe's
/// ([`Striped::get`]); a reader goes over all of them ([`Striped::iter`]).
pub struct Striped<T> {
    cells: Box<[Padded<T>]>,
}

/// A value alone on its cache lines (two, as the adjacent-line prefetch of x86 fetches lines in pairs).
#[repr(align(128))]
struct Padded<T>(T);

impl<T> Striped<T> {
    /// A copy per stripe, each made by `make`.
    pub fn new(mut make: impl FnMut() -> T) -> Striped<T> {
        Striped { cells: (0..STRIPES).map(|_| Padded(make())).collect() }
    }

    /// The current thread's copy.
    pub fn get(&self) -> &T {
        &self.cells[thread_stripe() % STRIPES].0
    }

    /// The copy of stripe `index` (taken modulo [`STRIPES`]): the stripe a thread wrote in, found again by
    /// another thread that knows it.
    pub fn at(&self, index: usize) -> &T {
        &self.cells[index % STRIPES].0
    }

    /// Every stripe's copy.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.cells.iter().map(|cell| &cell.0)
    }
}

impl<T: Default> Default for Striped<T> {
    fn default() -> Striped<T> {
        Striped::new(T::default)
    }
}

impl<T> std::fmt::Debug for Striped<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Striped").field("stripes", &self.cells.len()).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;

    #[test]
    fn a_thread_keeps_its_stripe_and_threads_take_stripes_in_turn() {
        let mine = thread_stripe();
        assert_eq!(thread_stripe(), mine);
        let others: Vec<usize> =
            (0..STRIPES).map(|_| std::thread::spawn(thread_stripe).join().expect("the thread ran")).collect();
        assert!(others.iter().all(|&stripe| stripe < STRIPES));
        // Sixteen threads in a row, each asking first, take every stripe once (other tests' threads may take
        // stripes in between, but never twice in a row the same one).
        assert!(others.windows(2).all(|pair| pair[0] != pair[1]), "{others:?}");
    }

    #[test]
    fn every_thread_writes_its_own_copy_and_the_sum_is_whole() {
        let counts: std::sync::Arc<Striped<AtomicU64>> = std::sync::Arc::default();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let counts = std::sync::Arc::clone(&counts);
                std::thread::spawn(move || {
                    for _ in 0..1_000 {
                        counts.get().fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("the thread ran");
        }
        assert_eq!(counts.iter().map(|count| count.load(Ordering::Relaxed)).sum::<u64>(), 4_000);
        let cells = counts.cells.as_ptr();
        assert_eq!(std::mem::size_of::<Padded<AtomicU64>>(), 128);
        assert_eq!(cells.align_offset(128), 0, "copies share cache lines");
    }
}
