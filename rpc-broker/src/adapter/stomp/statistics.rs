//! ActiveMQ's statistics plugin's answers, as the `jms-map-json` transformation writes them:
//! `{"map":{"entry":[{"string":"size","long":3},{"string":["destinationName","queue://q"]},...]}}`, and
//! `{"map":""}` for the empty map that ends a list.

use serde_json::Value;

/// A queue's figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Figures {
    /// Messages waiting: the queue's size less those dispatched and not yet acknowledged.
    pub(super) ready: usize,
    /// Messages dispatched and not yet acknowledged.
    pub(super) unacked: usize,
    /// Consumers subscribed.
    pub(super) consumers: usize,
    /// Messages the queue took since the server started (or made the queue).
    pub(super) enqueued: u64,
}

/// One answer.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Answer {
    /// The figures of the queue named.
    Queue(String, Figures),
    /// The end of the list.
    End,
    /// Something else (a topic's figures, a body that is not the plugin's).
    Unreadable,
}

/// Reads one answer's body.
pub(super) fn read(body: &[u8]) -> Answer {
    let Ok(value) = serde_json::from_slice::<Value>(body) else { return Answer::Unreadable };
    let Some(map) = value.get("map") else { return Answer::Unreadable };
    let entries = match map.get("entry") {
        Some(Value::Array(entries)) => entries.as_slice(),
        // XStream writes a list of one as the entry itself.
        Some(entry @ Value::Object(_)) => std::slice::from_ref(entry),
        _ => return Answer::End,
    };
    let mut name = None;
    let (mut size, mut inflight, mut consumers, mut enqueued) = (0u64, 0u64, 0u64, 0u64);
    for entry in entries {
        match entry.get("string") {
            // A string value: ["key", "value"].
            Some(Value::Array(pair)) if pair.first().and_then(Value::as_str) == Some("destinationName") => {
                name = pair.get(1).and_then(Value::as_str).and_then(|name| name.strip_prefix("queue://"));
            }
            Some(Value::String(key)) => {
                let number = entry.get("long").or_else(|| entry.get("int")).and_then(Value::as_u64).unwrap_or(0);
                match key.as_str() {
                    "size" => size = number,
                    "inflightCount" => inflight = number,
                    "consumerCount" => consumers = number,
                    "enqueueCount" => enqueued = number,
                    _ => {}
                }
            }
            _ => {}
        }
    }
    let Some(name) = name else { return Answer::Unreadable };
    let count = |number: u64| usize::try_from(number).unwrap_or(usize::MAX);
    let figures = Figures {
        ready: count(size.saturating_sub(inflight)),
        unacked: count(inflight),
        consumers: count(consumers),
        enqueued,
    };
    Answer::Queue(name.to_owned(), figures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queues_figures_and_the_end_of_the_list_are_read() {
        // As ActiveMQ 5.17.2 answered for a queue of three messages, one of them dispatched.
        let body = br#"{"map":{"entry":[{"string":"dequeueCount","long":0},{"string":["brokerId","ID:vm-1"]},
            {"string":"consumerCount","long":1},{"string":"inflightCount","long":1},{"string":"size","long":3},
            {"string":["destinationName","queue:\/\/probe.q"]},{"string":"enqueueCount","long":3}]}}"#;
        assert_eq!(
            read(body),
            Answer::Queue("probe.q".into(), Figures { ready: 2, unacked: 1, consumers: 1, enqueued: 3 })
        );
        assert_eq!(read(br#"{"map":""}"#), Answer::End);
        assert_eq!(read(b"\x82\xa1a"), Answer::Unreadable);
        let topic = br#"{"map":{"entry":{"string":["destinationName","topic://t"]}}}"#;
        assert_eq!(read(topic), Answer::Unreadable);
    }
}
