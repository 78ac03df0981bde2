//! Consumers: a consumer group per queue or subscriber group, with the offsets committed as deliveries are
//! settled, and an inbox read without a group.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance};
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use rpc_core::transport::{AckHandle, Acker, BoxFuture, Confirm, ConsumerControl, Delivery, Inbox, Outcome};
use rpc_core::{ConsumeOptions, Envelope, Error, QueueStats};
use tokio::sync::{mpsc, watch};

use super::order::{Admit, GAP_RETRY, InOrder};
use super::{ADMIN_TIMEOUT, Kafka, UserProperties, broker_error, client_config, mapping, millis, transport_error};

/// Where a group with no committed offsets starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum GroupStart {
    /// At the beginning of the topic: a queue's group reads what was published before its first worker.
    Committed,
    /// At the end of the topic, as it is when the group is first joined: a subscriber group receives what is
    /// published from then on.
    End,
}

/// How often a group consumer commits the offsets its settles stored.
const COMMIT_INTERVAL: &str = "250";
/// How long the broker may hold a fetch that finds no record (tansu holds every fetch this long).
const FETCH_WAIT: &str = "100";
/// How long a consumer waits for its first assignment before its `consume` returns anyway.
const JOIN_WAIT: Duration = Duration::from_secs(30);
/// How often a consumer marks how far it handed records out (a worker killed within this much of a delivery
/// leaves it to be counted as a first delivery).
const MARK_INTERVAL: Duration = Duration::from_millis(100);
/// How long a consumer's thread waits for a record before it looks at its flags again.
const POLL: Duration = Duration::from_millis(100);
/// How long a consumer that holds its prefetch waits for a settle before it pauses its partitions. Pausing drops
/// the records librdkafka fetched ahead for them (they are fetched again on resume), so a consumer that is full
/// only until its next settle waits instead; a longer wait would hold up a rebalance, served only by `poll`.
const FULL_WAIT: Duration = Duration::from_millis(500);
/// The pause after a failed read before the next.
const READ_BACKOFF: Duration = Duration::from_millis(100);

/// The deliveries of one group consumer not settled yet, by partition, and what each partition may commit.
#[derive(Debug, Default)]
struct Tracker {
    state: Mutex<TrackerState>,
    /// Notified when a delivery stops being held: room for another under the prefetch.
    room: Condvar,
}

#[derive(Debug, Default)]
struct TrackerState {
    /// Bumped at each assignment: a delivery made under an earlier one of its partition is revoked.
    generation: u64,
    partitions: HashMap<i32, Partition>,
    held: HashMap<u64, Held>,
    next_tag: u64,
    /// The consumer is going: a wait for room ends at once.
    stopping: bool,
}

/// An offset commit of one partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Commit {
    partition: i32,
    /// The next record to read: every one below it is settled.
    offset: i64,
    /// One past the highest record handed out so far, by this consumer or an earlier owner: the commit's
    /// metadata, from which the next owner counts a redelivery.
    delivered: i64,
}

#[derive(Debug)]
struct Partition {
    generation: u64,
    /// Delivered and not settled.
    outstanding: BTreeSet<i64>,
    /// One past the highest offset delivered (-1: none yet).
    next: i64,
    /// The offset last committed by this consumer (-1: none).
    committed: i64,
    /// Records below this offset were handed out before, by an earlier owner of the partition (as it marked
    /// in the group's marker group).
    seen_before: i64,
    /// How far this consumer marked records handed out, in the marker group.
    marked: i64,
    /// The order the partition's records are handed out in, across the broker's gaps.
    order: InOrder,
}

#[derive(Debug)]
struct Held {
    partition: i32,
    offset: i64,
    generation: u64,
    /// The message, for a requeue or a dead-lettering (none for auto-acked deliveries).
    envelope: Option<Envelope>,
    delivery_count: u32,
}

impl Tracker {
    fn lock(&self) -> MutexGuard<'_, TrackerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a delivery of a record whose headers count `delivery_count`; returns its tag and its delivery
    /// count, one more for a record an earlier owner of the partition handed out.
    fn deliver(&self, partition: i32, offset: i64, envelope: Option<Envelope>, delivery_count: u32) -> (u64, u32) {
        let mut state = self.lock();
        let state = &mut *state;
        let generation = state.generation;
        let part = state.partitions.entry(partition).or_insert_with(|| Partition::new(generation, -1, -1));
        part.outstanding.insert(offset);
        part.next = part.next.max(offset + 1);
        let delivery_count = if offset < part.seen_before { delivery_count.saturating_add(1) } else { delivery_count };
        let generation = part.generation;
        state.next_tag += 1;
        let tag = state.next_tag;
        state.held.insert(tag, Held { partition, offset, generation, envelope, delivery_count });
        (tag, delivery_count)
    }

    /// Whether the record at `offset` of `partition`, just read, is handed out (see [`InOrder`]).
    fn admit(&self, partition: i32, offset: i64, now: Instant) -> Admit {
        let mut state = self.lock();
        let generation = state.generation;
        let part = state.partitions.entry(partition).or_insert_with(|| Partition::new(generation, -1, -1));
        part.order.admit(offset, now)
    }

