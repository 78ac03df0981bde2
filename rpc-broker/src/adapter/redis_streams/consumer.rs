//! A consumer of one stream in one consumer group: a task with a connection of its own (a blocking
//! `XREADGROUP` holds its connection), which reads new entries within the prefetch, claims entries other
//! consumers left idle past the visibility timeout, renews the lease of the entries it holds, and hands each
//! out with an acker whose every settle goes through a script that checks the delivery is still its own.
//!
//! A service queue's consumer also moves the queue's delayed entries to its stream when they are due, and reads
//! the queue's stream of cancels every 100 to 300 ms, with its reads: the delivery of a cancelled call it holds
//! is signalled ([`Acker::cancelled`]), one that comes later is dropped unrun.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::{Script, Value};
use rpc_core::transport::{
    AckHandle, Acker, Answered, BoxFuture, Cancellations, Confirm, Consumer, ConsumerControl, Delivery, Outcome,
};
use rpc_core::{ConsumeOptions, Envelope, Error, ReplyTo};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Inner, redis_error, scripts};
use crate::adapter::fields::Fields;
use crate::adapter::{self, Counters, headers};

/// How often a consumer looks for entries left idle, and how long one read blocks at most.
const TICK: Duration = Duration::from_millis(200);
/// Entries claimed at most per look.
const CLAIM_BATCH: usize = 64;
/// Entries read at most at once.
const READ_BATCH: usize = 256;
/// Answers sent at most in one script call.
const ANSWER_BATCH: usize = 128;
/// Delayed entries moved to the stream at most at once.
const PROMOTE_BATCH: usize = 256;
/// Cancels read at most at once.
const CANCELS_BATCH: usize = 64;
/// How often a consumer reads the cancels: with its next read once this long has passed since the last (a read
/// that waits takes a tick at most), or on its own when it holds all its prefetch allows and does not read.
const CANCELS_POLL: Duration = Duration::from_millis(100);
/// Cancelled calls a consumer remembers for requests that come after their cancel.
const EARLY_CANCELS: usize = 1_024;

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

/// A delivery a consumer holds.
#[derive(Clone)]
struct Lease {
    /// The entry's id.
    id: String,
    /// Its delivery count.
    count: u32,
    /// Its call's correlation id, for a cancel to find it.
    correlation: Option<Uuid>,
    /// When the command that handed it to this consumer, or last renewed it, was sent: Redis's idle time for
    /// the entry is at most the time since.
    since: Instant,
}

/// The deliveries a consumer holds, by tag.
struct Held {
    entries: Mutex<HashMap<u64, Lease>>,
    /// Tags whose entry another consumer claimed.
    lost: Mutex<HashSet<u64>>,
    settled: Notify,
    /// The signals of cancelled calls whose requests are held.
    cancellations: Arc<Cancellations>,
    /// The earliest due time of a delayed entry this process put on the queue since the consumer last looked.
    due: Mutex<Option<Instant>>,
}

