//! Consumers: each on a connection of its own, so that the messages it holds go back to the queue when it goes
//! (a server gives back what a connection left unacknowledged when it closes, and RabbitMQ does not at an
//! UNSUBSCRIBE); and inboxes, on the transport's main connection, where the servers deliver the replies to
//! the temporary queues named in the requests that connection sent.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use rpc_core::transport::{
    AckHandle, Acker, BoxFuture, Cancellations, Confirm, Consumer, ConsumerControl, Delivery, DeliverySink, Outcome,
    finished,
};
use rpc_core::{Code, ConsumeOptions, Envelope, Error, Kind, Status};
use tokio::sync::{mpsc, watch};

use super::codec::{Command, Frame};
use super::connection::{Connection, Subscription};
use super::mapping::{self, DELIVERY_COUNT, Outgoing, SCHEDULED_JOB};
use super::{Flavour, Inner, scheduler};
use crate::adapter::{Counters, headers};

/// ActiveMQ's prefetch for a consumer that asked for no limit (its own default).
const UNLIMITED_PREFETCH: u32 = 1_000;
/// Cancelled calls a consumer did not hold when it heard of them, remembered (to drop their requests unrun if
/// they come later) up to this many.
const EARLY_CANCELS_MAX: usize = 1_024;

/// Where a consumer reads.
pub(super) struct Target {
    /// The queue's name, for its counters and its dead-letter queue.
    pub(super) queue: String,
    /// The destination subscribed to.
    pub(super) destination: String,
    /// Further SUBSCRIBE headers (a subscriber group's queue on RabbitMQ).
    pub(super) headers: Vec<(String, String)>,
    /// Deliveries after which a message goes to the dead-letter queue unrun.
    pub(super) max_deliveries: Option<u32>,
    /// The topic where the queue's cancelled calls are told (a service queue on ActiveMQ).
    pub(super) notices: Option<String>,
    /// A client's inbox, whose messages are replies.
    pub(super) inbox: bool,
}

/// One delivery held until it is settled.
struct Held {
    /// The connection it came on: settles and replies go there, and fail once it is gone.
    connection: Connection,
    /// Its `ack` header.
    ack: String,
    /// The frame as delivered, for the copies a requeue or a dead letter sends.
    frame: Frame,
    delivery_count: u32,
}

/// What a consumer's task and its acker share.
pub(super) struct State {
    /// The transport, kept while its consumers live (a consumer may outlive the handle it was made with).
    inner: Arc<Inner>,
    target: Target,
    options: ConsumeOptions,
    counters: Arc<Counters>,
    held: Mutex<HashMap<u64, Held>>,
    next_tag: AtomicU64,
    paused: AtomicBool,
    sink: Mutex<Option<DeliverySink>>,
    sender: mpsc::UnboundedSender<Delivery>,
    /// The consumer's current connection, for [`Transport::flush`](rpc_core::Transport::flush) and its end.
    connection: watch::Sender<Option<Connection>>,
    /// The signals of cancelled calls whose requests are held.
    cancellations: Arc<Cancellations>,
    /// Cancelled calls whose requests were not held when the notice came.
    early: Mutex<EarlyCancels>,
}

/// Correlation ids of cancelled calls, the oldest forgotten past [`EARLY_CANCELS_MAX`].
#[derive(Default)]
struct EarlyCancels {
    ids: HashSet<String>,
    order: VecDeque<String>,
}

impl EarlyCancels {
    fn insert(&mut self, id: &str) {
        if self.ids.contains(id) {
            return;
        }
        if self.order.len() >= EARLY_CANCELS_MAX
            && let Some(oldest) = self.order.pop_front()
        {
            self.ids.remove(&oldest);
        }
        self.ids.insert(id.to_owned());
        self.order.push_back(id.to_owned());
    }

    /// Whether `id` is here; it is forgotten if so.
    fn take(&mut self, id: &str) -> bool {
        if !self.ids.remove(id) {
            return false;
        }
        self.order.retain(|kept| kept != id);
        true
    }
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StompConsumer").field("destination", &self.target.destination).finish_non_exhaustive()
    }
}