    /// The partitions `(partition, offset)` to read again from a missing offset now.
    fn rereads_due(&self, now: Instant) -> Vec<(i32, i64)> {
        let mut state = self.lock();
        state
            .partitions
            .iter_mut()
            .filter_map(|(partition, part)| part.order.reread_due(now).map(|offset| (*partition, offset)))
            .collect()
    }

    /// Whether a partition waits for a missing offset.
    fn waiting(&self) -> bool {
        self.lock().partitions.values().any(|part| part.order.waiting())
    }

    /// Whether delivery `tag` is still this consumer's.
    fn holds(&self, tag: u64) -> bool {
        let state = self.lock();
        state.held.get(&tag).is_some_and(|held| state.is_current(held))
    }

    /// The message of delivery `tag` and its count, while the delivery is this consumer's.
    fn message(&self, tag: u64) -> Option<(Envelope, u32)> {
        let state = self.lock();
        let held = state.held.get(&tag).filter(|held| state.is_current(held))?;
        Some((held.envelope.clone()?, held.delivery_count))
    }

    /// Settles delivery `tag`: `Ok(Some(commit))` when its partition may now commit further, `Err` when the
    /// delivery is no longer this consumer's.
    fn settle(&self, tag: u64) -> Result<Option<Commit>, Error> {
        let mut state = self.lock();
        let held = state.held.remove(&tag).ok_or(Error::DeliveryLost)?;
        self.room.notify_all();
        if !state.is_current(&held) {
            return Err(Error::DeliveryLost);
        }
        let Some(part) = state.partitions.get_mut(&held.partition) else { return Err(Error::DeliveryLost) };
        part.outstanding.remove(&held.offset);
        Ok(part.advance().map(|offset| Commit { partition: held.partition, offset, delivered: part.delivered() }))
    }

    /// Forgets delivery `tag` without committing past it: it comes again after the next rebalance.
    fn release(&self, tag: u64) {
        self.lock().held.remove(&tag);
        self.room.notify_all();
    }

    /// Deliveries handed out, still this consumer's, and not settled.
    fn outstanding(&self) -> usize {
        self.lock().held.len()
    }

    /// Waits up to `timeout` until fewer than `limit` deliveries are held, or the consumer is going; returns
    /// whether there is room.
    fn wait_for_room(&self, limit: usize, timeout: Duration) -> bool {
        let state = self.lock();
        let (state, _) = self
            .room
            .wait_timeout_while(state, timeout, |state| state.held.len() >= limit && !state.stopping)
            .unwrap_or_else(PoisonError::into_inner);
        state.held.len() < limit
    }

    /// The consumer is going: ends a wait for room.
    fn stop(&self) {
        self.lock().stopping = true;
        self.room.notify_all();
    }

    /// The partitions of `revoked` leave this consumer: returns what each commits, settled or not, so that
    /// the next owner knows which records were handed out already.
    fn revoke(&self, revoked: &[i32]) -> Vec<Commit> {
        let mut state = self.lock();
        state.held.retain(|_, held| !revoked.contains(&held.partition));
        self.room.notify_all();
        let mut commits = Vec::new();
        for partition in revoked {
            if let Some(mut part) = state.partitions.remove(partition) {
                part.advance();
                if part.committed >= 0 {
                    commits.push(Commit { partition: *partition, offset: part.committed, delivered: part.delivered() });
                }
            }
        }
        commits
    }

    /// The marks due: partitions `(partition, one past the last record handed out)` whose mark moved since it
    /// was last taken.
    fn marks(&self) -> Vec<(i32, i64)> {
        let mut state = self.lock();
        let mut marks = Vec::new();
        for (partition, part) in &mut state.partitions {
            let delivered = part.delivered();
            if delivered > part.marked {
                part.marked = delivered;
                marks.push((*partition, delivered));
            }
        }
        marks
    }

    /// Partitions `(partition, committed offset, seen before)` are this consumer's now.
    fn assign(&self, assigned: &[(i32, i64, i64)]) {
        let mut state = self.lock();
        state.generation += 1;
        let generation = state.generation;
        for (partition, committed, seen_before) in assigned {
            state.partitions.insert(*partition, Partition::new(generation, *committed, *seen_before));
        }
    }
}

impl TrackerState {
    fn is_current(&self, held: &Held) -> bool {
        self.partitions.get(&held.partition).is_some_and(|part| part.generation == held.generation)
    }
}

impl Partition {
    fn new(generation: u64, committed: i64, seen_before: i64) -> Partition {
        Partition {
            generation,
            outstanding: BTreeSet::new(),
            next: -1,
            committed,
            seen_before,
            marked: seen_before,
            order: InOrder::starting_at(Some(committed)),
        }
    }

    /// The offset this partition may commit now, if it is past the last commit.
    fn advance(&mut self) -> Option<i64> {
        let point = self.outstanding.first().copied().unwrap_or(self.next);
        (point > self.committed).then(|| {
            self.committed = point;
            point
        })
    }

