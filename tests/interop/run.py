#!/usr/bin/env python3
"""Interoperability checks: a Python client calls the Rust `probe-worker` through each broker; then the Rust
`probe-client` calls a Python worker (worker.py) through the same broker.

Written from the documents only (docs/wire-format.md, docs/protocol.md, docs/adapters.md, docs/conformance.md and
the module docs of rpc-broker/src/adapter/{amqp,nats,kafka,stomp,zmq,redis_streams}.rs): where the worker does not do what they say, the
check fails.

    python3 tests/interop/run.py --worker target/debug/probe-worker --client target/debug/probe-client \
        [--known-gaps tests/interop/known-gaps.txt]

Environment: MQRPC_AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f), MQRPC_NATS_URL (default
nats://127.0.0.1:4222), MQRPC_KAFKA_URL (default 127.0.0.1:9092), MQRPC_STOMP_URL (ActiveMQ's STOMP, default
stomp://127.0.0.1:61623), MQRPC_REDIS_URL (default redis://127.0.0.1:6379), INTEROP_TRANSPORTS (comma-separated
subset of broker,rabbitmq,nats,jetstream,kafka,activemq,zeromq,redis; ZeroMQ needs no server: the worker binds a
free loopback port). On Redis, Python only calls the Rust worker.
"""

import argparse
import asyncio
import concurrent.futures
import os
import random
import signal
import struct
import sys
import threading
import time
import traceback
import uuid

import msgpack

SERVICE = "suite.Probe"
CALL_TIMEOUT = 10.0  # seconds to wait for a reply we expect
SILENCE = 1.5  # seconds to wait to conclude that no reply comes
CONCURRENT = 1000


class CheckFailed(Exception):
    pass


def expect(condition, why):
    if not condition:
        raise CheckFailed(why)


def now_ms():
    return int(time.time() * 1000)


def pack(value):
    return msgpack.packb(value, use_bin_type=True)


def unpack(data):
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


class Reply:
    """A reply as a caller sees it, whatever the transport."""

    def __init__(self, status, message, body, correlation, raw=None):
        self.status = status  # int, 0 when absent
        self.message = message  # str or None
        self.body = body  # bytes: the MessagePack of the result or error value
        self.correlation = correlation  # bytes (envelope) or str (broker property / header)
        self.raw = raw

    def value(self):
        return unpack(self.body) if self.body else None

    def __repr__(self):
        try:
            value = self.value()
        except Exception:
            value = self.body
        return f"Reply(status={self.status}, message={self.message!r}, value={value!r}, correlation={self.correlation!r})"


class BrokerError(Exception):
    """Our broker answered a frame with Error."""

    def __init__(self, code, message):
        super().__init__(f"broker error code {code}: {message}")
        self.code = code
        self.message = message


def envelope(kind, method, body, *, correlation=None, reply_to=None, inbox=True, deadline=None, version=1, extra=None,
             service=SERVICE):
    """An envelope as docs/wire-format.md lays it out (absent optional fields left out)."""
    env = {"v": version, "k": kind, "i": uuid.uuid4().bytes}
    if correlation is not None:
        env["c"] = correlation
    env["s"] = service
    env["m"] = method
    if reply_to is not None:
        env["r"] = reply_to
        if inbox:
            env["ri"] = True
    if deadline is not None:
        env["d"] = deadline
    env["a"] = 1
    env["b"] = body
    if extra:
        env.update(extra)
    return env


def reply_from_envelope(payload):
    env = unpack(payload)
    expect(isinstance(env, dict), f"the reply is not an envelope map: {env!r}")
    expect(env.get("v") in (1, 2), f"the reply's version is {env.get('v')!r}, not 1 or 2")
    expect(env.get("k") == 1, f"the reply's kind is {env.get('k')!r}, not 1 (reply)")
    body = env.get("b", b"")
    return Reply(env.get("st", 0), env.get("sm"), body, env.get("c"), raw=env)


# --------------------------------------------------------------------------------------------------------------
# Our broker, over raw TCP (docs/protocol.md, version 6)
# --------------------------------------------------------------------------------------------------------------

def s16(text):
    data = text.encode()
    return struct.pack(">H", len(data)) + data


def opt(value):
    return struct.pack(">Q", 0xFFFFFFFFFFFFFFFF if value is None else value)


def key16(value):
    return b"\x00" if value is None else b"\x01" + value


class EnvelopeCaller:
    """Calls whose request and reply are whole envelopes (our broker, ZeroMQ): replies matched to calls by `c`.
    The class using it has `calls`, `stray`, `inbox`, `publish(payload)` and `send_envelope(env)`."""

    def deliver_reply(self, payload):
        try:
            reply = reply_from_envelope(payload)
        except Exception as error:  # noqa: BLE001
            self.stray.append(("unreadable", payload, error))
            return
        future = self.calls.pop(bytes(reply.correlation or b""), None)
        if future is None or future.done():
            self.stray.append(reply)
        else:
            future.set_result(reply)

    def expect_reply(self, correlation):
        future = asyncio.get_running_loop().create_future()
        self.calls[bytes(correlation)] = future
        return future

    async def call(self, method, args, *, correlation=None, deadline=None, timeout=CALL_TIMEOUT, raw_body=None,
                   version=1, extra=None):
        correlation = correlation or uuid.uuid4().bytes
        body = raw_body if raw_body is not None else pack(args)
        env = envelope(0, method, body, correlation=correlation, reply_to=self.inbox, deadline=deadline,
                       version=version, extra=extra)
        future = await self.send_envelope(env)
        try:
            reply = await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            self.calls.pop(bytes(correlation), None)
            return None
        expect(reply.correlation == correlation,
               f"reply correlation {reply.correlation!r} != request's {correlation!r}")
        return reply

    async def oneway(self, method, args):
        await self.publish(pack(envelope(2, method, pack(args))))


class MqrpcClient(EnvelopeCaller):
    name = "broker"

    def __init__(self, url, namespace):
        self.url = url
        self.queue = f"{namespace}.{SERVICE}"
        self.next_req = 1
        self.pending = {}  # req -> future of (ok body) or BrokerError
        self.calls = {}  # correlation bytes -> future of Reply
        self.stray = []  # replies nobody waited for
        self.inbox_consumer = None
        self.closed = None
        self.tasks = []

    async def start(self):
        host, port = self.url.split("://", 1)[1].rsplit(":", 1)
        self.reader, self.writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 5)
        self.writer.write(self.frame(0x01, struct.pack(">H", 6) + s16("") + s16("interop-python")))
        kind, body = await asyncio.wait_for(self.read_frame(), 5)
        if kind == 0x83:
            req, code = struct.unpack(">IB", body[:5])
            raise BrokerError(code, body[7:].decode(errors="replace"))
        expect(kind == 0x81, f"expected Welcome, got frame type {kind:#x}")
        version, self.heartbeat_ms, self.max_frame = struct.unpack(">HII", body[:10])
        expect(version == 6, f"Welcome version {version}")
        self.closed = asyncio.get_running_loop().create_future()
        self.tasks = [asyncio.create_task(self.read_loop()), asyncio.create_task(self.ping_loop())]
        self.inbox = f"inbox.interop-{uuid.uuid4().hex}"
        ok = await self.request(0x0A, s16(self.inbox))
        (self.inbox_consumer,) = struct.unpack(">Q", ok[:8])

    async def stop(self):
        for task in self.tasks:
            task.cancel()
        try:
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 2)
        except Exception:
            pass

    @staticmethod
    def frame(kind, body):
        return struct.pack(">IB", len(body) + 1, kind) + body

    async def read_frame(self):
        (length,) = struct.unpack(">I", await self.reader.readexactly(4))
        data = await self.reader.readexactly(length)
        return data[0], data[1:]

    async def ping_loop(self):
        while True:
            await asyncio.sleep(self.heartbeat_ms / 1000 / 2)
            self.writer.write(self.frame(0x0D, b""))

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
                    req, code = struct.unpack(">IB", body[:5])
                    (length,) = struct.unpack(">H", body[5:7])
                    error = BrokerError(code, body[7:7 + length].decode(errors="replace"))
                    if req == 0:
                        raise error
                    future = self.pending.pop(req, None)
                    if future and not future.done():
                        future.set_exception(error)
                elif kind == 0x84:  # Deliver
                    consumer, tag, _count = struct.unpack(">QQI", body[:20])
                    payload = body[28:]
                    if tag != 0:
                        self.writer.write(self.frame(0x07, struct.pack(">QQB", consumer, tag, 0)))
                    if consumer == self.inbox_consumer:
                        self.deliver_reply(payload)
                elif kind in (0x85, 0x86, 0x87):
                    pass
        except BaseException as error:  # noqa: BLE001 - the connection is gone, every waiter learns it
            for future in list(self.pending.values()) + list(self.calls.values()):
                if not future.done():
                    future.set_exception(CheckFailed(f"connection to the broker lost: {error!r}"))
            if self.closed and not self.closed.done():
                self.closed.set_result(error)

    async def request(self, kind, body, timeout=5):
        req = self.next_req
        self.next_req += 1
        future = asyncio.get_running_loop().create_future()
        self.pending[req] = future
        self.writer.write(self.frame(kind, struct.pack(">I", req) + body))
        return await asyncio.wait_for(future, timeout)

    async def publish(self, payload, *, correlation=None, message_id=None, queue=None):
        body = (s16(queue or self.queue) + b"\x00" + opt(None) + opt(None) + key16(correlation) + key16(message_id)
                + payload)
        return await self.request(0x03, body)

    async def send_envelope(self, env):
        """Publishes an envelope; returns the future of its reply (None when it asks for none)."""
        correlation = env.get("c")
        future = self.expect_reply(correlation) if correlation is not None and "r" in env else None
        await self.publish(pack(env), correlation=correlation if isinstance(correlation, bytes) and len(correlation) == 16 else None,
                           message_id=env.get("i") if isinstance(env.get("i"), bytes) else None)
        return future


# --------------------------------------------------------------------------------------------------------------
# ZeroMQ through pyzmq (docs/wire-format.md, "ZeroMQ"; module docs of rpc-broker/src/adapter/zmq.rs)
# --------------------------------------------------------------------------------------------------------------

ZMQ_PROTOCOL = b"MQRPC-ZMQ/1"


