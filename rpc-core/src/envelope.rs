//! The envelope: what travels on a queue for every request and reply.
//!
//! On the wire it is a flat MessagePack map with short keys (see `docs/wire-format.md`); the body is opaque
//! bytes that hold the MessagePack of the arguments or the result.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::status::{Code, Status};
use crate::text::Text;

/// The version of the envelope's full form, which every transport that carries a whole envelope writes.
pub const VERSION: u8 = 1;

/// The version of the envelope's compact form: a request's id and idempotency key are left out where they are
/// its correlation id, and a reply does not echo the service and method. This build reads both versions;
/// core NATS writes this one between mqrpc processes (docs/wire-format.md).
pub const COMPACT_VERSION: u8 = 2;

/// What an envelope carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub enum Kind {
    /// A call that expects a reply at `reply_to`.
    Request,
    /// The answer to a request, matched to it by `correlation_id`.
    Reply,
    /// A fire-and-forget call (oneway or broadcast): no reply is sent.
    Oneway,
}

impl From<Kind> for u8 {
    fn from(kind: Kind) -> u8 {
        match kind {
            Kind::Request => 0,
            Kind::Reply => 1,
            Kind::Oneway => 2,
        }
    }
}

impl TryFrom<u8> for Kind {
    type Error = String;

    fn try_from(value: u8) -> Result<Self, Self::Error> {
        match value {
            0 => Ok(Kind::Request),
            1 => Ok(Kind::Reply),
            2 => Ok(Kind::Oneway),
            other => Err(format!("unknown envelope kind {other}")),
        }
    }
}

/// Where the reply to a request goes.
///
/// On the wire it is the address (`r`) and a flag (`ri`) set for an inbox; a request without the flag names a
/// queue (see `docs/wire-format.md`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ReplyTo {
    /// A caller's private inbox, which a caller waits on now: the reply may go unconfirmed, and an inbox that is
    /// gone (its caller with it) drops it.
    Inbox(Text),
    /// A named queue, such as a durable callback queue: the reply is published like any message, confirmed.
    Queue(Text),
}

impl ReplyTo {
    /// The address: the inbox's or the queue's name.
    pub fn address(&self) -> &str {
        self.text()
    }

    /// The address, shared.
    pub fn text(&self) -> &Text {
        match self {
            ReplyTo::Inbox(address) | ReplyTo::Queue(address) => address,
        }
    }

    /// Whether this is a caller's inbox.
    pub fn is_inbox(&self) -> bool {
        matches!(self, ReplyTo::Inbox(_))
    }
}

/// One message: a request, a reply or a oneway call.
///
/// Fields that a broker has a native place for (correlation id, reply-to, message id, expiration, priority)
/// are mapped onto it by the adapters; the envelope is the reference and the whole of it travels as the body
/// where a broker has no such place. Its MessagePack form is written and read by [`codec`](crate::codec) in
/// one pass.
#[derive(Clone, Debug, PartialEq)]
pub struct Envelope {
    /// The version of the form it was read from: [`VERSION`], or [`COMPACT_VERSION`] for the compact form.
    /// A reply takes its request's, so that a transport can answer in the form the caller wrote.
    pub version: u8,
    /// Request, reply or oneway.
    pub kind: Kind,
    /// Unique id of this message.
    pub id: Uuid,
    /// The call this message belongs to: set by the caller on a request, echoed on the reply.
    pub correlation_id: Option<Uuid>,
    /// The service's name (requests; echoed on replies).
    pub service: Text,
    /// The method's name (requests; echoed on replies).
    pub method: Text,
    /// Where the reply goes: the caller's inbox or a named queue (a durable callback queue).
    pub reply_to: Option<ReplyTo>,
    /// Remaining time budget in milliseconds, relative so that clock skew between hosts does not matter.
    /// A transport hands a delivery out with the time it spent queued already taken off.
    pub deadline_ms: Option<u64>,
    /// Milliseconds the broker holds the message before it can be delivered, where the transport has delayed
    /// delivery ([`Capabilities::delayed_delivery`](crate::Capabilities::delayed_delivery)); the deadline
    /// counts from the publish, delay included. Workers ignore it.
    pub delay_ms: Option<u64>,
    /// Which attempt this is, from 1.
    pub attempt: u32,
    /// The key under which a worker executes the call at most once in effect.
    pub idempotency_key: Option<Text>,
    /// Priority 0 (default) to 9 (first), where the transport has priorities.
    pub priority: Option<u8>,
    /// Reply status code (0, absent, is ok).
    pub status: u16,
    /// Reply status message, for codes other than ok.
    pub status_message: Option<String>,
    /// The code of the last failure, on a [`Code::DeadLettered`] reply: with [`Code::Application`], the body is
    /// the method's error value.
    pub last_status: Option<u16>,
    /// Who sent the call, as the caller declared it ([`ClientBuilder::identity`](crate::ClientBuilder::identity));
    /// requests only, not verified by the framework.
    pub caller: Option<Text>,
    /// Free-form headers; a reply echoes its request's headers.
    pub headers: BTreeMap<String, String>,
    /// The arguments (request), the result or the application error (reply), as MessagePack.
    pub body: Bytes,
}