    fn delivered(&self) -> i64 {
        self.next.max(self.seen_before)
    }
}

/// The context of a group consumer: commits what is settled before partitions go, and counts assignments.
struct GroupContext {
    topic: String,
    tracker: Arc<Tracker>,
    assigned: watch::Sender<u64>,
    /// A consumer of the group's marker group, whose committed offsets say how far the group's members
    /// handed records out: a record below its partition's mark was delivered before.
    marker: Arc<BaseConsumer>,
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            tracing::debug!(topic = %self.topic, "revoked");
            let partitions: Vec<i32> = list.elements().iter().map(|element| element.partition()).collect();
            let commits = self.tracker.revoke(&partitions);
            if !commits.is_empty() {
                let settled: Vec<(i32, i64)> = commits.iter().map(|commit| (commit.partition, commit.offset)).collect();
                // Synchronous: the partitions' next owner starts from these offsets.
                if let Err(error) = consumer.commit(&offsets(&self.topic, &settled), CommitMode::Sync) {
                    tracing::warn!(%error, topic = %self.topic, "could not commit before a rebalance; settled calls run again");
                }
            }
            let marks: Vec<(i32, i64)> = commits
                .iter()
                .filter(|commit| commit.delivered >= 0)
                .map(|commit| (commit.partition, commit.delivered))
                .collect();
            mark(&self.marker, &self.topic, &marks);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                // What the partitions' earlier owners committed, and how far they handed records out.
                let committed = committed_offsets(consumer, &self.topic, list);
                let marked = committed_offsets(&self.marker, &self.topic, list);
                let partitions: Vec<(i32, i64, i64)> = committed
                    .iter()
                    .map(|(partition, offset)| {
                        let seen = marked.iter().find(|(other, _)| other == partition).map_or(-1, |(_, mark)| *mark);
                        (*partition, *offset, seen)
                    })
                    .collect();
                tracing::debug!(topic = %self.topic, ?partitions, "assigned");
                self.tracker.assign(&partitions);
                self.assigned.send_modify(|count| *count += 1);
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(error) => tracing::warn!(%error, topic = %self.topic, "rebalance failed"),
        }
    }
}

/// The marker group of consumer group `group`.
pub(super) fn marker_group(group: &str) -> String {
    format!("{group}.mqrpc-delivered")
}

/// The offsets `consumer`'s group committed for the partitions of `list` (-1: none).
fn committed_offsets<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    list: &TopicPartitionList,
) -> Vec<(i32, i64)> {
    let committed = consumer.committed_offsets(list.clone(), ADMIN_TIMEOUT).unwrap_or_else(|error| {
        tracing::warn!(%error, %topic, "could not read committed offsets");
        list.clone()
    });
    committed
        .elements()
        .iter()
        .map(|element| (element.partition(), element.offset().to_raw().filter(|offset| *offset >= 0).unwrap_or(-1)))
        .collect()
}

/// Commits `marks` to the marker group of `marker`, waiting for the broker (before partitions go).
fn mark(marker: &BaseConsumer, topic: &str, marks: &[(i32, i64)]) {
    if marks.is_empty() {
        return;
    }
    if let Err(error) = marker.commit(&offsets(topic, marks), CommitMode::Sync) {
        tracing::debug!(%error, %topic, "could not mark records handed out; a redelivery may not count");
    }
}

fn offsets(topic: &str, commits: &[(i32, i64)]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for (partition, offset) in commits {
        // Only fails for an offset librdkafka cannot represent, which a delivered record's is not.
        let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset));
    }
    tpl
}

type GroupConsumer = BaseConsumer<GroupContext>;

/// What a group consumer's task and its [`Consumer`](rpc_core::transport::Consumer) share.
#[derive(Debug, Default)]
struct Control {
    /// The consumer was dropped: the task ends.
    stopped: AtomicBool,
    /// No more deliveries (a server shutting down).
    paused: AtomicBool,
    /// `(counted, left)`: whether the consumer counts among the transport's [`Closing`] ones, and whether
    /// its thread has left the group.
    exit: Mutex<(bool, bool)>,
    closing: Arc<Closing>,
    /// A group consumer's deliveries, whose wait for room a stop ends.
    tracker: Option<Arc<Tracker>>,
}

impl Control {
    fn new(closing: &Arc<Closing>, tracker: Option<Arc<Tracker>>) -> Control {
        Control {
            stopped: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            exit: Mutex::new((false, false)),
            closing: Arc::clone(closing),
            tracker,
        }
    }

    /// The consumer's thread is done with the broker.
    fn left(&self) {
        let mut exit = self.exit.lock().unwrap_or_else(PoisonError::into_inner);
        exit.1 = true;
        if exit.0 {
            self.closing.count.fetch_sub(1, Ordering::AcqRel);
            self.closing.done.notify_waiters();
        }
    }
}

/// A transport's group consumers, while they live.
#[derive(Debug, Default)]
pub(super) struct Groups(Mutex<Vec<Weak<GroupConsumer>>>);