class ZmqClient(EnvelopeCaller):
    """A DEALER socket connected to the worker's ROUTER: HELLO, READY, then REQUEST frames; the client holds
    each request until the worker settles it (ACK, or the reply's ANSWER), sends it again on REQUEUE and sends
    the worker's new attempt on REPUBLISH."""

    name = "zeromq"

    def __init__(self, url, namespace):
        self.endpoint = "tcp://" + url.split("://", 1)[1]
        self.queue = f"{namespace}.{SERVICE}"
        self.inbox = f"python-inbox-{uuid.uuid4().hex}"
        self.node = uuid.uuid4().bytes
        self.next_seq = 1
        self.held = {}  # seq -> (queue, envelope bytes, delivery count)
        self.calls = {}  # correlation bytes -> future of Reply
        self.acks = {}  # seq -> future, for checks that wait for a settle
        self.stray = []
        self.ready = None
        self.publishes = b""  # the worker's PUB endpoint, from READY
        self.tasks = []

    async def start(self):
        import zmq
        import zmq.asyncio
        self.context = zmq.asyncio.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(self.endpoint)
        self.ready = asyncio.get_running_loop().create_future()
        self.tasks = [asyncio.create_task(self.read_loop()), asyncio.create_task(self.ping_loop())]
        await self.send([b"\x01" + self.node, b""])
        queues = await asyncio.wait_for(self.ready, 10)
        expect(self.queue in queues, f"the worker's READY does not list {self.queue}: {queues!r}")

    async def stop(self):
        for task in self.tasks:
            task.cancel()
        self.socket.close(0)
        self.context.term()

    async def send(self, frames):
        await self.socket.send_multipart([ZMQ_PROTOCOL] + frames)

    async def ping_loop(self):
        while True:
            await asyncio.sleep(1)
            await self.send([b"\x03"])

    async def send_request(self, seq):
        queue, payload, count = self.held[seq]
        await self.send([b"\x02" + struct.pack(">QIQ", seq, count, 0), queue.encode(), payload])

    async def read_loop(self):
        while True:
            frames = await self.socket.recv_multipart()
            if len(frames) < 2 or frames[0] != ZMQ_PROTOCOL or not frames[1]:
                self.stray.append(("malformed", frames))
                continue
            command, fields, rest = frames[1][0], frames[1][1:], frames[2:]
            if command == 0x11:  # READY: node, version | PUB endpoint, queues
                version = fields[16:24]
                self.publishes = rest[0]
                queues = unpack(rest[1])
                await self.send([b"\x05" + version])
                if not self.ready.done():
                    self.ready.set_result(queues)
            elif command == 0x12:  # ANSWER: seq | inbox, envelope
                (seq,) = struct.unpack(">Q", fields)
                self.settled(seq)
                self.deliver_reply(rest[1])
            elif command == 0x13:  # ACK: seq
                self.settled(struct.unpack(">Q", fields)[0])
            elif command == 0x14:  # REQUEUE: seq, counted
                seq, counted = struct.unpack(">QB", fields)
                if seq in self.held:
                    queue, payload, count = self.held[seq]
                    self.held[seq] = (queue, payload, count + counted)
                    await self.send_request(seq)
            elif command == 0x15:  # REPUBLISH: seq | queue, envelope
                (seq,) = struct.unpack(">Q", fields)
                if seq in self.held:
                    self.held[seq] = (rest[0].decode(), rest[1], 1)
                    await self.send_request(seq)
            elif command == 0x16:  # REFUSED: seq
                self.stray.append(("refused", fields))
            elif command == 0x17:  # PONG
                pass

    def settled(self, seq):
        self.held.pop(seq, None)
        future = self.acks.pop(seq, None)
        if future is not None and not future.done():
            future.set_result(True)

    async def publish(self, payload, *, correlation=None, queue=None):
        """Sends a REQUEST; returns the future of the worker's settle of it."""
        seq = self.next_seq
        self.next_seq += 1
        self.held[seq] = (queue or self.queue, payload, 1)
        settled = asyncio.get_running_loop().create_future()
        self.acks[seq] = settled
        await self.send_request(seq)
        return settled

    async def send_envelope(self, env):
        correlation = env.get("c")
        future = self.expect_reply(correlation) if correlation is not None and "r" in env else None
        await self.publish(pack(env))
        return future


# --------------------------------------------------------------------------------------------------------------
# RabbitMQ through pika (module docs of rpc-broker/src/adapter/amqp.rs)
# --------------------------------------------------------------------------------------------------------------

class AmqpClient:
    """A plain AMQP client: a blocking pika connection, driven from one thread of its own."""

    name = "rabbitmq"

    def __init__(self, url, namespace):
        self.url = url
        self.queue = f"{namespace}.{SERVICE}"
        self.thread = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self.replies = {}  # correlation id -> Reply (direct reply-to)
        self.named_replies = {}

    async def run(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.thread, function, *args)

    async def start(self):
        await self.run(self._start)

    def _start(self):
        import pika
        self.pika = pika
        self.connection = pika.BlockingConnection(pika.URLParameters(self.url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        self.channel.basic_consume("amq.rabbitmq.reply-to", self._on_reply, auto_ack=True)
        result = self.channel.queue_declare("", exclusive=True, auto_delete=True)
        self.named_queue = result.method.queue
        self.channel.basic_consume(self.named_queue, self._on_named_reply, auto_ack=True)

    def _reply(self, properties, body):
        headers = properties.headers or {}
        status = headers.get("mqrpc-status", 0)
        if isinstance(status, bytes):
            status = status.decode()
        message = headers.get("mqrpc-status-message")
        if isinstance(message, bytes):
            message = message.decode(errors="replace")
        return Reply(int(status), message, body, properties.correlation_id, raw=properties)

    def _on_reply(self, _channel, _method, properties, body):
        self.replies.setdefault(properties.correlation_id, []).append(self._reply(properties, body))

    def _on_named_reply(self, _channel, _method, properties, body):
        self.named_replies.setdefault(properties.correlation_id, []).append(self._reply(properties, body))

    async def stop(self):
        try:
            await asyncio.wait_for(self.run(self.connection.close), 5)
        except Exception:
            pass
        self.thread.shutdown(wait=False)

    def _publish(self, body, properties, queue=None):
        try:
            self.channel.basic_publish("", queue or self.queue, body, properties, mandatory=True)
        except self.pika.exceptions.UnroutableError as error:
            raise CheckFailed(f"the request was returned unroutable: {error!r}")

    def _wait(self, store, correlations, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(c in store for c in correlations):
            self.connection.process_data_events(time_limit=min(0.1, max(0, deadline - time.monotonic())))
        return {c: store.pop(c)[0] for c in correlations if c in store}

    def _call(self, requests, timeout, named):
        """requests: [(correlation, method, body, extra headers, extra properties)]."""
        for correlation, method, body, headers, props in requests:
            properties = self.pika.BasicProperties(
                reply_to=self.named_queue if named else "amq.rabbitmq.reply-to",
                correlation_id=correlation,
                type=method,
                content_type="application/msgpack",
                headers=headers or None,
                **(props or {}),
            )
            self._publish(body, properties)
        return self._wait(self.named_replies if named else self.replies, [r[0] for r in requests], timeout)

    async def call(self, method, args, *, correlation=None, deadline=None, timeout=CALL_TIMEOUT, raw_body=None,
                   headers=None, properties=None, named=False):
        correlation = correlation if correlation is not None else str(uuid.uuid4())
        headers = dict(headers or {})
        if deadline is not None:
            headers["mqrpc-deadline-ms"] = deadline
        body = raw_body if raw_body is not None else pack(args)
        replies = await self.run(self._call, [(correlation, method, body, headers, properties)], timeout, named)
        reply = replies.get(correlation)
        return reply

    async def call_many(self, requests, timeout):
        return await self.run(self._call, requests, timeout, False)

    async def oneway(self, method, args, headers=None):
        properties = self.pika.BasicProperties(type=method, content_type="application/msgpack", headers=headers)
        await self.run(self._publish, pack(args), properties)


# --------------------------------------------------------------------------------------------------------------
# NATS through nats-py (module docs of rpc-broker/src/adapter/nats.rs): core mode and JetStream
# --------------------------------------------------------------------------------------------------------------

class NatsClient:
    def __init__(self, url, namespace, jetstream=False, stream_prefix=None):
        self.url = url
        self.subject = f"{namespace}.{SERVICE}"
        self.jetstream = jetstream
        self.stream_prefix = stream_prefix
        self.name = "jetstream" if jetstream else "nats"
        self.waiters = {}  # reply subject -> future of Reply

    async def start(self):
        import nats
        self.nc = await nats.connect(self.url, connect_timeout=5, max_reconnect_attempts=0)
        self.js = self.nc.jetstream() if self.jetstream else None
        self.inbox = f"_INBOX.interop{uuid.uuid4().hex[:12]}"
        self.sub = await self.nc.subscribe(f"{self.inbox}.>", cb=self.on_reply)

    async def stop(self):
        try:
            await asyncio.wait_for(self.nc.close(), 5)
        except Exception:
            pass

    async def on_reply(self, msg):
        headers = msg.headers or {}
        data = msg.data
        if data[:1] == b"\xc1":  # the mqrpc form: marker, sending time, envelope
            try:
                reply = reply_from_envelope(data[9:])
                reply.raw = msg
            except Exception as error:  # noqa: BLE001
                reply = Reply(-1, f"unreadable mqrpc-form reply: {error!r}", data, None, raw=msg)
        elif headers.get("Status") == "503":
            reply = Reply(10, "no responders", b"", None, raw=msg)
        else:
            status = int(headers.get("mqrpc-status", "0") or 0)
            # "the correlation id is the last token of the reply subject <inbox>.<correlation id, 32 hex digits>
            # (the header mqrpc-correlation-id only otherwise)"
            token = msg.subject.rsplit(".", 1)[-1]
            if len(token) == 32 and all(ch in "0123456789abcdefABCDEF" for ch in token):
                correlation = token
            else:
                correlation = headers.get("mqrpc-correlation-id")
            reply = Reply(status, headers.get("mqrpc-status-message"), data, correlation, raw=msg)
        future = self.waiters.pop(msg.subject, None)
        if future and not future.done():
            future.set_result(reply)

    def reply_subject(self, token):
        return f"{self.inbox}.{token}"

    async def send(self, payload, headers, reply=None):
        if self.jetstream:
            headers = dict(headers or {})
            if reply:
                headers["mqrpc-reply-to"] = reply
                headers["mqrpc-reply-inbox"] = "true"
            headers.setdefault("Nats-Msg-Id", str(uuid.uuid4()))
            try:
                await self.js.publish(self.subject, payload, headers=headers, timeout=5)
            except Exception as error:  # noqa: BLE001
                raise CheckFailed(f"the JetStream publish failed: {error!r}")
        else:
            await self.nc.publish(self.subject, payload, reply=reply or "", headers=headers or None)

    async def call(self, method, args, *, correlation=None, deadline=None, timeout=CALL_TIMEOUT, raw_body=None,
                   headers=None, token=None):
        """A plain client's call: reply subject `<inbox>.<token>`, `mqrpc-method` and the arguments."""
        token = token or uuid.uuid4().hex
        reply_to = self.reply_subject(token)
        hdrs = {"mqrpc-method": method} if method is not None else {}
        if correlation is not None:
            hdrs["mqrpc-correlation-id"] = correlation
        if deadline is not None:
            hdrs["mqrpc-deadline-ms"] = str(deadline)
        hdrs.update(headers or {})
        future = asyncio.get_running_loop().create_future()
        self.waiters[reply_to] = future
        body = raw_body if raw_body is not None else pack(args)
        await self.send(body, hdrs, reply_to)
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            self.waiters.pop(reply_to, None)
            return None

    async def call_mqrpc_form(self, env_bytes, correlation_hex, timeout=CALL_TIMEOUT, sent_at=None):
        """Core NATS between mqrpc processes: 0xc1, sending time (8 bytes BE), envelope; reply subject
        `<inbox>.mqrpc.<correlation id>`."""
        reply_to = f"{self.inbox}.mqrpc.{correlation_hex}"
        future = asyncio.get_running_loop().create_future()
        self.waiters[reply_to] = future
        payload = b"\xc1" + struct.pack(">Q", now_ms() if sent_at is None else sent_at) + env_bytes
        await self.nc.publish(self.subject, payload, reply=reply_to)
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            self.waiters.pop(reply_to, None)
            return None

    async def oneway(self, method, args, headers=None):
        hdrs = {"mqrpc-method": method}
        hdrs.update(headers or {})
        await self.send(pack(args), hdrs)

    async def flush(self):
        await self.nc.flush(timeout=5)


# --------------------------------------------------------------------------------------------------------------
# Kafka through kafka-python (module docs of rpc-broker/src/adapter/kafka.rs, docs/conformance.md)
# --------------------------------------------------------------------------------------------------------------

def kafka_topic(queue):
    """The topic of a queue (module docs of kafka.rs): ASCII letters, digits, `.`, `_` and `-` as they are, any
    other byte `_` and two hex digits."""
    return "".join(chr(b) if chr(b).isascii() and (chr(b).isalnum() or chr(b) in "._-") else f"_{b:02X}"
                   for b in queue.encode())


def kafka_bootstrap(url):
    """`kafka://host:port` (the probe processes' form) or `host:port` (MQRPC_KAFKA_URL) as host:port."""
    return url.split("://", 1)[1] if "://" in url else url


def kafka_headers(record):
    """A record's headers as a dict of text (the last value of a repeated name, as the worker reads them;
    values that are not UTF-8 as bytes)."""
    headers = {}
    for name, value in record.headers or []:
        try:
            headers[name] = None if value is None else value.decode()
        except UnicodeDecodeError:
            headers[name] = value
    return headers


class KafkaClient:
    """A plain Kafka client: kafka-python's producer, and a consumer of a reply topic of its own (one partition,
    assigned, no group) polled by a thread of its own; replies are matched by `mqrpc-correlation-id`."""

    name = "kafka"

    def __init__(self, url, namespace):
        self.bootstrap = kafka_bootstrap(url)
        self.queue = f"{namespace}.{SERVICE}"
        self.topic = kafka_topic(self.queue)
        self.reply_topic = f"interop-replies-{uuid.uuid4().hex}"
        self.topics = [self.reply_topic]  # made here, deleted in stop()
        self.thread = concurrent.futures.ThreadPoolExecutor(max_workers=4)
        self.waiters = {}  # correlation id (str) -> future of Reply
        self.stray = []  # replies nobody waited for
        self.stopping = threading.Event()
        self.poller = None

    async def run(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.thread, function, *args)

    async def start(self):
        self.loop = asyncio.get_running_loop()
        await self.run(self._start)
        self.poller = threading.Thread(target=self._poll, daemon=True)
        self.poller.start()

    def _start(self):
        import kafka
        from kafka.admin import KafkaAdminClient
        self.kafka = kafka
        self.admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, client_id="interop-python")
        self.create_topic(self.reply_topic)
        # The idempotent producer with acks=all, as the adapter's own; a send is waited for where it matters.
        self.producer = kafka.KafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=0,
                                            max_block_ms=10_000, client_id="interop-python")
        self.consumer = self.reader(self.reply_topic)

    def create_topic(self, topic, partitions=1):
        from kafka.admin import NewTopic
        from kafka.errors import TopicAlreadyExistsError
        try:
            self.admin.create_topics([NewTopic(topic, partitions, 1)])
        except TopicAlreadyExistsError:
            pass
        deadline = time.monotonic() + 10
        while topic not in self.admin.list_topics():
            expect(time.monotonic() < deadline, f"the topic {topic} was created but does not show")
            time.sleep(0.05)

    def reader(self, topic):
        """A consumer of partition 0 of `topic` from its start, without a group."""
        consumer = self.kafka.KafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                            fetch_max_wait_ms=100, client_id="interop-python")
        partition = self.kafka.TopicPartition(topic, 0)
        consumer.assign([partition])
        consumer.seek(partition, 0)
        return consumer

    def read_topic(self, topic, want, timeout):
        """The records of `topic` (partition 0) for which `want(headers)` holds, read for up to `timeout` s
        (returns as soon as one is found). A topic that does not exist has none."""
        if topic not in self.admin.list_topics():
            return []
        consumer = self.reader(topic)
        found = []
        try:
            deadline = time.monotonic() + timeout
            while not found and time.monotonic() < deadline:
                for records in consumer.poll(timeout_ms=200).values():
                    found.extend(record for record in records if want(kafka_headers(record)))
        finally:
            consumer.close()
        return found

    def _poll(self):
        while not self.stopping.is_set():
            try:
                batches = self.consumer.poll(timeout_ms=100)
            except Exception as error:  # noqa: BLE001
                print(f"  kafka: polling the reply topic failed: {error!r}", file=sys.stderr, flush=True)
                time.sleep(0.1)
                continue
            replies = [self._reply(record) for records in batches.values() for record in records]
            if replies:
                self.loop.call_soon_threadsafe(self._deliver, replies)

    @staticmethod
    def _reply(record):
        headers = kafka_headers(record)
        status = headers.get("mqrpc-status")
        try:
            status = int(status) if status is not None else 0
        except (TypeError, ValueError):
            status = -1
        return Reply(status, headers.get("mqrpc-status-message"), record.value or b"",
                     headers.get("mqrpc-correlation-id"), raw=record)

    def _deliver(self, replies):
        for reply in replies:
            future = self.waiters.pop(reply.correlation, None) if isinstance(reply.correlation, str) else None
            if future is None or future.done():
                self.stray.append(reply)
            else:
                future.set_result(reply)

    async def stop(self):
        self.stopping.set()
        if self.poller:
            self.poller.join(5)

        def close():
            self.consumer.close()
            self.producer.close(timeout=5)
            try:
                existing = set(self.admin.list_topics())
                present = [topic for topic in set(self.topics) if topic in existing]
                if present:
                    self.admin.delete_topics(present)
            except Exception:  # noqa: BLE001
                pass
            self.admin.close()
        try:
            await asyncio.wait_for(self.run(close), 15)
        except Exception:
            pass
        self.thread.shutdown(wait=False)

    def _send(self, requests, topic=None):
        """requests: [(headers dict, value bytes or None, timestamp ms or None)]; every send confirmed."""
        sends = []
        for headers, value, timestamp in requests:
            pairs = [(name, str(text).encode()) for name, text in headers.items()]
            # kafka-python sends no record without a key or a value: a record without a value gets an empty key.
            key = b"" if value is None else None
            sends.append(self.producer.send(topic or self.topic, key=key, value=value, headers=pairs,
                                            timestamp_ms=timestamp))
        self.producer.flush(timeout=30)
        for send in sends:
            try:
                send.get(timeout=10)
            except Exception as error:  # noqa: BLE001
                raise CheckFailed(f"the produce was not confirmed: {error!r}")

    def request_headers(self, method, correlation, deadline=None, reply_topic=None, headers=None):
        """The headers a plain Kafka client calls with (module docs of kafka.rs)."""
        hdrs = {}
        if method is not None:
            hdrs["mqrpc-method"] = method
        hdrs["mqrpc-reply-to"] = reply_topic or self.reply_topic
        hdrs["mqrpc-reply-inbox"] = "true"
        hdrs["mqrpc-correlation-id"] = correlation
        if deadline is not None:
            hdrs["mqrpc-deadline-ms"] = str(deadline)
        hdrs.update(headers or {})
        return hdrs

    async def call(self, method, args, *, correlation=None, deadline=None, timeout=CALL_TIMEOUT, raw_body=None,
                   headers=None, timestamp=None, reply_topic=None, no_value=False):
        correlation = correlation if correlation is not None else str(uuid.uuid4())
        hdrs = self.request_headers(method, correlation, deadline, reply_topic, headers)
        value = None if no_value else (raw_body if raw_body is not None else pack(args))
        future = self.loop.create_future()
        self.waiters[correlation] = future
        await self.run(self._send, [(hdrs, value, timestamp)])
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            self.waiters.pop(correlation, None)
            return None

    async def call_many(self, requests, timeout):
        """requests: [(correlation, method, args)]; returns {correlation: Reply} of those answered in time."""
        futures = {}
        sends = []
        for correlation, method, args in requests:
            futures[correlation] = self.waiters[correlation] = self.loop.create_future()
            sends.append((self.request_headers(method, correlation, deadline=30_000), pack(args), None))
        await self.run(self._send, sends)
        done, _ = await asyncio.wait(futures.values(), timeout=timeout)
        for correlation, future in futures.items():
            if future not in done:
                self.waiters.pop(correlation, None)
        return {c: f.result() for c, f in futures.items() if f in done}

    async def oneway(self, method, args, headers=None):
        """No `mqrpc-reply-to`: a oneway call."""
        hdrs = {"mqrpc-method": method}
        hdrs.update(headers or {})
        await self.run(self._send, [(hdrs, pack(args), None)])


