//! A consumer of one stream in one consumer group: a task with a connection of its own (a blocking
//! `XREADGROUP` holds its connection), which reads new entries within the prefetch, claims entries other
//! consumers left idle past the visibility timeout, renews the lease of the entries it holds, and hands each
//! out with an acker whose every settle goes through a script that checks the delivery is still its own.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::streams::{StreamId, StreamReadReply};
use redis::{Script, Value};
use rpc_core::transport::{
    AckHandle, Acker, Answered, BoxFuture, Confirm, Consumer, ConsumerControl, Delivery, Outcome,
};
use rpc_core::{ConsumeOptions, Envelope, Error, ReplyTo};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::{Inner, redis_error, scripts};
use crate::adapter::fields::Fields;
use crate::adapter::{self, Counters};

/// How often a consumer looks for entries left idle, and how long one read blocks at most.
const TICK: Duration = Duration::from_millis(200);
/// Entries claimed at most per look.
const CLAIM_BATCH: usize = 64;

/// What a consumer reads.
pub(super) struct Target {
    /// The queue's or topic's name (for counters and the dead-letter queue).
    pub(super) name: String,
    /// The stream's key.
    pub(super) stream: String,
    /// The consumer group.
    pub(super) group: String,
    /// A service queue's stream (its acked entries are deleted); otherwise a topic's, shared by groups.
    pub(super) queue: bool,
    /// Deliveries after which an entry goes to the dead-letter queue instead.
    pub(super) max_deliveries: Option<u32>,
}

/// The deliveries a consumer holds, by tag: entry id and delivery count.
struct Held {
    entries: Mutex<HashMap<u64, (String, u32)>>,
    /// Tags whose entry another consumer claimed.
    lost: Mutex<HashSet<u64>>,
    settled: Notify,
}

