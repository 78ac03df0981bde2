//! Envelope <-> NATS message: the headers, the whole envelope in a body marked `0xc1`, subjects and reply
//! subjects.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use async_nats::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use rpc_core::{Envelope, Error, Kind, ReplyTo, Text, codec};
use uuid::Uuid;

use crate::adapter::{self, headers};

/// The header of the message id that JetStream deduplicates on.
const MSG_ID: &str = "Nats-Msg-Id";

/// The first byte of a body that carries a whole envelope: `0xc1` is never used in MessagePack, so no
/// argument or result body (one MessagePack value) starts with it.
const ENVELOPE_MARK: u8 = 0xc1;
/// The bytes before the envelope in such a body: the mark and the sending time.
const ENVELOPE_PREFIX: usize = 1 + 8;
/// The last token of an mqrpc client's inbox address: replies to it carry the whole envelope.
pub(super) const ENVELOPE_INBOX: &str = "mqrpc";

/// Whether a reply subject `<inbox>.<correlation id>` belongs to an mqrpc inbox: its last token but one is
/// [`ENVELOPE_INBOX`]. Read from the end, byte by byte (every reply asks).
pub(super) fn is_envelope_inbox(subject: &str) -> bool {
    let bytes = subject.as_bytes();
    let Some(last) = bytes.iter().rposition(|&byte| byte == b'.') else { return false };
    let Some(head) = bytes[..last].strip_suffix(ENVELOPE_INBOX.as_bytes()) else { return false };
    head.is_empty() || head.ends_with(b".")
}

/// A body carrying `envelope` whole (its reply address travels as the message's reply subject), in the
/// envelope's compact form (version 2) if `compact`, else in its full form (version 1).
pub(super) fn envelope_body(envelope: &Envelope, compact: bool) -> Result<Bytes, Error> {
    let mut prefix = [0u8; ENVELOPE_PREFIX];
    prefix[0] = ENVELOPE_MARK;
    prefix[1..].copy_from_slice(&adapter::now_ms().to_be_bytes());
    Ok(match compact {
        true => codec::encode_compact_envelope_after(&prefix, envelope)?,
        false => codec::encode_envelope_after(&prefix, envelope)?,
    })
}

/// The envelope a message carries whole in its body, if it is such a message, its reply address the message's
/// own reply subject (`own_reply`, none for a message read from a stream).
/// Returns it with the time it was on its way, by the sender's clock.
fn from_envelope_body(
    message: &async_nats::Message,
    own_reply: Option<&str>,
    received_at: std::time::Instant,
) -> Option<Result<(Envelope, Duration), Error>> {
    let payload = &message.payload;
    let plain = message.headers.as_ref().is_none_or(HeaderMap::is_empty);
    if !plain || payload.first() != Some(&ENVELOPE_MARK) {
        return None;
    }
    let decoded = (|| {
        let sent_at = payload
            .get(1..ENVELOPE_PREFIX)
            .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
            .map(u64::from_be_bytes)
            .ok_or(codec::CodecError::Malformed("a body marked as an envelope is shorter than its prefix"))?;
        let envelope = codec::decode_envelope_bytes(&payload.slice(ENVELOPE_PREFIX..), &codec::Limits::default())?;
        Ok::<_, codec::CodecError>((envelope, adapter::queued_since(Some(sent_at), adapter::wall_ms_at(received_at))))
    })();
    Some(decoded.map_err(Error::from).map(|(mut envelope, queued)| {
        if let Some(reply) = own_reply {
            // Shared without allocating when the answer makes its subject of it (`CoreAcker::answer`).
            envelope.reply_to = Some(ReplyTo::Inbox(Text::copied(reply)));
        }
        (envelope, queued)
    }))
}

