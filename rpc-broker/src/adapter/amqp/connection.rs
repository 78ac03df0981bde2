//! The connection and its channels: declaring queues, exchanges, bindings and inboxes, reconnecting, and
//! declaring everything again on the new connection.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use futures::StreamExt;
use lapin::options::{
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ErrorKind, Event, ExchangeKind};
use rpc_core::{Error, QueueOptions, naming};

use super::Inner;
use super::mapping::short;

/// Short-lived channels open at once, at most.
pub(super) const ADMIN_CHANNELS: usize = 8;

/// What this transport declared, to declare again after a reconnection.
#[derive(Default)]
pub(super) struct Topology {
    pub(super) queues: BTreeMap<String, QueueOptions>,
    pub(super) exchanges: BTreeSet<String>,
    pub(super) bindings: BTreeSet<(String, String)>,
    pub(super) inboxes: BTreeSet<String>,
}

pub(super) struct Conn {
    pub(super) connection: Connection,
    /// Publishes (in confirm mode) and the direct reply-to consumer.
    pub(super) publisher: Channel,
    /// Publishes without confirms: calls' requests, whose reply proves arrival, and replies to reply queues.
    pub(super) unconfirmed: Channel,
    pub(super) generation: u64,
    /// Held while a publish on `publisher` takes its confirm's delivery tag and queues its frames: lapin takes
    /// the tag and queues the frames under two locks, one after the other, so two publishes from two threads
    /// can take tags in one order and reach the wire in the other. RabbitMQ numbers them in wire order, and
    /// the confirms then go to the wrong publishes: invisible while all are acks, a call reported refused
    /// (`QueueFull`) that ran and a call reported taken that was dropped once a bounded queue nacks.
    pub(super) publish_order: std::sync::Mutex<()>,
}

impl Conn {
    /// The error a failed publish reports: [`Error::Disconnected`] once the connection or the publishing channel
    /// is going away (RabbitMQ stopping puts the channel in an error state before the supervisor hears of it).
    pub(super) fn publish_error(&self, error: lapin::Error) -> Error {
        self.error_on(&self.publisher, error)
    }

    /// As [`Conn::publish_error`], for a publish on `channel`.
    pub(super) fn error_on(&self, channel: &Channel, error: lapin::Error) -> Error {
        if connection_level(&error) || !channel.status().connected() || !self.connection.status().connected() {
            Error::Disconnected
        } else {
            from_lapin(error)
        }
    }
}

