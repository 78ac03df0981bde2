//! Broadcast over PUB/SUB on ZMTP connections of our own ([`super::zmtp`]): the node's PUB socket, a SUB
//! socket per subscription connected to every known publisher, and the sync that closes the slow-joiner gap for
//! publishers a subscription knows of.
//!
//! The PUB side filters, as libzmq's does: a subscriber says which topic prefixes it wants (ZMTP 3.0
//! subscription messages, `0x01` then the prefix; `0x00` cancels), and gets only the messages whose first frame
//! starts with one of them. What a subscriber cannot take is dropped for it past [`SEND_HWM`] messages queued, as
//! a libzmq PUB socket drops past its high-water mark; the others are not held back.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use rpc_core::Error;
use rpc_core::codec::Limits;
use rpc_core::transport::{AckHandle, Consumer, ConsumerControl, Delivery};
use tokio::sync::mpsc::error::TrySendError;
use tokio_util::sync::{CancellationToken, DropGuard};
use uuid::Uuid;

use super::wire::{self, Command, Published};
use super::zmtp::{self, Message, Outgoing, SocketType};
use super::{Inner, lock};

/// The topic prefix of sync markers.
const MARKER: &str = "mqrpc.sync/";

/// How often a subscription asks a publisher for its marker again while it waits.
const ASK_AGAIN: Duration = Duration::from_millis(100);

/// Messages queued for one subscriber at most; past it what is published is dropped for that subscriber (libzmq's
/// default send high-water mark).
pub(super) const SEND_HWM: usize = 1_000;

/// Broadcasts a subscription holds for its consumer at most; past it what arrives is dropped (libzmq's default
/// receive high-water mark), so that a consumer slower than its publishers does not grow the memory without bound.
pub(super) const RECV_HWM: usize = 1_000;

/// Topic prefixes one subscriber may hold at most; further subscriptions are ignored.
const MAX_PREFIXES: usize = 1_024;

/// The first wait before a SUB connects again to a publisher that went away.
const RECONNECT: Duration = Duration::from_millis(100);

/// The node's PUB socket: its subscribers' connections, by the number this socket gave each.
pub(super) struct Publisher {
    endpoint: String,
    subscribers: Arc<Mutex<HashMap<u64, Subscriber>>>,
}

/// A SUB connected to the PUB socket.
struct Subscriber {
    /// The topic prefixes it subscribed to.
    prefixes: Vec<Bytes>,
    /// To its connection's writer, bounded by [`SEND_HWM`].
    queue: tokio::sync::mpsc::Sender<Message>,
}

impl Publisher {
    /// Queues `message` for every subscriber whose prefixes match its first frame, without waiting for any.
    fn send(&self, message: &Message) {
        let Some(first) = message.first() else { return };
        let subscribers = lock(&self.subscribers);
        for (id, subscriber) in subscribers.iter() {
            if !subscriber.prefixes.iter().any(|prefix| first.starts_with(prefix)) {
                continue;
            }
            if let Err(TrySendError::Full(_)) = subscriber.queue.try_send(message.clone()) {
                tracing::debug!(
                    subscriber = id,
                    "a ZeroMQ subscriber is past its high-water mark; a broadcast is dropped for it"
                );
            }
        }
    }
}

/// Binds the PUB socket at `endpoint` (`tcp://host:port`) and accepts subscribers until `shutdown`.
pub(super) async fn bind(
    endpoint: &str,
    shutdown: &CancellationToken,
    handshake: Duration,
) -> Result<Publisher, Error> {
    let address = endpoint
        .strip_prefix("tcp://")
        .ok_or_else(|| Error::InvalidArgument(format!("{endpoint}: a ZeroMQ endpoint is tcp://host:port")))?;
    let listener = tokio::net::TcpListener::bind(address).await.map_err(|error| Error::Transport(Box::new(error)))?;
    let bound = listener.local_addr().map_err(|error| Error::Transport(Box::new(error)))?;
    let subscribers = Arc::new(Mutex::new(HashMap::new()));
    let accepting = Arc::clone(&subscribers);
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        let mut next = 0u64;
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, _)) => {
                    next += 1;
                    let id = next;
                    tokio::spawn(serve_subscriber(stream, id, Arc::clone(&accepting), shutdown.clone(), handshake));
                }
                Err(error) => {
                    tracing::warn!(%error, "a ZeroMQ subscriber could not be accepted");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    Ok(Publisher { endpoint: format!("tcp://{bound}"), subscribers })
}

