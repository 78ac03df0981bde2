//! The calling side of a node: a DEALER socket per worker, the requests this node holds until a worker settles
//! them, the windows, and what happens when a worker dies.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rpc_core::Error;
use tokio::time::Instant;
use uuid::Uuid;

use super::wire::{self, Command};
use super::zmtp::{self, Outgoing, SocketType};
use super::{Inner, Queues, ZmqOptions, lock};

/// Queue names a client keeps one shared copy of, at most.
const NAMES: usize = 4_096;

/// The sending side of a connection to a worker: what is sent goes to the connection's writer task, which
/// gathers it into one write with whatever else was sent meanwhile.
pub(super) struct Link {
    outgoing: Outgoing,
}

impl Link {
    fn send(&self, command: &Command) {
        // A connection that is gone ends its session, which moves its requests on.
        self.outgoing.send_with(false, |frames| command.frames_into(frames));
    }

    /// Sends a request the worker holds no other of this node's beside: written at once if the connection is
    /// idle.
    fn send_alone(&self, command: &Command) {
        self.outgoing.send_with(true, |frames| command.frames_into(frames));
    }
}

/// The workers this node calls and the requests it holds for them.
pub(super) struct Routing {
    state: Mutex<State>,
    /// Woken when a worker registers.
    changed: tokio::sync::Notify,
    /// Endpoints with a connection loop running.
    connecting: Mutex<HashSet<String>>,
}

#[derive(Default)]
struct State {
    next_seq: u64,
    next_worker: u64,
    workers: HashMap<u64, Worker>,
    by_endpoint: HashMap<String, u64>,
    /// Every request sent and not settled, or waiting for a window.
    held: HashMap<u64, Held>,
    /// Requests waiting for a window, by queue, oldest first.
    waiting: HashMap<Bytes, VecDeque<u64>>,
    waiting_len: usize,
    /// One shared copy of each queue's name.
    names: HashMap<String, Bytes>,
}

/// A worker that answered READY, on one connection.
struct Worker {
    endpoint: String,
    node: Uuid,
    publishes: String,
    link: Arc<Link>,
    queues: Queues,
    outstanding: HashMap<Bytes, u32>,
    /// Requests sent to it: ties between workers go to the one sent fewer.
    sent: u64,
}

