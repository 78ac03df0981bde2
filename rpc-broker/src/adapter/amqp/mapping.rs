//! Envelope <-> AMQP message: properties, the `mqrpc-*` headers, and the conversions of header values.

use std::time::Duration;

use bytes::Bytes;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use rpc_core::{Envelope, Error, Kind, ReplyTo, Text};
use uuid::Uuid;

use super::DIRECT_REPLY_TO;
use crate::adapter::{self, headers};

/// A name as an AMQP short string (at most 255 bytes).
pub(super) fn short(name: &str) -> Result<ShortString, Error> {
    ShortString::try_new(name).map_err(|_| Error::InvalidArgument(format!("`{name}` is longer than 255 bytes")))
}

pub(super) fn integer(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some((*n).into()),
        AMQPValue::LongUInt(n) => Some((*n).into()),
        AMQPValue::ShortInt(n) => Some((*n).into()),
        AMQPValue::ShortUInt(n) => Some((*n).into()),
        AMQPValue::ShortShortInt(n) => Some((*n).into()),
        AMQPValue::ShortShortUInt(n) => Some((*n).into()),
        AMQPValue::LongString(text) => std::str::from_utf8(text.as_bytes()).ok()?.parse().ok(),
        _ => None,
    }
}

fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        AMQPValue::ShortString(text) => Some(text.as_str().to_owned()),
        other => integer(other).map(|n| n.to_string()),
    }
}

fn string_value(value: impl Into<Vec<u8>>) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.into()))
}

/// The AMQP properties and body of an envelope.
pub(super) fn to_amqp(envelope: &Envelope, persistent: bool) -> Result<(BasicProperties, Vec<u8>), Error> {
    to_amqp_marked(envelope, persistent, None)
}

/// As [`to_amqp`], with [`headers::UNBOUNDED_QUEUE`] set to `unbounded`.
pub(super) fn to_amqp_marked(
    envelope: &Envelope,
    persistent: bool,
    unbounded: Option<&str>,
) -> Result<(BasicProperties, Vec<u8>), Error> {
    let mut table = FieldTable::default();
    if let Some(queue) = unbounded {
        table.insert(headers::UNBOUNDED_QUEUE.into(), string_value(queue));
    }
    table.insert(headers::KIND.into(), string_value(adapter::kind_name(envelope.kind)));
    if !envelope.service.is_empty() {
        table.insert(headers::SERVICE.into(), string_value(envelope.service.as_str()));
    }
    if envelope.attempt > 1 {
        table.insert(headers::ATTEMPT.into(), AMQPValue::LongLongInt(envelope.attempt.into()));
    }
    if let Some(budget) = envelope.deadline_ms {
        table.insert(headers::DEADLINE_MS.into(), AMQPValue::LongLongInt(i64::try_from(budget).unwrap_or(i64::MAX)));
        let sent_at = i64::try_from(adapter::now_ms()).unwrap_or(i64::MAX);
        table.insert(headers::SENT_AT_MS.into(), AMQPValue::LongLongInt(sent_at));
    }
    if let Some(key) = &envelope.idempotency_key {
        table.insert(headers::IDEMPOTENCY_KEY.into(), string_value(key.as_str()));
    }
    if envelope.status != 0 {
        table.insert(headers::STATUS.into(), AMQPValue::LongLongInt(envelope.status.into()));
    }
    if let Some(message) = &envelope.status_message {
        table.insert(headers::STATUS_MESSAGE.into(), string_value(message.as_str()));
    }
    if let Some(last) = envelope.last_status {
        table.insert(headers::LAST_STATUS.into(), AMQPValue::LongLongInt(last.into()));
    }
    for (name, value) in adapter::user_headers(&envelope.headers) {
        table.insert(short(name)?, string_value(value));
    }
    let mut properties = BasicProperties::default()
        .with_message_id(short(&envelope.id.to_string())?)
        .with_content_type("application/msgpack".into())
        .with_timestamp(adapter::now_ms() / 1_000);
    let raw_correlation = envelope.headers.get(headers::RAW_CORRELATION_ID);
    if let Some(raw) = raw_correlation {
        properties = properties.with_correlation_id(short(raw)?);
    } else if let Some(correlation_id) = envelope.correlation_id {
        properties = properties.with_correlation_id(short(&correlation_id.to_string())?);
    }
    if let Some(reply_to) = &envelope.reply_to {
        properties = properties.with_reply_to(short(reply_to.address())?);
        if reply_to.is_inbox() {
            table.insert(headers::REPLY_TO_INBOX.into(), AMQPValue::Boolean(true));
        }
    }
    if !envelope.method.is_empty() {
        properties = properties.with_type(short(&envelope.method)?);
    }
    if let Some(budget) = envelope.deadline_ms {
        properties = properties.with_expiration(short(&budget.max(1).to_string())?);
    }
    if let Some(priority) = envelope.priority {
        properties = properties.with_priority(priority);
    }
    if let Some(caller) = &envelope.caller {
        // `app_id`, AMQP's "creating application": free-form, unlike `user_id`, which RabbitMQ checks against
        // the connection's user.
        properties = properties.with_app_id(short(caller)?);
    }
    if persistent && envelope.kind != Kind::Reply {
        properties = properties.with_delivery_mode(2);
    }
    properties = properties.with_headers(table);
    Ok((properties, envelope.body.to_vec()))
}

