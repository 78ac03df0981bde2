//! The client: one inbox per client, calls multiplexed over it by correlation id. A call's way is in
//! [`call`]: prepared, admitted, sent, and matched to its reply by the [`pending`] map.

use std::borrow::Cow;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::admission::Admission;
use crate::envelope::Envelope;
use crate::error::Error;
use crate::stripe::Striped;
use crate::text::Text;
use crate::transport::{self, Transport};

mod call;
mod pending;

pub use call::{Call, Notify};
use pending::{PendingMap, Shared, read_replies};

/// The default time a call waits for its reply.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The highest priority a call can ask for.
pub const MAX_PRIORITY: u8 = 9;

/// Configures a [`Client`] before it connects.
#[derive(Debug)]
pub struct ClientBuilder {
    transport: Arc<dyn Transport>,
    default_timeout: Duration,
    namespace: Option<String>,
    resends: u32,
    admission: Admission,
    identity: Option<Text>,
}

impl ClientBuilder {
    /// Names this client to the workers it calls: every call carries it, and a handler reads it as
    /// [`RequestContext::caller`](crate::context::RequestContext::caller). Declared by the caller, not verified
    /// by the framework: use it for logs, metrics and routing, and the broker's own authentication (a token,
    /// TLS, broker users) to keep callers out. Default: none.
    pub fn identity(mut self, identity: impl Into<String>) -> ClientBuilder {
        self.identity = Some(Text::from(identity.into()));
        self
    }

    /// How long a call waits for its reply unless it sets its own timeout (default 30 s).
    pub fn default_timeout(mut self, timeout: Duration) -> ClientBuilder {
        self.default_timeout = timeout;
        self
    }

    /// Prefixes every queue and topic name with `namespace.`, to keep environments apart on one broker.
    /// Servers must use the same namespace.
    pub fn namespace(mut self, namespace: impl Into<String>) -> ClientBuilder {
        self.namespace = Some(namespace.into());
        self
    }

    /// Sends a call again, up to `resends` times, when its reply was lost ([`Error::ReplyLost`]) or the
    /// connection was down when it was sent ([`Error::Disconnected`]), within its deadline (default 0: such a
    /// call fails with that error at once). A call sent again keeps its correlation id and idempotency key and
    /// carries `attempt + 1`, so that a worker that executed it answers with the stored reply. A resend that
    /// finds no queue ([`Error::NoRoute`]) is sent again too: a restarted broker has the service's queue once
    /// its workers reconnect.
    pub fn resend_lost_calls(mut self, resends: u32) -> ClientBuilder {
        self.resends = resends;
        self
    }

    /// At most `calls` calls of this client (all its clones) waiting for their replies at once; more wait
    /// their turn in the caller, within their deadline, then fail with [`Error::Timeout`]. Oneway, broadcast
    /// and durable calls hold a place while they are published. For peak shaving: a burst queues here and in
    /// the broker instead of landing on the workers at once. Default: no limit.
    pub fn max_in_flight(mut self, calls: usize) -> ClientBuilder {
        self.admission.max_in_flight(calls);
        self
    }

    /// Starts at most `per_second` calls per second on average, up to `burst` of them at once; a call waits
    /// for its turn, and fails with [`Error::Timeout`] at once, taking no turn, when that turn comes after its
    /// deadline. Default: no limit.
    pub fn rate_limit(mut self, per_second: u32, burst: u32) -> ClientBuilder {
        self.admission.rate_limit(per_second, burst);
        self
    }

    /// Opens the client's inbox and starts reading replies from it.
    ///
    /// # Errors
    /// Whatever the transport reports when the inbox cannot be opened.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub async fn connect(self) -> Result<Client, Error> {
        let inbox = self.transport.open_inbox().await?;
        let shared = Arc::new(Shared {
            pending: PendingMap::default(),
            late_replies: AtomicU64::new(0),
            uncancelled: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            disconnected: AtomicBool::new(false),
            losses: inbox.losses.clone(),
            metrics: crate::metrics::ClientMetrics::new(),
        });
        let mut consumer = inbox.consumer;
        // Replies go straight from the transport's reader to the waiting calls where it can do that.
        let direct = Arc::clone(&shared);
        consumer.direct(Arc::new(move |delivery: crate::transport::Delivery| direct.reply(delivery.envelope)));
        let reader = tokio::spawn(read_replies(consumer, inbox.losses, Arc::clone(&shared)));
        Ok(Client {
            handles: Some(Arc::new(Striped::default())),
            inner: Arc::new(Inner {
                transport: self.transport,
                inbox: Text::from(inbox.address),
                default_timeout: self.default_timeout,
                namespace: self.namespace,
                resends: self.resends,
                admission: self.admission,
                identity: self.identity,
                shared,
                reader,
            }),
        })
    }
}

/// A handle to the calls of one process: cheap to clone; every clone shares one inbox.
///
/// Generated clients (`CalculatorClient::new(&client)`) send their calls through it.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    /// The handles that calls made on each stripe of threads hold ([`Client::handle`]); none in a handle's own
    /// client.
    handles: Option<Arc<Striped<OnceLock<Arc<Handle>>>>>,
}

/// What a call holds of its client, kept once per stripe of threads: each call holding a clone of the client
/// would count one reference count up and down, a cache line that every thread making calls writes. A handle
/// also has its own copy of the inbox's address, which each call's request carries (and counts a reference
/// to).
pub(crate) struct Handle {
    client: Client,
    inbox: Text,
}

