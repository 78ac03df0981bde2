//! One call's way: its request prepared, admitted, sent (again after a lost reply) and answered, cancelled
//! or timed out; and fire-and-forget notifications.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::future::IntoFuture;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::Instrument;
use uuid::Uuid;

use crate::admission::Refused;
use crate::context;
use crate::envelope::{Envelope, Kind, ReplyTo, default_key};
use crate::error::Error;
use crate::method::{DecodeFn, Method, MethodKind};
use crate::metrics::CallMeter;
use crate::naming;
use crate::status::Code;
use crate::text::Text;
use crate::trace;
use crate::transport::{BoxFuture, Confirm, QueueOptions, Transport};

use super::pending::{Pending, PendingGuard, PendingMap, Shared};
use super::{Client, Handle, Inner, MAX_PRIORITY};

/// Options shared by calls and notifications.
#[derive(Clone, Debug, Default)]
struct Options {
    timeout: Option<Duration>,
    idempotency_key: Option<Text>,
    priority: Option<u8>,
    delay: Option<Duration>,
    /// None until a header is set: most calls set none, and an empty map costs a call to drop.
    headers: Option<BTreeMap<String, String>>,
}

impl Options {
    /// Refuses what the call asks and the transport cannot do, rather than ignoring it.
    fn check(&self, transport: &dyn Transport) -> Result<(), Error> {
        let capabilities = transport.capabilities();
        match self.priority {
            Some(priority) if priority > MAX_PRIORITY => {
                return Err(Error::InvalidArgument(format!(
                    "priority {priority} is above the highest, {MAX_PRIORITY}"
                )));
            }
            Some(_) if !capabilities.priority => return Err(Error::Unsupported("priorities")),
            _ => {}
        }
        if self.delay.is_some() && !capabilities.delayed_delivery {
            return Err(Error::Unsupported("delayed delivery"));
        }
        Ok(())
    }

    /// Refuses a delay that leaves nothing of the time `budget` gives the message.
    fn check_delay(&self, budget: Option<Duration>) -> Result<(), Error> {
        match (self.delay, budget) {
            (Some(delay), Some(budget)) if delay >= budget => Err(Error::InvalidArgument(format!(
                "a delay of {delay:?} leaves nothing of the message's {budget:?} budget, which counts from the \
                 publish; give it a longer timeout"
            ))),
            _ => Ok(()),
        }
    }

    /// Fills a request's envelope with these options and the caller's `identity`, and gives it an idempotency
    /// key: the one set, else `key()` (every request carries one). Calls, durable calls and notifications alike.
    fn fill(&self, envelope: &mut Envelope, identity: Option<&Text>, key: impl FnOnce() -> Text) {
        envelope.idempotency_key = Some(self.idempotency_key.clone().unwrap_or_else(key));
        envelope.priority = self.priority;
        envelope.delay_ms = self.delay.filter(|delay| !delay.is_zero()).map(|delay| millis(delay).max(1));
        match &self.headers {
            Some(headers) => envelope.headers.clone_from(headers),
            None => {
                if !envelope.headers.is_empty() {
                    envelope.headers.clear();
                }
            }
        }
        envelope.caller = identity.cloned();
    }

    /// As [`Options::fill`], for a call: its request's id is its correlation id (a transport that carries both in
    /// text sends one), its key defaults to it, and its reply goes to `reply_to`.
    fn fill_call(&self, envelope: &mut Envelope, identity: Option<&Text>, correlation_id: Uuid, reply_to: ReplyTo) {
        self.fill(envelope, identity, || default_key(correlation_id));
        envelope.id = correlation_id;
        envelope.correlation_id = Some(correlation_id);
        envelope.reply_to = Some(reply_to);
    }
}

/// The budget of a call: its own or the default timeout, cut to what remains of the request being handled.
fn budget(own: Option<Duration>, default: Duration, now: Instant) -> (Duration, Instant) {
    // Far enough to mean "no deadline", near enough not to overflow `Instant`.
    const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    let budget = own.unwrap_or(default).min(FOREVER);
    let deadline = now + budget;
    // A call made outside a handler (most) has its own budget, known without a subtraction of instants.
    match context::deadline() {
        Some(inherited) if inherited < deadline => (inherited.saturating_duration_since(now), inherited),
        _ => (budget, deadline),
    }
}

