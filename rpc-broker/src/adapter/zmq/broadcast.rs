//! Broadcast over PUB/SUB: the node's PUB socket, a SUB socket per subscription connected to every known
//! publisher, and the sync that closes the slow-joiner gap for publishers a subscription knows of.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use rpc_core::Error;
use rpc_core::transport::{AckHandle, Consumer, ConsumerControl, Delivery};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

use super::wire::{self, Command, Published};
use super::{Inner, lock, zmq_error};

/// The topic prefix of sync markers.
const MARKER: &str = "mqrpc.sync/";

/// How often a subscription asks a publisher for its marker again while it waits.
const ASK_AGAIN: Duration = Duration::from_millis(100);

/// The node's PUB socket.
pub(super) struct Publisher {
    endpoint: String,
    out: UnboundedSender<Vec<Bytes>>,
}

/// Binds the PUB socket at `endpoint` and starts its writer.
pub(super) async fn bind(endpoint: &str, shutdown: &CancellationToken) -> Result<Publisher, Error> {
    let mut socket = zeromq::PubSocket::new();
    let bound = socket.bind(endpoint).await.map_err(zmq_error)?;
    let (out, mut outgoing) = tokio::sync::mpsc::unbounded_channel::<Vec<Bytes>>();
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        loop {
            let frames = tokio::select! {
                () = shutdown.cancelled() => break,
                frames = outgoing.recv() => match frames {
                    Some(frames) => frames,
                    None => break,
                },
            };
            let Ok(message) = ZmqMessage::try_from(frames) else { continue };
            if let Err(error) = socket.send(message).await {
                tracing::debug!(%error, "a ZeroMQ broadcast could not be published");
            }
        }
    });
    Ok(Publisher { endpoint: bound.to_string(), out })
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
        publisher.out.send(wire::broadcast(topic, envelope)).map_err(|_| Error::Disconnected)
    }

    /// Publishes the sync marker `topic`, which a subscription asked for.
    pub(super) fn publish_marker(&self, topic: &str) {
        if let (Some(publisher), true) = (&self.publisher, topic.starts_with(MARKER)) {
            let _ = publisher.out.send(wire::synced(topic));
        }
    }

    fn live(&self) -> Vec<Arc<Subscription>> {
        let mut subscriptions = lock(&self.subscriptions);
        subscriptions.retain(|subscription| subscription.strong_count() > 0);
        subscriptions.iter().filter_map(Weak::upgrade).collect()
    }
}

/// One SUB socket, as its consumer and the node see it.
struct Subscription {
    id: Uuid,
    /// Endpoints for the socket's task to connect to.
    connect: UnboundedSender<String>,
    /// Endpoints connected (never twice: each connection would deliver each message once more).
    connected: Mutex<HashSet<String>>,
    synced: Arc<Synced>,
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
            let _ = self.connect.send(endpoint.to_owned());
        }
        let marker = self.marker(node);
        let waited = tokio::time::timeout(timeout, async {
            loop {
                let notified = self.synced.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if lock(&self.synced.nodes).contains(&node) {
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
    let mut socket = zeromq::SubSocket::new();
    socket.subscribe(topic).await.map_err(zmq_error)?;
    socket.subscribe(&format!("{MARKER}{}/", id.simple())).await.map_err(zmq_error)?;
    let (connect, mut to_connect) = tokio::sync::mpsc::unbounded_channel::<String>();
    let (sink, receiver) = tokio::sync::mpsc::unbounded_channel::<Delivery>();
    let synced = Arc::new(Synced::default());
    let subscription =
        Arc::new(Subscription { id, connect, connected: Mutex::new(HashSet::new()), synced: Arc::clone(&synced) });
    let shutdown = inner.shutdown.clone();
    let limits = inner.options.limits;
    let wanted = Bytes::copy_from_slice(topic.as_bytes());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                endpoint = to_connect.recv() => {
                    // None: the consumer is gone.
                    let Some(endpoint) = endpoint else { break };
                    if let Err(error) = socket.connect(&endpoint).await {
                        tracing::warn!(%endpoint, %error, "a ZeroMQ subscription cannot connect to a publisher");
                    }
                }
                received = socket.recv() => {
                    let message = match received {
                        Ok(message) => message,
                        Err(error) => {
                            // A publisher went away; the socket reconnects by itself.
                            tracing::debug!(%error, "a ZeroMQ subscription lost a publisher");
                            tokio::time::sleep(ASK_AGAIN).await;
                            continue;
                        }
                    };
                    match Published::parse(&message.into_vec(), &limits) {
                        Ok(Published::Broadcast { topic, envelope }) if topic == wanted => {
                            match rpc_core::codec::decode_envelope_bytes(&envelope, &limits) {
                                Ok(envelope) => {
                                    let delivery = Delivery {
                                        envelope,
                                        delivery_count: 1,
                                        queued: Duration::ZERO,
                                        received_at: std::time::Instant::now(),
                                        handle: AckHandle::auto(),
                                    };
                                    if sink.send(delivery).is_err() {
                                        break;
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
                                lock(&synced.nodes).insert(node);
                                synced.changed.notify_waiters();
                            }
                        }
                        Err(error) => tracing::warn!(%error, "a malformed ZeroMQ broadcast; dropped"),
                    }
                }
            }
        }
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
    Ok(Consumer::from_channel(receiver, Some(Box::new(SubscriptionControl { _subscription: subscription }))))
}

/// A subscription's consumer: dropping it closes the SUB socket.
struct SubscriptionControl {
    _subscription: Arc<Subscription>,
}

impl ConsumerControl for SubscriptionControl {
    fn pause(&self) {}
}