# --------------------------------------------------------------------------------------------------------------
# Redis Streams through redis-py (module docs of rpc-broker/src/adapter/redis_streams.rs)
# --------------------------------------------------------------------------------------------------------------

class RedisClient:
    """A plain Redis client (redis-py, asyncio): `XADD` to the queue's stream, the reply read with `XREAD` from a
    stream of its own, made before the first call (a worker answers an inbox only while it exists); replies are
    matched by `mqrpc-correlation-id`."""

    name = "redis"

    def __init__(self, url, namespace, prefix="mqrpc:"):
        self.url = url
        self.queue = f"{namespace}.{SERVICE}"
        self.stream = f"{prefix}q:{self.queue}"
        self.reply_stream = f"interop:replies:{uuid.uuid4().hex}"
        self.waiters = {}  # correlation id (str) -> future of Reply
        self.stray = []  # replies nobody waited for
        self.reader = None

    async def start(self):
        import redis.asyncio as aioredis
        self.loop = asyncio.get_running_loop()
        self.redis = aioredis.from_url(self.url)
        # XREAD with BLOCK holds its connection: a client of its own.
        self.blocking = aioredis.from_url(self.url)
        opened = await self.redis.xadd(self.reply_stream, {"open": "1"})
        await self.redis.xdel(self.reply_stream, opened)
        await self.redis.pexpire(self.reply_stream, 600_000)
        self.last = opened
        self.reader = asyncio.create_task(self.read_loop())

    async def read_loop(self):
        while True:
            try:
                answer = await self.blocking.xread({self.reply_stream: self.last}, count=256, block=200)
            except Exception as error:  # noqa: BLE001
                print(f"  redis: reading the reply stream failed: {error!r}", file=sys.stderr, flush=True)
                await asyncio.sleep(0.1)
                continue
            for _stream, entries in answer or []:
                for entry_id, fields in entries:
                    self.last = entry_id
                    self._deliver(self._reply(fields))

    @staticmethod
    def _reply(fields):
        named = {name.decode(errors="replace"): value for name, value in fields.items()}

        def text(name):
            value = named.get(name)
            return value.decode(errors="replace") if value is not None else None
        status = text("mqrpc-status")
        try:
            status = int(status) if status is not None else 0
        except ValueError:
            status = -1
        return Reply(status, text("mqrpc-status-message"), named.get("body", b""), text("mqrpc-correlation-id"),
                     raw=fields)

    def _deliver(self, reply):
        future = self.waiters.pop(reply.correlation, None) if isinstance(reply.correlation, str) else None
        if future is None or future.done():
            self.stray.append(reply)
        else:
            future.set_result(reply)

    async def stop(self):
        if self.reader:
            self.reader.cancel()
            try:
                await self.reader
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        try:
            await self.redis.delete(self.reply_stream)
        except Exception:  # noqa: BLE001
            pass
        await self.redis.aclose()
        await self.blocking.aclose()

    def request_fields(self, method, correlation, deadline=None, headers=None):
        """The fields a plain Redis client calls with (module docs of redis_streams.rs)."""
        fields = {}
        if method is not None:
            fields["mqrpc-method"] = method
        fields["mqrpc-reply-to"] = self.reply_stream
        fields["mqrpc-reply-inbox"] = "true"
        fields["mqrpc-correlation-id"] = correlation
        if deadline is not None:
            fields["mqrpc-deadline-ms"] = str(deadline)
        fields.update(headers or {})
        return fields

    async def call(self, method, args, *, correlation=None, deadline=None, timeout=CALL_TIMEOUT, raw_body=None,
                   headers=None):
        correlation = correlation if correlation is not None else str(uuid.uuid4())
        fields = self.request_fields(method, correlation, deadline, headers)
        fields["body"] = raw_body if raw_body is not None else pack(args)
        future = self.loop.create_future()
        self.waiters[correlation] = future
        await self.redis.xadd(self.stream, fields)
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            self.waiters.pop(correlation, None)
            return None

    async def call_many(self, requests, timeout):
        """requests: [(correlation, method, args)]; returns {correlation: Reply} of those answered in time."""
        futures = {}
        pipeline = self.redis.pipeline(transaction=False)
        for correlation, method, args in requests:
            futures[correlation] = self.waiters[correlation] = self.loop.create_future()
            fields = self.request_fields(method, correlation, deadline=30_000)
            fields["body"] = pack(args)
            pipeline.xadd(self.stream, fields)
        await pipeline.execute()
        done, _ = await asyncio.wait(futures.values(), timeout=timeout)
        for correlation, future in futures.items():
            if future not in done:
                self.waiters.pop(correlation, None)
        return {c: f.result() for c, f in futures.items() if f in done}

    async def oneway(self, method, args, headers=None):
        """No `mqrpc-reply-to`: a oneway call."""
        fields = {"mqrpc-method": method, "body": pack(args)}
        fields.update(headers or {})
        await self.redis.xadd(self.stream, fields)


