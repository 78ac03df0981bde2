//! Consumers: the logical consumer that outlives reconnections, the pump that feeds it, `AmqpAcker` and the
//! guard that pauses or ends it.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use futures::StreamExt;
use lapin::Channel;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::protocol::AMQPSoftError;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use rpc_core::transport::{AckHandle, Acker, BoxFuture, Confirm, Consumer, ConsumerControl, Delivery, Outcome};
use rpc_core::{ConsumeOptions, Envelope, Error};
use tokio::sync::mpsc;

use super::connection::{Conn, close_quietly, connection_level, from_lapin, soft_error};
use super::mapping::{from_amqp, integer, short, to_amqp_marked};
use super::{Amqp, DIRECT_REPLY_TO, Inner};
use crate::adapter::{Counters, headers};

#[derive(Clone)]
pub(super) enum Target {
    Queue(String),
    Inbox(String),
    DirectReply,
}

impl Target {
    fn queue(&self) -> &str {
        match self {
            Target::Queue(queue) | Target::Inbox(queue) => queue,
            Target::DirectReply => DIRECT_REPLY_TO,
        }
    }
}

/// A consumer as the user sees it: it lives across reconnections.
pub(super) struct Logical {
    target: Target,
    options: ConsumeOptions,
    sender: mpsc::UnboundedSender<Delivery>,
    pub(super) paused: bool,
    /// The channel it consumes on now, the consumer tag, and the deliveries it holds there.
    pub(super) current: Option<(Channel, ShortString, Arc<Held>)>,
}

/// The deliveries a consumer holds unsettled on one channel, counted into its queue's `unacked`: when the
/// channel closes (RabbitMQ requeues them), they stop counting, and settling one later counts nothing.
pub(super) struct Held {
    count: std::sync::atomic::AtomicI64,
    counters: Arc<Counters>,
}

impl Held {
    fn new(counters: Arc<Counters>) -> Held {
        Held { count: std::sync::atomic::AtomicI64::new(0), counters }
    }

    fn taken(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.counters.unacked.fetch_add(1, Ordering::Relaxed);
    }

    fn settled(&self) {
        let held = self.count.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| (held > 0).then(|| held - 1));
        if held.is_ok() {
            self.counters.unacked.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The channel is gone, and what it held with it.
    pub(super) fn returned(&self) {
        let held = self.count.swap(0, Ordering::Relaxed);
        self.counters.unacked.fetch_sub(held, Ordering::Relaxed);
    }
}

impl Inner {
    /// Starts consumer `id` on `conn`: a channel of its own (the publisher's, for direct reply-to) and a pump.
    pub(super) async fn start_consumer(self: &Arc<Self>, conn: &Conn, id: u64) -> Result<(), Error> {
        let Some((target, options)) =
            Inner::lock(&self.consumers).get(&id).map(|logical| (logical.target.clone(), logical.options))
        else {
            return Ok(());
        };
        let direct = matches!(target, Target::DirectReply);
        let channel =
            if direct { conn.publisher.clone() } else { conn.connection.create_channel().await.map_err(from_lapin)? };
        if !direct {
            let prefetch = u16::try_from(options.prefetch).unwrap_or(u16::MAX);
            channel.basic_qos(prefetch, BasicQosOptions { global: false }).await.map_err(from_lapin)?;
        }
        let no_ack = options.auto_ack || !matches!(target, Target::Queue(_));
        let consume_options = BasicConsumeOptions { no_ack, ..BasicConsumeOptions::default() };
        let queue = target.queue().to_owned();
        let consumer =
            match channel.basic_consume(short(&queue)?, "".into(), consume_options, FieldTable::default()).await {
                Ok(consumer) => consumer,
                Err(error) => {
                    if !direct {
                        close_quietly(channel);
                    }
                    return Err(match soft_error(&error) {
                        Some(AMQPSoftError::NOTFOUND) => Error::NoRoute(queue),
                        _ => from_lapin(error),
                    });
                }
            };
        let tag = consumer.tag();
        let counters = self.counters.of(&queue);
        let held = Arc::new(Held::new(Arc::clone(&counters)));
        let sender = {
            let mut consumers = Inner::lock(&self.consumers);
            let Some(logical) = consumers.get_mut(&id) else {
                drop(consumers);
                self.cancel_consumer(channel, tag, !direct, held);
                return Ok(());
            };
            logical.current = Some((channel.clone(), tag, Arc::clone(&held)));
            logical.sender.clone()
        };
        let (max_deliveries, unbounded) = match &target {
            Target::Queue(queue) => {
                let declared = Inner::lock(&self.topology).queues.get(queue).cloned();
                let max_deliveries = declared.as_ref().and_then(|options| options.max_deliveries);
                let unbounded = declared.is_some_and(|options| options.max_len.is_none()).then(|| queue.clone());
                (max_deliveries, unbounded)
            }
            _ => (None, None),
        };
        let acker: Arc<AmqpAcker> = Arc::new(AmqpAcker {
            channel,
            counters: Arc::clone(&counters),
            held,
            max_deliveries,
            counts: Mutex::new(HashMap::new()),
            unbounded,
            inner: Arc::downgrade(self),
        });
        let inbox = !matches!(target, Target::Queue(_));
        let pump = Pump { inner: Arc::downgrade(self), id, acker, counters, sender, manual: !no_ack, inbox };
        tokio::spawn(pump.run(consumer, conn.generation));
        Ok(())
    }

