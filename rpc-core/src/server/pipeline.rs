//! What a request goes through on the worker: the deadline check, the dedup claim, the layers and the handler
//! (within its deadline, its context and a panic guard), then one of the outcomes.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use tokio::time::Instant;
use tracing::Instrument;

use crate::context;
use crate::dedup::{Begin, DedupStore, StoredReply};
use crate::envelope::{Envelope, Kind};
use crate::metrics;
use crate::retry::RetryPolicy;
use crate::status::{Code, Status};
use crate::trace;
use crate::transport::{AckHandle, BoxFuture, Delivery};

use super::outcome::{answer, dead_letter, panic_message, retry, settle};
use super::permits::Slot;
use super::{Shared, Source};

/// The handling of one delivery, holding `slot` (a slot of the server's concurrency, and the server) until it
/// is done.
///
/// Not an `async fn`: the delivery is taken apart before the future is made, so that the future (one heap
/// allocation per request) holds the request once, and stays under a kilobyte, which the allocator serves
/// fastest. The rare paths of [`handle_request`] are boxed to keep it there.
pub(super) fn handle(slot: Slot, delivery: Delivery, source: Source) -> BoxFuture<'static, ()> {
    let shared = &*slot.shared;
    let Delivery { envelope, delivery_count, received_at, handle, .. } = delivery;
    if !matches!(envelope.kind, Kind::Request | Kind::Oneway) {
        let kind = envelope.kind;
        return Box::pin(async move {
            slot.shared.stats.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(?kind, "dead-lettering a message that is not a request");
            settle(handle.dead_letter().await);
            drop(slot);
        });
    }
    let attempt = envelope.attempt.max(1).saturating_add(delivery_count.saturating_sub(1));
    let destination = if source == Source::Queue { &shared.queue } else { &shared.topic };
    let span = trace::process_span(shared.transport.as_ref(), &envelope, destination, attempt);
    let deadline =
        envelope.deadline_ms.and_then(|ms| Instant::from_std(received_at).checked_add(Duration::from_millis(ms)));
    let request = Request { envelope, attempt, deadline, received_at: Instant::from_std(received_at), source };
    crate::transport::boxed(|| handle_request(slot, request, handle).instrument(span))
}

/// A request being handled.
pub(super) struct Request {
    /// Shared with the handler's context.
    pub(super) envelope: Arc<Envelope>,
    /// Which attempt this is, redeliveries included.
    pub(super) attempt: u32,
    pub(super) deadline: Option<Instant>,
    /// When the delivery arrived.
    pub(super) received_at: Instant,
    pub(super) source: Source,
}

impl Request {
    /// Whether the deadline passed, at the start of the inline poll that runs this (a moment ago), or now.
    pub(super) fn expired(&self) -> bool {
        let now = || super::inline::poll_started().map_or_else(Instant::now, Instant::from_std);
        self.envelope.deadline_ms == Some(0) || self.deadline.is_some_and(|deadline| deadline <= now())
    }
}

