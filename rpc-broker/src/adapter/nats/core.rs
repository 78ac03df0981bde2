//! Core NATS: the outbox that batches publishes, the consumer read straight from a subscription, and
//! `CoreAcker`.

use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasherDefault;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use futures::{FutureExt, Stream, StreamExt};
use rpc_core::transport::{AckHandle, Acker, Answered, BoxFuture, Confirm, Consumer, Delivery, Outcome};
use rpc_core::{ConsumeOptions, Envelope, Error, ReplyTo, naming};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::mapping::{Origin, check_reply, from_message_at};
use super::{CancelOnDrop, Inner, Nats};
use crate::adapter::{CounterMap, Counters};

/// Subjects kept in [`Inner::subjects`] at most; a publish to a queue past them makes its own subject.
const SUBJECTS: usize = 1_024;

/// The subject of `queue` and its counters, from `subjects` (kept there on first use, while they number under
/// [`SUBJECTS`]): one lookup per publish for both. The counters are those of `counters`, which the queue's
/// statistics read.
pub(super) fn shared_subject(
    subjects: &dashmap::DashMap<String, (async_nats::Subject, Arc<Counters>)>,
    counters: &CounterMap,
    queue: &str,
) -> (async_nats::Subject, Arc<Counters>) {
    if let Some(entry) = subjects.get(queue) {
        let (subject, counters) = &*entry;
        return (subject.clone(), Arc::clone(counters));
    }
    let subject = async_nats::Subject::from(queue);
    let counters = counters.of(queue);
    if subjects.len() < SUBJECTS {
        // The clone makes the kept subject's buffer shared: from here on a clone only counts a reference.
        subjects.insert(queue.to_owned(), (subject.clone(), Arc::clone(&counters)));
    }
    (subject, counters)
}

impl Nats {
    pub(super) fn core_consumer(&self, subscriber: async_nats::Subscriber, options: ConsumeOptions) -> Consumer {
        let acker = Arc::new(CoreAcker { inner: Arc::clone(&self.inner), held: Mutex::new(HashMap::default()) });
        let cancel = CancellationToken::new();
        let stream = CoreStream {
            subscriber: Some(subscriber),
            cancel: cancel.clone(),
            acker,
            manual: !options.auto_ack,
            next_tag: 0,
        };
        let control = CancelOnDrop { cancel, held_by: None };
        Consumer::new(stream.boxed(), Some(Box::new(control)))
    }
}

/// Publishes on their way to the client's connection handler, handed over by one task in batches.
///
/// async-nats writes what its connection task finds queued when it runs, and a publish wakes that task: from a
/// runtime worker, into the slot that runs next. Calls publishing one by one from their own tasks would each
/// be written alone, a system call and a read on the server per message. Here the first publish wakes the
/// forwarding task, which yields once (tokio runs it again when its worker has nothing else ready, or after at
/// most one maintenance interval of polls: by then the tasks ready on that worker have published too) and then
/// hands over everything queued: the connection task writes the batch at once.
///
/// Used in core mode only (see [`Inner::publish`]). What goes to the client directly (a republished or
/// dead-lettered delivery, a message with headers) may overtake what waits here; core NATS promises no order
/// between publishers either.
pub(super) struct Outbox {
    sender: mpsc::Sender<Outgoing>,
    /// For the server's maximum payload, as the client knows it now.
    client: async_nats::Client,
    /// Cancelled once the forwarding task has handed over everything it took and ended.
    finished: CancellationToken,
}

/// What goes through the outbox.
pub(super) enum Outgoing {
    /// A message without headers.
    Message { subject: async_nats::Subject, reply: Option<async_nats::Subject>, body: Bytes },
    /// Answered once everything queued before it is with the client.
    Drained(tokio::sync::oneshot::Sender<()>),
    /// Closes the outbox: later sends fail. Answered once everything the outbox took before it closed is with
    /// the client.
    Close(tokio::sync::oneshot::Sender<()>),
}

impl Outbox {
    /// Messages the outbox holds at most; a publish past it waits for room.
    const CAPACITY: usize = 2_048;
    /// The most messages handed to the client between two yields.
    const BATCH: usize = 256;