    /// Cancels a consumer, and closes its channel if `close` (which requeues what it `held` unacked), in the
    /// background; [`Transport::flush`](rpc_core::Transport::flush) waits for it.
    fn cancel_consumer(&self, channel: Channel, tag: ShortString, close: bool, held: Arc<Held>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let task = runtime.spawn(async move {
            let _ = channel.basic_cancel(tag, BasicCancelOptions::default()).await;
            if close {
                let _ = channel.close(200, "done".into()).await;
                held.returned();
            }
        });
        let mut closing = Inner::lock(&self.closing);
        closing.retain(|task| !task.is_finished());
        closing.push(task);
    }
}

impl Amqp {
    pub(super) async fn consumer(&self, target: Target, options: ConsumeOptions) -> Result<Consumer, Error> {
        let conn = self.inner.current()?;
        let id = self.inner.next_consumer.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = mpsc::unbounded_channel();
        let logical = Logical { target, options, sender, paused: false, current: None };
        Inner::lock(&self.inner.consumers).insert(id, logical);
        if let Err(error) = self.inner.start_consumer(&conn, id).await {
            Inner::lock(&self.inner.consumers).remove(&id);
            return Err(error);
        }
        let guard = ConsumerGuard { inner: Arc::clone(&self.inner), id };
        Ok(Consumer::from_channel(receiver, Some(Box::new(guard))))
    }
}

/// Moves deliveries of one consumer on one connection into the consumer's stream.
struct Pump {
    inner: Weak<Inner>,
    id: u64,
    acker: Arc<AmqpAcker>,
    counters: Arc<Counters>,
    sender: mpsc::UnboundedSender<Delivery>,
    manual: bool,
    /// Consumes replies: reads [`headers::UNBOUNDED_QUEUE`].
    inbox: bool,
}

impl Pump {
    async fn run(self, mut consumer: lapin::Consumer, generation: u64) {
        let mut lost_connection = false;
        while let Some(item) = consumer.next().await {
            match item {
                Ok(delivery) => {
                    if !self.forward(delivery).await {
                        return;
                    }
                }
                Err(error) => {
                    lost_connection = connection_level(&error);
                    tracing::debug!(%error, lost_connection, "a consumer's stream failed");
                    break;
                }
            }
        }
        // The stream ended: the connection went away (the supervisor restarts the consumer), this transport
        // cancelled it (pause, drop), or RabbitMQ cancelled it (the queue was deleted): then the consumer ends.
        let Some(inner) = self.inner.upgrade() else { return };
        let current = inner.conn.borrow().as_ref().map(|conn| conn.generation);
        if lost_connection || current != Some(generation) {
            return;
        }
        let mut consumers = Inner::lock(&inner.consumers);
        if consumers.get(&self.id).is_some_and(|logical| !logical.paused) {
            consumers.remove(&self.id);
        }
    }

    /// Hands one delivery to the consumer; false when the consumer is gone.
    async fn forward(&self, delivery: lapin::message::Delivery) -> bool {
        let tag = delivery.delivery_tag;
        let delivery_count = delivery_count(&delivery);
        if self.inbox
            && let Some(AMQPValue::LongString(queue)) =
                delivery.properties.headers().as_ref().and_then(|table| table.inner().get(headers::UNBOUNDED_QUEUE))
            && let Some(inner) = self.inner.upgrade()
        {
            inner.mark_unbounded(&String::from_utf8_lossy(queue.as_bytes()));
        }
        let (envelope, queued) = from_amqp(delivery.properties, delivery.data);
        if self.manual && self.acker.max_deliveries.is_some_and(|max| delivery_count > max) {
            Counters::bump(&self.counters.dead_lettered);
            let _ = self.acker.channel.basic_reject(tag, BasicRejectOptions { requeue: false }).await;
            return true;
        }
        let handle = if self.manual {
            self.acker.held.taken();
            if self.acker.max_deliveries.is_some() {
                Inner::lock(&self.acker.counts).insert(tag, delivery_count);
            }
            AckHandle::new(Arc::clone(&self.acker) as Arc<dyn Acker>, tag)
        } else {
            AckHandle::auto()
        };
        let delivery =
            Delivery { envelope: Arc::new(envelope), delivery_count, queued, received_at: Instant::now(), handle };
        self.sender.send(delivery).is_ok()
    }
}

/// How many times a delivery has been delivered: exact on quorum queues (`x-delivery-count`); on classic
/// queues, 2 for any redelivery.
fn delivery_count(delivery: &lapin::message::Delivery) -> u32 {
    let returned = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|headers| headers.inner().get("x-delivery-count"))
        .and_then(integer)
        .and_then(|count| u32::try_from(count).ok());
    match returned {
        Some(count) => count.saturating_add(1),
        None if delivery.redelivered => 2,
        None => 1,
    }
}

