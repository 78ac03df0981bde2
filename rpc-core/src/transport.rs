//! The transport contract: everything the framework needs from a broker, and nothing more; and the kit for
//! writing one (`docs/adapters.md` walks through it, with the embedded transport as the reference).
//!
//! - **queues** (point to point): [`Transport::publish`], confirmed as far as its [`Confirm`] asks;
//!   [`Transport::consume`] with a prefetch; each [`Delivery`] acked, requeued or dead-lettered through its
//!   [`AckHandle`], which also carries its reply path; redelivered if its consumer goes away unacked.
//! - **topics** (broadcast): [`Transport::publish_topic`] once; each subscriber group ([`Transport::subscribe`])
//!   receives a copy; consumers within a group compete.
//! - **inbox**: [`Transport::open_inbox`], a private reply address per client ([`ReplyTo::Inbox`]).
//! - **capabilities**: [`Capabilities`]; what a broker lacks is reported as [`Error::Unsupported`], never
//!   silently ignored. [`Transport::queue_stats`] and [`Transport::cancel`] are optional and default to it.
//!
//! A delivered envelope's `deadline_ms` is what remains of the budget when it is handed out. A transport leaves
//! it as the sender wrote it and says how long the message waited ([`Delivery::queued`]); the [`Consumer`] takes
//! that off, once, as the delivery leaves it. A delivery whose budget ran out while queued
//! ([`Delivery::expired`]) is handed out all the same, and the worker answers it with status 4 (deadline
//! exceeded) unrun; only a broker that enforces a time to live takes it away while it is queued.
//!
//! For implementers: [`Acker`] settles and answers deliveries; [`reply_then_ack`], [`finished`] and
//! [`answered`] build its futures; [`Cancellations`] tracks per-delivery cancel signals; [`Consumer::from_channel`]
//! makes a consumer of an unbounded channel.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::stream::{BoxStream, StreamExt};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::envelope::{Envelope, ReplyTo};
use crate::error::Error;
/// For transports that keep a copy per thread of what every call writes (see [`Striped`]).
pub use crate::stripe::{STRIPES, Striped, thread_stripe};

/// A reading of the clock from moments ago, for checks that a few microseconds do not change (whether a
/// connection went quiet past its heartbeats, say): while the server polls a request's handling on this
/// thread, as it does for most requests, the latest reading the handling made (after its handler) or the
/// poll's start; otherwise a fresh reading.
///
/// An [`Acker`] asked about a delivery (`revoked`, `answer`) is asked from that poll, so it reads no clock
/// of its own there. A handler that computes in its first poll for long makes the poll's start that much
/// older: do not use it to time anything.
pub fn recent_instant() -> Instant {
    crate::server::latest_reading().unwrap_or_else(Instant::now)
}

/// A boxed future, the return type of the transport's methods.
pub type BoxFuture<'a, T> = futures::future::BoxFuture<'a, T>;

/// The future `make` returns, boxed: its box is allocated first and `make`'s future written into it, which lets
/// the compiler make the future in the box rather than on the stack and then copy it there (a call's future and
/// a request's handling are several hundred bytes, made for every call).
pub(crate) fn boxed<'a, F: Future + Send + 'a>(make: impl FnOnce() -> F) -> BoxFuture<'a, F::Output> {
    let slot: Box<std::mem::MaybeUninit<F>> = Box::new_uninit();
    let future: Box<F> = Box::write(slot, make());
    Box::into_pin(future)
}

/// `result`, known already, as the boxed future a transport method returns. `Ok(())`, what acks and
/// unconfirmed publishes come to, costs no allocation: its future is zero-sized, and a boxed zero-sized value
/// takes no memory.
pub fn finished<'a>(result: Result<(), Error>) -> BoxFuture<'a, Result<(), Error>> {
    match result {
        Ok(()) => Box::pin(std::future::poll_fn(|_| std::task::Poll::Ready(Ok(())))),
        Err(error) => Box::pin(std::future::ready(Err(error))),
    }
}

/// As [`finished`], for [`Acker::answer`]: `Ok(Answered::Sent)` costs no allocation.
pub fn answered<'a>(result: Result<Answered, Error>) -> BoxFuture<'a, Result<Answered, Error>> {
    match result {
        Ok(Answered::Sent) => Box::pin(std::future::poll_fn(|_| std::task::Poll::Ready(Ok(Answered::Sent)))),
        other => Box::pin(std::future::ready(other)),
    }
}

/// What a transport can do beyond the basic contract. Built with [`Capabilities::none`] and its setters, so
/// that adding a capability does not break a transport written elsewhere; one that is not set is reported as
/// [`Error::Unsupported`] where it is asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Messages survive a broker restart.
    pub durable: bool,
    /// Deliveries are acked; unacked ones are redelivered.
    pub acks: bool,
    /// Priorities 0 to 9 order deliveries.
    pub priority: bool,
    /// Messages can be published with a delay.
    pub delayed_delivery: bool,
    /// How late past its delay the broker may deliver a delayed message (its timer's granularity): a worker
    /// leaves this much more before the deadline when it puts a retry's backoff in the broker. Zero for the
    /// embedded and own broker; half a second on ActiveMQ, whose scheduler wakes every 500 ms when idle.
    pub delay_slack: Duration,
    /// Queues can have a maximum length, rejecting publishes with [`Error::QueueFull`].
    pub max_length: bool,
    /// Messages are dead-lettered after a maximum number of deliveries.
    pub dead_letter: bool,
    /// The broker drops duplicate message ids within this window.
    pub dedup_window: Option<Duration>,
    /// [`Transport::cancel`] removes a call's request from its queue and signals the worker running it.
    pub cancel: bool,
    /// One delivery can be put back on its queue ([`Outcome::Requeue`], [`Outcome::Release`]) while its consumer
    /// goes on; without it, a requeue is emulated by publishing a copy.
    pub requeue: bool,
    /// A topic keeps one copy per subscriber group, shared by that group's consumers
    /// ([`Transport::subscribe`]); without it, every subscriber gets every copy.
    pub subscriber_groups: bool,
    /// [`Transport::queue_stats`] answers.
    pub queue_stats: bool,
    /// Deliveries are handed out in this process, on the thread that published them, outside the broker's locks,
    /// to a consumer that takes them directly ([`Consumer::direct`]): a server then starts handling a request
    /// right there, and a call that stays in the process does not go from thread to thread.
    pub in_process: bool,
}

