//! Leaving a shared RabbitMQ as a test found it: a harness hands out its connections wrapped in a [`Recording`],
//! which notes every queue and topic they name, and deletes them when the harness is dropped, through
//! [`Transport::delete_queue`] (each queue with its dead-letter queue) and an exchange delete for each topic.
//! Queues that worker processes of a test declared are not seen; they expire by `x-expires` a minute after their
//! last use, as every queue the harnesses declare does.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};

use rpc_core::health::{Announced, Announcement};
use rpc_core::transport::{BoxFuture, Capabilities, Confirm, ConsumeOptions, Consumer, Inbox, QueueStats};
use rpc_core::{Envelope, Error, QueueOptions, Transport};
use uuid::Uuid;

/// The queues and topics the connections of one harness named.
#[derive(Debug, Default)]
pub struct Named {
    queues: Mutex<BTreeSet<String>>,
    topics: Mutex<BTreeSet<String>>,
}

impl Named {
    fn queue(&self, queue: &str) {
        let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        if !queues.contains(queue) {
            queues.insert(queue.to_owned());
        }
    }

    fn topic(&self, topic: &str) {
        let mut topics = self.topics.lock().unwrap_or_else(PoisonError::into_inner);
        if !topics.contains(topic) {
            topics.insert(topic.to_owned());
        }
    }

    /// The queues named so far: those declared, consumed or published to, and a subscriber group's queue
    /// (`<topic>@<group>`, as RabbitMQ's transports name it).
    pub fn queues(&self) -> Vec<String> {
        self.queues.lock().unwrap_or_else(PoisonError::into_inner).iter().cloned().collect()
    }

    /// The topics named so far (a fanout exchange each on RabbitMQ's AMQP).
    pub fn topics(&self) -> Vec<String> {
        self.topics.lock().unwrap_or_else(PoisonError::into_inner).iter().cloned().collect()
    }

    /// Deletes what was named from the RabbitMQ at `amqp_url`: each queue and its `<queue>.dlq` through
    /// [`Transport::delete_queue`], and each topic's exchange. It runs on a thread and a runtime of its own, since
    /// the test's runtime may be shutting down; what cannot be deleted (an inbox's name, a broker gone) is left
    /// to expire.
    pub fn delete_from(&self, amqp_url: &str) {
        let (queues, topics, url) = (self.queues(), self.topics(), amqp_url.to_owned());
        if queues.is_empty() && topics.is_empty() {
            return;
        }
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            runtime.block_on(async move {
                if let Ok(transport) = rpc_broker::adapter::amqp::Amqp::connect(&url).await {
                    for queue in &queues {
                        let _ = transport.delete_queue(queue).await;
                        let _ = transport.delete_queue(&format!("{queue}.dlq")).await;
                    }
                }
                delete_exchanges(&url, &topics).await;
            });
        });
        let _ = cleanup.join();
    }
}

/// Deletes the exchanges named `topics`, where nothing is bound to them any more.
async fn delete_exchanges(url: &str, topics: &[String]) {
    use lapin::options::ExchangeDeleteOptions;
    if topics.is_empty() {
        return;
    }
    let Ok(connection) = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await else {
        return;
    };
    for topic in topics {
        // A failed delete closes the channel: one channel per exchange.
        let Ok(channel) = connection.create_channel().await else { break };
        let options = ExchangeDeleteOptions { if_unused: true, ..ExchangeDeleteOptions::default() };
        let _ = channel.exchange_delete(topic.as_str().into(), options).await;
        let _ = channel.close(200, "deleted".into()).await;
    }
    let _ = connection.close(200, "deleted".into()).await;
}

/// A transport that notes in a [`Named`] the queues and topics it is asked to use, and otherwise forwards every
/// call, those with a default included.
#[derive(Debug)]
pub struct Recording {
    inner: Arc<dyn Transport>,
    named: Arc<Named>,
}

impl Recording {
    /// `inner`, noting what it names in `named`.
    pub fn new(inner: Arc<dyn Transport>, named: Arc<Named>) -> Recording {
        Recording { inner, named }
    }
}

impl Transport for Recording {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn system(&self) -> &'static str {
        self.inner.system()
    }

    fn declare_queue<'a>(&'a self, queue: &'a str, options: &'a QueueOptions) -> BoxFuture<'a, Result<(), Error>> {
        self.named.queue(queue);
        self.inner.declare_queue(queue, options)
    }

    fn publish<'a>(&'a self, queue: &'a str, envelope: Envelope, confirm: Confirm) -> BoxFuture<'a, Result<(), Error>> {
        self.named.queue(queue);
        self.inner.publish(queue, envelope, confirm)
    }

    fn publish_topic<'a>(&'a self, topic: &'a str, envelope: Envelope) -> BoxFuture<'a, Result<(), Error>> {
        self.named.topic(topic);
        self.inner.publish_topic(topic, envelope)
    }

    fn consume<'a>(&'a self, queue: &'a str, options: ConsumeOptions) -> BoxFuture<'a, Result<Consumer, Error>> {
        self.named.queue(queue);
        self.inner.consume(queue, options)
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        options: ConsumeOptions,
    ) -> BoxFuture<'a, Result<Consumer, Error>> {
        self.named.topic(topic);
        self.named.queue(&format!("{topic}@{group}"));
        self.inner.subscribe(topic, group, options)
    }

    fn open_inbox(&self) -> BoxFuture<'_, Result<Inbox, Error>> {
        self.inner.open_inbox()
    }

    fn subscribe_private<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Consumer, Error>> {
        self.named.topic(topic);
        self.inner.subscribe_private(topic)
    }

    fn announce(&self, announcement: Announcement) -> BoxFuture<'_, Result<Option<Announced>, Error>> {
        self.inner.announce(announcement)
    }

    fn queue_stats<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<QueueStats, Error>> {
        self.inner.queue_stats(queue)
    }

    fn delete_queue<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        self.inner.delete_queue(queue)
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), Error>> {
        self.inner.flush()
    }

    fn cancel<'a>(&'a self, queue: &'a str, correlation_id: Uuid) -> BoxFuture<'a, Result<(), Error>> {
        self.inner.cancel(queue, correlation_id)
    }
}
