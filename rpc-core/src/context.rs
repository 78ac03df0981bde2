//! The context of the request a handler is running for: its correlation id, attempt, deadline, caller and
//! headers.
//!
//! Inside a handler, [`current`] returns it; calls made from inside a handler inherit its remaining time budget
//! automatically, so a chain of nested calls never outlives the first caller's deadline.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use tokio::time::Instant;
use uuid::Uuid;

use crate::envelope::Envelope;

tokio::task_local! {
    static CURRENT: Current;
}

/// What the task-local holds: the request itself, shared with the server, so that a handler that never asks
/// for its context costs no copies.
pub(crate) struct Current {
    pub(crate) envelope: Arc<Envelope>,
    pub(crate) attempt: u32,
    pub(crate) deadline: Option<Instant>,
}

impl Current {
    fn context(&self) -> RequestContext {
        let envelope = &self.envelope;
        RequestContext {
            correlation_id: envelope.correlation_id,
            service: envelope.service.to_string(),
            method: envelope.method.to_string(),
            attempt: self.attempt,
            deadline: self.deadline,
            idempotency_key: envelope.idempotency_key.as_deref().map(str::to_owned),
            caller: envelope.caller.as_deref().map(str::to_owned),
            headers: envelope.headers.clone(),
        }
    }
}

/// What a handler knows about the request it serves.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RequestContext {
    /// The call's correlation id.
    pub correlation_id: Option<Uuid>,
    /// The service's name.
    pub service: String,
    /// The method's name.
    pub method: String,
    /// Which attempt this is, from 1; a redelivery after a worker died counts as a new attempt.
    pub attempt: u32,
    /// When the caller stops waiting, if it set a deadline.
    pub deadline: Option<Instant>,
    /// The call's idempotency key.
    pub idempotency_key: Option<String>,
    /// Who sent the call, as its client declared it ([`ClientBuilder::identity`](crate::ClientBuilder::identity)).
    pub caller: Option<String>,
    /// The request's headers.
    pub headers: BTreeMap<String, String>,
}

/// The context of the request the current task is handling, or `None` outside a handler.
pub fn current() -> Option<RequestContext> {
    CURRENT.try_with(Current::context).ok()
}

/// Runs `f` with the request the current task is handling; not at all outside a handler.
pub(crate) fn with_request(f: impl FnOnce(&Envelope)) {
    let _ = CURRENT.try_with(|current| f(&current.envelope));
}

/// The deadline of the request the current task is handling.
pub(crate) fn deadline() -> Option<Instant> {
    CURRENT.try_with(|context| context.deadline).ok().flatten()
}

/// `future` run with `current` as the context of its task.
pub(crate) fn scope<F: Future>(current: Current, future: F) -> impl Future<Output = F::Output> {
    CURRENT.scope(current, future)
}