impl Capabilities {
    /// Nothing beyond the required contract.
    pub const fn none() -> Capabilities {
        Capabilities {
            durable: false,
            acks: false,
            priority: false,
            delayed_delivery: false,
            delay_slack: Duration::ZERO,
            max_length: false,
            dead_letter: false,
            dedup_window: None,
            cancel: false,
            requeue: false,
            subscriber_groups: false,
            queue_stats: false,
            in_process: false,
        }
    }

    /// Sets [`Capabilities::durable`].
    pub const fn durable(mut self, yes: bool) -> Capabilities {
        self.durable = yes;
        self
    }

    /// Sets [`Capabilities::acks`].
    pub const fn acks(mut self, yes: bool) -> Capabilities {
        self.acks = yes;
        self
    }

    /// Sets [`Capabilities::priority`].
    pub const fn priority(mut self, yes: bool) -> Capabilities {
        self.priority = yes;
        self
    }

    /// Sets [`Capabilities::delayed_delivery`].
    pub const fn delayed_delivery(mut self, yes: bool) -> Capabilities {
        self.delayed_delivery = yes;
        self
    }

    /// Sets [`Capabilities::delay_slack`].
    pub const fn delay_slack(mut self, slack: Duration) -> Capabilities {
        self.delay_slack = slack;
        self
    }

    /// Sets [`Capabilities::max_length`].
    pub const fn max_length(mut self, yes: bool) -> Capabilities {
        self.max_length = yes;
        self
    }

    /// Sets [`Capabilities::dead_letter`].
    pub const fn dead_letter(mut self, yes: bool) -> Capabilities {
        self.dead_letter = yes;
        self
    }

    /// Sets [`Capabilities::dedup_window`].
    pub const fn dedup_window(mut self, window: Option<Duration>) -> Capabilities {
        self.dedup_window = window;
        self
    }

    /// Sets [`Capabilities::cancel`].
    pub const fn cancel(mut self, yes: bool) -> Capabilities {
        self.cancel = yes;
        self
    }

    /// Sets [`Capabilities::requeue`].
    pub const fn requeue(mut self, yes: bool) -> Capabilities {
        self.requeue = yes;
        self
    }

    /// Sets [`Capabilities::subscriber_groups`].
    pub const fn subscriber_groups(mut self, yes: bool) -> Capabilities {
        self.subscriber_groups = yes;
        self
    }

    /// Sets [`Capabilities::queue_stats`].
    pub const fn queue_stats(mut self, yes: bool) -> Capabilities {
        self.queue_stats = yes;
        self
    }

    /// Sets [`Capabilities::in_process`].
    pub const fn in_process(mut self, yes: bool) -> Capabilities {
        self.in_process = yes;
        self
    }
}

/// How far a publish is confirmed before its future resolves. A transport may confirm more than it is asked
/// (a broker without unconfirmed publishes confirms them all), never less.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Confirm {
    /// Once the broker has the message (written to disk first, for a durable queue): the default.
    Broker,
    /// A call's request whose reply, awaited on the caller's inbox, proves that it arrived: the future may
    /// stay pending once the request is sent, and resolve only with a failure (or when its connection goes),
    /// so that no confirmation travels back for each call. The caller races it against the reply and the
    /// call's deadline, and drops it when either comes first.
    ByReply,
    /// Once the message is on its way, with nothing travelling back for it: for a reply to an inbox. The broker
    /// takes it before any settle the transport sends after it (a request's ack never overtakes its reply),
    /// and an address the broker no longer has drops it, as [`Error::NoRoute`] would.
    Sent,
}

impl Confirm {
    /// How a reply to `reply_to` is confirmed: [`Confirm::Sent`] for an inbox (its caller waits for it now, and
    /// a caller that is gone needs no reply), [`Confirm::Broker`] for a named queue (a durable callback).
    pub fn for_reply(reply_to: &ReplyTo) -> Confirm {
        if reply_to.is_inbox() { Confirm::Sent } else { Confirm::Broker }
    }
}

/// How a queue is declared.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueOptions {
    /// Ready messages the queue holds at most; a publish beyond gets [`Error::QueueFull`]. On NATS JetStream
    /// the messages handed out and not yet acked count too: a stream keeps a message until its ack, and its
    /// limit is on what it keeps.
    pub max_len: Option<usize>,
    /// Deliveries after which a message that was not acked goes to the dead-letter queue instead.
    pub max_deliveries: Option<u32>,
    /// The queue survives a broker restart, where the transport can do that.
    pub durable: bool,
}

impl QueueOptions {
    /// Options with no limits.
    pub fn new() -> QueueOptions {
        QueueOptions::default()
    }

    /// Sets [`QueueOptions::max_len`].
    pub fn max_len(mut self, max_len: usize) -> QueueOptions {
        self.max_len = Some(max_len);
        self
    }

    /// Sets [`QueueOptions::max_deliveries`].
    pub fn max_deliveries(mut self, max_deliveries: u32) -> QueueOptions {
        self.max_deliveries = Some(max_deliveries);
        self
    }

    /// Sets [`QueueOptions::durable`].
    pub fn durable(mut self, durable: bool) -> QueueOptions {
        self.durable = durable;
        self
    }
}

/// How a queue is consumed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumeOptions {
    /// Unacked deliveries the consumer holds at most (0: no limit).
    pub prefetch: u32,
    /// Deliveries count as acked when handed out.
    pub auto_ack: bool,
}