/// A fresh message id: a version 7 UUID (the time in milliseconds, then a 42-bit counter seeded at random each
/// millisecond, then 32 random bits). Each thread keeps its own counter and its own generator (wyrand, seeded
/// from the operating system's randomness), so that threads making ids at once share nothing: ids are ordered
/// within a thread and unique across threads; across threads they are ordered to the millisecond.
pub(crate) fn new_id() -> Uuid {
    new_id_at(std::time::Instant::now())
}

/// [`new_id`], of the time `now` read by the caller: one reading of the clock serves a call's deadline and its
/// id. The wall clock's time of `now` is the monotonic clock's, offset by the wall clock as this thread last
/// read it, at most a second before: a step of the wall clock shows in ids within a second.
///
/// Never inlined: profiles count calls by it (each process of a call makes one id per call; see
/// docs/performance.md, Profiling).
#[inline(never)]
pub(crate) fn new_id_at(now: std::time::Instant) -> Uuid {
    thread_local! {
        /// The millisecond of the last id, its counter, and the generator's state (0 until seeded).
        static IDS: std::cell::Cell<(u64, u64, u64)> = const { std::cell::Cell::new((0, 0, 0)) };
    }
    /// The counter's width: 12 bits before the variant, 30 after it.
    const COUNTER_BITS: u32 = 42;
    let now = unix_millis_at(now);
    IDS.with(|ids| {
        let (mut millis, mut counter, mut state) = ids.get();
        if state == 0 {
            // Any nonzero start will do; the OS's randomness keeps threads and processes apart.
            state = Uuid::new_v4().as_u64_pair().0 | 1;
        }
        if now > millis {
            millis = now;
            // Seeded with its top bit clear, so that a millisecond has room for 2^41 ids after the seed.
            counter = wyrand(&mut state) >> (64 - COUNTER_BITS + 1);
        } else {
            // The same millisecond, or the clock went back: the order holds by the counter.
            counter += 1;
            if counter >> COUNTER_BITS != 0 {
                millis += 1;
                counter = wyrand(&mut state) >> (64 - COUNTER_BITS + 1);
            }
        }
        let random = wyrand(&mut state) >> 32;
        ids.set((millis, counter, state));
        let mut bytes = [0u8; 10];
        // The counter's top 12 bits go under the version nibble, the other 30 above the random bits (the
        // variant's 2 bits take the top of `low`).
        let high = u16::try_from(counter >> 30).unwrap_or(u16::MAX) & 0x0fff;
        let low = ((counter & ((1 << 30) - 1)) << 32) | random;
        bytes[..2].copy_from_slice(&high.to_be_bytes());
        bytes[2..].copy_from_slice(&low.to_be_bytes());
        uuid::Builder::from_unix_timestamp_millis(millis, &bytes).into_uuid()
    })
}