# --------------------------------------------------------------------------------------------------------------
# ActiveMQ through stomp.py (module docs of rpc-broker/src/adapter/stomp.rs)
# --------------------------------------------------------------------------------------------------------------

def stomp_address(url):
    """(host, port, login, passcode) of `stomp://[login:passcode@]host:port[/]`."""
    import urllib.parse
    parts = urllib.parse.urlsplit(url)
    login = urllib.parse.unquote(parts.username) if parts.username is not None else None
    passcode = urllib.parse.unquote(parts.password) if parts.password is not None else None
    return parts.hostname, parts.port or 61613, login, passcode


class StompClient:
    """A plain STOMP 1.2 client (stomp.py, `auto_decode=False` so that bodies stay bytes; stomp.py sends
    `content-length` with every non-empty body): requests SENT to `/queue/<queue>` with `mqrpc-method`,
    `reply-to` a `/temp-queue/...` this connection subscribes to, and `correlation-id`; replies matched by
    `correlation-id`, `mqrpc-status` read from them. Frames are sent from one thread of its own; stomp.py's
    receiver thread hands what arrives to the event loop."""

    name = "activemq"

    def __init__(self, url, namespace):
        self.host, self.port, self.login, self.passcode = stomp_address(url)
        self.queue = f"{namespace}.{SERVICE}"
        self.destination = f"/queue/{self.queue}"
        self.inbox = f"/temp-queue/interop-{uuid.uuid4().hex}"
        self.named_queue = f"/queue/interop-replies-{uuid.uuid4().hex}"
        self.thread = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self.waiters = {}  # correlation id (str) -> future of Reply
        self.stray = []  # replies nobody waited for
        self.receipts = {}  # receipt id -> future
        self.readers = {}  # subscription id -> list of frames (read_queue)
        self.errors = []  # ERROR frames that answered no receipt
        self.next_receipt = 0

    async def run(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.thread, function, *args)

    async def start(self):
        self.loop = asyncio.get_running_loop()
        await self.run(self._start)

    def _start(self):
        import stomp
        client = self

        def hand_over(function, *args):
            try:
                client.loop.call_soon_threadsafe(function, *args)
            except RuntimeError:  # the event loop is closed: the run is over
                pass

        class Listener(stomp.ConnectionListener):
            def on_message(self, frame):
                hand_over(client._on_message, frame)

            def on_receipt(self, frame):
                hand_over(client._on_receipt, frame.headers.get("receipt-id"), None)

            def on_error(self, frame):
                receipt = frame.headers.get("receipt-id")
                why = f"ERROR {frame.headers.get('message')!r}: {frame.body[:200]!r}"
                hand_over(client._on_receipt, receipt, why)

        self.connection = stomp.Connection12([(self.host, self.port)], auto_decode=False, heartbeats=(0, 0),
                                             reconnect_attempts_max=1, timeout=5)
        expect(self.connection.auto_content_length, "stomp.py would send bodies without content-length")
        self.connection.set_listener("interop", Listener())
        self.connection.connect(self.login, self.passcode, wait=True, with_connect_command=True)
        self.connection.subscribe(self.inbox, "inbox", ack="auto")
        self.connection.subscribe(self.named_queue, "named", ack="auto")

    def _on_message(self, frame):
        subscription = frame.headers.get("subscription")
        if subscription in self.readers:
            self.readers[subscription].append(frame)
            return
        headers = frame.headers
        status = headers.get("mqrpc-status")
        try:
            status = int(status) if status is not None else 0
        except ValueError:
            status = -1
        reply = Reply(status, headers.get("mqrpc-status-message"), frame.body or b"", headers.get("correlation-id"),
                      raw=frame)
        future = self.waiters.pop(reply.correlation, None)
        if future is None or future.done():
            self.stray.append(reply)
        else:
            future.set_result(reply)

    def _on_receipt(self, receipt, error):
        future = self.receipts.pop(receipt, None) if receipt is not None else None
        if future is None:
            if error is not None:
                self.errors.append(error)
        elif not future.done():
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(CheckFailed(f"the server refused a frame: {error}"))

    async def stop(self):
        try:
            await asyncio.wait_for(self.run(self.connection.disconnect), 5)
        except Exception:
            pass
        self.thread.shutdown(wait=False)

    def _send(self, frames):
        """frames: [(destination, body, headers)], sent in order."""
        for destination, body, headers in frames:
            self.connection.send(destination, body, content_type="application/msgpack", headers=dict(headers))

    async def send(self, frames, confirm=False):
        """Sends the frames; with `confirm`, the last asks for a receipt, which is waited for (the server handles
        a connection's frames in order, so it confirms all of them)."""
        future = None
        if confirm and frames:
            self.next_receipt += 1
            receipt = f"interop-{self.next_receipt}"
            future = self.receipts[receipt] = self.loop.create_future()
            destination, body, headers = frames[-1]
            frames = frames[:-1] + [(destination, body, {**headers, "receipt": receipt})]
        await self.run(self._send, frames)
        if future is not None:
            try:
                await asyncio.wait_for(future, CALL_TIMEOUT)
            except asyncio.TimeoutError:
                raise CheckFailed(f"no receipt within {CALL_TIMEOUT:.0f} s")

    def request_headers(self, method, correlation, deadline=None, named=False, headers=None):
        """The headers a plain STOMP client calls with (module docs of stomp.rs)."""
        hdrs = {}
        if method is not None:
            hdrs["mqrpc-method"] = method
        hdrs["reply-to"] = self.named_queue if named else self.inbox
        hdrs["correlation-id"] = correlation
        if deadline is not None:
            hdrs["mqrpc-deadline-ms"] = str(deadline)
        hdrs.update({name: str(value) for name, value in (headers or {}).items()})
        return hdrs

    async def call(self, method, args, *, correlation=None, deadline=None, timeout=CALL_TIMEOUT, raw_body=None,
                   headers=None, named=False):
        correlation = correlation if correlation is not None else str(uuid.uuid4())
        hdrs = self.request_headers(method, correlation, deadline, named, headers)
        body = raw_body if raw_body is not None else pack(args)
        future = self.waiters[correlation] = self.loop.create_future()
        await self.send([(self.destination, body, hdrs)])
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            self.waiters.pop(correlation, None)
            return None

    async def call_many(self, requests, timeout):
        """requests: [(correlation, method, args)]; returns {correlation: Reply} of those answered in time."""
        futures = {}
        frames = []
        for correlation, method, args in requests:
            futures[correlation] = self.waiters[correlation] = self.loop.create_future()
            frames.append((self.destination, pack(args), self.request_headers(method, correlation, deadline=30_000)))
        await self.send(frames)
        done, _ = await asyncio.wait(futures.values(), timeout=timeout)
        for correlation, future in futures.items():
            if future not in done:
                self.waiters.pop(correlation, None)
        return {c: f.result() for c, f in futures.items() if f in done}

    async def oneway(self, method, args, headers=None):
        """No `reply-to`: a oneway call, confirmed by a receipt."""
        hdrs = {"mqrpc-method": method}
        hdrs.update(headers or {})
        await self.send([(self.destination, pack(args), hdrs)], confirm=True)

    async def read_queue(self, destination, want, timeout):
        """The messages of `destination` for which `want(headers)` holds, read (and so taken) by a subscription
        of their own for up to `timeout` s; returns as soon as one is found."""
        subscription = f"read-{uuid.uuid4().hex[:8]}"
        frames = self.readers[subscription] = []
        await self.run(lambda: self.connection.subscribe(destination, subscription, ack="auto"))
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not any(want(frame.headers) for frame in frames):
                await asyncio.sleep(0.05)
        finally:
            await self.run(lambda: self.connection.unsubscribe(subscription))
            await asyncio.sleep(0.2)
            self.readers.pop(subscription, None)
        return [frame for frame in frames if want(frame.headers)]


# --------------------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------------------

def ok_value(reply, expected, what):
    expect(reply is not None, f"{what}: no reply within {CALL_TIMEOUT:.0f} s")
    expect(reply.status == 0, f"{what}: status {reply.status} ({reply.message!r}), expected 0")
    value = reply.value()
    expect(value == expected, f"{what}: value {value!r}, expected {expected!r}")


async def alive(client, what="the worker"):
    reply = await client.call("add", {"a": 40, "b": 2})
    ok_value(reply, 42, f"{what} answers add(40, 2) afterwards")


async def check_result(client, ctx):
    """add(2, 3) = 5, the reply matched by its correlation id."""
    if isinstance(client, (MqrpcClient, ZmqClient)):
        correlation = uuid.uuid4().bytes
    elif isinstance(client, (AmqpClient, KafkaClient, StompClient, RedisClient)):
        correlation = str(uuid.uuid4())
    else:
        correlation = None
    reply = await client.call("add", {"a": 2, "b": 3}, correlation=correlation)
    ok_value(reply, 5, "add(2, 3)")
    if correlation is not None:
        expect(reply.correlation == correlation, f"correlation {reply.correlation!r} != {correlation!r}")


async def check_result_named_reply_queue(client, ctx):
    """RabbitMQ: the reply to a named (non-inbox) queue, the `reply_to` of a plain client. ActiveMQ: `reply-to`
    a `/queue/<name>` the client subscribes to."""
    correlation = str(uuid.uuid4())
    reply = await client.call("add", {"a": 2, "b": 3}, correlation=correlation, named=True)
    ok_value(reply, 5, "add(2, 3) answered on a named reply queue")
    expect(reply.correlation == correlation, f"correlation {reply.correlation!r} != {correlation!r}")
    if isinstance(client, StompClient):
        subscription = reply.raw.headers.get("subscription")
        expect(subscription == "named", f"the reply came on the subscription {subscription!r}, not the named queue's")


async def check_result_mqrpc_form(client, ctx):
    """Core NATS, the form between mqrpc processes: 0xc1 + sending time + envelope, reply in the same form."""
    correlation = uuid.uuid4()
    env = envelope(0, "add", pack({"a": 2, "b": 3}), correlation=correlation.bytes, deadline=5000)
    reply = await client.call_mqrpc_form(pack(env), correlation.hex)
    expect(reply is not None, "no reply to an mqrpc-form request")
    expect(reply.status != -1, reply.message or "")
    ok_value(reply, 5, "add(2, 3) in the mqrpc form")
    expect(reply.correlation == correlation.bytes, f"correlation {reply.correlation!r} != {correlation.bytes!r}")


