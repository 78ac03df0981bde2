#!/usr/bin/env python3
"""A Python worker for the suite's `suite.Probe` service, for the Rust client to call (run.py's second phase).

Written from the documents only — docs/wire-format.md, docs/protocol.md, docs/adapters.md, docs/conformance.md and
the module docs of rpc-broker/src/adapter/{amqp,nats,kafka,stomp,zmq}.rs — the way a developer in another language would
write a worker.

    worker.py TRANSPORT URL NAMESPACE

TRANSPORT is `broker` (our broker over raw TCP), `rabbitmq` (pika), `nats` (core NATS, nats-py), `jetstream`
(nats-py; the stream names start with MQRPC_PROBE_STREAM_PREFIX, default `MQRPC`), `kafka` (kafka-python; URL
`kafka://host:port` or `host:port`), `activemq` (stomp.py; URL `stomp://[login:passcode@]host:port`) or `zeromq`
(pyzmq; it binds a ROUTER socket where the URL `zmq-worker://host:port` says). The worker consumes the
service queue `NAMESPACE.suite.Probe`, prints `ready` once consuming and serves until SIGTERM, then prints
`stopped handled=N` and exits 0.

It serves `add(a, b) -> i64`, `div(a, b) -> Result<i64, MathError>` (status 1 with `"DivideByZero"` or
`{"NotExact": {"remainder": r}}`), `record(n)` (oneway, counted) and `count(n) -> u64` (how many times `count`
was called for `n`); any other method is status 2, arguments that do not decode status 3, a request whose
deadline has run out status 4 (not run).
"""

import asyncio
import signal
import struct
import sys
import threading
import time
import uuid

import msgpack

SERVICE = "suite.Probe"

OK, APPLICATION, UNKNOWN_METHOD, INVALID_ARGUMENT, DEADLINE_EXCEEDED, INVALID_REQUEST = 0, 1, 2, 3, 4, 8
REQUEST, REPLY, ONEWAY = 0, 1, 2
KIND_NAMES = {"request": REQUEST, "reply": REPLY, "oneway": ONEWAY}
I64 = (-(2 ** 63), 2 ** 63 - 1)


def now_ms():
    return int(time.time() * 1000)


def pack(value):
    return msgpack.packb(value, use_bin_type=True)