impl State {
    fn new(
        inner: &Arc<Inner>,
        target: Target,
        options: ConsumeOptions,
        sender: mpsc::UnboundedSender<Delivery>,
    ) -> Arc<State> {
        Arc::new(State {
            inner: Arc::clone(inner),
            counters: inner.counters.of(&target.queue),
            target,
            options,
            held: Mutex::new(HashMap::new()),
            next_tag: AtomicU64::new(1),
            paused: AtomicBool::new(false),
            sink: Mutex::new(None),
            sender,
            connection: watch::Sender::new(None),
            cancellations: Arc::new(Cancellations::new()),
            early: Mutex::new(EarlyCancels::default()),
        })
    }

    fn held(&self) -> MutexGuard<'_, HashMap<u64, Held>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The SUBSCRIBE headers: the ack mode's, the prefetch in each server's own header, and the target's.
    fn subscribe_headers(&self, flavour: Flavour) -> Vec<(String, String)> {
        let mut headers = self.target.headers.clone();
        let prefetch = match self.options.prefetch {
            0 => UNLIMITED_PREFETCH,
            prefetch => prefetch,
        };
        match flavour {
            Flavour::RabbitMq if self.options.prefetch > 0 => {
                headers.push(("prefetch-count".to_owned(), prefetch.to_string()));
            }
            Flavour::RabbitMq => {}
            Flavour::ActiveMq | Flavour::Other => {
                headers.push(("activemq.prefetchSize".to_owned(), prefetch.to_string()));
            }
        }
        headers
    }

    /// Hands out one MESSAGE frame of `connection`, or deals with it here: one that ran out of deliveries goes to
    /// the dead-letter queue unrun.
    async fn take(self: &Arc<Self>, connection: &Connection, frame: Frame, auto_ack: bool) {
        let (envelope, delivery_count, queued) = mapping::from_frame(&frame);
        let received_at = Instant::now();
        if let Some(size) = frame.oversized() {
            let limit = self.inner.options.connect.limits.max_frame_bytes;
            let status = Status::new(
                Code::ResourceExhausted,
                format!("a message body of {size} bytes is past this reader's limit of {limit}"),
            );
            tracing::warn!(destination = %self.target.destination, size, limit, "a message past the size limit");
            if self.target.inbox {
                // A reply the client cannot read: its call fails with the reason rather than waiting it out.
                let envelope = envelope.reply(Err(status));
                let handle = AckHandle::auto();
                self.hand_out(Delivery { envelope: Arc::new(envelope), delivery_count, queued, received_at, handle });
            } else if let Some(ack) = frame.get("ack").filter(|_| !auto_ack) {
                self.refuse(connection, &envelope, ack, status).await;
            }
            // Taken by the server already (auto ack): nothing to settle.
            return;
        }
        if auto_ack {
            let mut envelope = envelope;
            if self.target.inbox {
                // What comes to an inbox is a reply, which says so only by arriving there.
                envelope.kind = Kind::Reply;
            }
            let handle = AckHandle::auto();
            self.hand_out(Delivery { envelope: Arc::new(envelope), delivery_count, queued, received_at, handle });
            return;
        }
        let Some(ack) = frame.get("ack").map(str::to_owned) else {
            tracing::warn!(destination = %self.target.destination, "a message without an ack header; left unacked");
            return;
        };
        if self.paused.load(Ordering::Acquire) {
            // Not handed out: it goes back to the queue when the consumer ends.
            return;
        }
        if let Some(correlation) = frame.get("correlation-id").filter(|id| self.cancelled_early(id)) {
            // Its call was cancelled before it came: dropped unrun, and counted as cancelled.
            let marker = scheduler::marker(&self.target.queue, correlation);
            let ack_frame = Frame::new(Command::Ack).header("id", &ack);
            if let Err(error) = connection.transaction([marker, ack_frame]).await {
                tracing::debug!(%error, "could not drop a cancelled call's request; the server redelivers it");
            }
            return;
        }
        if self.target.max_deliveries.is_some_and(|max| delivery_count > max) {
            let inner = &self.inner;
            let dead_letters = rpc_core::naming::dead_letter_queue(&self.target.queue);
            let copy = copy_of(&frame, &inner.destination(&dead_letters), delivery_count - 1);
            let ack_frame = Frame::new(Command::Ack).header("id", &ack);
            let moved = async {
                inner.make(&dead_letters).await?;
                connection.transaction([copy, ack_frame]).await
            };
            match moved.await {
                Ok(()) => Counters::bump(&self.counters.dead_lettered),
                Err(error) => tracing::warn!(%error, "could not dead-letter a message; the server redelivers it"),
            }
            return;
        }
        // One whose budget ran out while queued is handed out all the same: the worker answers it with status 4.
        let delivery =
            Delivery { envelope: Arc::new(envelope), delivery_count, queued, received_at, handle: AckHandle::auto() };
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        self.held().insert(tag, Held { connection: connection.clone(), ack, frame, delivery_count });
        self.counters.unacked.fetch_add(1, Ordering::Relaxed);
        let acker: Arc<dyn Acker> = Arc::new(StompAcker(Arc::clone(self)));
        self.hand_out(Delivery { handle: AckHandle::new(acker, tag), ..delivery });
    }