/// A request held until a worker settles it.
struct Held {
    queue: Bytes,
    envelope: Bytes,
    delivery_count: u32,
    /// When the envelope's deadline started counting.
    since: Instant,
    deadline: Option<Instant>,
    /// The worker that has it, or none while it waits.
    worker: Option<u64>,
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl State {
    fn serves(&self, queue: &str) -> bool {
        self.workers.values().any(|worker| worker.queues.get(queue).is_some_and(|&window| window > 0))
    }

    /// The worker serving `queue` with room in its window and the fewest outstanding.
    fn pick(&self, queue: &str, window: u32) -> Option<u64> {
        let mut best: Option<(u32, u64, u64)> = None;
        for (&id, worker) in &self.workers {
            let Some(&theirs) = worker.queues.get(queue) else { continue };
            let outstanding = worker.outstanding.get(queue.as_bytes()).copied().unwrap_or(0);
            if outstanding >= theirs.min(window) {
                continue;
            }
            let better = best.is_none_or(|(fewest, sent, _)| (outstanding, worker.sent) < (fewest, sent));
            if better {
                best = Some((outstanding, worker.sent, id));
            }
        }
        best.map(|(_, _, id)| id)
    }

    /// Sends request `seq` to a worker with room, or makes it wait for one.
    fn place(&mut self, seq: u64, window: u32) {
        let Some(held) = self.held.get(&seq) else { return };
        match self.pick(wire::text(&held.queue), window) {
            Some(worker) => self.send(seq, worker, false),
            None => {
                let queue = held.queue.clone();
                self.waiting.entry(queue).or_default().push_back(seq);
                self.waiting_len += 1;
            }
        }
    }

    fn send(&mut self, seq: u64, id: u64, fresh: bool) {
        if let Some((link, request, _)) = self.assign(seq, id, fresh) {
            link.send(&request);
        }
    }

    /// Gives request `seq` to worker `id`: the request to send it, the connection to send it on, and whether
    /// the worker holds no other request of this node's.
    fn assign(&mut self, seq: u64, id: u64, fresh: bool) -> Option<(Arc<Link>, Command, bool)> {
        let (Some(held), Some(worker)) = (self.held.get_mut(&seq), self.workers.get_mut(&id)) else { return None };
        let alone = worker.outstanding.values().all(|&outstanding| outstanding == 0);
        match worker.outstanding.get_mut(&held.queue) {
            Some(outstanding) => *outstanding += 1,
            None => {
                worker.outstanding.insert(held.queue.clone(), 1);
            }
        }
        worker.sent += 1;
        held.worker = Some(id);
        let request = Command::Request {
            seq,
            delivery_count: held.delivery_count,
            // Sent as it was published, it waited for nothing.
            queued_ms: if fresh { 0 } else { millis(held.since.elapsed()) },
            queue: held.queue.clone(),
            envelope: held.envelope.clone(),
        };
        Some((Arc::clone(&worker.link), request, alone))
    }

    /// The shared copy of `queue`'s name.
    fn name(&mut self, queue: &str) -> Bytes {
        if let Some(name) = self.names.get(queue) {
            return name.clone();
        }
        let name = Bytes::copy_from_slice(queue.as_bytes());
        if self.names.len() < NAMES {
            self.names.insert(queue.to_owned(), name.clone());
        }
        name
    }

    /// Frees the window place request `seq` had at worker `id`.
    fn release(&mut self, id: u64, queue: &Bytes) {
        if let Some(outstanding) = self.workers.get_mut(&id).and_then(|worker| worker.outstanding.get_mut(queue)) {
            *outstanding = outstanding.saturating_sub(1);
        }
    }

    /// Whether worker `id` has request `seq`: a settle from a worker that does not (the request moved on when
    /// it was taken for dead) is ignored.
    fn holds(&self, id: u64, seq: u64) -> bool {
        self.held.get(&seq).is_some_and(|held| held.worker == Some(id))
    }

    /// Sends what waits for `queue` while a worker has room; drops what waited past its deadline.
    fn drain(&mut self, queue: &Bytes, window: u32) {
        if !self.waiting.contains_key(queue) {
            return;
        }
        let now = Instant::now();
        loop {
            let Some(&seq) = self.waiting.get(queue).and_then(VecDeque::front) else {
                self.waiting.remove(queue);
                return;
            };
            let expired = self.held.get(&seq).is_none_or(|held| held.deadline.is_some_and(|deadline| deadline <= now));
            let worker = if expired { None } else { self.pick(wire::text(queue), window) };
            if !expired && worker.is_none() {
                return;
            }
            if let Some(waiting) = self.waiting.get_mut(queue) {
                waiting.pop_front();
            }
            self.waiting_len -= 1;
            match worker {
                Some(worker) => self.send(seq, worker, false),
                None => {
                    self.held.remove(&seq);
                }
            }
        }
    }
}

impl Routing {
    pub(super) fn new() -> Routing {
        Routing {
            state: Mutex::new(State::default()),
            changed: tokio::sync::Notify::new(),
            connecting: Mutex::new(HashSet::new()),
        }
    }

    /// Holds a new request for `queue` and sends it to a worker, or makes it wait for a window.
    pub(super) fn publish(
        &self,
        queue: &str,
        envelope: Bytes,
        deadline_ms: Option<u64>,
        options: &ZmqOptions,
    ) -> Result<(), Error> {
        let mut state = lock(&self.state);
        // A worker with room serves the queue; only without one is it asked whether any does.
        let room = state.pick(queue, options.window);
        if room.is_none() {
            if !state.serves(queue) {
                return Err(Error::NoResponders(queue.to_owned()));
            }
            if state.waiting_len >= options.max_waiting {
                return Err(Error::QueueFull(queue.to_owned()));
            }
        }
        state.next_seq += 1;
        let seq = state.next_seq;
        let queue = state.name(queue);
        let since = Instant::now();
        let deadline = deadline_ms.map(|ms| since + Duration::from_millis(ms));
        let held = Held { queue, envelope, delivery_count: 1, since, deadline, worker: None };
        state.held.insert(seq, held);
        match room {
            Some(worker) => {
                let assigned = state.assign(seq, worker, true);
                // Encoded and handed to the writer (which may wake a thread) with the lock let go.
                drop(state);
                match assigned {
                    Some((link, request, true)) => link.send_alone(&request),
                    Some((link, request, false)) => link.send(&request),
                    None => {}
                }
            }
            None => state.place(seq, options.window),
        }
        Ok(())
    }

