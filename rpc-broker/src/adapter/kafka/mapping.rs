//! The envelope as a Kafka record: `mqrpc-*` headers (UTF-8 text) and the body as the record's value.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use rdkafka::Message;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rpc_core::{Envelope, ReplyTo};
use uuid::Uuid;

use crate::adapter::{self, headers};

/// The envelope id (Kafka has no message id of its own).
pub(super) const ID: &str = "mqrpc-id";
/// How many times this adapter delivered the message before (a requeue publishes a copy with it raised).
pub(super) const DELIVERY_COUNT: &str = "mqrpc-delivery-count";

/// The headers of a record carrying `envelope`, with `delivery_count` when above 1.
pub(super) fn to_headers(envelope: &Envelope, delivery_count: u32) -> OwnedHeaders {
    let mut pairs: Vec<(&str, String)> = Vec::with_capacity(12);
    pairs.push((headers::KIND, adapter::kind_name(envelope.kind).to_owned()));
    pairs.push((ID, envelope.id.to_string()));
    if let Some(correlation_id) = envelope.correlation_id {
        let text = match envelope.headers.get(headers::RAW_CORRELATION_ID) {
            Some(raw) => raw.clone(),
            None => correlation_id.to_string(),
        };
        pairs.push((headers::CORRELATION_ID, text));
    }
    if !envelope.service.is_empty() {
        pairs.push((headers::SERVICE, envelope.service.clone()));
    }
    if !envelope.method.is_empty() {
        pairs.push((headers::METHOD, envelope.method.clone()));
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
        pairs.push((headers::IDEMPOTENCY_KEY, key.clone()));
    }
    if let Some(caller) = &envelope.caller {
        pairs.push((headers::CALLER, caller.clone()));
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
    let user = adapter::user_headers(&envelope.headers);
    let mut owned = OwnedHeaders::new_with_capacity(pairs.len() + envelope.headers.len());
    for (key, value) in &pairs {
        owned = owned.insert(Header { key, value: Some(value.as_str()) });
    }
    for (key, value) in user {
        owned = owned.insert(Header { key, value: Some(value) });
    }
    owned
}

/// The envelope of a record, its delivery count, and how long it was queued (from the record's timestamp,
/// the producer's clock unless the topic stamps the broker's).
pub(super) fn from_record<M: Message>(record: &M) -> (Envelope, u32, Duration) {
    let mut fields = Fields::default();
    let mut user = BTreeMap::new();
    if let Some(map) = record.headers() {
        for header in map.iter() {
            let Some(value) = header.value.and_then(|value| std::str::from_utf8(value).ok()) else { continue };
            match header.key {
                headers::KIND => fields.kind = Some(value),
                ID => fields.id = Some(value),
                headers::CORRELATION_ID => fields.correlation_id = Some(value),
                headers::SERVICE => fields.service = Some(value),
                headers::METHOD => fields.method = Some(value),
                headers::REPLY_TO => fields.reply_to = Some(value),
                headers::REPLY_TO_INBOX => fields.reply_to_inbox = value == "true",
                headers::ATTEMPT => fields.attempt = value.parse().ok(),
                headers::DEADLINE_MS => fields.deadline_ms = value.parse().ok(),
                headers::IDEMPOTENCY_KEY => fields.idempotency_key = Some(value),
                headers::CALLER => fields.caller = Some(value),
                headers::STATUS => fields.status = value.parse().ok(),
                headers::STATUS_MESSAGE => fields.status_message = Some(value),
                headers::LAST_STATUS => fields.last_status = value.parse().ok(),
                DELIVERY_COUNT => fields.delivery_count = value.parse().ok(),
                name if adapter::is_user_header(name) => {
                    user.insert(name.to_owned(), value.to_owned());
                }
                _ => {}
            }
        }
    }
    let reply_to = fields.reply_to.map(|address| match fields.reply_to_inbox {
        true => ReplyTo::Inbox(address.to_owned()),
        false => ReplyTo::Queue(address.to_owned()),
    });
    let mut envelope = Envelope::new(adapter::kind_of(fields.kind, reply_to.is_some()));
    if let Some(id) = fields.id.and_then(|id| Uuid::parse_str(id).ok()) {
        envelope.id = id;
    }
    envelope.correlation_id = fields.correlation_id.map(|text| {
        adapter::canonical_correlation(text).unwrap_or_else(|| {
            // A plain client's own correlation id: kept verbatim for the reply.
            user.insert(headers::RAW_CORRELATION_ID.to_owned(), text.to_owned());
            Uuid::new_v4()
        })
    });
    envelope.reply_to = reply_to;
    envelope.service = fields.service.unwrap_or_default().to_owned();
    envelope.method = fields.method.unwrap_or_default().to_owned();
    envelope.attempt = fields.attempt.unwrap_or(1).max(1);
    envelope.deadline_ms = fields.deadline_ms;
    envelope.idempotency_key = fields.idempotency_key.map(str::to_owned);
    envelope.caller = fields.caller.map(str::to_owned);
    envelope.status = fields.status.unwrap_or(0);
    envelope.status_message = fields.status_message.map(str::to_owned);
    envelope.last_status = fields.last_status;
    envelope.headers = user;
    envelope.body = record.payload().map(Bytes::copy_from_slice).unwrap_or_default();
    let queued = match envelope.deadline_ms {
        Some(_) => {
            let sent_at = record.timestamp().to_millis().and_then(|millis| u64::try_from(millis).ok());
            adapter::queued_since(sent_at, adapter::now_ms())
        }
        None => Duration::ZERO,
    };
    (envelope, fields.delivery_count.unwrap_or(1).max(1), queued)
}

/// The envelope's fields among a record's headers.
#[derive(Default)]
struct Fields<'a> {
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
}