/// One subscriber's connection: the handshake, then its subscriptions, until it goes or the node shuts down.
async fn serve_subscriber(
    stream: tokio::net::TcpStream,
    id: u64,
    subscribers: Arc<Mutex<HashMap<u64, Subscriber>>>,
    shutdown: CancellationToken,
    handshake: Duration,
) {
    // A subscriber sends only subscriptions: a byte and a topic prefix.
    let limits = zmtp::Limits { max_frame: wire::MAX_NAME + 1 };
    let (mut read, write) = match zmtp::handshake(stream, SocketType::Pub, limits, handshake).await {
        Ok(halves) => halves,
        Err(error) => {
            tracing::warn!(%error, "no ZMTP handshake with a ZeroMQ subscriber");
            return;
        }
    };
    let (queue, outgoing) = tokio::sync::mpsc::channel(SEND_HWM);
    let closed = CancellationToken::new();
    tokio::spawn(zmtp::write_messages(write, outgoing, closed.clone()));
    lock(&subscribers).insert(id, Subscriber { prefixes: Vec::new(), queue });
    loop {
        let frames = tokio::select! {
            () = shutdown.cancelled() => break,
            () = closed.cancelled() => break,
            received = zmtp::next(&mut read) => match received {
                Some(frames) => frames,
                None => break,
            },
        };
        let [frame] = frames.as_slice() else {
            tracing::debug!(frames = frames.len(), "a ZeroMQ subscriber sent what is not a subscription; ignored");
            continue;
        };
        let mut held = lock(&subscribers);
        let Some(subscriber) = held.get_mut(&id) else { break };
        match frame.first() {
            Some(1) if subscriber.prefixes.len() < MAX_PREFIXES => subscriber.prefixes.push(frame.slice(1..)),
            Some(1) => tracing::warn!(
                subscriber = id,
                "a ZeroMQ subscriber holds the most subscriptions kept; one more is ignored"
            ),
            Some(0) => {
                if let Some(index) = subscriber.prefixes.iter().position(|prefix| prefix[..] == frame[1..]) {
                    subscriber.prefixes.swap_remove(index);
                }
            }
            _ => tracing::debug!("a ZeroMQ subscriber sent what is not a subscription; ignored"),
        }
    }
    closed.cancel();
    lock(&subscribers).remove(&id);
}

/// The node's publisher and subscriptions.
pub(super) struct Broadcast {
    publisher: Option<Publisher>,
    /// The PUB endpoints of the peers, by node.
    publishers: Mutex<HashMap<Uuid, String>>,
    subscriptions: Mutex<Vec<Weak<Subscription>>>,
}

impl Broadcast {
    pub(super) fn new(publisher: Option<Publisher>) -> Broadcast {
        Broadcast { publisher, publishers: Mutex::new(HashMap::new()), subscriptions: Mutex::new(Vec::new()) }
    }

    pub(super) fn endpoint(&self) -> Option<&str> {
        self.publisher.as_ref().map(|publisher| publisher.endpoint.as_str())
    }

    /// Publishes `envelope` to the subscribers of `topic` that are connected now.
    pub(super) fn publish(&self, topic: &str, envelope: Bytes) -> Result<(), Error> {
        let publisher = self
            .publisher
            .as_ref()
            .ok_or(Error::Unsupported("publishing to a topic from a ZeroMQ node that binds no endpoint"))?;
        publisher.send(&wire::broadcast(topic, envelope));
        Ok(())
    }