    /// Waits until a worker at `endpoint` has answered READY; its node and PUB endpoint when it publishes.
    pub(super) async fn ready(&self, endpoint: &str) -> Option<(Uuid, String)> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let state = lock(&self.state);
                if let Some(worker) = state.by_endpoint.get(endpoint).and_then(|id| state.workers.get(id)) {
                    return (!worker.publishes.is_empty()).then(|| (worker.node, worker.publishes.clone()));
                }
            }
            notified.await;
        }
    }

    pub(super) fn live_workers(&self) -> usize {
        lock(&self.state).workers.len()
    }

    /// Drops the requests waiting for `queue`.
    pub(super) fn delete(&self, queue: &str) {
        let mut state = lock(&self.state);
        if let Some(waiting) = state.waiting.remove(queue.as_bytes()) {
            state.waiting_len -= waiting.len();
            for seq in waiting {
                state.held.remove(&seq);
            }
        }
    }

    /// Sends `frames` to the worker of node `node`, if this node is connected to it.
    pub(super) fn send_to_node(&self, node: Uuid, command: &Command) -> bool {
        let state = lock(&self.state);
        let link = state.workers.values().find(|worker| worker.node == node).map(|worker| Arc::clone(&worker.link));
        drop(state);
        link.is_some_and(|link| {
            link.send(command);
            true
        })
    }

    fn register(
        &self,
        endpoint: &str,
        node: Uuid,
        publishes: String,
        link: Arc<Link>,
        queues: Queues,
        window: u32,
    ) -> u64 {
        let id = {
            let mut state = lock(&self.state);
            state.next_worker += 1;
            let id = state.next_worker;
            let served: Vec<Bytes> = queues.keys().map(|queue| state.name(queue)).collect();
            let worker = Worker {
                endpoint: endpoint.to_owned(),
                node,
                publishes,
                link,
                queues,
                outstanding: HashMap::new(),
                sent: 0,
            };
            state.workers.insert(id, worker);
            state.by_endpoint.insert(endpoint.to_owned(), id);
            for queue in served {
                state.drain(&queue, window);
            }
            id
        };
        self.changed.notify_waiters();
        id
    }

    fn announce(&self, id: u64, queues: Queues, window: u32) {
        let mut state = lock(&self.state);
        let served: Vec<Bytes> = queues.keys().map(|queue| state.name(queue)).collect();
        if let Some(worker) = state.workers.get_mut(&id) {
            worker.queues = queues;
        }
        for queue in served {
            state.drain(&queue, window);
        }
    }

    fn settled(&self, id: u64, seq: u64, window: u32) {
        let mut state = lock(&self.state);
        if !state.holds(id, seq) {
            return;
        }
        if let Some(held) = state.held.remove(&seq) {
            state.release(id, &held.queue);
            state.drain(&held.queue, window);
        }
    }

    fn requeue(&self, id: u64, seq: u64, counted: bool, window: u32) {
        let mut state = lock(&self.state);
        if !state.holds(id, seq) {
            return;
        }
        let Some(held) = state.held.get_mut(&seq) else { return };
        held.worker = None;
        held.delivery_count = held.delivery_count.saturating_add(u32::from(counted));
        let queue = held.queue.clone();
        state.release(id, &queue);
        state.place(seq, window);
    }

    fn republish(&self, id: u64, seq: u64, queue: &Bytes, envelope: Bytes, window: u32) {
        let mut state = lock(&self.state);
        if !state.holds(id, seq) {
            return;
        }
        let queue = state.name(wire::text(queue));
        let Some(held) = state.held.get_mut(&seq) else { return };
        let old = std::mem::replace(&mut held.queue, queue);
        held.envelope = envelope;
        held.delivery_count = 1;
        held.since = Instant::now();
        held.worker = None;
        state.release(id, &old);
        state.place(seq, window);
        state.drain(&old, window);
    }

    fn refused(&self, id: u64, seq: u64, window: u32) {
        {
            let mut state = lock(&self.state);
            let queue = state.held.get(&seq).filter(|held| held.worker == Some(id)).map(|held| held.queue.clone());
            if let (Some(queue), Some(worker)) = (queue, state.workers.get_mut(&id)) {
                worker.queues.remove(wire::text(&queue));
            }
        }
        self.requeue(id, seq, false, window);
    }

    /// Worker `id` is gone: what it had goes to the others, as a new delivery each, or waits for one.
    fn dead(&self, id: u64, window: u32) {
        let mut state = lock(&self.state);
        let Some(worker) = state.workers.remove(&id) else { return };
        if state.by_endpoint.get(&worker.endpoint) == Some(&id) {
            state.by_endpoint.remove(&worker.endpoint);
        }
        let mut orphans: Vec<u64> = state
            .held
            .iter_mut()
            .filter(|(_, held)| held.worker == Some(id))
            .map(|(&seq, held)| {
                held.worker = None;
                held.delivery_count = held.delivery_count.saturating_add(1);
                seq
            })
            .collect();
        orphans.sort_unstable();
        if !orphans.is_empty() {
            tracing::info!(endpoint = %worker.endpoint, requests = orphans.len(), "a ZeroMQ worker is gone; sending its requests to the others");
        }
        for seq in orphans {
            state.place(seq, window);
        }
    }

    /// Drops requests that waited for a window past their deadline: their callers gave up.
    fn sweep(&self) {
        let now = Instant::now();
        let mut state = lock(&self.state);
        let State { waiting, held, waiting_len, .. } = &mut *state;
        waiting.retain(|_, seqs| {
            seqs.retain(|seq| {
                let keep = held.get(seq).is_some_and(|held| held.deadline.is_none_or(|deadline| deadline > now));
                if !keep {
                    held.remove(seq);
                    *waiting_len -= 1;
                }
                keep
            });
            !seqs.is_empty()
        });
    }
}