/// Handles a request, holding `slot` (a slot of the server's concurrency) until it is done.
async fn handle_request(slot: Slot, request: Request, handle: AckHandle) {
    let shared = &*slot.shared;
    let stats = &shared.stats;
    let policy = if request.source == Source::Queue { shared.policy(&request.envelope.method) } else { &RETRY_NONE };
    if !policy.is_none() && request.attempt > policy.max_attempts() {
        // Delivered again after its last attempt: the workers that held it stopped before settling it.
        let status =
            Status::new(Code::Internal, "delivered again after its last attempt: the workers holding it stopped");
        Box::pin(dead_letter(shared, &request, handle, policy, status)).await;
        return;
    }
    if request.envelope.status != 0 {
        // A request carries no status: a transport's stand-in for a message it could not read
        // (`transport::invalid_request`), or a sender's mistake. Answered, never run.
        let why = request.envelope.status_message.clone().unwrap_or_else(|| "a request carries no status".into());
        Box::pin(answer(shared, request, handle, Err(Status::new(Code::InvalidRequest, why)), Instant::now())).await;
        return;
    }
    let claim = match claim(shared, &request).await {
        Claim::Execute(claim) => claim,
        Claim::Answer(result) => {
            stats.deduplicated.fetch_add(1, Ordering::Relaxed);
            shared.metrics.dedup_hits.increment(1);
            answer(shared, request, handle, result, Instant::now()).await;
            return;
        }
        Claim::Requeue => {
            settle(handle.requeue().await);
            return;
        }
        Claim::Expired(status) => {
            stats.expired.fetch_add(1, Ordering::Relaxed);
            shared.metrics.expired.increment(1);
            Box::pin(answer(shared, request, handle, Err(status), Instant::now())).await;
            return;
        }
    };
    if handle.revoked() {
        // Another worker may be running it now: the broker took it back while this one was away.
        stats.revoked.fetch_add(1, Ordering::Relaxed);
        tracing::debug!("dropping a delivery the broker took back, unrun");
        if let Some((store, key)) = &claim {
            store.abandon(key).await;
        }
        return;
    }
    if request.expired() {
        // Never started: the claim is given up, not completed, so a retry of the key (sent again with more
        // time) runs rather than being answered with this delivery's lateness for as long as the store keeps it.
        if let Some((store, key)) = &claim {
            store.abandon(key).await;
        }
        stats.expired.fetch_add(1, Ordering::Relaxed);
        shared.metrics.expired.increment(1);
        Box::pin(answer(shared, request, handle, Err(expired_status()), Instant::now())).await;
        return;
    }
    // Under a claim the handler runs past the deadline, up to the overrun (see `Server::overrun`).
    let cut_at = match claim {
        Some(_) => request.deadline.and_then(|deadline| deadline.checked_add(shared.overrun)),
        None => request.deadline,
    };
    let Some(result) = execute(shared, &request, &handle, cut_at).await else {
        // The caller cancelled the call: nobody waits for a reply, and it must not run again.
        stats.cancelled.fetch_add(1, Ordering::Relaxed);
        shared.metrics.cancelled.increment(1);
        if let Some((store, key)) = &claim {
            let cancelled = Err(Status::new(Code::Cancelled, "an earlier call with this key was cancelled"));
            settle(store.complete(key, cancelled).await);
        }
        settle(handle.ack().await);
        return;
    };
    if let Err(status) = &result {
        trace::failed(&tracing::Span::current(), status.code().label());
    }
    if let Err(status) = &result
        && !policy.is_none()
        && policy.retries(status.code())
    {
        if let Some((store, key)) = &claim {
            store.abandon(key).await;
        }
        if request.attempt < policy.max_attempts() {
            let wait = policy.backoff_before(request.attempt + 1);
            // After the backoff, the next attempt needs as long as this one took (the attempt, and its way to a
            // worker, which its answer's way back takes again) plus `RETRY_MARGIN` before the deadline, and the
            // broker's lateness when it holds the backoff: a retry with less time left would answer after the
            // caller gave up, where dead-lettering now answers in time.
            let now = Instant::now();
            let took = now.saturating_duration_since(request.received_at);
            let ways = 2 * way_to_worker(&request.envelope, took);
            let capabilities = shared.transport.capabilities();
            let late = if capabilities.delayed_delivery { capabilities.delay_slack } else { Duration::ZERO };
            if request.deadline.is_none_or(|deadline| now + wait + late + took + ways + RETRY_MARGIN < deadline) {
                Box::pin(retry(shared, request, handle, wait)).await;
                return;
            }
        }
        let status = status.clone();
        Box::pin(dead_letter(shared, &request, handle, policy, status)).await;
        return;
    }
    // One reading of the clock: the outcome's time in the store, the handling's in the counters, the reply's id,
    // and the end of an inline poll that finishes the handling.
    let now = Instant::now();
    super::inline::note_reading(now.into_std());
    if let Some((store, key)) = &claim {
        // Every outcome of a started execution is stored, failures included: the next delivery of the key is
        // answered with it rather than run again.
        settle(store.complete_at(key, &result, now.into_std()).await);
    }
    answer(shared, request, handle, result, now).await;
}