/// The reply subject of a request: `<inbox>.<correlation id>` for a call through an inbox (so that the
/// server's no-responders status names the call), else the envelope's reply address. With `write_back`, the
/// envelope's reply address becomes that subject (a stream's headers carry it); without, it is left as it was,
/// for a message whose envelope goes without it (core NATS), and the subject made is not copied again.
pub(super) fn reply_subject(envelope: &mut Envelope, write_back: bool) -> Option<async_nats::Subject> {
    let call = (envelope.kind == Kind::Request).then_some(envelope.correlation_id).flatten();
    let reply_to = match envelope.reply_to.as_mut()? {
        ReplyTo::Inbox(inbox) => {
            if let Some(correlation_id) = call {
                let mut buffer = [0u8; uuid::fmt::Simple::LENGTH];
                let id = correlation_id.simple().encode_lower(&mut buffer);
                if !inbox.ends_with(&*id) {
                    let mut subject = String::with_capacity(inbox.len() + 1 + id.len());
                    subject.push_str(inbox);
                    subject.push('.');
                    subject.push_str(id);
                    if !write_back {
                        // The string becomes the subject as it is.
                        return Some(async_nats::Subject::from(subject));
                    }
                    *inbox = Text::from(subject);
                }
            }
            inbox
        }
        ReplyTo::Queue(queue) => queue,
    };
    // Copied at its exact size.
    Some(async_nats::Subject::from(reply_to.as_str()))
}

/// Refuses a reply subject that would break the protocol's line: empty, or with whitespace. The client does not
/// check what it publishes (see [`Nats::connect`](super::Nats::connect)): every publish checks its subject
/// with [`check_subject`] and its reply subject here.
pub(super) fn check_reply(reply: Option<&str>) -> Result<(), Error> {
    match reply {
        Some(reply) if reply.is_empty() || reply.contains([' ', '\t', '\r', '\n']) => {
            Err(Error::InvalidArgument(format!("`{reply}` is not a valid NATS reply subject")))
        }
        _ => Ok(()),
    }
}

/// Refuses a subject NATS would not route as one: empty, an empty token, whitespace, or a wildcard. One pass
/// over the bytes (every publish checks its subject).
pub(super) fn check_subject(subject: &str) -> Result<(), Error> {
    // The byte before the first counts as a dot: a leading dot is an empty first token.
    let mut previous = b'.';
    let mut valid = true;
    for &byte in subject.as_bytes() {
        let empty_token = byte == b'.' && previous == b'.';
        valid &= !(empty_token || matches!(byte, b' ' | b'\t' | b'\r' | b'\n' | b'*' | b'>'));
        previous = byte;
    }
    // Empty, or a trailing dot: an empty last token.
    valid &= previous != b'.';
    if valid { Ok(()) } else { Err(Error::InvalidArgument(format!("`{subject}` is not a valid NATS subject"))) }
}

fn header(headers: &mut HeaderMap, name: &str, value: &str) -> Result<(), Error> {
    let name = HeaderName::from_str(name).map_err(|_| Error::InvalidArgument(format!("bad header name `{name}`")))?;
    let value = HeaderValue::from_str(value)
        .map_err(|_| Error::InvalidArgument(format!("the value of header `{name}` holds a line break")))?;
    headers.insert(name, value);
    Ok(())
}

/// How a message travels, which decides the headers it needs.
#[derive(Clone, Copy, Debug)]
pub(super) enum Mode {
    /// Into a JetStream stream: every field in a header, the message id for deduplication.
    Stream,
    /// Core NATS: what the subjects already say is left out, since headers cost on every hop.
    Core {
        /// The message goes to a caller's inbox (a reply).
        to_inbox: bool,
        /// The subject the reply goes to (a request) or comes on (a reply) ends with the correlation id.
        correlation_in_subject: bool,
    },
}