    /// An outbox forwarding to `client`, its task on the current runtime.
    pub(super) fn start(client: async_nats::Client) -> Outbox {
        let (sender, receiver) = mpsc::channel(Outbox::CAPACITY);
        let finished = CancellationToken::new();
        tokio::spawn(Outbox::forward(client.clone(), receiver, finished.clone()));
        Outbox { sender, client, finished }
    }

    /// What the client would refuse, refused before the message is queued: the forwarding task has no one
    /// to tell.
    pub(super) fn check(&self, subject: &str, reply: Option<&str>, size: usize) -> Result<(), Error> {
        check_reply(reply)?;
        let max = self.client.max_payload();
        if size > max {
            return Err(Error::InvalidArgument(format!(
                "a message of {size} bytes to `{subject}` is over the server's maximum payload of {max} bytes"
            )));
        }
        Ok(())
    }

    /// Queues `outgoing` if the outbox has room for it now.
    ///
    /// # Errors
    /// `Full` with `outgoing` when it has none (or another publish waits for it), `Closed` once it is closed or
    /// its forwarding task is gone.
    pub(super) fn try_send(&self, outgoing: Outgoing) -> Result<(), mpsc::error::TrySendError<Outgoing>> {
        self.sender.try_send(outgoing)
    }

    /// Queues `outgoing`; fails once the outbox is closed or its forwarding task is gone (its runtime shut
    /// down).
    pub(super) async fn send(&self, outgoing: Outgoing) -> Result<(), ()> {
        self.sender.send(outgoing).await.map_err(|_| ())
    }

    /// Once everything queued so far is with the client (once the outbox is closed: everything it took).
    pub(super) async fn drained(&self) {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.answered(Outgoing::Drained(done), wait).await;
    }

    /// Closes the outbox; returns once every message it took is with the client. A send still waiting for room
    /// when it closes, or begun later, fails.
    ///
    /// The forwarding task waits for a sender that was given room to use it, so the task that closes must not
    /// hold a publish of its own that waits for room (one polled once, then set aside): the close would wait for
    /// it for ever.
    pub(super) async fn close(&self) {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.answered(Outgoing::Close(done), wait).await;
    }

    /// Sends a barrier and waits for its answer; when the outbox is closed already, for the forwarding task to
    /// finish what it took.
    async fn answered(&self, barrier: Outgoing, wait: tokio::sync::oneshot::Receiver<()>) {
        if self.sender.send(barrier).await.is_ok() {
            let _ = wait.await;
        } else {
            self.finished.cancelled().await;
        }
    }

    /// Hands the queued messages to `client` until the outbox is closed and empty, or every sender is gone;
    /// then answers the closers and cancels `finished` (also when the task is dropped with its runtime).
    async fn forward(client: async_nats::Client, mut receiver: mpsc::Receiver<Outgoing>, finished: CancellationToken) {
        let _finished = finished.drop_guard();
        let mut closers = Vec::new();
        let mut batch = Vec::with_capacity(Outbox::BATCH);
        // Once the outbox is closed, `recv_many` returns 0 only when it is empty and no sender holds room in it:
        // what was let in before the close is forwarded like the rest.
        while receiver.recv_many(&mut batch, Outbox::BATCH).await > 0 {
            tokio::task::yield_now().await;
            while batch.len() < Outbox::BATCH {
                match receiver.try_recv() {
                    Ok(outgoing) => batch.push(outgoing),
                    Err(_) => break,
                }
            }
            let mut refused = None;
            for outgoing in batch.drain(..) {
                match outgoing {
                    Outgoing::Message { subject, reply, body } => {
                        let sent = match reply {
                            Some(reply) => client.publish_with_reply(subject, reply, body).await,
                            None => client.publish(subject, body).await,
                        };
                        // A closed client refuses what `check` let through, and so does one that reconnected to
                        // a server with a smaller maximum payload.
                        if let Err(error) = sent {
                            refused.get_or_insert((0usize, error)).0 += 1;
                        }
                    }
                    Outgoing::Drained(done) => {
                        let _ = done.send(());
                    }
                    Outgoing::Close(done) => {
                        // No send is let in from here on; the closer hears once what was is with the client.
                        receiver.close();
                        closers.push(done);
                    }
                }
            }
            if let Some((count, error)) = refused {
                tracing::warn!(count, %error, "the NATS client refused messages; they are lost");
            }
        }
        for done in closers {
            let _ = done.send(());
        }
    }
}