impl Held {
    fn entries(&self) -> MutexGuard<'_, HashMap<u64, (String, u32)>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lost(&self) -> MutexGuard<'_, HashSet<u64>> {
        self.lost.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Starts a consumer of `target`.
pub(super) async fn start(inner: &Arc<Inner>, target: Target, options: ConsumeOptions) -> Result<Consumer, Error> {
    let connection = inner.dedicated().await?;
    let name = format!("{}-{}", inner.node.simple(), inner.next_consumer.fetch_add(1, Ordering::Relaxed));
    let held = Arc::new(Held {
        entries: Mutex::new(HashMap::new()),
        lost: Mutex::new(HashSet::new()),
        settled: Notify::new(),
    });
    let acker = Arc::new(StreamAcker {
        inner: Arc::clone(inner),
        stream: target.stream.clone(),
        group: target.group.clone(),
        consumer: name.clone(),
        queue: target.queue,
        dead_letters: inner.queue_key(&rpc_core::naming::dead_letter_queue(&target.name)),
        counters: inner.counters.of(&target.name),
        held: Arc::clone(&held),
        answer: scripts::answer(),
        settle: scripts::settle(),
    });
    let (sender, receiver) = mpsc::unbounded_channel();
    let cancel = inner.closing.child_token();
    let reader = Reader {
        inner: Arc::clone(inner),
        connection,
        target,
        consumer: name,
        options,
        held,
        acker,
        sender,
        next_tag: AtomicU64::new(1),
        renew: Script::new(scripts::RENEW),
    };
    tokio::spawn(reader.run(cancel.clone()));
    Ok(Consumer::from_channel(receiver, Some(Box::new(Stop(cancel)))))
}

/// Stops the consumer's task when dropped; what it holds unsettled is claimed by others once idle.
struct Stop(CancellationToken);

impl ConsumerControl for Stop {
    fn pause(&self) {
        self.0.cancel();
    }
}

impl Drop for Stop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

struct Reader {
    inner: Arc<Inner>,
    connection: ConnectionManager,
    target: Target,
    consumer: String,
    options: ConsumeOptions,
    held: Arc<Held>,
    acker: Arc<StreamAcker>,
    sender: mpsc::UnboundedSender<Delivery>,
    next_tag: AtomicU64,
    renew: Script,
}

impl Reader {
    async fn run(mut self, cancel: CancellationToken) {
        let visibility = self.inner.options.visibility;
        let mut last_claim = Instant::now();
        let mut last_renew = Instant::now();
        while !cancel.is_cancelled() && !self.sender.is_closed() {
            let room = self.room();
            let step = async {
                if last_renew.elapsed() >= visibility / 3 {
                    last_renew = Instant::now();
                    self.renew_leases().await?;
                }
                if room > 0 && last_claim.elapsed() >= TICK {
                    last_claim = Instant::now();
                    self.claim_idle(room).await?;
                }
                let room = self.room();
                if room == 0 {
                    let _ = tokio::time::timeout(TICK, self.held.settled.notified()).await;
                    return Ok(());
                }
                self.read_new(room).await
            };
            let result = tokio::select! {
                () = cancel.cancelled() => break,
                result = step => result,
            };
            if let Err(error) = result {
                tracing::debug!(%error, stream = %self.target.stream, "reading a Redis stream failed; trying again");
                if error.to_string().contains("NOGROUP") {
                    self.declare_again().await;
                }
                tokio::time::sleep(TICK).await;
            }
        }
    }

    /// How many more deliveries the prefetch allows.
    fn room(&self) -> usize {
        let held = self.held.entries().len();
        match self.options.prefetch {
            0 => CLAIM_BATCH,
            prefetch => usize::try_from(prefetch).unwrap_or(usize::MAX).saturating_sub(held).min(CLAIM_BATCH),
        }
    }

    async fn read_new(&mut self, room: usize) -> Result<(), Error> {
        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&self.target.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(room)
            .arg("BLOCK")
            .arg(u64::try_from(TICK.as_millis()).unwrap_or(200))
            .arg("STREAMS")
            .arg(&self.target.stream)
            .arg(">")
            .query_async(&mut self.connection)
            .await
            .map_err(redis_error)?;
        for key in reply.into_iter().flat_map(|reply| reply.keys) {
            for entry in key.ids {
                self.hand_out(entry, 1).await;
            }
        }
        Ok(())
    }

    /// Makes the group again when it is gone (its stream deleted, or a Redis without persistence restarted),
    /// with a queue's declaration, so that the consumer goes on and callers find the queue. What it held is gone
    /// with the stream.
    async fn declare_again(&self) {
        let start = if self.target.queue { "0" } else { "$" };
        let mut made = self.inner.create_group(&self.target.stream, &self.target.group, start).await;
        if self.target.queue && made.is_ok() {
            made = self.inner.declare_meta(&self.target.name, &[]).await;
        }
        match made {
            Ok(()) => {
                tracing::warn!(stream = %self.target.stream, "the consumer group was gone; it was made again");
                let lost: Vec<u64> = self.held.entries().keys().copied().collect();
                self.held.lost().extend(lost);
            }
            Err(error) => tracing::debug!(%error, "could not make the consumer group again"),
        }
    }

    /// Claims entries idle past the visibility timeout (their consumer died or went away), with their counts.
    async fn claim_idle(&mut self, room: usize) -> Result<(), Error> {
        let visibility = u64::try_from(self.inner.options.visibility.as_millis()).unwrap_or(u64::MAX);
        let pending: Value = redis::cmd("XPENDING")
            .arg(&self.target.stream)
            .arg(&self.target.group)
            .arg("IDLE")
            .arg(visibility)
            .arg("-")
            .arg("+")
            .arg(room)
            .query_async(&mut self.connection)
            .await
            .map_err(redis_error)?;
        let mut counts: HashMap<String, u32> = HashMap::new();
        if let Value::Array(entries) = pending {
            for entry in entries {
                if let Value::Array(fields) = entry
                    && let (Some(id), Some(count)) = (fields.first(), fields.get(3))
                    && let (Ok(id), Ok(count)) =
                        (redis::from_redis_value::<String>(id.clone()), redis::from_redis_value::<u32>(count.clone()))
                {
                    counts.insert(id, count);
                }
            }
        }
        if counts.is_empty() {
            return Ok(());
        }
        let mut claim = redis::cmd("XCLAIM");
        claim.arg(&self.target.stream).arg(&self.target.group).arg(&self.consumer).arg(visibility);
        for id in counts.keys() {
            claim.arg(id);
        }
        let claimed: Value = claim.query_async(&mut self.connection).await.map_err(redis_error)?;
        let claimed: redis::streams::StreamClaimReply =
            redis::from_redis_value(claimed).map_err(|error| redis_error(error.into()))?;
        for entry in claimed.ids {
            // Claimed: this delivery counts too.
            let count = counts.get(&entry.id).copied().unwrap_or(0).saturating_add(1);
            self.hand_out(entry, count).await;
        }
        Ok(())
    }

    /// Resets the idle time of the entries this consumer holds, so that nobody claims them while they run;
    /// those another consumer claimed already are marked lost.
    async fn renew_leases(&mut self) -> Result<(), Error> {
        let held: Vec<(u64, String)> = self.held.entries().iter().map(|(tag, (id, _))| (*tag, id.clone())).collect();
        if held.is_empty() {
            return Ok(());
        }
        let mut invocation = self.renew.key(&self.target.stream);
        invocation.arg(&self.target.group).arg(&self.consumer);
        for (_, id) in &held {
            invocation.arg(id);
        }
        let lost: Vec<String> = invocation.invoke_async(&mut self.connection).await.map_err(redis_error)?;
        if !lost.is_empty() {
            let mut marked = self.held.lost();
            for (tag, id) in &held {
                if lost.contains(id) {
                    marked.insert(*tag);
                }
            }
        }
        Ok(())
    }

    /// Hands out one entry delivered `redis_count` times by Redis (copies carry the deliveries before them).
    async fn hand_out(&mut self, entry: StreamId, redis_count: u32) {
        let received_at = Instant::now();
        let (envelope, before, sent_at) = decode(&entry, &self.inner.options.limits);
        let delivery_count = before.saturating_sub(1).saturating_add(redis_count.max(1));
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        self.held.entries().insert(tag, (entry.id.clone(), delivery_count));
        if self.target.max_deliveries.is_some_and(|max| delivery_count > max) {
            // Delivered too often: to the dead-letter queue, unrun.
            if let Err(error) = self.acker.settle_now(tag, Outcome::DeadLetter).await {
                tracing::warn!(%error, stream = %self.target.stream, "could not dead-letter an entry delivered too often");
            }
            return;
        }
        let envelope = match envelope {
            Ok(envelope) => envelope,
            Err((envelope, why)) => match envelope.reply_to {
                // Answered with the reason, never run.
                Some(reply_to) => rpc_core::transport::invalid_request(reply_to, envelope.correlation_id, why),
                None => {
                    tracing::warn!(%why, stream = %self.target.stream, "dead-lettering an entry that is not a call");
                    if let Err(error) = self.acker.settle_now(tag, Outcome::DeadLetter).await {
                        tracing::warn!(%error, "could not dead-letter an entry that is not a call");
                    }
                    return;
                }
            },
        };
        let queued = match envelope.deadline_ms {
            Some(_) => adapter::queued_since(sent_at, adapter::now_ms()),
            None => Duration::ZERO,
        };
        let handle = if self.options.auto_ack {
            if let Err(error) = self.acker.settle_now(tag, Outcome::Ack).await {
                tracing::debug!(%error, "could not ack an auto-acked entry");
            }
            AckHandle::auto()
        } else {
            self.acker.counters.unacked.fetch_add(1, Ordering::Relaxed);
            AckHandle::new(Arc::clone(&self.acker) as Arc<dyn Acker>, tag)
        };
        let delivery = Delivery { envelope, delivery_count, queued, received_at, handle };
        let _ = self.sender.send(delivery);
    }
}

/// An entry's envelope (or what could be read of it, and why it is not a call: it is larger than the limits
/// allow), the deliveries before this copy (1 when none), and when it was sent by the sender's clock. The body
/// is the arguments' bytes as they are: the worker decodes them, checked, and answers status 3 when they do not.
pub(super) fn decode(
    entry: &StreamId,
    limits: &rpc_core::codec::Limits,
) -> (Result<Envelope, (Envelope, String)>, u32, Option<u64>) {
    let mut body = bytes::Bytes::new();
    let mut texts: Vec<(&str, String)> = Vec::with_capacity(entry.map.len());
    let mut size = 0usize;
    for (name, value) in &entry.map {
        let Value::BulkString(bytes) = value else { continue };
        size = size.saturating_add(name.len() + bytes.len());
        if name == super::BODY {
            body = bytes::Bytes::copy_from_slice(bytes);
        } else if let Ok(text) = std::str::from_utf8(bytes) {
            texts.push((name.as_str(), text.to_owned()));
        }
    }
    let fields = Fields::read(texts.iter().map(|(name, value)| (*name, value.as_str())));
    let sent_at = fields.sent_at_ms;
    let (envelope, before) = fields.envelope(body);
    if size > limits.max_frame {
        let why = format!("an entry of {size} bytes is past the limit of {}", limits.max_frame);
        return (Err((envelope, why)), before, sent_at);
    }
    (Ok(envelope), before, sent_at)
}

/// Settles deliveries of one consumer, each through a script that checks the consumer still holds it.
#[derive(Debug)]
pub(super) struct StreamAcker {
    inner: Arc<Inner>,
    stream: String,
    group: String,
    consumer: String,
    queue: bool,
    dead_letters: String,
    counters: Arc<Counters>,
    held: Arc<Held>,
    answer: Script,
    settle: Script,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held").field("entries", &self.entries().len()).finish()
    }
}

impl StreamAcker {
    /// The entry of delivery `tag`, while this consumer holds it; one another consumer claimed is let go.
    fn entry(&self, tag: u64) -> Result<(String, u32), Error> {
        if self.held.lost().contains(&tag) {
            self.forget(tag);
            self.counters.unacked.fetch_sub(1, Ordering::Relaxed);
            return Err(Error::DeliveryLost);
        }
        self.held.entries().get(&tag).cloned().ok_or(Error::DeliveryLost)
    }

