//! Client-side admission control, for peak shaving: a limit on calls in flight and a rate limit, so that a
//! burst waits in the caller (and, past the limits, in the broker's queue) instead of landing on the workers
//! at once. Set with [`ClientBuilder::max_in_flight`](crate::ClientBuilder::max_in_flight) and
//! [`ClientBuilder::rate_limit`](crate::ClientBuilder::rate_limit).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// The limits of one client; every clone of the client shares them.
#[derive(Debug, Default)]
pub(crate) struct Admission {
    in_flight: Option<Arc<Semaphore>>,
    rate: Option<RateLimit>,
}

/// Why a call was not admitted.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Its deadline passes before its turn.
    Deadline,
    /// The client was closed.
    Closed,
}

impl Admission {
    /// No limits.
    pub(crate) fn new() -> Admission {
        Admission::default()
    }

    /// At most `calls` calls waiting for their replies at once.
    pub(crate) fn max_in_flight(&mut self, calls: usize) {
        self.in_flight = Some(Arc::new(Semaphore::new(calls.max(1))));
    }

    /// At most `per_second` calls started per second on average, `burst` of them at once.
    pub(crate) fn rate_limit(&mut self, per_second: u32, burst: u32) {
        self.rate = Some(RateLimit::new(per_second, burst));
    }

    /// `true` when no limit is set: every call is admitted at once.
    pub(crate) fn is_open(&self) -> bool {
        self.in_flight.is_none() && self.rate.is_none()
    }

    /// Waits for the call's turn: a slot of the rate limit, then room in flight. A call whose deadline would
    /// pass first is refused without taking a slot. The permit is held until the call ends.
    pub(crate) async fn admit(&self, deadline: Option<Instant>) -> Result<Option<OwnedSemaphorePermit>, Refused> {
        if let Some(rate) = &self.rate {
            let start = rate.reserve(Instant::now(), deadline).ok_or(Refused::Deadline)?;
            tokio::time::sleep_until(start).await;
        }
        let Some(in_flight) = &self.in_flight else { return Ok(None) };
        let acquire = Arc::clone(in_flight).acquire_owned();
        let permit = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, acquire).await.map_err(|_| Refused::Deadline)?,
            None => acquire.await,
        };
        permit.map(Some).map_err(|_| Refused::Closed)
    }

    /// Wakes every call waiting for room in flight, to fail as closed.
    pub(crate) fn close(&self) {
        if let Some(in_flight) = &self.in_flight {
            in_flight.close();
        }
    }
}

/// A generic cell rate limiter: each call is given the time it may start, spaced by `interval`, with up to
/// `burst` calls allowed ahead of that schedule.
#[derive(Debug)]
struct RateLimit {
    interval: Duration,
    burst: u32,
    /// When the schedule is next free (the theoretical arrival time).
    next: Mutex<Option<Instant>>,
}

impl RateLimit {
    fn new(per_second: u32, burst: u32) -> RateLimit {
        let interval = Duration::from_secs(1) / per_second.max(1);
        RateLimit { interval, burst: burst.max(1), next: Mutex::new(None) }
    }

    /// Takes the next slot and returns when it starts, or `None` (taking nothing) when that is after
    /// `deadline`.
    fn reserve(&self, now: Instant, deadline: Option<Instant>) -> Option<Instant> {
        let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
        let free = next.map_or(now, |next| next.max(now));
        let ahead = self.interval * (self.burst - 1);
        let start = free.checked_sub(ahead).map_or(now, |start| start.max(now));
        if deadline.is_some_and(|deadline| start > deadline) {
            return None;
        }
        *next = Some(free + self.interval);
        Some(start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_rate_limit_spaces_calls_after_the_burst() {
        let mut admission = Admission::new();
        admission.rate_limit(100, 3);
        let started = Instant::now();
        let mut at = Vec::new();
        for _ in 0..8 {
            admission.admit(None).await.expect("admitted");
            at.push((Instant::now() - started).as_millis());
        }
        // Three at once, then one every 10 ms.
        assert_eq!(at, [0, 0, 0, 10, 20, 30, 40, 50]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_whose_turn_comes_after_its_deadline_is_refused_and_takes_no_slot() {
        let mut admission = Admission::new();
        admission.rate_limit(10, 1);
        let now = Instant::now();
        admission.admit(None).await.expect("the first goes at once");
        let soon = Some(now + Duration::from_millis(50));
        assert_eq!(admission.admit(soon).await.err(), Some(Refused::Deadline));
        // The refused call took nothing: the next one still gets the slot 100 ms after the first.
        admission.admit(None).await.expect("admitted");
        assert_eq!((Instant::now() - now).as_millis(), 100);
    }

    #[tokio::test(start_paused = true)]
    async fn calls_in_flight_wait_for_room_until_their_deadline() {
        let mut admission = Admission::new();
        admission.max_in_flight(2);
        let first = admission.admit(None).await.expect("room");
        let _second = admission.admit(None).await.expect("room");
        let deadline = Some(Instant::now() + Duration::from_millis(30));
        assert_eq!(admission.admit(deadline).await.err(), Some(Refused::Deadline));
        drop(first);
        assert!(admission.admit(deadline).await.expect("room again").is_some());
        admission.close();
        assert_eq!(admission.admit(None).await.err(), Some(Refused::Closed));
    }
}