    /// Acks a message that cannot be handled and answers its caller, if it has one, with `status`, in one
    /// transaction: it is not delivered again.
    async fn refuse(&self, connection: &Connection, request: &Envelope, ack: &str, status: Status) {
        let mut frames = Vec::with_capacity(2);
        if let Some(reply_to) = request.reply_to.as_ref().filter(|_| request.kind == Kind::Request) {
            let reply = request.reply(Err(status));
            let (destination, send) = match self.outgoing(reply_to.address(), &reply) {
                Ok(outgoing) => outgoing,
                Err(error) => return tracing::warn!(%error, "could not answer a message it refused"),
            };
            match mapping::to_frame(&reply, &destination, send) {
                Ok(frame) => frames.push(frame),
                Err(error) => tracing::warn!(%error, "could not answer a message it refused"),
            }
        }
        frames.push(Frame::new(Command::Ack).header("id", ack));
        match connection.transaction(frames).await {
            Ok(()) => Counters::bump(&self.counters.rejected),
            Err(error) => tracing::warn!(%error, "could not refuse a message; the server delivers it again"),
        }
    }

    fn hand_out(&self, delivery: Delivery) {
        let sink = self.sink.lock().unwrap_or_else(PoisonError::into_inner).clone();
        match sink {
            Some(sink) => sink(delivery),
            None => {
                let _ = self.sender.send(delivery);
            }
        }
    }

    /// The delivery `tag`, taken out of the held ones: [`Error::DeliveryLost`] when its connection is gone (the
    /// server gave it back to the queue).
    fn take_held(&self, tag: u64) -> Result<Held, Error> {
        let held = self.held().remove(&tag).ok_or(Error::DeliveryLost)?;
        self.cancellations.forget(tag);
        self.counters.unacked.fetch_sub(1, Ordering::Relaxed);
        if held.connection.is_closed() { Err(Error::DeliveryLost) } else { Ok(held) }
    }

    /// The connection of the delivery `tag`, which stays held.
    fn connection_of(&self, tag: u64) -> Result<Connection, Error> {
        let held = self.held();
        let connection = &held.get(&tag).ok_or(Error::DeliveryLost)?.connection;
        if connection.is_closed() { Err(Error::DeliveryLost) } else { Ok(connection.clone()) }
    }

    /// Hears that the call `correlation` was cancelled: the delivery holding its request is signalled, or, if
    /// none does, the call is remembered for a request that comes later.
    fn cancelled(&self, correlation: &str) {
        let held = self
            .held()
            .iter()
            .find(|(_, held)| held.frame.get("correlation-id") == Some(correlation))
            .map(|(tag, _)| *tag);
        match held {
            Some(tag) => self.cancellations.cancel(tag),
            None => self.early.lock().unwrap_or_else(PoisonError::into_inner).insert(correlation),
        }
    }

    /// Whether the call `correlation` was cancelled before its request came (forgotten once asked).
    fn cancelled_early(&self, correlation: &str) -> bool {
        self.early.lock().unwrap_or_else(PoisonError::into_inner).take(correlation)
    }