def unpack(data):
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def log(*parts):
    print("worker.py:", *parts, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------
# The service: transport-independent
# --------------------------------------------------------------------------------------------------------------

class BadArguments(Exception):
    pass


def arguments(body, names):
    """The parameters from a body: a map from name to value, or an array of the values in parameter order."""
    try:
        value = unpack(body)
    except Exception as error:  # noqa: BLE001 - not MessagePack
        raise BadArguments(f"the arguments are not MessagePack: {error}")
    if isinstance(value, dict):
        missing = [name for name in names if name not in value]
        if missing:
            raise BadArguments(f"missing parameter {missing[0]!r}")
        values = [value[name] for name in names]
    elif isinstance(value, (list, tuple)):
        if len(value) != len(names):
            raise BadArguments(f"{len(value)} arguments for {len(names)} parameters")
        values = list(value)
    else:
        raise BadArguments(f"the arguments are a {type(value).__name__}, not a map")
    for name, item in zip(names, values):
        if isinstance(item, bool) or not isinstance(item, int) or not I64[0] <= item <= I64[1]:
            raise BadArguments(f"parameter {name!r}: {item!r} is not an i64")
    return values


class Probe:
    """The methods, with what they saw."""

    def __init__(self):
        self.counts = {}
        self.recorded = []
        self.handled = 0

    def add(self, a, b):
        return OK, a + b

    def div(self, a, b):
        if b == 0:
            return APPLICATION, "DivideByZero"
        # Rust's `%` and `/` truncate towards zero.
        remainder = abs(a) % abs(b) * (1 if a >= 0 else -1)
        if remainder != 0:
            return APPLICATION, {"NotExact": {"remainder": remainder}}
        quotient = abs(a) // abs(b) * (1 if (a >= 0) == (b >= 0) else -1)
        return OK, quotient

    def record(self, n):
        self.recorded.append(n)
        return OK, None

    def count(self, n):
        self.counts[n] = self.counts.get(n, 0) + 1
        return OK, self.counts[n]

    METHODS = {"add": ("a", "b"), "div": ("a", "b"), "record": ("n",), "count": ("n",)}

    def handle(self, method, body, remaining_ms):
        """Runs one call: (status, status message or None, reply body bytes)."""
        self.handled += 1
        if method not in self.METHODS:
            return UNKNOWN_METHOD, f"no method {method!r} on {SERVICE}", b""
        if remaining_ms is not None and remaining_ms <= 0:
            return DEADLINE_EXCEEDED, "the deadline passed before the call ran", b""
        try:
            values = arguments(body, self.METHODS[method])
        except BadArguments as error:
            return INVALID_ARGUMENT, str(error), b""
        status, value = getattr(self, method)(*values)
        return status, ("application error" if status == APPLICATION else None), pack(value)


def remaining(deadline_ms, queued_ms):
    """The budget left: `d` minus the time queued (None: no deadline)."""
    if deadline_ms is None:
        return None
    return int(deadline_ms) - max(0, queued_ms)


def reply_envelope(request, status, message, body):
    """The reply to a request envelope (wire-format.md), in its request's version: its correlation id echoed,
    and in version 1 its id and its service and method too (the compact version 2 leaves them out where it has
    a correlation id)."""
    version = 2 if request.get("v") == 2 else 1
    env = {"v": version, "k": REPLY}
    if version == 1 or not isinstance(request.get("c"), bytes):
        env["i"] = uuid.uuid4().bytes
    if "c" in request:
        env["c"] = request["c"]
    for key in ("s", "m") if version == 1 else ():
        if isinstance(request.get(key), str):
            env[key] = request[key]
    if status:
        env["st"] = status
        env["sm"] = message or ""
    if isinstance(request.get("h"), dict):
        env["h"] = request["h"]
    env["b"] = body
    return env


def read_envelope(payload):
    """An envelope map of version 1 or 2 (the compact form, its left-out fields put back), or an error message."""
    try:
        env = unpack(payload)
    except Exception as error:  # noqa: BLE001
        return None, f"not MessagePack: {error}"
    if not isinstance(env, dict):
        return None, "not an envelope map"
    if env.get("v") not in (1, 2):
        return env, f"envelope version {env.get('v')!r} is not supported; this worker reads versions 1 and 2"
    if env.get("v") == 2 and env.get("k") == REQUEST and isinstance(env.get("c"), bytes):
        # A request's id and idempotency key are its correlation id where it leaves them out.
        env.setdefault("i", env["c"])
        env.setdefault("ik", uuid.UUID(bytes=env["c"]).hex)
    if env.get("k") not in (REQUEST, ONEWAY) or not isinstance(env.get("m"), str) or not isinstance(env.get("b"), bytes):
        return env, "not a request envelope"
    return env, None


def error_reply(env, message):
    """Status 8 to a message that is not a request this worker handles, where it says where to reply."""
    if isinstance(env, dict) and isinstance(env.get("r"), str):
        return env["r"], pack(reply_envelope(env, INVALID_REQUEST, message, b""))
    return None, None


# --------------------------------------------------------------------------------------------------------------
# Our broker (docs/protocol.md, version 7)
# --------------------------------------------------------------------------------------------------------------

def s16(text):
    data = text.encode()
    return struct.pack(">H", len(data)) + data


def opt(value):
    return struct.pack(">Q", 0xFFFFFFFFFFFFFFFF if value is None else value)


def frame(kind, body):
    return struct.pack(">IB", len(body) + 1, kind) + body


ABSENT = 0xFFFFFFFFFFFFFFFF
ACK, REQUEUE, DEAD_LETTER = 0, 1, 2


class BrokerWorker:
    def __init__(self, url, namespace, probe):
        self.url = url
        self.queue = f"{namespace}.{SERVICE}"
        self.probe = probe
        self.next_req = 1
        self.pending = {}
        self.consumer = None

    async def request(self, kind, body, timeout=10):
        req = self.next_req
        self.next_req += 1
        future = asyncio.get_running_loop().create_future()
        self.pending[req] = future
        self.writer.write(frame(kind, struct.pack(">I", req) + body))
        return await asyncio.wait_for(future, timeout)

    async def read_frame(self):
        (length,) = struct.unpack(">I", await self.reader.readexactly(4))
        data = await self.reader.readexactly(length)
        return data[0], data[1:]

    async def start(self):
        address = self.url.split("://", 1)[1].split("/", 1)[0]
        host, port = address.rsplit(":", 1)
        self.reader, self.writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 10)
        self.writer.write(frame(0x01, struct.pack(">H", 7) + s16("") + s16("interop-python-worker")))
        kind, body = await asyncio.wait_for(self.read_frame(), 10)
        if kind != 0x81:
            raise RuntimeError(f"expected Welcome, got frame {kind:#x}: {body!r}")
        version, self.heartbeat_ms, self.max_frame = struct.unpack(">HII", body[:10])
        if version != 7:
            raise RuntimeError(f"Welcome of version {version}")
        self.tasks = [asyncio.create_task(self.read_loop()), asyncio.create_task(self.ping_loop())]
        # Declare: max_len absent, no delivery limit, not durable (the defaults); then Consume, prefetch 64.
        await self.request(0x02, s16(self.queue) + opt(None) + struct.pack(">IB", 0, 0))
        ok = await self.request(0x05, s16(self.queue) + struct.pack(">IB", 64, 0))
        (self.consumer,) = struct.unpack(">Q", ok[:8])

    async def stop(self):
        if self.consumer is not None:
            await self.request(0x08, struct.pack(">Q", self.consumer))
        await self.request(0x0E, b"")  # Sync: every settle and answer before it was handled
        for task in self.tasks:
            task.cancel()
        self.writer.close()

    async def ping_loop(self):
        while True:
            await asyncio.sleep(self.heartbeat_ms / 1000 / 2)
            self.writer.write(frame(0x0D, b""))

    async def read_loop(self):
        try:
            while True:
                kind, body = await self.read_frame()
                if kind == 0x82:  # Ok
                    (req,) = struct.unpack(">I", body[:4])
                    future = self.pending.pop(req, None)
                    if future and not future.done():
                        future.set_result(body[4:])
                elif kind == 0x83:  # Error
                    req, code, length = struct.unpack(">IBH", body[:7])
                    message = body[7:7 + length].decode(errors="replace")
                    future = self.pending.pop(req, None)
                    if future and not future.done():
                        future.set_exception(RuntimeError(f"broker error {code}: {message}"))
                    else:
                        log(f"broker error {code} (req {req}): {message}")
                elif kind == 0x84:  # Deliver
                    consumer, tag, _count, ttl = struct.unpack(">QQIQ", body[:28])
                    self.deliver(consumer, tag, None if ttl == ABSENT else ttl, body[28:])
                elif kind == 0x86:  # Cancelled
                    log("the broker cancelled the consumer")
        except asyncio.IncompleteReadError:
            log("the broker closed the connection")
        except Exception as error:  # noqa: BLE001
            log(f"read loop: {error!r}")

    def settle(self, tag, outcome):
        self.writer.write(frame(0x07, struct.pack(">QQB", self.consumer, tag, outcome)))

    def answer(self, tag, reply_to, payload):
        self.writer.write(frame(0x11, struct.pack(">QQ", self.consumer, tag) + s16(reply_to) + opt(None) + payload))

    def deliver(self, consumer, tag, ttl, payload):
        env, error = read_envelope(payload)
        if error is not None:
            reply_to, reply = error_reply(env, error)
            if reply_to is not None:
                self.answer(tag, reply_to, reply)
            else:
                self.settle(tag, DEAD_LETTER)
            return
        # The broker hands the request out with the time queued taken off: its ttl_ms is what remains of the
        # budget the client set from `d`; without one, `d` as written.
        deadline = ttl if ttl is not None else env.get("d")
        status, message, body = self.probe.handle(env["m"], env["b"], remaining(deadline, 0))
        if env["k"] == REQUEST and isinstance(env.get("r"), str):
            self.answer(tag, env["r"], pack(reply_envelope(env, status, message, body)))
        else:
            self.settle(tag, ACK)