impl Default for ConsumeOptions {
    fn default() -> ConsumeOptions {
        ConsumeOptions { prefetch: 64, auto_ack: false }
    }
}

impl ConsumeOptions {
    /// Prefetch 64, manual acks.
    pub fn new() -> ConsumeOptions {
        ConsumeOptions::default()
    }

    /// Sets [`ConsumeOptions::prefetch`].
    pub fn prefetch(mut self, prefetch: u32) -> ConsumeOptions {
        self.prefetch = prefetch;
        self
    }

    /// Sets [`ConsumeOptions::auto_ack`].
    pub fn auto_ack(mut self, auto_ack: bool) -> ConsumeOptions {
        self.auto_ack = auto_ack;
        self
    }
}

/// How a delivery is settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Done: remove it.
    Ack,
    /// Put it back to be delivered again (to this or another consumer).
    Requeue,
    /// Move it to the queue's dead-letter queue.
    DeadLetter,
    /// Hand back a delivery that was never processed (a worker stopping with requests still buffered): it goes
    /// back to the front of the queue and does not count as a delivery.
    Release,
}

/// What became of a reply sent with [`Acker::answer`]; the delivery is acked either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answered {
    /// The reply went to the broker.
    Sent,
    /// Its address is gone (the caller with it): nobody is left to answer.
    Undeliverable,
}

impl Answered {
    /// What a reply's publish came to: sent, undeliverable for a reply address that is gone
    /// ([`Error::NoRoute`]), or another error.
    ///
    /// # Errors
    /// The publish's error, but [`Error::NoRoute`].
    pub fn of(published: Result<(), Error>) -> Result<Answered, Error> {
        match published {
            Ok(()) => Ok(Answered::Sent),
            Err(Error::NoRoute(_)) => Ok(Answered::Undeliverable),
            Err(error) => Err(error),
        }
    }
}

/// A request standing for a message the transport could not read but whose sender it can answer (the reply
/// address and correlation id found by [`codec::reply_address_of`](crate::codec::reply_address_of), or in the
/// broker's properties): the worker answers it with [`Code::InvalidRequest`](crate::Code::InvalidRequest) and
/// `why`, and runs nothing. Hand it out in the message's place, with the message's ack handle.
pub fn invalid_request(reply_to: ReplyTo, correlation_id: Option<Uuid>, why: impl Into<String>) -> Envelope {
    let mut envelope = Envelope::new(crate::Kind::Request);
    envelope.reply_to = Some(reply_to);
    envelope.correlation_id = correlation_id;
    envelope.status = crate::Code::InvalidRequest.as_u16();
    envelope.status_message = Some(why.into());
    envelope
}

/// [`Acker::answer`] in two steps, for transports that cannot do it in one: [`Acker::publish`] with
/// [`Confirm::for_reply`], then [`Acker::settle`] with [`Outcome::Ack`] (an ack that fails is logged: the broker
/// redelivers the request, whose key the dedup store answers).
///
/// # Errors
/// As [`Acker::answer`].
pub fn reply_then_ack<'a, A: Acker + ?Sized>(
    acker: &'a A,
    tag: u64,
    reply_to: &'a ReplyTo,
    reply: Envelope,
) -> BoxFuture<'a, Result<Answered, Error>> {
    Box::pin(async move {
        let confirm = Confirm::for_reply(reply_to);
        let answered = Answered::of(acker.publish(tag, reply_to.address(), reply, confirm).await)?;
        if let Err(error) = acker.settle(tag, Outcome::Ack).await {
            tracing::warn!(%error, "could not settle a delivery; the broker redelivers it");
        }
        Ok(answered)
    })
}

/// Settles and answers the deliveries of one consumer; implemented by transports. A delivery's reply path is
/// its acker's: replies and retries go out on the link the delivery came on, where the transport has one.
pub trait Acker: Send + Sync + fmt::Debug {
    /// Settles the delivery `tag` with `outcome`.
    fn settle(&self, tag: u64, outcome: Outcome) -> BoxFuture<'_, Result<(), Error>>;

    /// Publishes `envelope` to `queue` on behalf of the delivery `tag` (its reply, or a copy of it), confirmed
    /// as `confirm` asks, and fenced by that delivery where the transport can: over the connection or channel
    /// the delivery came on, so that a worker whose delivery the broker took back (the worker paused past its
    /// heartbeats, or disconnected, and the request went to another worker) cannot answer for it. The broker
    /// closed that link before redelivering, so it never reads such a message; when the transport already
    /// knows the link is gone, it returns [`Error::DeliveryLost`] without sending. Where it cannot fence, a
    /// stale reply reaches the caller after the first one, which drops and counts it.
    ///
    /// # Errors
    /// [`Error::DeliveryLost`] for a delivery taken back; otherwise as [`Transport::publish`].
    fn publish<'a>(
        &'a self,
        tag: u64,
        queue: &'a str,
        envelope: Envelope,
        confirm: Confirm,
    ) -> BoxFuture<'a, Result<(), Error>>;

    /// Publishes the reply to the request delivered as `tag` and acks the delivery: the end of a request's
    /// handling. A reply address that is gone (the caller with it) does not stop the ack: the call is
    /// answered as far as anyone can be.
    ///
    /// The default is [`reply_then_ack`]; a transport that can do both in one step (one frame to the broker,
    /// one turn of the embedded broker's lock) overrides it.
    ///
    /// # Errors
    /// [`Error::DeliveryLost`] for a delivery taken back; other publishing errors, after which the delivery
    /// is still held (for the worker to requeue).
    fn answer<'a>(
        &'a self,
        tag: u64,
        reply_to: &'a ReplyTo,
        reply: Envelope,
    ) -> BoxFuture<'a, Result<Answered, Error>> {
        reply_then_ack(self, tag, reply_to, reply)
    }

    /// Publishes `envelope` to `queue` in place of the delivery `tag`, confirmed by the broker, and acks the
    /// delivery: a worker's retry of a request, fenced as [`Acker::publish`], so that the next attempt is not
    /// made for a request another worker runs.
    ///
    /// The default is [`Acker::publish`], then the ack; a transport that can do both in one step overrides it.
    ///
    /// # Errors
    /// [`Error::DeliveryLost`] for a delivery taken back; publishing errors, after which the delivery is
    /// still held (for the worker to requeue).
    fn republish<'a>(&'a self, tag: u64, queue: &'a str, envelope: Envelope) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.publish(tag, queue, envelope, Confirm::Broker).await?;
            self.settle(tag, Outcome::Ack).await
        })
    }

    /// A future that completes if the caller cancels the call of delivery `tag` while it is held (see
    /// [`Transport::cancel`]), and never otherwise; `None` where the transport cannot tell. It registers
    /// nothing until first polled.
    fn cancelled(&self, tag: u64) -> Option<BoxFuture<'static, ()>> {
        let _ = tag;
        None
    }

    /// Whether the broker has taken delivery `tag` back, or may have: the link it came on is gone, or was
    /// silent for longer than the broker waits before it hands a link's deliveries to other consumers (this
    /// process was paused or starved past its heartbeats). A worker drops such a delivery unrun, since
    /// another worker may be running it. Asked once per delivery, just before its handler starts; `false` (the
    /// default) where the transport cannot tell.
    fn revoked(&self, tag: u64) -> bool {
        let _ = tag;
        false
    }
}

