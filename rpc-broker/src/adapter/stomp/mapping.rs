//! The envelope as a STOMP frame: `correlation-id`, `reply-to`, `priority` and `persistent` where STOMP and
//! JMS have them, the other fields as `mqrpc-*` headers, the body as the frame's body.

use std::collections::BTreeMap;
use std::time::Duration;

use rpc_core::{Envelope, Error, Kind, ReplyTo, Text};
use uuid::Uuid;

use super::codec::{Command, Frame};
use crate::adapter::{self, headers};

/// The envelope id (the server writes its own `message-id`).
pub(super) const ID: &str = "mqrpc-id";
/// How many times the message was delivered before this copy was sent (a requeue sends a copy with it raised).
pub(super) const DELIVERY_COUNT: &str = "mqrpc-delivery-count";
/// The destination prefix of a queue.
pub(super) const QUEUE_PREFIX: &str = "/queue/";

/// Headers a server or the STOMP spec writes, never user headers.
const PROTOCOL_HEADERS: &[&str] = &[
    "destination",
    "message-id",
    "subscription",
    "ack",
    "receipt",
    "transaction",
    "session",
    "content-type",
    "content-length",
    "correlation-id",
    "reply-to",
    "expires",
    "expiration",
    "priority",
    "persistent",
    "timestamp",
    "redelivered",
    "type",
    "original-destination",
    "transformation",
    SCHEDULED_JOB,
];

/// ActiveMQ's delay header: the scheduler holds the message this many milliseconds before it queues it.
pub(super) const SCHEDULED_DELAY: &str = "AMQ_SCHEDULED_DELAY";
/// The job id ActiveMQ's scheduler writes on a message it held.
pub(super) const SCHEDULED_JOB: &str = "scheduledJobId";

/// The destination of `queue`: a queue name becomes `/queue/<name>`; an address that is a destination already
/// (a reply address as the server wrote it, `/remote-temp-queue/...`, `/reply-queue/...`) stays as it is.
pub(super) fn destination(queue: &str) -> String {
    if queue.starts_with('/') { queue.to_owned() } else { format!("{QUEUE_PREFIX}{queue}") }
}

/// The queue `destination` names (`/queue/<name>`, or `/amq/queue/<name>` on RabbitMQ); none for a topic or an
/// inbox.
fn queue_of(destination: &str) -> Option<&str> {
    destination
        .strip_prefix(QUEUE_PREFIX)
        .or_else(|| destination.strip_prefix("/amq/queue/"))
        .filter(|queue| !queue.is_empty())
}

/// The `mqrpc-service` a copy of the delivered `frame` sent to `destination` (a requeue's, a dead letter's)
/// must carry: the name of the queue the frame came from, where the frame left its service to it and the copy
/// goes to another queue.
pub(super) fn service_of_copy<'a>(frame: &'a Frame, destination: &str) -> Option<&'a str> {
    if frame.get(headers::SERVICE).is_some() || frame.get(headers::KIND) == Some(adapter::kind_name(Kind::Reply)) {
        return None;
    }
    frame.get("destination").and_then(queue_of).filter(|&queue| Some(queue) != queue_of(destination))
}

/// The idempotency key a request or oneway message to a queue with our `correlation_id` goes by when it names
/// none: the correlation id in 32 lowercase hex digits, as an mqrpc client gives a call.
fn default_key(kind: Kind, correlation_id: Option<Uuid>, queue: Option<&str>) -> Option<Text> {
    let correlation_id = correlation_id.filter(|_| kind != Kind::Reply && queue.is_some())?;
    Some(Text::from(&*correlation_id.simple().encode_lower(&mut Uuid::encode_buffer())))
}

/// Whether `destination` is an inbox's (a temporary or reply queue), not a named queue's.
pub(super) fn is_inbox(destination: &str) -> bool {
    !destination.starts_with(QUEUE_PREFIX) && !destination.starts_with("/amq/queue/")
}