/// Settles deliveries on the channel they came from; once that channel is gone, RabbitMQ requeued them.
struct AmqpAcker {
    channel: Channel,
    counters: Arc<Counters>,
    held: Arc<Held>,
    max_deliveries: Option<u32>,
    /// Delivery counts of unsettled deliveries, kept when the queue has a maximum.
    counts: Mutex<HashMap<u64, u32>>,
    /// The queue, when this transport declared it without a maximum length: said on each reply to an inbox.
    unbounded: Option<String>,
    /// The transport, for confirmed publishes.
    inner: Weak<Inner>,
}

impl fmt::Debug for AmqpAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpAcker").field("channel", &self.channel.id()).finish_non_exhaustive()
    }
}

impl Acker for AmqpAcker {
    fn settle(&self, tag: u64, outcome: Outcome) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let count = Inner::lock(&self.counts).remove(&tag);
            let outcome = match (outcome, count, self.max_deliveries) {
                (Outcome::Requeue, Some(count), Some(max)) if count >= max => Outcome::DeadLetter,
                (outcome, ..) => outcome,
            };
            let result = match outcome {
                Outcome::Ack => self.channel.basic_ack(tag, BasicAckOptions::default()).await,
                Outcome::Requeue | Outcome::Release => {
                    self.channel.basic_nack(tag, BasicNackOptions { requeue: true, multiple: false }).await
                }
                Outcome::DeadLetter => self.channel.basic_reject(tag, BasicRejectOptions { requeue: false }).await,
            };
            self.held.settled();
            match result {
                Ok(()) => {
                    match outcome {
                        Outcome::Ack => Counters::bump(&self.counters.acked),
                        Outcome::DeadLetter => Counters::bump(&self.counters.dead_lettered),
                        Outcome::Requeue | Outcome::Release => {}
                    }
                    Ok(())
                }
                Err(error) if connection_level(&error) || !self.channel.status().connected() => {
                    Err(Error::Disconnected)
                }
                Err(error) => Err(from_lapin(error)),
            }
        })
    }

    fn publish<'a>(
        &'a self,
        _tag: u64,
        queue: &'a str,
        envelope: Envelope,
        confirm: Confirm,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            if !self.channel.status().connected() {
                // RabbitMQ requeued the channel's deliveries when it closed.
                return Err(Error::DeliveryLost);
            }
            if confirm != Confirm::Sent {
                // A durable callback queue: confirmed, on the transport's publishing channel.
                let inner = self.inner.upgrade().ok_or(Error::Disconnected)?;
                return inner.publish_to("", queue, envelope).await;
            }
            // On the delivery's own channel: once RabbitMQ has closed its connection (missed heartbeats) and
            // requeued the request, it reads nothing more from it, so a stale reply never reaches the caller.
            // Unconfirmed and not mandatory; the ack that follows on this channel cannot overtake it.
            let (properties, body) = to_amqp_marked(&envelope, false, self.unbounded.as_deref())?;
            match self
                .channel
                .basic_publish("".into(), short(queue)?, BasicPublishOptions::default(), &body, properties)
                .await
            {
                Ok(_unconfirmed) => Ok(()),
                Err(error) if connection_level(&error) || !self.channel.status().connected() => {
                    Err(Error::DeliveryLost)
                }
                Err(error) => Err(from_lapin(error)),
            }
        })
    }
}

/// Pauses or ends a logical consumer. A consumer keeps its connection alive.
struct ConsumerGuard {
    inner: Arc<Inner>,
    id: u64,
}

impl ConsumerControl for ConsumerGuard {
    fn pause(&self) {
        let mut consumers = Inner::lock(&self.inner.consumers);
        if let Some(logical) = consumers.get_mut(&self.id) {
            logical.paused = true;
            if let Some((channel, tag, held)) = logical.current.clone() {
                // The channel stays open: the deliveries it holds stay settleable.
                self.inner.cancel_consumer(channel, tag, false, held);
            }
        }
    }
}

impl Drop for ConsumerGuard {
    fn drop(&mut self) {
        let Some(logical) = Inner::lock(&self.inner.consumers).remove(&self.id) else { return };
        if let Target::Inbox(name) = &logical.target {
            let mut topology = Inner::lock(&self.inner.topology);
            topology.inboxes.remove(name);
            topology.bindings.retain(|(queue, _)| queue != name);
        }
        if let Some((channel, tag, held)) = logical.current {
            // Closing the consumer's channel requeues what it held unacked.
            let direct = matches!(logical.target, Target::DirectReply);
            self.inner.cancel_consumer(channel, tag, !direct, held);
        }
    }
}
