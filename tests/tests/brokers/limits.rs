//! Our broker's limits, each lowered until it is reached, and what a peer gets then: a peer that has not
//! logged in holds next to nothing whatever it sends; large frames being received share a budget; connections,
//! unacked deliveries, the write backlog of a peer that does not read, and the memory high-watermark.

use std::process::Command;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use mqrpc_tests::{RemoteHarness, WorkerProcess, eventually};
use rpc_broker::Remote;
use rpc_broker::protocol::{
    ClientFrame, DEFAULT_MAX_FRAME, ErrorCode, Frame, FrameCodec, PROTOCOL_VERSION, ServerFrame,
};
use rpc_broker::server::ServerConfig;
use rpc_core::transport::Confirm;
use rpc_core::{ConsumeOptions, Envelope, Error, Kind, QueueOptions, Transport};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio_util::codec::FramedRead;

use super::WAIT;

const TOKEN: &str = "s3cret";

/// The resident set of process `pid`, in bytes, as the kernel reports it.
fn rss(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reads the process's status");
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).expect("a VmRSS line");
    let kib: usize = line.split_whitespace().nth(1).and_then(|kib| kib.parse().ok()).expect("a size in kB");
    kib * 1024
}

/// The host and port of a `mqrpc://[token@]host:port` URL.
fn address(url: &str) -> String {
    let rest = url.trim_start_matches("mqrpc://");
    rest.rsplit_once('@').map_or(rest, |(_, address)| address).to_owned()
}

/// A oneway message carrying `body`.
fn message(body: Bytes) -> Envelope {
    let mut envelope = Envelope::new(Kind::Oneway);
    envelope.body = body;
    envelope
}

fn encoded(frame: &impl Frame) -> BytesMut {
    let mut buf = BytesMut::new();
    frame.encode(&mut buf);
    buf
}

/// The next frame other than a heartbeat the broker sends on `frames`, within [`WAIT`].
async fn next_frame(frames: &mut FramedRead<OwnedReadHalf, FrameCodec>) -> ServerFrame {
    loop {
        let frame = tokio::time::timeout(WAIT, frames.next()).await.expect("the broker answers in time");
        match ServerFrame::parse(frame.expect("a frame").expect("a whole frame")).expect("a frame this build knows") {
            ServerFrame::Ping => {}
            frame => return frame,
        }
    }
}

/// A connection that has logged in, split into the frames it reads and the half it writes.
async fn logged_in(address: &str) -> (FramedRead<OwnedReadHalf, FrameCodec>, tokio::net::tcp::OwnedWriteHalf) {
    let stream = TcpStream::connect(address).await.expect("connects");
    let (read, mut write) = stream.into_split();
    let hello = ClientFrame::Hello { version: PROTOCOL_VERSION, token: TOKEN.into(), name: "limits".into() };
    write.write_all(&encoded(&hello)).await.expect("sends its handshake");
    let mut frames = FramedRead::new(read, FrameCodec::new(DEFAULT_MAX_FRAME));
    assert!(matches!(next_frame(&mut frames).await, ServerFrame::Welcome { .. }), "not welcomed");
    (frames, write)
}

/// A hundred connections that never log in each send a frame of the largest size the broker accepts from a
/// peer that has: each is refused at its length prefix, and the broker's resident set stays where it was
/// idle. Before, the broker held each such frame whole until the handshake timed out (16 MiB a connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_that_never_log_in_make_the_broker_hold_nothing() {
    const PEERS: usize = 100;
    let mut command = Command::new(env!("CARGO_BIN_EXE_probe-worker"));
    command.arg("--broker").env("MQRPC_PROBE_BROKER_TOKEN", TOKEN);
    let mut broker = WorkerProcess::spawn(command);
    let address = address(&broker.line());
    let idle = rss(broker.id());

    let mut peers = Vec::new();
    for _ in 0..PEERS {
        let stream = TcpStream::connect(&address).await.expect("connects");
        let (read, mut write) = stream.into_split();
        let mut frames = FramedRead::new(read, FrameCodec::new(DEFAULT_MAX_FRAME));
        let len = u32::try_from(DEFAULT_MAX_FRAME).expect("fits");
        write.write_all(&len.to_be_bytes()).await.expect("sends the length prefix");
        match next_frame(&mut frames).await {
            ServerFrame::Error { code: ErrorCode::TooLarge, .. } => {}
            other => panic!("expected a refusal of the frame, got {other:?}"),
        }
        // The rest of the frame: the broker closed the connection, so most of it is refused by the socket.
        let body = vec![0x0d; DEFAULT_MAX_FRAME];
        let _ = write.write_all(&body).await;
        peers.push((frames, write));
    }
    let held = rss(broker.id());
    eprintln!("broker RSS: idle {} KiB, after {PEERS} peers {} KiB", idle / 1024, held / 1024);
    assert!(held <= idle + 6 * 1024 * 1024, "the broker grew from {idle} to {held} bytes");
    drop(peers);
    broker.stop();
}