async def check_result_mqrpc_compact_form(client, ctx):
    """Core NATS between mqrpc processes, the envelope's compact form (version 2): a request without `i`, `ik`
    and `a` (its id and key are its correlation id) is answered in version 2, without `i`, `s` and `m`."""
    correlation = uuid.uuid4()
    env = envelope(0, "add", pack({"a": 2, "b": 3}), correlation=correlation.bytes, deadline=5000, version=2)
    for key in ("i", "a"):
        del env[key]
    reply = await client.call_mqrpc_form(pack(env), correlation.hex)
    expect(reply is not None, "no reply to a compact mqrpc-form request")
    expect(reply.status != -1, reply.message or "")
    ok_value(reply, 5, "add(2, 3) in the compact mqrpc form")
    expect(reply.correlation == correlation.bytes, f"correlation {reply.correlation!r} != {correlation.bytes!r}")
    env = unpack(reply.raw.data[9:])
    expect(env.get("v") == 2, f"a compact request answered in version {env.get('v')!r}, not 2")
    expect("s" not in env and "m" not in env, f"a compact reply echoes the service or method: {env}")
    expect("i" not in env, f"a compact reply carries an id of its own: {env}")
    # The version-1 form is answered in version 1, with the echo.
    env = envelope(0, "add", pack({"a": 2, "b": 3}), correlation=correlation.bytes, deadline=5000)
    reply = await client.call_mqrpc_form(pack(env), correlation.hex)
    expect(reply is not None, "no reply to a version-1 mqrpc-form request")
    env = unpack(reply.raw.data[9:])
    expect(env.get("v") == 1, f"a version-1 request answered in version {env.get('v')!r}")
    expect(env.get("m") == "add", f"a version-1 reply without its method: {env}")


async def check_application_error(client, ctx):
    """div(1, 0) -> status 1, "DivideByZero"; div(7, 2) -> status 1, {"NotExact": {"remainder": 1}}."""
    for args, expected in (({"a": 1, "b": 0}, "DivideByZero"), ({"a": 7, "b": 2}, {"NotExact": {"remainder": 1}})):
        reply = await client.call("div", args)
        expect(reply is not None, f"div{tuple(args.values())}: no reply")
        expect(reply.status == 1, f"div{tuple(args.values())}: status {reply.status} ({reply.message!r}), expected 1")
        value = reply.value()
        expect(value == expected, f"div{tuple(args.values())}: error value {value!r}, expected {expected!r}")
    reply = await client.call("div", {"a": 8, "b": 2})
    ok_value(reply, 4, "div(8, 2)")


async def check_unknown_method(client, ctx):
    reply = await client.call("no_such_method", {})
    expect(reply is not None, "no reply to an unknown method")
    expect(reply.status == 2, f"status {reply.status} ({reply.message!r}), expected 2 (unknown method)")


async def check_bad_arguments(client, ctx):
    cases = [("a string for an i64", {"a": "two", "b": 3}), ("a missing parameter", {"a": 2}),
             ("a nil body", None), ("a bare integer", 5)]
    for what, args in cases:
        reply = await client.call("add", args)
        expect(reply is not None, f"{what}: no reply")
        expect(reply.status == 3, f"{what}: status {reply.status} ({reply.message!r}), expected 3 (invalid argument)")


async def check_positional_arguments(client, ctx):
    """wire-format.md, Bodies: the arguments may also be an array of the values in parameter order: `add` with
    `[2, 3]` answers 5. An array of the wrong length does not decode into the parameters: status 3."""
    reply = await client.call("add", [2, 3])
    expect(reply is not None and reply.status == 0, f"add([2, 3]): {reply!r}")
    expect(reply.value() == 5, f"add([2, 3]) = {reply.value()!r}, expected 5")
    short = await client.call("add", [2])
    expect(short is not None, "no reply to an array of one argument for two parameters")
    expect(short.status == 3, f"status {short.status} ({short.message!r}) for [2], expected 3 (invalid argument)")


async def check_deadline_propagates(client, ctx):
    """A 5 s budget (`d`, or `mqrpc-deadline-ms`) reaches the handler: `remaining` answers at most 5000."""
    reply = await client.call("remaining", {}, deadline=5000)
    expect(reply is not None and reply.status == 0, f"remaining(): {reply!r}")
    value = reply.value()
    expect(isinstance(value, int) and 0 < value <= 5000, f"remaining() = {value!r}, expected 0 < ms <= 5000")


async def check_deadline_from_expiration(client, ctx):
    """RabbitMQ: `expiration` is "the time budget"; a plain client that sets only `expiration: "5000"` gives the
    handler a budget of at most 5000 ms."""
    reply = await client.call("remaining", {}, properties={"expiration": "5000"})
    expect(reply is not None and reply.status == 0, f"remaining(): {reply!r}")
    value = reply.value()
    expect(isinstance(value, int) and 0 < value <= 5000, f"remaining() = {value!r}, expected 0 < ms <= 5000")


async def check_garbage_body(client, ctx):
    """Broker adapters: a body that is not MessagePack at all, where the arguments go: status 3."""
    reply = await client.call("add", None, raw_body=b"\xc1\xff\x00garbage")
    expect(reply is not None, "no reply to a body that is not MessagePack")
    expect(reply.status == 3, f"status {reply.status} ({reply.message!r}), expected 3 (invalid argument)")
    await alive(client)


async def check_garbage_envelope(client, ctx):
    """Our broker: a Publish payload that is not MessagePack is refused with Error{Invalid} (code 3), the
    connection stays open; the worker never sees it."""
    try:
        await client.publish(b"\xc1\xff\x00garbage bytes")
    except BrokerError as error:
        expect(error.code == 3, f"the broker refused the garbage with code {error.code}, expected 3 (invalid)")
    else:
        raise CheckFailed("the broker accepted a payload that is not MessagePack")
    await alive(client, "the connection and the worker")


async def check_not_envelope(client, ctx):
    """Our broker: valid MessagePack that is not an envelope (an array): no reply address, no answer; the worker
    survives it."""
    await client.publish(pack([1, 2, 3]))
    await client.publish(pack({"hello": "world"}))
    await alive(client)


async def check_incomplete_envelope(client, ctx):
    """A map with a readable reply address and correlation id but no `v`, `k`, `i`: status 8 expected."""
    correlation = uuid.uuid4().bytes
    future = client.expect_reply(correlation)
    await client.publish(pack({"c": correlation, "s": SERVICE, "m": "add", "r": client.inbox, "ri": True,
                               "b": pack({"a": 1, "b": 1})}), correlation=correlation)
    try:
        reply = await asyncio.wait_for(future, SILENCE * 2)
    except asyncio.TimeoutError:
        client.calls.pop(correlation, None)
        await alive(client)
        raise CheckFailed("no reply to an envelope without v/k/i whose reply address is readable "
                          "(expected status 8, invalid request)")
    expect(reply.status == 8, f"status {reply.status} ({reply.message!r}), expected 8 (invalid request)")
    await alive(client)


async def check_wrong_version(client, ctx):
    """An envelope with `v: 3`: "A reader rejects other versions", status 8 where the reply address is readable."""
    reply = await client.call("add", {"a": 2, "b": 3}, version=3, timeout=SILENCE * 2)
    await alive(client)
    expect(reply is not None, "no reply to a version-3 envelope (expected status 8, invalid request)")
    expect(reply.status == 8, f"status {reply.status} ({reply.message!r}) value {reply.body!r}, expected 8")


async def check_missing_method(client, ctx):
    """Broker adapters: a request without the method (`type` on AMQP, `mqrpc-method` on NATS) and a reply address:
    not a request the worker can handle, status 8."""
    reply = await client.call(None, {"a": 1, "b": 2}, timeout=SILENCE * 2)
    await alive(client)
    expect(reply is not None, "no reply to a request without a method (expected status 8, invalid request)")
    # 2 (unknown method, the empty name) is a typed answer too; anything else is not.
    expect(reply.status in (2, 8), f"status {reply.status} ({reply.message!r}), expected 8 (invalid request) or 2")


async def check_mqrpc_form_garbage(client, ctx):
    """Core NATS, mqrpc form: marker and time, then bytes that are not MessagePack; the reply subject is readable."""
    correlation = uuid.uuid4().hex
    reply = await client.call_mqrpc_form(b"\xc1\xc1garbage", correlation, timeout=SILENCE * 2)
    await alive(client)
    expect(reply is not None, "no reply to a garbage mqrpc-form message (expected status 8, invalid request)")
    expect(reply.status == 8, f"status {reply.status} ({reply.message!r}), expected 8")


async def check_mqrpc_form_not_envelope(client, ctx):
    correlation = uuid.uuid4().hex
    reply = await client.call_mqrpc_form(pack([1, 2, 3]), correlation, timeout=SILENCE * 2)
    await alive(client)
    expect(reply is not None, "no reply to an mqrpc-form array (expected status 8, invalid request)")
    expect(reply.status == 8, f"status {reply.status} ({reply.message!r}), expected 8")


async def check_mqrpc_form_wrong_version(client, ctx):
    correlation = uuid.uuid4()
    env = envelope(0, "add", pack({"a": 2, "b": 3}), correlation=correlation.bytes, version=3)
    reply = await client.call_mqrpc_form(pack(env), correlation.hex, timeout=SILENCE * 2)
    await alive(client)
    expect(reply is not None, "no reply to a version-3 mqrpc-form envelope (expected status 8, invalid request)")
    expect(reply.status == 8, f"status {reply.status} ({reply.message!r}), expected 8")


async def check_expired_deadline(client, ctx):
    """`d: 0` (or the deadline header 0): "0 means expired"; status 4, deadline exceeded."""
    reply = await client.call("add", {"a": 2, "b": 3}, deadline=0, timeout=SILENCE * 2)
    await alive(client)
    expect(reply is not None, "no reply to a request with deadline 0 (expected status 4, deadline exceeded)")
    expect(reply.status == 4, f"status {reply.status} ({reply.message!r}), expected 4 (deadline exceeded)")


async def check_old_send_time(client, ctx):
    """A 2 s budget sent a minute ago (`mqrpc-sent-at-ms`): the worker takes the time in transit off, status 4."""
    headers = {"mqrpc-sent-at-ms": now_ms() - 60_000}
    if not isinstance(client, AmqpClient):
        headers = {k: str(v) for k, v in headers.items()}
    reply = await client.call("add", {"a": 2, "b": 3}, deadline=2000, headers=headers, timeout=SILENCE * 2)
    await alive(client)
    expect(reply is not None, "no reply to a request whose budget ran out in transit (expected status 4)")
    expect(reply.status == 4, f"status {reply.status} ({reply.message!r}), expected 4 (deadline exceeded)")


async def check_old_send_time_mqrpc_form(client, ctx):
    """Core NATS, mqrpc form: a sending time a minute old against `d: 2000`: status 4."""
    correlation = uuid.uuid4()
    env = envelope(0, "add", pack({"a": 2, "b": 3}), correlation=correlation.bytes, deadline=2000)
    reply = await client.call_mqrpc_form(pack(env), correlation.hex, timeout=SILENCE * 2, sent_at=now_ms() - 60_000)
    await alive(client)
    expect(reply is not None, "no reply to an mqrpc-form request whose budget ran out in transit (expected 4)")
    expect(reply.status == 4, f"status {reply.status} ({reply.message!r}), expected 4")


async def check_expired_expiration(client, ctx):
    """RabbitMQ: `expiration` "the time budget, so RabbitMQ drops a request that expired while queued"; with
    `expiration: "0"` the request is dropped: no reply, the worker lives."""
    reply = await client.call("add", {"a": 2, "b": 3}, properties={"expiration": "0"}, timeout=SILENCE)
    await alive(client)
    expect(reply is None or reply.status == 4, f"a reply with status {reply and reply.status} to an expired request")


async def check_oneway(client, ctx):
    """`record` (oneway) then `count`: the worker took the oneway calls and still answers."""
    await client.oneway("record", {"n": 7})
    await client.oneway("record", {"n": "not a number"})
    await client.oneway("no_such_method", {})
    first = await client.call("count", {"n": 99})
    expect(first is not None and first.status == 0, f"count after oneway calls: {first!r}")
    second = await client.call("count", {"n": 99})
    ok_value(second, first.value() + 1, "count counts on after oneway calls")