#[cfg(test)]
mod tests {
    use rdkafka::Timestamp;
    use rdkafka::message::OwnedMessage;
    use rpc_core::Kind;

    use super::*;

    fn record(envelope: &Envelope, delivery_count: u32, timestamp: Timestamp) -> OwnedMessage {
        let headers = to_headers(envelope, delivery_count);
        OwnedMessage::new(Some(envelope.body.to_vec()), None, "q".into(), timestamp, 0, 0, Some(headers))
    }

    #[test]
    fn an_envelope_round_trips_through_record_headers() {
        let mut envelope = Envelope::new(Kind::Request);
        envelope.correlation_id = Some(Uuid::new_v4());
        envelope.service = "Calculator".into();
        envelope.method = "add".into();
        envelope.reply_to = Some(ReplyTo::Inbox("mqrpc.inbox.1".into()));
        envelope.deadline_ms = Some(5_000);
        envelope.attempt = 3;
        envelope.idempotency_key = Some("key".into());
        envelope.caller = Some("billing".into());
        envelope.headers.insert("order".into(), "7".into());
        envelope.body = Bytes::from_static(b"\x82\xa1a\x02\xa1b\x03");
        let now = i64::try_from(adapter::now_ms()).expect("fits");
        let (back, delivery_count, queued) = from_record(&record(&envelope, 2, Timestamp::CreateTime(now - 300)));
        assert_eq!(back, envelope);
        assert_eq!(delivery_count, 2);
        assert!(queued >= Duration::from_millis(300) && queued < Duration::from_secs(5), "{queued:?}");
    }

    fn header_name() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let known = [
            headers::KIND,
            ID,
            headers::CORRELATION_ID,
            headers::SERVICE,
            headers::METHOD,
            headers::REPLY_TO,
            headers::REPLY_TO_INBOX,
            headers::ATTEMPT,
            headers::DEADLINE_MS,
            headers::IDEMPOTENCY_KEY,
            headers::CALLER,
            headers::STATUS,
            headers::STATUS_MESSAGE,
            headers::LAST_STATUS,
            DELIVERY_COUNT,
        ];
        prop_oneof![proptest::sample::select(known.to_vec()).prop_map(str::to_owned), ".{0,12}"]
    }

    proptest::proptest! {
        /// Any headers a foreign producer writes (names ours or not, values any bytes or none, repeated) read
        /// as an envelope without a panic, and that envelope reads back the same from its own headers.
        #[test]
        fn any_record_headers_read_as_an_envelope_that_round_trips(
            fields in proptest::collection::vec(
                (header_name(), proptest::option::of(proptest::collection::vec(proptest::num::u8::ANY, 0..24))),
                0..20,
            ),
            timestamp in proptest::num::i64::ANY,
        ) {
            let mut owned = OwnedHeaders::new();
            for (key, value) in &fields {
                owned = owned.insert(Header { key: key.as_str(), value: value.as_deref() });
            }
            let message = OwnedMessage::new(None, None, "q".into(), Timestamp::CreateTime(timestamp), 0, 0, Some(owned));
            let (envelope, delivery_count, _) = from_record(&message);
            let (mut again, count_again, _) = from_record(&record(&envelope, delivery_count, Timestamp::NotAvailable));
            if again.headers.contains_key(headers::RAW_CORRELATION_ID) {
                // A foreign correlation id travels verbatim; the id the process goes by is drawn at each read.
                again.correlation_id = envelope.correlation_id;
            }
            proptest::prop_assert_eq!(again, envelope);
            proptest::prop_assert_eq!(count_again, delivery_count.max(1));
        }
    }

    #[test]
    fn a_reply_carries_its_status_and_a_foreign_correlation_id_verbatim() {
        let mut request = Envelope::new(Kind::Request);
        request.correlation_id = Some(Uuid::new_v4());
        request.headers.insert(headers::RAW_CORRELATION_ID.into(), "ABC-1".into());
        let status = rpc_core::Status::new(rpc_core::Code::DeadLettered, "gave up")
            .with_cause(rpc_core::Code::Application)
            .with_details(Bytes::from_static(b"\xa1x"));
        let reply = request.reply(Err(status));
        let owned = record(&reply, 1, Timestamp::NotAvailable);
        let raw = owned.headers().and_then(|map| {
            map.iter().find(|header| header.key == headers::CORRELATION_ID).and_then(|header| header.value)
        });
        assert_eq!(raw, Some(&b"ABC-1"[..]));
        let (back, _, _) = from_record(&owned);
        assert_eq!((back.status, back.last_status), (11, Some(1)));
        assert_eq!(back.status().application_error::<String>().map(Result::ok), Some(Some("x".to_owned())));
    }
}