    /// A settle of `tag` that Redis did not take: the entry stays pending there, and once idle past the
    /// visibility timeout another consumer (or this one) claims it. This consumer lets it go, renewing it no more.
    fn failed(&self, tag: u64, error: redis::RedisError) -> Error {
        self.forget(tag);
        self.counters.unacked.fetch_sub(1, Ordering::Relaxed);
        redis_error(error)
    }

    fn forget(&self, tag: u64) {
        self.held.entries().remove(&tag);
        self.held.lost().remove(&tag);
        self.held.settled.notify_waiters();
    }

    async fn settle_now(&self, tag: u64, outcome: Outcome) -> Result<(), Error> {
        let (id, delivery_count) = self.entry(tag)?;
        let (operation, copy_to, count) = match (outcome, self.queue) {
            (Outcome::Ack, _) => ("ack", self.stream.as_str(), 0),
            // The copy carries the count its next delivery has: one more for a requeue, the same for a release
            // (which does not count).
            (Outcome::Requeue, true) => ("copy", self.stream.as_str(), delivery_count.saturating_add(1)),
            (Outcome::Release, true) => ("copy", self.stream.as_str(), delivery_count),
            // A topic's stream is shared by its groups: the entry stays pending, idle, for the next claim.
            (Outcome::Requeue | Outcome::Release, false) => (
                "idle",
                self.stream.as_str(),
                u32::try_from(self.inner.options.visibility.as_millis()).unwrap_or(u32::MAX),
            ),
            // A dead letter starts over in its own queue.
            (Outcome::DeadLetter, _) => ("copy", self.dead_letters.as_str(), 1),
        };
        let mut connection = self.inner.commands.clone();
        let done: i64 = self
            .settle
            .key(&self.stream)
            .key(copy_to)
            .arg(&self.group)
            .arg(&id)
            .arg(&self.consumer)
            .arg(if self.queue { "1" } else { "0" })
            .arg(operation)
            .arg(count)
            .invoke_async(&mut connection)
            .await
            .map_err(|error| self.failed(tag, error))?;
        self.forget(tag);
        self.counters.unacked.fetch_sub(1, Ordering::Relaxed);
        if done < 0 {
            return Err(Error::DeliveryLost);
        }
        match outcome {
            Outcome::Ack => Counters::bump(&self.counters.acked),
            Outcome::DeadLetter => Counters::bump(&self.counters.dead_lettered),
            Outcome::Requeue | Outcome::Release => {}
        }
        Ok(())
    }