impl Groups {
    fn add(&self, consumer: &Arc<GroupConsumer>) {
        let mut groups = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        groups.retain(|group| group.strong_count() > 0);
        groups.push(Arc::downgrade(consumer));
    }

    /// Commits the offsets the live consumers' settles stored, waiting for the broker.
    pub(super) async fn commit(&self) -> Result<(), Error> {
        let live: Vec<Arc<GroupConsumer>> =
            self.0.lock().unwrap_or_else(PoisonError::into_inner).iter().filter_map(Weak::upgrade).collect();
        if live.is_empty() {
            return Ok(());
        }
        let committed = tokio::task::spawn_blocking(move || {
            for consumer in live {
                match consumer.commit_consumer_state(CommitMode::Sync) {
                    // Nothing stored since the last commit.
                    Ok(())
                    | Err(rdkafka::error::KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
                    Err(error) => return Err(broker_error(error)),
                }
            }
            Ok(())
        });
        committed.await.map_err(|error| Error::Transport(error.into()))?
    }
}

/// The consumers a transport's user dropped whose threads are still leaving their groups (committing what was
/// settled): [`Transport::flush`](rpc_core::Transport::flush) waits for them, so that a worker that stopped has
/// left its group before it says so, and so does a new group consumer of the transport, so that its join does
/// not meet their leaving.
#[derive(Debug, Default)]
pub(super) struct Closing {
    count: std::sync::atomic::AtomicUsize,
    done: tokio::sync::Notify,
}

impl Closing {
    /// Waits until no consumer is leaving, up to `limit`; whether none is.
    pub(super) async fn wait(&self, limit: Duration) -> bool {
        let until = tokio::time::Instant::now() + limit;
        loop {
            let done = self.done.notified();
            if self.count.load(Ordering::Acquire) == 0 {
                return true;
            }
            if tokio::time::timeout_at(until, done).await.is_err() {
                return self.count.load(Ordering::Acquire) == 0;
            }
        }
    }
}

struct Handle(Arc<Control>);

impl ConsumerControl for Handle {
    fn pause(&self) {
        self.0.paused.store(true, Ordering::Release);
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        let mut exit = self.0.exit.lock().unwrap_or_else(PoisonError::into_inner);
        if !exit.1 && !exit.0 {
            exit.0 = true;
            self.0.closing.count.fetch_add(1, Ordering::AcqRel);
        }
        self.0.stopped.store(true, Ordering::Release);
        if let Some(tracker) = &self.0.tracker {
            tracker.stop();
        }
    }
}

/// Settles the deliveries of one group consumer.
struct GroupAcker {
    kafka: Kafka,
    topic: String,
    dead_letters: String,
    consumer: Weak<GroupConsumer>,
    tracker: Arc<Tracker>,
}

impl fmt::Debug for GroupAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupAcker").field("topic", &self.topic).finish_non_exhaustive()
    }
}

impl GroupAcker {
    /// Settles `tag` in the tracker and commits what that allows.
    fn commit(&self, tag: u64) -> Result<(), Error> {
        let settled = self.tracker.settle(tag);
        if let Some(commit) = settled? {
            let Some(consumer) = self.consumer.upgrade() else { return Err(Error::DeliveryLost) };
            let settled = offsets(&self.topic, &[(commit.partition, commit.offset)]);
            if let Err(error) = consumer.store_offsets(&settled) {
                // The partition went meanwhile: its revoke committed what was settled then.
                tracing::debug!(%error, topic = %self.topic, "could not store an offset");
            }
        }
        Ok(())
    }

    /// Puts a copy of delivery `tag` on `topic` (with `count` as its delivery count), then settles it.
    async fn move_to(&self, tag: u64, topic: &str, count: impl FnOnce(u32) -> u32) -> Result<(), Error> {
        let Some((envelope, delivery_count)) = self.tracker.message(tag) else { return Err(Error::DeliveryLost) };
        if let Err(error) = self.kafka.produce(topic, &envelope, count(delivery_count)).await {
            // Not committed past: the record comes again once its partition changes owner. It stops taking a
            // place in the prefetch meanwhile.
            self.tracker.release(tag);
            return Err(error);
        }
        self.commit(tag)
    }
}

impl Acker for GroupAcker {
    fn settle(&self, tag: u64, outcome: Outcome) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            match outcome {
                Outcome::Ack => self.commit(tag),
                Outcome::Requeue => self.move_to(tag, &self.topic, |count| count.saturating_add(1)).await,
                Outcome::DeadLetter => {
                    let dead_letters = self.dead_letters.clone();
                    self.move_to(tag, &dead_letters, |count| count).await
                }
                Outcome::Release => {
                    self.tracker.release(tag);
                    Ok(())
                }
            }
        })
    }

    fn publish<'a>(
        &'a self,
        tag: u64,
        queue: &'a str,
        envelope: Envelope,
        confirm: Confirm,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            if !self.tracker.holds(tag) {
                return Err(Error::DeliveryLost);
            }
            let _ = confirm;
            self.kafka.publish_to(queue, envelope, 1).await
        })
    }

    fn revoked(&self, tag: u64) -> bool {
        !self.tracker.holds(tag)
    }
}

