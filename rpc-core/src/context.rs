//! The context of the request a handler is running for: its correlation id, attempt, deadline, caller and
//! headers.
//!
//! Inside a handler, [`current`] returns it; calls made from inside a handler inherit its remaining time budget
//! automatically, so a chain of nested calls never outlives the first caller's deadline.

use std::collections::BTreeMap;
use std::future::Future;

use tokio::time::Instant;
use uuid::Uuid;

tokio::task_local! {
    static CURRENT: RequestContext;
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
    CURRENT.try_with(Clone::clone).ok()
}

/// The deadline of the request the current task is handling.
pub(crate) fn deadline() -> Option<Instant> {
    CURRENT.try_with(|context| context.deadline).ok().flatten()
}

pub(crate) async fn scope<F: Future>(context: RequestContext, future: F) -> F::Output {
    CURRENT.scope(context, future).await
}
