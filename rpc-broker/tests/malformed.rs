//! The broker server against malformed input, with real sockets on loopback: every kind of broken frame gets a
//! typed error and a closed connection, while a well-behaved client keeps calling and sees no error. In a test
//! binary of its own: it checks the peak memory of its whole process, which other tests would share.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use rpc_broker::Remote;
use rpc_broker::protocol::{ClientFrame, ErrorCode, FrameCodec, OLDEST_CLIENT_VERSION, ServerFrame};
use rpc_core::{Client, Server};
use support::{EchoClient, EchoImpl, EchoServer, MAX_FRAME, config, encode, error_codes, hello, publish_frame, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;

/// Reads frames until the server closes the connection or `limit` passes; returns them and whether it closed.
async fn until_closed(stream: TcpStream, limit: Duration) -> (Vec<ServerFrame>, bool) {
    let mut frames = FramedRead::new(stream, FrameCodec::new(MAX_FRAME));
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, frames.next()).await {
            Err(_) => return (seen, false),
            Ok(None | Some(Err(_))) => return (seen, true),
            Ok(Some(Ok(frame))) => match ServerFrame::parse(frame) {
                Ok(frame) => seen.push(frame),
                Err(_) => return (seen, true),
            },
        }
    }
}

/// Peak resident memory of this process (broker, client and worker together), in KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmHWM:"))
                .and_then(|line| line.split_whitespace().nth(1).and_then(|kib| kib.parse().ok()))
        })
        .unwrap_or(0)
}

/// A client and a worker that keep calling through the broker until stopped; counts successes and failures.
struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
    _server: rpc_core::ServerHandle,
}