# --------------------------------------------------------------------------------------------------------------
# RabbitMQ through pika (module docs of rpc-broker/src/adapter/amqp.rs)
# --------------------------------------------------------------------------------------------------------------

def header_text(value):
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return None if value is None else str(value)


def header_int(value):
    text = header_text(value)
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


class AmqpWorker:
    """A blocking pika connection driven by a thread of its own."""

    def __init__(self, url, namespace, probe):
        self.url = url
        self.queue = f"{namespace}.{SERVICE}"
        self.probe = probe
        self.stopping = threading.Event()
        self.ready = threading.Event()
        self.failure = None

    def run(self):
        import pika
        self.pika = pika
        try:
            connection = pika.BlockingConnection(pika.URLParameters(self.url))
            channel = connection.channel()
            # The service queue as the module docs give it: durable, classic with `x-max-priority: 9`.
            channel.queue_declare(self.queue, durable=True, arguments={"x-max-priority": 9})
            channel.basic_qos(prefetch_count=64)
            channel.basic_consume(self.queue, self.on_message, auto_ack=False)
            self.channel = channel
            self.ready.set()
            while not self.stopping.is_set():
                connection.process_data_events(time_limit=0.2)
            channel.close()
            connection.close()
        except Exception as error:  # noqa: BLE001
            self.failure = error
            self.ready.set()

    def on_message(self, channel, method, properties, body):
        headers = properties.headers or {}
        reply_to = properties.reply_to
        kind = KIND_NAMES.get(header_text(headers.get("mqrpc-kind")), REQUEST if reply_to else ONEWAY)
        deadline = header_int(headers.get("mqrpc-deadline-ms"))
        if deadline is None and properties.expiration is not None:
            deadline = header_int(properties.expiration)
        sent_at = header_int(headers.get("mqrpc-sent-at-ms"))
        if sent_at is None and properties.timestamp:
            sent_at = int(properties.timestamp) * 1000
        queued = now_ms() - sent_at if sent_at is not None else 0
        if kind == REPLY:
            status, message, result = INVALID_REQUEST, "a reply is not a request", b""
        else:
            status, message, result = self.probe.handle(properties.type or "", body, remaining(deadline, queued))
        if kind != ONEWAY and reply_to:
            reply_headers = {"mqrpc-kind": "reply"}
            if status:
                reply_headers["mqrpc-status"] = status
                reply_headers["mqrpc-status-message"] = message or ""
            if header_text(headers.get("mqrpc-service")):
                reply_headers["mqrpc-service"] = header_text(headers.get("mqrpc-service"))
            reply = self.pika.BasicProperties(
                correlation_id=properties.correlation_id,
                type=properties.type,
                content_type="application/msgpack",
                message_id=str(uuid.uuid4()),
                headers=reply_headers,
            )
            channel.basic_publish("", reply_to, result, reply)
        channel.basic_ack(method.delivery_tag)