/// The headers of an envelope.
pub(super) fn to_headers(envelope: &Envelope, mode: Mode) -> Result<HeaderMap, Error> {
    let mut map = HeaderMap::new();
    let (stream, to_inbox, correlation_in_subject) = match mode {
        Mode::Stream => (true, false, false),
        Mode::Core { to_inbox, correlation_in_subject } => (false, to_inbox, correlation_in_subject),
    };
    if stream {
        header(&mut map, MSG_ID, &envelope.id.to_string())?;
    }
    // The receiver takes a message with a reply subject for a request, one without for a oneway call, and
    // one on its inbox for a reply: the kind is written only where it says something else.
    let implied = match envelope.kind {
        Kind::Request => envelope.reply_to.is_some(),
        Kind::Oneway => envelope.reply_to.is_none() && !to_inbox,
        Kind::Reply => to_inbox,
    };
    if stream || !implied {
        header(&mut map, headers::KIND, adapter::kind_name(envelope.kind))?;
    }
    // A reply on an inbox is matched by its correlation id alone: its service and method are not echoed.
    let echo = !(to_inbox && envelope.kind == Kind::Reply);
    if echo && !envelope.service.is_empty() {
        header(&mut map, headers::SERVICE, &envelope.service)?;
    }
    if echo && !envelope.method.is_empty() {
        header(&mut map, headers::METHOD, &envelope.method)?;
    }
    if let Some(correlation_id) = envelope.correlation_id
        && !correlation_in_subject
    {
        match envelope.headers.get(headers::RAW_CORRELATION_ID) {
            Some(raw) => header(&mut map, headers::CORRELATION_ID, raw)?,
            None => header(&mut map, headers::CORRELATION_ID, &correlation_id.to_string())?,
        }
    }
    if stream && let Some(reply_to) = &envelope.reply_to {
        header(&mut map, headers::REPLY_TO, reply_to.address())?;
        if reply_to.is_inbox() {
            header(&mut map, headers::REPLY_TO_INBOX, "true")?;
        }
    }
    if envelope.attempt > 1 {
        header(&mut map, headers::ATTEMPT, &envelope.attempt.to_string())?;
    }
    if let Some(budget) = envelope.deadline_ms {
        header(&mut map, headers::DEADLINE_MS, &budget.to_string())?;
        header(&mut map, headers::SENT_AT_MS, &adapter::now_ms().to_string())?;
    }
    if let Some(key) = &envelope.idempotency_key {
        header(&mut map, headers::IDEMPOTENCY_KEY, key)?;
    }
    if let Some(caller) = &envelope.caller {
        header(&mut map, headers::CALLER, caller)?;
    }
    if envelope.status != 0 {
        header(&mut map, headers::STATUS, &envelope.status.to_string())?;
    }
    if let Some(message) = &envelope.status_message {
        header(&mut map, headers::STATUS_MESSAGE, &message.replace(['\r', '\n'], " "))?;
    }
    if let Some(last) = envelope.last_status {
        header(&mut map, headers::LAST_STATUS, &last.to_string())?;
    }
    for (name, value) in adapter::user_headers(&envelope.headers) {
        header(&mut map, name, value)?;
    }
    Ok(map)
}

/// Where a message was read from.
#[derive(Clone, Copy, Debug)]
pub(super) enum Origin {
    /// A core NATS subscription: the message's reply subject is where its requester waits.
    Core,
    /// A JetStream consumer: the message's reply subject is JetStream's ack subject, never a reply address; the
    /// time queued counts from when the stream stored it.
    Stream {
        /// When the stream stored the message, if its metadata says.
        stored_at_ms: Option<u64>,
    },
}

/// The envelope of a NATS message received now, and the time it was queued: from when JetStream stored it, else
/// by the sender's clock.
pub(super) fn from_message(message: &async_nats::Message, origin: Origin) -> (Envelope, Duration) {
    from_message_at(message, origin, std::time::Instant::now())
}

