//! The names of queues and topics, in one place so that clients, servers and tools agree.

use std::borrow::Cow;

/// The queue a service's requests go to: `<namespace>.<service>`, or `<service>` without a namespace.
pub fn service_queue(namespace: Option<&str>, service: &str) -> String {
    qualify(namespace, service)
}

/// As [`service_queue`], for a service name that may be static: without a namespace, the queue is the name
/// itself, borrowed where the name is.
pub fn service_queue_of(namespace: Option<&str>, service: Cow<'static, str>) -> Cow<'static, str> {
    match namespace {
        Some(namespace) if !namespace.is_empty() => Cow::Owned(qualify(Some(namespace), &service)),
        _ => service,
    }
}

/// The topic a service's broadcasts go to: `<namespace>.<service>.broadcast`.
pub fn service_topic(namespace: Option<&str>, service: &str) -> String {
    qualify(namespace, &format!("{service}.broadcast"))
}

/// The topic a service's workers answer pings on (see [`health`](crate::health)):
/// `<namespace>.<service>.ping`.
pub fn ping_topic(namespace: Option<&str>, service: &str) -> String {
    qualify(namespace, &format!("{service}.ping"))
}

/// The queue that holds the replies for durable callbacks named `name`: `<namespace>.callback.<name>`.
pub fn callback_queue(namespace: Option<&str>, name: &str) -> String {
    qualify(namespace, &format!("callback.{name}"))
}

/// The dead-letter queue of `queue`: `<queue>.dlq`.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dlq")
}

fn qualify(namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(namespace) if !namespace.is_empty() => format!("{namespace}.{name}"),
        _ => name.to_owned(),
    }
}
