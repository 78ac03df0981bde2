//! Dead-letter queues, inspected and replayed through the API: the requests that failed for good (their last
//! attempt failed, or they were delivered too often) wait in `<queue>.dlq` until an operator looks at them.
//!
//! ```
//! # use std::time::Duration;
//! # use rpc_core::{Client, Envelope, Kind, QueueOptions, Transport};
//! use rpc_core::dead_letters::DeadLetters;
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), rpc_core::Error> {
//! # let broker = rpc_broker::Embedded::new();
//! # broker.declare_queue("Billing", &QueueOptions::new().max_deliveries(1)).await?;
//! # let mut request = Envelope::new(Kind::Oneway);
//! # request.service = "Billing".into();
//! # request.method = "charge".into();
//! # request.idempotency_key = Some("order-7".into());
//! # broker.publish("Billing", request, rpc_core::transport::Confirm::Broker).await?;
//! # let mut consumer = broker.consume("Billing", Default::default()).await?;
//! # consumer.next().await.expect("delivered").handle.dead_letter().await?;
//! # drop(consumer);
//! let dead = DeadLetters::of_service(broker.clone(), None, "Billing");
//! for envelope in dead.list(100).await? {
//!     println!("{} {} key {:?}", envelope.service, envelope.method, envelope.idempotency_key);
//! }
//! // Once the cause is fixed: back on the service's queue, each with its idempotency key.
//! assert_eq!(dead.replay(100).await?, 1);
//! # Ok(())
//! # }
//! ```

use std::sync::Arc;
use std::time::Duration;

use crate::envelope::Envelope;
use crate::error::Error;
use crate::naming;
use crate::transport::{self, ConsumeOptions, Consumer, Delivery, Transport};

/// How long to wait for each dead letter the queue's counters announced.
const WAIT: Duration = Duration::from_secs(2);
/// How long to wait for dead letters beyond those counted: a broker's counters can leave out messages handed
/// back a moment ago (NATS JetStream counts them as pending until it delivers them again).
const MORE: Duration = Duration::from_millis(250);

/// The dead-letter queue of one queue, on one transport.
#[derive(Clone, Debug)]
pub struct DeadLetters {
    transport: Arc<dyn Transport>,
    queue: String,
    dead_letters: String,
}

impl DeadLetters {
    /// The dead letters of `queue`.
    pub fn of_queue(transport: impl Transport, queue: &str) -> DeadLetters {
        DeadLetters {
            transport: transport::shared(transport),
            queue: queue.to_owned(),
            dead_letters: naming::dead_letter_queue(queue),
        }
    }

    /// The dead letters of `service`'s queue in `namespace` (as its [`Server`](crate::Server) names it).
    pub fn of_service(transport: impl Transport, namespace: Option<&str>, service: &str) -> DeadLetters {
        DeadLetters::of_queue(transport, &naming::service_queue(namespace, service))
    }

    /// The queue whose dead letters these are.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The dead-letter queue itself.
    pub fn dead_letter_queue(&self) -> &str {
        &self.dead_letters
    }

    /// How many dead letters there are, those a listing or a replay holds at the moment included.
    ///
    /// # Errors
    /// [`Error::Unsupported`] where the transport has no dead-letter queues; otherwise as
    /// [`Transport::queue_stats`].
    pub async fn count(&self) -> Result<usize, Error> {
        Ok(self.counted().await?.unwrap_or(0))
    }

    /// The count, or `None` when the dead-letter queue does not exist (nothing was ever dead-lettered there).
    async fn counted(&self) -> Result<Option<usize>, Error> {
        self.check()?;
        match self.transport.queue_stats(&self.dead_letters).await {
            // Those held by a consumer (a listing, a replay) are still there.
            Ok(stats) => Ok(Some(stats.ready + stats.unacked)),
            Err(Error::NoRoute(_)) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Up to `limit` dead letters, oldest first (by message id: this framework writes UUIDv7 ids, which sort
    /// by the millisecond the request was published), left where they are: each is handed back unprocessed, which
    /// does not count as a delivery. Sorted here because a broker need not keep the order of messages handed
    /// back (NATS JetStream redelivers them in any order). Besides those the queue's counters announce, it
    /// waits a quarter of a second for any they left out (JetStream counts messages handed back a moment ago
    /// as pending until it delivers them again), so a listing takes at least that long.
    ///
    /// # Errors
    /// As [`DeadLetters::count`], and consuming errors.
    pub async fn list(&self, limit: usize) -> Result<Vec<Envelope>, Error> {
        let Some((consumer, held)) = self.take(limit).await? else { return Ok(Vec::new()) };
        let mut listed = Vec::with_capacity(held.len());
        let mut handles = Vec::with_capacity(held.len());
        for delivery in held {
            listed.push(Arc::unwrap_or_clone(delivery.envelope));
            handles.push(delivery.handle);
        }
        // Last taken first: a released message goes back to the front, so a broker that keeps the order of
        // released messages keeps the queue's.
        for handle in handles.into_iter().rev() {
            handle.release().await?;
        }
        listed.sort_by_key(|envelope| envelope.id);
        // The consumer goes first: a transport whose settles complete with their consumer's channel (RabbitMQ)
        // has them all by the end of the flush, so that a count right after sees every letter back.
        drop(consumer);
        self.transport.flush().await?;
        Ok(listed)
    }

    /// Puts up to `limit` dead letters back on the queue, oldest first (as [`DeadLetters::list`] orders them),
    /// and returns how many. A replayed request keeps its idempotency key, so a worker that did run it answers
    /// with the stored reply instead of running it twice; it starts over at attempt 1 (its retry policy applies
    /// afresh) and has no deadline (its caller stopped waiting long ago; a reply to an inbox that is gone is
    /// dropped, one to a durable callback queue is handled there). A dead letter is removed only once its copy
    /// is on the queue.
    ///
    /// # Errors
    /// As [`DeadLetters::list`], and publishing errors; the dead letters not replayed stay where they are.
    pub async fn replay(&self, limit: usize) -> Result<usize, Error> {
        let Some((consumer, mut held)) = self.take(limit).await? else { return Ok(0) };
        held.sort_by_key(|delivery| delivery.envelope.id);
        let mut replayed = 0;
        let mut held = held.into_iter();
        while let Some(delivery) = held.next() {
            let mut again = Envelope::clone(&delivery.envelope);
            again.id = crate::envelope::new_id();
            again.attempt = 1;
            again.deadline_ms = None;
            again.delay_ms = None;
            if let Err(error) = self.transport.publish(&self.queue, again, transport::Confirm::Broker).await {
                let rest: Vec<Delivery> = held.collect();
                for rest in rest.into_iter().rev() {
                    rest.handle.release().await?;
                }
                delivery.handle.release().await?;
                self.transport.flush().await?;
                return Err(error);
            }
            delivery.handle.ack().await?;
            replayed += 1;
        }
        self.transport.flush().await?;
        drop(consumer);
        Ok(replayed)
    }

    fn check(&self) -> Result<(), Error> {
        if self.transport.capabilities().dead_letter { Ok(()) } else { Err(Error::Unsupported("dead-letter queues")) }
    }

    /// Takes up to `limit` of the dead letters waiting now, unacked, with the consumer that holds them: they
    /// stay settleable while it lives, and go back to the queue if it is dropped first.
    async fn take(&self, limit: usize) -> Result<Option<(Consumer, Vec<Delivery>)>, Error> {
        if limit == 0 {
            return Ok(None);
        }
        let Some(counted) = self.counted().await? else { return Ok(None) };
        let counted = counted.min(limit);
        let prefetch = u32::try_from(limit).unwrap_or(u32::MAX);
        let mut consumer =
            match self.transport.consume(&self.dead_letters, ConsumeOptions::new().prefetch(prefetch)).await {
                Ok(consumer) => consumer,
                // Nothing was ever dead-lettered there.
                Err(Error::NoRoute(_)) => return Ok(None),
                Err(error) => return Err(error),
            };
        let mut held = Vec::with_capacity(counted);
        while held.len() < limit {
            // Those counted are waited for (another reader may have taken some meanwhile); then a short while
            // for any the counters left out.
            let wait = if held.len() < counted { WAIT } else { MORE };
            let Ok(Some(delivery)) = tokio::time::timeout(wait, consumer.next()).await else { break };
            held.push(delivery);
        }
        if held.is_empty() {
            return Ok(None);
        }
        // No more: what is held stays settleable after the consumer is paused.
        consumer.pause();
        Ok(Some((consumer, held)))
    }
}