/// The cancellation signals of one consumer's deliveries, for transports whose broker tells a consumer that
/// the call of a delivery it holds was cancelled: the transport calls [`Cancellations::cancel`] when the
/// broker says so and [`Cancellations::forget`] when the delivery is settled, and its [`Acker::cancelled`]
/// returns [`Cancellations::watch`].
///
/// Bounded: a signal nobody waits for yet is kept until its delivery is settled, and at most
/// [`Cancellations::MAX_UNCLAIMED`] of them (a signal racing its delivery's settle could otherwise stay).
#[derive(Debug, Default)]
pub struct Cancellations {
    marks: Mutex<HashMap<u64, Mark>>,
    /// `marks.len()`, read without the lock: settles skip it while nothing is marked.
    len: AtomicUsize,
}

#[derive(Debug)]
enum Mark {
    /// Cancelled before anyone waited.
    Cancelled,
    /// A handler waits.
    Waiting(oneshot::Sender<()>),
}

impl Cancellations {
    /// Signals that nobody waits for yet kept at most.
    pub const MAX_UNCLAIMED: usize = 65_536;

    /// An empty registry.
    pub fn new() -> Cancellations {
        Cancellations::default()
    }

    fn marks(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Mark>> {
        self.marks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The broker says the call of delivery `tag` was cancelled.
    pub fn cancel(&self, tag: u64) {
        let mut marks = self.marks();
        match marks.remove(&tag) {
            Some(Mark::Waiting(waiter)) => {
                let _ = waiter.send(());
            }
            Some(Mark::Cancelled) | None if marks.len() < Self::MAX_UNCLAIMED => {
                marks.insert(tag, Mark::Cancelled);
            }
            Some(Mark::Cancelled) | None => {}
        }
        self.len.store(marks.len(), Ordering::Relaxed);
    }

    /// Delivery `tag` was settled: its signal, if any, is dropped.
    pub fn forget(&self, tag: u64) {
        if self.len.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut marks = self.marks();
        marks.remove(&tag);
        self.len.store(marks.len(), Ordering::Relaxed);
    }

    /// Completes once delivery `tag`'s call is cancelled; never, if its delivery is settled first.
    pub fn watch(self: &Arc<Self>, tag: u64) -> BoxFuture<'static, ()> {
        let this = Arc::clone(self);
        Box::pin(async move {
            let receiver = {
                let mut marks = this.marks();
                if let Some(Mark::Cancelled) = marks.get(&tag) {
                    marks.remove(&tag);
                    this.len.store(marks.len(), Ordering::Relaxed);
                    return;
                }
                let (sender, receiver) = oneshot::channel();
                marks.insert(tag, Mark::Waiting(sender));
                this.len.store(marks.len(), Ordering::Relaxed);
                receiver
            };
            if receiver.await.is_err() {
                // Settled (or forgotten) without a cancel.
                std::future::pending::<()>().await;
            }
        })
    }
}

/// What an auto-acked delivery's handle cannot do.
const AUTO_ACKED: &str = "answering a delivery that was auto-acked";

/// The right to settle one delivery, and its reply path. Dropping it unsettled leaves the delivery unacked until
/// its consumer goes away, when it is redelivered.
#[derive(Debug)]
pub struct AckHandle {
    acker: Option<(Arc<dyn Acker>, u64)>,
}

impl AckHandle {
    /// A handle that settles `tag` through `acker`.
    pub fn new(acker: Arc<dyn Acker>, tag: u64) -> AckHandle {
        AckHandle { acker: Some((acker, tag)) }
    }

    /// A handle for an auto-acked delivery: settling it does nothing.
    pub fn auto() -> AckHandle {
        AckHandle { acker: None }
    }

    /// Settles the delivery with `outcome`.
    ///
    /// # Errors
    /// Whatever the transport reports; a delivery whose consumer is gone was already requeued.
    pub async fn settle(self, outcome: Outcome) -> Result<(), Error> {
        match self.acker {
            Some((acker, tag)) => acker.settle(tag, outcome).await,
            None => Ok(()),
        }
    }

    /// Whether the broker has taken the delivery back (see [`Acker::revoked`]); an auto-acked delivery never is.
    pub fn revoked(&self) -> bool {
        self.acker.as_ref().is_some_and(|(acker, tag)| acker.revoked(*tag))
    }

