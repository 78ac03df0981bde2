//! How a request ends on the worker: answered (reply and ack in one step), retried (a copy for the next
//! attempt, fenced), or dead-lettered; with the counters each outcome moves.

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::envelope::{Envelope, Kind, ReplyTo};
use crate::error::Error;
use crate::retry::RetryPolicy;
use crate::status::{Code, Status};
use crate::transport::{AckHandle, Answered, BoxFuture, Confirm, Transport};

use super::Shared;
use super::pipeline::Request;

/// Puts a copy of the request carrying `attempt + 1` on the service's queue, due after the backoff `wait`, in
/// place of this one (fenced: a worker that lost the request makes no copy). Where the transport has delayed
/// delivery the broker holds the copy meanwhile; elsewhere the worker waits out the backoff first, holding the
/// request. If the copy cannot be published, this one goes back to the queue instead.
pub(super) async fn retry(shared: &Shared, request: Request, handle: AckHandle, wait: Duration) {
    let delayed = shared.transport.capabilities().delayed_delivery && !wait.is_zero();
    if !delayed {
        tokio::time::sleep(wait).await;
    }
    let mut copy = Arc::unwrap_or_clone(request.envelope);
    copy.id = crate::envelope::new_id();
    copy.attempt = request.attempt + 1;
    copy.delay_ms = delayed.then(|| u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1));
    if let Some(deadline) = request.deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        copy.deadline_ms = Some(u64::try_from(left.as_millis()).unwrap_or(u64::MAX).max(1));
    }
    if let Some(link) = crate::trace::current_for_link() {
        copy.headers.insert(crate::trace::RETRY_TRACEPARENT.to_owned(), link);
    }
    tracing::debug!(attempt = copy.attempt, ?wait, delayed, "retrying a failed request");
    // Counted before the publish: a worker can take the copy, and its caller read the stats, before this
    // publish's confirm comes back.
    shared.stats.retried.fetch_add(1, Ordering::Relaxed);
    let republished = if handle.is_auto() {
        // No reply path of its own: published through the server's transport, unfenced.
        shared.transport.publish(&shared.queue, copy, Confirm::Broker).await.map_err(|error| (error, handle))
    } else {
        handle.republish(&shared.queue, copy).await
    };
    match republished {
        Ok(()) => shared.metrics.retries.increment(1),
        Err((Error::DeliveryLost, _)) => {
            // Another worker has the request now, and decides on its next attempt.
            shared.stats.retried.fetch_sub(1, Ordering::Relaxed);
            fenced(shared);
        }
        Err((error, handle)) => {
            shared.stats.retried.fetch_sub(1, Ordering::Relaxed);
            tracing::warn!(%error, "could not put the retry on the queue; requeueing the request");
            settle(handle.requeue().await);
        }
    }
}

/// Gives up on a request: the caller gets [`Code::DeadLettered`] with the last failure, and the request goes to
/// the dead-letter queue, where it can be inspected and replayed.
pub(super) async fn dead_letter(
    shared: &Shared,
    request: &Request,
    handle: AckHandle,
    policy: &RetryPolicy,
    last: Status,
) {
    let stats = &shared.stats;
    stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
    shared.metrics.dead_lettered.increment(1);
    shared.metrics.handled_dead_lettered(&request.envelope.method);
    stats.failed.fetch_add(1, Ordering::Relaxed);
    let (attempt, of) = (request.attempt, policy.max_attempts());
    let message = if attempt >= of {
        format!("gave up after attempt {attempt} of {of}: {last}")
    } else {
        format!("gave up after attempt {attempt} of {of}, the deadline leaving no time for another: {last}")
    };
    tracing::warn!(%message, "dead-lettering a request");
    shared.failed_with(Code::DeadLettered, &message);
    let status = Status::new(Code::DeadLettered, message).with_cause(last.code()).with_details(last.details().clone());
    match reply(shared, &request.envelope, &handle, Err(status)).await {
        Ok(()) => {}
        Err(Error::DeliveryLost) => {
            // Another delivery of it decides now.
            fenced(shared);
            return;
        }
        Err(error) => tracing::warn!(%error, "could not publish the dead-letter reply"),
    }
    settle(handle.dead_letter().await);
}

