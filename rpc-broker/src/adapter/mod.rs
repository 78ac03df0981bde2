//! Adapters to external brokers, one cargo feature each.
//!
//! Each maps the envelope onto the broker's native message properties and headers, so that a program using
//! only the broker's own client library can call a service written with mqrpc: the body is the MessagePack of
//! the arguments (or the result), and the envelope's other fields travel as properties where the broker has a
//! place for them, else as headers named below. The mapping of each broker is documented on its transport.

// The helpers below serve the adapters; a build with none of their features has no use for them.
#![cfg_attr(not(any(feature = "amqp", feature = "nats")), allow(dead_code))]

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

#[cfg(feature = "amqp")]
pub mod amqp;
#[cfg(any(feature = "kafka", feature = "redis"))]
pub(crate) mod fields;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "redis")]
pub mod redis_dedup;
#[cfg(feature = "redis")]
pub mod redis_streams;
#[cfg(feature = "stomp")]
pub mod stomp;
#[cfg(feature = "zmq")]
pub mod zmq;

/// A broker URL without its password, for logs and error messages.
pub(crate) fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            let user = credentials.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// Header names of the envelope fields that have no native place; every name the framework writes starts with
/// [`headers::PREFIX`], so user headers are the others.
pub mod headers {
    /// The prefix of every header the framework writes itself.
    pub const PREFIX: &str = "mqrpc-";
    /// The envelope kind: `request`, `reply` or `oneway`. Absent: a request if there is a reply address, else oneway.
    pub const KIND: &str = "mqrpc-kind";
    /// The service's name.
    pub const SERVICE: &str = "mqrpc-service";
    /// The method's name (NATS; AMQP uses the `type` property).
    pub const METHOD: &str = "mqrpc-method";
    /// Which attempt this is, from 1.
    pub const ATTEMPT: &str = "mqrpc-attempt";
    /// The time budget in milliseconds when the message was sent.
    pub const DEADLINE_MS: &str = "mqrpc-deadline-ms";
    /// When the message was sent, in milliseconds since the Unix epoch, to take the time it spent queued off the
    /// budget (hosts need synchronised clocks for that part; the broker's own expiry is exact).
    pub const SENT_AT_MS: &str = "mqrpc-sent-at-ms";
    /// The idempotency key.
    pub const IDEMPOTENCY_KEY: &str = "mqrpc-idempotency-key";
    /// The caller's declared identity (NATS; on RabbitMQ the `app_id` property carries it).
    pub const CALLER: &str = "mqrpc-caller";
    /// The priority, 0 to 9 (where the broker has no native priority property).
    pub const PRIORITY: &str = "mqrpc-priority";
    /// A reply's status code (absent: ok).
    pub const STATUS: &str = "mqrpc-status";
    /// A reply's status message.
    pub const STATUS_MESSAGE: &str = "mqrpc-status-message";
    /// On a dead-lettered reply (status 11): the last failure's status code.
    pub const LAST_STATUS: &str = "mqrpc-last-status";
    /// The correlation id (NATS; AMQP uses the `correlation_id` property).
    pub const CORRELATION_ID: &str = "mqrpc-correlation-id";
    /// Where the reply goes, where the broker's reply subject is taken by the broker itself (NATS JetStream).
    pub const REPLY_TO: &str = "mqrpc-reply-to";
    /// Set (true) when the reply address is the caller's inbox rather than a named queue: the reply may then go
    /// unconfirmed. Absent: a named queue.
    pub const REPLY_TO_INBOX: &str = "mqrpc-reply-inbox";
    /// A correlation id from a caller in any form but the canonical lower-case hyphenated UUID (another text,
    /// or a UUID written otherwise), kept to be echoed verbatim on the reply.
    pub const RAW_CORRELATION_ID: &str = "mqrpc-raw-correlation-id";
    /// On a reply (AMQP): the request's queue, which the worker declared without a maximum length. A caller
    /// publishes its later calls to that queue without publisher confirms: no full queue can drop them
    /// unannounced, and the reply proves arrival.
    pub const UNBOUNDED_QUEUE: &str = "mqrpc-unbounded-queue";
}

/// Checks that `pem` holds at least one certificate, all readable.
#[cfg(any(feature = "amqp", feature = "redis"))]
pub(crate) fn check_certificates(pem: &[u8]) -> Result<(), rpc_core::Error> {
    use rustls_pki_types::pem::PemObject;
    let mut found = false;
    for certificate in rustls_pki_types::CertificateDer::pem_slice_iter(pem) {
        certificate
            .map_err(|error| rpc_core::Error::InvalidArgument(format!("cannot read the certificates: {error}")))?;
        found = true;
    }
    if found { Ok(()) } else { Err(rpc_core::Error::InvalidArgument("no certificate in the PEM".into())) }
}

/// Checks that `cert_pem` holds a certificate chain and `key_pem` a private key, both readable.
#[cfg(any(feature = "amqp", feature = "redis"))]
pub(crate) fn check_client_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<(), rpc_core::Error> {
    use rustls_pki_types::pem::PemObject;
    check_certificates(cert_pem)?;
    rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|error| rpc_core::Error::InvalidArgument(format!("cannot read the private key: {error}")))?;
    Ok(())
}