def correlation_ids(client, n, form="mixed"):
    """The caller's own correlation ids, in forms the documents allow on this transport: `mixed` (all the forms
    below), `canonical` (lower-case hyphenated UUIDs; random 16 bytes on our broker, where `c` is bin 16),
    `upper` (upper-case UUIDs), `simple` (32 hex digits, no hyphens), `opaque` (not UUIDs: `req-17`)."""
    ids = []
    for i in range(n):
        u = uuid.uuid4()
        if form == "canonical":
            ids.append(bytes(random.getrandbits(8) for _ in range(16)) if isinstance(client, (MqrpcClient, ZmqClient))
                       else str(u))
            continue
        if form == "upper":
            ids.append(str(u).upper())
            continue
        if form == "simple":
            ids.append(u.hex)
            continue
        if form == "opaque":
            ids.append(f"req-{i}")
            continue
        u = uuid.uuid4()
        if isinstance(client, (MqrpcClient, ZmqClient)):  # bin 16, not necessarily a UUID
            ids.append(u.bytes if i % 2 else bytes(random.getrandbits(8) for _ in range(16)))
        elif isinstance(client, NatsClient) and i % 5 == 4:
            ids.append(u.hex.upper())  # 32 upper-case hex digits: the reply subject's last token
        elif i % 4 == 0:
            ids.append(str(u).upper())  # an upper-case UUID
        elif i % 4 == 1:
            ids.append(f"req-{i}")  # not a UUID
        elif i % 4 == 2:
            ids.append(u.hex)  # simple form
        else:
            ids.append(str(u))  # canonical
    return ids


async def run_concurrent(client, ids):
    """Every id's call at once; every reply matched to its call byte for byte."""
    args = {c: {"a": i, "b": 1000} for i, c in enumerate(ids)}
    problems = []
    if isinstance(client, MqrpcClient):
        futures = {}
        for c in ids:
            env = envelope(0, "add", pack(args[c]), correlation=c, reply_to=client.inbox, deadline=30_000)
            futures[c] = client.expect_reply(c)
            client.writer.write(client.frame(0x03, struct.pack(">I", 0) + s16(client.queue) + b"\x00" + opt(None)
                                             + opt(None) + key16(c) + key16(env["i"]) + pack(env)))
        done, _ = await asyncio.wait(futures.values(), timeout=60)
        replies = {c: f.result() for c, f in futures.items() if f in done and not f.exception()}
        stray = list(client.stray)
        client.stray.clear()
    elif isinstance(client, ZmqClient):
        async def one(c):
            return c, await client.call("add", args[c], correlation=c, deadline=30_000, timeout=60)
        results = await asyncio.gather(*(one(c) for c in ids))
        replies = {c: r for c, r in results if r is not None}
        stray = list(client.stray)
        client.stray.clear()
    elif isinstance(client, AmqpClient):
        requests = [(c, "add", pack(args[c]), {}, None) for c in ids]
        replies = await client.call_many(requests, 60)
        stray = sorted(client.replies)
        client.replies.clear()
    elif isinstance(client, (KafkaClient, StompClient, RedisClient)):
        replies = await client.call_many([(c, "add", args[c]) for c in ids], 60)
        stray = [reply.correlation for reply in client.stray]
        client.stray.clear()
    else:
        # NATS: the correlation id travels in `mqrpc-correlation-id` (the reply subject's last token is not
        # 32 hex digits), except for the simple-form ids, which are the reply subject's last token themselves.
        async def one(i, c):
            if len(c) == 32 and all(ch in "0123456789abcdefABCDEF" for ch in c):
                reply = await client.call("add", args[c], token=c, timeout=60)
            else:
                reply = await client.call("add", args[c], correlation=c, token=f"t{i}", timeout=60)
            return c, reply
        results = await asyncio.gather(*(one(i, c) for i, c in enumerate(ids)))
        replies = {c: r for c, r in results if r is not None}
        stray = []
    missing = [c for c in ids if c not in replies]
    for c in ids:
        reply = replies.get(c)
        if reply is None:
            continue
        if reply.correlation != c:
            problems.append(f"{c!r} came back as {reply.correlation!r}")
        elif reply.status != 0 or reply.value() != args[c]["a"] + 1000:
            problems.append(f"{c!r}: status {reply.status} value {reply.body!r}")
    expect(not missing and not problems,
           f"{len(missing)} of {len(ids)} calls without a reply (first: {missing[:3]!r}; {len(stray)} replies with "
           f"ids nobody sent, first: {stray[:3]!r}), "
           f"{len(problems)} mismatched (first: {problems[:3]})")


async def check_concurrent(client, ctx):
    """1,000 calls at once, correlation ids of the caller's own making in every form the documents allow on the
    transport, mixed, every reply matched byte for byte."""
    await run_concurrent(client, correlation_ids(client, CONCURRENT))


async def check_concurrent_canonical_ids(client, ctx):
    """1,000 calls at once with canonical UUIDs (random bin 16 on our broker): the concurrency alone."""
    await run_concurrent(client, correlation_ids(client, CONCURRENT, "canonical"))


async def check_correlation_upper_case_uuid(client, ctx):
    """An upper-case UUID as the correlation id (AMQP `correlation_id`; NATS `mqrpc-correlation-id`): echoed as sent."""
    await run_concurrent(client, correlation_ids(client, 20, "upper"))


async def check_correlation_simple_uuid(client, ctx):
    """RabbitMQ: a UUID without hyphens as `correlation_id`: echoed as sent."""
    await run_concurrent(client, correlation_ids(client, 20, "simple"))


async def check_correlation_non_uuid(client, ctx):
    """A correlation id that is no UUID at all (`req-17`): echoed as sent."""
    await run_concurrent(client, correlation_ids(client, 20, "opaque"))


async def check_null_value(client, ctx):
    """Kafka: a record with no value at all (null, not an empty MessagePack value) where the arguments go: the
    body is empty, the arguments do not decode, status 3."""
    reply = await client.call("add", None, no_value=True)
    expect(reply is not None, "no reply to a record without a value")
    expect(reply.status == 3, f"status {reply.status} ({reply.message!r}), expected 3 (invalid argument)")


async def check_status_on_request(client, ctx):
    """conformance.md, What a worker answers: a request carrying a status other than 0 is answered with status 8,
    not run."""
    reply = await client.call("add", {"a": 2, "b": 3}, headers={"mqrpc-status": "1"})
    expect(reply is not None, "no reply to a request carrying mqrpc-status: 1 (expected status 8)")
    expect(reply.status == 8, f"status {reply.status} ({reply.message!r}), expected 8 (invalid request)")


async def check_old_record_timestamp(client, ctx):
    """Kafka: "the time a request was queued counts from the record's timestamp"; a 2 s budget on a record whose
    timestamp (CreateTime, set by the producer) is a minute old: status 4."""
    reply = await client.call("add", {"a": 2, "b": 3}, deadline=2000, timestamp=now_ms() - 60_000,
                              timeout=SILENCE * 2)
    await alive(client)
    expect(reply is not None, "no reply to a request whose budget ran out in transit (expected status 4)")
    expect(reply.status == 4, f"status {reply.status} ({reply.message!r}), expected 4 (deadline exceeded)")


async def expect_dead_lettered(client, queue, correlation, what):
    """The record `correlation` reaches the dead-letter topic of `queue`, `<queue>.dlq` escaped as a queue name
    (conformance.md); if not, says where it went instead."""
    dlq = kafka_topic(f"{queue}.dlq")
    want = lambda headers: headers.get("mqrpc-correlation-id") == correlation  # noqa: E731
    found = await client.run(client.read_topic, dlq, want, 10)
    if not found:
        # Where it may have gone instead: the dead-letter name made from the already escaped topic name.
        twice = kafka_topic(f"{kafka_topic(queue)}.dlq")
        where = ""
        if twice != dlq:
            exists = twice in await client.run(client.admin.list_topics)
            elsewhere = exists and await client.run(client.read_topic, twice, want, 2)
            where = (f"; it is on {twice!r}, the topic of the queue's topic name plus `.dlq`" if elsewhere else
                     f"; nor on {twice!r} (the topic of the topic name plus `.dlq`, which "
                     f"{'exists' if exists else 'does not exist'})")
        raise CheckFailed(f"{what}: not on the dead-letter topic {dlq!r} within 10 s{where}")


async def check_reply_kind_dead_lettered(client, ctx):
    """conformance.md: a message of kind reply (`mqrpc-kind: reply`) on a service queue is dead-lettered, no
    answer; on Kafka the copy goes to the topic `<queue>.dlq` with its headers."""
    correlation = str(uuid.uuid4())
    reply = await client.call("add", {"a": 2, "b": 3}, correlation=correlation, headers={"mqrpc-kind": "reply"},
                              timeout=SILENCE)
    expect(reply is None, f"an answer to a message of kind reply: {reply!r}")
    await expect_dead_lettered(client, client.queue, correlation, "the reply-kind message")
    await alive(client)


async def check_reply_kind_dead_lettered_queue(client, ctx):
    """ActiveMQ: a message of kind reply (`mqrpc-kind: reply`) on a service queue is dead-lettered (conformance.md,
    What a worker answers), no answer; the module docs of stomp.rs: "a copy on `<queue>.dlq`"."""
    correlation = str(uuid.uuid4())
    reply = await client.call("add", {"a": 2, "b": 3}, correlation=correlation, headers={"mqrpc-kind": "reply"},
                              timeout=SILENCE)
    expect(reply is None, f"an answer to a message of kind reply: {reply!r}")
    dlq = f"/queue/{client.queue}.dlq"
    found = await client.read_queue(dlq, lambda headers: headers.get("correlation-id") == correlation, 10)
    expect(found, f"the reply-kind message is not on {dlq} within 10 s")
    await alive(client)


async def check_user_headers(client, ctx):
    """ActiveMQ: "user headers travel as headers" (module docs of stomp.rs), and "a reply echoes its request's
    headers" (wire-format.md, `h`): two headers of the caller's own, one with a `:` and a `\\` (STOMP 1.2 escapes
    them), come back on the reply with the same values."""
    sent = {"interop-tag": f"tag-{uuid.uuid4().hex[:8]}", "interop-escaped": "a:b\\c"}
    reply = await client.call("add", {"a": 2, "b": 3}, headers=sent)
    ok_value(reply, 5, "add(2, 3) with user headers")
    got = {name: reply.raw.headers.get(name) for name in sent}
    expect(got == sent, f"the reply's user headers are {got!r}, expected {sent!r}")


async def check_reply_topic_escaped(client, ctx):
    """Kafka: `mqrpc-reply-to` is "a topic it reads"; a reply topic whose name has `_` (common in Kafka) gets the
    reply, under that very name."""
    topic = f"interop_replies_{uuid.uuid4().hex[:12]}"
    client.topics.append(topic)
    await client.run(client.create_topic, topic)
    correlation = str(uuid.uuid4())
    reply = await client.call("add", {"a": 2, "b": 3}, correlation=correlation, reply_topic=topic, timeout=0.1)
    expect(reply is None, f"the reply came to the client's own reply topic: {reply!r}")
    want = lambda headers: headers.get("mqrpc-correlation-id") == correlation  # noqa: E731
    found = await client.run(client.read_topic, topic, want, CALL_TIMEOUT)
    if not found:
        escaped = kafka_topic(topic)
        client.topics.append(escaped)
        exists = escaped in await client.run(client.admin.list_topics)
        elsewhere = exists and await client.run(client.read_topic, escaped, want, 2)
        where = (f"; it went to {escaped!r}, the name escaped as a queue's" if elsewhere else
                 f"; the name escaped as a queue's, {escaped!r}, {'exists' if exists else 'is no topic'}")
        raise CheckFailed(f"no reply on the reply topic {topic!r} within {CALL_TIMEOUT:.0f} s{where}")
    record = found[0]
    status = kafka_headers(record).get("mqrpc-status")
    expect(status is None and unpack(record.value) == 5, f"the reply: status {status!r}, value {record.value!r}")
    await alive(client)