fn millis(budget: Duration) -> u64 {
    u64::try_from(budget.as_millis()).unwrap_or(u64::MAX)
}

/// One call, ready to send: `.await` it for the typed reply, or configure it first.
///
/// The output is the method's declared return type: `i64` for `-> i64`, and `Result<f64, MathError>` for
/// `-> Result<f64, MathError>`, whose error arrives typed.
#[must_use = "a call does nothing until it is awaited, or sent with `on_reply` or `durable`"]
pub struct Call<O> {
    client: Arc<Handle>,
    service: Cow<'static, str>,
    method: Cow<'static, str>,
    decode: DecodeFn<O>,
    args: Result<Bytes, Error>,
    options: Options,
}

impl<O> fmt::Debug for Call<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Call")
            .field("service", &self.service)
            .field("method", &self.method)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<O: Send + 'static> Call<O> {
    pub(crate) fn new(
        client: Arc<Handle>,
        service: Cow<'static, str>,
        method: Cow<'static, str>,
        decode: DecodeFn<O>,
        args: Result<Bytes, Error>,
    ) -> Call<O> {
        Call { client, service, method, decode, args, options: Options::default() }
    }

    /// Waits at most `timeout` for the reply (instead of the client's default). Inside a handler, the call
    /// never waits past the deadline of the request being handled.
    pub fn timeout(mut self, timeout: Duration) -> Call<O> {
        self.options.timeout = Some(timeout);
        self
    }

    /// Sets the key under which the call is executed at most once in effect (default: a fresh key per call).
    /// Calls with the same key are one call in effect: a worker that executed the key answers a later call
    /// with the stored reply.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Call<O> {
        self.options.idempotency_key = Some(Text::from(key.into()));
        self
    }

    /// Delivers the call before calls of lower priority (0 to 9). On a transport without priorities the call
    /// fails with [`Error::Unsupported`] rather than going out unprioritized.
    pub fn priority(mut self, priority: u8) -> Call<O> {
        self.options.priority = Some(priority);
        self
    }

    /// Has the broker hold the request for `delay` before a worker can take it, where the transport has
    /// delayed delivery (our broker and the embedded one); elsewhere the call fails with
    /// [`Error::Unsupported`] rather than going out at once. The call's timeout counts from the send, delay
    /// included, so it must be longer than the delay.
    pub fn delay(mut self, delay: Duration) -> Call<O> {
        self.options.delay = Some(delay);
        self
    }

    /// Adds a header; the reply echoes it.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Call<O> {
        self.options.headers.get_or_insert_default().insert(name.into(), value.into());
        self
    }

    /// Sends the call and returns at once; `callback` receives the typed result later, in a spawned task.
    /// Returns the call's correlation id.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn on_reply<F>(self, callback: F) -> Uuid
    where
        F: FnOnce(Result<O, Error>) + Send + 'static,
    {
        let now = Instant::now();
        let correlation_id = PendingMap::correlation_id(now.into_std());
        tokio::spawn(async move { callback(self.send(correlation_id, now).await) });
        correlation_id
    }

    /// Sends the call with its reply going to the durable callback queue `callback` instead of this client:
    /// a [`DurableCallbacks`](crate::DurableCallbacks) registered under that name handles it, in this or
    /// any other process, even one started after this one stopped. Without an explicit
    /// [`timeout`](Call::timeout) the request has no deadline. Returns the call's correlation id once the
    /// request is on the queue.
    ///
    /// # Errors
    /// Publishing errors ([`Error::NoRoute`], [`Error::QueueFull`], ...).
    pub async fn durable(self, callback: &str) -> Result<Uuid, Error> {
        if self.client.is_closed() {
            return Err(Error::Shutdown);
        }
        self.options.check(self.client.transport().as_ref())?;
        let args = self.args?;
        let queue = naming::callback_queue(self.client.namespace(), callback);
        let transport = self.client.transport();
        transport.declare_queue(&queue, &QueueOptions::new().durable(true)).await?;
        let correlation_id = crate::envelope::new_id();
        let mut envelope = Envelope::with_id(Kind::Request, correlation_id);
        let identity = self.client.inner.identity.as_ref();
        self.options.fill_call(&mut envelope, identity, correlation_id, ReplyTo::Queue(Text::from(queue)));
        envelope.service = Text::from(self.service);
        envelope.method = Text::from(self.method);
        if let Some(timeout) = self.options.timeout {
            let (budget, _) = budget(Some(timeout), timeout, Instant::now());
            if budget.is_zero() {
                return Err(Error::Timeout(budget));
            }
            self.options.check_delay(Some(budget))?;
            envelope.deadline_ms = Some(millis(budget).max(1));
        }
        envelope.body = args;
        let destination = naming::service_queue(self.client.namespace(), &envelope.service);
        send_unawaited(&self.client, envelope, &destination, self.options.timeout, false).await?;
        Ok(correlation_id)
    }

    /// The call as a future, in its span.
    ///
    /// Not an `async fn`: the call is taken apart into its request first, so that the future (one heap
    /// allocation per call) holds only what the exchange needs and stays small.
    fn send(self, correlation_id: Uuid, now: Instant) -> impl Future<Output = Result<O, Error>> + Send + 'static {
        let span = trace::call_span(self.client.transport().as_ref(), &self.service, &self.method, correlation_id);
        let meter = CallMeter::start(&self.client.inner.shared.metrics, &self.service, &self.method);
        // A combinator rather than an `async` block, which would hold the exchange twice (captured, and
        // awaited).
        exchange(self.prepare(correlation_id, now, &span))
            .map(move |result| {
                meter.finish(&result);
                if let Err(error) = &result {
                    trace::failed(&tracing::Span::current(), error.kind());
                }
                result
            })
            .instrument(span)
    }

    /// The request of the call made at `now`, or why it cannot be sent.
    fn prepare(self, correlation_id: Uuid, now: Instant, span: &tracing::Span) -> Result<Prepared<O>, Error> {
        if self.client.is_closed() {
            return Err(Error::Shutdown);
        }
        self.options.check(self.client.transport().as_ref())?;
        let args = self.args?;
        let inner = &self.client.inner;
        let (budget, deadline) = budget(self.options.timeout, inner.default_timeout, now);
        if budget.is_zero() {
            return Err(Error::Timeout(budget));
        }
        self.options.check_delay(Some(budget))?;
        // Its id is the correlation id (`fill_call`): no fresh one to make and overwrite.
        let mut envelope = Envelope::with_id(Kind::Request, correlation_id);
        let inbox = ReplyTo::Inbox(self.client.inbox.clone());
        self.options.fill_call(&mut envelope, inner.identity.as_ref(), correlation_id, inbox);
        trace::inject(span, &mut envelope.headers);
        envelope.body = args;
        let queue = naming::service_queue_of(inner.namespace.as_deref(), self.service.clone());
        trace::sending(span, &envelope, &queue);
        envelope.service = Text::from(self.service);
        envelope.method = Text::from(self.method);
        Ok(Prepared { client: self.client, decode: self.decode, envelope: Some(envelope), queue, budget, deadline })
    }
}