impl std::ops::Deref for Handle {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

impl Handle {
    fn of(inner: &Arc<Inner>) -> Handle {
        Handle {
            client: Client { inner: Arc::clone(inner), handles: None },
            inbox: Text::from(inner.inbox.as_str().to_owned()),
        }
    }
}

struct Inner {
    transport: Arc<dyn Transport>,
    inbox: Text,
    default_timeout: Duration,
    namespace: Option<String>,
    resends: u32,
    admission: Admission,
    identity: Option<Text>,
    shared: Arc<Shared>,
    reader: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A snapshot of a client's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientStats {
    /// Calls waiting for their reply.
    pub pending: usize,
    /// Replies that arrived for no waiting call (it had timed out or been cancelled) and were dropped.
    pub late_replies: u64,
    /// Calls ended before their reply (cancelled, or their future dropped) whose request the transport could
    /// not cancel ([`Capabilities::cancel`](crate::Capabilities) is false): the request still runs unless its
    /// deadline passes first.
    pub uncancelled: u64,
}

/// What [`Client::cancel`] did to a waiting call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Cancellation {
    /// The call ended, and its request is cancelled at the broker: removed from its queue if no worker took
    /// it yet, and the worker running it is signalled, which stops its handler.
    Broker,
    /// The call ended, but the transport cannot cancel a request ([`Capabilities::cancel`](crate::Capabilities)
    /// is false): the request still runs unless its deadline passes first, and its reply is dropped as late.
    WaitOnly,
}

impl Client {
    /// Starts configuring a client on `transport`.
    pub fn builder(transport: impl Transport) -> ClientBuilder {
        ClientBuilder {
            transport: transport::shared(transport),
            default_timeout: DEFAULT_TIMEOUT,
            namespace: None,
            resends: 0,
            admission: Admission::new(),
            identity: None,
        }
    }

    /// A client on `transport` with the defaults.
    ///
    /// # Errors
    /// As [`ClientBuilder::connect`].
    pub async fn connect(transport: impl Transport) -> Result<Client, Error> {
        Client::builder(transport).connect().await
    }

    /// The transport underneath.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.inner.transport
    }

    /// The identity calls carry ([`ClientBuilder::identity`]), if any.
    pub fn identity(&self) -> Option<&str> {
        self.inner.identity.as_deref()
    }

    /// The namespace, if any.
    pub fn namespace(&self) -> Option<&str> {
        self.inner.namespace.as_deref()
    }

    /// The address replies to this client go to.
    pub fn inbox(&self) -> &str {
        &self.inner.inbox
    }

    /// The client's counters.
    pub fn stats(&self) -> ClientStats {
        ClientStats {
            pending: self.inner.shared.pending.len(),
            late_replies: self.inner.shared.late_replies.load(Ordering::Relaxed),
            uncancelled: self.inner.shared.uncancelled.load(Ordering::Relaxed),
        }
    }

    /// Cancels the waiting call `correlation_id` (as [`Call::on_reply`] returns it): the call ends at once with
    /// [`Error::Cancelled`], and its request is cancelled at the broker ([`Transport::cancel`]) where the
    /// transport can (not on RabbitMQ or NATS); the [`Cancellation`] returned says which. Dropping a call's
    /// future before its reply does the same. Returns `None` when no such call waits.
    pub fn cancel(&self, correlation_id: Uuid) -> Option<Cancellation> {
        let pending = self.inner.shared.pending.remove(&correlation_id)?;
        let _ = pending.sender.send(Err(Error::Cancelled));
        Some(if self.inner.transport.capabilities().cancel { Cancellation::Broker } else { Cancellation::WaitOnly })
    }

    /// Stops the client: calls waiting for a reply fail with [`Error::Shutdown`] at once, new calls fail too.
    pub fn close(&self) {
        self.inner.shared.closed.store(true, Ordering::Release);
        self.inner.admission.close();
        self.inner.reader.abort();
        self.inner.shared.pending.clear();
    }

    /// Pings the workers of `service` in this client's namespace: which are alive, with their identity,
    /// version, uptime and load (see [`health`](crate::health)). Awaiting the [`Ping`](crate::health::Ping)
    /// sends it; it collects answers for one second unless told otherwise.
    pub fn ping(&self, service: &str) -> crate::health::Ping {
        crate::health::Ping::new(Arc::clone(&self.inner.transport), self.namespace(), service)
    }

    /// A call of `method` on `service` with `args` already encoded as MessagePack; the reply body comes back
    /// as it is. For tools and gateways that do not have the service's types.
    pub fn request(
        &self,
        service: impl Into<Cow<'static, str>>,
        method: impl Into<Cow<'static, str>>,
        args: Bytes,
    ) -> Call<Bytes> {
        Call::new(self.handle(), service.into(), method.into(), decode_raw, Ok(args))
    }

    /// The handle of this thread's stripe, for a call to hold.
    pub(crate) fn handle(&self) -> Arc<Handle> {
        match &self.handles {
            Some(handles) => Arc::clone(handles.get().get_or_init(|| Arc::new(Handle::of(&self.inner)))),
            None => Arc::new(Handle::of(&self.inner)),
        }
    }

    fn is_closed(&self) -> bool {
        self.inner.shared.closed.load(Ordering::Acquire)
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("inbox", &self.inner.inbox)
            .field("namespace", &self.inner.namespace)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

fn decode_raw(reply: &Envelope) -> Result<Bytes, Error> {
    if reply.status == 0 { Ok(reply.body.clone()) } else { Err(Error::Remote(reply.status())) }
}
