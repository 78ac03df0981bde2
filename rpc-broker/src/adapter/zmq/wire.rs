//! The messages mqrpc nodes exchange over ZeroMQ: multipart messages whose first frame is [`PROTOCOL`] and
//! whose second is one command byte (docs/wire-format.md, "ZeroMQ"). [`Command::parse`] reads what a peer sent:
//! untrusted input, so the frame count and every frame's size are checked before anything is decoded, and the
//! envelope itself is read by rpc-core's size- and depth-checked codec afterwards.

use std::collections::BTreeMap;
use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};
use rpc_core::codec::Limits;
use uuid::Uuid;

/// The first frame of every message: the protocol and its version.
pub const PROTOCOL: &[u8] = b"MQRPC-ZMQ/1";

/// Most frames a message of this protocol has; a message with more is refused before it is read.
pub const MAX_FRAMES: usize = 8;

/// Longest queue, inbox, topic or endpoint name.
pub const MAX_NAME: usize = 1_024;

/// Most queues one READY announces.
pub const MAX_QUEUES: usize = 4_096;

/// Command bytes (the second frame).
mod code {
    pub(super) const HELLO: u8 = 0x01;
    pub(super) const REQUEST: u8 = 0x02;
    pub(super) const PING: u8 = 0x03;
    pub(super) const SYNC: u8 = 0x04;
    pub(super) const SEEN: u8 = 0x05;
    pub(super) const READY: u8 = 0x11;
    pub(super) const ANSWER: u8 = 0x12;
    pub(super) const ACK: u8 = 0x13;
    pub(super) const REQUEUE: u8 = 0x14;
    pub(super) const REPUBLISH: u8 = 0x15;
    pub(super) const REFUSED: u8 = 0x16;
    pub(super) const PONG: u8 = 0x17;
    pub(super) const BROADCAST: u8 = 0x21;
    pub(super) const SYNCED: u8 = 0x22;
}

/// One message of the protocol, parsed. Names (queues, inboxes, endpoints, topics) are kept as the bytes that
/// came, checked to be UTF-8 ([`text`] reads them); envelopes as the bytes that came, decoded later by the
/// codec with its limits.
#[derive(Clone, PartialEq, Eq)]
pub enum Command {
    /// Client to worker, first on a connection: who the client is and where it publishes (empty: nowhere).
    Hello {
        /// The client's node id.
        node: Uuid,
        /// The client's PUB endpoint, or empty.
        publishes: Bytes,
    },
    /// Client to worker: a request (or oneway message) for `queue`.
    Request {
        /// The client's number for it, echoed by the worker's settle.
        seq: u64,
        /// Deliveries so far, this one included.
        delivery_count: u32,
        /// How long the client held it before this send, in milliseconds.
        queued_ms: u64,
        /// The queue it is for.
        queue: Bytes,
        /// The envelope's MessagePack.
        envelope: Bytes,
    },
    /// Client to worker: a heartbeat.
    Ping,
    /// Client to worker: publish the sync marker `topic` on your PUB socket (see [`Published::Synced`]).
    Sync {
        /// The marker's topic.
        topic: Bytes,
    },
    /// Client to worker: the client has taken announcement `version`.
    Seen {
        /// The announcement's version.
        version: u64,
    },
    /// Worker to client: the worker's identity and what it serves. Sent in answer to HELLO and whenever what it
    /// serves changes.
    Ready {
        /// The worker's node id.
        node: Uuid,
        /// Increases with every announcement; the client answers SEEN with it.
        version: u64,
        /// The worker's PUB endpoint, or empty.
        publishes: Bytes,
        /// Each queue served and how many of its requests this client may have outstanding here at once.
        queues: BTreeMap<String, u32>,
    },
    /// Worker to client: a reply for the client's `inbox`; `seq` (when not 0) is the request it answers, which is
    /// settled with it.
    Answer {
        /// The request answered, or 0.
        seq: u64,
        /// The inbox it goes to.
        inbox: Bytes,
        /// The reply envelope's MessagePack.
        envelope: Bytes,
    },
    /// Worker to client: request `seq` is done with.
    Ack {
        /// The request.
        seq: u64,
    },
    /// Worker to client: send request `seq` again, to any worker; `counted` says whether this delivery counts.
    Requeue {
        /// The request.
        seq: u64,
        /// Whether it was delivered (a requeue) or handed back unprocessed (a release).
        counted: bool,
    },
    /// Worker to client: replace request `seq` with `envelope` (its next attempt) and send that to `queue`.
    Republish {
        /// The request replaced.
        seq: u64,
        /// Where the new attempt goes.
        queue: Bytes,
        /// The new attempt's envelope.
        envelope: Bytes,
    },
    /// Worker to client: nobody serves the queue of request `seq` here; send it elsewhere.
    Refused {
        /// The request.
        seq: u64,
    },
    /// Worker to client: the worker's heartbeat.
    Pong,
}

