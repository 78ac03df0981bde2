//! Settling and answering deliveries, on the connection they came on.

use std::fmt;
use std::sync::{Arc, Weak};

use rpc_core::codec;
use rpc_core::transport::{Acker, Answered, BoxFuture, Cancellations, Confirm, Outcome};
use rpc_core::{Envelope, Error, ReplyTo};
use tokio::sync::mpsc;

use super::connection::{Conn, Liveness, Waiter};
use super::{publish_frame, reply_frame};
use crate::protocol::{ClientFrame, call_key};

/// Settles the deliveries of one consumer on one connection; once that connection is gone they were requeued.
pub(super) struct RemoteAcker {
    pub(super) conn: mpsc::UnboundedSender<ClientFrame>,
    /// The connection the deliveries came on, for requests that only it may make ([`Acker::republish`]).
    pub(super) link: Weak<Conn>,
    pub(super) dead: super::connection::Dead,
    pub(super) liveness: Arc<Liveness>,
    pub(super) consumer: u64,
    pub(super) cancellations: Arc<Cancellations>,
}

impl fmt::Debug for RemoteAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteAcker").field("consumer", &self.consumer).finish()
    }
}

impl RemoteAcker {
    /// Whether the connection the deliveries came on is gone, or this process was away from it past the
    /// heartbeats (then the broker has most likely dropped it, and whichever of this check and the writer
    /// notices first closes it): its deliveries are the broker's again.
    fn gone(&self) -> bool {
        if self.dead.is_cancelled() {
            return true;
        }
        // Asked from the server's poll of the request's handling, which read the clock a moment ago.
        if self.liveness.lapsed(rpc_core::transport::recent_instant()) {
            self.dead.cancel();
            return true;
        }
        false
    }
}

impl Acker for RemoteAcker {
    fn settle(&self, tag: u64, outcome: Outcome) -> BoxFuture<'_, Result<(), Error>> {
        self.cancellations.forget(tag);
        let result = if self.gone() {
            Err(Error::Disconnected)
        } else {
            self.conn
                .send(ClientFrame::Settle { consumer: self.consumer, tag, outcome })
                .map_err(|_| Error::Disconnected)
        };
        rpc_core::transport::finished(result)
    }

    fn publish<'a>(
        &'a self,
        _tag: u64,
        queue: &'a str,
        envelope: Envelope,
        confirm: Confirm,
    ) -> BoxFuture<'a, Result<(), Error>> {
        if self.gone() {
            // The broker requeued this connection's deliveries when it went.
            return rpc_core::transport::finished(Err(Error::DeliveryLost));
        }
        // On the delivery's own connection: once the broker has dropped it (and requeued the request), it reads
        // nothing more from it, so a stale reply never reaches the caller.
        if confirm == Confirm::Sent {
            let sent =
                reply_frame(queue, &envelope).and_then(|frame| self.conn.send(frame).map_err(|_| Error::DeliveryLost));
            return rpc_core::transport::finished(sent);
        }
        Box::pin(async move {
            let conn = self.link.upgrade().filter(|conn| !conn.dead.is_cancelled()).ok_or(Error::DeliveryLost)?;
            let payload = codec::encode_envelope(&envelope)?;
            let frame = publish_frame(queue, &envelope, payload, false);
            match conn.request(frame, Waiter::Answer, conn.request_timeout).await {
                Ok(answer) => answer.map(drop).map_err(|(code, message)| code.to_error(queue, message)),
                // Whether the broker took it is unknown; it redelivers the request, whose next delivery answers.
                Err(Error::Disconnected) => Err(Error::DeliveryLost),
                Err(error) => Err(error),
            }
        })
    }

    fn answer<'a>(
        &'a self,
        tag: u64,
        reply_to: &'a ReplyTo,
        reply: Envelope,
    ) -> BoxFuture<'a, Result<Answered, Error>> {
        if self.gone() {
            return Box::pin(std::future::ready(Err(Error::DeliveryLost)));
        }
        if !reply_to.is_inbox() {
            // A durable callback queue: a confirmed publish, then the ack.
            return rpc_core::transport::reply_then_ack(self, tag, reply_to, reply);
        }
        // One frame, on the delivery's own connection (see `publish`): the broker publishes the reply and acks
        // the delivery only while this connection holds it.
        self.cancellations.forget(tag);
        let sent = codec::encode_envelope(&reply).map_err(Error::from).and_then(|payload| {
            let frame = ClientFrame::Answer {
                consumer: self.consumer,
                tag,
                reply_to: reply_to.text().clone(),
                ttl_ms: reply.deadline_ms,
                payload,
            };
            self.conn.send(frame).map_err(|_| Error::DeliveryLost)
        });
        rpc_core::transport::answered(sent.map(|()| Answered::Sent))
    }

    fn republish<'a>(&'a self, tag: u64, queue: &'a str, envelope: Envelope) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let conn = self.link.upgrade().filter(|conn| !conn.dead.is_cancelled()).ok_or(Error::DeliveryLost)?;
            let payload = codec::encode_envelope(&envelope)?;
            let (priority, ttl_ms, delay_ms) =
                (envelope.priority.unwrap_or(0), envelope.deadline_ms, envelope.delay_ms);
            let key = call_key(&envelope);
            let consumer = self.consumer;
            let id = Some(*envelope.id.as_bytes());
            let frame = |req| ClientFrame::Republish {
                req,
                consumer,
                tag,
                queue: queue.to_owned(),
                priority,
                ttl_ms,
                delay_ms,
                key,
                id,
                payload,
            };
            // On the delivery's own connection (see `publish`); while the broker holds the delivery, it publishes
            // and acks in one step.
            match conn.request(frame, Waiter::Answer, conn.request_timeout).await {
                Ok(Ok(_)) => {
                    self.cancellations.forget(tag);
                    Ok(())
                }
                Ok(Err((code, message))) => Err(code.to_error(queue, message)),
                // Whether the broker took it is unknown: the request is redelivered if not, and the copy then
                // finds the key executed or runs as the next attempt.
                Err(Error::Disconnected) => Err(Error::DeliveryLost),
                Err(error) => Err(error),
            }
        })
    }

    fn cancelled(&self, tag: u64) -> Option<BoxFuture<'static, ()>> {
        Some(self.cancellations.watch(tag))
    }

    fn revoked(&self, _tag: u64) -> bool {
        self.gone()
    }
}