/// How a message is sent: the parts of the mapping that depend on the server and the options.
#[derive(Clone, Copy, Debug)]
pub(super) struct Outgoing {
    /// `persistent:true`: the server keeps it on disk (for a durable queue).
    pub(super) persistent: bool,
    /// The `priority` header is honoured (ActiveMQ, JMS priorities 0 to 9).
    pub(super) priority: bool,
    /// Deliveries made before this copy.
    pub(super) delivery_count: u32,
    /// A delay is sent as [`SCHEDULED_DELAY`] (ActiveMQ with its scheduler on).
    pub(super) delay: bool,
    /// The server stamps each message with the time it took it (`timestamp`, ActiveMQ), which stands for
    /// `mqrpc-sent-at-ms`.
    pub(super) stamped: bool,
}

/// The SEND frame carrying `envelope` to `destination`.
///
/// # Errors
/// [`Error::Unsupported`] for a priority or a delay where the server has none.
pub(super) fn to_frame(envelope: &Envelope, destination: &str, send: Outgoing) -> Result<Frame, Error> {
    if !send.delay {
        adapter::refuse_delay(envelope)?;
    }
    let mut frame = Frame::new(Command::Send);
    let pairs = &mut frame.headers;
    pairs.reserve(16 + envelope.headers.len());
    let mut push = |name: &str, value: String| pairs.push((name.to_owned(), value));
    push("destination", destination.to_owned());
    // Every header is a property ActiveMQ stores, and converts twice, with the message: what a reader infers is
    // left out. A reply to an inbox is one by where it arrives, and its id is never read; otherwise the kind is
    // written when `reply-to` does not say it (a request has one, a oneway call none).
    let to_inbox = envelope.kind == Kind::Reply && is_inbox(destination);
    if adapter::kind_of(None, envelope.reply_to.is_some()) != envelope.kind && !to_inbox {
        push(headers::KIND, adapter::kind_name(envelope.kind).to_owned());
    }
    let queue = queue_of(destination);
    let raw_correlation = envelope.headers.get(headers::RAW_CORRELATION_ID);
    // A call's request goes by its correlation id, which a reader takes for a missing id.
    let id_is_correlation = raw_correlation.is_none() && envelope.correlation_id == Some(envelope.id);
    if !to_inbox && !id_is_correlation {
        push(ID, envelope.id.to_string());
    }
    if let Some(correlation_id) = envelope.correlation_id {
        let text = match raw_correlation {
            Some(raw) => raw.clone(),
            None => correlation_id.to_string(),
        };
        push("correlation-id", text);
    }
    if let Some(reply_to) = &envelope.reply_to {
        let address = self::destination(reply_to.address());
        // An inbox is any destination but a queue's, unless it says otherwise.
        if reply_to.is_inbox() && address.starts_with(QUEUE_PREFIX) {
            push(headers::REPLY_TO_INBOX, "true".to_owned());
        }
        push("reply-to", address);
    }
    // A reply to an inbox is matched by its correlation id alone; one to a named queue (a durable callback) is
    // handled by its method. A message to a queue other than a reply names its service only where the queue
    // does not (a reader takes the queue's name for it), an empty one with an empty value.
    let service_written = match queue.filter(|_| envelope.kind != Kind::Reply) {
        Some(queue) => envelope.service != queue,
        None => !envelope.service.is_empty() && !to_inbox,
    };
    if service_written {
        push(headers::SERVICE, envelope.service.to_string());
    }
    if !envelope.method.is_empty() && !to_inbox {
        push(headers::METHOD, envelope.method.to_string());
    }
    if envelope.attempt > 1 {
        push(headers::ATTEMPT, envelope.attempt.to_string());
    }
    if let Some(budget) = envelope.deadline_ms {
        push(headers::DEADLINE_MS, budget.to_string());
        if !send.stamped {
            push(headers::SENT_AT_MS, adapter::now_ms().to_string());
        }
    }
    // A call's key is by default its correlation id in 32 hex digits, which a reader infers; an empty value
    // says there is none.
    let default_key = default_key(envelope.kind, envelope.correlation_id.filter(|_| raw_correlation.is_none()), queue);
    match (&envelope.idempotency_key, default_key) {
        (Some(key), Some(default)) if *key == default => {}
        (Some(key), _) => push(headers::IDEMPOTENCY_KEY, key.to_string()),
        (None, Some(_)) => push(headers::IDEMPOTENCY_KEY, String::new()),
        (None, None) => {}
    }
    if let Some(caller) = &envelope.caller {
        push(headers::CALLER, caller.to_string());
    }
    if envelope.status != 0 {
        push(headers::STATUS, envelope.status.to_string());
    }
    if let Some(message) = &envelope.status_message {
        push(headers::STATUS_MESSAGE, message.clone());
    }
    if let Some(last) = envelope.last_status {
        push(headers::LAST_STATUS, last.to_string());
    }
    if send.delivery_count > 0 {
        push(DELIVERY_COUNT, send.delivery_count.to_string());
    }
    if let Some(priority) = envelope.priority {
        if !send.priority {
            return Err(Error::Unsupported("priorities"));
        }
        push("priority", priority.to_string());
    }
    if let Some(delay) = envelope.delay_ms.filter(|_| send.delay) {
        push(SCHEDULED_DELAY, delay.to_string());
    }
    if send.persistent {
        push("persistent", "true".to_owned());
    }
    for (name, value) in adapter::user_headers(&envelope.headers) {
        push(name, value.to_owned());
    }
    frame.body = envelope.body.clone();
    Ok(frame)
}