impl Held {
    fn entries(&self) -> MutexGuard<'_, HashMap<u64, Lease>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lost(&self) -> MutexGuard<'_, HashSet<u64>> {
        self.lost.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn due(&self) -> MutexGuard<'_, Option<Instant>> {
        self.due.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Correlation ids of cancelled calls whose requests the consumer did not hold when it heard of the cancel,
/// the oldest forgotten past [`EARLY_CANCELS`].
#[derive(Default)]
struct EarlyCancels {
    ids: HashSet<Uuid>,
    order: VecDeque<Uuid>,
}

impl EarlyCancels {
    fn insert(&mut self, id: Uuid) {
        if !self.ids.insert(id) {
            return;
        }
        self.order.push_back(id);
        if self.order.len() > EARLY_CANCELS
            && let Some(oldest) = self.order.pop_front()
        {
            self.ids.remove(&oldest);
        }
    }

    /// Whether `id` is here; it is forgotten if so.
    fn take(&mut self, id: Uuid) -> bool {
        if !self.ids.remove(&id) {
            return false;
        }
        self.order.retain(|kept| *kept != id);
        true
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
        cancellations: Arc::new(Cancellations::new()),
        due: Mutex::new(None),
    });
    let cancels = inner.cancels_key(&target.name);
    // Cancels are read from those after the consumer starts.
    let cancels_after = if target.queue { last_id(inner, &cancels).await? } else { String::new() };
    let outbox = Arc::new(Outbox {
        waiting: Mutex::new(Waiting { answers: Vec::new(), sending: false }),
        inner: Arc::clone(inner),
        stream: target.stream.clone(),
        group: target.group.clone(),
        consumer: name.clone(),
        queue: target.queue,
        script: Script::new(scripts::ANSWERS),
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
        outbox,
        settle: scripts::settle(),
        hold: scripts::hold_fenced(),
        name: target.name.clone(),
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
        sweep: Script::new(scripts::SWEEP),
        promote: scripts::promote(),
        next_promote: Instant::now(),
        cancels,
        cancels_after,
        cancels_read: Instant::now(),
        early: EarlyCancels::default(),
    };
    tokio::spawn(reader.run(cancel.clone()));
    Ok(Consumer::from_channel(receiver, Some(Box::new(Stop(cancel)))))
}

/// The id of the last entry of `stream`, or `0-0` when it has none.
async fn last_id(inner: &Inner, stream: &str) -> Result<String, Error> {
    let mut connection = inner.commands.clone();
    let last: Value = redis::cmd("XREVRANGE")
        .arg(stream)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut connection)
        .await
        .map_err(redis_error)?;
    let mut entries = Vec::new();
    stream_entries(last, &mut entries);
    Ok(entries.pop().map_or_else(|| "0-0".to_owned(), |entry| entry.id))
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
    sweep: Script,
    promote: Script,
    /// When to look next for delayed entries that are due (a service queue's).
    next_promote: Instant,
    /// The queue's stream of cancels, read after `cancels_after`, last at `cancels_read`.
    cancels: String,
    cancels_after: String,
    cancels_read: Instant,
    early: EarlyCancels,
}

impl Reader {
    async fn run(mut self, cancel: CancellationToken) {
        let visibility = self.inner.options.visibility;
        let mut last_claim = Instant::now();
        let mut last_sweep = Instant::now();
        let mut last_renew = Instant::now();
        while !cancel.is_cancelled() && !self.sender.is_closed() {
            let room = self.room();
            let step = async {
                if last_renew.elapsed() >= visibility / 3 {
                    last_renew = Instant::now();
                    self.renew_leases().await?;
                }
                if last_sweep.elapsed() >= visibility {
                    last_sweep = Instant::now();
                    self.sweep_consumers().await?;
                }
                if self.target.queue {
                    self.promote_due().await?;
                }
                if room > 0 && last_claim.elapsed() >= TICK {
                    last_claim = Instant::now();
                    self.claim_idle(room.min(CLAIM_BATCH)).await?;
                }
                let room = self.room();
                if room == 0 {
                    let _ = tokio::time::timeout(TICK, self.held.settled.notified()).await;
                    if self.target.queue && self.cancels_read.elapsed() >= CANCELS_POLL {
                        self.read_cancels().await?;
                    }
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
            0 => READ_BATCH,
            prefetch => usize::try_from(prefetch).unwrap_or(usize::MAX).saturating_sub(held).min(READ_BATCH),
        }
    }

    /// Reads new entries, waiting until one comes, a tick passes, or a delayed entry is due; a service
    /// queue's consumer reads the cancels first, in the same round trip, every [`CANCELS_POLL`].
    async fn read_new(&mut self, room: usize) -> Result<(), Error> {
        let asked = Instant::now();
        let mut wait = TICK;
        if self.target.queue {
            wait = wait.min(self.next_promote.saturating_duration_since(asked));
        }
        let block = u64::try_from(wait.as_millis()).unwrap_or(200).max(1);
        let mut pipeline = redis::pipe();
        let cancels = self.target.queue && self.cancels_read.elapsed() >= CANCELS_POLL;
        if cancels {
            self.cancels_read = asked;
            pipeline
                .cmd("XREAD")
                .arg("COUNT")
                .arg(CANCELS_BATCH)
                .arg("STREAMS")
                .arg(&self.cancels)
                .arg(&self.cancels_after);
        }
        pipeline
            .cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&self.target.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(room)
            .arg("BLOCK")
            .arg(block)
            .arg("STREAMS")
            .arg(&self.target.stream)
            .arg(">");
        let mut replies: Vec<Value> = pipeline.query_async(&mut self.connection).await.map_err(redis_error)?;
        let reply = replies.pop().unwrap_or(Value::Nil);
        if let Some(heard) = replies.pop().filter(|_| cancels) {
            self.heard_cancels(heard);
        }
        for entry in read_reply(reply) {
            self.hand_out(entry, 1, asked).await;
        }
        Ok(())
    }

    /// Reads the cancels that came since the last read, without waiting.
    async fn read_cancels(&mut self) -> Result<(), Error> {
        self.cancels_read = Instant::now();
        let cancels: Value = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(CANCELS_BATCH)
            .arg("STREAMS")
            .arg(&self.cancels)
            .arg(&self.cancels_after)
            .query_async(&mut self.connection)
            .await
            .map_err(redis_error)?;
        self.heard_cancels(cancels);
        Ok(())
    }

    /// Hears of the cancelled calls in an `XREAD` reply of the stream of cancels: the delivery holding a
    /// call's request is signalled, or, if none does, the call is remembered for a request read later.
    fn heard_cancels(&mut self, reply: Value) {
        for entry in read_reply(reply) {
            self.cancels_after = entry.id;
            let Some(correlation) = entry
                .fields
                .iter()
                .find(|(name, _)| name.as_slice() == b"c")
                .and_then(|(_, id)| Uuid::try_parse_ascii(id).ok())
            else {
                continue;
            };
            let held = self
                .held
                .entries()
                .iter()
                .find(|(_, lease)| lease.correlation == Some(correlation))
                .map(|(tag, _)| *tag);
            match held {
                Some(tag) => self.held.cancellations.cancel(tag),
                None => self.early.insert(correlation),
            }
        }
    }

    /// Moves the queue's delayed entries that are due to its stream, when it is time to look: at the due time
    /// of the next one, or a tick after the last look (other processes add delayed entries too).
    async fn promote_due(&mut self) -> Result<(), Error> {
        let now = Instant::now();
        if let Some(due) = self.held.due().take() {
            self.next_promote = self.next_promote.min(due);
        }
        if now < self.next_promote {
            return Ok(());
        }
        let next: i64 = self
            .promote
            .key(self.inner.delayed_key(&self.target.name))
            .key(self.inner.delayed_entries_key(&self.target.name))
            .key(&self.target.stream)
            .key(self.inner.meta_key(&self.target.name))
            .arg(PROMOTE_BATCH)
            .invoke_async(&mut self.connection)
            .await
            .map_err(redis_error)?;
        let wait = u64::try_from(next).map_or(TICK, |millis| Duration::from_millis(millis).min(TICK));
        self.next_promote = now + wait;
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

    /// Deletes the group's consumers that hold nothing and have been given nothing for twice the visibility
    /// timeout: the names of consumers whose process went away would otherwise pile up in the group. A live one
    /// among them is listed again with its next delivery.
    async fn sweep_consumers(&mut self) -> Result<(), Error> {
        let idle = u64::try_from(self.inner.options.visibility.as_millis()).unwrap_or(u64::MAX / 2).saturating_mul(2);
        let removed: i64 = self
            .sweep
            .key(&self.target.stream)
            .arg(&self.target.group)
            .arg(idle)
            .invoke_async(&mut self.connection)
            .await
            .map_err(redis_error)?;
        if removed > 0 {
            tracing::debug!(removed, stream = %self.target.stream, "deleted consumers that went away");
        }
        Ok(())
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
        let asked = Instant::now();
        let claimed: Value = claim.query_async(&mut self.connection).await.map_err(redis_error)?;
        let mut entries = Vec::new();
        stream_entries(claimed, &mut entries);
        for entry in entries {
            // Claimed: this delivery counts too.
            let count = counts.get(&entry.id).copied().unwrap_or(0).saturating_add(1);
            self.hand_out(entry, count, asked).await;
        }
        Ok(())
    }

    /// Resets the idle time of the entries this consumer holds, so that nobody claims them while they run;
    /// those another consumer claimed already are marked lost.
    async fn renew_leases(&mut self) -> Result<(), Error> {
        let held: Vec<(u64, String)> =
            self.held.entries().iter().map(|(tag, lease)| (*tag, lease.id.clone())).collect();
        if held.is_empty() {
            return Ok(());
        }
        let mut invocation = self.renew.key(&self.target.stream);
        invocation.arg(&self.target.group).arg(&self.consumer);
        for (_, id) in &held {
            invocation.arg(id);
        }
        let asked = Instant::now();
        let lost: Vec<String> = invocation.invoke_async(&mut self.connection).await.map_err(redis_error)?;
        {
            let mut entries = self.held.entries();
            for (tag, id) in &held {
                if !lost.contains(id)
                    && let Some(lease) = entries.get_mut(tag)
                {
                    lease.since = asked;
                }
            }
        }
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

    /// Hands out one entry delivered `redis_count` times by Redis (copies carry the deliveries before them), by a
    /// command sent at `asked`.
    async fn hand_out(&mut self, entry: Entry, redis_count: u32, asked: Instant) {
        let received_at = Instant::now();
        let (envelope, before, sent_at) = decode(entry.fields, &self.inner.options.limits);
        let delivery_count = before.saturating_sub(1).saturating_add(redis_count.max(1));
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        let correlation = match &envelope {
            Ok(envelope) => envelope.correlation_id,
            Err((envelope, _)) => envelope.correlation_id,
        };
        self.held.entries().insert(tag, Lease { id: entry.id, count: delivery_count, correlation, since: asked });
        if let Some(correlation) = correlation.filter(|id| self.target.queue && self.early.take(*id)) {
            // Its call was cancelled before it came: dropped unrun, and counted as cancelled.
            self.drop_cancelled(tag, correlation).await;
            return;
        }
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
        let delivery = Delivery { envelope: Arc::new(envelope), delivery_count, queued, received_at, handle };
        let _ = self.sender.send(delivery);
    }
}

impl Reader {
    /// Acks the delivery `tag` of a cancelled call unrun, and counts it in the queue's `cancelled`.
    async fn drop_cancelled(&self, tag: u64, correlation: Uuid) {
        if let Err(error) = self.acker.settle_now(tag, Outcome::Ack).await {
            tracing::debug!(%error, %correlation, "could not drop a cancelled call's request; it is delivered again");
            return;
        }
        let mut connection = self.inner.commands.clone();
        let counted: Result<i64, _> = redis::cmd("HINCRBY")
            .arg(self.inner.meta_key(&self.target.name))
            .arg("cancelled")
            .arg(1)
            .query_async(&mut connection)
            .await;
        if let Err(error) = counted {
            tracing::debug!(%error, "could not count a cancelled call");
        }
    }
}

/// One entry of a stream, as read: its id and its field names and values, taken out of the reply as they are.
pub(super) struct Entry {
    pub(super) id: String,
    pub(super) fields: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The entries of an `XREAD` or `XREADGROUP` reply (streams and their entries, RESP2 or RESP3); none for a
/// read that timed out.
pub(super) fn read_reply(reply: Value) -> Vec<Entry> {
    let mut out = Vec::new();
    match reply {
        Value::Array(streams) => {
            for stream in streams {
                if let Value::Array(mut pair) = stream
                    && let Some(entries) = pair.pop()
                {
                    stream_entries(entries, &mut out);
                }
            }
        }
        Value::Map(streams) => {
            for (_, entries) in streams {
                stream_entries(entries, &mut out);
            }
        }
        _ => {}
    }
    out
}

/// Appends a list of entries (`XCLAIM`'s reply, or one stream's in a read) to `out`. An entry without fields
/// (deleted while pending) comes out empty; names or values that are not strings are dropped.
pub(super) fn stream_entries(entries: Value, out: &mut Vec<Entry>) {
    let Value::Array(entries) = entries else { return };
    out.reserve(entries.len());
    for entry in entries {
        let Value::Array(parts) = entry else { continue };
        let mut parts = parts.into_iter();
        let id = match parts.next() {
            Some(Value::BulkString(id)) => String::from_utf8(id).ok(),
            Some(Value::SimpleString(id)) => Some(id),
            _ => None,
        };
        let Some(id) = id else { continue };
        let mut fields = Vec::new();
        if let Some(Value::Array(values)) = parts.next() {
            fields.reserve(values.len() / 2);
            let mut values = values.into_iter();
            while let (Some(name), Some(value)) = (values.next(), values.next()) {
                if let (Value::BulkString(name), Value::BulkString(value)) = (name, value) {
                    fields.push((name, value));
                }
            }
        }
        out.push(Entry { id, fields });
    }
}

/// An entry's envelope (or what could be read of it, and why it is not a call: it is larger than the limits
/// allow), the deliveries before this copy (1 when none), and when it was sent by the sender's clock. The body
/// is the arguments' bytes as they are: the worker decodes them, checked, and answers status 3 when they do not.
pub(super) fn decode(
    mut fields: Vec<(Vec<u8>, Vec<u8>)>,
    limits: &rpc_core::codec::Limits,
) -> (Result<Envelope, (Envelope, String)>, u32, Option<u64>) {
    let size = fields.iter().fold(0usize, |size, (name, value)| size.saturating_add(name.len() + value.len()));
    let text = |name: &str| {
        fields
            .iter()
            .find(|(field, _)| field.as_slice() == name.as_bytes())
            .and_then(|(_, value)| std::str::from_utf8(value).ok()?.parse::<u64>().ok())
    };
    if let Some(at) = fields.iter().position(|(name, _)| name.as_slice() == super::ENVELOPE.as_bytes()) {
        // Written by mqrpc: the envelope whole, checked before it is decoded.
        let sent_at = text(headers::SENT_AT_MS);
        let before = text(crate::adapter::fields::DELIVERY_COUNT)
            .and_then(|count| u32::try_from(count).ok())
            .unwrap_or(1)
            .max(1);
        let bytes = bytes::Bytes::from(std::mem::take(&mut fields[at].1));
        let decoded = if size > limits.max_frame {
            Err(format!("an entry of {size} bytes is past the limit of {}", limits.max_frame))
        } else {
            rpc_core::codec::decode_envelope_bytes(&bytes, limits).map_err(|error| error.to_string())
        };
        return match decoded {
            Ok(envelope) => (Ok(envelope), before, sent_at),
            Err(why) => {
                let mut envelope = Envelope::new(rpc_core::Kind::Request);
                if let Some((reply_to, correlation_id)) = rpc_core::codec::reply_address_of(&bytes, limits) {
                    envelope.reply_to = Some(reply_to);
                    envelope.correlation_id = correlation_id;
                }
                (Err((envelope, why)), before, sent_at)
            }
        };
    }
    let body = fields
        .iter_mut()
        .find(|(name, _)| name.as_slice() == super::BODY.as_bytes())
        .map(|(_, body)| bytes::Bytes::from(std::mem::take(body)))
        .unwrap_or_default();
    let texts = fields
        .iter()
        .filter(|(name, _)| name.as_slice() != super::BODY.as_bytes())
        .filter_map(|(name, value)| Some((std::str::from_utf8(name).ok()?, std::str::from_utf8(value).ok()?)));
    let fields = Fields::read(texts);
    let sent_at = fields.sent_at_ms;
    let (envelope, before) = fields.envelope(body);
    if size > limits.max_frame {
        let why = format!("an entry of {size} bytes is past the limit of {}", limits.max_frame);
        return (Err((envelope, why)), before, sent_at);
    }
    (Ok(envelope), before, sent_at)
}

/// An answer (or a publish) for a delivery, waiting for the next batch.
struct Answer {
    /// The delivery's entry.
    id: String,
    /// Where it goes: a queue's stream, or an inbox's.
    target: String,
    inbox: bool,
    /// Ack the delivery with it.
    ack: bool,
    /// Check first that the consumer still holds the delivery (its lease is old enough that another consumer
    /// may have claimed it).
    check: bool,
    fields: Vec<(String, bytes::Bytes)>,
    /// 1 sent, 0 the inbox is gone, -1 the delivery is not the consumer's.
    done: oneshot::Sender<Result<i64, Error>>,
}

/// A consumer's answers on their way to Redis. An answer that finds no batch out is sent at once from its
/// handler's own task; those that come while a batch is out wait, and go together (up to [`ANSWER_BATCH`]) in
/// the next, sent by a task of their own. Answers whose delivery nobody else can hold yet go in one
/// `MULTI`/`EXEC` (their entries acked and deleted with one `XACK` and one `XDEL`); the others through the script
/// that checks each delivery is still the consumer's.
struct Outbox {
    waiting: Mutex<Waiting>,
    inner: Arc<Inner>,
    stream: String,
    group: String,
    consumer: String,
    /// A queue's stream: entries are deleted once acked.
    queue: bool,
    script: Script,
}

struct Waiting {
    answers: Vec<Answer>,
    /// A batch is out; while it is, nothing else sends (and `answers` is empty whenever it is false).
    sending: bool,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").field("stream", &self.stream).field("consumer", &self.consumer).finish()
    }
}

/// Hands the sending on when the batch it guards is done, or its task dropped it.
struct Sending(Arc<Outbox>);

impl Drop for Sending {
    fn drop(&mut self) {
        self.0.hand_on();
    }
}

impl Outbox {
    fn waiting(&self) -> MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `answer`, or leaves it for the batch after the one out; its result comes on its `done`.
    async fn send(self: &Arc<Self>, answer: Answer) {
        let batch = {
            let mut waiting = self.waiting();
            waiting.answers.push(answer);
            if waiting.sending {
                return;
            }
            waiting.sending = true;
            std::mem::take(&mut waiting.answers)
        };
        let sending = Sending(Arc::clone(self));
        self.send_batch(batch).await;
        drop(sending);
    }

    /// After a batch: what came meanwhile goes next, from a task of its own.
    fn hand_on(self: &Arc<Self>) {
        let mut waiting = self.waiting();
        if waiting.answers.is_empty() {
            waiting.sending = false;
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                drop(waiting);
                runtime.spawn(Arc::clone(self).drain());
            }
            Err(_) => {
                // No runtime left to send them: their callers get `Disconnected`, and Redis keeps the entries
                // pending for another consumer.
                waiting.answers.clear();
                waiting.sending = false;
            }
        }
    }

    async fn drain(self: Arc<Self>) {
        loop {
            let batch = {
                let mut waiting = self.waiting();
                if waiting.answers.is_empty() {
                    waiting.sending = false;
                    return;
                }
                let take = waiting.answers.len().min(ANSWER_BATCH);
                waiting.answers.drain(..take).collect::<Vec<_>>()
            };
            self.send_batch(batch).await;
        }
    }

    async fn send_batch(&self, batch: Vec<Answer>) {
        let target = Batch { stream: &self.stream, group: &self.group, consumer: &self.consumer, queue: self.queue };
        let (checked, unchecked): (Vec<Answer>, Vec<Answer>) = batch.into_iter().partition(|answer| answer.check);
        let mut connection = self.inner.commands.clone();
        if !unchecked.is_empty() {
            let results = target.send(&mut connection, &unchecked).await;
            finish(unchecked, results);
        }
        if !checked.is_empty() {
            let results = target.send_checked(&mut connection, &self.script, &checked).await;
            finish(checked, results);
        }
    }
}

/// Where a consumer's answers come from.
struct Batch<'a> {
    stream: &'a str,
    group: &'a str,
    consumer: &'a str,
    /// A queue's stream: entries are deleted once acked.
    queue: bool,
}

impl Batch<'_> {
    /// Sends `answers` in one transaction: 1 per answer sent, 0 for one to an inbox that is gone.
    async fn send(
        &self,
        connection: &mut redis::aio::ConnectionManager,
        answers: &[Answer],
    ) -> Result<Vec<i64>, redis::RedisError> {
        let mut pipeline = redis::pipe();
        pipeline.atomic();
        for answer in answers {
            let add = pipeline.cmd("XADD").arg(&answer.target);
            if answer.inbox {
                add.arg("NOMKSTREAM");
            }
            add.arg("*");
            for (name, value) in &answer.fields {
                add.arg(name.as_bytes()).arg(value.as_ref());
            }
        }
        let acked: Vec<&str> = answers.iter().filter(|answer| answer.ack).map(|answer| answer.id.as_str()).collect();
        if !acked.is_empty() {
            pipeline.cmd("XACK").arg(self.stream).arg(self.group).arg(&acked).ignore();
            if self.queue {
                pipeline.cmd("XDEL").arg(self.stream).arg(&acked).ignore();
            }
        }
        let added: Vec<Value> = pipeline.query_async(connection).await?;
        Ok(added.iter().map(|id| if matches!(id, Value::Nil) { 0 } else { 1 }).collect())
    }

    /// Sends `answers` through the script that checks each delivery: 1 sent, 0 the inbox is gone, -1 the
    /// delivery is not the consumer's.
    async fn send_checked(
        &self,
        connection: &mut redis::aio::ConnectionManager,
        script: &Script,
        answers: &[Answer],
    ) -> Result<Vec<i64>, redis::RedisError> {
        let flag = |on: bool| if on { "1" } else { "0" };
        let mut invocation = script.key(self.stream);
        for answer in answers {
            invocation.key(&answer.target);
        }
        invocation.arg(self.group).arg(self.consumer).arg(flag(self.queue));
        for answer in answers {
            invocation.arg(&answer.id).arg(flag(answer.inbox)).arg(flag(answer.ack)).arg(answer.fields.len() * 2);
            for (name, value) in &answer.fields {
                invocation.arg(name.as_bytes()).arg(value.as_ref());
            }
        }
        invocation.invoke_async(connection).await
    }
}

/// Gives each of `answers` its result.
fn finish(answers: Vec<Answer>, results: Result<Vec<i64>, redis::RedisError>) {
    match results {
        Ok(results) => {
            let mut results = results.into_iter();
            for answer in answers {
                let result = results
                    .next()
                    .ok_or_else(|| Error::Transport("Redis returned fewer results than answers sent".into()));
                let _ = answer.done.send(result);
            }
        }
        Err(error) => {
            for answer in answers {
                let _ = answer.done.send(Err(shared_error(&error)));
            }
        }
    }
}

/// [`redis_error`] for an error that fails many answers.
fn shared_error(error: &redis::RedisError) -> Error {
    if error.is_io_error() || error.is_connection_dropped() || error.is_timeout() {
        Error::Disconnected
    } else {
        Error::Transport(error.to_string().into())
    }
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
    outbox: Arc<Outbox>,
    settle: Script,
    hold: Script,
    /// The queue's or topic's name.
    name: String,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held").field("entries", &self.entries().len()).finish()
    }
}

impl StreamAcker {
    /// The entry of delivery `tag`, while this consumer holds it; one another consumer claimed is let go.
    fn entry(&self, tag: u64) -> Result<Lease, Error> {
        if self.held.lost().contains(&tag) {
            self.forget(tag);
            self.counters.unacked.fetch_sub(1, Ordering::Relaxed);
            return Err(Error::DeliveryLost);
        }
        self.held.entries().get(&tag).cloned().ok_or(Error::DeliveryLost)
    }