    /// Whether the delivery was acked as it was handed out ([`ConsumeOptions::auto_ack`]): it has no reply
    /// path, and settling it does nothing.
    pub fn is_auto(&self) -> bool {
        self.acker.is_none()
    }

    /// Publishes the reply to this delivery's request, fenced by the delivery where the transport can (see
    /// [`Acker::publish`]), without settling it.
    ///
    /// # Errors
    /// [`Error::DeliveryLost`] when the broker took the delivery back; [`Error::Unsupported`] for an auto-acked
    /// delivery, which has no reply path; otherwise as [`Transport::publish`], but that a reply address that is
    /// gone is [`Answered::Undeliverable`].
    pub fn reply<'a>(&'a self, reply_to: &'a ReplyTo, reply: Envelope) -> BoxFuture<'a, Result<Answered, Error>> {
        let Some((acker, tag)) = self.acker.as_ref() else { return answered(Err(Error::Unsupported(AUTO_ACKED))) };
        let published = acker.publish(*tag, reply_to.address(), reply, Confirm::for_reply(reply_to));
        Box::pin(async move { Answered::of(published.await) })
    }

    /// Publishes the reply to this delivery's request and acks it, in one step where the transport can (see
    /// [`Acker::answer`]). The handle is left as it was: after an error other than [`Error::DeliveryLost`] the
    /// delivery is still held, to be settled.
    ///
    /// # Errors
    /// As [`Acker::answer`]; [`Error::Unsupported`] for an auto-acked delivery, which has no reply path.
    pub fn answer<'a>(&'a self, reply_to: &'a ReplyTo, reply: Envelope) -> BoxFuture<'a, Result<Answered, Error>> {
        match &self.acker {
            Some((acker, tag)) => acker.answer(*tag, reply_to, reply),
            None => answered(Err(Error::Unsupported(AUTO_ACKED))),
        }
    }

    /// Publishes `envelope` to `queue` in place of this delivery and acks it, fenced where the transport can
    /// (see [`Acker::republish`]).
    ///
    /// # Errors
    /// [`Error::DeliveryLost`] when the broker took the delivery back; publishing errors, which leave the
    /// delivery held: the handle comes back with them, to be settled otherwise. [`Error::Unsupported`] for an
    /// auto-acked delivery, which has no reply path.
    pub async fn republish(self, queue: &str, envelope: Envelope) -> Result<(), (Error, AckHandle)> {
        let result = match &self.acker {
            Some((acker, tag)) => acker.republish(*tag, queue, envelope).await,
            None => Err(Error::Unsupported(AUTO_ACKED)),
        };
        match result {
            Ok(()) => Ok(()),
            Err(Error::DeliveryLost) => Err((Error::DeliveryLost, AckHandle::auto())),
            Err(error) => Err((error, self)),
        }
    }

    /// Acks the delivery.
    ///
    /// # Errors
    /// As [`AckHandle::settle`].
    pub async fn ack(self) -> Result<(), Error> {
        self.settle(Outcome::Ack).await
    }

    /// Requeues the delivery.
    ///
    /// # Errors
    /// As [`AckHandle::settle`].
    pub async fn requeue(self) -> Result<(), Error> {
        self.settle(Outcome::Requeue).await
    }

    /// Dead-letters the delivery.
    ///
    /// # Errors
    /// As [`AckHandle::settle`].
    pub async fn dead_letter(self) -> Result<(), Error> {
        self.settle(Outcome::DeadLetter).await
    }

    /// A future that completes if the caller cancels this delivery's call (see [`Acker::cancelled`]); `None`
    /// where the transport cannot tell, or for auto-acked deliveries.
    pub fn cancelled(&self) -> Option<BoxFuture<'static, ()>> {
        self.acker.as_ref().and_then(|(acker, tag)| acker.cancelled(*tag))
    }

    /// Hands the delivery back unprocessed ([`Outcome::Release`]).
    ///
    /// # Errors
    /// As [`AckHandle::settle`].
    pub async fn release(self) -> Result<(), Error> {
        self.settle(Outcome::Release).await
    }
}

/// A transport's hold on one consumer. Dropping it cancels the consumer: its unacked deliveries are redelivered.
pub trait ConsumerControl: Send + Sync {
    /// Stops new deliveries to the consumer; the deliveries it holds stay settleable.
    fn pause(&self);

    /// Hands every later delivery to `sink`, called on the transport's own task as it reads them, instead of
    /// queueing them for the consumer's stream; returns `false` where the transport cannot. The stream still
    /// ends when the consumer does. See [`Consumer::direct`].
    fn direct(&self, sink: DeliverySink) -> bool {
        let _ = sink;
        false
    }
}

/// Takes deliveries as a transport reads them ([`Consumer::direct`]). It runs on the transport's task, maybe
/// under its locks: it must not block, and should be quick.
pub type DeliverySink = Arc<dyn Fn(Delivery) + Send + Sync>;

/// One message handed to a consumer.
#[derive(Debug)]
pub struct Delivery {
    /// The message, shared: a delivery moves through the consumer, the server and the handler's context as a
    /// pointer, and an in-process broker hands out the envelope it keeps for redelivery without copying it.
    pub envelope: Arc<Envelope>,
    /// How many times it has been delivered, this time included (1 on the first delivery).
    pub delivery_count: u32,
    /// How long the message waited between its publish and this delivery, as far as the transport can tell
    /// (the broker's own count, or the sender's clock against ours; zero where it cannot tell). The
    /// [`Consumer`] takes it off the envelope's `deadline_ms` and sets it to zero as the delivery leaves it.
    pub queued: Duration,
    /// When the transport handed it out: the envelope's `deadline_ms` counts from here.
    pub received_at: Instant,
    /// Settles it.
    pub handle: AckHandle,
}