/// What a MESSAGE frame carries: its envelope, how many times it was delivered (this time included), and how
/// long it was queued (from the sender's clock).
pub(super) fn from_frame(frame: &Frame) -> (Envelope, u32, Duration) {
    let mut fields = Fields::default();
    let mut user = BTreeMap::new();
    for (name, value) in &frame.headers {
        let value = value.as_str();
        match name.as_str() {
            headers::KIND => fields.kind = Some(value),
            ID => fields.id = Some(value),
            "correlation-id" => fields.correlation_id = Some(value),
            "reply-to" => fields.reply_to = Some(value),
            "destination" => fields.destination = Some(value),
            "redelivered" => fields.redelivered = value == "true",
            headers::SERVICE => fields.service = Some(value),
            headers::METHOD => fields.method = Some(value),
            headers::REPLY_TO_INBOX => fields.reply_to_inbox = value == "true",
            headers::ATTEMPT => fields.attempt = value.parse().ok(),
            headers::DEADLINE_MS => fields.deadline_ms = value.parse().ok(),
            headers::SENT_AT_MS => fields.sent_at_ms = value.parse().ok(),
            "timestamp" => fields.timestamp = value.parse().ok(),
            headers::IDEMPOTENCY_KEY => fields.idempotency_key = Some(value),
            headers::CALLER => fields.caller = Some(value),
            headers::STATUS => fields.status = value.parse().ok(),
            headers::STATUS_MESSAGE => fields.status_message = Some(value),
            headers::LAST_STATUS => fields.last_status = value.parse().ok(),
            "priority" => fields.priority = value.parse().ok(),
            DELIVERY_COUNT => fields.delivery_count = value.parse().ok(),
            name if is_user_header(name) => {
                // The first occurrence counts (STOMP 1.2).
                user.entry(name.to_owned()).or_insert_with(|| value.to_owned());
            }
            _ => {}
        }
    }
    // An empty `reply-to` names nothing to answer; a bare name is a queue's.
    let reply_to = fields.reply_to.filter(|address| !address.is_empty()).map(destination);
    let reply_to = reply_to.map(|address| match address.strip_prefix(QUEUE_PREFIX) {
        Some(queue) if !fields.reply_to_inbox && !queue.is_empty() => ReplyTo::Queue(Text::from(queue)),
        // A temporary or reply queue of the caller's connection, named as the server wrote it.
        _ => ReplyTo::Inbox(Text::from(address)),
    });
    let mut envelope = Envelope::new(adapter::kind_of(fields.kind, reply_to.is_some()));
    let ours = fields.correlation_id.and_then(adapter::canonical_correlation);
    envelope.correlation_id = fields.correlation_id.map(|text| {
        ours.unwrap_or_else(|| {
            // A plain client's own correlation id: kept verbatim for the reply.
            user.insert(headers::RAW_CORRELATION_ID.to_owned(), text.to_owned());
            Uuid::new_v4()
        })
    });
    match fields.id {
        // Text that is not a UUID is no id: the envelope keeps the fresh one it was made with.
        Some(id) => envelope.id = Uuid::parse_str(id).unwrap_or(envelope.id),
        None => envelope.id = ours.unwrap_or(envelope.id),
    }
    envelope.reply_to = reply_to;
    let queue = fields.destination.and_then(queue_of);
    envelope.service =
        fields.service.or(queue.filter(|_| envelope.kind != Kind::Reply)).map(Text::from).unwrap_or_default();
    envelope.method = fields.method.map(Text::from).unwrap_or_default();
    envelope.attempt = fields.attempt.unwrap_or(1).max(1);
    envelope.deadline_ms = fields.deadline_ms;
    envelope.idempotency_key = match fields.idempotency_key {
        Some("") => None,
        Some(key) => Some(Text::from(key)),
        None if user.contains_key(headers::RAW_CORRELATION_ID) => None,
        None => default_key(envelope.kind, envelope.correlation_id, queue),
    };
    envelope.caller = fields.caller.map(Text::from);
    envelope.status = fields.status.unwrap_or(0);
    envelope.status_message = fields.status_message.map(str::to_owned);
    envelope.last_status = fields.last_status;
    // JMS gives every message a priority (4 by default); only one the sender chose is the envelope's.
    envelope.priority = fields.priority.filter(|priority| *priority != DEFAULT_PRIORITY && *priority <= 9);
    envelope.headers = user;
    envelope.body = frame.body.clone();
    let queued = match envelope.deadline_ms {
        Some(_) => adapter::queued_since(fields.sent_at_ms.or(fields.timestamp), adapter::now_ms()),
        None => Duration::ZERO,
    };
    let count = fields.delivery_count.unwrap_or(0).saturating_add(1).saturating_add(u32::from(fields.redelivered));
    (envelope, count, queued)
}