    /// The destination of `queue` and how `envelope` is sent there.
    fn outgoing(&self, queue: &str, envelope: &Envelope) -> Result<(String, Outgoing), Error> {
        let destination = self.inner.destination(queue);
        let send = self.inner.send_options(envelope, &destination);
        Ok((destination, send))
    }
}

/// A copy of the delivered `frame` as a SEND to `destination`, saying it was delivered `delivery_count` times.
fn copy_of(frame: &Frame, destination: &str, delivery_count: u32) -> Frame {
    const SERVER_HEADERS: &[&str] = &[
        "destination",
        "message-id",
        "subscription",
        "ack",
        "redelivered",
        "content-length",
        "receipt",
        "transaction",
        "timestamp",
        "expires",
        SCHEDULED_JOB,
        DELIVERY_COUNT,
    ];
    let mut copy = Frame::new(Command::Send).header("destination", destination);
    for (name, value) in &frame.headers {
        if !SERVER_HEADERS.contains(&name.as_str()) {
            copy.headers.push((name.clone(), value.clone()));
        }
    }
    if let Some(service) = mapping::service_of_copy(frame, destination) {
        copy = copy.header(headers::SERVICE, service);
    }
    if delivery_count > 0 {
        copy = copy.header(DELIVERY_COUNT, &delivery_count.to_string());
    }
    // The copy is stamped anew by the server: the time the first was sent goes with it.
    if let (None, Some(taken)) = (frame.get(headers::SENT_AT_MS), frame.get("timestamp")) {
        copy = copy.header(headers::SENT_AT_MS, taken);
    }
    copy.body = frame.body.clone();
    copy
}

/// Settles and answers a consumer's deliveries over the connection each came on.
#[derive(Debug)]
struct StompAcker(Arc<State>);

impl StompAcker {
    /// Sends a copy of the delivery to `queue` and acks the delivery in one transaction, making the queue first
    /// if it is a dead-letter queue.
    fn move_to<'a>(&'a self, held: Held, queue: String, copy: Frame) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            if queue != self.0.target.queue {
                self.0.inner.make(&queue).await?;
            }
            let ack = Frame::new(Command::Ack).header("id", &held.ack);
            let result = held.connection.transaction([copy, ack]).await;
            result.map_err(|error| match error {
                Error::Disconnected => Error::DeliveryLost,
                other => other,
            })
        })
    }
}

impl Acker for StompAcker {
    fn settle(&self, tag: u64, outcome: Outcome) -> BoxFuture<'_, Result<(), Error>> {
        let state = &self.0;
        let held = match state.take_held(tag) {
            Ok(held) => held,
            Err(error) => return finished(Err(error)),
        };
        match outcome {
            Outcome::Ack => {
                let result = held.connection.ack(&held.ack);
                if result.is_ok() {
                    Counters::bump(&state.counters.acked);
                }
                finished(result.map_err(|_| Error::DeliveryLost))
            }
            // Not sent back now: the server gives it back when the consumer ends (its connection closes), first
            // in the queue. A NACK would dead-letter it on ActiveMQ.
            Outcome::Release => finished(Ok(())),
            Outcome::Requeue if state.target.max_deliveries.is_none_or(|max| held.delivery_count < max) => {
                let inner = &state.inner;
                let copy = copy_of(&held.frame, &inner.destination(&state.target.queue), held.delivery_count);
                self.move_to(held, state.target.queue.clone(), copy)
            }
            Outcome::Requeue | Outcome::DeadLetter => {
                let inner = &state.inner;
                let dead_letters = rpc_core::naming::dead_letter_queue(&state.target.queue);
                let copy = copy_of(&held.frame, &inner.destination(&dead_letters), held.delivery_count);
                let counters = Arc::clone(&state.counters);
                let moved = self.move_to(held, dead_letters, copy);
                Box::pin(async move {
                    moved.await?;
                    Counters::bump(&counters.dead_lettered);
                    Ok(())
                })
            }
        }
    }

    fn publish<'a>(
        &'a self,
        tag: u64,
        queue: &'a str,
        envelope: Envelope,
        confirm: Confirm,
    ) -> BoxFuture<'a, Result<(), Error>> {
        let prepared = self.0.connection_of(tag).and_then(|connection| {
            let (destination, send) = self.0.outgoing(queue, &envelope)?;
            Ok((connection, mapping::to_frame(&envelope, &destination, send)?))
        });
        let (connection, frame) = match prepared {
            Ok(prepared) => prepared,
            Err(error) => return finished(Err(error)),
        };
        match confirm {
            Confirm::Sent => finished(connection.send_unconfirmed(frame).map_err(|_| Error::DeliveryLost)),
            _ => Box::pin(async move { connection.send(frame).await }),
        }
    }

    fn republish<'a>(&'a self, tag: u64, queue: &'a str, envelope: Envelope) -> BoxFuture<'a, Result<(), Error>> {
        let prepared = self.0.outgoing(queue, &envelope).and_then(|(destination, send)| {
            let frame = mapping::to_frame(&envelope, &destination, send)?;
            Ok((self.0.take_held(tag)?, frame))
        });
        match prepared {
            Ok((held, frame)) => self.move_to(held, queue.to_owned(), frame),
            Err(error) => finished(Err(error)),
        }
    }

    fn revoked(&self, tag: u64) -> bool {
        self.0.connection_of(tag).is_err()
    }

    fn cancelled(&self, tag: u64) -> Option<BoxFuture<'static, ()>> {
        self.0.target.notices.as_ref().map(|_| self.0.cancellations.watch(tag))
    }
}