impl Inner {
    fn queue_arguments(&self, queue: &str, options: &QueueOptions) -> FieldTable {
        let mut arguments = FieldTable::default();
        let dead_letter_queue = naming::dead_letter_queue(queue);
        arguments.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
        arguments.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(dead_letter_queue.into()));
        if self.options.quorum || options.max_deliveries.is_some() {
            arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
            if let Some(max) = options.max_deliveries {
                // RabbitMQ dead-letters a message returned more than this many times; the consumer dead-letters
                // the delivery past `max` itself, so that the count is exact.
                arguments.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(i64::from(max)));
            }
        } else {
            arguments.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(9));
        }
        if let Some(max_len) = options.max_len {
            arguments.insert("x-max-length".into(), AMQPValue::LongLongInt(i64::try_from(max_len).unwrap_or(i64::MAX)));
            arguments.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
        }
        self.expires(&mut arguments);
        arguments
    }

    fn expires(&self, arguments: &mut FieldTable) {
        if let Some(expires) = self.options.queue_expires {
            let millis = i64::try_from(expires.as_millis()).unwrap_or(i64::MAX).max(1);
            arguments.insert("x-expires".into(), AMQPValue::LongLongInt(millis));
        }
    }

    /// A short-lived channel for a declare or a check (a refused one closes its channel), with its permit.
    async fn admin_channel(&self, conn: &Conn) -> Result<(Channel, tokio::sync::SemaphorePermit<'_>), Error> {
        let permit = self.admin.acquire().await.map_err(|_| Error::Shutdown)?;
        let channel = conn.connection.create_channel().await.map_err(from_lapin)?;
        Ok((channel, permit))
    }

    /// Declares `queue` and its dead-letter queue on a channel of their own (a refused declare closes it).
    pub(super) async fn declare_on(&self, conn: &Conn, queue: &str, options: &QueueOptions) -> Result<(), Error> {
        let (channel, _permit) = self.admin_channel(conn).await?;
        let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
        let mut dead_letter_arguments = FieldTable::default();
        self.expires(&mut dead_letter_arguments);
        let result = async {
            let dead_letters = short(&naming::dead_letter_queue(queue))?;
            channel
                .queue_declare(dead_letters, durable, dead_letter_arguments)
                .await
                .map_err(|error| declare_error(queue, error))?;
            channel
                .queue_declare(short(queue)?, durable, self.queue_arguments(queue, options))
                .await
                .map_err(|error| declare_error(queue, error))?;
            Ok(())
        }
        .await;
        close_channel(channel).await;
        result
    }

    /// The queue's message and consumer counts, or `None` if it does not exist.
    pub(super) async fn inspect(&self, conn: &Conn, queue: &str) -> Result<Option<(u32, u32)>, Error> {
        let (channel, _permit) = self.admin_channel(conn).await?;
        let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        let result = channel.queue_declare(short(queue)?, passive, FieldTable::default()).await;
        close_channel(channel).await;
        match result {
            Ok(found) => Ok(Some((found.message_count(), found.consumer_count()))),
            Err(error) if soft_error(&error) == Some(AMQPSoftError::NOTFOUND) => Ok(None),
            // Another connection's exclusive queue (an inbox): it exists.
            Err(error) if soft_error(&error) == Some(AMQPSoftError::RESOURCELOCKED) => Ok(Some((0, 1))),
            Err(error) => Err(from_lapin(error)),
        }
    }

    /// Deletes `queue` with its messages; a queue that does not exist is deleted already.
    pub(super) async fn delete(&self, conn: &Conn, queue: &str) -> Result<(), Error> {
        let (channel, _permit) = self.admin_channel(conn).await?;
        let result = channel.queue_delete(short(queue)?, QueueDeleteOptions::default()).await;
        close_channel(channel).await;
        match result {
            Ok(_) => Ok(()),
            Err(error) if soft_error(&error) == Some(AMQPSoftError::NOTFOUND) => Ok(()),
            Err(error) => Err(from_lapin(error)),
        }
    }

    pub(super) async fn declare_exchange(&self, conn: &Conn, topic: &str) -> Result<(), Error> {
        let (channel, _permit) = self.admin_channel(conn).await?;
        let options = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
        let result =
            channel.exchange_declare(short(topic)?, ExchangeKind::Fanout, options, FieldTable::default()).await;
        close_channel(channel).await;
        result.map_err(|error| declare_error(topic, error))
    }

    pub(super) async fn bind(&self, conn: &Conn, queue: &str, topic: &str) -> Result<(), Error> {
        let (channel, _permit) = self.admin_channel(conn).await?;
        let result = channel
            .queue_bind(short(queue)?, short(topic)?, "".into(), QueueBindOptions::default(), FieldTable::default())
            .await;
        close_channel(channel).await;
        result.map_err(|error| declare_error(queue, error))
    }

    pub(super) async fn declare_inbox(&self, conn: &Conn, name: &str) -> Result<(), Error> {
        let (channel, _permit) = self.admin_channel(conn).await?;
        let options = QueueDeclareOptions { exclusive: true, auto_delete: true, ..QueueDeclareOptions::default() };
        let result = channel.queue_declare(short(name)?, options, FieldTable::default()).await;
        close_channel(channel).await;
        result.map(|_| ()).map_err(from_lapin)
    }

    /// Declares everything again on a new connection and restarts the consumers.
    async fn restore(self: &Arc<Self>, conn: &Conn) -> Result<(), Error> {
        let topology = {
            let topology = Inner::lock(&self.topology);
            (topology.queues.clone(), topology.exchanges.clone(), topology.bindings.clone(), topology.inboxes.clone())
        };
        let (queues, exchanges, bindings, inboxes) = topology;
        for (queue, options) in &queues {
            self.declare_on(conn, queue, options).await?;
        }
        for exchange in &exchanges {
            self.declare_exchange(conn, exchange).await?;
        }
        // Inboxes before bindings: a private subscription's inbox is bound to its topic.
        for inbox in &inboxes {
            self.declare_inbox(conn, inbox).await?;
        }
        for (queue, exchange) in &bindings {
            self.bind(conn, queue, exchange).await?;
        }
        let ids: Vec<u64> = Inner::lock(&self.consumers)
            .iter_mut()
            .filter(|(_, logical)| !logical.paused)
            .map(|(id, logical)| {
                // Its channel went with the connection, and RabbitMQ requeued what it held.
                if let Some((_, _, held)) = logical.current.take() {
                    held.returned();
                }
                *id
            })
            .collect();
        for id in ids {
            if let Err(error) = self.start_consumer(conn, id).await {
                tracing::warn!(%error, "could not restart a consumer after reconnecting; it ends");
                Inner::lock(&self.consumers).remove(&id);
            }
        }
        Ok(())
    }

    /// Connects to the first node of [`Inner::urls`] that answers, from [`Inner::first_url`] on; the error of
    /// the last node tried when none does (a refusal of the credentials before any other error).
    pub(super) async fn open(&self) -> Result<Conn, Error> {
        let count = self.urls.len();
        let first = self.first_url.load(Ordering::Relaxed) % count;
        let mut failure = None;
        for index in (first..count).chain(0..first) {
            match self.open_at(&self.urls[index]).await {
                Ok(conn) => {
                    self.first_url.store(index, Ordering::Relaxed);
                    return Ok(conn);
                }
                Err(error) => {
                    if count > 1 {
                        tracing::debug!(%error, url = %crate::adapter::redact_url(&self.urls[index]), "a RabbitMQ node did not take the connection");
                    }
                    if !matches!(failure, Some(Error::Unauthorized(_))) {
                        failure = Some(error);
                    }
                }
            }
        }
        Err(failure.unwrap_or(Error::Disconnected))
    }

    /// After the connection is lost: the next node is tried first.
    pub(super) fn lost(&self) {
        let count = self.urls.len();
        let _ = self.first_url.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |index| Some((index + 1) % count));
    }

    async fn open_at(&self, url: &str) -> Result<Conn, Error> {
        let properties = ConnectionProperties::default().with_connection_name("mqrpc".into());
        let tls = &self.options.tls;
        let connection = if tls.roots.is_none() && tls.client.is_none() {
            Connection::connect(url, properties).await
        } else {
            let config = lapin::tcp::OwnedTLSConfig {
                identity: tls.client.clone().map(|(pem, key)| lapin::tcp::OwnedIdentity::PKCS8 { pem, key }),
                cert_chain: tls.roots.clone(),
            };
            let runtime = lapin::runtime::default_runtime().map_err(from_lapin)?;
            Connection::connect_with_config(url, properties, config, runtime).await
        }
        .map_err(from_lapin)?;
        let publisher = connection.create_channel().await.map_err(from_lapin)?;
        publisher.confirm_select(ConfirmSelectOptions::default()).await.map_err(from_lapin)?;
        let unconfirmed = connection.create_channel().await.map_err(from_lapin)?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(Conn { connection, publisher, unconfirmed, generation, publish_order: std::sync::Mutex::new(()) })
    }
}

