//! The serving side of a node: the ROUTER socket, the clients that said HELLO, the queues this node serves and
//! their consumers, and the acker that settles deliveries by telling the client that holds each request.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::wire::{self, Command};
use super::zmtp::{self, Outgoing, SocketType};
use super::{Inner, Queues, lock};
use bytes::Bytes;
use rpc_core::transport::{
    AckHandle, Acker, Answered, BoxFuture, Confirm, Consumer, ConsumerControl, Delivery, Outcome, finished,
    reply_then_ack,
};
use rpc_core::{ConsumeOptions, Envelope, Error, ReplyTo, naming};
use tokio::sync::mpsc::UnboundedSender;
use uuid::Uuid;

/// What a consumer with no prefetch limit counts as, in the window a worker announces.
const UNLIMITED: u32 = 1_024;

/// The ROUTER socket's tasks and what they share.
pub(super) struct Serving {
    /// Each connected client's sending side, by the routing id this node gave its connection.
    links: dashmap::DashMap<Bytes, Outgoing>,
    next_routing: AtomicU64,
    /// Heartbeats sent so far: a client is heard at a beat, and forgotten `liveness` beats later.
    beats: AtomicU64,
    state: Mutex<State>,
    /// Woken when a client says SEEN.
    seen: tokio::sync::Notify,
    next_tag: AtomicU64,
    /// The listener, until [`Serving::start`] takes it.
    listener: Mutex<Option<tokio::net::TcpListener>>,
}

#[derive(Default)]
struct State {
    version: u64,
    clients: HashMap<Bytes, Client>,
    queues: HashMap<String, Served>,
    next_slot: u64,
}

struct Client {
    node: Uuid,
    seen: u64,
    /// The beat at which it was last heard.
    heard: u64,
}

#[derive(Default)]
struct Served {
    slots: Vec<Slot>,
    backlog: VecDeque<Incoming>,
    turn: usize,
}

/// One consumer of a served queue.
struct Slot {
    id: u64,
    sink: UnboundedSender<Delivery>,
    acker: Arc<ZmqAcker>,
    prefetch: u32,
    unacked: u32,
    paused: bool,
}

/// A request received, not yet handed to a consumer.
struct Incoming {
    routing: Bytes,
    seq: u64,
    delivery_count: u32,
    queued: Duration,
    envelope: Envelope,
    raw: Bytes,
}

impl Served {
    /// The window one client gets: what the consumers that take deliveries prefetch.
    fn window(&self) -> u32 {
        self.slots
            .iter()
            .filter(|slot| !slot.paused)
            .map(|slot| if slot.prefetch == 0 { UNLIMITED } else { slot.prefetch })
            .fold(0u32, u32::saturating_add)
    }
}

/// Binds the ROUTER side at `endpoint` (`tcp://host:port`); [`Serving::start`] starts accepting.
pub(super) async fn bind(endpoint: &str) -> Result<(Serving, String), Error> {
    let address = endpoint
        .strip_prefix("tcp://")
        .ok_or_else(|| Error::InvalidArgument(format!("{endpoint}: a ZeroMQ endpoint is tcp://host:port")))?;
    let listener = tokio::net::TcpListener::bind(address).await.map_err(|error| Error::Transport(Box::new(error)))?;
    let bound = listener.local_addr().map_err(|error| Error::Transport(Box::new(error)))?;
    let serving = Serving {
        links: dashmap::DashMap::new(),
        next_routing: AtomicU64::new(0),
        beats: AtomicU64::new(0),
        state: Mutex::new(State::default()),
        seen: tokio::sync::Notify::new(),
        next_tag: AtomicU64::new(0),
        listener: Mutex::new(Some(listener)),
    };
    Ok((serving, format!("tcp://{bound}")))
}