/// Starts a consumer of `topic` in the group `group`, and returns once it has joined it.
pub(super) async fn start_group(
    kafka: Kafka,
    topic: String,
    group: String,
    options: ConsumeOptions,
    max_deliveries: Option<u32>,
    start: GroupStart,
) -> Result<rpc_core::transport::Consumer, Error> {
    // A consumer of this transport still leaving its group (one dropped just before) would meet this one's
    // join, which tansu 0.6 then loses: let it go first.
    if !kafka.inner.closing.wait(ADMIN_TIMEOUT).await {
        tracing::debug!(%topic, "a consumer still leaving its group; joining anyway");
    }
    if start == GroupStart::End {
        start_at_end(&kafka, &topic, &group).await?;
    }
    let tracker = Arc::new(Tracker::default());
    let (assigned, mut joined) = watch::channel(0);
    let marker: BaseConsumer = client_config(&kafka.inner.brokers)
        .set("group.id", marker_group(&group))
        .set("enable.auto.commit", "false")
        .user(&kafka.inner.options)
        .create()
        .map_err(transport_error)?;
    let marker = Arc::new(marker);
    let context =
        GroupContext { topic: topic.clone(), tracker: Arc::clone(&tracker), assigned, marker: Arc::clone(&marker) };
    let session = kafka.inner.options.session_timeout;
    let consumer: GroupConsumer = client_config(&kafka.inner.brokers)
        .set("group.id", &group)
        // A settle stores its partition's offset; librdkafka commits what is stored every 250 ms, this
        // consumer commits it again before partitions go, and the transport's flush commits it at once.
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", COMMIT_INTERVAL)
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", millis(session))
        .set("heartbeat.interval.ms", millis(session / 3))
        .set("fetch.wait.max.ms", FETCH_WAIT)
        .user(&kafka.inner.options)
        .create_with_context(context)
        .map_err(transport_error)?;
    consumer.subscribe(&[&topic]).map_err(transport_error)?;
    let consumer = Arc::new(consumer);
    kafka.inner.groups.add(&consumer);
    let control = Arc::new(Control::new(&kafka.inner.closing, Some(Arc::clone(&tracker))));
    let dead_letters = super::topic_name(&rpc_core::naming::dead_letter_queue(&topic))?;
    let acker = Arc::new(GroupAcker {
        kafka,
        topic: topic.clone(),
        dead_letters,
        consumer: Arc::downgrade(&consumer),
        tracker,
    });
    let (sender, receiver) = mpsc::unbounded_channel();
    let runtime = tokio::runtime::Handle::current();
    let task =
        GroupTask { consumer, acker, control: Arc::clone(&control), sender, options, max_deliveries, marker, runtime };
    std::thread::Builder::new()
        .name("mqrpc-kafka-group".into())
        .spawn(move || task.run())
        .map_err(|error| Error::Transport(error.into()))?;
    // A worker that returned serves: wait for the group to hand this consumer its share.
    let joined = tokio::time::timeout(JOIN_WAIT, joined.wait_for(|count| *count > 0)).await;
    if !matches!(joined, Ok(Ok(_))) {
        tracing::warn!(%topic, %group, "no partitions assigned yet; consuming once the group has them");
    }
    Ok(rpc_core::transport::Consumer::from_channel(receiver, Some(Box::new(Handle(control)))))
}

/// Commits the end of `topic` for `group` where the group has no offset yet, so that it starts there.
async fn start_at_end(kafka: &Kafka, topic: &str, group: &str) -> Result<(), Error> {
    let partitions = kafka.partitions_of(topic).await?;
    let mut config = client_config(&kafka.inner.brokers);
    config.user(&kafka.inner.options);
    let (topic, group) = (topic.to_owned(), group.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config
            .clone()
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(transport_error)?;
        let all = offsets(&topic, &partitions.iter().map(|partition| (*partition, 0)).collect::<Vec<_>>());
        let committed = consumer.committed_offsets(all, ADMIN_TIMEOUT).map_err(broker_error)?;
        let mut ends = Vec::new();
        for element in committed.elements() {
            if matches!(element.offset(), Offset::Invalid) {
                let (_, high) =
                    consumer.fetch_watermarks(&topic, element.partition(), ADMIN_TIMEOUT).map_err(broker_error)?;
                ends.push((element.partition(), high));
            }
        }
        if !ends.is_empty() {
            consumer.commit(&offsets(&topic, &ends), CommitMode::Sync).map_err(broker_error)?;
        }
        Ok(())
    })
    .await
    .map_err(|error| Error::Transport(error.into()))?
}

struct GroupTask {
    consumer: Arc<GroupConsumer>,
    acker: Arc<GroupAcker>,
    control: Arc<Control>,
    sender: mpsc::UnboundedSender<Delivery>,
    options: ConsumeOptions,
    max_deliveries: Option<u32>,
    marker: Arc<BaseConsumer>,
    /// For the publishes the thread makes (a dead-lettering).
    runtime: tokio::runtime::Handle,
}