/// Drops expired waiting requests every heartbeat, until the node shuts down.
pub(super) fn start_sweeper(inner: &Arc<Inner>) {
    let inner = Arc::clone(inner);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(inner.options.heartbeat);
        loop {
            tokio::select! {
                () = inner.shutdown.cancelled() => break,
                _ = ticks.tick() => inner.routing.sweep(),
            }
        }
    });
}

/// Starts the connection loop to the worker at `endpoint`, unless one runs: connect, HELLO, serve the
/// connection until it ends, then again after a backoff that doubles up to [`ZmqOptions::reconnect_max`].
pub(super) fn connect(inner: &Arc<Inner>, endpoint: &str) {
    if !lock(&inner.routing.connecting).insert(endpoint.to_owned()) {
        return;
    }
    let inner = Arc::clone(inner);
    let endpoint = endpoint.to_owned();
    tokio::spawn(async move {
        let first = inner.options.heartbeat.min(inner.options.reconnect_max);
        let mut backoff = first;
        loop {
            let registered = tokio::select! {
                () = inner.shutdown.cancelled() => break,
                registered = session(&inner, &endpoint) => registered,
            };
            if registered {
                backoff = first;
            }
            // Up to a quarter more, so that clients of a worker that restarts do not all come back at once.
            let jitter = backoff.mul_f64(rand_fraction() / 4.0);
            tokio::select! {
                () = inner.shutdown.cancelled() => break,
                () = tokio::time::sleep(backoff + jitter) => {}
            }
            backoff = (backoff * 2).min(inner.options.reconnect_max);
        }
    });
}

/// A number in [0, 1) that differs from call to call.
fn rand_fraction() -> f64 {
    let bits = Uuid::new_v4().as_u128() as u64 >> 11;
    bits as f64 / (1u64 << 53) as f64
}