/// Stops a consumer when dropped: its task ends (an inbox's subscription, dropped with it, unsubscribes) and a
/// connection of its own is closed with a DISCONNECT, whose receipt [`Transport::flush`](rpc_core::Transport::flush)
/// waits for.
struct Control {
    state: Arc<State>,
    task: tokio::task::AbortHandle,
}

impl ConsumerControl for Control {
    fn pause(&self) {
        self.state.paused.store(true, Ordering::Release);
    }

    fn direct(&self, sink: DeliverySink) -> bool {
        *self.state.sink.lock().unwrap_or_else(PoisonError::into_inner) = Some(sink);
        true
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.task.abort();
        let connection = self.state.connection.send_replace(None);
        if let Some(connection) = connection {
            self.state.inner.closing(async move {
                let _ = connection.disconnect().await;
            });
        }
    }
}

/// A consumer's subscriptions on its connection: the queue's, and the topic of its cancelled calls.
struct Subscribed {
    messages: Subscription,
    notices: Option<Subscription>,
}

impl State {
    /// Connects and subscribes to the target (to its notices first, so that none is missed for a message
    /// delivered); the connection becomes the consumer's.
    async fn subscribe(&self) -> Result<Subscribed, Error> {
        let connection = self.inner.connect().await?;
        let notices = match &self.target.notices {
            Some(topic) => Some(connection.subscribe(topic, "auto", &[]).await?),
            None => None,
        };
        let headers = self.subscribe_headers(self.inner.flavour);
        let borrowed: Vec<(&str, &str)> = headers.iter().map(|(name, value)| (name.as_str(), value.as_str())).collect();
        // An auto-acked consumer is settled by the server as it sends: nothing it takes holds its prefetch.
        let ack = if self.options.auto_ack { "auto" } else { "client-individual" };
        let messages = connection.subscribe(&self.target.destination, ack, &borrowed).await?;
        self.connection.send_replace(Some(connection));
        Ok(Subscribed { messages, notices })
    }
}

/// Starts a consumer of `target` on a connection of its own.
pub(super) async fn start(inner: &Arc<Inner>, target: Target, options: ConsumeOptions) -> Result<Consumer, Error> {
    let (sender, receiver) = mpsc::unbounded_channel();
    let state = State::new(inner, target, options, sender);
    inner.register(&state);
    // The first subscription is made here, so that a consumer that cannot start says so.
    let subscription = state.subscribe().await?;
    let task = tokio::spawn(run(Arc::clone(&state), Some(subscription))).abort_handle();
    Ok(Consumer::from_channel(receiver, Some(Box::new(Control { state, task }))))
}