impl Delivery {
    /// What remains of the message's time budget, in milliseconds: its `deadline_ms` less the time it was
    /// queued. `None`: it has no deadline; `Some(0)`: the budget ran out while it was queued.
    pub fn remaining_ms(&self) -> Option<u64> {
        remaining_ms(self.envelope.deadline_ms, self.queued)
    }

    /// Whether the budget ran out while the message was queued: the worker answers such a delivery with status
    /// 4 (deadline exceeded) and does not run it.
    pub fn expired(&self) -> bool {
        ran_out(self.envelope.deadline_ms, self.queued)
    }

    /// The time queued, taken off the deadline: what a delivery looks like once it leaves its consumer.
    fn dequeued(mut self) -> Delivery {
        if !self.queued.is_zero() {
            let remaining = self.remaining_ms();
            // Under a millisecond queued leaves the budget as it was: the envelope, perhaps shared, is not copied.
            if remaining != self.envelope.deadline_ms {
                Arc::make_mut(&mut self.envelope).deadline_ms = remaining;
            }
            self.queued = Duration::ZERO;
        }
        self
    }
}

/// What remains of a budget of `deadline_ms` after `queued`, in milliseconds (see [`Delivery::remaining_ms`]).
pub fn remaining_ms(deadline_ms: Option<u64>, queued: Duration) -> Option<u64> {
    let queued = u64::try_from(queued.as_millis()).unwrap_or(u64::MAX);
    deadline_ms.map(|budget| budget.saturating_sub(queued))
}

/// Whether a budget of `deadline_ms` ran out in `queued` (see [`Delivery::expired`]), for a transport that
/// decides before it makes the delivery.
pub fn ran_out(deadline_ms: Option<u64>, queued: Duration) -> bool {
    remaining_ms(deadline_ms, queued) == Some(0)
}

/// A stream of deliveries from one queue or subscriber group. Dropping it cancels the consumer: its unacked
/// deliveries are redelivered.
pub struct Consumer {
    stream: BoxStream<'static, Delivery>,
    control: Option<Box<dyn ConsumerControl>>,
}

impl Consumer {
    /// A consumer reading `stream`; `control` is dropped with it (transports cancel the consumer in its `Drop`).
    pub fn new(stream: BoxStream<'static, Delivery>, control: Option<Box<dyn ConsumerControl>>) -> Consumer {
        Consumer { stream, control }
    }

    /// A consumer reading the deliveries sent to `receiver` (a transport's task sends them as it reads them).
    pub fn from_channel(
        receiver: tokio::sync::mpsc::UnboundedReceiver<Delivery>,
        control: Option<Box<dyn ConsumerControl>>,
    ) -> Consumer {
        Consumer::new(Box::pin(UnboundedStream(receiver)), control)
    }

    /// Stops new deliveries; those already handed out stay settleable. Used by a server that shuts down.
    pub fn pause(&self) {
        if let Some(control) = &self.control {
            control.pause();
        }
    }

    /// Hands every delivery from now on to `sink` as the transport reads it, where the transport can; returns
    /// whether it does. This saves a task hop per delivery (a client's inbox uses it for replies). The stream
    /// then yields nothing more, and ends when the consumer does.
    pub fn direct(&mut self, sink: DeliverySink) -> bool {
        let Some(control) = &self.control else { return false };
        let outer = Arc::clone(&sink);
        let dequeue: DeliverySink = Arc::new(move |delivery: Delivery| outer(delivery.dequeued()));
        if !control.direct(dequeue) {
            return false;
        }
        // Deliveries queued before the switch.
        while let Some(delivery) = self.try_next() {
            sink(delivery);
        }
        true
    }

    /// The next delivery if one is ready now, without waiting.
    pub fn try_next(&mut self) -> Option<Delivery> {
        self.stream.next().now_or_never().flatten().map(Delivery::dequeued)
    }

    /// The next delivery, or `None` when the consumer was closed by the transport.
    ///
    /// # Cancel safety
    /// Cancel-safe: a delivery is either returned or stays in the consumer.
    pub async fn next(&mut self) -> Option<Delivery> {
        self.stream.next().await.map(Delivery::dequeued)
    }
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer").finish_non_exhaustive()
    }
}

/// An unbounded receiver as a stream.
struct UnboundedStream<T>(tokio::sync::mpsc::UnboundedReceiver<T>);

impl<T> futures::Stream for UnboundedStream<T> {
    type Item = T;

    fn poll_next(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}

/// A client's private reply address and the consumer of the replies sent to it.
#[derive(Debug)]
pub struct Inbox {
    /// The address to put in `reply_to`.
    pub address: String,
    /// The replies (auto-acked).
    pub consumer: Consumer,
    /// Counts the times replies on their way to this inbox may have been lost: the transport bumps it when
    /// the connection under the inbox drops (the broker deletes a connection's inbox with it). A client fails
    /// the calls that were waiting at that moment with [`Error::ReplyLost`]. `None`: replies are never lost.
    pub losses: Option<tokio::sync::watch::Receiver<u64>>,
}

/// A queue's counters, for operators and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueStats {
    /// Messages waiting to be delivered.
    pub ready: usize,
    /// Messages published with a delay that is not over yet (where the transport has delayed delivery).
    pub delayed: usize,
    /// Messages delivered and not yet settled.
    pub unacked: usize,
    /// Consumers attached.
    pub consumers: usize,
    /// Messages published.
    pub published: u64,
    /// Messages handed to consumers, redeliveries included (where the transport counts them: the embedded
    /// broker and our broker's own figures; 0 where it does not, our broker's protocol included).
    pub delivered: u64,
    /// Messages acked.
    pub acked: u64,
    /// Messages moved to the dead-letter queue.
    pub dead_lettered: u64,
    /// Messages dropped because their time budget ran out while queued.
    pub expired: u64,
    /// Publishes refused because the queue was full.
    pub rejected: u64,
    /// Messages removed because their call was cancelled before a worker took them.
    pub cancelled: u64,
    /// Publishes taken once because the queue had taken a message with the same id within its dedup window (a
    /// publisher's retry).
    pub deduplicated: u64,
}