impl GroupTask {
    /// Reads and hands out records until the consumer is dropped. It runs on a thread of its own: librdkafka
    /// calls the rebalance callbacks, which commit and read offsets and wait for the broker, from `poll`.
    fn run(self) {
        let mut paused = false;
        let mut marked_at = Instant::now();
        loop {
            if marked_at.elapsed() >= MARK_INTERVAL {
                marked_at = Instant::now();
                let marks = self.acker.tracker.marks();
                if !marks.is_empty()
                    && let Err(error) = self.marker.commit(&offsets(&self.acker.topic, &marks), CommitMode::Async)
                {
                    tracing::debug!(%error, "could not mark records handed out; a redelivery may not count");
                }
                // Serves the marks' commit results.
                let _ = self.marker.poll(Duration::ZERO);
            }
            if self.control.stopped.load(Ordering::Acquire) || self.sender.is_closed() {
                break;
            }
            let prefetch = self.options.prefetch as usize;
            let tracker = &self.acker.tracker;
            let mut full = prefetch > 0 && tracker.outstanding() >= prefetch;
            if full && !paused {
                // Full until the next settle, most often: wait for it rather than drop what was fetched ahead.
                full = !tracker.wait_for_room(prefetch, FULL_WAIT);
                if !full {
                    continue;
                }
            }
            let hold = full || self.control.paused.load(Ordering::Acquire);
            if hold != paused {
                // Paused partitions are still polled, so the consumer keeps taking part in rebalances.
                if let Ok(assignment) = self.consumer.assignment() {
                    let switched =
                        if hold { self.consumer.pause(&assignment) } else { self.consumer.resume(&assignment) };
                    if let Err(error) = switched {
                        tracing::debug!(%error, "could not pause or resume partitions");
                    }
                }
                paused = hold;
            }
            let waiting = tracker.waiting();
            let wait = if full {
                // Paused for want of room: wait for a settle, then serve the consumer's events (rebalances).
                tracker.wait_for_room(prefetch, if waiting { GAP_RETRY } else { POLL });
                Duration::ZERO
            } else if waiting {
                GAP_RETRY
            } else {
                POLL
            };
            match self.consumer.poll(wait) {
                None => {}
                // Stopped: left uncommitted for the group's next owner of the partition.
                Some(Ok(_)) if self.control.paused.load(Ordering::Acquire) => {}
                Some(Ok(record)) => match tracker.admit(record.partition(), record.offset(), Instant::now()) {
                    Admit::Take => self.take(&record),
                    Admit::Skip => {}
                    Admit::Reread(offset) => reread(&*self.consumer, &self.acker.topic, record.partition(), offset),
                },
                Some(Err(error)) => {
                    tracing::debug!(%error, topic = %self.acker.topic, "reading failed");
                    std::thread::sleep(READ_BACKOFF);
                }
            }
            if waiting {
                for (partition, offset) in tracker.rereads_due(Instant::now()) {
                    reread(&*self.consumer, &self.acker.topic, partition, offset);
                }
            }
        }
        // Leaving the group commits what was settled (the revoke callback) as the consumer is dropped.
        let GroupTask { consumer, acker, control, .. } = self;
        drop(acker);
        consumer.unsubscribe();
        drop(consumer);
        control.left();
    }

    /// Hands `record` out, or dead-letters it unrun when it was delivered too often.
    fn take(&self, record: &BorrowedMessage<'_>) {
        let (envelope, delivery_count, queued) = mapping::from_record(record);
        let (partition, offset) = (record.partition(), record.offset());
        let tracker = &self.acker.tracker;
        if self.options.auto_ack {
            let (tag, delivery_count) = tracker.deliver(partition, offset, None, delivery_count);
            if let Err(error) = self.acker.commit(tag) {
                tracing::debug!(%error, "could not commit an auto-acked delivery");
            }
            let _ = self.sender.send(delivery(envelope, delivery_count, queued, AckHandle::auto()));
            return;
        }
        let (tag, delivery_count) = tracker.deliver(partition, offset, Some(envelope.clone()), delivery_count);
        if self.max_deliveries.is_some_and(|max| delivery_count > max) {
            let dead_letters = self.acker.dead_letters.clone();
            if let Err(error) = self.runtime.block_on(self.acker.move_to(tag, &dead_letters, |count| count)) {
                tracing::warn!(%error, "could not dead-letter a message delivered too often; it comes again");
            }
            return;
        }
        let acker: Arc<dyn Acker> = self.acker.clone();
        let _ = self.sender.send(delivery(envelope, delivery_count, queued, AckHandle::new(acker, tag)));
    }
}

/// Reads `partition` of `topic` again from `offset`, the first one missing (see [`InOrder`]).
fn reread<C: ConsumerContext>(consumer: &BaseConsumer<C>, topic: &str, partition: i32, offset: i64) {
    tracing::trace!(%topic, partition, offset, "reading again from a missing offset");
    // Asynchronous: the fetches from the offset come with the next polls.
    if let Err(error) = consumer.seek(topic, partition, Offset::Offset(offset), Duration::ZERO) {
        tracing::debug!(%error, %topic, partition, offset, "could not read a partition again from a missing offset");
    }
}