/// A name frame as text: names are checked to be UTF-8 as they are parsed.
pub fn text(name: &Bytes) -> &str {
    std::str::from_utf8(name).unwrap_or_default()
}

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Hello { node, .. } => write!(f, "Hello({node})"),
            Command::Request { seq, queue, .. } => write!(f, "Request({seq}, {})", text(queue)),
            Command::Ping => f.write_str("Ping"),
            Command::Sync { topic } => write!(f, "Sync({})", text(topic)),
            Command::Seen { version } => write!(f, "Seen({version})"),
            Command::Ready { node, version, queues, .. } => write!(f, "Ready({node}, {version}, {queues:?})"),
            Command::Answer { seq, inbox, .. } => write!(f, "Answer({seq}, {})", text(inbox)),
            Command::Ack { seq } => write!(f, "Ack({seq})"),
            Command::Requeue { seq, counted } => write!(f, "Requeue({seq}, {counted})"),
            Command::Republish { seq, queue, .. } => write!(f, "Republish({seq}, {})", text(queue)),
            Command::Refused { seq } => write!(f, "Refused({seq})"),
            Command::Pong => f.write_str("Pong"),
        }
    }
}

/// Why a message was not one of the protocol's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireError(pub &'static str);

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for WireError {}

/// Reads the fixed fields after a command byte.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let (head, rest) = self.0.split_first_chunk::<N>().ok_or(WireError("the command frame is too short"))?;
        self.0 = rest;
        Ok(*head)
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        self.take::<8>().map(u64::from_be_bytes)
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        self.take::<4>().map(u32::from_be_bytes)
    }

    fn node(&mut self) -> Result<Uuid, WireError> {
        self.take::<16>().map(Uuid::from_bytes)
    }

    fn end(self) -> Result<(), WireError> {
        if self.0.is_empty() { Ok(()) } else { Err(WireError("the command frame is too long")) }
    }
}

impl Command {
    /// Reads the frames of one message (a ROUTER's leading identity frame already taken off). Nothing is
    /// allocated for a message that is refused; an envelope longer than `limits.max_frame` is refused here.
    ///
    /// # Errors
    /// [`WireError`], saying what is wrong.
    pub fn parse(frames: &[Bytes], limits: &Limits) -> Result<Command, WireError> {
        if frames.len() > MAX_FRAMES {
            return Err(WireError("too many frames"));
        }
        let [protocol, command, rest @ ..] = frames else { return Err(WireError("fewer than two frames")) };
        if protocol.as_ref() != PROTOCOL {
            return Err(WireError("not the MQRPC-ZMQ/1 protocol"));
        }
        let Some((&code, fields)) = command.split_first() else { return Err(WireError("an empty command frame")) };
        let mut fields = Fields(fields);
        let envelope = |frame: &Bytes| -> Result<Bytes, WireError> {
            if frame.len() > limits.max_frame {
                Err(WireError("the envelope is over the size limit"))
            } else {
                Ok(frame.clone())
            }
        };
        let command = match (code, rest) {
            (code::HELLO, [publishes]) => Command::Hello { node: fields.node()?, publishes: name(publishes)? },
            (code::REQUEST, [queue, body]) => Command::Request {
                seq: fields.u64()?,
                delivery_count: fields.u32()?,
                queued_ms: fields.u64()?,
                queue: nonempty(queue)?,
                envelope: envelope(body)?,
            },
            (code::PING, []) => Command::Ping,
            (code::SYNC, [topic]) => Command::Sync { topic: nonempty(topic)? },
            (code::SEEN, []) => Command::Seen { version: fields.u64()? },
            (code::READY, [publishes, queues]) => Command::Ready {
                node: fields.node()?,
                version: fields.u64()?,
                publishes: name(publishes)?,
                queues: queue_map(queues)?,
            },
            (code::ANSWER, [inbox, body]) => {
                Command::Answer { seq: fields.u64()?, inbox: nonempty(inbox)?, envelope: envelope(body)? }
            }
            (code::ACK, []) => Command::Ack { seq: fields.u64()? },
            (code::REQUEUE, []) => {
                let seq = fields.u64()?;
                match fields.take::<1>()? {
                    [0] => Command::Requeue { seq, counted: false },
                    [1] => Command::Requeue { seq, counted: true },
                    _ => return Err(WireError("the requeue flag is not 0 or 1")),
                }
            }
            (code::REPUBLISH, [queue, body]) => {
                Command::Republish { seq: fields.u64()?, queue: nonempty(queue)?, envelope: envelope(body)? }
            }
            (code::REFUSED, []) => Command::Refused { seq: fields.u64()? },
            (code::PONG, []) => Command::Pong,
            (
                code::HELLO
                | code::REQUEST
                | code::PING
                | code::SYNC
                | code::SEEN
                | code::READY
                | code::ANSWER
                | code::ACK
                | code::REQUEUE
                | code::REPUBLISH
                | code::REFUSED
                | code::PONG,
                _,
            ) => return Err(WireError("wrong number of frames for the command")),
            _ => return Err(WireError("unknown command")),
        };
        fields.end()?;
        Ok(command)
    }