/// One connection to a worker, until it ends; whether the worker answered READY on it.
async fn session(inner: &Arc<Inner>, endpoint: &str) -> bool {
    let Some(address) = endpoint.strip_prefix("tcp://") else {
        tracing::warn!(%endpoint, "a ZeroMQ endpoint other than tcp://host:port; not connected");
        return false;
    };
    let timeout = inner.options.handshake_timeout;
    let stream = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(address)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            tracing::debug!(%endpoint, %error, "cannot connect to a ZeroMQ worker");
            return false;
        }
        Err(_) => return false,
    };
    let limits = zmtp::Limits { max_frame: inner.options.limits.max_frame.max(wire::MAX_NAME) };
    let (mut read, write) = match zmtp::handshake(stream, SocketType::Dealer, limits, timeout).await {
        Ok(halves) => halves,
        Err(error) => {
            tracing::warn!(%endpoint, %error, "no ZMTP handshake with a ZeroMQ worker");
            return false;
        }
    };
    let link = Arc::new(Link { outgoing: Outgoing::start(write) });
    let closed = link.outgoing.closed.clone();
    let publishes = Bytes::copy_from_slice(inner.broadcast.endpoint().unwrap_or_default().as_bytes());
    link.send(&Command::Hello { node: inner.node, publishes });
    let window = inner.options.window;
    let mut worker: Option<u64> = None;
    // Heartbeats: the worker is dead once `liveness` ticks pass with nothing heard from it.
    let mut heard = true;
    let mut silent_ticks = 0;
    let mut ticks = tokio::time::interval(inner.options.heartbeat);
    loop {
        tokio::select! {
            () = closed.cancelled() => break,
            _ = ticks.tick() => {
                silent_ticks = if heard { 0 } else { silent_ticks + 1 };
                heard = false;
                if silent_ticks >= inner.options.liveness {
                    tracing::warn!(%endpoint, "a ZeroMQ worker missed its heartbeats");
                    break;
                }
                link.send(&Command::Ping);
            }
            received = zmtp::next(&mut read) => {
                let Some(frames) = received else { break };
                heard = true;
                match Command::parse(&frames, &inner.options.limits) {
                    Ok(command) => handle(inner, endpoint, &link, &mut worker, command, window),
                    Err(error) => tracing::warn!(%endpoint, %error, "a malformed message from a ZeroMQ worker; dropped"),
                }
            }
        }
    }
    closed.cancel();
    if let Some(id) = worker {
        inner.routing.dead(id, window);
    }
    worker.is_some()
}

/// What a worker sent on a connection.
fn handle(
    inner: &Arc<Inner>,
    endpoint: &str,
    link: &Arc<Link>,
    worker: &mut Option<u64>,
    command: Command,
    window: u32,
) {
    let routing = &inner.routing;
    match (command, *worker) {
        (Command::Ready { node, version, publishes, queues }, id) => {
            match id {
                None => {
                    let publishes = wire::text(&publishes).to_owned();
                    *worker =
                        Some(routing.register(endpoint, node, publishes.clone(), Arc::clone(link), queues, window));
                    if !publishes.is_empty() {
                        let inner = Arc::clone(inner);
                        tokio::spawn(async move { super::broadcast::found_publisher(&inner, node, &publishes).await });
                    }
                }
                Some(id) => routing.announce(id, queues, window),
            }
            link.send(&Command::Seen { version });
        }
        (Command::Answer { seq, inbox, envelope }, id) => {
            if let (Some(id), true) = (id, seq != 0) {
                routing.settled(id, seq, window);
            }
            match rpc_core::codec::decode_envelope_bytes(&envelope, &inner.options.limits) {
                Ok(reply) => inner.deliver_to_inbox(wire::text(&inbox), reply),
                Err(error) => tracing::warn!(%endpoint, %error, "an undecodable reply from a ZeroMQ worker; dropped"),
            }
        }
        (Command::Ack { seq }, Some(id)) => routing.settled(id, seq, window),
        (Command::Requeue { seq, counted }, Some(id)) => routing.requeue(id, seq, counted, window),
        (Command::Republish { seq, queue, envelope }, Some(id)) => routing.republish(id, seq, &queue, envelope, window),
        (Command::Refused { seq }, Some(id)) => routing.refused(id, seq, window),
        (Command::Pong, _) => {}
        (command, _) => tracing::debug!(%endpoint, ?command, "an unexpected command from a ZeroMQ worker; ignored"),
    }
}