/// [`from_message`], for a message received at `received_at`.
pub(super) fn from_message_at(
    message: &async_nats::Message,
    origin: Origin,
    received_at: std::time::Instant,
) -> (Envelope, Duration) {
    let (own_reply, stored_at_ms) = match origin {
        Origin::Core => (message.reply.as_deref(), None),
        Origin::Stream { stored_at_ms } => (None, stored_at_ms),
    };
    match from_envelope_body(message, own_reply, received_at) {
        Some(Ok(mapped)) => return mapped,
        // Its sender waits on the reply subject: the worker answers it with status 8.
        Some(Err(error)) if own_reply.is_some() => {
            tracing::debug!(%error, subject = %message.subject, "answering a body marked as an envelope that does not decode");
            let reply = own_reply.unwrap_or_default();
            let why = format!("not an envelope this worker reads: {error}");
            let envelope = rpc_core::transport::invalid_request(
                ReplyTo::Inbox(Text::from(reply)),
                correlation_of_subject(reply),
                why,
            );
            return (envelope, Duration::ZERO);
        }
        // Handled as a message without an envelope, from its headers.
        Some(Err(error)) => {
            tracing::warn!(%error, subject = %message.subject, "a body marked as an envelope does not decode")
        }
        None => {}
    }
    // One pass over the headers: a lookup by name would build a header name per field.
    let mut fields = Fields::default();
    let mut user = BTreeMap::new();
    for (name, values) in message.headers.iter().flat_map(HeaderMap::iter) {
        let Some(value) = values.first().map(HeaderValue::as_str) else { continue };
        let name: &str = name.as_ref();
        match name {
            headers::REPLY_TO => fields.reply_to = Some(value),
            headers::REPLY_TO_INBOX => fields.reply_to_inbox = value == "true",
            headers::KIND => fields.kind = Some(value),
            MSG_ID => fields.id = Some(value),
            headers::CORRELATION_ID => fields.correlation_id = Some(value),
            headers::SERVICE => fields.service = Some(value),
            headers::METHOD => fields.method = Some(value),
            headers::ATTEMPT => fields.attempt = Some(value),
            headers::DEADLINE_MS => fields.deadline_ms = Some(value),
            headers::SENT_AT_MS => fields.sent_at_ms = Some(value),
            headers::IDEMPOTENCY_KEY => fields.idempotency_key = Some(value),
            headers::CALLER => fields.caller = Some(value),
            headers::STATUS => fields.status = Some(value),
            headers::STATUS_MESSAGE => fields.status_message = Some(value),
            headers::LAST_STATUS => fields.last_status = Some(value),
            name if adapter::is_user_header(name) => {
                user.insert(name.to_owned(), value.to_owned());
            }
            _ => {}
        }
    }
    // A message's own reply subject is where its requester waits: an inbox, by NATS's definition.
    let reply_to = match fields.reply_to {
        Some(address) if fields.reply_to_inbox => Some(ReplyTo::Inbox(Text::from(address))),
        Some(address) => Some(ReplyTo::Queue(Text::from(address))),
        None => own_reply.map(|reply| ReplyTo::Inbox(Text::from(reply))),
    };
    let mut envelope = Envelope::new(adapter::kind_of(fields.kind, reply_to.is_some()));
    if let Some(id) = fields.id.and_then(|id| Uuid::parse_str(id).ok()) {
        envelope.id = id;
    }
    envelope.correlation_id = match fields.correlation_id {
        Some(text) => Some(adapter::canonical_correlation(text).unwrap_or_else(|| {
            // A plain client's own correlation id: kept verbatim for the reply.
            user.insert(headers::RAW_CORRELATION_ID.to_owned(), text.to_owned());
            Uuid::new_v4()
        })),
        None => correlation_of_subject(&message.subject).or_else(|| own_reply.and_then(correlation_of_subject)),
    };
    envelope.reply_to = reply_to;
    envelope.service = Text::from(fields.service.unwrap_or_default());
    envelope.method = Text::from(fields.method.unwrap_or_default());
    envelope.attempt = fields.attempt.and_then(|n| n.parse().ok()).unwrap_or(1).max(1);
    let mut queued = Duration::ZERO;
    if let Some(budget) = fields.deadline_ms.and_then(|budget| budget.parse::<u64>().ok()) {
        let sent_at = stored_at_ms.or_else(|| fields.sent_at_ms.and_then(|sent| sent.parse().ok()));
        envelope.deadline_ms = Some(budget);
        queued = adapter::queued_since(sent_at, adapter::wall_ms_at(received_at));
    }
    envelope.idempotency_key = fields.idempotency_key.map(Text::from);
    envelope.caller = fields.caller.map(Text::from);
    envelope.status = fields.status.and_then(|code| code.parse().ok()).unwrap_or(0);
    envelope.status_message = fields.status_message.map(str::to_owned);
    envelope.last_status = fields.last_status.and_then(|code| code.parse().ok());
    envelope.headers = user;
    envelope.body = message.payload.clone();
    (envelope, queued)
}