    /// Publishes the sync marker `topic`, which a subscription asked for.
    pub(super) fn publish_marker(&self, topic: &str) {
        if let (Some(publisher), true) = (&self.publisher, topic.starts_with(MARKER)) {
            publisher.send(&wire::synced(topic));
        }
    }

    fn live(&self) -> Vec<Arc<Subscription>> {
        let mut subscriptions = lock(&self.subscriptions);
        subscriptions.retain(|subscription| subscription.strong_count() > 0);
        subscriptions.iter().filter_map(Weak::upgrade).collect()
    }
}

/// One SUB socket, as its consumer and the node see it: a connection to each publisher it joined, each
/// reconnecting when its publisher goes away, all ended when the subscription is dropped.
struct Subscription {
    id: Uuid,
    /// What each of its connections needs.
    feed: Arc<Feed>,
    /// Endpoints connected (never twice: each connection would deliver each message once more).
    connected: Mutex<HashSet<String>>,
    /// Ends the connections when the subscription is dropped.
    stop: CancellationToken,
    _stop_on_drop: DropGuard,
}

/// What a subscription's connections share.
struct Feed {
    /// The topic delivered.
    wanted: Bytes,
    /// What each connection subscribes to: the topic, and this subscription's sync markers.
    prefixes: [Bytes; 2],
    /// To the consumer, bounded by [`RECV_HWM`].
    sink: tokio::sync::mpsc::Sender<Delivery>,
    synced: Synced,
    limits: Limits,
    handshake: Duration,
    reconnect_max: Duration,
}

/// The publishers whose marker a subscription received.
#[derive(Default)]
struct Synced {
    nodes: Mutex<HashSet<Uuid>>,
    changed: tokio::sync::Notify,
}

impl Subscription {
    fn marker(&self, publisher: Uuid) -> String {
        format!("{MARKER}{}/{}", self.id.simple(), publisher.simple())
    }

    /// Connects to the publisher `node` at `endpoint` and waits for its marker, up to `timeout`; whether it came.
    async fn join(&self, inner: &Inner, node: Uuid, endpoint: &str, timeout: Duration) -> bool {
        if lock(&self.connected).insert(endpoint.to_owned()) {
            tokio::spawn(follow(Arc::clone(&self.feed), endpoint.to_owned(), self.stop.clone()));
        }
        let marker = self.marker(node);
        let synced = &self.feed.synced;
        let waited = tokio::time::timeout(timeout, async {
            loop {
                let notified = synced.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if lock(&synced.nodes).contains(&node) {
                    return;
                }
                if node == inner.node {
                    inner.broadcast.publish_marker(&marker);
                } else {
                    inner
                        .routing
                        .send_to_node(node, &Command::Sync { topic: Bytes::copy_from_slice(marker.as_bytes()) });
                }
                let _ = tokio::time::timeout(ASK_AGAIN, notified).await;
            }
        })
        .await;
        waited.is_ok()
    }
}