async def check_dead_letter_escaped_queue(client, ctx):
    """Kafka: a queue whose name has a byte the topic name escapes (`_`): its dead letters go to the topic of
    `<queue>.dlq` (the one the worker declared with the queue). Runs a second probe-worker, in the namespace
    `interop_<hex>`, and dead-letters a reply-kind message there."""
    namespace = f"interop_{uuid.uuid4().hex[:8]}"
    queue = f"{namespace}.{SERVICE}"
    topics = [kafka_topic(queue), kafka_topic(f"{queue}.dlq"), kafka_topic(f"{kafka_topic(queue)}.dlq"),
              kafka_topic(f"{queue}.broadcast")]
    worker = await start_process([ctx["worker_path"], ctx["url"], namespace, "w2"],
                                 log=open(f"{ctx['log_dir']}/worker-kafka-escaped.log", "wb"))
    try:
        line = await read_line(worker.stdout, 30)
        expect(line == "ready", f"the second worker printed {line!r}, not ready")
        correlation = str(uuid.uuid4())
        headers = {"mqrpc-kind": "reply", "mqrpc-method": "add", "mqrpc-reply-to": client.reply_topic,
                   "mqrpc-reply-inbox": "true", "mqrpc-correlation-id": correlation}
        await client.run(client._send, [(headers, pack({"a": 2, "b": 3}), None)], topics[0])
        await expect_dead_lettered(client, queue, correlation, "a reply-kind message on the queue " + repr(queue))
    finally:
        await terminate(worker, 30)
        client.topics.extend(topics)
        ctx["groups"].extend([topics[0], f"{topics[0]}.mqrpc-delivered", f"{topics[3]}@{SERVICE}",
                              f"{topics[3]}@{SERVICE}.mqrpc-delivered"])


async def check_zmq_undecodable_request(client, ctx):
    """ZeroMQ: a REQUEST whose envelope is not MessagePack, or MessagePack that is no envelope and names no reply
    address, is settled with ACK and dropped; the worker answers the next call."""
    for payload in (b"\xc1\xff\x00garbage bytes", pack([1, 2, 3]), pack({"hello": "world"})):
        settled = await client.publish(payload)
        await asyncio.wait_for(settled, CALL_TIMEOUT)
    await alive(client)


async def check_zmq_malformed_messages(client, ctx):
    """ZeroMQ: messages that are not the protocol's (another protocol frame, an unknown command, a command with
    the wrong number of frames, a number frame of the wrong size, more than eight frames) are dropped; the
    connection and the worker go on."""
    await client.socket.send_multipart([b"MDPC02", b"\x02", b"x"])
    await client.send([b"\x7f"])
    await client.send([b"\x02" + struct.pack(">QIQ", 1, 1, 0), b"only the queue"])
    await client.send([b"\x02" + struct.pack(">QI", 1, 1), client.queue.encode(), b"\x80"])
    await client.send([b"\x03"] * 9)
    await alive(client, "the connection and the worker")


async def check_zmq_refused_for_an_unserved_queue(client, ctx):
    """ZeroMQ: a REQUEST for a queue the worker does not serve is answered REFUSED, and nothing else."""
    def refusals():
        return len([entry for entry in client.stray if isinstance(entry, tuple) and entry[0] == "refused"])
    before = refusals()
    await client.publish(pack(envelope(2, "record", pack({"n": 1}))), queue="interop.nobody-serves-this")
    deadline = time.monotonic() + CALL_TIMEOUT
    while refusals() == before:
        expect(time.monotonic() < deadline, "no REFUSED for a request to a queue the worker does not serve")
        await asyncio.sleep(0.01)
    await alive(client)


async def check_zmq_sync_marker_on_pub(client, ctx):
    """ZeroMQ: a libzmq SUB connected to the worker's PUB socket (its endpoint from READY) gets the marker a
    SYNC asks for, `[topic, MQRPC-ZMQ/1, 0x22]`, and only what matches its subscription."""
    import zmq
    import zmq.asyncio
    expect(client.publishes.startswith(b"tcp://"), f"READY names no PUB endpoint: {client.publishes!r}")
    mine = f"mqrpc.sync/py{uuid.uuid4().hex}/".encode()
    other = f"mqrpc.sync/other{uuid.uuid4().hex}/".encode()
    sub = client.context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, mine)
    sub.connect(client.publishes.decode())
    try:
        deadline = time.monotonic() + CALL_TIMEOUT
        while True:
            expect(time.monotonic() < deadline, "no marker on the worker's PUB socket for a SYNC")
            # A marker nobody here subscribed to, then ours: the publisher filters, so ours comes first.
            await client.send([b"\x04", other + b"x"])
            await client.send([b"\x04", mine + b"x"])
            # Asked again until the subscription reaches the publisher (ZeroMQ's slow joiner).
            if await sub.poll(100):
                frames = await sub.recv_multipart()
                break
        expect(frames == [mine + b"x", ZMQ_PROTOCOL, b"\x22"], f"the marker read {frames!r}")
    finally:
        sub.close(0)
    await alive(client)


async def check_worker_alive(client, ctx):
    expect(ctx["worker"].returncode is None, f"the worker exited with {ctx['worker'].returncode}")
    await alive(client)


CHECKS = {
    "broker": [check_result, check_application_error, check_unknown_method, check_bad_arguments,
               check_positional_arguments, check_deadline_propagates,
               check_garbage_envelope, check_not_envelope, check_incomplete_envelope, check_wrong_version,
               check_expired_deadline, check_oneway, check_concurrent_canonical_ids, check_concurrent,
               check_worker_alive],
    "rabbitmq": [check_result, check_result_named_reply_queue, check_application_error, check_unknown_method,
                 check_bad_arguments, check_positional_arguments, check_deadline_propagates,
                 check_deadline_from_expiration, check_garbage_body, check_missing_method, check_status_on_request,
                 check_expired_deadline,
                 check_old_send_time, check_expired_expiration, check_oneway, check_concurrent_canonical_ids,
                 check_correlation_upper_case_uuid, check_correlation_simple_uuid, check_correlation_non_uuid,
                 check_concurrent, check_worker_alive],
    "nats": [check_result, check_result_mqrpc_form, check_result_mqrpc_compact_form, check_application_error,
             check_unknown_method, check_bad_arguments, check_positional_arguments, check_deadline_propagates, check_garbage_body,
             check_missing_method, check_status_on_request, check_mqrpc_form_garbage,
             check_mqrpc_form_not_envelope, check_mqrpc_form_wrong_version, check_expired_deadline,
             check_old_send_time, check_old_send_time_mqrpc_form, check_oneway, check_concurrent_canonical_ids,
             check_correlation_upper_case_uuid, check_correlation_non_uuid, check_concurrent, check_worker_alive],
    # JetStream: no old_send_time check; the adapter counts the time queued from the stream's storage time, which
    # adapters.md allows ("the broker's storage time or the sender's mqrpc-sent-at-ms").
    "jetstream": [check_result, check_application_error, check_unknown_method, check_bad_arguments,
                  check_positional_arguments, check_deadline_propagates, check_garbage_body, check_missing_method,
                  check_status_on_request, check_expired_deadline, check_oneway, check_concurrent_canonical_ids,
                  check_correlation_upper_case_uuid, check_correlation_non_uuid, check_concurrent, check_worker_alive],
    # Kafka: the time queued counts from the record's timestamp (old_record_timestamp), `mqrpc-sent-at-ms` is not
    # read; no header carries the envelope's version, so no wrong_version.
    "kafka": [check_result, check_application_error, check_unknown_method, check_bad_arguments,
              check_positional_arguments, check_deadline_propagates, check_garbage_body, check_null_value,
              check_missing_method, check_status_on_request, check_reply_kind_dead_lettered, check_expired_deadline,
              check_old_record_timestamp, check_oneway, check_concurrent_canonical_ids,
              check_correlation_upper_case_uuid, check_correlation_simple_uuid, check_correlation_non_uuid,
              check_concurrent, check_reply_topic_escaped, check_dead_letter_escaped_queue, check_worker_alive],
    # ZeroMQ: the envelope travels whole, as on our broker; a message the worker cannot read is dropped (and a
    # request settled), since no broker stands between to refuse it.
    "zeromq": [check_result, check_application_error, check_unknown_method, check_bad_arguments,
               check_positional_arguments, check_deadline_propagates, check_zmq_undecodable_request,
               check_zmq_malformed_messages, check_zmq_refused_for_an_unserved_queue, check_incomplete_envelope,
               check_wrong_version, check_expired_deadline, check_oneway, check_concurrent_canonical_ids,
               check_concurrent, check_zmq_sync_marker_on_pub, check_worker_alive],
    # Redis Streams: entry fields as Kafka's record headers; the time queued counts from `mqrpc-sent-at-ms`.
    "redis": [check_result, check_application_error, check_unknown_method, check_bad_arguments,
              check_positional_arguments, check_deadline_propagates, check_garbage_body, check_missing_method,
              check_status_on_request, check_expired_deadline, check_old_send_time, check_oneway,
              check_concurrent_canonical_ids, check_correlation_upper_case_uuid, check_correlation_simple_uuid,
              check_correlation_non_uuid, check_concurrent, check_worker_alive],
    # ActiveMQ over STOMP: no header carries the envelope's version, so no wrong_version; the time budget is
    # `mqrpc-deadline-ms` (STOMP's `expires` is not in the module docs), the time queued `mqrpc-sent-at-ms`.
    "activemq": [check_result, check_result_named_reply_queue, check_application_error, check_unknown_method,
                 check_bad_arguments, check_positional_arguments, check_deadline_propagates, check_garbage_body,
                 check_missing_method, check_status_on_request, check_reply_kind_dead_lettered_queue,
                 check_expired_deadline, check_old_send_time, check_user_headers, check_oneway,
                 check_concurrent_canonical_ids, check_correlation_upper_case_uuid, check_correlation_simple_uuid,
                 check_correlation_non_uuid, check_concurrent, check_worker_alive],
}


def check_name(function):
    return function.__name__.removeprefix("check_")


# --------------------------------------------------------------------------------------------------------------
# Processes and the run
# --------------------------------------------------------------------------------------------------------------

async def read_line(stream, timeout):
    line = await asyncio.wait_for(stream.readline(), timeout)
    if not line:
        raise CheckFailed("the process closed its stdout")
    return line.decode().strip()


async def start_process(args, env=None, log=None):
    return await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=log or asyncio.subprocess.DEVNULL, stdin=asyncio.subprocess.DEVNULL,
        env={**os.environ, **(env or {})}, start_new_session=True)


async def terminate(process, timeout):
    """SIGTERM, then wait; SIGKILL after `timeout`. Returns (returncode, rest of stdout, killed)."""
    if process.returncode is not None:
        return process.returncode, "", False
    process.send_signal(signal.SIGTERM)
    try:
        out = await asyncio.wait_for(process.stdout.read(), timeout)
        await asyncio.wait_for(process.wait(), 5)
        return process.returncode, out.decode(errors="replace"), False
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()
        return process.returncode, "", True


class Results:
    def __init__(self, known_gaps):
        self.known = known_gaps
        self.passed = self.failed = self.gaps = 0
        self.seen = set()

    def record(self, transport, check, error):
        name = f"{transport} {check}"
        self.seen.add(name)
        if name in self.known:
            if error is None:
                self.failed += 1
                print(f"FAIL {name}: listed as a known gap, but it passes (remove it from the list)", flush=True)
            else:
                self.gaps += 1
                print(f"known gap {name}: {error}", flush=True)
        elif error is None:
            self.passed += 1
            print(f"ok {name}", flush=True)
        else:
            self.failed += 1
            print(f"FAIL {name}: {error}", flush=True)