# --------------------------------------------------------------------------------------------------------------
# NATS through nats-py (module docs of rpc-broker/src/adapter/nats.rs): core mode and JetStream
# --------------------------------------------------------------------------------------------------------------

MARK = 0xC1


def is_mqrpc_inbox(subject):
    """A reply subject `<inbox>.mqrpc.<correlation id>`: the reply goes in the envelope form."""
    tokens = subject.split(".")
    return len(tokens) >= 3 and tokens[-2] == "mqrpc"


def framed(env):
    return bytes([MARK]) + struct.pack(">Q", now_ms()) + pack(env)


class NatsWorker:
    def __init__(self, url, namespace, probe, jetstream=False, stream_prefix="MQRPC"):
        self.url = url
        self.subject = f"{namespace}.{SERVICE}"
        self.probe = probe
        self.jetstream = jetstream
        self.stream_prefix = stream_prefix
        self.task = None

    async def start(self):
        import nats
        self.nc = await nats.connect(self.url, connect_timeout=10)
        if not self.jetstream:
            # A queue is a subject, its consumers a queue group of that name.
            self.sub = await self.nc.subscribe(self.subject, queue=self.subject, cb=self.on_core)
            await self.nc.flush()
            return
        from nats.js.api import StreamConfig, ConsumerConfig, RetentionPolicy, StorageType, AckPolicy
        from nats.js.errors import NotFoundError
        js = self.nc.jetstream()
        self.js = js
        # A work-queue stream (file storage) capturing the queue's subject, named as docs/conformance.md says
        # (the prefix, `_`, the queue with every byte but letters, digits and `-` as `_` and two hex digits), and
        # the durable consumer every worker of the queue shares, `mqrpc`: a Rust worker can serve beside this one.
        try:
            stream = await js.find_stream_name_by_subject(self.subject)
        except NotFoundError:
            escaped = "".join(c if c.isascii() and (c.isalnum() or c == "-") else f"_{ord(c):02X}" for c in self.subject)
            stream = f"{self.stream_prefix}_{escaped}"
            await js.add_stream(StreamConfig(name=stream, subjects=[self.subject], retention=RetentionPolicy.WORK_QUEUE,
                                             storage=StorageType.FILE))
        durable = "mqrpc"
        self.psub = await js.pull_subscribe(self.subject, durable=durable, stream=stream,
                                            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT))
        self.task = asyncio.create_task(self.pull_loop())

    async def stop(self):
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        try:
            if self.jetstream:
                await asyncio.wait_for(self.psub.unsubscribe(), 5)
            else:
                await asyncio.wait_for(self.sub.unsubscribe(), 5)
            await asyncio.wait_for(self.nc.flush(), 5)
        except Exception as error:  # noqa: BLE001
            log(f"unsubscribe: {error!r}")
        try:
            await asyncio.wait_for(self.nc.close(), 5)
        except Exception as error:  # noqa: BLE001
            log(f"close: {error!r}")

    async def pull_loop(self):
        import nats.errors
        while True:
            try:
                # One at a time: nats-py's fetch of a batch waits out its timeout for the batch to fill.
                messages = await self.psub.fetch(1, timeout=5)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                continue
            for msg in messages:
                try:
                    await self.on_jetstream(msg)
                except Exception as error:  # noqa: BLE001
                    log(f"jetstream message: {error!r}")

    async def on_core(self, msg):
        try:
            data = msg.data
            # The envelope form comes without headers; a message with `mqrpc-method` is read from its headers
            # (its body the arguments, even one that starts with 0xc1: status 3).
            if data[:1] == bytes([MARK]) and "mqrpc-method" not in (msg.headers or {}):
                await self.on_framed(msg)
            else:
                await self.on_headers(msg, msg.reply, msg.headers or {}, 0)
        except Exception as error:  # noqa: BLE001
            log(f"core message: {error!r}")

    async def on_framed(self, msg):
        """`0xc1`, the sending time (8 bytes, big-endian ms), the envelope; its `r` is the reply subject."""
        data = msg.data
        if len(data) < 9:
            env, error = None, "a framed envelope shorter than its sending time"
        else:
            (sent_at,) = struct.unpack(">Q", data[1:9])
            env, error = read_envelope(data[9:])
        if error is not None:
            if msg.reply:
                reply = {"c": env["c"]} if isinstance(env, dict) and "c" in env else {}
                await self.send_reply(msg.reply, reply_envelope(reply, INVALID_REQUEST, error, b""), None)
            return
        status, message, body = self.probe.handle(env["m"], env["b"], remaining(env.get("d"), now_ms() - sent_at))
        if env["k"] == REQUEST and msg.reply:
            await self.send_reply(msg.reply, reply_envelope(env, status, message, body), None)

    async def on_headers(self, msg, reply_to, headers, queued):
        method = headers.get("mqrpc-method", "")
        kind = KIND_NAMES.get(headers.get("mqrpc-kind"), REQUEST if reply_to else ONEWAY)
        deadline = header_int(headers.get("mqrpc-deadline-ms"))
        if not self.jetstream:
            sent_at = header_int(headers.get("mqrpc-sent-at-ms"))
            queued = now_ms() - sent_at if sent_at is not None else 0
        if kind == REPLY:
            status, message, body = INVALID_REQUEST, "a reply is not a request", b""
        else:
            status, message, body = self.probe.handle(method, msg.data, remaining(deadline, queued))
        if kind != ONEWAY and reply_to:
            request = {"s": headers.get("mqrpc-service"), "m": method}
            correlation = headers.get("mqrpc-correlation-id")
            if correlation is not None:
                request["c"] = correlation
            await self.send_reply(reply_to, reply_envelope(request, status, message, body), headers)

    async def send_reply(self, subject, env, request_headers):
        """In the envelope form to an mqrpc inbox, else with headers."""
        if is_mqrpc_inbox(subject) and not self.jetstream:
            await self.nc.publish(subject, framed(env))
            return
        headers = {"mqrpc-kind": "reply"}
        if env.get("st"):
            headers["mqrpc-status"] = str(env["st"])
            headers["mqrpc-status-message"] = env.get("sm", "")
        correlation = env.get("c")
        if isinstance(correlation, bytes) and len(correlation) == 16:
            correlation = str(uuid.UUID(bytes=correlation))
        if self.jetstream or (request_headers and "mqrpc-correlation-id" in request_headers):
            # JetStream messages carry every header; on core NATS the correlation id rides in the reply subject
            # unless the request sent it as a header.
            if correlation is not None:
                headers["mqrpc-correlation-id"] = str(correlation)
            if self.jetstream:
                if env.get("s"):
                    headers["mqrpc-service"] = env["s"]
                if env.get("m"):
                    headers["mqrpc-method"] = env["m"]
                # A version-2 reply's id, left out, is its correlation id.
                message_id = env.get("i", env.get("c"))
                if isinstance(message_id, bytes) and len(message_id) == 16:
                    headers["Nats-Msg-Id"] = str(uuid.UUID(bytes=message_id))
        await self.nc.publish(subject, env.get("b", b""), headers=headers)

    async def on_jetstream(self, msg):
        headers = msg.headers or {}
        reply_to = headers.get("mqrpc-reply-to")
        # The time queued is the stream's storage time of the message (the server's clock).
        stored = msg.metadata.timestamp  # nats-py: a naive datetime in local time, which timestamp() reads so
        queued = int((time.time() - stored.timestamp()) * 1000) if stored else 0
        await self.on_headers(msg, reply_to, headers, queued)
        await msg.ack()  # after the reply: one connection's messages go out in order