/// Refuses a message published with a delay: the broker has no delayed delivery of its own, and sending it
/// at once would ignore what the caller asked.
pub(crate) fn refuse_delay(envelope: &rpc_core::Envelope) -> Result<(), rpc_core::Error> {
    match envelope.delay_ms {
        Some(_) => Err(rpc_core::Error::Unsupported("delayed delivery")),
        None => Ok(()),
    }
}

/// Milliseconds since the Unix epoch, now: at [`rpc_core::transport::recent_instant`], which inside the
/// server's poll of a request reads no clock (see [`wall_ms_at`]).
pub(crate) fn now_ms() -> u64 {
    wall_ms_at(rpc_core::transport::recent_instant())
}

/// How long a thread's reading of the system clock serves [`wall_ms_at`]; past it, the clock is read again, so
/// that a step of the system clock shows within this long.
const WALL_ANCHOR_LIFE: std::time::Duration = std::time::Duration::from_secs(1);

thread_local! {
    /// This thread's last reading of the system clock (time since the Unix epoch), and the monotonic clock's
    /// reading just before it.
    static WALL_ANCHOR: std::cell::Cell<Option<(std::time::Instant, std::time::Duration)>> =
        const { std::cell::Cell::new(None) };
}

/// Milliseconds since the Unix epoch at `at`, a reading of the monotonic clock: the system clock read at most
/// once a second per thread ([`WALL_ANCHOR_LIFE`]), the time since then from `at`. The senders' timestamps
/// that receivers compare with it (how long a message was on its way) are milliseconds from other hosts' clocks.
pub(crate) fn wall_ms_at(at: std::time::Instant) -> u64 {
    // The time since the epoch at `at`, from a reading of both clocks; `None` when the reading is a
    // [`WALL_ANCHOR_LIFE`] or more away from `at`, either way. One subtraction of readings when `at` follows the
    // reading, as nearly always (each costs a normalisation of seconds and nanoseconds).
    let shifted = |read_at: std::time::Instant, wall: std::time::Duration| match at.checked_duration_since(read_at) {
        Some(after) => (after < WALL_ANCHOR_LIFE).then(|| wall + after),
        None => {
            let before = read_at.duration_since(at);
            (before < WALL_ANCHOR_LIFE).then(|| wall.saturating_sub(before))
        }
    };
    let since = WALL_ANCHOR.with(|anchor| {
        if let Some(since) = anchor.get().and_then(|(read_at, wall)| shifted(read_at, wall)) {
            return Some(since);
        }
        let read_at = std::time::Instant::now();
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
        anchor.set(Some((read_at, wall)));
        // Read now, `at` may still be a reading from long ago: counted from this one all the same.
        Some(match at.checked_duration_since(read_at) {
            Some(after) => wall + after,
            None => wall.saturating_sub(read_at.duration_since(at)),
        })
    });
    since.map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}

/// How long a message sent at `sent_at_ms` has been on its way at `now_ms` ([`Delivery::queued`]); zero when
/// the sending time is unknown, or when the sender's clock is ahead of ours.
///
/// [`Delivery::queued`]: rpc_core::transport::Delivery::queued
pub(crate) fn queued_since(sent_at_ms: Option<u64>, now_ms: u64) -> std::time::Duration {
    std::time::Duration::from_millis(sent_at_ms.map_or(0, |sent| now_ms.saturating_sub(sent)))
}

/// The name of the envelope kind in [`headers::KIND`].
pub(crate) fn kind_name(kind: rpc_core::Kind) -> &'static str {
    match kind {
        rpc_core::Kind::Request => "request",
        rpc_core::Kind::Reply => "reply",
        rpc_core::Kind::Oneway => "oneway",
    }
}

/// The envelope kind named in [`headers::KIND`], or guessed for a message from a plain client of the broker.
pub(crate) fn kind_of(name: Option<&str>, has_reply_to: bool) -> rpc_core::Kind {
    match name {
        Some("reply") => rpc_core::Kind::Reply,
        Some("oneway") => rpc_core::Kind::Oneway,
        Some("request") => rpc_core::Kind::Request,
        _ if has_reply_to => rpc_core::Kind::Request,
        _ => rpc_core::Kind::Oneway,
    }
}

/// The user headers of a message: every header not written by the framework or the broker.
pub(crate) fn is_user_header(name: &str) -> bool {
    !name.starts_with(headers::PREFIX) && !name.starts_with("x-") && !name.starts_with("Nats-")
}

/// Local counters of one queue, for what the broker does not report.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) published: std::sync::atomic::AtomicU64,
    pub(crate) acked: std::sync::atomic::AtomicU64,
    pub(crate) dead_lettered: std::sync::atomic::AtomicU64,
    pub(crate) rejected: std::sync::atomic::AtomicU64,
    pub(crate) unacked: std::sync::atomic::AtomicI64,
}