/// A call taken apart for its exchange.
struct Prepared<O> {
    client: Arc<Handle>,
    decode: DecodeFn<O>,
    /// Without its `deadline_ms`, set once the call is admitted. Held in the call's future, which is one heap
    /// allocation already, rather than boxed on its own; kept while it may be sent again, the last send takes it.
    envelope: Option<Envelope>,
    queue: Cow<'static, str>,
    budget: Duration,
    deadline: Instant,
}

/// Sends a call's request and waits for its reply, within its deadline.
///
/// A function returning an `async` block rather than an `async fn`: an `async fn` moves its argument from the
/// future's captures into a local of its own, and the future would hold the call's envelope twice over.
#[expect(clippy::manual_async_fn, reason = "an `async fn` would hold its argument twice")]
fn exchange<O>(mut prepared: Result<Prepared<O>, Error>) -> impl Future<Output = Result<O, Error>> + Send
where
    O: Send + 'static,
{
    async move {
        // Used where it is, in the future's captures: moved out, the envelope would take that room twice over,
        // and the future would outgrow what malloc serves from its per-thread cache (a test in
        // rpc-broker/tests/embedded.rs keeps it there).
        let Prepared { client, decode, envelope, queue, budget, deadline } = match prepared {
            Err(error) => return Err(error),
            Ok(ref mut prepared) => prepared,
        };
        let (client, decode, queue, budget, deadline) = (&*client, *decode, &**queue, *budget, *deadline);
        let correlation_id = envelope.as_ref().and_then(|envelope| envelope.correlation_id).unwrap_or_default();
        let inner = &client.inner;
        // A call that nothing holds back goes at once, with the budget it was made with (the moment since it was
        // made is not worth a reading of the clock); one that waited for its turn takes what is left.
        let open = inner.admission.is_open();
        let _admitted = admit(inner, Some(deadline), budget).await?;
        let left = if open { budget } else { deadline.saturating_duration_since(Instant::now()) };
        if left.is_zero() {
            return Err(Error::Timeout(budget));
        }
        if let Some(envelope) = envelope.as_mut() {
            envelope.deadline_ms = Some(millis(left).max(1));
        }
        let _pending = PendingGuard { shared: &inner.shared, correlation_id };
        // Armed while the request may be on the queue with nobody to take the reply: a future dropped then, or
        // a call ended by `Client::cancel`, cancels it at the broker.
        let mut cancel =
            CancelGuard { transport: &inner.transport, shared: &inner.shared, queue, correlation_id, armed: true };
        let mut resends = inner.resends;
        let outcome = loop {
            let (sender, receiver) = oneshot::channel();
            inner.shared.pending.insert(correlation_id, Pending { epoch: inner.shared.epoch(), sender });
            // Checked again after registering: a `close` or a lost inbox in between must not leave this call
            // waiting.
            if client.is_closed() {
                return Err(Error::Shutdown);
            }
            if inner.shared.disconnected.load(Ordering::Acquire) {
                return Err(Error::Disconnected);
            }
            let sent = if resends > 0 { envelope.clone() } else { envelope.take() };
            let answer = |reply: Result<Result<Arc<Envelope>, Error>, oneshot::error::RecvError>| match reply {
                Ok(Ok(reply)) => refusal(&reply, queue).map_or(Ok(reply), Err),
                Ok(Err(error)) => Err(error),
                Err(_) if client.is_closed() => Err(Error::Shutdown),
                Err(_) => Err(Error::Disconnected),
            };
            // Never `None`: only the last send takes the envelope.
            let publish = sent.map(|sent| inner.transport.publish(queue, sent, Confirm::ByReply));
            let exchange = async {
                let publish = publish.ok_or(Error::Shutdown)?;
                let mut receiver = receiver;
                // The reply proves the request arrived: it wins over a publish confirm that is slow or lost.
                tokio::select! {
                    biased;
                    reply = &mut receiver => return answer(reply),
                    published = publish => published?,
                }
                answer(receiver.await)
            };
            // Polled once before its timer is made: a reply within the first poll (an in-process broker's) needs
            // none, and a timer takes a reference to the runtime that every thread's calls would count.
            let mut exchange = std::pin::pin!(exchange);
            // `None`: the deadline passed.
            let outcome = match futures::poll!(exchange.as_mut()) {
                std::task::Poll::Ready(outcome) => Some(outcome),
                std::task::Poll::Pending => tokio::time::timeout_at(deadline, exchange).await.ok(),
            };
            // After a loss, the service's queue may be missing for a moment too: a restarted broker that kept
            // nothing has it again once the workers reconnect and declare it.
            if matches!(outcome, Some(Err(Error::ReplyLost))) {
                inner.shared.metrics.lost_reply();
            }
            let resending = resends < inner.resends;
            let lost = match &outcome {
                Some(Err(Error::ReplyLost | Error::Disconnected)) => !inner.shared.disconnected.load(Ordering::Acquire),
                Some(Err(Error::NoRoute(_))) => resending,
                _ => false,
            };
            if !lost || resends == 0 {
                break outcome;
            }
            drop(outcome);
            resends -= 1;
            if let Some(envelope) = envelope.as_mut() {
                envelope.attempt = envelope.attempt.saturating_add(1);
            }
            // Give the transport a moment to reconnect; never past the deadline.
            let pause = Duration::from_millis(50 * u64::from(inner.resends - resends).min(20));
            if Box::pin(tokio::time::timeout_at(deadline, tokio::time::sleep(pause))).await.is_err() {
                break None;
            }
        };
        // A call that ended otherwise needs no cancel: answered, refused, or past the deadline that the request
        // carries (the broker and the worker drop it then).
        cancel.armed = matches!(outcome, Some(Err(Error::Cancelled)));
        match outcome {
            // The server cut the handler at the deadline it was given: from here, the budget ran out.
            Some(Ok(reply)) if reply.status == Code::DeadlineExceeded.as_u16() => Err(Error::Timeout(budget)),
            // The transport reported that nobody consumes the service's queue.
            Some(Ok(reply)) if reply.status == Code::NoResponders.as_u16() => {
                Err(Error::NoResponders(queue.to_string()))
            }
            Some(Ok(reply)) => decode(&reply),
            Some(Err(error)) => Err(error),
            None => Err(Error::Timeout(budget)),
        }
    }
}