    /// A settle of `tag` that Redis did not take: the entry stays pending there, and once idle past the
    /// visibility timeout another consumer (or this one) claims it. This consumer lets it go, renewing it no more.
    fn failed(&self, tag: u64, error: Error) -> Error {
        self.forget(tag);
        self.counters.unacked.fetch_sub(1, Ordering::Relaxed);
        error
    }

    fn forget(&self, tag: u64) {
        self.held.entries().remove(&tag);
        self.held.lost().remove(&tag);
        self.held.cancellations.forget(tag);
        self.held.settled.notify_waiters();
    }

    async fn settle_now(&self, tag: u64, outcome: Outcome) -> Result<(), Error> {
        let Lease { id, count: delivery_count, .. } = self.entry(tag)?;
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
            .map_err(|error| self.failed(tag, redis_error(error)))?;
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
        let Lease { id, since, .. } = self.entry(tag)?;
        // Nobody can have claimed an entry whose lease is younger than half the visibility timeout.
        let check = since.elapsed() >= self.inner.options.visibility / 2;
        let target = if inbox { queue.to_owned() } else { self.inner.queue_key(queue) };
        let compact = self.inner.options.compact && (!inbox || self.inner.is_inbox(&target));
        let fields = super::entry_fields(&envelope, compact)?;
        let (done, result) = oneshot::channel();
        let answer = Answer { id, target, inbox, ack, check, fields, done };
        self.outbox.send(answer).await;
        let sent = match result.await {
            Ok(Ok(sent)) => sent,
            Ok(Err(error)) => return Err(self.failed(tag, error)),
            Err(_) => return Err(self.failed(tag, Error::Disconnected)),
        };
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

impl StreamAcker {
    /// Holds `envelope` in `queue`'s delayed set for `delay` milliseconds in place of delivery `tag`, which is
    /// acked: a worker's retry, its backoff waited out in Redis. Fenced by the delivery, in one script.
    async fn hold_fenced(&self, tag: u64, queue: &str, mut envelope: Envelope, delay: u64) -> Result<(), Error> {
        let Lease { id, .. } = self.entry(tag)?;
        envelope.delay_ms = None;
        let fields = super::entry_fields(&envelope, self.inner.options.compact)?;
        let mut invocation = self.hold.key(self.inner.delayed_key(queue));
        invocation
            .key(self.inner.delayed_entries_key(queue))
            .key(&self.stream)
            .arg(&self.group)
            .arg(&id)
            .arg(&self.consumer)
            .arg(if self.queue { "1" } else { "0" })
            .arg(delay)
            .arg(super::delayed_member(&envelope));
        for (name, value) in &fields {
            invocation.arg(name.as_bytes()).arg(value.as_ref());
        }
        let mut connection = self.inner.commands.clone();
        let done: i64 =
            invocation.invoke_async(&mut connection).await.map_err(|error| self.failed(tag, redis_error(error)))?;
        self.forget(tag);
        self.counters.unacked.fetch_sub(1, Ordering::Relaxed);
        if done < 0 {
            return Err(Error::DeliveryLost);
        }
        Counters::bump(&self.counters.acked);
        if queue == self.name {
            // This consumer moves it to the stream when it is due.
            let due = Instant::now() + Duration::from_millis(delay);
            let mut next = self.held.due();
            *next = Some(next.map_or(due, |earlier| earlier.min(due)));
        }
        Ok(())
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

    fn republish<'a>(&'a self, tag: u64, queue: &'a str, envelope: Envelope) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            match envelope.delay_ms {
                Some(delay) if delay > 0 => self.hold_fenced(tag, queue, envelope, delay).await,
                // The copy and the ack in one step.
                _ => match self.publish_fenced(tag, queue, false, envelope, true).await? {
                    Answered::Sent => Ok(()),
                    Answered::Undeliverable => Err(Error::NoRoute(queue.to_owned())),
                },
            }
        })
    }

    fn cancelled(&self, tag: u64) -> Option<BoxFuture<'static, ()>> {
        self.queue.then(|| self.held.cancellations.watch(tag))
    }

    fn revoked(&self, tag: u64) -> bool {
        self.held.lost().contains(&tag)
    }
}