/// Large frames being received count against one budget across connections: with a 32 MiB budget, two
/// logged-in peers each sending a 16 MiB frame slowly fill it, and every further one is refused with `Limit` at
/// its length prefix. A whole frame gives its share back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_frames_being_received_share_one_budget() {
    const FRAME: usize = 16 << 20;
    let mut config = ServerConfig::default();
    config.token = Some(TOKEN.into());
    config.receive_budget = 2 * FRAME;
    let harness = RemoteHarness::start_with(config).await;
    let address = address(&harness.url());
    let prefix = u32::try_from(FRAME).expect("fits").to_be_bytes();

    let mut slow = Vec::new();
    for _ in 0..2 {
        let (frames, mut write) = logged_in(&address).await;
        write.write_all(&prefix).await.expect("sends the length prefix");
        write.write_all(&[0x0d; 1024]).await.expect("sends the start of the frame");
        slow.push((frames, write));
        let charged = slow.len() * FRAME;
        eventually("the frame to be charged", WAIT, || harness.server().stats().receiving == charged).await;
    }
    for _ in 0..10 {
        let (mut frames, mut write) = logged_in(&address).await;
        write.write_all(&prefix).await.expect("sends the length prefix");
        match next_frame(&mut frames).await {
            ServerFrame::Error { code: ErrorCode::Limit, .. } => {}
            other => panic!("expected a refusal over the budget, got {other:?}"),
        }
    }
    assert_eq!(harness.server().stats().receiving, 2 * FRAME);
    // One of the slow peers closes: its share comes back.
    drop(slow.pop());
    eventually("the closed peer's share to come back", WAIT, || harness.server().stats().receiving == FRAME).await;
}

/// Past `max_connections`, a new connection is refused with `Limit` before its handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_are_refused() {
    let mut config = ServerConfig::default();
    config.max_connections = 2;
    let harness = RemoteHarness::start_with(config).await;
    let _first = Remote::connect(&harness.url()).await.expect("the first connects");
    let _second = Remote::connect(&harness.url()).await.expect("the second connects");
    let mut frames = FramedRead::new(
        TcpStream::connect(address(&harness.url())).await.expect("the socket connects").into_split().0,
        FrameCodec::new(DEFAULT_MAX_FRAME),
    );
    match next_frame(&mut frames).await {
        ServerFrame::Error { code: ErrorCode::Limit, message, .. } => assert!(message.contains("connections")),
        other => panic!("expected a refusal, got {other:?}"),
    }
    match Remote::connect(&harness.url()).await {
        Err(Error::Transport(error)) => assert!(error.to_string().contains("too many connections"), "{error}"),
        Err(other) => panic!("expected the broker's refusal, got {other:?}"),
        Ok(_) => panic!("a third connection was accepted"),
    }
    assert_eq!(harness.server().stats().connections, 2);
}

/// A consumer's prefetch is capped at `max_unacked`, an unlimited one (0) included: with a cap of 5, a
/// consumer that asked for 100 holds 5 deliveries, and the next comes when it settles one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_deliveries_are_capped_per_consumer() {
    let mut config = ServerConfig::default();
    config.max_unacked = 5;
    let harness = RemoteHarness::start_with(config).await;
    let remote = Remote::connect(&harness.url()).await.expect("connects");
    remote.declare_queue("capped", &QueueOptions::new()).await.expect("declares");
    for n in 0..20u8 {
        let envelope = message(Bytes::from(vec![n]));
        remote.publish("capped", envelope, Confirm::Broker).await.expect("publishes");
    }
    for prefetch in [100, 0] {
        let mut consumer = remote.consume("capped", ConsumeOptions::new().prefetch(prefetch)).await.expect("consumes");
        let mut held = Vec::new();
        for _ in 0..5 {
            held.push(tokio::time::timeout(WAIT, consumer.next()).await.expect("in time").expect("a delivery"));
        }
        let stats = remote.queue_stats("capped").await.expect("stats");
        assert_eq!(stats.unacked, 5, "{stats:?}");
        held.pop().expect("held").handle.ack().await.expect("acks");
        eventually("the next delivery", WAIT, || consumer.try_next().is_some()).await;
        drop(held);
        drop(consumer);
        eventually("the consumer to be gone", WAIT, || harness.server().stats().connections == 1).await;
    }
}