/// The error of a reply that a broker wrote for a request it refused ([`Code::NoRoute`] and the codes after it),
/// as the transport would have failed the publish: a client of our broker gets the refusal of a call's request
/// in its inbox rather than as the publish's answer, so that it waits for nothing else per call.
fn refusal(reply: &Envelope, queue: &str) -> Option<Error> {
    let message = || reply.status_message.clone().unwrap_or_default();
    match Code::from_u16(reply.status) {
        Code::NoRoute => Some(Error::NoRoute(queue.to_owned())),
        Code::QueueFull => Some(Error::QueueFull(queue.to_owned())),
        Code::Forbidden => Some(Error::Forbidden(message())),
        Code::Refused => Some(Error::InvalidArgument(message())),
        _ => None,
    }
}

/// Sends a message whose reply nobody awaits (a oneway call, a broadcast to the topic `destination` when
/// `broadcast`, a durable call) in its span, once the client's admission limits let it, confirmed by the broker.
async fn send_unawaited(
    client: &Client,
    mut envelope: Envelope,
    destination: &str,
    ttl: Option<Duration>,
    broadcast: bool,
) -> Result<(), Error> {
    let transport = client.transport();
    let span = trace::send_span(transport.as_ref(), &envelope.service, &envelope.method, destination);
    trace::inject(&span, &mut envelope.headers);
    trace::sending(&span, &envelope, destination);
    let sent = async {
        let _admitted = admit(&client.inner, ttl.map(|ttl| Instant::now() + ttl), ttl.unwrap_or_default()).await?;
        if broadcast {
            transport.publish_topic(destination, envelope).await
        } else {
            transport.publish(destination, envelope, Confirm::Broker).await
        }
    };
    let result = sent.instrument(span.clone()).await;
    if let Err(error) = &result {
        trace::failed(&span, error.kind());
    }
    result
}