/// Keeps a connection to the publisher at `endpoint`, reconnecting with backoff when it ends, until `stop`.
async fn follow(feed: Arc<Feed>, endpoint: String, stop: CancellationToken) {
    let mut backoff = RECONNECT;
    loop {
        let connected = tokio::select! {
            () = stop.cancelled() => return,
            connected = feed.session(&endpoint) => connected,
        };
        if feed.sink.is_closed() {
            return;
        }
        if connected {
            backoff = RECONNECT;
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(feed.reconnect_max.max(RECONNECT));
    }
}

impl Feed {
    /// One connection to the publisher at `endpoint`, until it ends; whether it got past the handshake.
    async fn session(&self, endpoint: &str) -> bool {
        let Some(address) = endpoint.strip_prefix("tcp://") else {
            tracing::warn!(%endpoint, "a ZeroMQ endpoint other than tcp://host:port; not subscribed");
            return false;
        };
        let stream = match tokio::time::timeout(self.handshake, tokio::net::TcpStream::connect(address)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                tracing::debug!(%endpoint, %error, "cannot connect to a ZeroMQ publisher");
                return false;
            }
            Err(_) => return false,
        };
        let limits = zmtp::Limits { max_frame: self.limits.max_frame.max(wire::MAX_NAME) };
        let (mut read, write) = match zmtp::handshake(stream, SocketType::Sub, limits, self.handshake).await {
            Ok(halves) => halves,
            Err(error) => {
                tracing::warn!(%endpoint, %error, "no ZMTP handshake with a ZeroMQ publisher");
                return false;
            }
        };
        let outgoing = Outgoing::start(write);
        for prefix in &self.prefixes {
            let mut subscription = Vec::with_capacity(prefix.len() + 1);
            subscription.push(1);
            subscription.extend_from_slice(prefix);
            outgoing.send(&[Bytes::from(subscription)], false);
        }
        loop {
            let message = tokio::select! {
                () = outgoing.closed.cancelled() => break,
                received = zmtp::next(&mut read) => match received {
                    Some(message) => message,
                    None => break,
                },
            };
            if !self.received(&message) {
                break;
            }
        }
        outgoing.closed.cancel();
        true
    }

    /// Delivers what a publisher sent; false when the subscription's consumer is gone.
    fn received(&self, message: &[Bytes]) -> bool {
        match Published::parse(message, &self.limits) {
            Ok(Published::Broadcast { topic, envelope }) if topic == self.wanted => {
                match rpc_core::codec::decode_envelope_bytes(&envelope, &self.limits) {
                    Ok(envelope) => {
                        let delivery = Delivery {
                            envelope: Arc::new(envelope),
                            delivery_count: 1,
                            queued: Duration::ZERO,
                            received_at: std::time::Instant::now(),
                            handle: AckHandle::auto(),
                        };
                        match self.sink.try_send(delivery) {
                            Ok(()) => {}
                            Err(TrySendError::Full(_)) => {
                                tracing::debug!(
                                    "a ZeroMQ subscription is past its high-water mark; a broadcast is dropped"
                                );
                            }
                            Err(TrySendError::Closed(_)) => return false,
                        }
                    }
                    Err(error) => tracing::warn!(%error, "an undecodable ZeroMQ broadcast; dropped"),
                }
            }
            // Another topic with this one as its prefix.
            Ok(Published::Broadcast { .. }) => {}
            Ok(Published::Synced { topic }) => {
                let node = std::str::from_utf8(&topic)
                    .ok()
                    .and_then(|topic| topic.rsplit_once('/'))
                    .and_then(|(_, node)| Uuid::try_parse(node).ok());
                if let Some(node) = node {
                    lock(&self.synced.nodes).insert(node);
                    self.synced.changed.notify_waiters();
                }
            }
            Err(error) => tracing::warn!(%error, "a malformed ZeroMQ broadcast; dropped"),
        }
        true
    }
}

/// A peer publishes at `endpoint`: every subscription connects to it and syncs.
pub(super) async fn found_publisher(inner: &Arc<Inner>, node: Uuid, endpoint: &str) {
    lock(&inner.broadcast.publishers).insert(node, endpoint.to_owned());
    let timeout = inner.options.handshake_timeout;
    let joins = inner.broadcast.live().into_iter().map(|subscription| async move {
        if !subscription.join(inner, node, endpoint, timeout).await {
            tracing::warn!(%endpoint, "a ZeroMQ publisher did not answer a subscription's sync in time");
        }
    });
    futures::future::join_all(joins).await;
}

