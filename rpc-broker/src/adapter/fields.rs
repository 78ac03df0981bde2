//! The envelope as `mqrpc-*` text fields beside a binary body (the names of [`super::headers`]), for brokers
//! whose messages carry name/value pairs: Kafka's record headers, Redis's stream entries.

use std::collections::BTreeMap;

use bytes::Bytes;
use rpc_core::{Envelope, ReplyTo, Text};
use uuid::Uuid;

use super::headers;

/// The envelope id, where the broker has no message id of its own.
pub(crate) const ID: &str = "mqrpc-id";
/// How many times the message was delivered before (a requeue publishes a copy with it raised).
pub(crate) const DELIVERY_COUNT: &str = "mqrpc-delivery-count";

/// The fields of `envelope` (its user headers last), with `delivery_count` when above 1.
pub(crate) fn to_pairs(envelope: &Envelope, delivery_count: u32) -> Vec<(&str, String)> {
    let mut pairs: Vec<(&str, String)> = Vec::with_capacity(12 + envelope.headers.len());
    pairs.push((headers::KIND, super::kind_name(envelope.kind).to_owned()));
    pairs.push((ID, envelope.id.to_string()));
    if let Some(correlation_id) = envelope.correlation_id {
        let text = match envelope.headers.get(headers::RAW_CORRELATION_ID) {
            Some(raw) => raw.clone(),
            None => correlation_id.to_string(),
        };
        pairs.push((headers::CORRELATION_ID, text));
    }
    if !envelope.service.is_empty() {
        pairs.push((headers::SERVICE, envelope.service.to_string()));
    }
    if !envelope.method.is_empty() {
        pairs.push((headers::METHOD, envelope.method.to_string()));
    }
    if let Some(reply_to) = &envelope.reply_to {
        pairs.push((headers::REPLY_TO, reply_to.address().to_owned()));
        if reply_to.is_inbox() {
            pairs.push((headers::REPLY_TO_INBOX, "true".to_owned()));
        }
    }
    if envelope.attempt > 1 {
        pairs.push((headers::ATTEMPT, envelope.attempt.to_string()));
    }
    if let Some(budget) = envelope.deadline_ms {
        pairs.push((headers::DEADLINE_MS, budget.to_string()));
    }
    if let Some(key) = &envelope.idempotency_key {
        pairs.push((headers::IDEMPOTENCY_KEY, key.to_string()));
    }
    if let Some(caller) = &envelope.caller {
        pairs.push((headers::CALLER, caller.to_string()));
    }
    if envelope.status != 0 {
        pairs.push((headers::STATUS, envelope.status.to_string()));
    }
    if let Some(message) = &envelope.status_message {
        pairs.push((headers::STATUS_MESSAGE, message.clone()));
    }
    if let Some(last) = envelope.last_status {
        pairs.push((headers::LAST_STATUS, last.to_string()));
    }
    if delivery_count > 1 {
        pairs.push((DELIVERY_COUNT, delivery_count.to_string()));
    }
    pairs.extend(super::user_headers(&envelope.headers).map(|(name, value)| (name, value.to_owned())));
    pairs
}

/// The envelope's fields among a message's name/value pairs; names it does not know are dropped, but user
/// headers.
#[derive(Default)]
pub(crate) struct Fields<'a> {
    kind: Option<&'a str>,
    id: Option<&'a str>,
    correlation_id: Option<&'a str>,
    service: Option<&'a str>,
    method: Option<&'a str>,
    reply_to: Option<&'a str>,
    reply_to_inbox: bool,
    attempt: Option<u32>,
    deadline_ms: Option<u64>,
    idempotency_key: Option<&'a str>,
    caller: Option<&'a str>,
    status: Option<u16>,
    status_message: Option<&'a str>,
    last_status: Option<u16>,
    delivery_count: Option<u32>,
    /// When the sender published it, by its clock (`mqrpc-sent-at-ms`).
    pub(crate) sent_at_ms: Option<u64>,
    user: BTreeMap<String, String>,
}

impl<'a> Fields<'a> {
    /// Reads `pairs`; a name given twice keeps its last value.
    pub(crate) fn read(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Fields<'a> {
        let mut fields = Fields::default();
        for (name, value) in pairs {
            match name {
                headers::KIND => fields.kind = Some(value),
                ID => fields.id = Some(value),
                headers::CORRELATION_ID => fields.correlation_id = Some(value),
                headers::SERVICE => fields.service = Some(value),
                headers::METHOD => fields.method = Some(value),
                headers::REPLY_TO => fields.reply_to = Some(value),
                headers::REPLY_TO_INBOX => fields.reply_to_inbox = value == "true",
                headers::ATTEMPT => fields.attempt = value.parse().ok(),
                headers::DEADLINE_MS => fields.deadline_ms = value.parse().ok(),
                headers::SENT_AT_MS => fields.sent_at_ms = value.parse().ok(),
                headers::IDEMPOTENCY_KEY => fields.idempotency_key = Some(value),
                headers::CALLER => fields.caller = Some(value),
                headers::STATUS => fields.status = value.parse().ok(),
                headers::STATUS_MESSAGE => fields.status_message = Some(value),
                headers::LAST_STATUS => fields.last_status = value.parse().ok(),
                DELIVERY_COUNT => fields.delivery_count = value.parse().ok(),
                name if super::is_user_header(name) => {
                    fields.user.insert(name.to_owned(), value.to_owned());
                }
                _ => {}
            }
        }
        fields
    }

    /// The envelope with `body`, and how many times it was delivered before this delivery's broker count (1
    /// when not said).
    pub(crate) fn envelope(self, body: Bytes) -> (Envelope, u32) {
        let mut user = self.user;
        let reply_to = self.reply_to.map(|address| match self.reply_to_inbox {
            true => ReplyTo::Inbox(Text::from(address)),
            false => ReplyTo::Queue(Text::from(address)),
        });
        let mut envelope = Envelope::new(super::kind_of(self.kind, reply_to.is_some()));
        if let Some(id) = self.id.and_then(|id| Uuid::parse_str(id).ok()) {
            envelope.id = id;
        }
        envelope.correlation_id = self.correlation_id.map(|text| {
            super::canonical_correlation(text).unwrap_or_else(|| {
                // A plain client's own correlation id: kept verbatim for the reply.
                user.insert(headers::RAW_CORRELATION_ID.to_owned(), text.to_owned());
                Uuid::new_v4()
            })
        });
        envelope.reply_to = reply_to;
        envelope.service = self.service.map(Text::from).unwrap_or_default();
        envelope.method = self.method.map(Text::from).unwrap_or_default();
        envelope.attempt = self.attempt.unwrap_or(1).max(1);
        envelope.deadline_ms = self.deadline_ms;
        envelope.idempotency_key = self.idempotency_key.map(Text::from);
        envelope.caller = self.caller.map(Text::from);
        envelope.status = self.status.unwrap_or(0);
        envelope.status_message = self.status_message.map(str::to_owned);
        envelope.last_status = self.last_status;
        envelope.headers = user;
        envelope.body = body;
        (envelope, self.delivery_count.unwrap_or(1).max(1))
    }
}
