//! The calls waiting for their reply, by correlation id, and the task that hands replies to them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use dashmap::DashMap;
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

/// What the client and its calls share: the pending map, its counters, and whether replies can still come.
pub(super) struct Shared {
    pub(super) pending: DashMap<Uuid, Pending>,
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
            Some((_, pending)) => {
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
        let lost: Vec<Uuid> =
            self.pending.iter().filter(|entry| entry.value().epoch < epoch).map(|entry| *entry.key()).collect();
        for id in lost {
            if let Some((_, pending)) = self.pending.remove_if(&id, |_, pending| pending.epoch < epoch) {
                let _ = pending.sender.send(Err(Error::ReplyLost));
            }
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