/// Subscribes to `topic` with a SUB socket of its own, connected to every publisher this node knows (its own
/// included) and synced with each before it is handed out.
pub(super) async fn subscribe(inner: &Arc<Inner>, topic: &str) -> Result<Consumer, Error> {
    let id = Uuid::new_v4();
    let (sink, mut receiver) = tokio::sync::mpsc::channel::<Delivery>(RECV_HWM);
    let wanted = Bytes::copy_from_slice(topic.as_bytes());
    let markers = Bytes::from(format!("{MARKER}{}/", id.simple()));
    let feed = Arc::new(Feed {
        prefixes: [wanted.clone(), markers],
        wanted,
        sink,
        synced: Synced::default(),
        limits: inner.options.limits,
        handshake: inner.options.handshake_timeout,
        reconnect_max: inner.options.reconnect_max,
    });
    let stop = inner.shutdown.child_token();
    let subscription = Arc::new(Subscription {
        id,
        feed,
        connected: Mutex::new(HashSet::new()),
        stop: stop.clone(),
        _stop_on_drop: stop.drop_guard(),
    });
    lock(&inner.broadcast.subscriptions).push(Arc::downgrade(&subscription));
    let mut known: Vec<(Uuid, String)> =
        lock(&inner.broadcast.publishers).iter().map(|(node, endpoint)| (*node, endpoint.clone())).collect();
    if let Some(own) = inner.broadcast.endpoint() {
        known.push((inner.node, own.to_owned()));
    }
    let timeout = inner.options.handshake_timeout;
    let joins = known.iter().map(|(node, endpoint)| subscription.join(inner, *node, endpoint, timeout));
    for ((_, endpoint), joined) in known.iter().zip(futures::future::join_all(joins).await) {
        if !joined {
            tracing::warn!(%endpoint, "a ZeroMQ publisher did not answer a new subscription's sync in time");
        }
    }
    let deliveries = futures::stream::poll_fn(move |cx| receiver.poll_recv(cx));
    Ok(Consumer::new(Box::pin(deliveries), Some(Box::new(SubscriptionControl { _subscription: subscription }))))
}

/// A subscription's consumer: dropping it closes the SUB socket.
struct SubscriptionControl {
    _subscription: Arc<Subscription>,
}

impl ConsumerControl for SubscriptionControl {
    fn pause(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SUB connection to `publisher`, subscribed to `prefix`, and its reader.
    async fn subscriber(
        publisher: &Publisher,
        prefix: &[u8],
    ) -> (tokio_util::codec::FramedRead<tokio::net::tcp::OwnedReadHalf, zmtp::Codec>, Outgoing) {
        let address = publisher.endpoint.strip_prefix("tcp://").expect("tcp");
        let stream = tokio::net::TcpStream::connect(address).await.expect("connects");
        let limits = zmtp::Limits { max_frame: 1_024 };
        let (read, write) =
            zmtp::handshake(stream, SocketType::Sub, limits, Duration::from_secs(5)).await.expect("handshake");
        let outgoing = Outgoing::start(write);
        outgoing.send(&[Bytes::from([&[1u8][..], prefix].concat())], false);
        (read, outgoing)
    }

    #[tokio::test]
    async fn a_subscriber_gets_what_matches_its_prefixes_and_nothing_else() {
        let shutdown = CancellationToken::new();
        let publisher = bind("tcp://127.0.0.1:0", &shutdown, Duration::from_secs(5)).await.expect("binds");
        let (mut read, _outgoing) = subscriber(&publisher, b"ns.events").await;
        let wanted = wire::broadcast("ns.events", Bytes::from_static(b"\x80"));
        // Published until the subscription has reached the publisher (the slow joiner), each after one that
        // matches no prefix: what arrives first is the matching one.
        let first = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                publisher.send(&wire::broadcast("other.events", Bytes::from_static(b"\x80")));
                publisher.send(&wanted);
                if let Ok(received) = tokio::time::timeout(Duration::from_millis(20), zmtp::next(&mut read)).await {
                    return received;
                }
            }
        })
        .await
        .expect("a broadcast arrives");
        assert_eq!(first, Some(wanted));
        shutdown.cancel();
    }
}