/// The time a retry needs before the deadline past its backoff, the last attempt's time and the ways to a worker
/// and back.
const RETRY_MARGIN: Duration = Duration::from_millis(25);

/// The longest way to a worker a retry counts on: more is a publisher's clock behind this one's, and would leave
/// a call with a long deadline fewer retries than it has time for.
const MOST_WAY: Duration = Duration::from_secs(1);

/// How long `envelope`, received `since` ago, took from its publish to this worker, on the wall clock: from its
/// id's time (made as it was published: a call's correlation id, or a retry's own id) to its delivery, less a
/// delay it was held for. Zero where the publisher's clock is ahead of this one's; at most [`MOST_WAY`].
fn way_to_worker(envelope: &Envelope, since: Duration) -> Duration {
    let Some((seconds, nanos)) = envelope.id.get_timestamp().map(|time| time.to_unix()) else { return Duration::ZERO };
    let published = std::time::UNIX_EPOCH + Duration::new(seconds, nanos);
    let received = std::time::SystemTime::now().checked_sub(since).unwrap_or(published);
    let held = Duration::from_millis(envelope.delay_ms.unwrap_or(0));
    received.duration_since(published).unwrap_or(Duration::ZERO).saturating_sub(held).min(MOST_WAY)
}

static RETRY_NONE: std::sync::LazyLock<RetryPolicy> = std::sync::LazyLock::new(RetryPolicy::none);

/// `future`'s output, or `None` once `deadline` passes, in an `async` body. The timer is made only for a future
/// that is not ready at its first poll: most handlers and dedup stores finish at once, and a timer costs more
/// than they do. A macro rather than an `async fn`, which would hold the future twice (as its argument and
/// pinned).
macro_rules! within {
    ($deadline:expr, $future:expr) => {{
        let mut future = std::pin::pin!($future);
        match future.as_mut().now_or_never() {
            Some(output) => Some(output),
            None => match $deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, future).await.ok(),
                None => Some(future.await),
            },
        }
    }};
}

/// What the dedup store says about a request.
enum Claim<'a> {
    /// Run it; complete or abandon this claim afterwards.
    Execute(Option<(&'a dyn DedupStore, &'a str)>),
    /// Its key was executed: answer with this.
    Answer(StoredReply),
    /// The store failed: hand the request back rather than risk a second execution.
    Requeue,
    /// The deadline passed before the store answered, or while another delivery of the key ran.
    Expired(Status),
}