/// Publishes the reply (for requests) and acks the request; a reply that cannot be published requeues it.
/// Answers `request` with `result`, the handling ended at `now`.
pub(super) async fn answer(
    shared: &Shared,
    request: Request,
    handle: AckHandle,
    result: Result<Bytes, Status>,
    now: Instant,
) {
    let stats = &shared.stats;
    shared.metrics.handled(&request.envelope.method, &result);
    if let Err(status) = &result {
        stats.failed.fetch_add(1, Ordering::Relaxed);
        shared.failed_with(status.code(), status.message());
    }
    // Counted here rather than once the reply is out: nothing more is held across the reply's publish, the
    // request's future stays within the allocator's per-thread cache.
    stats.processed(request.received_at, now);
    let mut envelope = request.envelope;
    if envelope.kind != Kind::Request || envelope.reply_to.is_none() {
        // Nobody waits for a reply.
        stats.handled();
        settle(handle.ack().await);
        return;
    }
    // The handler's context is gone by now, so the request is this one's alone (unless the handler left a task
    // holding it): its names move into the reply.
    let reply = match Arc::get_mut(&mut envelope) {
        Some(request) => request.take_reply(result, now.into_std()),
        None => envelope.reply_at(result, now.into_std()),
    };
    let Some(reply_to) = envelope.reply_to.as_ref() else { return };
    let answered = if handle.is_auto() {
        publish_unfenced(shared, reply_to, reply).await
    } else {
        handle.answer(reply_to, reply).await
    };
    match answered {
        Ok(Answered::Sent) => {}
        Ok(Answered::Undeliverable) => undeliverable(shared, reply_to),
        Err(Error::DeliveryLost) => {
            fenced(shared);
            return;
        }
        Err(error) => {
            tracing::warn!(%error, "could not publish the reply; requeueing the request");
            settle(handle.requeue().await);
            return;
        }
    }
    stats.handled();
}

/// Counts a reply not sent because the broker took its request back from this worker (its connection was
/// lost while the handler ran) and redelivers it: the delivery that has it now answers.
fn fenced(shared: &Shared) {
    shared.stats.fenced.fetch_add(1, Ordering::Relaxed);
    shared.metrics.fenced.increment(1);
    tracing::debug!("reply dropped: the broker took the request back and redelivers it");
}

/// Publishes the reply to a request that has a reply address, fenced by its delivery; a reply address that is
/// gone counts as done.
async fn reply(
    shared: &Shared,
    envelope: &Envelope,
    handle: &AckHandle,
    result: Result<Bytes, Status>,
) -> Result<(), Error> {
    let (Kind::Request, Some(reply_to)) = (envelope.kind, envelope.reply_to.as_ref()) else { return Ok(()) };
    let reply = envelope.reply(result);
    let answered = if handle.is_auto() {
        publish_unfenced(shared, reply_to, reply).await
    } else {
        handle.reply(reply_to, reply).await
    };
    if answered? == Answered::Undeliverable {
        undeliverable(shared, reply_to);
    }
    Ok(())
}

/// Publishes the reply to an auto-acked delivery, which has no reply path of its own, through the server's
/// transport: unfenced. Boxed, as a rare path (see `pipeline::handle`).
fn publish_unfenced<'a>(
    shared: &'a Shared,
    reply_to: &'a ReplyTo,
    reply: Envelope,
) -> BoxFuture<'a, Result<Answered, Error>> {
    let published = shared.transport.publish(reply_to.address(), reply, Confirm::for_reply(reply_to));
    Box::pin(async move { Answered::of(published.await) })
}

/// Counts a reply whose address is gone: the caller went with its inbox, and nobody is left to answer.
fn undeliverable(shared: &Shared, reply_to: &ReplyTo) {
    shared.stats.undeliverable.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(reply_to = reply_to.address(), "reply undeliverable: the reply address is gone");
}

pub(super) fn settle(result: Result<(), Error>) {
    if let Err(error) = result {
        tracing::warn!(%error, "could not settle a delivery; the broker redelivers it");
    }
}

pub(super) fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(message) = panic.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message.clone()
    } else {
        "a non-string payload".to_owned()
    }
}