pub(super) fn close_connection(conn: Arc<Conn>) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            let _ = conn.connection.close(200, "bye".into()).await;
        });
    }
}

/// Closes a short-lived channel before its permit goes, so that its id is free before it can be reused.
async fn close_channel(channel: Channel) {
    if channel.status().connected() {
        let _ = channel.close(200, "done".into()).await;
    }
}

pub(super) fn close_quietly(channel: Channel) {
    if channel.status().connected()
        && let Ok(runtime) = tokio::runtime::Handle::try_current()
    {
        runtime.spawn(async move {
            let _ = channel.close(200, "done".into()).await;
        });
    }
}

/// Watches the connection and reconnects when it is lost.
pub(super) async fn supervise(inner: Weak<Inner>, mut events: futures::stream::BoxStream<'static, Event>) {
    loop {
        while let Some(event) = events.next().await {
            match event {
                // A channel closed by RabbitMQ (a refused declare, say) is reported here too; only the loss of
                // the connection matters to the supervisor.
                Event::Error(error) if connection_level(&error) => {
                    tracing::warn!(%error, "lost the connection to RabbitMQ; reconnecting");
                    break;
                }
                Event::Error(error) => tracing::debug!(%error, "RabbitMQ closed a channel"),
                Event::ConnectionBlocked(reason) => tracing::warn!(%reason, "RabbitMQ blocked publishing"),
                _ => {}
            }
        }
        let Some(strong) = inner.upgrade() else { return };
        if strong.closed.load(Ordering::Acquire) {
            return;
        }
        strong.conn.send_replace(None);
        strong.losses.send_modify(|losses| *losses += 1);
        strong.lost();
        let max_backoff = strong.options.max_backoff;
        drop(strong);
        let mut attempt = 0;
        events = loop {
            tokio::time::sleep(rpc_core::retry::reconnect_backoff(attempt, max_backoff)).await;
            attempt = attempt.saturating_add(1);
            let Some(strong) = inner.upgrade() else { return };
            if strong.closed.load(Ordering::Acquire) {
                return;
            }
            let conn = match strong.open().await {
                Ok(conn) => Arc::new(conn),
                Err(error) => {
                    tracing::debug!(%error, attempt, "reconnecting to RabbitMQ failed");
                    continue;
                }
            };
            let events = conn.connection.events_listener();
            match strong.restore(&conn).await {
                Ok(()) => {
                    tracing::info!(attempt, "reconnected to RabbitMQ");
                    strong.conn.send_replace(Some(conn));
                    break events.boxed();
                }
                Err(error) => {
                    tracing::warn!(%error, "restoring queues and consumers failed; reconnecting again");
                    close_connection(conn);
                }
            }
        };
    }
}

