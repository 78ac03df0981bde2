//! Logical consumers: what the application consumes, outliving connections, and their routes on each one.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use rpc_core::transport::{Acker, Cancellations, Consumer, ConsumerControl, Delivery, DeliverySink};
use rpc_core::{ConsumeOptions, Error};
use tokio::sync::mpsc;

use super::Inner;
use super::connection::{Conn, Waiter};
use crate::protocol::ClientFrame;

/// A consumer as the application sees it: it outlives connections.
pub(super) struct Logical {
    kind: LogicalKind,
    prefetch: u32,
    auto_ack: bool,
    pub(super) paused: bool,
    sender: mpsc::UnboundedSender<Delivery>,
    /// Takes the deliveries instead of the stream, once set ([`ConsumerControl::direct`]).
    direct: Option<DeliverySink>,
}

#[derive(Clone)]
pub(super) enum LogicalKind {
    Queue(String),
    Group { topic: String, group: String },
    Inbox(String),
}

pub(super) struct Route {
    pub(super) logical: u64,
    pub(super) sender: mpsc::UnboundedSender<Delivery>,
    pub(super) direct: Option<DeliverySink>,
    pub(super) acker: Arc<dyn Acker>,
    pub(super) cancellations: Arc<Cancellations>,
}

impl Inner {
    /// Starts `logical` on `conn`.
    pub(super) async fn start_consumer(&self, conn: &Conn, id: u64) -> Result<(), Error> {
        let Some((kind, prefetch, auto_ack, sender, direct)) = self.consumers().get(&id).map(|logical| {
            let (kind, sender, direct) = (logical.kind.clone(), logical.sender.clone(), logical.direct.clone());
            (kind, logical.prefetch, logical.auto_ack, sender, direct)
        }) else {
            return Ok(());
        };
        let (what, frame): (String, Box<dyn FnOnce(u32) -> ClientFrame + Send>) = match kind {
            LogicalKind::Queue(queue) => {
                (queue.clone(), Box::new(move |req| ClientFrame::Consume { req, queue, prefetch, auto_ack }))
            }
            LogicalKind::Group { topic, group } => {
                (topic.clone(), Box::new(move |req| ClientFrame::Subscribe { req, topic, group, prefetch, auto_ack }))
            }
            LogicalKind::Inbox(name) => (name.clone(), Box::new(move |req| ClientFrame::OpenInbox { req, name })),
        };
        match self.request_on(conn, frame, |answer| Waiter::Consumer { logical: id, sender, direct, answer }).await? {
            Ok(_) => Ok(()),
            Err((code, message)) => Err(code.to_error(&what, message)),
        }
    }

    pub(super) async fn consumer(
        self: &Arc<Self>,
        kind: LogicalKind,
        options: ConsumeOptions,
    ) -> Result<Consumer, Error> {
        let id = self.next_logical.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = mpsc::unbounded_channel();
        let logical = Logical {
            kind,
            prefetch: options.prefetch,
            auto_ack: options.auto_ack,
            paused: false,
            sender,
            direct: None,
        };
        self.consumers().insert(id, logical);
        let conn = self.current().ok_or(Error::Disconnected);
        let started = match conn {
            Ok(conn) => self.start_consumer(&conn, id).await,
            Err(error) => Err(error),
        };
        if let Err(error) = started {
            self.consumers().remove(&id);
            return Err(error);
        }
        let guard = LogicalGuard { inner: Arc::clone(self), id };
        Ok(Consumer::from_channel(receiver, Some(Box::new(guard))))
    }
}

/// Ends a logical consumer when its [`Consumer`] is dropped. A consumer keeps its connection alive.
struct LogicalGuard {
    inner: Arc<Inner>,
    id: u64,
}

impl LogicalGuard {
    /// The connection and the broker's id of this consumer on it, if it has one now.
    fn on_broker(&self) -> Option<(Arc<Conn>, u64)> {
        let conn = self.inner.current()?;
        let consumer = conn.routes.iter().find(|route| route.logical == self.id).map(|route| *route.key())?;
        Some((conn, consumer))
    }
}

impl ConsumerControl for LogicalGuard {
    fn pause(&self) {
        if let Some(logical) = self.inner.consumers().get_mut(&self.id) {
            logical.paused = true;
        }
        if let Some((conn, consumer)) = self.on_broker() {
            let _ = conn.send(ClientFrame::Pause { consumer });
        }
    }

    fn direct(&self, sink: DeliverySink) -> bool {
        match self.inner.consumers().get_mut(&self.id) {
            Some(logical) => logical.direct = Some(Arc::clone(&sink)),
            None => return false,
        }
        // The route of the consumer on the current connection, if it has one; a new connection's routes take it
        // from the logical consumer.
        if let Some((conn, consumer)) = self.on_broker()
            && let Some(mut route) = conn.routes.get_mut(&consumer)
        {
            route.direct = Some(sink);
        }
        true
    }
}

impl Drop for LogicalGuard {
    fn drop(&mut self) {
        if let Some((conn, consumer)) = self.on_broker() {
            conn.routes.remove(&consumer);
            let _ = conn.send(ClientFrame::Cancel { req: conn.req(), consumer });
        }
        self.inner.consumers().remove(&self.id);
    }
}