/// Cancels a call's request at the broker when dropped armed.
struct CancelGuard<'a> {
    transport: &'a Arc<dyn Transport>,
    shared: &'a Arc<Shared>,
    queue: &'a str,
    correlation_id: Uuid,
    armed: bool,
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Transports that can cancel do it without waiting (a frame queued, an engine call); one that would
        // wait finishes in a task of its own.
        let mut cancel = self.transport.cancel(self.queue, self.correlation_id);
        match (&mut cancel).now_or_never() {
            Some(Ok(())) => {}
            Some(Err(Error::Unsupported(_))) => {
                self.shared.uncancelled.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(correlation_id = %self.correlation_id, "the transport cannot cancel a call: it runs");
            }
            Some(Err(error)) => tracing::debug!(%error, "could not cancel a call at the broker"),
            None => {
                let transport = Arc::clone(self.transport);
                let shared = Arc::clone(self.shared);
                let queue = self.queue.to_owned();
                let correlation_id = self.correlation_id;
                drop(cancel);
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn(async move {
                        match transport.cancel(&queue, correlation_id).await {
                            Ok(()) => {}
                            Err(Error::Unsupported(_)) => {
                                shared.uncancelled.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(error) => tracing::debug!(%error, "could not cancel a call at the broker"),
                        }
                    });
                }
            }
        }
    }
}