# --------------------------------------------------------------------------------------------------------------
# Kafka through kafka-python (module docs of rpc-broker/src/adapter/kafka.rs, docs/conformance.md)
# --------------------------------------------------------------------------------------------------------------

def kafka_topic(queue):
    """The topic of a queue: ASCII letters, digits, `.` and `-` as they are, any other byte `_` and two hex digits."""
    return "".join(chr(b) if chr(b).isascii() and (chr(b).isalnum() or chr(b) in ".-") else f"_{b:02X}"
                   for b in queue.encode())


class KafkaWorker:
    """kafka-python, driven by a thread of its own: the queue's topic (6 partitions) and its `<queue>.dlq` (one)
    made if missing, a member of the consumer group named as the topic, replies produced to `mqrpc-reply-to`,
    then the batch's offsets committed."""

    PARTITIONS = 6  # KafkaOptions::partitions' default, so that Rust workers can share the topic

    def __init__(self, url, namespace, probe):
        self.bootstrap = url.split("://", 1)[1] if "://" in url else url
        self.queue = f"{namespace}.{SERVICE}"
        self.topic = kafka_topic(self.queue)
        self.dead_letters = kafka_topic(f"{self.queue}.dlq")
        self.probe = probe
        self.stopping = threading.Event()
        self.ready = threading.Event()
        self.failure = None

    def run(self):
        try:
            import kafka
            from kafka.admin import KafkaAdminClient, NewTopic
            from kafka.errors import TopicAlreadyExistsError
            admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, client_id="interop-python-worker")
            for topic, partitions in ((self.dead_letters, 1), (self.topic, self.PARTITIONS)):
                try:
                    admin.create_topics([NewTopic(topic, partitions, 1)])
                except TopicAlreadyExistsError:
                    pass
            deadline = time.monotonic() + 10
            while not {self.topic, self.dead_letters} <= set(admin.list_topics()):
                if time.monotonic() > deadline:
                    raise RuntimeError("the topics were created but do not show")
                time.sleep(0.05)
            admin.close()
            self.producer = kafka.KafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=0,
                                                max_block_ms=5_000, client_id="interop-python-worker")
            consumer = kafka.KafkaConsumer(
                self.topic, bootstrap_servers=self.bootstrap, group_id=self.topic, enable_auto_commit=False,
                auto_offset_reset="earliest", session_timeout_ms=6_000, heartbeat_interval_ms=2_000,
                max_poll_records=64, fetch_max_wait_ms=100, client_id="interop-python-worker")
            # Ready once the group has handed this member its partitions: a call made before would wait.
            deadline = time.monotonic() + 30
            while not consumer.assignment():
                if time.monotonic() > deadline:
                    raise RuntimeError("no partitions assigned within 30 s")
                self.serve(consumer, consumer.poll(timeout_ms=200))
            self.ready.set()
            while not self.stopping.is_set():
                self.serve(consumer, consumer.poll(timeout_ms=200))
            consumer.close(autocommit=False)
            self.producer.close(timeout=5)
        except Exception as error:  # noqa: BLE001
            self.failure = error
            log(f"kafka: {error!r}")
            self.ready.set()

    def serve(self, consumer, batches):
        """Handles a poll's records, waits until every reply is confirmed, then commits past them."""
        if not batches:
            return
        sends = []
        for records in batches.values():
            for record in records:
                sends.extend(self.on_record(record))
        self.producer.flush(timeout=10)
        for send in sends:
            try:
                send.get(timeout=10)
            except Exception as error:  # noqa: BLE001 - a reply topic that is gone: the reply is dropped
                log(f"kafka: a reply was not delivered: {error!r}")
        consumer.commit()

    def on_record(self, record):
        headers = {}
        for name, value in record.headers or []:
            try:
                headers[name] = value.decode() if value is not None else None  # the last of a repeated name
            except UnicodeDecodeError:
                pass  # header values are UTF-8 text; another is not read
        reply_to = headers.get("mqrpc-reply-to")
        kind = KIND_NAMES.get(headers.get("mqrpc-kind"), REQUEST if reply_to else ONEWAY)
        if kind == REPLY:
            # Not a request: a copy, headers and all, to the dead-letter topic; no answer.
            return [self.producer.send(self.dead_letters, value=record.value, headers=list(record.headers or []))]
        deadline = header_int(headers.get("mqrpc-deadline-ms"))
        # The time queued counts from the record's timestamp.
        queued = now_ms() - record.timestamp if record.timestamp is not None and record.timestamp >= 0 else 0
        if header_int(headers.get("mqrpc-status")):
            status, message, body = INVALID_REQUEST, "a request carries no status", b""
        else:
            status, message, body = self.probe.handle(headers.get("mqrpc-method", ""), record.value or b"",
                                                      remaining(deadline, queued))
        if kind != REQUEST or not reply_to:
            return []
        reply = [("mqrpc-kind", "reply"), ("mqrpc-id", str(uuid.uuid4()))]
        if "mqrpc-correlation-id" in headers:
            reply.append(("mqrpc-correlation-id", headers["mqrpc-correlation-id"]))
        for name in ("mqrpc-service", "mqrpc-method"):
            if headers.get(name):
                reply.append((name, headers[name]))
        if status:
            reply.append(("mqrpc-status", str(status)))
            reply.append(("mqrpc-status-message", message or ""))
        pairs = [(name, text.encode()) for name, text in reply]
        try:
            # The reply address is a topic's name, produced to as it is.
            return [self.producer.send(reply_to, value=body, headers=pairs)]
        except Exception as error:  # noqa: BLE001 - a reply topic that does not exist
            log(f"kafka: no reply to {reply_to!r}: {error!r}")
            return []