impl QueueStats {
    /// Stats with every counter at zero.
    pub fn new() -> QueueStats {
        QueueStats::default()
    }
}

/// A message broker, as the framework sees it. Object-safe: the framework holds an `Arc<dyn Transport>`.
pub trait Transport: Send + Sync + fmt::Debug + 'static {
    /// What this transport can do.
    fn capabilities(&self) -> Capabilities;

    /// The messaging system, as OpenTelemetry's `messaging.system` names it (`rabbitmq`, `kafka`, `activemq`,
    /// `nats`, `zeromq`...): the spans of calls over this transport carry it (see [`trace`](crate::trace)).
    /// The default, `mqrpc`, is the framework's own broker, embedded or served.
    fn system(&self) -> &'static str {
        "mqrpc"
    }

    /// Makes sure a queue exists. Declaring an existing queue with default options succeeds whatever its
    /// options; declaring it with other options than it has is an error.
    fn declare_queue<'a>(&'a self, queue: &'a str, options: &'a QueueOptions) -> BoxFuture<'a, Result<(), Error>>;

    /// Puts `envelope` on `queue` (a service queue, an inbox or a callback queue); the future resolves once the
    /// publish is confirmed as far as `confirm` asks.
    ///
    /// # Errors
    /// [`Error::NoRoute`] when the queue does not exist, [`Error::QueueFull`] when it is at its maximum length
    /// (for the publishes that are confirmed).
    fn publish<'a>(&'a self, queue: &'a str, envelope: Envelope, confirm: Confirm) -> BoxFuture<'a, Result<(), Error>>;

    /// Puts a copy of `envelope` in every subscriber group of `topic`. A topic without groups drops it.
    fn publish_topic<'a>(&'a self, topic: &'a str, envelope: Envelope) -> BoxFuture<'a, Result<(), Error>>;

    /// Starts a consumer on `queue`; consumers of one queue compete for its messages.
    fn consume<'a>(&'a self, queue: &'a str, options: ConsumeOptions) -> BoxFuture<'a, Result<Consumer, Error>>;

    /// Joins subscriber group `group` of `topic`, creating the group if needed. The group keeps receiving
    /// copies while it has no consumer.
    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        options: ConsumeOptions,
    ) -> BoxFuture<'a, Result<Consumer, Error>>;

    /// Opens a private reply address; it goes away with its consumer.
    fn open_inbox(&self) -> BoxFuture<'_, Result<Inbox, Error>>;

    /// Subscribes to `topic` privately: the consumer (auto-acked) receives a copy of everything published to
    /// the topic while it exists, and nothing of it stays behind once it is dropped (no queue, group or
    /// offset left on the broker), so a process may open one for each run. Workers answer pings
    /// ([`health`](crate::health)) through one. The default is [`Error::Unsupported`].
    ///
    /// # Errors
    /// [`Error::Unsupported`]; the transport's errors for subscribing.
    fn subscribe_private<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Consumer, Error>> {
        let _ = topic;
        Box::pin(std::future::ready(Err(Error::Unsupported("private subscriptions"))))
    }

    /// Tells the broker's own discovery tools of a running server, for as long as the returned guard is held
    /// (on NATS, the service API that `nats micro` reads). Servers call it as they start. The default announces
    /// nothing (`Ok(None)`): pings ([`health`](crate::health)) work without it.
    ///
    /// # Errors
    /// The transport's errors for subscribing; the server goes on without the announcement.
    fn announce(
        &self,
        announcement: crate::health::Announcement,
    ) -> BoxFuture<'_, Result<Option<crate::health::Announced>, Error>> {
        let _ = announcement;
        Box::pin(std::future::ready(Ok(None)))
    }

    /// The counters of `queue` (see [`Capabilities::queue_stats`]). The default is [`Error::Unsupported`].
    ///
    /// # Errors
    /// [`Error::NoRoute`] for a queue that does not exist; [`Error::Unsupported`].
    fn queue_stats<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<QueueStats, Error>> {
        let _ = queue;
        Box::pin(std::future::ready(Err(Error::Unsupported("queue stats"))))
    }

    /// Deletes `queue` with the messages it holds (its stream, where the broker keeps one); its consumers end.
    /// A queue that does not exist is deleted already. For operators and tests that remove a service's queues
    /// and dead-letter queues from a shared broker; a worker declares its queue again when it starts.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an inbox's name; [`Error::Unsupported`] (the default).
    fn delete_queue<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        let _ = queue;
        Box::pin(std::future::ready(Err(Error::Unsupported("deleting queues"))))
    }

    /// Waits until the broker has taken every settle and unconfirmed publish this transport sent so far (they
    /// have no answer of their own). A server calls it at the end of a graceful shutdown, so that a process
    /// exiting right after does not leave the broker to redeliver work that was done. The default does nothing,
    /// for transports whose settles complete only once the broker has them.
    ///
    /// # Errors
    /// [`Error::Disconnected`] or [`Error::Timeout`]: the broker may not have them; it redelivers what it
    /// did not see settled.
    fn flush(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(std::future::ready(Ok(())))
    }

    /// Cancels the call `correlation_id` published to `queue` (see [`Capabilities::cancel`]): its request is
    /// removed if no worker took it yet, no copy of it is queued again, and a worker holding it is signalled
    /// ([`Acker::cancelled`]). Returns once the cancel is on its way; it has no answer. The default, for
    /// brokers that cannot remove one message from a queue, is [`Error::Unsupported`]: there, a cancelled
    /// call's request still runs unless its deadline passes first, and its reply is dropped as late.
    ///
    /// # Errors
    /// [`Error::Unsupported`], [`Error::Disconnected`].
    fn cancel<'a>(&'a self, queue: &'a str, correlation_id: Uuid) -> BoxFuture<'a, Result<(), Error>> {
        let _ = (queue, correlation_id);
        Box::pin(std::future::ready(Err(Error::Unsupported("cancelling a queued call"))))
    }
}