    /// Publishes `envelope` to `queue` (for `inbox`, the stream it names, if it exists) for delivery `tag`,
    /// acking it too when `ack`; fenced by the delivery.
    async fn publish_fenced(
        &self,
        tag: u64,
        queue: &str,
        inbox: bool,
        envelope: Envelope,
        ack: bool,
    ) -> Result<Answered, Error> {
        let (id, _) = self.entry(tag)?;
        let target = if inbox { queue.to_owned() } else { self.inner.queue_key(queue) };
        let fields = super::entry_fields(&envelope)?;
        let mut connection = self.inner.commands.clone();
        let mut invocation = self.answer.key(&self.stream);
        invocation
            .key(&target)
            .arg(&self.group)
            .arg(&id)
            .arg(&self.consumer)
            .arg(if self.queue { "1" } else { "0" })
            .arg(if inbox { "1" } else { "0" })
            .arg(if ack { "1" } else { "0" });
        for (name, value) in &fields {
            invocation.arg(name.as_bytes()).arg(value.as_ref());
        }
        let sent: i64 = invocation.invoke_async(&mut connection).await.map_err(|error| self.failed(tag, error))?;
        if ack || sent < 0 {
            self.forget(tag);
            if ack {
                self.counters.unacked.fetch_sub(1, Ordering::Relaxed);
            }
        }
        match sent {
            -1 => Err(Error::DeliveryLost),
            0 => {
                if ack {
                    Counters::bump(&self.counters.acked);
                }
                Ok(Answered::Undeliverable)
            }
            _ => {
                if ack {
                    Counters::bump(&self.counters.acked);
                }
                Ok(Answered::Sent)
            }
        }
    }
}

impl Acker for StreamAcker {
    fn settle(&self, tag: u64, outcome: Outcome) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(self.settle_now(tag, outcome))
    }

    fn publish<'a>(
        &'a self,
        tag: u64,
        queue: &'a str,
        envelope: Envelope,
        confirm: Confirm,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            match self.publish_fenced(tag, queue, confirm == Confirm::Sent, envelope, false).await? {
                Answered::Sent => Ok(()),
                Answered::Undeliverable => Err(Error::NoRoute(queue.to_owned())),
            }
        })
    }

    fn answer<'a>(
        &'a self,
        tag: u64,
        reply_to: &'a ReplyTo,
        reply: Envelope,
    ) -> BoxFuture<'a, Result<Answered, Error>> {
        Box::pin(self.publish_fenced(tag, reply_to.address(), reply_to.is_inbox(), reply, true))
    }

    fn revoked(&self, tag: u64) -> bool {
        self.held.lost().contains(&tag)
    }
}