/// Reads the consumer's messages and notices; when its connection goes, connects again with backoff and
/// subscribes again.
async fn run(state: Arc<State>, mut subscription: Option<Subscribed>) {
    let mut attempt = 0u32;
    loop {
        let mut current = match subscription.take() {
            Some(current) => current,
            None => match state.subscribe().await {
                Ok(subscription) => {
                    attempt = 0;
                    subscription
                }
                Err(error) => {
                    tracing::debug!(%error, destination = %state.target.destination, "resubscribing failed");
                    let max = state.inner.options.max_backoff;
                    tokio::time::sleep(rpc_core::retry::reconnect_backoff(attempt, max)).await;
                    attempt = attempt.saturating_add(1);
                    continue;
                }
            },
        };
        let connection = current.messages.connection().clone();
        loop {
            let notice = async {
                match current.notices.as_mut() {
                    Some(notices) => notices.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                frame = current.messages.next() => match frame {
                    Some(frame) => state.take(&connection, frame, state.options.auto_ack).await,
                    None => break,
                },
                Some(notice) = notice => {
                    if let Some(correlation) = notice.get("correlation-id") {
                        state.cancelled(correlation);
                    }
                }
            }
        }
        tracing::debug!(destination = %state.target.destination, "a consumer's connection ended; reconnecting");
        state.connection.send_replace(None);
    }
}

/// Starts the consumer of an inbox at `address` on the transport's main connection: it subscribes there again
/// (or listens, on RabbitMQ) whenever the main connection is made again; [`Inner::losses`] counts the losses.
pub(super) async fn start_inbox(inner: &Arc<Inner>, address: String) -> Result<Consumer, Error> {
    let (sender, receiver) = mpsc::unbounded_channel();
    let target = Target {
        queue: address.clone(),
        destination: address,
        headers: Vec::new(),
        max_deliveries: None,
        notices: None,
        inbox: true,
    };
    let state = State::new(inner, target, ConsumeOptions::new().auto_ack(true), sender);
    let connection = inner.current()?;
    let first = listen(inner.flavour, &connection, &state.target.destination).await?;
    let mut main = inner.main.subscribe();
    main.mark_unchanged();
    let task = tokio::spawn(run_inbox(Arc::clone(&state), first, main)).abort_handle();
    // The main connection is the transport's: dropping the inbox leaves it open.
    Ok(Consumer::from_channel(receiver, Some(Box::new(Control { state, task }))))
}

async fn listen(flavour: Flavour, connection: &Connection, address: &str) -> Result<Subscription, Error> {
    match flavour {
        // RabbitMQ makes the temporary queue at the first SEND naming it, and takes no SUBSCRIBE to it.
        Flavour::RabbitMq => connection.listen(address),
        Flavour::ActiveMq | Flavour::Other => connection.subscribe(address, "auto", &[]).await,
    }
}

async fn run_inbox(state: Arc<State>, first: Subscription, mut main: watch::Receiver<Option<Connection>>) {
    let mut current = Some(first);
    loop {
        if let Some(mut subscription) = current.take() {
            let connection = subscription.connection().clone();
            while let Some(frame) = subscription.next().await {
                state.take(&connection, frame, true).await;
            }
        }
        // Wait for the next main connection.
        let connection = loop {
            if main.changed().await.is_err() {
                return;
            }
            let next = main.borrow_and_update().clone();
            if let Some(connection) = next.filter(|connection| !connection.is_closed()) {
                break connection;
            }
        };
        match listen(state.inner.flavour, &connection, &state.target.destination).await {
            Ok(subscription) => current = Some(subscription),
            Err(error) => tracing::debug!(%error, "could not open the inbox again"),
        }
    }
}

impl State {
    /// The consumer's connection now, if it has one.
    pub(super) fn connection(&self) -> Option<Connection> {
        self.connection.borrow().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_cancels_are_taken_once_and_bounded() {
        let mut early = EarlyCancels::default();
        early.insert("a");
        early.insert("a");
        assert!(early.take("a"));
        assert!(!early.take("a"), "taken once");
        for n in 0..=EARLY_CANCELS_MAX {
            early.insert(&n.to_string());
        }
        assert_eq!((early.ids.len(), early.order.len()), (EARLY_CANCELS_MAX, EARLY_CANCELS_MAX));
        assert!(!early.take("0"), "the oldest is forgotten");
        assert!(early.take(&EARLY_CANCELS_MAX.to_string()));
    }
}