    /// The frames of this command, [`PROTOCOL`] first.
    pub fn frames(&self) -> Vec<Bytes> {
        let mut frames = Vec::with_capacity(4);
        self.frames_into(&mut frames);
        frames
    }

    /// Appends the frames of this command, [`PROTOCOL`] first, to `frames` (after a ROUTER's identity frame).
    pub fn frames_into(&self, frames: &mut Vec<Bytes>) {
        frames.push(Bytes::from_static(PROTOCOL));
        let mut head = BytesMut::with_capacity(32);
        match self {
            Command::Hello { node, publishes } => {
                head.put_u8(code::HELLO);
                head.put_slice(node.as_bytes());
                frames.extend([head.freeze(), publishes.clone()]);
            }
            Command::Request { seq, delivery_count, queued_ms, queue, envelope } => {
                head.put_u8(code::REQUEST);
                head.put_u64(*seq);
                head.put_u32(*delivery_count);
                head.put_u64(*queued_ms);
                frames.extend([head.freeze(), queue.clone(), envelope.clone()]);
            }
            Command::Ping => frames.push(Bytes::from_static(&[code::PING])),
            Command::Sync { topic } => frames.extend([Bytes::from_static(&[code::SYNC]), topic.clone()]),
            Command::Seen { version } => {
                head.put_u8(code::SEEN);
                head.put_u64(*version);
                frames.push(head.freeze());
            }
            Command::Ready { node, version, publishes, queues } => {
                head.put_u8(code::READY);
                head.put_slice(node.as_bytes());
                head.put_u64(*version);
                // A map of strings to integers always encodes.
                let queues = rpc_core::codec::encode(queues).unwrap_or_default();
                frames.extend([head.freeze(), publishes.clone(), queues]);
            }
            Command::Answer { seq, inbox, envelope } => {
                head.put_u8(code::ANSWER);
                head.put_u64(*seq);
                frames.extend([head.freeze(), inbox.clone(), envelope.clone()]);
            }
            Command::Ack { seq } => {
                head.put_u8(code::ACK);
                head.put_u64(*seq);
                frames.push(head.freeze());
            }
            Command::Requeue { seq, counted } => {
                head.put_u8(code::REQUEUE);
                head.put_u64(*seq);
                head.put_u8(u8::from(*counted));
                frames.push(head.freeze());
            }
            Command::Republish { seq, queue, envelope } => {
                head.put_u8(code::REPUBLISH);
                head.put_u64(*seq);
                frames.extend([head.freeze(), queue.clone(), envelope.clone()]);
            }
            Command::Refused { seq } => {
                head.put_u8(code::REFUSED);
                head.put_u64(*seq);
                frames.push(head.freeze());
            }
            Command::Pong => frames.push(Bytes::from_static(&[code::PONG])),
        }
    }
}

/// A broadcast on a PUB socket: `[topic, PROTOCOL, 0x21, envelope]`. Subscribers filter on the first frame.
pub fn broadcast(topic: &str, envelope: Bytes) -> Vec<Bytes> {
    vec![
        Bytes::copy_from_slice(topic.as_bytes()),
        Bytes::from_static(PROTOCOL),
        Bytes::from_static(&[code::BROADCAST]),
        envelope,
    ]
}