impl Traffic {
    async fn start(url: &str) -> Traffic {
        let server = Server::new(Remote::connect(url).await.expect("worker connects"))
            .serve(EchoServer::new(EchoImpl))
            .await
            .expect("serves");
        let client = Client::connect(Remote::connect(url).await.expect("client connects")).await.expect("client");
        let (stop, ok, failed) =
            (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (stop2, ok2, failed2) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
        let task = tokio::spawn(async move {
            let echo = EchoClient::new(&client);
            let mut n = 0;
            while !stop2.load(Ordering::Relaxed) {
                n += 1;
                match echo.echo(n).timeout(Duration::from_secs(5)).await {
                    Ok(back) if back == n => ok2.fetch_add(1, Ordering::Relaxed),
                    _ => failed2.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
        Traffic { stop, ok, failed, task, _server: server }
    }

    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        (self.ok.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_gets_typed_errors_and_never_hurts_the_broker() {
    let broker = start(config()).await;
    let address = broker.local_addr();
    let traffic = Traffic::start(&broker.url()).await;
    let mut frames_sent = 0u64;
    let started = Instant::now();

    // Each case: bytes sent on a fresh connection, and the error code the broker must answer before closing.
    let mut random = Vec::with_capacity(4096);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..4096 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        random.push((seed >> 24) as u8);
    }
    let over_cap = {
        let mut frame = BytesMut::new();
        frame.put_u32(MAX_FRAME as u32 + 1);
        frame.put_u8(0x01);
        frame.freeze()
    };
    let cases: Vec<(&str, Bytes, Option<ErrorCode>)> = vec![
        ("length 0", Bytes::from_static(&[0, 0, 0, 0]), Some(ErrorCode::Malformed)),
        ("length 2^32-1", Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 0x01]), Some(ErrorCode::TooLarge)),
        ("over the cap", over_cap, Some(ErrorCode::TooLarge)),
        ("random bytes", Bytes::from(random), None),
        (
            "an HTTP request",
            Bytes::from_static(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"),
            Some(ErrorCode::TooLarge),
        ),
        ("a frame before the handshake", encode(&ClientFrame::ListQueues { req: 1 }), Some(ErrorCode::Malformed)),
        (
            "a wrong protocol version",
            encode(&ClientFrame::Hello { version: 99, token: String::new(), name: String::new() }),
            Some(ErrorCode::Version),
        ),
        (
            "a version older than the oldest accepted",
            encode(&ClientFrame::Hello {
                version: OLDEST_CLIENT_VERSION - 1,
                token: String::new(),
                name: String::new(),
            }),
            Some(ErrorCode::Version),
        ),
    ];
    for (name, bytes, expected) in cases {
        let mut stream = TcpStream::connect(address).await.expect("connects");
        stream.write_all(&bytes).await.expect("writes");
        frames_sent += 1;
        let (frames, closed) = until_closed(stream, Duration::from_secs(5)).await;
        assert!(closed, "{name}: the connection stayed open");
        if let Some(expected) = expected {
            assert_eq!(error_codes(&frames), [(0, expected)], "{name}");
        }
    }

    // 200 more connections of random bytes, 1 byte to 8 KiB each, 20 at a time.
    let mut random_connections = Vec::new();
    for round in 0..200u64 {
        let len = 1 + (seed.wrapping_mul(round + 1) % 8192) as usize;
        let mut bytes = Vec::with_capacity(len);
        for _ in 0..len {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            bytes.push((seed >> 24) as u8);
        }
        random_connections.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(address).await.expect("connects");
            let _ = stream.write_all(&bytes).await;
            let _ = stream.shutdown().await;
            until_closed(stream, Duration::from_secs(5)).await.1
        }));
        frames_sent += 1;
        if random_connections.len() == 20 {
            for connection in random_connections.drain(..) {
                assert!(connection.await.expect("joins"), "a random-bytes connection stayed open");
            }
        }
    }

    // A truncated frame: the peer announces 100 bytes, sends 10 and stops writing.
    let mut stream = TcpStream::connect(address).await.expect("connects");
    stream.write_all(&hello("")).await.expect("writes");
    stream.write_all(&[0, 0, 0, 100, 0x03, 1, 2, 3, 4, 5, 6, 7, 8, 9]).await.expect("writes");
    stream.shutdown().await.expect("half-closes");
    frames_sent += 2;
    let (frames, closed) = until_closed(stream, Duration::from_secs(5)).await;
    assert!(closed, "truncated frame: the connection stayed open");
    assert_eq!(error_codes(&frames), [(0, ErrorCode::Malformed)], "a frame cut off by the end of the stream");

    // After a good handshake: an unknown frame type closes the connection with a typed error.
    let mut stream = TcpStream::connect(address).await.expect("connects");
    stream.write_all(&hello("")).await.expect("writes");
    stream.write_all(&[0, 0, 0, 1, 0x7e]).await.expect("writes");
    frames_sent += 2;
    let (frames, closed) = until_closed(stream, Duration::from_secs(5)).await;
    assert!(closed);
    assert_eq!(error_codes(&frames), [(0, ErrorCode::Malformed)]);

    // Payloads that are not envelopes (bad MessagePack, a nesting-depth bomb): a typed error for that request,
    // and the connection goes on working.
    let mut stream = TcpStream::connect(address).await.expect("connects");
    stream.write_all(&hello("")).await.expect("writes");
    let declare =
        ClientFrame::Declare { req: 1, queue: "victim".into(), max_len: None, max_deliveries: None, durable: false };
    stream.write_all(&encode(&declare)).await.expect("writes");
    let bad = [Bytes::from_static(&[0xc1, 0xff, 0x00]), Bytes::from(vec![0x91u8; 100_000])];
    for (req, payload) in (2u32..).zip(bad) {
        let publish = publish_frame(req, "victim", payload, false);
        stream.write_all(&encode(&publish)).await.expect("writes");
    }
    stream.write_all(&encode(&ClientFrame::Stats { req: 9, queue: "victim".into() })).await.expect("writes");
    frames_sent += 5;
    let mut frames = FramedRead::new(stream, FrameCodec::new(MAX_FRAME));
    let mut answers = Vec::new();
    while answers.len() < 4 {
        let frame = tokio::time::timeout(Duration::from_secs(5), frames.next()).await.expect("answered");
        match ServerFrame::parse(frame.expect("open").expect("a frame")).expect("parses") {
            ServerFrame::Ok { req, .. } => answers.push((req, None)),
            ServerFrame::Error { req, code, .. } => answers.push((req, Some(code))),
            _ => {}
        }
    }
    assert_eq!(answers, [(1, None), (2, Some(ErrorCode::Invalid)), (3, Some(ErrorCode::Invalid)), (9, None)]);
    drop(frames);

    // One byte per 100 ms, before the handshake: closed by the handshake timeout (1 s).
    let mut stream = TcpStream::connect(address).await.expect("connects");
    let slow_started = Instant::now();
    let mut closed_early = false;
    for byte in hello("").iter() {
        if stream.write_all(&[*byte]).await.is_err() {
            closed_early = true;
            break;
        }
        frames_sent += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut probe = [0u8; 256];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(1), stream.read(&mut probe)).await {
            closed_early = true;
            break;
        }
    }
    let (_, closed) = until_closed(stream, Duration::from_secs(5)).await;
    assert!(closed_early || closed, "the slow peer kept its connection");
    assert!(slow_started.elapsed() < Duration::from_secs(4), "closing the slow peer took {:?}", slow_started.elapsed());

    // One byte per 100 ms after the handshake: no complete frame for three heartbeats (600 ms) closes it.
    let mut stream = TcpStream::connect(address).await.expect("connects");
    stream.write_all(&hello("")).await.expect("writes");
    let trickle_started = Instant::now();
    let stats = encode(&ClientFrame::Stats { req: 1, queue: "victim".into() });
    for byte in stats.iter().take(20) {
        if stream.write_all(&[*byte]).await.is_err() {
            break;
        }
        frames_sent += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (frames, closed) = until_closed(stream, Duration::from_secs(5)).await;
    assert!(closed);
    assert!(error_codes(&frames).contains(&(0, ErrorCode::Timeout)), "{frames:?}");
    assert!(trickle_started.elapsed() < Duration::from_secs(5));

    let (ok, failed) = traffic.finish().await;
    let stats = broker.stats();
    println!(
        "malformed-input test: {frames_sent} hostile writes, {} connections refused, {ok} good calls ({failed} \
         failed) in {:?}, peak RSS {} KiB (broker, worker and client in one process)",
        stats.rejected,
        started.elapsed(),
        peak_rss_kib()
    );
    assert_eq!(failed, 0, "the well-behaved client saw errors");
    assert!(ok > 0);
    // Alone in its process, the test peaks at about 12 MiB: a broken frame that made the broker allocate what it
    // announces (up to 4 GiB) would show.
    assert!(peak_rss_kib() < 64 * 1024, "memory grew to {} KiB", peak_rss_kib());
    // The broker is still up and serving.
    let remote = Remote::connect(&broker.url()).await.expect("the broker still accepts");
    assert!(remote.list_queues().await.expect("lists").iter().any(|(name, _)| name == "victim"));
}