/// A peer that consumes and does not read what it is sent stops being read once `max_outbound` bytes wait for
/// it, and is closed after three heartbeats; its deliveries go back to the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_does_not_read_is_closed_and_its_deliveries_requeued() {
    const MESSAGES: usize = 320;
    let mut config = ServerConfig::default();
    config.token = Some(TOKEN.into());
    config.max_outbound = 1 << 20;
    config.heartbeat = Duration::from_millis(100);
    let harness = RemoteHarness::start_with(config).await;
    let url = format!("mqrpc://{TOKEN}@{}", address(&harness.url()));
    let remote = Remote::connect(&url).await.expect("connects");
    remote.declare_queue("backlog", &QueueOptions::new()).await.expect("declares");

    // The stubborn peer: consumes everything, reads nothing, keeps sending pings.
    let (frames, mut write) = logged_in(&address(&harness.url())).await;
    write
        .write_all(&encoded(&ClientFrame::Consume { req: 1, queue: "backlog".into(), prefetch: 0, auto_ack: false }))
        .await
        .expect("consumes");
    let pinging = tokio::spawn(async move {
        loop {
            if write.write_all(&encoded(&ClientFrame::Ping)).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let body = Bytes::from(vec![0x0d; 64 * 1024]);
    // 20 MiB: more than the socket buffers on both sides of the loopback take.
    for _ in 0..MESSAGES {
        let envelope = message(body.clone());
        remote.publish("backlog", envelope, Confirm::Broker).await.expect("publishes");
    }
    eventually("the stubborn peer to be closed", WAIT, || harness.server().stats().connections == 1).await;
    let stats = remote.queue_stats("backlog").await.expect("stats");
    assert_eq!((stats.ready, stats.unacked), (MESSAGES, 0), "{stats:?}");
    pinging.abort();
    drop(frames);
}

/// Past the memory high-watermark, publishes are refused with `QueueFull`, and accepted again once consumers
/// drain the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_past_the_memory_high_watermark_get_queue_full() {
    let mut config = ServerConfig::default();
    config.memory_high_watermark = 1 << 20;
    let harness = RemoteHarness::start_with(config).await;
    let remote = Remote::connect(&harness.url()).await.expect("connects");
    remote.declare_queue("heavy", &QueueOptions::new()).await.expect("declares");
    let body = Bytes::from(vec![0x0d; 64 * 1024]);
    let mut accepted = 0;
    let refused = loop {
        let envelope = message(body.clone());
        match remote.publish("heavy", envelope, Confirm::Broker).await {
            Ok(()) => accepted += 1,
            Err(error) => break error,
        }
        assert!(accepted <= 16, "more than the watermark was accepted");
    };
    assert!(matches!(refused, Error::QueueFull(_)), "{refused:?}");
    assert!(accepted >= 14, "refused early, after {accepted}");
    let mut consumer = remote.consume("heavy", ConsumeOptions::new().prefetch(100)).await.expect("consumes");
    for _ in 0..accepted {
        let delivery = tokio::time::timeout(WAIT, consumer.next()).await.expect("in time").expect("a delivery");
        delivery.handle.ack().await.expect("acks");
    }
    eventually("the queue to drain", WAIT, || harness.server().stats().bytes_held == 0).await;
    let envelope = message(body);
    remote.publish("heavy", envelope, Confirm::Broker).await.expect("accepted again");
}

/// A consumer whose connection goes silent for a heartbeat interval gets nothing new: the broker holds the
/// queue's messages for others (or for it, once it is heard from again) instead of pushing them to a peer that
/// may have stopped. Silent for three intervals, it is dropped and what it held goes back to the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_consumer_gets_nothing_new_then_is_dropped() {
    let mut config = ServerConfig::default();
    config.token = Some(TOKEN.into());
    config.heartbeat = Duration::from_millis(200);
    let harness = RemoteHarness::start_with(config).await;
    let remote = Remote::connect(&format!("mqrpc://{TOKEN}@{}", address(&harness.url()))).await.expect("connects");
    remote.declare_queue("quiet", &QueueOptions::new()).await.expect("declares");
    let (mut frames, mut write) = logged_in(&address(&harness.url())).await;
    let consume = ClientFrame::Consume { req: 1, queue: "quiet".into(), prefetch: 0, auto_ack: false };
    write.write_all(&encoded(&consume)).await.expect("consumes");
    assert!(matches!(next_frame(&mut frames).await, ServerFrame::Ok { req: 1, .. }));

    // Until the hold starts, each message goes to the consumer; from then on, one stays in the queue.
    let mut published = 0;
    mqrpc_tests::eventually_async("the silent consumer to be held back", WAIT, || {
        published += 1;
        let remote = &remote;
        async move {
            remote.publish("quiet", message(Bytes::from_static(b"m")), Confirm::Broker).await.expect("publishes");
            remote.queue_stats("quiet").await.expect("stats").ready == 1
        }
    })
    .await;
    let stats = remote.queue_stats("quiet").await.expect("stats");
    assert_eq!((stats.ready, stats.unacked), (1, published - 1), "{stats:?}");
    // Heard from again, it takes the message that waited.
    write.write_all(&encoded(&ClientFrame::Ping)).await.expect("pings");
    mqrpc_tests::eventually_async("the waiting message to go out", WAIT, || async {
        remote.queue_stats("quiet").await.expect("stats").ready == 0
    })
    .await;
    // Silent again for three intervals: dropped, and everything it held is back in the queue.
    mqrpc_tests::eventually("the silent peer to be dropped", WAIT, || harness.server().stats().connections == 1).await;
    let stats = remote.queue_stats("quiet").await.expect("stats");
    assert_eq!((stats.ready, stats.unacked), (published, 0), "{stats:?}");
    drop(frames);
}