/// The sync marker on a PUB socket: `[topic, PROTOCOL, 0x22]`.
pub fn synced(topic: &str) -> Vec<Bytes> {
    vec![Bytes::copy_from_slice(topic.as_bytes()), Bytes::from_static(PROTOCOL), Bytes::from_static(&[code::SYNCED])]
}

/// What a SUB socket received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Published {
    /// A broadcast's envelope on `topic`.
    Broadcast {
        /// The topic.
        topic: Bytes,
        /// The envelope's MessagePack.
        envelope: Bytes,
    },
    /// A sync marker.
    Synced {
        /// The marker's topic.
        topic: Bytes,
    },
}

impl Published {
    /// Reads what a SUB socket received.
    ///
    /// # Errors
    /// [`WireError`], saying what is wrong.
    pub fn parse(frames: &[Bytes], limits: &Limits) -> Result<Published, WireError> {
        match frames {
            [topic, protocol, command, envelope] if protocol.as_ref() == PROTOCOL => {
                if command.as_ref() != [code::BROADCAST] {
                    return Err(WireError("not a broadcast"));
                }
                if envelope.len() > limits.max_frame {
                    return Err(WireError("the envelope is over the size limit"));
                }
                Ok(Published::Broadcast { topic: topic.clone(), envelope: envelope.clone() })
            }
            [topic, protocol, command] if protocol.as_ref() == PROTOCOL && command.as_ref() == [code::SYNCED] => {
                Ok(Published::Synced { topic: topic.clone() })
            }
            _ => Err(WireError("not a broadcast of the MQRPC-ZMQ/1 protocol")),
        }
    }
}

fn name(frame: &Bytes) -> Result<Bytes, WireError> {
    if frame.len() > MAX_NAME {
        return Err(WireError("a name is too long"));
    }
    std::str::from_utf8(frame).map_err(|_| WireError("a name is not UTF-8"))?;
    Ok(frame.clone())
}

fn nonempty(frame: &Bytes) -> Result<Bytes, WireError> {
    if frame.is_empty() { Err(WireError("an empty name")) } else { name(frame) }
}