/// The wall clock's time at `now`, in milliseconds since 1970.
///
/// Counted from this thread's last reading of the wall clock, at most a second old. The millisecond of the last
/// time asked for is kept, on the monotonic clock: a thread making many ids reads it with two comparisons.
fn unix_millis_at(now: std::time::Instant) -> u64 {
    use std::time::{Instant, SystemTime, UNIX_EPOCH};
    /// This thread's reading of the wall clock, and the millisecond of the monotonic clock last counted from it.
    #[derive(Clone, Copy)]
    struct Wall {
        /// When the wall clock was read, on the monotonic clock.
        read: Instant,
        /// What it read, in milliseconds since 1970.
        at: u64,
        /// The instants `start..end`, which are all `millis` counted from the reading (empty when none is kept).
        start: Instant,
        end: Instant,
        millis: u64,
    }
    thread_local! {
        static WALL: std::cell::Cell<Option<Wall>> = const { std::cell::Cell::new(None) };
    }
    /// How long a reading of the wall clock serves.
    const SERVES: std::time::Duration = std::time::Duration::from_secs(1);
    const MILLI: std::time::Duration = std::time::Duration::from_millis(1);
    let millis = |since: std::time::Duration| since.as_secs().saturating_mul(1_000) + u64::from(since.subsec_millis());
    WALL.with(|cell| {
        let kept = cell.get();
        if let Some(wall) = kept
            && wall.start <= now
            && now < wall.end
        {
            return wall.millis;
        }
        let (read, at) = match kept {
            Some(wall) if now.max(wall.read) - now.min(wall.read) < SERVES => (wall.read, wall.at),
            _ => (Instant::now(), SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, millis)),
        };
        let mut wall = Wall { read, at, start: now, end: now, millis: 0 };
        match now.checked_duration_since(read) {
            Some(after) => {
                let whole = millis(after);
                wall.millis = at.saturating_add(whole);
                // The millisecond `now` is in, kept while it lies within what the reading serves.
                if let Some(start) = u32::try_from(whole).ok().and_then(|whole| read.checked_add(MILLI * whole))
                    && let Some(end) = start.checked_add(MILLI)
                    && end - read <= SERVES
                {
                    (wall.start, wall.end) = (start, end);
                }
            }
            // A time from before the reading (read earlier, passed on late): counted back, and not kept.
            None => wall.millis = at.saturating_sub(millis(read - now)),
        }
        cell.set(Some(wall));
        wall.millis
    })
}

/// One step of wyrand: a fast generator of 64-bit words, plenty for the random parts of ids (which need to be
/// unlikely to repeat, not unpredictable).
fn wyrand(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0xa076_1d64_78bd_642f);
    let product = u128::from(*state) * u128::from(*state ^ 0xe703_7ed1_a0b4_28db);
    // The high and low halves, folded.
    ((product >> 64) as u64) ^ (product as u64)
}

impl Envelope {
    /// A new envelope of `kind` with a fresh id and every optional field empty.
    pub fn new(kind: Kind) -> Envelope {
        Envelope::with_id(kind, new_id())
    }

    /// An envelope of `kind` with id `id` and every optional field empty.
    pub(crate) fn with_id(kind: Kind, id: Uuid) -> Envelope {
        Envelope::echoing(kind, id, VERSION, None, (Text::new(), Text::new(), BTreeMap::new()))
    }

    /// An envelope of `kind` with id `id` that carries `version`, `correlation_id` and the `names` (service,
    /// method, headers) it is given, every other optional field empty. Written whole: the fields of an empty
    /// envelope assigned over would each cost a drop, on the path of every reply.
    fn echoing(
        kind: Kind,
        id: Uuid,
        version: u8,
        correlation_id: Option<Uuid>,
        (service, method, headers): (Text, Text, BTreeMap<String, String>),
    ) -> Envelope {
        Envelope {
            version,
            kind,
            id,
            correlation_id,
            service,
            method,
            reply_to: None,
            deadline_ms: None,
            delay_ms: None,
            attempt: 1,
            idempotency_key: None,
            priority: None,
            status: 0,
            status_message: None,
            last_status: None,
            caller: None,
            headers,
            body: Bytes::new(),
        }
    }

    /// The reply to this request carrying `result`: the correlation id, service, method and headers are echoed.
    pub fn reply(&self, result: Result<Bytes, Status>) -> Envelope {
        self.reply_at(result, std::time::Instant::now())
    }