async def run_transport(transport, args, results):
    namespace = f"interop{uuid.uuid4().hex[:8]}"
    broker = None
    env = {}
    logdir = args.log_dir
    os.makedirs(logdir, exist_ok=True)
    cleanup = []
    url = None
    try:
        try:
            if transport == "broker":
                broker = await start_process([args.worker, "--broker"], log=open(f"{logdir}/broker.log", "wb"))
                expect(await read_line(broker.stdout, 15) == "ready", "our broker did not print ready")
                url = await read_line(broker.stdout, 5)
                await read_line(broker.stdout, 5)
                client = MqrpcClient(url, namespace)
            elif transport == "rabbitmq":
                url = args.amqp_url
                client = AmqpClient(url, namespace)
            elif transport == "nats":
                url = args.nats_url
                client = NatsClient(url, namespace)
            elif transport == "activemq":
                url = args.stomp_url
                client = StompClient(url, namespace)
            elif transport == "zeromq":
                url = f"zmq-worker://127.0.0.1:{free_port()}"
                client = ZmqClient(url, namespace)
            elif transport == "redis":
                url = args.redis_url
                client = RedisClient(url, namespace)
                cleanup.append(lambda: delete_redis(url, namespace))
            elif transport == "kafka":
                url = f"kafka://{kafka_bootstrap(args.kafka_url)}"
                client = KafkaClient(url, namespace)
                topic = kafka_topic(f"{namespace}.{SERVICE}")
                broadcast = kafka_topic(f"{namespace}.{SERVICE}.broadcast")
                groups = [topic, f"{topic}.mqrpc-delivered", f"{broadcast}@{SERVICE}",
                          f"{broadcast}@{SERVICE}.mqrpc-delivered"]
                topics = [topic, kafka_topic(f"{namespace}.{SERVICE}.dlq"), broadcast]
                cleanup.append(lambda: delete_kafka(url, topics, groups))
            else:
                url = args.nats_url
                prefix = f"MQRPCI{uuid.uuid4().hex[:12]}"
                env["MQRPC_PROBE_STREAM_PREFIX"] = prefix
                client = NatsClient(url, namespace, jetstream=True, stream_prefix=prefix)
                cleanup.append(lambda: delete_streams(url, prefix))
            worker = await start_process([args.worker, url, namespace, "w1"], env=env,
                                         log=open(f"{logdir}/worker-{transport}.log", "wb"))
            ctx = {"worker": worker, "namespace": namespace, "worker_path": args.worker, "url": url,
                   "log_dir": logdir, "groups": groups if transport == "kafka" else []}
            try:
                line = await read_line(worker.stdout, 30)
                expect(line == "ready", f"the worker printed {line!r}, not ready")
            except (asyncio.TimeoutError, CheckFailed) as error:
                await terminate(worker, 5)
                raise CheckFailed(f"the worker did not start: {error!r} (log: {logdir}/worker-{transport}.log)")
            await asyncio.wait_for(client.start(), 15)
            try:
                for check in CHECKS[transport]:
                    error = None
                    try:
                        await asyncio.wait_for(check(client, ctx), 120)
                    except CheckFailed as failure:
                        error = str(failure)
                    except asyncio.TimeoutError:
                        error = "the check timed out"
                    except Exception as failure:  # noqa: BLE001
                        error = f"{type(failure).__name__}: {failure}"
                        if args.verbose:
                            traceback.print_exc()
                    results.record(transport, check_name(check), error)
            finally:
                await client.stop()
            code, out, killed = await terminate(worker, 30)
            stopped = [line for line in out.splitlines() if line.startswith("stopped")]
            if killed:
                error = "still running 30 s after SIGTERM (killed)"
            elif code != 0:
                error = f"exited with {code} after SIGTERM"
            elif not stopped:
                error = f"exited without a stopped line: {out!r}"
            else:
                error = None
                if args.verbose:
                    print(f"  {transport}: {stopped[0]}", flush=True)
            results.record(transport, "clean_exit", error)
        except Exception as error:  # noqa: BLE001 - the transport could not be set up: one failure for it
            results.record(transport, "setup", f"{type(error).__name__}: {error}")
        try:
            # worker.py has no Redis Streams worker: on Redis, Python calls the Rust worker only.
            if url is not None and transport != "redis":
                await run_rust_client(transport, url, env, args, results)
        except Exception as error:  # noqa: BLE001 - the phase could not be set up: one failure for it
            results.record(transport, "rust_client_setup", f"{type(error).__name__}: {error}")
    finally:
        if broker is not None:
            await terminate(broker, 10)
        for step in cleanup:
            try:
                await asyncio.wait_for(step(), 10)
            except Exception:
                pass


CLIENT_TIMEOUT = 180  # seconds for the whole run of probe-client


async def run_rust_client(transport, url, env, args, results):
    """The second phase: the Python worker (worker.py) serves, the Rust `probe-client` calls it.

    Each `ok NAME` / `FAIL NAME: WHY` line of probe-client becomes the check `rust_client_NAME`; then the worker
    gets SIGTERM and must exit with status 0 (`python_worker_clean_exit`).
    """
    namespace = f"interop{uuid.uuid4().hex[:8]}"
    logdir = args.log_dir
    worker_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")
    client_url = url
    if transport == "zeromq":
        # Brokerless: worker.py binds a port of its own, which the Rust client is given to connect to.
        endpoint = f"127.0.0.1:{free_port()}"
        url, client_url = f"zmq-worker://{endpoint}", f"zmq://{endpoint}"
    worker = await start_process([sys.executable, worker_py, transport, url, namespace], env=env,
                                 log=open(f"{logdir}/python-worker-{transport}.log", "wb"))
    try:
        try:
            line = await read_line(worker.stdout, 30)
            expect(line == "ready", f"worker.py printed {line!r}, not ready")
        except (asyncio.TimeoutError, CheckFailed) as error:
            await terminate(worker, 5)
            raise CheckFailed(f"worker.py did not start: {error!r} (log: {logdir}/python-worker-{transport}.log)")
        client = await start_process([args.client, client_url, namespace], env=env,
                                     log=open(f"{logdir}/rust-client-{transport}.log", "wb"))
        reported = 0
        try:
            while True:
                raw = await asyncio.wait_for(client.stdout.readline(), CLIENT_TIMEOUT)
                if not raw:
                    break
                line = raw.decode(errors="replace").strip()
                if args.verbose:
                    print(f"  {transport} probe-client: {line}", flush=True)
                if line.startswith("ok "):
                    results.record(transport, f"rust_client_{line[3:].strip()}", None)
                    reported += 1
                elif line.startswith("FAIL "):
                    name, _, why = line[5:].partition(":")
                    results.record(transport, f"rust_client_{name.strip()}", why.strip() or "failed")
                    reported += 1
            code = await asyncio.wait_for(client.wait(), 10)
            if code not in (0, 1) or reported == 0:
                results.record(transport, "rust_client_run",
                               f"probe-client exited with {code} after {reported} checks "
                               f"(log: {logdir}/rust-client-{transport}.log)")
        except asyncio.TimeoutError:
            client.kill()
            await client.wait()
            results.record(transport, "rust_client_run", f"probe-client still running after {CLIENT_TIMEOUT} s (killed)")
    finally:
        code, out, killed = await terminate(worker, 30)
        if killed:
            error = "still running 30 s after SIGTERM (killed)"
        elif code != 0:
            error = f"exited with {code} after SIGTERM (log: {logdir}/python-worker-{transport}.log)"
        else:
            error = None
            if args.verbose:
                print(f"  {transport}: worker.py {out.strip()}", flush=True)
        results.record(transport, "python_worker_clean_exit", error)
        if transport == "rabbitmq":
            try:
                await asyncio.wait_for(delete_amqp_queue(url, f"{namespace}.{SERVICE}"), 10)
            except Exception:
                pass
        if transport == "kafka":
            topic = kafka_topic(f"{namespace}.{SERVICE}")
            try:
                await asyncio.wait_for(delete_kafka(url, [topic, kafka_topic(f"{namespace}.{SERVICE}.dlq")], [topic]), 15)
            except Exception:
                pass


def free_port():
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def delete_amqp_queue(url, queue):
    """Deletes the durable queue worker.py declared (it has no expiry of its own)."""
    def delete():
        import pika
        connection = pika.BlockingConnection(pika.URLParameters(url))
        try:
            connection.channel().queue_delete(queue)
        finally:
            connection.close()
    await asyncio.get_running_loop().run_in_executor(None, delete)


async def delete_redis(url, namespace):
    """The run's keys: its queues' streams and declarations (`mqrpc:q:<namespace>.*`, `mqrpc:meta:...`) and
    topics."""
    import redis.asyncio as aioredis
    client = aioredis.from_url(url)
    try:
        for pattern in (f"mqrpc:q:{namespace}.*", f"mqrpc:meta:{namespace}.*", f"mqrpc:t:{namespace}.*"):
            keys = [key async for key in client.scan_iter(match=pattern)]
            if keys:
                await client.delete(*keys)
    finally:
        await client.aclose()


async def delete_streams(url, prefix):
    import nats
    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            if info.config.name.startswith(prefix):
                await js.delete_stream(info.config.name)
    finally:
        await nc.close()


async def delete_kafka(url, topics, groups):
    """Deletes the topics and consumer groups a run made (the broker keeps them otherwise)."""
    def delete():
        from kafka.admin import KafkaAdminClient
        admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap(url), client_id="interop-python")
        try:
            existing = set(admin.list_topics())
            present = [topic for topic in topics if topic in existing]
            if present:
                admin.delete_topics(present)
            try:
                admin.delete_groups(groups)
            except Exception:  # noqa: BLE001 - a broker that cannot delete groups keeps them
                pass
        finally:
            admin.close()
    await asyncio.get_running_loop().run_in_executor(None, delete)


def read_known_gaps(path):
    gaps = set()
    if path:
        with open(path) as file:
            for line in file:
                line = line.split("#", 1)[0].split()
                if line:
                    gaps.add(" ".join(line[:2]))
    return gaps


async def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", required=True, help="the probe-worker binary")
    parser.add_argument("--client", required=True, help="the probe-client binary (calls worker.py)")
    parser.add_argument("--known-gaps", help="file of `transport check` lines expected to fail")
    parser.add_argument("--amqp-url", default=os.environ.get("MQRPC_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"))
    parser.add_argument("--nats-url", default=os.environ.get("MQRPC_NATS_URL", "nats://127.0.0.1:4222"))
    parser.add_argument("--kafka-url", default=os.environ.get("MQRPC_KAFKA_URL", "127.0.0.1:9092"),
                        help="host:port (or kafka://host:port) of a Kafka-protocol broker")
    parser.add_argument("--redis-url", default=os.environ.get("MQRPC_REDIS_URL", "redis://127.0.0.1:6379"))
    parser.add_argument("--stomp-url", default=os.environ.get("MQRPC_STOMP_URL", "stomp://127.0.0.1:61623"),
                        help="stomp://[login:passcode@]host:port of ActiveMQ's STOMP connector")
    parser.add_argument("--transports",
                        default=os.environ.get("INTEROP_TRANSPORTS", "broker,rabbitmq,nats,jetstream,kafka,activemq,zeromq,redis"),
                        help="comma-separated subset of broker,rabbitmq,nats,jetstream,kafka,activemq,zeromq")
    parser.add_argument("--log-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "mqrpc-interop"),
                        help="where the worker's and broker's stderr go")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    args.worker = os.path.abspath(args.worker)
    args.client = os.path.abspath(args.client)
    known = read_known_gaps(args.known_gaps)
    results = Results(known)
    for transport in args.transports.split(","):
        await run_transport(transport.strip(), args, results)
    unseen = sorted(name for name in known if name not in results.seen
                    and name.split()[0] in args.transports.split(","))
    for name in unseen:
        results.failed += 1
        print(f"FAIL {name}: listed as a known gap, but no such check ran", flush=True)
    summary = f"interop: {results.passed} passed, {results.failed} failed"
    if known:
        summary += f", {results.gaps} known gaps"
    print(summary, flush=True)
    return 1 if results.failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