async fn claim<'a>(shared: &'a Shared, request: &'a Request) -> Claim<'a> {
    let (Some(store), Some(key)) = (shared.dedup.as_deref(), request.envelope.idempotency_key.as_deref()) else {
        return Claim::Execute(None);
    };
    loop {
        let begun = within!(request.deadline, store.begin(key)).ok_or(());
        let wake = match begun {
            Ok(Ok(Begin::Execute)) => return Claim::Execute(Some((store, key))),
            Ok(Ok(Begin::Done(reply))) => return Claim::Answer(reply),
            Ok(Ok(Begin::InProgress(wake))) => wake,
            Ok(Err(error)) => {
                tracing::warn!(%error, key, "the dedup store failed; requeueing the request");
                return Claim::Requeue;
            }
            Err(_) => return Claim::Expired(expired_status()),
        };
        // Another delivery of the same key runs now: its outcome is this one's.
        let wait = async {
            match wake {
                Some(wake) => wake.await,
                None => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        match request.deadline {
            Some(deadline) => {
                if Box::pin(tokio::time::timeout_at(deadline, wait)).await.is_err() {
                    return Claim::Expired(Status::new(
                        Code::DeadlineExceeded,
                        "the deadline passed while an earlier delivery of this key was still running; a retry \
                         with the key gets its outcome once it ends",
                    ));
                }
            }
            None => Box::pin(wait).await,
        }
    }
}

fn expired_status() -> Status {
    Status::new(Code::DeadlineExceeded, "the deadline passed while the request was queued")
}

/// Runs the handler with its context, stopped at `cut_at` if given; a panic becomes [`Code::Internal`]. The
/// caller has checked that the request's deadline has not passed. `None`: the caller cancelled the call and the handler was
/// stopped (dropped at its next await).
async fn execute(
    shared: &Shared,
    request: &Request,
    handle: &AckHandle,
    cut_at: Option<Instant>,
) -> Option<Result<Bytes, Status>> {
    let stats = &shared.stats;
    let envelope = &request.envelope;
    let context =
        context::Current { envelope: Arc::clone(envelope), attempt: request.attempt, deadline: request.deadline };
    let service = &shared.service;
    let run = || {
        // `call` runs at the first poll, inside the panic guard and the context: decoding the arguments is
        // part of the handler.
        let call =
            AssertUnwindSafe(async { service.call(&envelope.method, envelope.body.clone()).await }).catch_unwind();
        let call = context::scope(context, call);
        async {
            tokio::select! {
                biased;
                outcome = call => Some(outcome),
                // Asked for only once the handler waits: no signal is made for one that finishes at once.
                () = async {
                    match handle.cancelled() {
                        Some(cancelled) => cancelled.await,
                        None => std::future::pending().await,
                    }
                } => None,
            }
        }
    };
    let started = metrics::Started::now();
    let outcome = within!(cut_at, run());
    shared.metrics.ran(&envelope.method, started);
    Some(match outcome {
        Some(Some(Ok(result))) => result,
        Some(Some(Err(panic))) => {
            stats.panicked.fetch_add(1, Ordering::Relaxed);
            shared.metrics.panics.increment(1);
            let message = panic_message(panic.as_ref());
            tracing::error!(%message, "handler panicked");
            Err(Status::new(Code::Internal, format!("handler panicked: {message}")))
        }
        Some(None) => return None,
        None => {
            stats.expired.fetch_add(1, Ordering::Relaxed);
            shared.metrics.expired.increment(1);
            Err(Status::new(Code::DeadlineExceeded, "the handler ran past the caller's deadline and was stopped"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An envelope whose id was made `ago` before now (a negative `ago`: after now).
    fn published(ago_ms: i64, delay_ms: Option<u64>) -> Envelope {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970");
        let millis = i64::try_from(now.as_millis()).expect("fits") - ago_ms;
        let id = uuid::Builder::from_unix_timestamp_millis(u64::try_from(millis).expect("after 1970"), &[7; 10]);
        let mut envelope = Envelope::with_id(Kind::Request, id.into_uuid());
        envelope.delay_ms = delay_ms;
        envelope
    }

    #[test]
    fn the_way_to_a_worker_is_read_from_the_id_less_its_delay_and_bounded() {
        let way = |ago, delay, since| way_to_worker(&published(ago, delay), Duration::from_millis(since));
        // Its id's time to its delivery, `since` ago; the id's millisecond is whole, so up to one more.
        let took = way(300, None, 100);
        assert!(took >= Duration::from_millis(199) && took <= Duration::from_millis(260), "{took:?}");
        // A delay the broker held it for is not the way.
        assert!(way(300, Some(250), 0) <= Duration::from_millis(60));
        // A publisher's clock ahead of this one's: nothing.
        assert_eq!(way(-5_000, None, 0), Duration::ZERO);
        // One far behind: at most the bound.
        assert_eq!(way(60_000, None, 0), MOST_WAY);
    }
}
