//! Retry policies: how often a failed request is tried again, how long to wait in between, and which failures
//! are worth another attempt.
//!
//! A [`Server`](crate::Server) applies a policy to the requests it handles: a handler that fails with a
//! retryable code is run again, as a new message on the service's queue carrying `attempt + 1`, after an
//! exponential backoff with jitter: the broker holds the copy for the backoff where the transport has delayed
//! delivery (our broker and the embedded one), so the worker is free meanwhile; elsewhere the worker waits it
//! out before publishing the copy. After the last attempt the request goes to the dead-letter queue and the
//! caller gets [`Code::DeadLettered`] with the last failure in its message, before
//! its deadline: an attempt is not made when its backoff, plus as long as the failed attempt took from its
//! delivery, twice the request's way to the worker (from its id's time to its delivery, at most a second: the
//! copy's way there and the answer's way back) and 25 ms, would end past the deadline.
//!
//! ```
//! use std::time::Duration;
//!
//! use rpc_core::{Code, RetryPolicy};
//!
//! let policy = RetryPolicy::attempts(5)
//!     .backoff(Duration::from_millis(20), Duration::from_secs(2))
//!     .retry_on([Code::Internal, Code::Unavailable]);
//! assert_eq!(policy.max_attempts(), 5);
//! assert!(policy.retries(Code::Internal));
//! assert!(!policy.retries(Code::Application));
//! // The wait before the third attempt is between half and all of 20 ms * 2.
//! let wait = policy.backoff_before(3);
//! assert!(wait >= Duration::from_millis(20) && wait <= Duration::from_millis(40));
//! ```

use std::time::Duration;

use uuid::Uuid;

use crate::status::Code;

/// How a failed request is retried. The default, [`RetryPolicy::none`], runs it once.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    max_attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
    multiplier: f64,
    retry_on: Vec<Code>,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy::none()
    }
}

impl RetryPolicy {
    /// One attempt, no retry: a failure goes back to the caller as it is.
    pub fn none() -> RetryPolicy {
        RetryPolicy::attempts(1)
    }

    /// Up to `max_attempts` attempts in all (at least 1), with the defaults: backoff from 100 ms doubling up to
    /// 10 s, retrying [`Code::Internal`] (panics), [`Code::Unavailable`] and [`Code::ResourceExhausted`].
    pub fn attempts(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts: max_attempts.max(1),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            multiplier: 2.0,
            retry_on: vec![Code::Internal, Code::Unavailable, Code::ResourceExhausted],
        }
    }

    /// The wait before the second attempt, and the longest wait between two attempts.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> RetryPolicy {
        self.initial_backoff = initial;
        self.max_backoff = max.max(initial);
        self
    }

    /// How much longer each wait is than the one before (default 2; at least 1).
    pub fn multiplier(mut self, multiplier: f64) -> RetryPolicy {
        self.multiplier = if multiplier.is_finite() { multiplier.max(1.0) } else { 1.0 };
        self
    }

    /// The failures worth another attempt. [`Code::Application`] (the method's own error type) is one only if
    /// listed here; codes that another attempt cannot change ([`Code::UnknownMethod`],
    /// [`Code::InvalidArgument`], [`Code::DeadlineExceeded`]) are never retried.
    pub fn retry_on(mut self, codes: impl IntoIterator<Item = Code>) -> RetryPolicy {
        self.retry_on = codes.into_iter().collect();
        self
    }

    /// Attempts in all, the first included.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// Whether a failure with `code` is retried (attempts left permitting).
    pub fn retries(&self, code: Code) -> bool {
        !matches!(code, Code::Ok | Code::UnknownMethod | Code::InvalidArgument | Code::DeadlineExceeded)
            && self.retry_on.contains(&code)
    }

    /// Whether this policy never retries.
    pub fn is_none(&self) -> bool {
        self.max_attempts <= 1
    }

    /// The wait before attempt `attempt` (2 for the first retry): `initial * multiplier^(attempt - 2)`, capped,
    /// then jittered to between half and all of it, so that retries of many calls do not come in lockstep.
    pub fn backoff_before(&self, attempt: u32) -> Duration {
        let exponent = i32::try_from(attempt.saturating_sub(2)).unwrap_or(i32::MAX).min(64);
        let full = self.initial_backoff.as_secs_f64() * self.multiplier.powi(exponent);
        let full = Duration::from_secs_f64(full.min(self.max_backoff.as_secs_f64()));
        let jitter = (Uuid::new_v4().as_u128() % 1001) as u32;
        full / 2 + full / 2 * jitter / 1000
    }
}

/// The wait before reconnection attempt `attempt` (0 for the first): 50 ms doubled at each attempt, capped at
/// `max`, jittered as [`RetryPolicy::backoff_before`], so that clients that lost one broker do not reconnect in
/// lockstep. Transports use it between their reconnection attempts.
pub fn reconnect_backoff(attempt: u32, max: Duration) -> Duration {
    RetryPolicy::attempts(u32::MAX).backoff(Duration::from_millis(50), max).backoff_before(attempt.saturating_add(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnection_waits_grow_from_50_ms_to_their_cap_with_jitter() {
        let max = Duration::from_secs(5);
        for attempt in 0..40 {
            let wait = reconnect_backoff(attempt, max);
            let full = Duration::from_millis(50).saturating_mul(1 << attempt.min(20)).min(max);
            assert!(wait <= full && wait >= full / 2, "attempt {attempt}: {wait:?}");
        }
    }

    #[test]
    fn backoff_grows_to_its_cap_and_stays_within_the_jitter() {
        let policy = RetryPolicy::attempts(30).backoff(Duration::from_millis(10), Duration::from_millis(500));
        let mut previous_cap = Duration::ZERO;
        for attempt in 2..30u32 {
            let doubled = 10u64 << (attempt - 2).min(20);
            let cap = Duration::from_millis(doubled).min(Duration::from_millis(500));
            let wait = policy.backoff_before(attempt);
            assert!(wait <= cap && wait >= cap / 2, "attempt {attempt}: {wait:?} outside [{:?}, {cap:?}]", cap / 2);
            assert!(cap >= previous_cap);
            previous_cap = cap;
        }
        assert_eq!(previous_cap, Duration::from_millis(500));
    }

    #[test]
    fn codes_another_attempt_cannot_change_are_never_retried() {
        let policy = RetryPolicy::attempts(3).retry_on([Code::DeadlineExceeded, Code::Application, Code::Internal]);
        assert!(!policy.retries(Code::DeadlineExceeded));
        assert!(policy.retries(Code::Application));
        assert!(policy.retries(Code::Internal));
        assert!(RetryPolicy::none().is_none());
        assert_eq!(RetryPolicy::attempts(0).max_attempts(), 1);
        // A multiplier that is not a number counts as 1: the wait stays at the initial backoff.
        let wait = RetryPolicy::attempts(3).multiplier(f64::NAN).backoff_before(3);
        assert!(wait >= Duration::from_millis(50) && wait <= Duration::from_millis(100), "{wait:?}");
    }
}
