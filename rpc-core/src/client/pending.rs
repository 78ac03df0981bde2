//! The calls waiting for their reply, by correlation id, and the task that hands replies to them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{oneshot, watch};
use uuid::Uuid;

use crate::envelope::Envelope;
use crate::error::Error;

/// A call waiting for its reply.
pub(super) struct Pending {
    /// The inbox's loss count when the call was sent: a later loss means its reply may be gone.
    pub(super) epoch: u64,
    pub(super) sender: oneshot::Sender<Result<Arc<Envelope>, Error>>,
}

/// The calls waiting for their reply, in shards by the last byte of their correlation id, which a call sets to
/// its thread's shard ([`PendingMap::correlation_id`]): where replies reach their calls on the calls' own
/// threads (in process), two threads do not take the same lock or write the same table for every call.
pub(super) struct PendingMap {
    shards: Box<[Shard]>,
}

/// One shard of the pending map, on cache lines of its own.
#[repr(align(128))]
struct Shard(Mutex<hashbrown::HashMap<Uuid, Pending>>);

/// How many shards a pending map has: a power of two.
const SHARDS: usize = crate::stripe::STRIPES;

impl Default for PendingMap {
    fn default() -> PendingMap {
        PendingMap { shards: (0..SHARDS).map(|_| Shard(Mutex::default())).collect() }
    }
}

impl PendingMap {
    /// A fresh correlation id whose last byte names this thread's shard.
    /// Its time is `now`, which the call reads once for its id and its deadline.
    pub(super) fn correlation_id(now: std::time::Instant) -> Uuid {
        // A shard per stripe: SHARDS is STRIPES, which fits the low bits of a byte.
        let shard = u8::try_from(crate::stripe::thread_stripe() % SHARDS).unwrap_or(0);
        let mut bytes = *crate::envelope::new_id_at(now).as_bytes();
        // The last byte is random in a v7 id: a few of its bits name the shard instead.
        bytes[15] = (bytes[15] & !(SHARDS as u8 - 1)) | shard;
        Uuid::from_bytes(bytes)
    }

    fn shard(&self, id: &Uuid) -> MutexGuard<'_, hashbrown::HashMap<Uuid, Pending>> {
        let index = usize::from(id.as_bytes()[15]) % SHARDS;
        self.shards[index].0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn insert(&self, id: Uuid, pending: Pending) {
        self.shard(&id).insert(id, pending);
    }

    pub(super) fn remove(&self, id: &Uuid) -> Option<Pending> {
        self.shard(id).remove(id)
    }

    /// How many calls wait.
    pub(super) fn len(&self) -> usize {
        self.shards.iter().map(|shard| shard.0.lock().unwrap_or_else(PoisonError::into_inner).len()).sum()
    }

    /// Drops every waiting call (each then ends as its sender is gone).
    pub(super) fn clear(&self) {
        for shard in &self.shards {
            let taken = std::mem::take(&mut *shard.0.lock().unwrap_or_else(PoisonError::into_inner));
            // Dropped after the lock: a dropped sender wakes its call.
            drop(taken);
        }
    }

    /// Takes out the calls sent before loss number `epoch`.
    fn take_before(&self, epoch: u64) -> Vec<Pending> {
        let mut taken = Vec::new();
        for shard in &self.shards {
            let mut shard = shard.0.lock().unwrap_or_else(PoisonError::into_inner);
            taken.extend(shard.extract_if(|_, pending| pending.epoch < epoch).map(|(_, pending)| pending));
        }
        taken
    }
}

/// What the client and its calls share: the pending map, its counters, and whether replies can still come.
pub(super) struct Shared {
    pub(super) pending: PendingMap,
    pub(super) late_replies: AtomicU64,
    /// Calls ended before their reply whose request the transport could not cancel.
    pub(super) uncancelled: AtomicU64,
    pub(super) closed: AtomicBool,
    /// The inbox's consumer ended: no reply can arrive any more.
    pub(super) disconnected: AtomicBool,
    /// The inbox's loss count, where the transport can lose replies.
    pub(super) losses: Option<watch::Receiver<u64>>,
    pub(super) metrics: crate::metrics::ClientMetrics,
}

impl Shared {
    pub(super) fn epoch(&self) -> u64 {
        self.losses.as_ref().map_or(0, |losses| *losses.borrow())
    }