fn delivery(envelope: Envelope, delivery_count: u32, queued: Duration, handle: AckHandle) -> Delivery {
    Delivery { envelope: Arc::new(envelope), delivery_count, queued, received_at: Instant::now(), handle }
}

/// Reads the inbox topic `topic` from its start, without a group; deletes the topic when the inbox goes.
pub(super) async fn start_inbox(kafka: Kafka, topic: String) -> Result<Inbox, Error> {
    let address = topic.clone();
    let consumer = start_reader(kafka, topic, Reader::Inbox).await?;
    Ok(Inbox { address, consumer, losses: None })
}

/// What a reader without a group reads, and what it leaves behind.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Reader {
    /// A client's inbox topic, from its start; the topic is deleted with the reader.
    Inbox,
    /// A private subscription: what the topic takes from now on; the topic stays.
    Private,
}

/// Reads partition 0 of `topic` without a group, auto-acked, on a thread of its own.
pub(super) async fn start_reader(
    kafka: Kafka,
    topic: String,
    reader: Reader,
) -> Result<rpc_core::transport::Consumer, Error> {
    let consumer: BaseConsumer = client_config(&kafka.inner.brokers)
        .set("group.id", &topic)
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", FETCH_WAIT)
        .user(&kafka.inner.options)
        .create()
        .map_err(transport_error)?;
    let consumer = tokio::task::spawn_blocking(move || {
        let start = match reader {
            Reader::Inbox => 0,
            // The end as it is now, asked for rather than left to the first fetch: a publish right after this
            // returns is read.
            Reader::Private => consumer.fetch_watermarks(&topic, 0, ADMIN_TIMEOUT).map_err(broker_error)?.1,
        };
        consumer.assign(&offsets(&topic, &[(0, start)])).map_err(transport_error)?;
        Ok::<_, Error>((consumer, topic, start))
    })
    .await
    .map_err(|error| Error::Transport(error.into()))??;
    let (consumer, topic, start) = consumer;
    let control = Arc::new(Control::new(&kafka.inner.closing, None));
    let (sender, receiver) = mpsc::unbounded_channel();
    let stop = Arc::clone(&control);
    let runtime = tokio::runtime::Handle::current();
    // A thread of its own, as for groups: librdkafka's poll blocks.
    std::thread::Builder::new()
        .name("mqrpc-kafka-reader".into())
        .spawn(move || {
            let mut order = InOrder::starting_at(Some(start));
            while !stop.stopped.load(Ordering::Acquire) && !sender.is_closed() {
                match consumer.poll(if order.waiting() { GAP_RETRY } else { POLL }) {
                    None => {}
                    Some(Ok(record)) => match order.admit(record.offset(), Instant::now()) {
                        Admit::Take => {
                            let (envelope, delivery_count, queued) = mapping::from_record(&record);
                            let _ = sender.send(delivery(envelope, delivery_count, queued, AckHandle::auto()));
                        }
                        Admit::Skip => {}
                        Admit::Reread(offset) => reread(&consumer, &topic, 0, offset),
                    },
                    Some(Err(error)) => {
                        tracing::debug!(%error, %topic, "reading a topic without a group failed");
                        std::thread::sleep(READ_BACKOFF);
                    }
                }
                if let Some(offset) = order.reread_due(Instant::now()) {
                    reread(&consumer, &topic, 0, offset);
                }
            }
            drop(consumer);
            if reader == Reader::Inbox
                && let Err(error) = runtime.block_on(kafka.delete_topic(&topic))
            {
                tracing::debug!(%error, %topic, "could not delete an inbox topic");
            }
            stop.left();
        })
        .map_err(|error| Error::Transport(error.into()))?;
    Ok(rpc_core::transport::Consumer::from_channel(receiver, Some(Box::new(Handle(control)))))
}