/// Serves one client's connection: the handshake, then every message it sends, until it ends.
async fn connection(inner: Arc<Inner>, stream: tokio::net::TcpStream) {
    let Some(serving) = inner.serving.as_ref() else { return };
    let limits = zmtp::Limits { max_frame: inner.options.limits.max_frame.max(wire::MAX_NAME) };
    let (mut read, write) =
        match zmtp::handshake(stream, SocketType::Router, limits, inner.options.handshake_timeout).await {
            Ok(halves) => halves,
            Err(error) => {
                tracing::warn!(%error, "no ZMTP handshake with a ZeroMQ client");
                return;
            }
        };
    let routing = Bytes::copy_from_slice(&serving.next_routing.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    let outgoing = Outgoing::start(write);
    let closed = outgoing.closed.clone();
    serving.links.insert(routing.clone(), outgoing);
    loop {
        tokio::select! {
            () = inner.shutdown.cancelled() => break,
            () = closed.cancelled() => break,
            received = zmtp::next(&mut read) => {
                let Some(frames) = received else { break };
                match Command::parse(&frames, &inner.options.limits) {
                    Ok(command) => serving.handle(&inner, routing.clone(), command),
                    Err(error) => tracing::warn!(%error, "a malformed message from a ZeroMQ client; dropped"),
                }
            }
        }
    }
    closed.cancel();
    serving.links.remove(&routing);
    serving.forget(&routing);
}

impl Serving {
    /// Starts accepting clients and sending them heartbeats.
    pub(super) fn start(&self, inner: &Arc<Inner>) {
        let Some(listener) = lock(&self.listener).take() else { return };
        let accepting = Arc::clone(inner);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = accepting.shutdown.cancelled() => break,
                    accepted = listener.accept() => accepted,
                };
                match accepted {
                    Ok((stream, _)) => {
                        tokio::spawn(connection(Arc::clone(&accepting), stream));
                    }
                    Err(error) => {
                        // Out of descriptors, say: wait a moment rather than spin.
                        tracing::warn!(%error, "a ZeroMQ connection could not be accepted");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        let beating = Arc::clone(inner);
        tokio::spawn(async move {
            let Some(serving) = beating.serving.as_ref() else { return };
            let mut ticks = tokio::time::interval(beating.options.heartbeat);
            loop {
                tokio::select! {
                    () = beating.shutdown.cancelled() => break,
                    _ = ticks.tick() => serving.beat(beating.options.liveness),
                }
            }
        });
    }

    /// Sends `command` to the client at `routing`, through its connection's writer task. A message to a client
    /// that is gone is dropped: what that client held moved on when its connection ended.
    fn send(&self, routing: &Bytes, command: &Command) {
        self.send_to(routing, command, false);
    }

    /// Sends `command` to the client at `routing`, written at once if `alone` (the worker is busy with nothing
    /// else) and the connection is idle.
    fn send_to(&self, routing: &Bytes, command: &Command, alone: bool) {
        if let Some(link) = self.links.get(routing) {
            link.send_with(alone, |frames| command.frames_into(frames));
        }
    }

    /// PONG to every client; forgets those not heard for `liveness` beats.
    fn beat(&self, liveness: u32) {
        let beat = self.beats.fetch_add(1, Ordering::Relaxed) + 1;
        let mut state = lock(&self.state);
        state.clients.retain(|_, client| beat.saturating_sub(client.heard) <= u64::from(liveness));
        for routing in state.clients.keys() {
            self.send(routing, &Command::Pong);
        }
    }

    fn forget(&self, routing: &Bytes) {
        lock(&self.state).clients.remove(routing);
        self.seen.notify_waiters();
    }

    fn ready(inner: &Inner, state: &State) -> Command {
        let queues: Queues = state
            .queues
            .iter()
            .map(|(queue, served)| (queue.clone(), served.window()))
            .filter(|(_, window)| *window > 0)
            .collect();
        let publishes = Bytes::copy_from_slice(inner.broadcast.endpoint().unwrap_or_default().as_bytes());
        Command::Ready { node: inner.node, version: state.version, publishes, queues }
    }

    /// Tells every client what this node serves now; the announcement's version.
    fn announce(&self, inner: &Inner, state: &mut State) -> u64 {
        state.version += 1;
        let ready = Serving::ready(inner, state);
        for routing in state.clients.keys() {
            self.send(routing, &ready);
        }
        state.version
    }

    fn handle(&self, inner: &Inner, routing: Bytes, command: Command) {
        if let Command::Request { seq, delivery_count, queued_ms, queue, envelope } = command {
            self.request(inner, routing, seq, delivery_count, queued_ms, &queue, envelope);
            return;
        }
        let mut state = lock(&self.state);
        let now = self.beats.load(Ordering::Relaxed);
        match command {
            Command::Hello { node, .. } => {
                state.clients.insert(routing.clone(), Client { node, seen: 0, heard: now });
                let ready = Serving::ready(inner, &state);
                self.send(&routing, &ready);
            }
            Command::Ping => {
                if let Some(client) = state.clients.get_mut(&routing) {
                    client.heard = now;
                }
            }
            Command::Sync { topic } => inner.broadcast.publish_marker(wire::text(&topic)),
            Command::Seen { version } => {
                if let Some(client) = state.clients.get_mut(&routing) {
                    client.seen = client.seen.max(version);
                    client.heard = now;
                }
                drop(state);
                self.seen.notify_waiters();
            }
            command => tracing::debug!(?command, "a ZeroMQ client sent a worker's command here; ignored"),
        }
    }

    /// A request from the client at `routing`: decoded (outside the lock), then handed to a consumer of its
    /// queue or queued for one; refused when nobody here serves the queue.
    #[allow(clippy::too_many_arguments)]
    fn request(
        &self,
        inner: &Inner,
        routing: Bytes,
        seq: u64,
        delivery_count: u32,
        queued_ms: u64,
        queue: &Bytes,
        envelope: Bytes,
    ) {
        let queue = wire::text(queue);
        let decoded = match rpc_core::codec::decode_envelope_bytes(&envelope, &inner.options.limits) {
            Ok(decoded) => decoded,
            Err(error) => match rpc_core::codec::reply_address_of(&envelope, &inner.options.limits) {
                Some((reply_to, correlation_id)) => {
                    rpc_core::transport::invalid_request(reply_to, correlation_id, error.to_string())
                }
                None => {
                    tracing::warn!(%error, %queue, "an undecodable request with no reply address; dropped");
                    self.send(&routing, &Command::Ack { seq });
                    return;
                }
            },
        };
        let now = self.beats.load(Ordering::Relaxed);
        let mut state = lock(&self.state);
        // A client that sent no HELLO is served all the same.
        match state.clients.get_mut(&routing) {
            Some(client) => client.heard = now,
            None => {
                state.clients.insert(routing.clone(), Client { node: Uuid::nil(), seen: 0, heard: now });
            }
        }
        let incoming = Incoming {
            routing,
            seq,
            delivery_count: delivery_count.max(1),
            queued: Duration::from_millis(queued_ms),
            envelope: decoded,
            raw: envelope,
        };
        match state.queues.get_mut(queue) {
            Some(served) if served.backlog.len() >= inner.options.max_backlog => {
                drop(state);
                self.overflow(queue, incoming);
            }
            Some(served) if served.window() > 0 => {
                served.backlog.push_back(incoming);
                self.drain(queue, served);
            }
            _ => self.send(&incoming.routing, &Command::Refused { seq }),
        }
    }

    /// A request past the queue's backlog bound (its caller sent more than its window): settled unrun, and its
    /// caller answered `ResourceExhausted` where it gave a reply address.
    fn overflow(&self, queue: &str, incoming: Incoming) {
        tracing::warn!(%queue, "a ZeroMQ client sent past its window and the backlog's bound; the request is refused");
        let Some(reply_to) =
            incoming.envelope.reply_to.clone().filter(|_| incoming.envelope.kind == rpc_core::Kind::Request)
        else {
            self.send(&incoming.routing, &Command::Ack { seq: incoming.seq });
            return;
        };
        let status = rpc_core::Status::new(
            rpc_core::Code::ResourceExhausted,
            format!(
                "the worker holds the most requests it keeps waiting for `{queue}`; the caller sent past its window"
            ),
        );
        match rpc_core::codec::encode_envelope(&incoming.envelope.reply(Err(status))) {
            Ok(reply) => {
                let inbox = Bytes::copy_from_slice(reply_to.address().as_bytes());
                self.send(&incoming.routing, &Command::Answer { seq: incoming.seq, inbox, envelope: reply });
            }
            Err(_) => self.send(&incoming.routing, &Command::Ack { seq: incoming.seq }),
        }
    }

    /// Hands what waits for `queue` to its consumers while one has room.
    fn drain(&self, queue: &str, served: &mut Served) {
        while !served.backlog.is_empty() {
            let count = served.slots.len();
            let free = (0..count).map(|n| (served.turn + n) % count).find(|&index| {
                let slot = &served.slots[index];
                !slot.paused && (slot.prefetch == 0 || slot.unacked < slot.prefetch)
            });
            let Some(index) = free else { return };
            served.turn = index + 1;
            let Some(incoming) = served.backlog.pop_front() else { return };
            let slot = &mut served.slots[index];
            if slot.acker.auto_ack {
                // Settled as it is handed out: the client drops its copy now.
                self.send(&incoming.routing, &Command::Ack { seq: incoming.seq });
                let delivery = Delivery {
                    envelope: Arc::new(incoming.envelope),
                    delivery_count: incoming.delivery_count,
                    queued: incoming.queued,
                    received_at: std::time::Instant::now(),
                    handle: AckHandle::auto(),
                };
                let _ = slot.sink.send(delivery);
                continue;
            }
            let tag = self.next_tag.fetch_add(1, Ordering::Relaxed) + 1;
            let held = HeldDelivery { routing: incoming.routing.clone(), seq: incoming.seq, raw: incoming.raw };
            lock(&slot.acker.held).insert(tag, held);
            slot.unacked += 1;
            let delivery = Delivery {
                envelope: Arc::new(incoming.envelope),
                delivery_count: incoming.delivery_count,
                queued: incoming.queued,
                received_at: std::time::Instant::now(),
                handle: AckHandle::new(Arc::clone(&slot.acker) as Arc<dyn Acker>, tag),
            };
            if slot.sink.send(delivery).is_err() {
                // Its consumer is going: hand the request back unprocessed.
                lock(&slot.acker.held).remove(&tag);
                slot.unacked -= 1;
                slot.paused = true;
                self.send(&incoming.routing, &Command::Requeue { seq: incoming.seq, counted: false });
                tracing::debug!(%queue, "a delivery for a consumer that is gone was handed back");
            }
        }
    }

    /// A delivery of consumer `slot` of `queue` was settled: its place is free.
    fn settled(&self, queue: &str, slot: u64) {
        let mut state = lock(&self.state);
        if let Some(served) = state.queues.get_mut(queue) {
            if let Some(slot) = served.slots.iter_mut().find(|candidate| candidate.id == slot) {
                slot.unacked = slot.unacked.saturating_sub(1);
            }
            self.drain(queue, served);
        }
    }

    /// Hands what waits for `queue` back to its clients when no consumer takes it any more.
    fn release_backlog(&self, served: &mut Served) {
        if served.window() > 0 {
            return;
        }
        for incoming in served.backlog.drain(..) {
            self.send(&incoming.routing, &Command::Requeue { seq: incoming.seq, counted: false });
        }
    }

    pub(super) async fn consume(
        &self,
        inner: &Arc<Inner>,
        queue: &str,
        options: ConsumeOptions,
    ) -> Result<Consumer, Error> {
        let (sink, receiver) = tokio::sync::mpsc::unbounded_channel();
        let (version, id, acker) = {
            let mut state = lock(&self.state);
            state.next_slot += 1;
            let id = state.next_slot;
            let acker = Arc::new(ZmqAcker {
                inner: Arc::clone(inner),
                queue: queue.to_owned(),
                slot: id,
                auto_ack: options.auto_ack,
                held: Mutex::new(HashMap::new()),
            });
            let slot =
                Slot { id, sink, acker: Arc::clone(&acker), prefetch: options.prefetch, unacked: 0, paused: false };
            state.queues.entry(queue.to_owned()).or_default().slots.push(slot);
            (self.announce(inner, &mut state), id, acker)
        };
        // The clients connected now know of this consumer before it is handed out, so that a call made right
        // after finds it.
        let known = tokio::time::timeout(inner.options.handshake_timeout, async {
            loop {
                let notified = self.seen.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if lock(&self.state).clients.values().all(|client| client.seen >= version) {
                    return;
                }
                notified.await;
            }
        })
        .await;
        if known.is_err() {
            tracing::warn!(%queue, "not every ZeroMQ client confirmed the new consumer in time");
        }
        let control = ServingControl { inner: Arc::clone(inner), queue: queue.to_owned(), slot: id, acker };
        Ok(Consumer::from_channel(receiver, Some(Box::new(control))))
    }

    fn pause(&self, inner: &Inner, queue: &str, slot: u64) {
        let mut state = lock(&self.state);
        let Some(served) = state.queues.get_mut(queue) else { return };
        if let Some(slot) = served.slots.iter_mut().find(|candidate| candidate.id == slot) {
            slot.paused = true;
        }
        self.release_backlog(served);
        self.announce(inner, &mut state);
    }

    /// Consumer `slot` is gone: its deliveries go back to their clients, counted.
    fn remove(&self, inner: &Inner, queue: &str, slot: u64, acker: &ZmqAcker) {
        let mut state = lock(&self.state);
        for (_, held) in lock(&acker.held).drain() {
            self.send(&held.routing, &Command::Requeue { seq: held.seq, counted: true });
        }
        let Some(served) = state.queues.get_mut(queue) else { return };
        served.slots.retain(|candidate| candidate.id != slot);
        self.release_backlog(served);
        self.drain(queue, served);
        if served.slots.is_empty() {
            state.queues.remove(queue);
        }
        self.announce(inner, &mut state);
    }

    /// Whether the client at `routing` is still connected.
    fn knows(&self, routing: &Bytes) -> bool {
        lock(&self.state).clients.contains_key(routing)
    }

    /// Sends a reply to the inbox `address` of the client node `node`.
    pub(super) fn answer_node(&self, node: Uuid, address: &str, envelope: Bytes) -> Result<(), Error> {
        let state = lock(&self.state);
        let routing = state.clients.iter().find(|(_, client)| client.node == node).map(|(routing, _)| routing.clone());
        drop(state);
        match routing {
            Some(routing) => {
                let inbox = Bytes::copy_from_slice(address.as_bytes());
                self.send(&routing, &Command::Answer { seq: 0, inbox, envelope });
                Ok(())
            }
            None => Err(Error::NoRoute(address.to_owned())),
        }
    }
}

/// A delivery held by a consumer, and the client that holds its request.
struct HeldDelivery {
    routing: Bytes,
    seq: u64,
    raw: Bytes,
}

/// Settles one consumer's deliveries by telling the client holding each request.
pub(super) struct ZmqAcker {
    inner: Arc<Inner>,
    queue: String,
    slot: u64,
    auto_ack: bool,
    held: Mutex<HashMap<u64, HeldDelivery>>,
}

impl fmt::Debug for ZmqAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZmqAcker").field("queue", &self.queue).field("slot", &self.slot).finish_non_exhaustive()
    }
}