# --------------------------------------------------------------------------------------------------------------
# ActiveMQ through stomp.py (module docs of rpc-broker/src/adapter/stomp.rs)
# --------------------------------------------------------------------------------------------------------------

class StompWorker:
    """A stomp.py connection (STOMP 1.2, bodies as bytes) whose receiver thread serves: SUBSCRIBE to
    `/queue/<queue>` with `ack:client-individual` and `activemq.prefetchSize:64`; each request answered by a SEND
    to its `reply-to` with `correlation-id` echoed, then ACKed."""

    def __init__(self, url, namespace, probe):
        import urllib.parse
        parts = urllib.parse.urlsplit(url)
        self.address = (parts.hostname, parts.port or 61613)
        self.login = urllib.parse.unquote(parts.username) if parts.username is not None else None
        self.passcode = urllib.parse.unquote(parts.password) if parts.password is not None else None
        self.queue = f"{namespace}.{SERVICE}"
        self.probe = probe
        self.stopping = threading.Event()
        self.ready = threading.Event()
        self.failure = None
        self.receipts = set()

    def run(self):
        try:
            import stomp
            worker = self

            class Listener(stomp.ConnectionListener):
                def on_message(self, frame):
                    try:
                        worker.on_message(frame)
                    except Exception as error:  # noqa: BLE001
                        log(f"stomp: {error!r}")

                def on_receipt(self, frame):
                    worker.receipts.add(frame.headers.get("receipt-id"))

                def on_error(self, frame):
                    log(f"stomp: ERROR {frame.headers.get('message')!r}")

                def on_disconnected(self):
                    if not worker.stopping.is_set():
                        worker.failure = RuntimeError("disconnected")
                        worker.stopping.set()

            self.connection = stomp.Connection12([self.address], auto_decode=False, heartbeats=(0, 0),
                                                 reconnect_attempts_max=1, timeout=5)
            self.connection.set_listener("worker", Listener())
            self.connection.connect(self.login, self.passcode, wait=True, with_connect_command=True)
            self.connection.subscribe(f"/queue/{self.queue}", "service", ack="client-individual",
                                      headers={"activemq.prefetchSize": "64"}, receipt="subscribed")
            deadline = time.monotonic() + 10
            while "subscribed" not in self.receipts:
                if time.monotonic() > deadline:
                    raise RuntimeError("no receipt for the SUBSCRIBE within 10 s")
                time.sleep(0.05)
            self.ready.set()
            while not self.stopping.wait(0.2):
                pass
            if self.connection.is_connected():
                self.connection.unsubscribe("service")
                self.connection.disconnect()
        except Exception as error:  # noqa: BLE001
            self.failure = error
            log(f"stomp: {error!r}")
            self.ready.set()

    def on_message(self, frame):
        headers = frame.headers
        body = frame.body or b""
        reply_to = headers.get("reply-to")
        kind = KIND_NAMES.get(headers.get("mqrpc-kind"), REQUEST if reply_to else ONEWAY)
        if kind == REPLY:
            # Not a request: a copy, headers and all, on `<queue>.dlq`; no answer.
            copy = {name: value for name, value in headers.items()
                    if name not in ("destination", "subscription", "message-id", "ack", "content-length")}
            self.connection.send(f"/queue/{self.queue}.dlq", body, headers=copy)
            self.connection.ack(headers["ack"])
            return
        deadline = header_int(headers.get("mqrpc-deadline-ms"))
        sent_at = header_int(headers.get("mqrpc-sent-at-ms"))
        if sent_at is None:
            sent_at = header_int(headers.get("timestamp"))  # the JMS timestamp ActiveMQ sets, ms
        queued = now_ms() - sent_at if sent_at else 0
        if header_int(headers.get("mqrpc-status")):
            status, message, result = INVALID_REQUEST, "a request carries no status", b""
        else:
            status, message, result = self.probe.handle(headers.get("mqrpc-method", ""), body,
                                                        remaining(deadline, queued))
        if kind == REQUEST and reply_to:
            reply = {"mqrpc-kind": "reply", "mqrpc-id": str(uuid.uuid4())}
            if "correlation-id" in headers:
                reply["correlation-id"] = headers["correlation-id"]
            for name in ("mqrpc-service", "mqrpc-method"):
                if headers.get(name):
                    reply[name] = headers[name]
            if status:
                reply["mqrpc-status"] = str(status)
                reply["mqrpc-status-message"] = message or ""
            self.connection.send(reply_to, result, content_type="application/msgpack", headers=reply)
        self.connection.ack(headers["ack"])


