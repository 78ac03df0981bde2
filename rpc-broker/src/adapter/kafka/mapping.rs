//! The envelope as a Kafka record: `mqrpc-*` headers (UTF-8 text) and the body as the record's value.

use std::time::Duration;

use bytes::Bytes;
use rdkafka::Message;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rpc_core::Envelope;

use crate::adapter;

use crate::adapter::fields::{self, Fields};

/// The headers of a record carrying `envelope`, with `delivery_count` when above 1.
pub(super) fn to_headers(envelope: &Envelope, delivery_count: u32) -> OwnedHeaders {
    let pairs = fields::to_pairs(envelope, delivery_count);
    let mut owned = OwnedHeaders::new_with_capacity(pairs.len());
    for (key, value) in &pairs {
        owned = owned.insert(Header { key, value: Some(value.as_str()) });
    }
    owned
}

/// The envelope of a record, its delivery count, and how long it was queued (from the record's timestamp,
/// the producer's clock unless the topic stamps the broker's).
pub(super) fn from_record<M: Message>(record: &M) -> (Envelope, u32, Duration) {
    let pairs = record.headers().into_iter().flat_map(|map| map.iter()).filter_map(|header| {
        let value = header.value.and_then(|value| std::str::from_utf8(value).ok())?;
        Some((header.key, value))
    });
    let body = record.payload().map(Bytes::copy_from_slice).unwrap_or_default();
    let (envelope, delivery_count) = Fields::read(pairs).envelope(body);
    let queued = match envelope.deadline_ms {
        Some(_) => {
            let sent_at = record.timestamp().to_millis().and_then(|millis| u64::try_from(millis).ok());
            adapter::queued_since(sent_at, adapter::now_ms())
        }
        None => Duration::ZERO,
    };
    (envelope, delivery_count, queued)
}

#[cfg(test)]
mod tests {
    use rdkafka::Timestamp;
    use rdkafka::message::OwnedMessage;
    use rpc_core::Kind;

    use rpc_core::ReplyTo;
    use uuid::Uuid;

    use super::*;
    use crate::adapter::fields::{DELIVERY_COUNT, ID};
    use crate::adapter::headers;

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