    /// Hands `reply` to the call waiting for it; a reply nobody waits for is counted as late.
    pub(super) fn reply(&self, reply: Arc<Envelope>) {
        let waiting = reply.correlation_id.and_then(|id| self.pending.remove(&id));
        match waiting {
            Some(pending) => {
                if pending.sender.send(Ok(reply)).is_err() {
                    self.late_replies.fetch_add(1, Ordering::Relaxed);
                    self.metrics.late_reply();
                }
            }
            None => {
                self.late_replies.fetch_add(1, Ordering::Relaxed);
                self.metrics.late_reply();
                tracing::debug!(correlation_id = ?reply.correlation_id, "dropped a late reply");
            }
        }
    }

    /// Fails with [`Error::ReplyLost`] every call sent before loss number `epoch`.
    pub(super) fn lost(&self, epoch: u64) {
        for pending in self.pending.take_before(epoch) {
            let _ = pending.sender.send(Err(Error::ReplyLost));
        }
    }
}

pub(super) async fn read_replies(
    mut inbox: crate::transport::Consumer,
    mut losses: Option<watch::Receiver<u64>>,
    shared: Arc<Shared>,
) {
    loop {
        let delivery = tokio::select! {
            delivery = inbox.next() => delivery,
            Some(epoch) = lost(&mut losses) => {
                tracing::debug!(epoch, "the inbox was lost; failing the calls that waited on it");
                shared.lost(epoch);
                continue;
            }
        };
        let Some(delivery) = delivery else { break };
        shared.reply(delivery.envelope);
    }
    // The inbox is gone: every waiting call fails now rather than at its deadline, and so does every new one.
    shared.disconnected.store(true, Ordering::Release);
    shared.lost(u64::MAX);
}

/// The next loss count, or `None` once the transport stops reporting them.
async fn lost(losses: &mut Option<watch::Receiver<u64>>) -> Option<u64> {
    let Some(receiver) = losses else { return std::future::pending().await };
    if receiver.changed().await.is_err() {
        *losses = None;
        return None;
    }
    Some(*receiver.borrow_and_update())
}

/// Removes a call's pending entry however the call ends: reply, error, timeout or cancellation.
pub(super) struct PendingGuard<'a> {
    pub(super) shared: &'a Shared,
    pub(super) correlation_id: Uuid,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.pending.remove(&self.correlation_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(epoch: u64) -> (Pending, oneshot::Receiver<Result<Arc<Envelope>, Error>>) {
        let (sender, receiver) = oneshot::channel();
        (Pending { epoch, sender }, receiver)
    }

    #[test]
    fn the_calls_of_a_thread_share_a_shard_and_each_is_found_by_its_id() {
        let map = PendingMap::default();
        let ids: Vec<Uuid> = (0..1_000).map(|_| PendingMap::correlation_id(std::time::Instant::now())).collect();
        let last = ids[0].as_bytes()[15] % SHARDS as u8;
        assert!(ids.iter().all(|id| id.as_bytes()[15] % SHARDS as u8 == last), "one thread, several shards");
        let other = std::thread::spawn(|| {
            (0..SHARDS).map(|_| PendingMap::correlation_id(std::time::Instant::now())).collect::<Vec<_>>()
        });
        let other = other.join().expect("the thread ran");
        assert!(other.windows(2).all(|pair| pair[0].as_bytes()[15] % 16 == pair[1].as_bytes()[15] % 16));
        let mut unique = ids.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), ids.len(), "ids repeat");
        // Ids made elsewhere (another client's, a foreign one) are kept and found as well.
        let foreign: Vec<Uuid> = (0..100u128).map(|n| Uuid::from_u128(n * 7_919)).collect();
        let mut receivers = Vec::new();
        for (n, id) in ids.iter().chain(&foreign).enumerate() {
            let (entry, receiver) = pending(n as u64 % 3);
            map.insert(*id, entry);
            receivers.push(receiver);
        }
        assert_eq!(map.len(), 1_100);
        assert!(map.remove(&ids[17]).is_some() && map.remove(&ids[17]).is_none());
        assert!(map.remove(&foreign[3]).is_some());
        // Loss number 2 takes the calls of epochs 0 and 1.
        let lost = map.take_before(2);
        assert!(lost.iter().all(|pending| pending.epoch < 2));
        assert_eq!(map.len() + lost.len(), 1_098);
        map.clear();
        assert_eq!(map.len(), 0);
        drop(lost);
        assert!(receivers.iter_mut().all(|receiver| receiver.try_recv().is_err()), "a call was answered");
    }
}