# --------------------------------------------------------------------------------------------------------------
# ZeroMQ through pyzmq (docs/wire-format.md, "ZeroMQ"; docs/conformance.md, "ZeroMQ")
# --------------------------------------------------------------------------------------------------------------

ZMQ_PROTOCOL = b"MQRPC-ZMQ/1"


class ZmqWorker:
    """A ROUTER socket bound where the URL says (`zmq-worker://host:port`): READY to every HELLO, an ANSWER (or an
    ACK for what needs none) to every REQUEST, PONG to every client each second."""

    def __init__(self, url, namespace, probe):
        self.endpoint = "tcp://" + url.split("://", 1)[1]
        self.queue = f"{namespace}.{SERVICE}"
        self.probe = probe
        self.node = uuid.uuid4().bytes
        self.clients = set()
        self.tasks = []

    async def start(self):
        import zmq
        import zmq.asyncio
        self.context = zmq.asyncio.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(self.endpoint)
        self.tasks = [asyncio.create_task(self.read_loop()), asyncio.create_task(self.pong_loop())]

    async def stop(self):
        for task in self.tasks:
            task.cancel()
        self.socket.close(0)
        self.context.term()

    async def send(self, routing, frames):
        await self.socket.send_multipart([routing, ZMQ_PROTOCOL] + frames)

    async def pong_loop(self):
        while True:
            await asyncio.sleep(1)
            for routing in list(self.clients):
                await self.send(routing, [b"\x17"])

    async def read_loop(self):
        while True:
            routing, *frames = await self.socket.recv_multipart()
            if len(frames) < 2 or frames[0] != ZMQ_PROTOCOL or not frames[1]:
                log(f"dropped a message that is not the protocol's: {frames[:2]!r}")
                continue
            command, fields, rest = frames[1][0], frames[1][1:], frames[2:]
            if command == 0x01:  # HELLO: node | PUB endpoint
                self.clients.add(routing)
                ready = b"\x11" + self.node + struct.pack(">Q", 1)
                await self.send(routing, [ready, b"", pack({self.queue: 64})])
            elif command == 0x02 and len(fields) == 20 and len(rest) == 2:  # REQUEST: seq, count, held ms | queue, env
                seq, _count, queued_ms = struct.unpack(">QIQ", fields)
                await self.request(routing, seq, queued_ms, rest[0].decode(errors="replace"), rest[1])
            elif command in (0x03, 0x04, 0x05):  # PING, SYNC (no PUB socket here), SEEN
                pass
            else:
                log(f"dropped command {command:#x}")

    async def request(self, routing, seq, queued_ms, queue, payload):
        if queue != self.queue:
            await self.send(routing, [b"\x16" + struct.pack(">Q", seq)])  # REFUSED
            return
        env, error = read_envelope(payload)
        if error is not None:
            reply_to, reply = error_reply(env, error)
            if reply_to is not None:
                await self.send(routing, [b"\x12" + struct.pack(">Q", seq), reply_to.encode(), reply])
            else:
                await self.send(routing, [b"\x13" + struct.pack(">Q", seq)])  # ACK: dropped
            return
        status, message, body = self.probe.handle(env["m"], env["b"], remaining(env.get("d"), queued_ms))
        if env["k"] == REQUEST and isinstance(env.get("r"), str):
            reply = pack(reply_envelope(env, status, message, body))
            await self.send(routing, [b"\x12" + struct.pack(">Q", seq), env["r"].encode(), reply])
        else:
            await self.send(routing, [b"\x13" + struct.pack(">Q", seq)])  # ACK