/// JMS's default priority, which ActiveMQ writes on every message.
const DEFAULT_PRIORITY: u8 = 4;

/// Whether `name` is a user header: not the framework's, the protocol's, or a server's own.
fn is_user_header(name: &str) -> bool {
    adapter::is_user_header(name)
        && !PROTOCOL_HEADERS.contains(&name)
        && !name.starts_with("JMS")
        && !name.starts_with("activemq.")
        && !name.starts_with("AMQ_")
        && !name.starts_with("amqp-")
}

/// The envelope's fields among a frame's headers.
#[derive(Default)]
struct Fields<'a> {
    kind: Option<&'a str>,
    id: Option<&'a str>,
    correlation_id: Option<&'a str>,
    reply_to: Option<&'a str>,
    destination: Option<&'a str>,
    reply_to_inbox: bool,
    redelivered: bool,
    service: Option<&'a str>,
    method: Option<&'a str>,
    attempt: Option<u32>,
    deadline_ms: Option<u64>,
    sent_at_ms: Option<u64>,
    /// The server's (ActiveMQ's) time of taking the message, in ms since the epoch.
    timestamp: Option<u64>,
    idempotency_key: Option<&'a str>,
    caller: Option<&'a str>,
    status: Option<u16>,
    status_message: Option<&'a str>,
    last_status: Option<u16>,
    priority: Option<u8>,
    delivery_count: Option<u32>,
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    /// The frame as the server hands it out: SEND becomes MESSAGE, with the server's headers added.
    fn delivered(mut frame: Frame, redelivered: bool) -> Frame {
        frame.command = Command::Message;
        frame.headers.push(("message-id".into(), "ID:host-1".into()));
        frame.headers.push(("subscription".into(), "s-1".into()));
        frame.headers.push(("redelivered".into(), redelivered.to_string()));
        frame
    }

    fn request() -> Envelope {
        let mut envelope = Envelope::new(Kind::Request);
        envelope.correlation_id = Some(Uuid::new_v4());
        envelope.service = "Calculator".into();
        envelope.method = "add".into();
        envelope.reply_to = Some(ReplyTo::Inbox("/temp-queue/inbox-1".into()));
        envelope.deadline_ms = Some(5_000);
        envelope.attempt = 3;
        envelope.idempotency_key = Some("key".into());
        envelope.caller = Some("billing".into());
        envelope.priority = Some(7);
        envelope.headers.insert("order".into(), "7".into());
        envelope.body = Bytes::from_static(b"\x82\xa1a\x02\xa1b\x03");
        envelope
    }

    #[test]
    fn an_envelope_round_trips_through_a_frame() {
        let envelope = request();
        let send = Outgoing { persistent: true, priority: true, delivery_count: 1, delay: false, stamped: false };
        let frame = to_frame(&envelope, "/queue/calc", send).expect("maps");
        assert_eq!(frame.get("persistent"), Some("true"));
        assert_eq!(frame.body, envelope.body);
        let (back, count, queued) = from_frame(&delivered(frame, true));
        assert_eq!(back, envelope);
        assert_eq!(count, 3, "one copy before, and a redelivery of this one");
        assert!(queued < Duration::from_secs(5));
        // Where the server stamps the time it took the message, that stands for the sending time.
        let stamped = to_frame(&envelope, "/queue/calc", Outgoing { stamped: true, ..send }).expect("maps");
        assert_eq!(stamped.get(headers::SENT_AT_MS), None);
        let taken = (adapter::now_ms() - 3_000).to_string();
        let (_, _, queued) = from_frame(&delivered(stamped.header("timestamp", &taken), false));
        assert!(queued >= Duration::from_secs(3) && queued < Duration::from_secs(8), "{queued:?}");
    }

    #[test]
    fn what_a_reader_infers_is_not_sent() {
        let send = Outgoing { persistent: false, priority: true, delivery_count: 0, delay: false, stamped: false };
        let sent = to_frame(&request(), "/queue/calc", send).expect("maps");
        assert_eq!((sent.get(headers::KIND), sent.get(headers::REPLY_TO_INBOX)), (None, None));
        let mut reply = request().reply(Ok(Bytes::from_static(b"\x05")));
        let to_inbox = to_frame(&reply, "/remote-temp-queue/ID:x", send).expect("maps");
        assert_eq!((to_inbox.get(headers::KIND), to_inbox.get(ID)), (None, None));
        assert_eq!((to_inbox.get(headers::SERVICE), to_inbox.get(headers::METHOD)), (None, None));
        reply.priority = None;
        let to_callbacks = to_frame(&reply, "/amq/queue/ns.callback.sums", send).expect("maps");
        assert_eq!(to_callbacks.get(headers::METHOD), Some("add"));
        assert!(is_inbox("/remote-temp-queue/ID:x") && is_inbox("/reply-queue/amq.gen-x"));
        assert!(!is_inbox("/queue/ns.callback.sums") && !is_inbox("/amq/queue/ns.callback.sums"));
        // Read anywhere but an inbox, it is a oneway message; the inbox's consumer reads it as a reply.
        let (back, _, _) = from_frame(&delivered(to_inbox, false));
        assert_eq!((back.kind, back.correlation_id), (Kind::Oneway, reply.correlation_id));
    }

    #[test]
    fn what_the_queue_and_the_correlation_id_say_is_not_sent_again() {
        let send = Outgoing { persistent: true, priority: true, delivery_count: 0, delay: false, stamped: true };
        let mut envelope = request();
        envelope.service = "ns.calc".into();
        envelope.idempotency_key = default_key(Kind::Request, envelope.correlation_id, Some("ns.calc"));
        // A call's request: its id is its correlation id.
        envelope.id = envelope.correlation_id.expect("a call");
        let sent = to_frame(&envelope, "/queue/ns.calc", send).expect("maps");
        assert_eq!((sent.get(ID), sent.get(headers::SERVICE), sent.get(headers::IDEMPOTENCY_KEY)), (None, None, None));
        let (back, _, _) = from_frame(&delivered(sent, false));
        assert_eq!(back, envelope);
        // RabbitMQ's name of the same queue.
        let sent = to_frame(&envelope, "/amq/queue/ns.calc", send).expect("maps");
        assert_eq!(from_frame(&delivered(sent, false)).0.service, "ns.calc");
        // A copy with an id of its own (a dead letter, say) carries it; and the service, where it is not the
        // queue's.
        let mut letter = envelope.clone();
        letter.id = Uuid::now_v7();
        let sent = to_frame(&letter, "/queue/ns.calc.dlq", send).expect("maps");
        assert_eq!(sent.get(headers::SERVICE), Some("ns.calc"));
        assert_eq!(from_frame(&delivered(sent, false)).0, letter);
        // No key at all, or an empty service, is said with an empty value.
        envelope.idempotency_key = None;
        envelope.service = rpc_core::Text::new();
        let sent = to_frame(&envelope, "/queue/ns.calc", send).expect("maps");
        assert_eq!((sent.get(headers::SERVICE), sent.get(headers::IDEMPOTENCY_KEY)), (Some(""), Some("")));
        let (back, _, _) = from_frame(&delivered(sent, false));
        assert_eq!((back.service.as_str(), back.idempotency_key), ("", None));
        // Its copy on another queue (a dead letter) names the service the first queue stood for.
        envelope.service = "ns.calc".into();
        let first = delivered(to_frame(&envelope, "/queue/ns.calc", send).expect("maps"), false);
        assert_eq!(service_of_copy(&first, "/queue/ns.calc.dlq"), Some("ns.calc"));
        assert_eq!(service_of_copy(&first, "/queue/ns.calc"), None, "a requeue stays on its queue");
        // A plain client's request that names neither: the queue's service, and its correlation id as its key.
        let correlation = Uuid::new_v4();
        let plain = Frame::new(Command::Send)
            .header("destination", "/queue/ns.calc")
            .header("correlation-id", &correlation.to_string())
            .header("reply-to", "/temp-queue/r");
        let (back, _, _) = from_frame(&delivered(plain.clone(), false));
        assert_eq!((back.id, back.service.as_str()), (correlation, "ns.calc"));
        assert_eq!(back.idempotency_key, Some(correlation.simple().to_string().into()));
        // Its own correlation id, not one of ours, gives no key; nor does a reply.
        let own = Frame::new(Command::Send)
            .header("destination", "/queue/ns.calc")
            .header("correlation-id", "order-7")
            .header("reply-to", "/temp-queue/r");
        assert_eq!(from_frame(&delivered(own, false)).0.idempotency_key, None);
        let reply = plain.header(headers::KIND, "reply");
        let (back, _, _) = from_frame(&delivered(reply, false));
        assert_eq!((back.service.as_str(), back.idempotency_key), ("", None));
    }

    #[test]
    fn a_named_reply_queue_is_a_queue_and_a_server_address_an_inbox() {
        let mut envelope = request();
        envelope.reply_to = Some(ReplyTo::Queue("ns.callbacks.sums".into()));
        envelope.priority = None;
        let send = Outgoing { persistent: false, priority: false, delivery_count: 0, delay: false, stamped: false };
        let frame = to_frame(&envelope, "/queue/calc", send).expect("maps");
        assert_eq!(frame.get("reply-to"), Some("/queue/ns.callbacks.sums"));
        assert_eq!(from_frame(&delivered(frame, false)).0.reply_to, envelope.reply_to);
        let plain = delivered(Frame::new(Command::Send).header("reply-to", "/reply-queue/amq.gen-x"), false);
        let (back, count, _) = from_frame(&plain);
        assert_eq!(back.reply_to, Some(ReplyTo::Inbox("/reply-queue/amq.gen-x".into())));
        assert_eq!((back.kind, count), (Kind::Request, 1));
    }

    #[test]
    fn a_plain_clients_correlation_id_is_echoed_verbatim_and_server_headers_are_not_user_headers() {
        let plain = delivered(
            Frame::new(Command::Send)
                .header("correlation-id", "order-7")
                .header("reply-to", "/temp-queue/r")
                .header("priority", "4")
                .header("timestamp", "1")
                .header("JMSXUserID", "x")
                .header("tenant", "acme"),
            false,
        );
        let (back, _, _) = from_frame(&plain);
        assert_eq!(back.headers.get(headers::RAW_CORRELATION_ID).map(String::as_str), Some("order-7"));
        assert_eq!(back.priority, None, "JMS's default priority is not a chosen one");
        let user: Vec<_> = adapter::user_headers(&back.headers).collect();
        assert_eq!(user, [("tenant", "acme")]);
        let mut reply = Envelope::new(Kind::Reply);
        reply.correlation_id = back.correlation_id;
        reply.headers = back.headers.clone();
        let send = Outgoing { persistent: false, priority: false, delivery_count: 0, delay: false, stamped: false };
        assert_eq!(to_frame(&reply, "/temp-queue/r", send).expect("maps").get("correlation-id"), Some("order-7"));
    }

    fn header_name() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let known = [
            headers::KIND,
            ID,
            "correlation-id",
            "reply-to",
            "redelivered",
            "priority",
            "destination",
            headers::SERVICE,
            headers::METHOD,
            headers::REPLY_TO_INBOX,
            headers::ATTEMPT,
            headers::DEADLINE_MS,
            headers::SENT_AT_MS,
            headers::IDEMPOTENCY_KEY,
            headers::CALLER,
            headers::STATUS,
            headers::STATUS_MESSAGE,
            headers::LAST_STATUS,
            DELIVERY_COUNT,
        ];
        prop_oneof![proptest::sample::select(known.to_vec()).prop_map(str::to_owned), ".{1,12}"]
    }

    /// `frame` written by the codec and read back, as the server would hand it out.
    fn through_the_codec(frame: Frame) -> Frame {
        use tokio_util::codec::{Decoder, Encoder};

        use crate::adapter::stomp::codec::{Item, Limits, StompCodec};
        let mut codec = StompCodec::new(Limits::default());
        let mut bytes = bytes::BytesMut::new();
        codec.encode(Item::Frame(frame), &mut bytes).expect("encodes");
        match codec.decode(&mut bytes).expect("decodes") {
            Some(Item::Frame(frame)) => delivered(frame, false),
            other => panic!("not a frame: {other:?}"),
        }
    }

    proptest::proptest! {
        /// Any headers a foreign sender writes (names ours or not, values any text, repeated) read as an
        /// envelope without a panic, and that envelope, sent and read back through the codec, is the same.
        #[test]
        fn any_message_headers_read_as_an_envelope_that_round_trips(
            fields in proptest::collection::vec((header_name(), ".{0,24}"), 0..20),
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
        ) {
            let mut frame = Frame::new(Command::Message);
            frame.headers = fields;
            frame.body = body.into();
            let (envelope, delivery_count, _) = from_frame(&frame);
            let send = Outgoing { persistent: true, priority: true, delivery_count: delivery_count - 1, delay: false, stamped: false };
            let sent = to_frame(&envelope, "/queue/q", send).expect("maps");
            let (mut again, count_again, _) = from_frame(&through_the_codec(sent));
            if again.headers.contains_key(headers::RAW_CORRELATION_ID) {
                // A foreign correlation id travels verbatim; the id the process goes by is drawn at each read.
                again.correlation_id = envelope.correlation_id;
            }
            proptest::prop_assert_eq!(again, envelope);
            proptest::prop_assert_eq!(count_again, delivery_count);
        }
    }

    #[test]
    fn what_the_server_cannot_do_is_refused() {
        let send = Outgoing { persistent: false, priority: false, delivery_count: 0, delay: false, stamped: false };
        assert!(matches!(to_frame(&request(), "/queue/q", send), Err(Error::Unsupported("priorities"))));
        let mut delayed = request();
        delayed.priority = None;
        delayed.delay_ms = Some(100);
        assert!(matches!(to_frame(&delayed, "/queue/q", send), Err(Error::Unsupported("delayed delivery"))));
        let scheduled = to_frame(&delayed, "/queue/q", Outgoing { delay: true, ..send }).expect("maps");
        assert_eq!(scheduled.get(SCHEDULED_DELAY), Some("100"));
        // The scheduler's job id on the message it queued is the server's, not a user header.
        let fired = delivered(scheduled.header(SCHEDULED_JOB, "ID:vm-1:2:-1:1:1"), false);
        let (read, _, _) = from_frame(&fired);
        let user: Vec<_> = adapter::user_headers(&read.headers).collect();
        assert_eq!(user, [("order", "7")]);
    }
}