/// The deliveries of a core NATS subscription, read straight from it (no task in between: a batch of messages
/// reaches the server in one wake-up). A request whose deadline passed while it waited is handed out like any
/// other: the worker answers it with status 4. Pausing hands out what the subscription already
/// buffered, then unsubscribes; dropping it unsubscribes.
struct CoreStream {
    subscriber: Option<async_nats::Subscriber>,
    cancel: CancellationToken,
    acker: Arc<CoreAcker>,
    manual: bool,
    next_tag: u64,
}

impl Stream for CoreStream {
    type Item = Delivery;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        let this = self.get_mut();
        let Some(subscriber) = this.subscriber.as_mut() else { return Poll::Ready(None) };
        let message = if this.cancel.is_cancelled() {
            // Paused: only what is already buffered, without waiting.
            match subscriber.next().now_or_never().flatten() {
                Some(message) => message,
                None => {
                    // Dropping the subscriber unsubscribes.
                    this.subscriber = None;
                    return Poll::Ready(None);
                }
            }
        } else {
            match subscriber.poll_next_unpin(cx) {
                Poll::Ready(Some(message)) => message,
                Poll::Ready(None) => {
                    this.subscriber = None;
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            }
        };
        // One reading of the clock: when the message was received, and how long it was on its way.
        let received_at = Instant::now();
        let (envelope, queued) = from_message_at(&message, Origin::Core, received_at);
        this.next_tag += 1;
        let handle = if this.manual {
            Inner::lock(&this.acker.held).insert(this.next_tag, message);
            AckHandle::new(Arc::clone(&this.acker) as Arc<dyn Acker>, this.next_tag)
        } else {
            AckHandle::auto()
        };
        Poll::Ready(Some(Delivery { envelope: Arc::new(envelope), delivery_count: 1, queued, received_at, handle }))
    }
}

/// Settles core NATS deliveries: there is nothing to ack, but a requeued or released message is published
/// again to its subject and a dead-lettered one to `<subject>.dlq`.
struct CoreAcker {
    inner: Arc<Inner>,
    held: Mutex<HashMap<u64, async_nats::Message, BuildHasherDefault<TagHasher>>>,
}

/// Hashes a delivery's tag (a counter from 1) with one multiplication: the tags are this consumer's own, so
/// nothing outside can choose them to collide, and a keyed hash of each (SipHash, the map's default) costs more
/// than the lookup.
#[derive(Default)]
struct TagHasher(u64);

impl std::hash::Hasher for TagHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(byte)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, tag: u64) {
        // Fibonacci hashing: consecutive tags spread over the whole word, the top bits included (the map's
        // control bytes are taken from them).
        self.0 = tag.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

impl fmt::Debug for CoreAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoreAcker").finish_non_exhaustive()
    }
}