/// The envelope of an AMQP message: written by [`to_amqp`], or by a plain AMQP client.
/// Returns it with the time it was queued, by the sender's clock (`deadline_ms` is left as the sender wrote it).
/// Every message maps: a missing property takes its default, and what the worker cannot serve it answers (a
/// request without `type` gets status 2, a body that is not the arguments status 3).
pub(super) fn from_amqp(properties: BasicProperties, body: Vec<u8>) -> (Envelope, Duration) {
    let header = |name: &str| properties.headers().as_ref().and_then(|table| table.inner().get(name));
    let reply_to = properties.reply_to().as_ref().map(|reply_to| reply_to.as_str().to_owned());
    let kind_name = header(headers::KIND).and_then(text);
    let mut envelope = Envelope::new(adapter::kind_of(kind_name.as_deref(), reply_to.is_some()));
    if let Some(id) = properties.message_id().as_ref().and_then(|id| Uuid::parse_str(id.as_str()).ok()) {
        envelope.id = id;
    }
    if let Some(correlation) = properties.correlation_id() {
        match adapter::canonical_correlation(correlation.as_str()) {
            Some(id) => envelope.correlation_id = Some(id),
            None => {
                // A plain client's own correlation id: kept verbatim for the reply.
                envelope.correlation_id = Some(Uuid::new_v4());
                envelope.headers.insert(headers::RAW_CORRELATION_ID.to_owned(), correlation.as_str().to_owned());
            }
        }
    }
    // RabbitMQ's direct reply-to is an inbox by the broker's own definition.
    let inbox = header(headers::REPLY_TO_INBOX).is_some_and(|flag| matches!(flag, AMQPValue::Boolean(true)));
    envelope.reply_to = reply_to.map(|address| match inbox || address.starts_with(DIRECT_REPLY_TO) {
        true => ReplyTo::Inbox(Text::from(address)),
        false => ReplyTo::Queue(Text::from(address)),
    });
    envelope.service = header(headers::SERVICE).and_then(text).map(Text::from).unwrap_or_default();
    envelope.method = properties.kind().as_ref().map(|kind| Text::from(kind.as_str())).unwrap_or_default();
    envelope.attempt =
        header(headers::ATTEMPT).and_then(integer).and_then(|n| u32::try_from(n).ok()).unwrap_or(1).max(1);
    let budget = header(headers::DEADLINE_MS)
        .and_then(integer)
        .or_else(|| properties.expiration().as_ref().and_then(|expiration| expiration.as_str().parse().ok()))
        .and_then(|budget| u64::try_from(budget).ok());
    let mut queued = Duration::ZERO;
    if let Some(budget) = budget {
        let sent_at = header(headers::SENT_AT_MS)
            .and_then(integer)
            .and_then(|sent| u64::try_from(sent).ok())
            .or_else(|| properties.timestamp().map(|seconds| seconds.saturating_mul(1_000)));
        envelope.deadline_ms = Some(budget);
        queued = adapter::queued_since(sent_at, adapter::now_ms());
    }
    envelope.idempotency_key = header(headers::IDEMPOTENCY_KEY).and_then(text).map(Text::from);
    envelope.caller = properties.app_id().as_ref().map(|caller| Text::from(caller.as_str()));
    envelope.priority = properties.priority().filter(|priority| *priority > 0);
    envelope.status = header(headers::STATUS).and_then(integer).and_then(|code| u16::try_from(code).ok()).unwrap_or(0);
    envelope.status_message = header(headers::STATUS_MESSAGE).and_then(text);
    envelope.last_status = header(headers::LAST_STATUS).and_then(integer).and_then(|code| u16::try_from(code).ok());
    for (name, value) in properties.headers().iter().flat_map(|table| table.inner()) {
        if adapter::is_user_header(name.as_str())
            && let Some(value) = text(value)
        {
            envelope.headers.insert(name.as_str().to_owned(), value);
        }
    }
    envelope.body = Bytes::from(body);
    (envelope, queued)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_round_trips_through_amqp_properties() {
        let mut envelope = Envelope::new(Kind::Request);
        envelope.correlation_id = Some(Uuid::new_v4());
        envelope.service = "Calculator".into();
        envelope.method = "add".into();
        envelope.reply_to = Some(ReplyTo::Inbox("mqrpc.inbox.1".into()));
        envelope.deadline_ms = Some(5_000);
        envelope.attempt = 3;
        envelope.idempotency_key = Some("key".into());
        envelope.priority = Some(7);
        envelope.caller = Some("billing".into());
        envelope.headers.insert("order".into(), "7".into());
        envelope.body = Bytes::from_static(b"\x81\xa1a\x01");
        let (properties, body) = to_amqp(&envelope, true).expect("maps");
        assert_eq!(properties.delivery_mode(), &Some(2));
        assert_eq!(properties.expiration().as_ref().map(ShortString::as_str), Some("5000"));
        let (back, queued) = from_amqp(properties, body);
        assert!(queued < Duration::from_secs(1), "{queued:?}");
        assert_eq!(back, envelope);
    }

    #[test]
    fn a_plain_clients_correlation_id_is_echoed_verbatim() {
        let properties = BasicProperties::default()
            .with_correlation_id("42".into())
            .with_reply_to("amq.gen-1".into())
            .with_type("add".into());
        let (request, _) = from_amqp(properties, b"\x80".to_vec());
        assert_eq!(request.kind, Kind::Request);
        assert_eq!(request.method, "add");
        let reply = request.reply(Ok(Bytes::from_static(b"\x05")));
        let (properties, _) = to_amqp(&reply, true).expect("maps");
        assert_eq!(properties.correlation_id().as_ref().map(ShortString::as_str), Some("42"));
        assert_eq!(properties.delivery_mode(), &None, "replies are transient");
    }

    #[test]
    fn a_uuid_in_another_form_than_ours_is_echoed_verbatim() {
        for id in [
            "6F9619FF-8B86-D011-B42D-00CF4FC964FF",
            "6f9619ff8b86d011b42d00cf4fc964ff",
            "{6f9619ff-8b86-d011-b42d-00cf4fc964ff}",
        ] {
            let properties = BasicProperties::default()
                .with_correlation_id(id.into())
                .with_reply_to("amq.gen-1".into())
                .with_type("add".into());
            let (request, _) = from_amqp(properties, b"\x80".to_vec());
            let reply = request.reply(Ok(Bytes::from_static(b"\x05")));
            let (properties, _) = to_amqp(&reply, true).expect("maps");
            assert_eq!(properties.correlation_id().as_ref().map(ShortString::as_str), Some(id));
        }
        let ours = "6f9619ff-8b86-d011-b42d-00cf4fc964ff";
        let properties = BasicProperties::default().with_correlation_id(ours.into()).with_reply_to("amq.gen-1".into());
        let (request, _) = from_amqp(properties, b"\x80".to_vec());
        assert_eq!(request.correlation_id.map(|id| id.to_string()).as_deref(), Some(ours));
    }
}