pub(super) fn soft_error(error: &lapin::Error) -> Option<AMQPSoftError> {
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(soft) => Some(soft.clone()),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// Whether `error` means the connection is gone (rather than one channel).
pub(super) fn connection_level(error: &lapin::Error) -> bool {
    match error.kind() {
        ErrorKind::ProtocolError(_) => error.is_amqp_hard_error(),
        ErrorKind::InvalidChannelState(..) => false,
        _ => true,
    }
}

fn declare_error(name: &str, error: lapin::Error) -> Error {
    match soft_error(&error) {
        Some(AMQPSoftError::PRECONDITIONFAILED) => Error::InvalidArgument(format!(
            "`{name}` exists with other options than these: declare it with the defaults to use it as it is ({error})"
        )),
        Some(AMQPSoftError::ACCESSREFUSED) => Error::Unauthorized(error.to_string()),
        _ => from_lapin(error),
    }
}

pub(super) fn from_lapin(error: lapin::Error) -> Error {
    match error.kind() {
        // ACCESS_REFUSED: no right on the resource; NOT_ALLOWED (on opening): no right on the virtual host.
        ErrorKind::ProtocolError(amqp)
            if matches!(
                amqp.kind(),
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)
            ) =>
        {
            Error::Unauthorized(error.to_string())
        }
        ErrorKind::InvalidConnectionState(_) | ErrorKind::IOError(_) | ErrorKind::MissingHeartbeatError => {
            Error::Disconnected
        }
        ErrorKind::InvalidChannelState(..) => Error::Transport(Box::new(error)),
        _ => Error::Transport(Box::new(error)),
    }
}