# --------------------------------------------------------------------------------------------------------------

async def serve_async(worker):
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await worker.start()
    print("ready", flush=True)
    await stop.wait()
    await worker.stop()


def serve_threaded(worker):
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    worker.ready.wait(30)
    if worker.failure is not None or not worker.ready.is_set():
        raise RuntimeError(f"could not start consuming: {worker.failure!r}")
    print("ready", flush=True)
    while not stop.wait(0.2):
        if not thread.is_alive():
            raise RuntimeError(f"the connection ended: {worker.failure!r}")
    worker.stopping.set()
    thread.join(10)


def main():
    if len(sys.argv) != 4 or sys.argv[1] not in ("broker", "rabbitmq", "nats", "jetstream", "kafka", "activemq",
                                                  "zeromq"):
        print("usage: worker.py broker|rabbitmq|nats|jetstream|kafka|activemq|zeromq URL NAMESPACE", file=sys.stderr)
        return 2
    transport, url, namespace = sys.argv[1:]
    probe = Probe()
    if transport == "rabbitmq":
        serve_threaded(AmqpWorker(url, namespace, probe))
    elif transport == "kafka":
        serve_threaded(KafkaWorker(url, namespace, probe))
    elif transport == "activemq":
        serve_threaded(StompWorker(url, namespace, probe))
    elif transport == "broker":
        asyncio.run(serve_async(BrokerWorker(url, namespace, probe)))
    elif transport == "zeromq":
        asyncio.run(serve_async(ZmqWorker(url, namespace, probe)))
    else:
        import os
        prefix = os.environ.get("MQRPC_PROBE_STREAM_PREFIX", "MQRPC")
        asyncio.run(serve_async(NatsWorker(url, namespace, probe, jetstream=transport == "jetstream",
                                           stream_prefix=prefix)))
    print(f"stopped handled={probe.handled}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