/// Waits for the call's turn under the client's admission limits; the permit is held until the call ends.
async fn admit(
    inner: &Inner,
    deadline: Option<Instant>,
    budget: Duration,
) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, Error> {
    // Without limits nothing waits; with them, the wait (timers, a semaphore) is boxed (see `Call::send`).
    if inner.admission.is_open() {
        return Ok(None);
    }
    Box::pin(inner.admission.admit(deadline)).await.map_err(|refused| match refused {
        Refused::Deadline => Error::Timeout(budget),
        Refused::Closed => Error::Shutdown,
    })
}

impl<O: Send + 'static> IntoFuture for Call<O> {
    type Output = Result<O, Error>;
    type IntoFuture = BoxFuture<'static, Result<O, Error>>;

    fn into_future(self) -> Self::IntoFuture {
        // One reading of the clock: the call's id and its deadline.
        let now = Instant::now();
        crate::transport::boxed(|| self.send(PendingMap::correlation_id(now.into_std()), now))
    }
}

/// A fire-and-forget call (oneway or broadcast): `.await` it to put it on the queue or topic.
#[must_use = "a notification does nothing until it is awaited"]
pub struct Notify {
    client: Client,
    service: &'static str,
    method: &'static str,
    kind: MethodKind,
    args: Result<Bytes, Error>,
    options: Options,
}

impl fmt::Debug for Notify {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Notify")
            .field("service", &self.service)
            .field("method", &self.method)
            .field("kind", &self.kind)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Notify {
    pub(crate) fn new(client: Client, method: Method<()>, args: Result<Bytes, Error>) -> Notify {
        Notify {
            client,
            service: method.service,
            method: method.name,
            kind: method.kind,
            args,
            options: Options::default(),
        }
    }

    /// Drops the message if no worker has started it within `ttl`.
    pub fn ttl(mut self, ttl: Duration) -> Notify {
        self.options.timeout = Some(ttl);
        self
    }

    /// Sets the key under which the call is executed at most once in effect.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Notify {
        self.options.idempotency_key = Some(Text::from(key.into()));
        self
    }

    /// Delivers before messages of lower priority (0 to 9); as [`Call::priority`].
    pub fn priority(mut self, priority: u8) -> Notify {
        self.options.priority = Some(priority);
        self
    }

    /// Has the broker hold the message for `delay` before a worker can take it; as [`Call::delay`] (a
    /// [`ttl`](Notify::ttl) counts from the send, delay included).
    pub fn delay(mut self, delay: Duration) -> Notify {
        self.options.delay = Some(delay);
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Notify {
        self.options.headers.get_or_insert_default().insert(name.into(), value.into());
        self
    }

    async fn send(self) -> Result<(), Error> {
        if self.client.is_closed() {
            return Err(Error::Shutdown);
        }
        self.options.check(self.client.transport().as_ref())?;
        self.options.check_delay(self.options.timeout)?;
        let mut envelope = Envelope::new(Kind::Oneway);
        let identity = self.client.inner.identity.as_ref();
        self.options.fill(&mut envelope, identity, || Text::from(Uuid::new_v4().simple().to_string()));
        envelope.service = Text::from_static(self.service);
        envelope.method = Text::from_static(self.method);
        envelope.deadline_ms = self.options.timeout.map(|ttl| millis(ttl).max(1));
        envelope.body = self.args?;
        let namespace = self.client.namespace();
        let broadcast = self.kind == MethodKind::Broadcast;
        let destination = if broadcast {
            naming::service_topic(namespace, self.service)
        } else {
            naming::service_queue(namespace, self.service)
        };
        send_unawaited(&self.client, envelope, &destination, self.options.timeout, broadcast).await
    }
}

impl IntoFuture for Notify {
    type Output = Result<(), Error>;
    type IntoFuture = BoxFuture<'static, Result<(), Error>>;

    fn into_future(self) -> Self::IntoFuture {
        crate::transport::boxed(|| self.send())
    }
}