    /// As [`reply`](Envelope::reply), the reply's id of the time `now`.
    pub(crate) fn reply_at(&self, result: Result<Bytes, Status>, now: std::time::Instant) -> Envelope {
        let names = (self.service.clone(), self.method.clone(), self.headers.clone());
        let mut reply = Envelope::echoing(Kind::Reply, new_id_at(now), self.version, self.correlation_id, names);
        reply.set_result(result);
        reply
    }

    /// As [`reply`](Envelope::reply), moving this request's service, method and headers into the reply instead
    /// of copying them (they are left empty here): for a request whose only other use is its reply address.
    /// The reply's id is of the time `now`.
    pub(crate) fn take_reply(&mut self, result: Result<Bytes, Status>, now: std::time::Instant) -> Envelope {
        let names =
            (std::mem::take(&mut self.service), std::mem::take(&mut self.method), std::mem::take(&mut self.headers));
        let mut reply = Envelope::echoing(Kind::Reply, new_id_at(now), self.version, self.correlation_id, names);
        reply.set_result(result);
        reply
    }

    fn set_result(&mut self, result: Result<Bytes, Status>) {
        match result {
            Ok(body) => self.body = body,
            Err(status) => {
                self.status = status.code().as_u16();
                self.status_message = Some(status.message().to_owned());
                self.last_status = status.cause().map(Code::as_u16);
                self.body = status.details().clone();
            }
        }
    }

    /// The status of a reply: ok, or the code and message it carries (the body is the status' details).
    pub fn status(&self) -> Status {
        let code = Code::from_u16(self.status);
        let message = self.status_message.clone().unwrap_or_default();
        let status = Status::new(code, message).with_details(self.body.clone());
        match self.last_status {
            Some(cause) => status.with_cause(Code::from_u16(cause)),
            None => status,
        }
    }
}