/// The counters of the queue on `topic` (with its dead letters on `dead_letters`), from the broker.
pub(super) async fn stats(
    kafka: Kafka,
    topic: String,
    partitions: Vec<i32>,
    dead_letters: String,
    dead_partitions: Vec<i32>,
) -> Result<QueueStats, Error> {
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = client_config(&kafka.inner.brokers)
            .set("group.id", &topic)
            .set("enable.auto.commit", "false")
            .user(&kafka.inner.options)
            .create()
            .map_err(transport_error)?;
        let mut stats = QueueStats::new();
        let all = offsets(&topic, &partitions.iter().map(|partition| (*partition, 0)).collect::<Vec<_>>());
        let committed = consumer.committed_offsets(all, ADMIN_TIMEOUT).map_err(broker_error)?;
        let mut ready = 0i64;
        for element in committed.elements() {
            let (low, high) =
                consumer.fetch_watermarks(&topic, element.partition(), ADMIN_TIMEOUT).map_err(broker_error)?;
            stats.published += u64::try_from(high).unwrap_or(0);
            let from = match element.offset() {
                Offset::Offset(offset) => offset.max(low),
                _ => low,
            };
            ready += (high - from).max(0);
        }
        stats.ready = usize::try_from(ready).unwrap_or(0);
        for partition in dead_partitions {
            let (_, high) = consumer.fetch_watermarks(&dead_letters, partition, ADMIN_TIMEOUT).map_err(broker_error)?;
            stats.dead_lettered += u64::try_from(high).unwrap_or(0);
        }
        stats.consumers = match consumer.fetch_group_list(Some(&topic), ADMIN_TIMEOUT) {
            Ok(groups) => groups.groups().iter().map(|group| group.members().len()).sum(),
            Err(error) => {
                tracing::debug!(%error, "could not list the group's members");
                0
            }
        };
        Ok::<_, Error>(stats)
    })
    .await
    .map_err(|error| Error::Transport(error.into()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_commits_only_below_its_lowest_unsettled_delivery() {
        let tracker = Tracker::default();
        tracker.assign(&[(0, -1, -1)]);
        let tags: Vec<u64> = (10..14).map(|offset| tracker.deliver(0, offset, None, 1).0).collect();
        // Offsets 11 and 12 finish first: 10 still runs, so nothing may be committed.
        assert_eq!(tracker.settle(tags[1]).expect("held"), Some(Commit { partition: 0, offset: 10, delivered: 14 }));
        assert_eq!(tracker.settle(tags[2]).expect("held"), None);
        // 10 finishes: everything below 13 is settled.
        assert_eq!(tracker.settle(tags[0]).expect("held"), Some(Commit { partition: 0, offset: 13, delivered: 14 }));
        assert_eq!(tracker.settle(tags[3]).expect("held"), Some(Commit { partition: 0, offset: 14, delivered: 14 }));
        assert_eq!(tracker.outstanding(), 0);
    }

    #[test]
    fn a_full_consumer_finds_room_when_a_delivery_is_settled_elsewhere() {
        let tracker = Arc::new(Tracker::default());
        tracker.assign(&[(0, -1, -1)]);
        let (first, _) = tracker.deliver(0, 0, None, 1);
        tracker.deliver(0, 1, None, 1);
        assert!(!tracker.wait_for_room(2, Duration::from_millis(10)), "two held, no room for a third");
        assert!(tracker.wait_for_room(3, Duration::ZERO), "room under a higher limit");
        let settler = {
            let tracker = Arc::clone(&tracker);
            std::thread::spawn(move || tracker.settle(first).map(|_| ()))
        };
        // The settle on another thread wakes the wait long before its bound.
        assert!(tracker.wait_for_room(2, Duration::from_secs(60)));
        assert!(settler.join().expect("the settler ran").is_ok());
        // A consumer that is going waits for nothing.
        tracker.deliver(0, 2, None, 1);
        tracker.stop();
        let started = std::time::Instant::now();
        assert!(!tracker.wait_for_room(2, Duration::from_secs(60)));
        assert!(started.elapsed() < Duration::from_secs(30), "the stop ended the wait");
    }

    #[test]
    fn deliveries_of_a_revoked_partition_are_lost_and_the_settled_offset_is_committed() {
        let tracker = Tracker::default();
        tracker.assign(&[(0, 5, -1), (1, -1, -1)]);
        let (first, _) = tracker.deliver(0, 5, None, 1);
        let (second, _) = tracker.deliver(0, 6, None, 1);
        let (other, _) = tracker.deliver(1, 0, None, 1);
        assert!(tracker.settle(second).is_ok());
        let commits = tracker.revoke(&[0]);
        assert_eq!(commits, [Commit { partition: 0, offset: 5, delivered: 7 }]);
        assert!(!tracker.holds(first));
        assert!(matches!(tracker.settle(first), Err(Error::DeliveryLost)));
        assert!(tracker.holds(other), "the partition kept is still held");
        // Assigned again: the earlier delivery of it stays lost.
        tracker.assign(&[(0, 5, 7)]);
        assert!(!tracker.holds(first));
    }

    #[test]
    fn a_record_an_earlier_owner_handed_out_counts_one_more_delivery() {
        let tracker = Tracker::default();
        // The partition's earlier owner marked records below 7 as handed out.
        tracker.assign(&[(0, 5, 7)]);
        assert_eq!(tracker.deliver(0, 6, None, 1).1, 2);
        assert_eq!(tracker.deliver(0, 7, None, 1).1, 1);
        // The mark carries on past what this owner handed out.
        assert_eq!(tracker.marks(), [(0, 8)]);
        assert_eq!(tracker.marks(), [], "taken once until it moves");
    }

    #[test]
    fn a_released_delivery_frees_its_place_but_holds_the_commit_back() {
        let tracker = Tracker::default();
        tracker.assign(&[(0, -1, -1)]);
        let (released, _) = tracker.deliver(0, 0, None, 1);
        let (acked, _) = tracker.deliver(0, 1, None, 1);
        tracker.release(released);
        assert_eq!(tracker.outstanding(), 1);
        assert_eq!(tracker.settle(acked).expect("held"), Some(Commit { partition: 0, offset: 0, delivered: 2 }));
    }
}
