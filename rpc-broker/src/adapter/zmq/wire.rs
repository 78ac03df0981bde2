//! The messages mqrpc nodes exchange over ZeroMQ: multipart messages whose first frame is [`PROTOCOL`] and
//! whose second is one command byte (docs/wire-format.md, "ZeroMQ"). [`Command::parse`] reads what a peer sent:
//! untrusted input, so the frame count and every frame's size are checked before anything is decoded, and the
//! envelope itself is read by rpc-core's size- and depth-checked codec afterwards.

use std::collections::BTreeMap;
use std::fmt;

use bytes::Bytes;
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

/// One message of the protocol, parsed. Frames that carry an envelope keep it as the bytes that came (decoded
/// later, by the codec, with its limits).
#[derive(Clone, PartialEq, Eq)]
pub enum Command {
    /// Client to worker, first on a connection: who the client is and where it publishes (empty: nowhere).
    Hello {
        /// The client's node id.
        node: Uuid,
        /// The client's PUB endpoint, or empty.
        publishes: String,
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
        queue: String,
        /// The envelope's MessagePack.
        envelope: Bytes,
    },
    /// Either way: a heartbeat. A client sends PING, a worker PONG.
    Ping,
    /// Client to worker: publish the sync marker `topic` on your PUB socket (see [`Command::Synced`]).
    Sync {
        /// The marker's topic.
        topic: String,
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
        /// The worker's PUB endpoint, or empty.
        publishes: String,
        /// Increases with every announcement; the client answers SEEN with it.
        version: u64,
        /// Each queue served and how many of its requests this client may have outstanding here at once.
        queues: BTreeMap<String, u32>,
    },
    /// Worker to client: a reply for the client's `inbox`; `seq` (when not 0) is the request it answers, which is
    /// settled with it.
    Answer {
        /// The request answered, or 0.
        seq: u64,
        /// The inbox it goes to.
        inbox: String,
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
        queue: String,
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

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Hello { node, .. } => write!(f, "Hello({node})"),
            Command::Request { seq, queue, .. } => write!(f, "Request({seq}, {queue})"),
            Command::Ping => f.write_str("Ping"),
            Command::Sync { topic } => write!(f, "Sync({topic})"),
            Command::Seen { version } => write!(f, "Seen({version})"),
            Command::Ready { node, version, queues, .. } => write!(f, "Ready({node}, {version}, {queues:?})"),
            Command::Answer { seq, inbox, .. } => write!(f, "Answer({seq}, {inbox})"),
            Command::Ack { seq } => write!(f, "Ack({seq})"),
            Command::Requeue { seq, counted } => write!(f, "Requeue({seq}, {counted})"),
            Command::Republish { seq, queue, .. } => write!(f, "Republish({seq}, {queue})"),
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
        let &[code] = command.as_ref() else { return Err(WireError("the command frame is not one byte")) };
        let envelope = |frame: &Bytes| -> Result<Bytes, WireError> {
            if frame.len() > limits.max_frame {
                Err(WireError("the envelope is over the size limit"))
            } else {
                Ok(frame.clone())
            }
        };
        match (code, rest) {
            (code::HELLO, [node, publishes]) => Ok(Command::Hello { node: uuid(node)?, publishes: name(publishes)? }),
            (code::REQUEST, [seq, count, queued, queue, body]) => Ok(Command::Request {
                seq: u64_of(seq)?,
                delivery_count: u32_of(count)?,
                queued_ms: u64_of(queued)?,
                queue: nonempty(queue)?,
                envelope: envelope(body)?,
            }),
            (code::PING, []) => Ok(Command::Ping),
            (code::SYNC, [topic]) => Ok(Command::Sync { topic: nonempty(topic)? }),
            (code::SEEN, [version]) => Ok(Command::Seen { version: u64_of(version)? }),
            (code::READY, [node, publishes, version, queues]) => Ok(Command::Ready {
                node: uuid(node)?,
                publishes: name(publishes)?,
                version: u64_of(version)?,
                queues: queue_map(queues)?,
            }),
            (code::ANSWER, [seq, inbox, body]) => {
                Ok(Command::Answer { seq: u64_of(seq)?, inbox: nonempty(inbox)?, envelope: envelope(body)? })
            }
            (code::ACK, [seq]) => Ok(Command::Ack { seq: u64_of(seq)? }),
            (code::REQUEUE, [seq, counted]) => match counted.as_ref() {
                [0] => Ok(Command::Requeue { seq: u64_of(seq)?, counted: false }),
                [1] => Ok(Command::Requeue { seq: u64_of(seq)?, counted: true }),
                _ => Err(WireError("the requeue flag is not 0 or 1")),
            },
            (code::REPUBLISH, [seq, queue, body]) => {
                Ok(Command::Republish { seq: u64_of(seq)?, queue: nonempty(queue)?, envelope: envelope(body)? })
            }
            (code::REFUSED, [seq]) => Ok(Command::Refused { seq: u64_of(seq)? }),
            (code::PONG, []) => Ok(Command::Pong),
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
            ) => Err(WireError("wrong number of frames for the command")),
            _ => Err(WireError("unknown command")),
        }
    }

    /// The frames of this command, [`PROTOCOL`] first.
    pub fn frames(&self) -> Vec<Bytes> {
        let mut frames = vec![Bytes::from_static(PROTOCOL)];
        let byte = |code: u8| Bytes::copy_from_slice(&[code]);
        let text = |text: &str| Bytes::copy_from_slice(text.as_bytes());
        let number = |n: u64| Bytes::copy_from_slice(&n.to_be_bytes());
        match self {
            Command::Hello { node, publishes } => {
                frames.extend([byte(code::HELLO), Bytes::copy_from_slice(node.as_bytes()), text(publishes)]);
            }
            Command::Request { seq, delivery_count, queued_ms, queue, envelope } => frames.extend([
                byte(code::REQUEST),
                number(*seq),
                Bytes::copy_from_slice(&delivery_count.to_be_bytes()),
                number(*queued_ms),
                text(queue),
                envelope.clone(),
            ]),
            Command::Ping => frames.push(byte(code::PING)),
            Command::Sync { topic } => frames.extend([byte(code::SYNC), text(topic)]),
            Command::Seen { version } => frames.extend([byte(code::SEEN), number(*version)]),
            Command::Ready { node, publishes, version, queues } => {
                // A map of strings to integers always encodes.
                let queues = rpc_core::codec::encode(queues).unwrap_or_default();
                frames.extend([
                    byte(code::READY),
                    Bytes::copy_from_slice(node.as_bytes()),
                    text(publishes),
                    number(*version),
                    queues,
                ]);
            }
            Command::Answer { seq, inbox, envelope } => {
                frames.extend([byte(code::ANSWER), number(*seq), text(inbox), envelope.clone()]);
            }
            Command::Ack { seq } => frames.extend([byte(code::ACK), number(*seq)]),
            Command::Requeue { seq, counted } => {
                frames.extend([byte(code::REQUEUE), number(*seq), byte(u8::from(*counted))]);
            }
            Command::Republish { seq, queue, envelope } => {
                frames.extend([byte(code::REPUBLISH), number(*seq), text(queue), envelope.clone()]);
            }
            Command::Refused { seq } => frames.extend([byte(code::REFUSED), number(*seq)]),
            Command::Pong => frames.push(byte(code::PONG)),
        }
        frames
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

fn u64_of(frame: &Bytes) -> Result<u64, WireError> {
    <[u8; 8]>::try_from(frame.as_ref()).map(u64::from_be_bytes).map_err(|_| WireError("a number frame is not 8 bytes"))
}

fn u32_of(frame: &Bytes) -> Result<u32, WireError> {
    <[u8; 4]>::try_from(frame.as_ref()).map(u32::from_be_bytes).map_err(|_| WireError("a count frame is not 4 bytes"))
}

fn uuid(frame: &Bytes) -> Result<Uuid, WireError> {
    Uuid::from_slice(frame).map_err(|_| WireError("a node id is not 16 bytes"))
}

fn name(frame: &Bytes) -> Result<String, WireError> {
    if frame.len() > MAX_NAME {
        return Err(WireError("a name is too long"));
    }
    std::str::from_utf8(frame).map(str::to_owned).map_err(|_| WireError("a name is not UTF-8"))
}

fn nonempty(frame: &Bytes) -> Result<String, WireError> {
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
        vec![
            Command::Hello { node, publishes: "tcp://127.0.0.1:5556".into() },
            Command::Request {
                seq: 7,
                delivery_count: 2,
                queued_ms: 15,
                queue: "ns.Calculator".into(),
                envelope: Bytes::from_static(b"\x80"),
            },
            Command::Ping,
            Command::Sync { topic: "mqrpc.sync/x".into() },
            Command::Seen { version: 3 },
            Command::Ready {
                node,
                publishes: String::new(),
                version: 9,
                queues: BTreeMap::from([("ns.Calculator".into(), 64)]),
            },
            Command::Answer { seq: 0, inbox: "zmq.inbox".into(), envelope: Bytes::from_static(b"\x80") },
            Command::Ack { seq: u64::MAX },
            Command::Requeue { seq: 1, counted: true },
            Command::Requeue { seq: 1, counted: false },
            Command::Republish { seq: 5, queue: "q".into(), envelope: Bytes::from_static(b"\x80") },
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
    fn a_malformed_message_is_refused_with_its_reason() {
        let limits = Limits::default();
        let ping = Command::Ping.frames();
        let refused = |frames: &[Bytes]| Command::parse(frames, &limits).map_err(|WireError(why)| why);
        assert_eq!(refused(&ping[..1]), Err("fewer than two frames"));
        assert_eq!(refused(&[Bytes::from_static(b"MDPC02"), ping[1].clone()]), Err("not the MQRPC-ZMQ/1 protocol"));
        assert_eq!(
            refused(&[ping[0].clone(), Bytes::from_static(b"\x03\x03")]),
            Err("the command frame is not one byte")
        );
        assert_eq!(refused(&[ping[0].clone(), Bytes::from_static(b"\x7f")]), Err("unknown command"));
        let mut extra = ping.clone();
        extra.push(Bytes::new());
        assert_eq!(refused(&extra), Err("wrong number of frames for the command"));
        assert_eq!(refused(&vec![Bytes::new(); MAX_FRAMES + 1]), Err("too many frames"));
        let mut short_seq = Command::Ack { seq: 1 }.frames();
        short_seq[2] = Bytes::from_static(b"\x01");
        assert_eq!(refused(&short_seq), Err("a number frame is not 8 bytes"));
        let request = Command::Request {
            seq: 1,
            delivery_count: 1,
            queued_ms: 0,
            queue: "q".into(),
            envelope: Bytes::from(vec![0u8; 100]),
        };
        let small = Limits { max_frame: 99, max_depth: 64 };
        assert_eq!(Command::parse(&request.frames(), &small), Err(WireError("the envelope is over the size limit")));
        let mut unnamed = request.frames();
        unnamed[5] = Bytes::new();
        assert_eq!(refused(&unnamed), Err("an empty name"));
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
            let command = Command::Request { seq, delivery_count: count, queued_ms: queued, queue, envelope: Bytes::from(body) };
            prop_assert_eq!(Command::parse(&command.frames(), &Limits::default()), Ok(command));
        }
    }
}