/// The envelope's fields among a message's headers.
#[derive(Default)]
struct Fields<'a> {
    reply_to: Option<&'a str>,
    reply_to_inbox: bool,
    kind: Option<&'a str>,
    id: Option<&'a str>,
    correlation_id: Option<&'a str>,
    service: Option<&'a str>,
    method: Option<&'a str>,
    attempt: Option<&'a str>,
    deadline_ms: Option<&'a str>,
    sent_at_ms: Option<&'a str>,
    idempotency_key: Option<&'a str>,
    caller: Option<&'a str>,
    status: Option<&'a str>,
    status_message: Option<&'a str>,
    last_status: Option<&'a str>,
}

/// Whether a reply is JetStream's publish ack rather than an answer (no envelope headers, a JSON ack body).
pub(super) fn is_stream_ack(message: &async_nats::Message) -> bool {
    let ours = message.headers.as_ref().is_some_and(|map| map.get(headers::KIND).is_some());
    !ours && message.payload.starts_with(b"{\"stream\":")
}

/// The correlation id that ends an inbox subject `<inbox>.<correlation id>`.
pub(super) fn correlation_of_subject(subject: &str) -> Option<Uuid> {
    subject.rsplit('.').next().and_then(|last| Uuid::parse_str(last).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rpc_core::Code;

    #[test]
    fn an_envelope_round_trips_through_headers() {
        let mut envelope = Envelope::new(Kind::Request);
        envelope.correlation_id = Some(Uuid::new_v4());
        envelope.service = "Calculator".into();
        envelope.method = "add".into();
        envelope.reply_to = Some(ReplyTo::Inbox("_INBOX.abc".into()));
        envelope.deadline_ms = Some(5_000);
        envelope.attempt = 2;
        envelope.idempotency_key = Some("key".into());
        envelope.caller = Some("billing".into());
        envelope.headers.insert("order".into(), "7".into());
        envelope.body = Bytes::from_static(b"\x81\xa1a\x01");
        let mut sent = envelope.clone();
        let reply = reply_subject(&mut sent, true).expect("a reply subject");
        assert_eq!(reply.as_str(), format!("_INBOX.abc.{}", envelope.correlation_id.expect("set").simple()));
        for mode in [Mode::Stream, Mode::Core { to_inbox: false, correlation_in_subject: true }] {
            let message = async_nats::Message {
                subject: "ns.Calculator".into(),
                reply: Some(reply.clone()),
                payload: sent.body.clone(),
                headers: Some(to_headers(&sent, mode).expect("maps")),
                status: None,
                description: None,
                length: 0,
            };
            let (back, queued) = from_message(&message, Origin::Core);
            assert!(queued < Duration::from_secs(1), "{queued:?}");
            let mut expected = sent.clone();
            if matches!(mode, Mode::Core { .. }) {
                // Core NATS has no deduplication: the message id is not sent, and the receiver makes its own.
                expected.id = back.id;
            }
            assert_eq!(back, expected, "{mode:?}");
        }
    }

    fn plain_message(subject: &str, reply: Option<&str>, payload: Bytes) -> async_nats::Message {
        async_nats::Message {
            subject: subject.into(),
            reply: reply.map(Into::into),
            payload,
            headers: None,
            status: None,
            description: None,
            length: 0,
        }
    }

    #[test]
    fn an_envelope_round_trips_whole_in_the_body() {
        let mut envelope = Envelope::new(Kind::Request);
        envelope.correlation_id = Some(Uuid::new_v4());
        envelope.service = "Calculator".into();
        envelope.method = "add".into();
        envelope.reply_to = Some(ReplyTo::Inbox("_INBOX.abc.mqrpc".into()));
        envelope.deadline_ms = Some(5_000);
        envelope.attempt = 2;
        envelope.idempotency_key = Some("key".into());
        envelope.headers.insert("order".into(), "7".into());
        envelope.body = Bytes::from_static(b"\x81\xa1a\x01");
        let mut sent = envelope.clone();
        let reply = reply_subject(&mut sent, true).expect("a reply subject");
        assert!(is_envelope_inbox(&reply), "{reply}");
        assert_eq!(sent.reply_to.as_ref().map(ReplyTo::address), Some(reply.as_str()), "written back");
        // Not written back: the same subject, the envelope's address as it was.
        let mut unchanged = envelope.clone();
        assert_eq!(reply_subject(&mut unchanged, false), Some(reply.clone()));
        assert_eq!(unchanged.reply_to, envelope.reply_to);
        assert!(!is_envelope_inbox("_INBOX.abc.0123"));
        for (subject, is) in [
            ("mqrpc.0123", true),
            ("_INBOX.a.mqrpc.", true),
            ("_INBOX.a.xmqrpc.0123", false),
            ("_INBOX.a.mqrpc", false),
            ("mqrpc", false),
            ("_INBOX.a.mqrpc.0123.4", false),
            ("", false),
        ] {
            assert_eq!(is_envelope_inbox(subject), is, "{subject}");
            assert_eq!(subject.rsplit('.').nth(1) == Some(ENVELOPE_INBOX), is, "{subject}: not as tokens read");
        }
        sent.reply_to = None;
        for compact in [false, true] {
            let body = envelope_body(&sent, compact).expect("encodes");
            assert_eq!(body[0], ENVELOPE_MARK);
            let (back, queued) = from_message(&plain_message("ns.Calculator", Some(&reply), body), Origin::Core);
            assert!(queued < Duration::from_secs(1), "{queued:?}");
            let mut expected = envelope.clone();
            expected.reply_to = Some(ReplyTo::Inbox(reply.as_str().into()));
            expected.version = if compact { rpc_core::COMPACT_VERSION } else { rpc_core::VERSION };
            assert_eq!(back, expected);
        }
    }

    #[test]
    fn a_compact_request_is_answered_in_the_compact_form_and_a_full_one_in_the_full_form() {
        let correlation = Uuid::now_v7();
        let mut request = Envelope::new(Kind::Request);
        request.id = correlation;
        request.correlation_id = Some(correlation);
        request.idempotency_key = Some(correlation.simple().to_string().into());
        request.service = "Calculator".into();
        request.method = "add".into();
        let reply_to = format!("_INBOX.abc.mqrpc.{}", correlation.simple());
        for compact in [false, true] {
            let body = envelope_body(&request, compact).expect("encodes");
            let (received, _) = from_message(&plain_message("ns.Calculator", Some(&reply_to), body), Origin::Core);
            // The key the compact form left out is the correlation id's, as the worker's dedup store needs it.
            assert_eq!(received.idempotency_key, request.idempotency_key);
            assert_eq!(received.id, correlation);
            let reply = received.reply(Ok(Bytes::from_static(b"\x05")));
            assert_eq!(reply.version == rpc_core::COMPACT_VERSION, compact);
        }
    }

    #[test]
    fn a_damaged_envelope_body_is_an_error_not_a_panic() {
        let mut envelope = Envelope::new(Kind::Request);
        envelope.method = "add".into();
        envelope.body = Bytes::from_static(b"\x92\x01\x02");
        let body = envelope_body(&envelope, true).expect("encodes");
        // Every cut, and every byte flipped: never a panic; a cut one is refused.
        for cut in 0..body.len() {
            let message = plain_message("ns.Calculator", None, body.slice(..cut));
            match from_envelope_body(&message, message.reply.as_deref(), std::time::Instant::now()) {
                None => assert_eq!(cut, 0),
                Some(decoded) => assert!(decoded.is_err(), "cut at {cut} decoded"),
            }
        }
        for at in 1..body.len() {
            let mut flipped = body.to_vec();
            flipped[at] ^= 0xff;
            let _ = from_message(&plain_message("ns.Calculator", None, Bytes::from(flipped)), Origin::Core);
        }
        // A body of a plain client's request that is not marked is left to the headers.
        assert!(
            from_envelope_body(
                &plain_message("ns.Calculator", None, Bytes::from_static(b"\x92\x01\x02")),
                None,
                std::time::Instant::now()
            )
            .is_none()
        );
    }

    #[test]
    fn a_reply_on_an_inbox_carries_only_what_the_subject_does_not() {
        let mut request = Envelope::new(Kind::Request);
        request.correlation_id = Some(Uuid::new_v4());
        request.service = "Calculator".into();
        request.method = "add".into();
        let reply = request.reply(Ok(Bytes::from_static(b"\x05")));
        let headers = to_headers(&reply, Mode::Core { to_inbox: true, correlation_in_subject: true }).expect("maps");
        assert_eq!(headers.iter().count(), 0, "{headers:?}");
        let subject = format!("_INBOX.abc.{}", request.correlation_id.expect("set").simple());
        let message = async_nats::Message {
            subject: subject.into(),
            reply: None,
            payload: reply.body.clone(),
            headers: Some(headers),
            status: None,
            description: None,
            length: 0,
        };
        let (back, _) = from_message(&message, Origin::Core);
        assert_eq!(back.correlation_id, request.correlation_id);
        assert_eq!(back.status, 0);
        assert_eq!(back.body, reply.body);
    }

    #[test]
    fn a_plain_clients_correlation_id_comes_back_byte_for_byte() {
        for id in ["req-17", "6F9619FF-8B86-D011-B42D-00CF4FC964FF", "6f9619ff8b86d011b42d00cf4fc964ff"] {
            let mut headers = HeaderMap::new();
            headers.insert(headers::METHOD, "add");
            headers.insert(headers::CORRELATION_ID, id);
            let message = async_nats::Message {
                subject: "ns.Calculator".into(),
                reply: Some("_INBOX.plain".into()),
                payload: Bytes::from_static(b"\x80"),
                headers: Some(headers),
                status: None,
                description: None,
                length: 0,
            };
            let (request, _) = from_message(&message, Origin::Core);
            let reply = request.reply(Ok(Bytes::from_static(b"\x05")));
            let mode = Mode::Core { to_inbox: false, correlation_in_subject: false };
            let back = to_headers(&reply, mode).expect("maps");
            assert_eq!(back.get(headers::CORRELATION_ID).map(HeaderValue::as_str), Some(id));
        }
    }

    #[test]
    fn an_envelope_of_another_version_is_answered_as_an_invalid_request() {
        let mut envelope = Envelope::new(Kind::Request);
        envelope.version = 3;
        envelope.method = "add".into();
        let correlation = Uuid::new_v4();
        let reply = format!("_INBOX.abc.mqrpc.{}", correlation.simple());
        let message = plain_message("ns.Calculator", Some(&reply), envelope_body(&envelope, false).expect("encodes"));
        let (request, _) = from_message(&message, Origin::Core);
        assert_eq!((request.kind, request.status), (Kind::Request, Code::InvalidRequest.as_u16()));
        assert_eq!(request.correlation_id, Some(correlation));
        assert_eq!(request.reply_to, Some(ReplyTo::Inbox(reply.into())));
        assert!(request.status_message.as_deref().is_some_and(|why| why.contains("version")), "{request:?}");
    }

    #[test]
    fn a_stream_message_without_a_reply_address_is_a_oneway_call() {
        let mut headers = HeaderMap::new();
        headers.insert(headers::METHOD, "record");
        let message = async_nats::Message {
            subject: "ns.Calculator".into(),
            reply: Some("$JS.ACK.MQRPC_ns_Calculator.mqrpc.1.1.1.1700000000000000000.0".into()),
            payload: Bytes::from_static(b"\x81\xa1n\x01"),
            headers: Some(headers),
            status: None,
            description: None,
            length: 0,
        };
        let (envelope, _) = from_message(&message, Origin::Stream { stored_at_ms: None });
        assert_eq!((envelope.kind, envelope.reply_to), (Kind::Oneway, None));
        let (envelope, _) = from_message(&message, Origin::Core);
        assert_eq!(envelope.kind, Kind::Request, "on core NATS the reply subject is the requester's");
    }

    #[test]
    fn a_stream_message_is_queued_since_the_stream_stored_it_not_since_its_sender_says() {
        let now = adapter::now_ms();
        let mut headers = HeaderMap::new();
        headers.insert(headers::METHOD, "add");
        headers.insert(headers::DEADLINE_MS, "60000");
        // The sender's clock claims an hour ago; the stream stored it 5 s ago.
        headers.insert(headers::SENT_AT_MS, (now - 3_600_000).to_string().as_str());
        let message = async_nats::Message {
            subject: "ns.Calculator".into(),
            reply: None,
            payload: Bytes::new(),
            headers: Some(headers),
            status: None,
            description: None,
            length: 0,
        };
        let (envelope, queued) = from_message(&message, Origin::Stream { stored_at_ms: Some(now - 5_000) });
        assert_eq!(envelope.deadline_ms, Some(60_000), "the budget travels as sent");
        assert!((5_000..60_000).contains(&queued.as_millis()), "queued since it was stored: {queued:?}");
        let (_, queued) = from_message(&message, Origin::Stream { stored_at_ms: None });
        assert!(queued.as_millis() >= 3_600_000, "without a storage time, the sender's clock: {queued:?}");
    }

    #[test]
    fn line_breaks_in_header_values_are_refused_not_sent() {
        let mut envelope = Envelope::new(Kind::Oneway);
        envelope.headers.insert("note".into(), "two\r\nlines".into());
        assert!(matches!(to_headers(&envelope, Mode::Stream), Err(Error::InvalidArgument(_))));
        assert!(matches!(check_subject("has space"), Err(Error::InvalidArgument(_))));
        assert!(check_subject("ns.svc").is_ok());
    }

    #[test]
    fn subjects_with_an_empty_token_whitespace_or_a_wildcard_are_refused() {
        for bad in ["", ".", "a.", ".a", "a..b", "a.*", "a.>", "a\tb", "a\rb", "a\nb", "a b", "\u{e9}.."] {
            assert!(matches!(check_subject(bad), Err(Error::InvalidArgument(_))), "{bad:?} passed");
        }
        for good in ["a", "a.b", "_INBOX.x.mqrpc.0123abcd", "ns.svc.dlq", "\u{e9}t\u{e9}.caf\u{e9}", "a-b_c"] {
            assert!(check_subject(good).is_ok(), "{good:?} refused");
        }
    }
}