impl Counters {
    pub(crate) fn bump(counter: &std::sync::atomic::AtomicU64) {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// These counters as [`rpc_core::QueueStats`], with what the broker reported.
    pub(crate) fn stats(&self, ready: usize, consumers: usize) -> rpc_core::QueueStats {
        use std::sync::atomic::Ordering::Relaxed;
        let mut stats = rpc_core::QueueStats::new();
        stats.ready = ready;
        stats.consumers = consumers;
        stats.unacked = usize::try_from(self.unacked.load(Relaxed).max(0)).unwrap_or(0);
        stats.published = self.published.load(Relaxed);
        stats.acked = self.acked.load(Relaxed);
        stats.dead_lettered = self.dead_lettered.load(Relaxed);
        stats.rejected = self.rejected.load(Relaxed);
        stats
    }
}

/// Per-queue [`Counters`], created on first use.
#[derive(Debug, Default)]
pub(crate) struct CounterMap(dashmap::DashMap<String, std::sync::Arc<Counters>>);

impl CounterMap {
    pub(crate) fn of(&self, queue: &str) -> std::sync::Arc<Counters> {
        if let Some(counters) = self.0.get(queue) {
            return std::sync::Arc::clone(&counters);
        }
        std::sync::Arc::clone(&self.0.entry(queue.to_owned()).or_default())
    }
}

/// User headers of an envelope, for a broker that takes string pairs.
/// The correlation id a plain client sent in a property or header, if it is one of ours: a UUID in the
/// canonical lower-case hyphenated form this implementation writes. Any other string (an upper-case or simple
/// UUID included) is the caller's own and goes back byte for byte, in [`headers::RAW_CORRELATION_ID`].
pub(crate) fn canonical_correlation(text: &str) -> Option<uuid::Uuid> {
    let id = uuid::Uuid::try_parse(text).ok()?;
    let mut buffer = uuid::Uuid::encode_buffer();
    (id.hyphenated().encode_lower(&mut buffer) == text).then_some(id)
}

pub(crate) fn user_headers(headers: &BTreeMap<String, String>) -> impl Iterator<Item = (&str, &str)> {
    headers.iter().filter(|(name, _)| is_user_header(name)).map(|(name, value)| (name.as_str(), value.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn system_ms() -> u64 {
        u64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_millis()).expect("fits")
    }

    #[test]
    fn the_wall_clock_in_milliseconds_follows_the_monotonic_clock_between_readings_of_the_system_clock() {
        let before = system_ms();
        let now = std::time::Instant::now();
        let at_now = wall_ms_at(now);
        let after = system_ms();
        assert!((before..=after).contains(&at_now), "{at_now} is not between {before} and {after}");
        // Within the anchor's life, earlier and later instants are the anchor's reading shifted: to the
        // millisecond, give or take the rounding of each.
        for shift in [1, 250, 900] {
            let shift = std::time::Duration::from_millis(shift);
            let later = wall_ms_at(now + shift);
            assert!(later.abs_diff(at_now + shift.as_millis() as u64) <= 1, "{later} at +{shift:?} from {at_now}");
            if let Some(earlier) = now.checked_sub(shift) {
                let earlier = wall_ms_at(earlier);
                assert!(earlier.abs_diff(at_now - shift.as_millis() as u64) <= 1, "{earlier} at -{shift:?}");
            }
        }
        // Past it, the system clock is read again: an instant far off is the system clock's time shifted too.
        let far = now + std::time::Duration::from_secs(30);
        assert!(wall_ms_at(far).abs_diff(system_ms() + 30_000) <= 100, "an instant 30 s on");
        assert!(now_ms().abs_diff(system_ms()) <= 100, "now_ms is the system clock's time");
    }

    #[test]
    fn passwords_are_not_logged() {
        assert_eq!(redact_url("amqp://guest:secret@127.0.0.1:5672/%2f"), "amqp://guest:***@127.0.0.1:5672/%2f");
        assert_eq!(redact_url("stomp://me:secret@host:61613/"), "stomp://me:***@host:61613/");
        assert_eq!(redact_url("amqp://127.0.0.1"), "amqp://127.0.0.1");
    }

    #[test]
    fn queued_time_counts_from_the_sending_time_and_ignores_a_clock_ahead() {
        use std::time::Duration;
        assert_eq!(queued_since(Some(10_000), 10_400), Duration::from_millis(400));
        assert_eq!(queued_since(Some(10_500), 10_000), Duration::ZERO);
        assert_eq!(queued_since(None, 10_000), Duration::ZERO);
    }

    #[test]
    fn kinds_round_trip_and_plain_messages_are_guessed() {
        for kind in [rpc_core::Kind::Request, rpc_core::Kind::Reply, rpc_core::Kind::Oneway] {
            assert_eq!(kind_of(Some(kind_name(kind)), false), kind);
        }
        assert_eq!(kind_of(None, true), rpc_core::Kind::Request);
        assert_eq!(kind_of(None, false), rpc_core::Kind::Oneway);
    }

    #[test]
    fn framework_and_broker_headers_are_not_user_headers() {
        assert!(is_user_header("order"));
        assert!(!is_user_header(headers::SERVICE));
        assert!(!is_user_header("x-delivery-count"));
        assert!(!is_user_header("Nats-Msg-Id"));
    }
}