impl Acker for CoreAcker {
    fn settle(&self, tag: u64, outcome: Outcome) -> BoxFuture<'_, Result<(), Error>> {
        if outcome == Outcome::Ack {
            // An ack (nearly every settle) is done here, without a future to wait on.
            Inner::lock(&self.held).remove(&tag);
            return rpc_core::transport::finished(Ok(()));
        }
        // The message is taken when the future runs: one dropped unpolled leaves it held.
        Box::pin(async move {
            let Some(message) = Inner::lock(&self.held).remove(&tag) else { return Ok(()) };
            let subject = match outcome {
                Outcome::Requeue | Outcome::Release => message.subject.as_str().to_owned(),
                Outcome::Ack | Outcome::DeadLetter => naming::dead_letter_queue(&message.subject),
            };
            let headers = message.headers.unwrap_or_default();
            let result = match message.reply {
                Some(reply) => {
                    self.inner.client.publish_with_reply_and_headers(subject, reply, headers, message.payload).await
                }
                None => self.inner.client.publish_with_headers(subject, headers, message.payload).await,
            };
            result.map_err(|_| Error::Disconnected)
        })
    }

    fn publish<'a>(
        &'a self,
        _tag: u64,
        queue: &'a str,
        envelope: Envelope,
        confirm: Confirm,
    ) -> BoxFuture<'a, Result<(), Error>> {
        // Core NATS holds no delivery that the server could take back: there is nothing to fence by.
        self.inner.publish(queue, envelope, confirm)
    }

    fn answer<'a>(
        &'a self,
        tag: u64,
        reply_to: &'a ReplyTo,
        reply: Envelope,
    ) -> BoxFuture<'a, Result<Answered, Error>> {
        // An inbox's subject made of its address without a copy: a received reply subject is cut from a shared
        // chunk (`Text::copied`), whose clone counts a reference. A queue's subject is the transport's own.
        let subject = reply_to
            .is_inbox()
            .then(|| async_nats::Subject::from_utf8(reply_to.text().clone().into_bytes()).ok())
            .flatten();
        let mut published = self.inner.publish_with(reply_to.address(), subject, reply, Confirm::for_reply(reply_to));
        // A reply the outbox took at once (nearly every one) is sent as far as core NATS sends anything, and
        // its ack is this process's own: no future to allocate for the two steps.
        match (&mut published).now_or_never() {
            Some(published) => {
                // As `reply_then_ack`: a reply that could not go leaves the delivery held.
                let answered = Answered::of(published);
                if answered.is_ok() {
                    Inner::lock(&self.held).remove(&tag);
                }
                rpc_core::transport::answered(answered)
            }
            None => Box::pin(async move {
                let answered = Answered::of(published.await)?;
                Inner::lock(&self.held).remove(&tag);
                Ok(answered)
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_tags_hash_apart_in_the_bits_the_map_uses() {
        use std::hash::BuildHasher;
        let hasher = BuildHasherDefault::<TagHasher>::default();
        let hashes: Vec<u64> = (1..=4096u64).map(|tag| hasher.hash_one(tag)).collect();
        // The top 7 bits (the control bytes) and the low 12 (the buckets of a map this size) both vary.
        let tops: std::collections::HashSet<u64> = hashes.iter().map(|hash| hash >> 57).collect();
        let lows: std::collections::HashSet<u64> = hashes.iter().map(|hash| hash & 0xfff).collect();
        assert_eq!(tops.len(), 128);
        assert!(lows.len() > 4096 / 2, "{} buckets of 4096", lows.len());
    }

    #[test]
    fn the_subject_of_a_queue_is_made_once_and_shared_up_to_the_bound() {
        let subjects = dashmap::DashMap::new();
        let counters = CounterMap::default();
        let (first, first_counters) = shared_subject(&subjects, &counters, "ns.Calculator");
        let (second, second_counters) = shared_subject(&subjects, &counters, "ns.Calculator");
        assert_eq!((first.as_str(), second.as_str()), ("ns.Calculator", "ns.Calculator"));
        assert_eq!(first.as_str().as_ptr(), second.as_str().as_ptr(), "not shared");
        // The queue's own counters, which its statistics read.
        assert!(Arc::ptr_eq(&first_counters, &second_counters));
        assert!(Arc::ptr_eq(&first_counters, &counters.of("ns.Calculator")));
        for n in 1..SUBJECTS + 10 {
            assert_eq!(shared_subject(&subjects, &counters, &format!("q.{n}")).0.as_str(), format!("q.{n}"));
        }
        assert_eq!(subjects.len(), SUBJECTS);
        let past = format!("q.{}", SUBJECTS + 5);
        let (once, once_counters) = shared_subject(&subjects, &counters, &past);
        let (again, again_counters) = shared_subject(&subjects, &counters, &past);
        assert_ne!(once.as_str().as_ptr(), again.as_str().as_ptr());
        assert!(Arc::ptr_eq(&once_counters, &again_counters), "past the bound, still the queue's counters");
    }
}