/// The idempotency key of a call that was given none: its correlation id in 32 lowercase hex digits, cut from
/// the chunk that this thread's small copies share ([`Text::copied`]): 32 keys cost two allocations rather than
/// one each.
pub(crate) fn default_key(correlation_id: Uuid) -> Text {
    let mut hex = Uuid::encode_buffer();
    let hex: &str = correlation_id.simple().encode_lower(&mut hex);
    Text::copied(hex)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_keys_are_their_ids_in_hex_cut_from_shared_buffers() {
        let ids: Vec<Uuid> = (0..100u128).map(|n| Uuid::from_u128(n << 64 | 0xabc)).collect();
        let keys: Vec<Text> = ids.iter().map(|id| default_key(*id)).collect();
        for (id, key) in ids.iter().zip(&keys) {
            assert_eq!(key.as_str(), id.simple().to_string());
        }
        // Consecutive keys sit side by side in one buffer, a new one started when it is full.
        let adjacent = keys.windows(2).filter(|pair| pair[0].as_ptr().wrapping_add(32) == pair[1].as_ptr()).count();
        assert!(adjacent >= 90, "{adjacent} of 99 pairs adjacent");
        // A key outlives the other keys of its buffer.
        let mut keys = keys;
        let first = keys.remove(0);
        drop(keys);
        assert_eq!(first.as_str(), ids[0].simple().to_string());
    }

    #[test]
    fn a_taken_reply_is_the_copied_reply_and_leaves_the_request_its_address() {
        let mut request = Envelope::new(Kind::Request);
        request.correlation_id = Some(new_id());
        request.service = "Calculator".into();
        request.method = "add".into();
        request.reply_to = Some(ReplyTo::Inbox("inbox.7".into()));
        request.headers.insert("order".into(), "7".into());
        for result in [
            Ok(Bytes::from_static(b"\x05")),
            Err(Status::new(Code::Application, "no").with_details(Bytes::from_static(b"\x01"))),
        ] {
            let copied = request.reply(result.clone());
            let mut taken_from = request.clone();
            let mut taken = taken_from.take_reply(result, std::time::Instant::now());
            assert_ne!(taken.id, copied.id);
            taken.id = copied.id;
            assert_eq!(taken, copied);
            assert_eq!((taken_from.service.as_str(), taken_from.method.as_str()), ("", ""));
            assert!(taken_from.headers.is_empty());
            assert_eq!(taken_from.reply_to, Some(ReplyTo::Inbox("inbox.7".into())));
        }
    }

    #[test]
    fn an_ids_time_is_the_wall_clocks_at_the_instant_it_is_made_of() {
        use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
        let wall = || u64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_millis());
        let before = wall().expect("in range");
        let now = Instant::now();
        let at = unix_millis_at(now);
        let after = wall().expect("in range");
        // Rounded to the millisecond twice: one either way.
        assert!(before <= at + 1 && at <= after + 1, "{before} <= {at} <= {after}");
        // Instants before and after the reading, within the second it serves and past it.
        for (offset, later) in [(200, false), (300, true), (900, true), (5_000, true), (3_000, false)] {
            let shifted = if later { now + Duration::from_millis(offset) } else { now - Duration::from_millis(offset) };
            let expected = if later { at + offset } else { at - offset };
            assert!(unix_millis_at(shifted).abs_diff(expected) <= 2, "{offset} ms {later}");
        }
        assert!(unix_millis_at(Instant::now()).abs_diff(wall().expect("in range")) <= 2);
        let id = new_id_at(now);
        let (seconds, nanos) = id.get_timestamp().expect("a v7 id has its time").to_unix();
        assert!((seconds * 1_000 + u64::from(nanos) / 1_000_000).abs_diff(at) <= 2);
    }

    #[test]
    fn the_millisecond_kept_gives_what_counting_from_the_reading_gives() {
        use std::time::{Duration, Instant};
        // The thread's reading of the wall clock made before `base`, so that every instant below is counted
        // forwards from it: a reading made at the first instant asked for would be made after it (by however
        // long this thread waited in between), and instants just past a whole millisecond from `base` would
        // count one fewer.
        unix_millis_at(Instant::now());
        let base = Instant::now();
        let steps: Vec<Duration> = (0..400).map(|step| Duration::from_micros(step * 37)).collect();
        let forward: Vec<u64> = steps.iter().map(|step| unix_millis_at(base + *step)).collect();
        // Asked backwards, each instant meets another millisecond kept than it did forwards.
        let mut backward: Vec<u64> = steps.iter().rev().map(|step| unix_millis_at(base + *step)).collect();
        backward.reverse();
        assert_eq!(forward, backward);
        // Counted from one reading: each step's millisecond is the first's plus the whole milliseconds between,
        // or one more (the first need not start its millisecond).
        for (step, millis) in steps.iter().zip(&forward) {
            let whole = u64::try_from(step.as_millis()).expect("small");
            assert!(*millis == forward[0] + whole || *millis == forward[0] + whole + 1, "{step:?}: {millis}");
        }
        assert!(forward.windows(2).all(|pair| pair[0] <= pair[1]));
        // An instant before the reading is counted back, then one in the kept millisecond again.
        let earlier = unix_millis_at(base - Duration::from_millis(10));
        assert!(earlier.abs_diff(forward[0] - 10) <= 1, "{earlier} against {}", forward[0]);
        assert_eq!(unix_millis_at(base + steps[100]), forward[100]);
    }

    #[test]
    fn ids_made_on_several_threads_at_once_are_distinct_version_7_uuids() {
        let threads: Vec<_> =
            (0..4).map(|_| std::thread::spawn(|| (0..20_000).map(|_| new_id()).collect::<Vec<_>>())).collect();
        let mut seen = std::collections::HashSet::new();
        for thread in threads {
            let ids = thread.join().expect("the thread made its ids");
            // Ordered within a thread.
            assert!(ids.windows(2).all(|pair| pair[0] < pair[1]));
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970");
            for id in ids {
                assert_eq!(id.get_version_num(), 7);
                assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
                let (seconds, _) = id.get_timestamp().expect("a v7 id has its time").to_unix();
                assert!(now.as_secs().abs_diff(seconds) < 60, "{id} is not of now");
                assert!(seen.insert(id), "an id came twice: {id}");
            }
        }
        assert_eq!(seen.len(), 80_000);
    }
}