fn queue_map(frame: &Bytes) -> Result<BTreeMap<String, u32>, WireError> {
    // Each entry takes at least two bytes: a bound on what the map can hold, before it is decoded.
    let limits = Limits { max_frame: MAX_QUEUES * (MAX_NAME + 8), max_depth: 2 };
    let queues: BTreeMap<String, u32> = rpc_core::codec::decode(frame, &limits)
        .map_err(|_| WireError("the queue map is not a map of names to counts"))?;
    if queues.len() > MAX_QUEUES || queues.keys().any(|queue| queue.is_empty() || queue.len() > MAX_NAME) {
        return Err(WireError("the queue map is too large or names an empty queue"));
    }
    Ok(queues)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn every_command() -> Vec<Command> {
        let node = Uuid::new_v4();
        let envelope = Bytes::from_static(b"\x80");
        vec![
            Command::Hello { node, publishes: Bytes::from_static(b"tcp://127.0.0.1:5556") },
            Command::Request {
                seq: 7,
                delivery_count: 2,
                queued_ms: 15,
                queue: Bytes::from_static(b"ns.Calculator"),
                envelope: envelope.clone(),
            },
            Command::Ping,
            Command::Sync { topic: Bytes::from_static(b"mqrpc.sync/x") },
            Command::Seen { version: 3 },
            Command::Ready {
                node,
                version: 9,
                publishes: Bytes::new(),
                queues: BTreeMap::from([("ns.Calculator".into(), 64)]),
            },
            Command::Answer { seq: 0, inbox: Bytes::from_static(b"zmq.inbox"), envelope: envelope.clone() },
            Command::Ack { seq: u64::MAX },
            Command::Requeue { seq: 1, counted: true },
            Command::Requeue { seq: 1, counted: false },
            Command::Republish { seq: 5, queue: Bytes::from_static(b"q"), envelope },
            Command::Refused { seq: 4 },
            Command::Pong,
        ]
    }

    #[test]
    fn every_command_reads_back_as_written() {
        for command in every_command() {
            assert_eq!(Command::parse(&command.frames(), &Limits::default()), Ok(command.clone()), "{command:?}");
        }
    }

    #[test]
    fn a_request_is_laid_out_as_documented() {
        let request = Command::Request {
            seq: 1,
            delivery_count: 2,
            queued_ms: 3,
            queue: Bytes::from_static(b"q"),
            envelope: Bytes::from_static(b"\x80"),
        };
        let frames = request.frames();
        assert_eq!(frames.len(), 4);
        assert_eq!(frames[0].as_ref(), b"MQRPC-ZMQ/1");
        assert_eq!(frames[1].as_ref(), b"\x02\0\0\0\0\0\0\0\x01\0\0\0\x02\0\0\0\0\0\0\0\x03");
        assert_eq!((frames[2].as_ref(), frames[3].as_ref()), (&b"q"[..], &b"\x80"[..]));
    }

    #[test]
    fn a_malformed_message_is_refused_with_its_reason() {
        let limits = Limits::default();
        let refused = |frames: &[Bytes]| Command::parse(frames, &limits).map_err(|WireError(why)| why);
        let protocol = Bytes::from_static(PROTOCOL);
        let ping = Command::Ping.frames();
        assert_eq!(refused(&ping[..1]), Err("fewer than two frames"));
        assert_eq!(refused(&[Bytes::from_static(b"MDPC02"), ping[1].clone()]), Err("not the MQRPC-ZMQ/1 protocol"));
        assert_eq!(refused(&[protocol.clone(), Bytes::new()]), Err("an empty command frame"));
        assert_eq!(refused(&[protocol.clone(), Bytes::from_static(b"\x03\x03")]), Err("the command frame is too long"));
        assert_eq!(refused(&[protocol.clone(), Bytes::from_static(b"\x7f")]), Err("unknown command"));
        let mut extra = ping.clone();
        extra.push(Bytes::new());
        assert_eq!(refused(&extra), Err("wrong number of frames for the command"));
        assert_eq!(refused(&vec![Bytes::new(); MAX_FRAMES + 1]), Err("too many frames"));
        assert_eq!(
            refused(&[protocol.clone(), Bytes::from_static(b"\x13\x01")]),
            Err("the command frame is too short")
        );
        assert_eq!(
            refused(&[protocol.clone(), Bytes::from_static(b"\x14\0\0\0\0\0\0\0\x01\x02")]),
            Err("the requeue flag is not 0 or 1")
        );
        let request = Command::Request {
            seq: 1,
            delivery_count: 1,
            queued_ms: 0,
            queue: Bytes::from_static(b"q"),
            envelope: Bytes::from(vec![0u8; 100]),
        };
        let small = Limits { max_frame: 99, max_depth: 64 };
        assert_eq!(Command::parse(&request.frames(), &small), Err(WireError("the envelope is over the size limit")));
        let mut unnamed = request.frames();
        unnamed[2] = Bytes::new();
        assert_eq!(refused(&unnamed), Err("an empty name"));
        unnamed[2] = Bytes::from_static(b"\xff\xfe");
        assert_eq!(refused(&unnamed), Err("a name is not UTF-8"));
    }

    #[test]
    fn broadcasts_and_sync_markers_read_back() {
        let limits = Limits::default();
        let sent = broadcast("ns.events", Bytes::from_static(b"\x80"));
        assert_eq!(
            Published::parse(&sent, &limits),
            Ok(Published::Broadcast { topic: Bytes::from_static(b"ns.events"), envelope: Bytes::from_static(b"\x80") })
        );
        assert_eq!(
            Published::parse(&synced("mqrpc.sync/a"), &limits),
            Ok(Published::Synced { topic: Bytes::from_static(b"mqrpc.sync/a") })
        );
        assert!(Published::parse(&sent[..2], &limits).is_err());
    }

    proptest! {
        #[test]
        fn any_frames_parse_or_are_refused(frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..10)) {
            let frames: Vec<Bytes> = frames.into_iter().map(Bytes::from).collect();
            let _ = Command::parse(&frames, &Limits::default());
            let _ = Published::parse(&frames, &Limits::default());
        }

        #[test]
        fn requests_round_trip(seq in any::<u64>(), count in any::<u32>(), queued in any::<u64>(), queue in "[a-z.]{1,30}", body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let command = Command::Request { seq, delivery_count: count, queued_ms: queued, queue: Bytes::from(queue), envelope: Bytes::from(body) };
            prop_assert_eq!(Command::parse(&command.frames(), &Limits::default()), Ok(command));
        }
    }
}