impl<T: Transport + ?Sized> Transport for Arc<T> {
    fn capabilities(&self) -> Capabilities {
        (**self).capabilities()
    }

    fn system(&self) -> &'static str {
        (**self).system()
    }

    fn declare_queue<'a>(&'a self, queue: &'a str, options: &'a QueueOptions) -> BoxFuture<'a, Result<(), Error>> {
        (**self).declare_queue(queue, options)
    }

    fn publish<'a>(&'a self, queue: &'a str, envelope: Envelope, confirm: Confirm) -> BoxFuture<'a, Result<(), Error>> {
        (**self).publish(queue, envelope, confirm)
    }

    fn publish_topic<'a>(&'a self, topic: &'a str, envelope: Envelope) -> BoxFuture<'a, Result<(), Error>> {
        (**self).publish_topic(topic, envelope)
    }

    fn consume<'a>(&'a self, queue: &'a str, options: ConsumeOptions) -> BoxFuture<'a, Result<Consumer, Error>> {
        (**self).consume(queue, options)
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        options: ConsumeOptions,
    ) -> BoxFuture<'a, Result<Consumer, Error>> {
        (**self).subscribe(topic, group, options)
    }

    fn open_inbox(&self) -> BoxFuture<'_, Result<Inbox, Error>> {
        (**self).open_inbox()
    }

    fn subscribe_private<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Consumer, Error>> {
        (**self).subscribe_private(topic)
    }

    // Every method forwards, those with a default included: the default would silently replace the
    // transport's own.
    fn announce(
        &self,
        announcement: crate::health::Announcement,
    ) -> BoxFuture<'_, Result<Option<crate::health::Announced>, Error>> {
        (**self).announce(announcement)
    }

    fn queue_stats<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<QueueStats, Error>> {
        (**self).queue_stats(queue)
    }

    fn delete_queue<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        (**self).delete_queue(queue)
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), Error>> {
        (**self).flush()
    }

    fn cancel<'a>(&'a self, queue: &'a str, correlation_id: Uuid) -> BoxFuture<'a, Result<(), Error>> {
        (**self).cancel(queue, correlation_id)
    }
}

/// Turns a transport into the shared form the framework holds.
pub(crate) fn shared(transport: impl Transport) -> Arc<dyn Transport> {
    Arc::new(transport)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_time_queued_comes_off_the_deadline_once_as_a_delivery_leaves_its_consumer() {
        let delivery = |deadline_ms: Option<u64>, queued_ms: u64| {
            let mut envelope = Envelope::new(crate::Kind::Request);
            envelope.deadline_ms = deadline_ms;
            Delivery {
                envelope: Arc::new(envelope),
                delivery_count: 1,
                queued: Duration::from_millis(queued_ms),
                received_at: Instant::now(),
                handle: AckHandle::auto(),
            }
        };
        assert!(delivery(Some(400), 400).expired());
        assert!(!delivery(Some(401), 400).expired());
        assert!(!delivery(None, 400).expired());
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        let mut consumer = Consumer::from_channel(receiver, None);
        for sent in [delivery(Some(1_000), 400), delivery(None, 400), delivery(Some(1_000), 0)] {
            sender.send(sent).expect("the consumer is open");
        }
        let taken: Vec<_> = std::iter::from_fn(|| consumer.try_next()).collect();
        let left: Vec<_> = taken.iter().map(|delivery| (delivery.envelope.deadline_ms, delivery.queued)).collect();
        assert_eq!(left, [(Some(600), Duration::ZERO), (None, Duration::ZERO), (Some(1_000), Duration::ZERO)]);
        // Taken off once: the remaining budget of a delivery that left the consumer is its deadline.
        assert_eq!(taken[0].remaining_ms(), Some(600));
    }

    #[test]
    fn a_shared_envelope_is_copied_only_when_its_deadline_changes() {
        let mut envelope = Envelope::new(crate::Kind::Request);
        envelope.deadline_ms = Some(1_000);
        let kept = Arc::new(envelope);
        let delivery = |queued| Delivery {
            envelope: Arc::clone(&kept),
            delivery_count: 1,
            queued,
            received_at: Instant::now(),
            handle: AckHandle::auto(),
        };
        // Under a millisecond queued: the budget in whole milliseconds is the same, and the envelope stays shared.
        let under = delivery(Duration::from_micros(400)).dequeued();
        assert!(Arc::ptr_eq(&under.envelope, &kept));
        assert_eq!(under.queued, Duration::ZERO);
        // Longer: the delivery's own copy carries what is left; the kept one (a broker's, for redelivery) does not.
        let longer = delivery(Duration::from_millis(250)).dequeued();
        assert_eq!(longer.envelope.deadline_ms, Some(750));
        assert_eq!(kept.deadline_ms, Some(1_000));
    }

    #[test]
    fn finished_successes_are_zero_sized_and_failures_carry_their_error() {
        // A boxed zero-sized future takes no allocation.
        assert_eq!(std::mem::size_of_val(&*finished(Ok(()))), 0);
        assert_eq!(std::mem::size_of_val(&*answered(Ok(Answered::Sent))), 0);
        assert!(matches!(finished(Ok(())).now_or_never(), Some(Ok(()))));
        assert!(matches!(answered(Ok(Answered::Sent)).now_or_never(), Some(Ok(Answered::Sent))));
        assert!(matches!(answered(Ok(Answered::Undeliverable)).now_or_never(), Some(Ok(Answered::Undeliverable))));
        assert!(matches!(finished(Err(Error::Disconnected)).now_or_never(), Some(Err(Error::Disconnected))));
        assert!(matches!(answered(Err(Error::DeliveryLost)).now_or_never(), Some(Err(Error::DeliveryLost))));
    }
}