impl ZmqAcker {
    fn serving(&self) -> Option<&Serving> {
        self.inner.serving.as_ref()
    }

    /// Takes delivery `tag` and frees its consumer's place; `None` when it was settled already or handed back.
    fn take(&self, tag: u64) -> Option<HeldDelivery> {
        let held = lock(&self.held).remove(&tag)?;
        if let Some(serving) = self.serving() {
            serving.settled(&self.queue, self.slot);
        }
        Some(held)
    }

    /// The client of delivery `tag`, if the delivery is held and the client connected.
    fn client_of(&self, tag: u64) -> Result<Bytes, Error> {
        let routing = lock(&self.held).get(&tag).map(|held| held.routing.clone()).ok_or(Error::DeliveryLost)?;
        match self.serving() {
            Some(serving) if serving.knows(&routing) => Ok(routing),
            _ => Err(Error::DeliveryLost),
        }
    }

    fn tell(&self, routing: &Bytes, command: &Command) {
        if let Some(serving) = self.serving() {
            serving.send(routing, command);
        }
    }
}

impl Acker for ZmqAcker {
    fn settle(&self, tag: u64, outcome: Outcome) -> BoxFuture<'_, Result<(), Error>> {
        let Some(held) = self.take(tag) else { return finished(Ok(())) };
        let command = match outcome {
            Outcome::Ack => Command::Ack { seq: held.seq },
            Outcome::Requeue => Command::Requeue { seq: held.seq, counted: true },
            Outcome::Release => Command::Requeue { seq: held.seq, counted: false },
            Outcome::DeadLetter => {
                let dead_letters = naming::dead_letter_queue(&self.queue);
                let copied = rpc_core::codec::decode_envelope_bytes(&held.raw, &self.inner.options.limits)
                    .map_err(Error::from)
                    .and_then(|envelope| self.inner.publish(&dead_letters, envelope));
                if let Err(error) = copied {
                    tracing::warn!(queue = %self.queue, %error, "no dead-letter queue on ZeroMQ takes the request; dropped");
                }
                Command::Ack { seq: held.seq }
            }
        };
        self.tell(&held.routing, &command);
        finished(Ok(()))
    }

    fn publish<'a>(
        &'a self,
        tag: u64,
        queue: &'a str,
        envelope: Envelope,
        confirm: Confirm,
    ) -> BoxFuture<'a, Result<(), Error>> {
        let _ = confirm;
        if super::Inner::inbox_node(queue).is_none() {
            return finished(self.inner.publish(queue, envelope));
        }
        let sent = self.client_of(tag).and_then(|routing| {
            let bytes = rpc_core::codec::encode_envelope(&envelope)?;
            let inbox = Bytes::copy_from_slice(queue.as_bytes());
            self.tell(&routing, &Command::Answer { seq: 0, inbox, envelope: bytes });
            Ok(())
        });
        finished(sent)
    }

    fn answer<'a>(
        &'a self,
        tag: u64,
        reply_to: &'a ReplyTo,
        reply: Envelope,
    ) -> BoxFuture<'a, Result<Answered, Error>> {
        if !reply_to.is_inbox() {
            return reply_then_ack(self, tag, reply_to, reply);
        }
        let bytes = match rpc_core::codec::encode_envelope(&reply) {
            Ok(bytes) => bytes,
            Err(error) => return rpc_core::transport::answered(Err(error.into())),
        };
        let routing = self.client_of(tag);
        let Some(held) = self.take(tag) else { return rpc_core::transport::answered(Err(Error::DeliveryLost)) };
        // The consumer's only delivery: its answer is written at once if the connection is idle.
        let alone = lock(&self.held).is_empty();
        let answered = routing.map(|routing| {
            let answer = Command::Answer {
                seq: held.seq,
                inbox: Bytes::copy_from_slice(reply_to.address().as_bytes()),
                envelope: bytes,
            };
            if let Some(serving) = self.serving() {
                serving.send_to(&routing, &answer, alone);
            }
            Answered::Sent
        });
        rpc_core::transport::answered(answered)
    }

    fn republish<'a>(&'a self, tag: u64, queue: &'a str, envelope: Envelope) -> BoxFuture<'a, Result<(), Error>> {
        if queue != self.queue {
            return Box::pin(async move {
                self.publish(tag, queue, envelope, Confirm::Broker).await?;
                self.settle(tag, Outcome::Ack).await
            });
        }
        let bytes = match rpc_core::codec::encode_envelope(&envelope) {
            Ok(bytes) => bytes,
            Err(error) => return finished(Err(error.into())),
        };
        let routing = match self.client_of(tag) {
            Ok(routing) => routing,
            Err(error) => {
                self.take(tag);
                return finished(Err(error));
            }
        };
        let Some(held) = self.take(tag) else { return finished(Err(Error::DeliveryLost)) };
        let queue = Bytes::copy_from_slice(queue.as_bytes());
        self.tell(&routing, &Command::Republish { seq: held.seq, queue, envelope: bytes });
        finished(Ok(()))
    }
}

/// A consumer's hold on its place: dropping it hands its deliveries back.
struct ServingControl {
    inner: Arc<Inner>,
    queue: String,
    slot: u64,
    acker: Arc<ZmqAcker>,
}

impl ConsumerControl for ServingControl {
    fn pause(&self) {
        if let Some(serving) = self.inner.serving.as_ref() {
            serving.pause(&self.inner, &self.queue, self.slot);
        }
    }
}

impl Drop for ServingControl {
    fn drop(&mut self) {
        if let Some(serving) = self.inner.serving.as_ref() {
            serving.remove(&self.inner, &self.queue, self.slot, &self.acker);
        }
    }
}
