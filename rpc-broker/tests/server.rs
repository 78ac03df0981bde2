//! The broker server against hostile and broken peers, with real sockets on loopback: wrong credentials, TLS,
//! dead connections, restarts, fencing; the command line. Malformed input is in malformed.rs.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use rpc_broker::protocol::{ClientFrame, ErrorCode, Frame, FrameCodec, OLDEST_CLIENT_VERSION, ServerFrame};
use rpc_broker::server::BrokerServer;
use rpc_broker::{Remote, RemoteOptions};
use rpc_core::{Client, ConsumeOptions, Envelope, Error, Kind, QueueOptions, Server, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;

use support::{
    EchoClient, EchoImpl, EchoServer, MAX_FRAME, cli, config, encode, error_codes, hello, publish_frame, start,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_and_wrong_token_connections_are_rejected() {
    let mut config = config();
    config.token = Some("s3cret".into());
    let broker = start(config).await;
    let address = broker.local_addr();
    for url in [format!("mqrpc://{address}"), format!("mqrpc://wrong@{address}"), format!("mqrpc://s3cre@{address}")] {
        match Remote::connect(&url).await {
            Err(Error::Unauthorized(_)) => {}
            other => panic!("{url}: expected Unauthorized, got {other:?}"),
        }
    }
    let remote = Remote::connect(&format!("mqrpc://s3cret@{address}")).await.expect("the right token connects");
    remote.declare_queue("q", &QueueOptions::new()).await.expect("declares");
    assert!(broker.stats().rejected >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_round_trip() {
    use rustls_pki_types::pem::PemObject;
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("a certificate");
    let cert_pem = certified.cert.pem();
    let chain = vec![rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("parses")];
    let key =
        rustls_pki_types::PrivateKeyDer::from_pem_slice(certified.key_pair.serialize_pem().as_bytes()).expect("parses");
    let tls = rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(chain, key).expect("a config");
    let mut config = config();
    config.tls = Some(Arc::new(tls));
    let broker = start(config).await;
    let url = format!("mqrpcs://localhost:{}", broker.local_addr().port());
    let options = RemoteOptions::new().tls_roots_pem(cert_pem.as_bytes()).expect("trusts the certificate");
    let _server = Server::new(Remote::connect_with(&url, options.clone()).await.expect("TLS connects"))
        .serve(EchoServer::new(EchoImpl))
        .await
        .expect("serves");
    let client =
        Client::connect(Remote::connect_with(&url, options).await.expect("TLS connects")).await.expect("client");
    assert_eq!(EchoClient::new(&client).echo(7).await.expect("a TLS round trip"), 7);
    // Without the certificate trusted, or without TLS, nothing gets through.
    assert!(Remote::connect(&url).await.is_err());
    assert!(Remote::connect(&format!("mqrpc://127.0.0.1:{}", broker.local_addr().port())).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_dropped_and_its_unacked_requeued() {
    let broker = start(config()).await;
    let remote = Remote::connect(&broker.url()).await.expect("connects");
    remote.declare_queue("jobs", &QueueOptions::new()).await.expect("declares");
    let mut envelope = Envelope::new(Kind::Oneway);
    envelope.method = "job".into();
    remote.publish("jobs", envelope.clone(), rpc_core::transport::Confirm::Broker).await.expect("publishes");

    // A raw consumer takes the message, then goes silent without closing its socket.
    let mut silent = TcpStream::connect(broker.local_addr()).await.expect("connects");
    silent.write_all(&hello("")).await.expect("writes");
    let consume = ClientFrame::Consume { req: 1, queue: "jobs".into(), prefetch: 1, auto_ack: false };
    silent.write_all(&encode(&consume)).await.expect("writes");
    let mut frames = FramedRead::new(silent, FrameCodec::new(MAX_FRAME));
    let delivered = loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), frames.next()).await.expect("a frame");
        if let ServerFrame::Deliver { .. } = ServerFrame::parse(frame.expect("open").expect("ok")).expect("parses") {
            break Instant::now();
        }
    };
    let mut consumer = remote.consume("jobs", ConsumeOptions::new()).await.expect("consumes");
    let redelivery = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await.expect("redelivered");
    let redelivery = redelivery.expect("open");
    assert_eq!(redelivery.envelope.id, envelope.id);
    assert_eq!(redelivery.delivery_count, 2);
    let took = delivered.elapsed();
    assert!(took < Duration::from_secs(2), "detecting the dead connection took {took:?} (3 heartbeats are 600 ms)");
    drop(frames);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_and_workers_come_back_after_a_broker_restart() {
    let broker = start(config()).await;
    let address = broker.local_addr();
    let options = RemoteOptions::new().max_backoff(Duration::from_millis(200));
    let worker = Remote::connect_with(&broker.url(), options.clone()).await.expect("worker connects");
    let _server = Server::new(worker).serve(EchoServer::new(EchoImpl)).await.expect("serves");
    let transport = Remote::connect_with(&broker.url(), options).await.expect("client connects");
    let client = Client::connect(transport.clone()).await.expect("client");
    let echo = EchoClient::new(&client);
    assert_eq!(echo.echo(1).await.expect("answered"), 1);

    drop(broker);
    // The broker's connections close as their tasks end, a moment after it is dropped.
    let gone = Instant::now() + Duration::from_secs(5);
    while transport.is_connected() {
        assert!(Instant::now() < gone, "the client did not see the broker go");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A call during the outage resolves by its deadline with a typed error: it does not hang. Which one depends
    // on what the client learns first: that the connection is down, that the inbox went with it, or neither.
    let started = Instant::now();
    let during = echo.echo(2).timeout(Duration::from_millis(500)).await;
    assert!(matches!(during, Err(Error::Disconnected | Error::ReplyLost | Error::Timeout(_))), "{during:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "the call took {:?}", started.elapsed());

    // The broker comes back on the same address, empty: the transports reconnect, declare their queues again
    // and restore the worker's consumer and the client's inbox.
    let _broker = BrokerServer::bind(address, config()).await.expect("the broker restarts");
    tokio::time::timeout(Duration::from_secs(10), transport.connected()).await.expect("the client reconnects");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match echo.echo(3).timeout(Duration::from_secs(1)).await {
            Ok(3) => break,
            other => assert!(Instant::now() < deadline, "calls did not come back: {other:?}"),
        }
    }
    assert_eq!(client.stats().pending, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_list_call_and_replay() {
    let broker = start(config()).await;
    let url = broker.url();
    let _server = Server::new(Remote::connect(&url).await.expect("connects"))
        .serve(EchoServer::new(EchoImpl))
        .await
        .expect("serves");
    assert_eq!(cli(&url, &["call", "Echo", "echo", r#"{"n": 42}"#]).await.trim(), "42");

    // A dead letter in `jobs.dlq`, listed (and left in place), then replayed onto `jobs`.
    let remote = Remote::connect(&url).await.expect("connects");
    remote.declare_queue("jobs", &QueueOptions::new()).await.expect("declares");
    let mut envelope = Envelope::new(Kind::Oneway);
    envelope.service = "Jobs".into();
    envelope.method = "run".into();
    envelope.idempotency_key = Some("job-7".into());
    envelope.body = rpc_core::codec::encode(&std::collections::BTreeMap::from([("id", 7)])).expect("encodes");
    remote.publish("jobs", envelope, rpc_core::transport::Confirm::Broker).await.expect("publishes");
    let mut consumer = remote.consume("jobs", ConsumeOptions::new()).await.expect("consumes");
    let delivery = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await.expect("a job").expect("open");
    delivery.handle.dead_letter().await.expect("dead-letters");
    drop(consumer);

    let queues = cli(&url, &["queues"]).await;
    let jobs = queues.lines().find(|line| line.starts_with("jobs ")).expect("jobs is listed");
    assert_eq!(jobs.split_whitespace().collect::<Vec<_>>(), ["jobs", "0", "0", "0", "0", "1"], "{queues}");
    assert!(queues.lines().any(|line| line.starts_with("Echo ")), "{queues}");

    let listed = cli(&url, &["dlq", "list", "jobs"]).await;
    assert!(listed.contains("Jobs.run attempt 1 key job-7 args {\"id\":7}"), "{listed}");
    assert!(listed.contains("1 message(s) in jobs.dlq"), "{listed}");
    assert_eq!(remote.queue_stats("jobs.dlq").await.expect("stats").ready, 1, "listing removed the dead letter");

    let replayed = cli(&url, &["dlq", "replay", "jobs"]).await;
    assert!(replayed.contains("replayed 1 message(s) from jobs.dlq onto jobs"), "{replayed}");
    assert_eq!(remote.queue_stats("jobs.dlq").await.expect("stats").ready, 0);
    let mut consumer = remote.consume("jobs", ConsumeOptions::new()).await.expect("consumes");
    let again = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await.expect("replayed").expect("open");
    assert_eq!(again.envelope.idempotency_key.as_deref(), Some("job-7"));
    // A replay starts over: the retry policy applies afresh.
    assert_eq!(again.envelope.attempt, 1);

    // Deleting the queue ends its consumer and takes its dead-letter queue with it.
    let deleted = cli(&url, &["delete", "jobs"]).await;
    assert!(deleted.contains("deleted jobs and jobs.dlq"), "{deleted}");
    let ended = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await.expect("the consumer ends");
    assert!(ended.is_none(), "a consumer of a deleted queue got {ended:?}");
    for queue in ["jobs", "jobs.dlq"] {
        assert!(matches!(remote.queue_stats(queue).await, Err(Error::NoRoute(_))), "{queue} is still there");
    }
}

/// `rpc-broker ping` lists each live worker of a service and fails when none answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_lists_the_live_workers_and_fails_without_one() {
    let broker = start(config()).await;
    let url = broker.url();
    let mut servers = Vec::new();
    for _ in 0..2 {
        let transport = Remote::connect(&url).await.expect("connects");
        servers.push(Server::new(transport).version("2.0.1").serve(EchoServer::new(EchoImpl)).await.expect("serves"));
    }
    let listed = cli(&url, &["ping", "Echo", "--wait-ms", "500"]).await;
    let rows: Vec<Vec<&str>> =
        listed.lines().skip(1).filter(|line| line.contains("2.0.1")).map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), 2, "{listed}");
    let pid = std::process::id().to_string();
    for row in &rows {
        assert_eq!(row[1], "2.0.1");
        assert_eq!(row[3], pid, "{listed}");
    }
    assert!(listed.ends_with("2 worker(s) of Echo on mqrpc\n"), "{listed}");
    // Nothing of the pings stays: the queue list shows no private group.
    assert!(!cli(&url, &["queues"]).await.contains('@'));

    let none = tokio::process::Command::new(env!("CARGO_BIN_EXE_rpc-broker"))
        .args(["ping", "Nobody", "--wait-ms", "200"])
        .env("MQRPC_BROKER", &url)
        .output()
        .await
        .expect("the binary runs");
    assert!(!none.status.success());
    let stderr = String::from_utf8_lossy(&none.stderr);
    assert!(stderr.contains("no worker of Nobody answered within 200 ms"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unconfirmed_and_quiet_publishes_are_answered_only_as_documented_and_inbox_names_are_reserved() {
    let broker = start(config()).await;
    let mut raw = TcpStream::connect(broker.local_addr()).await.expect("connects");
    raw.write_all(&hello("")).await.expect("writes");
    let payload = rpc_core::codec::encode_envelope(&Envelope::new(Kind::Reply)).expect("encodes");
    let frame = |req, queue: &str, quiet| publish_frame(req, queue, payload.clone(), quiet);
    let publish = |req, queue: &str| frame(req, queue, false);
    let frames = [
        ClientFrame::OpenInbox { req: 1, name: "inbox.raw".into() },
        // Taken and delivered to the inbox, answered neither way.
        publish(0, "inbox.raw"),
        // Refused (no such queue), answered neither way.
        publish(0, "inbox.gone"),
        ClientFrame::Declare {
            req: 2,
            queue: "inbox.mine".into(),
            max_len: None,
            max_deliveries: None,
            durable: false,
        },
        // Quiet: taken and delivered, unanswered; refused, answered with the error.
        frame(4, "inbox.raw", true),
        frame(5, "inbox.gone", true),
        ClientFrame::Sync { req: 3 },
    ];
    for frame in &frames {
        raw.write_all(&encode(frame)).await.expect("writes");
    }
    let seen = frames_until_ok(raw, 3).await;
    let answered: Vec<u32> = seen
        .iter()
        .filter_map(|frame| match frame {
            ServerFrame::Ok { req, .. } | ServerFrame::Error { req, .. } => Some(*req),
            _ => None,
        })
        .collect();
    assert_eq!(answered, [1, 2, 5, 3], "{seen:?}");
    assert_eq!(error_codes(&seen), [(2, ErrorCode::Invalid), (5, ErrorCode::NoRoute)]);
    let delivered = seen.iter().filter(|frame| matches!(frame, ServerFrame::Deliver { .. })).count();
    assert_eq!(delivered, 2, "{seen:?}");
}

/// The refusal of a quiet publish: from version 9, in the caller's inbox when the request names one the
/// connection opened, as a reply with the refusal's status and the call's correlation id; otherwise, and for an
/// older client, as an `Error` frame answering the publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_quiet_publish_is_answered_in_the_callers_inbox_from_version_9() {
    use rpc_broker::protocol::{PROTOCOL_VERSION, QUIET_REFUSALS_IN_INBOX};
    use rpc_core::{Code, ReplyTo, Text};

    let broker = start(config()).await;
    let request = |reply_to: &str| {
        let mut envelope = Envelope::new(Kind::Request);
        envelope.correlation_id = Some(uuid::Uuid::now_v7());
        envelope.reply_to = Some(ReplyTo::Inbox(Text::from(reply_to.to_owned())));
        envelope
    };
    let quiet = |req, queue: &str, envelope: &Envelope| {
        publish_frame(req, queue, rpc_core::codec::encode_envelope(envelope).expect("encodes"), true)
    };
    for version in [QUIET_REFUSALS_IN_INBOX - 1, PROTOCOL_VERSION] {
        let mut raw = TcpStream::connect(broker.local_addr()).await.expect("connects");
        let hello = ClientFrame::Hello { version, token: String::new(), name: "raw".into() };
        raw.write_all(&encode(&hello)).await.expect("writes");
        // Each connection's own inbox and queue.
        let (inbox, queue) = (format!("inbox.mine-{version}"), format!("full-{version}"));
        let declare = ClientFrame::Declare {
            req: 2,
            queue: queue.clone(),
            max_len: Some(1),
            max_deliveries: None,
            durable: false,
        };
        let (mine, full, elsewhere) = (request(&inbox), request(&inbox), request("inbox.not-mine"));
        let frames = [
            ClientFrame::OpenInbox { req: 1, name: inbox.clone() },
            declare,
            quiet(3, "nowhere", &mine),
            // The first is taken, the second refused: the queue holds one.
            quiet(4, &queue, &request(&inbox)),
            quiet(5, &queue, &full),
            // An inbox of no connection's: answered with the error.
            quiet(6, "nowhere", &elsewhere),
            ClientFrame::Sync { req: 7 },
        ];
        for frame in &frames {
            raw.write_all(&encode(frame)).await.expect("writes");
        }
        let seen = frames_until_ok(raw, 7).await;
        let replies: Vec<(Option<uuid::Uuid>, Code, String)> = seen
            .iter()
            .filter_map(|frame| match frame {
                ServerFrame::Deliver { payload, .. } => {
                    let reply = rpc_core::codec::decode_envelope(payload, &rpc_core::codec::Limits::default())
                        .expect("an envelope");
                    assert_eq!(reply.kind, Kind::Reply);
                    Some((reply.correlation_id, Code::from_u16(reply.status), reply.status_message.unwrap_or_default()))
                }
                _ => None,
            })
            .collect();
        if version >= QUIET_REFUSALS_IN_INBOX {
            assert_eq!(error_codes(&seen), [(6, ErrorCode::NoRoute)], "{seen:?}");
            assert_eq!(replies.len(), 2, "{replies:?}");
            assert_eq!((replies[0].0, replies[0].1), (mine.correlation_id, Code::NoRoute));
            assert!(replies[0].2.contains("nowhere"), "{replies:?}");
            assert_eq!((replies[1].0, replies[1].1), (full.correlation_id, Code::QueueFull));
        } else {
            assert_eq!(
                error_codes(&seen),
                [(3, ErrorCode::NoRoute), (5, ErrorCode::QueueFull), (6, ErrorCode::NoRoute)],
                "{seen:?}"
            );
            assert!(replies.is_empty(), "{replies:?}");
        }
    }
}

/// A call whose request the broker refuses fails with the refusal, which a client of this build gets in its
/// inbox: `NoRoute` for a service without a queue, `QueueFull` for a full one; not its deadline's `Timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_the_broker_refuses_fails_with_the_refusal_not_its_deadline() {
    let broker = start(config()).await;
    let remote: Arc<dyn Transport> =
        Arc::new(Remote::connect(&format!("mqrpc://{}", broker.local_addr())).await.expect("connects"));
    let client = Client::builder(Arc::clone(&remote)).connect().await.expect("client");
    let echo = EchoClient::new(&client);
    match echo.echo(1).timeout(Duration::from_secs(30)).await {
        Err(Error::NoRoute(queue)) => assert_eq!(queue, "Echo"),
        other => panic!("expected NoRoute, got {other:?}"),
    }
    remote.declare_queue("Echo", &QueueOptions::new().max_len(1)).await.expect("declares");
    let mut waiting = Envelope::new(Kind::Oneway);
    waiting.method = "echo".into();
    remote.publish("Echo", waiting, rpc_core::transport::Confirm::Broker).await.expect("fills the queue");
    match echo.echo(2).timeout(Duration::from_secs(30)).await {
        Err(Error::QueueFull(queue)) => assert_eq!(queue, "Echo"),
        other => panic!("expected QueueFull, got {other:?}"),
    }
    assert_eq!(remote.queue_stats("Echo").await.expect("stats").rejected, 1);
}

/// 100,000 requests each cancelled right after its publish, and 100,000 cancels of calls the broker never saw,
/// with no consumer: the broker ends with nothing held and every cancelled request counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_publish_and_cancel_pairs_leaves_nothing_behind() {
    const CALLS: u32 = 100_000;
    let broker = start(config()).await;
    let mut raw = TcpStream::connect(broker.local_addr()).await.expect("connects");
    raw.write_all(&hello("")).await.expect("writes");
    let declare =
        ClientFrame::Declare { req: 1, queue: "flood".into(), max_len: None, max_deliveries: None, durable: false };
    raw.write_all(&encode(&declare)).await.expect("writes");
    let payload = rpc_core::codec::encode_envelope(&Envelope::new(Kind::Request)).expect("encodes");
    let mut batch = BytesMut::new();
    for n in 0..CALLS {
        let mut key = [0; 16];
        key[..4].copy_from_slice(&n.to_be_bytes());
        let mut unknown = key;
        unknown[15] = 1;
        let publish = ClientFrame::Publish {
            req: 0,
            queue: "flood".into(),
            priority: 0,
            ttl_ms: None,
            delay_ms: None,
            key: Some(key),
            id: None,
            payload: payload.clone(),
            quiet: false,
        };
        publish.encode(&mut batch);
        ClientFrame::CancelCall { queue: "flood".into(), key }.encode(&mut batch);
        ClientFrame::CancelCall { queue: "flood".into(), key: unknown }.encode(&mut batch);
        if batch.len() > 64 * 1024 {
            raw.write_all(&batch.split()).await.expect("writes");
        }
    }
    batch.extend_from_slice(&encode(&ClientFrame::Stats { req: 2, queue: "flood".into() }));
    raw.write_all(&batch).await.expect("writes");
    let mut frames = FramedRead::new(raw, FrameCodec::new(MAX_FRAME));
    let stats = loop {
        let frame = tokio::time::timeout(Duration::from_secs(30), frames.next()).await.expect("a frame");
        match ServerFrame::parse(frame.expect("open").expect("ok")).expect("parses") {
            ServerFrame::Ok { req: 2, body } => break rpc_broker::protocol::parse_stats_body(body).expect("stats"),
            ServerFrame::Error { req, code, message } => panic!("request {req} failed: {code:?} {message}"),
            _ => {}
        }
    };
    assert_eq!(
        (stats.published, stats.cancelled, stats.ready, stats.unacked),
        (u64::from(CALLS), u64::from(CALLS), 0, 0)
    );
    assert_eq!(broker.stats().bytes_held, 0);
}

/// A worker's retry (`AckHandle::republish`) puts the next attempt on the queue and acks the delivery in one
/// step, and only while the delivery is held: a worker that lost it makes no copy, and a refused copy leaves
/// the delivery held. On both faces of the engine: the embedded broker and the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_is_published_only_while_its_delivery_is_held() {
    let embedded = rpc_broker::Embedded::new();
    republish_is_fenced(Arc::new(embedded.clone()), Arc::new(embedded)).await;
    let server = start(config()).await;
    let worker = Remote::connect(&server.url()).await.expect("connects");
    let observer = Remote::connect(&server.url()).await.expect("connects");
    republish_is_fenced(Arc::new(worker), Arc::new(observer)).await;
}

async fn republish_is_fenced(worker: Arc<dyn Transport>, observer: Arc<dyn Transport>) {
    let request = |attempt| {
        let mut envelope = Envelope::new(Kind::Request);
        envelope.correlation_id = Some(uuid::Uuid::new_v4());
        envelope.attempt = attempt;
        envelope
    };
    let stats = |queue: &'static str| {
        let observer = Arc::clone(&observer);
        async move { observer.queue_stats(queue).await.expect("stats") }
    };
    worker.declare_queue("retries", &QueueOptions::new()).await.expect("declares");
    worker.publish("retries", request(1), rpc_core::transport::Confirm::Broker).await.expect("publishes");
    let mut consumer = worker.consume("retries", ConsumeOptions::new().prefetch(1)).await.expect("consumes");

    // Held: the copy is queued and the delivery acked.
    let first = next(&mut consumer).await;
    first.handle.republish("retries", request(2)).await.map_err(|(error, _)| error).expect("copies");
    let second = next(&mut consumer).await;
    assert_eq!(second.envelope.attempt, 2);
    let seen = stats("retries").await;
    assert_eq!((seen.published, seen.acked, seen.unacked), (2, 1, 1), "{seen:?}");

    // Refused (the target is full): nothing published, the delivery still held and settled by the worker.
    worker.declare_queue("full", &QueueOptions::new().max_len(1)).await.expect("declares");
    worker.publish("full", request(1), rpc_core::transport::Confirm::Broker).await.expect("publishes");
    let (error, handle) = second.handle.republish("full", request(3)).await.expect_err("the target is full");
    assert!(matches!(error, Error::QueueFull(_)), "{error:?}");
    assert_eq!(stats("retries").await.unacked, 1);
    handle.requeue().await.expect("requeues");
    let third = next(&mut consumer).await;
    assert_eq!(third.envelope.attempt, 2);

    // Lost (its consumer went, and the broker requeued it): no copy, the original waits for another worker.
    drop(consumer);
    let (error, _) = third.handle.republish("retries", request(3)).await.expect_err("the delivery is lost");
    assert!(matches!(error, Error::DeliveryLost), "{error:?}");
    let seen = stats("retries").await;
    assert_eq!((seen.published, seen.ready, seen.unacked), (2, 1, 0), "{seen:?}");
    assert_eq!(stats("full").await.published, 1);
}

async fn next(consumer: &mut rpc_core::transport::Consumer) -> rpc_core::transport::Delivery {
    tokio::time::timeout(Duration::from_secs(5), consumer.next()).await.expect("a delivery").expect("open")
}

/// A client learns at the handshake whether the broker keeps durable queues on disk: with a data directory it
/// does, and its `Capabilities::durable` says so; a version-5 client still gets the `Welcome` it can read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handshake_says_whether_the_broker_is_durable() {
    let plain = start(config()).await;
    let remote = Remote::connect(&plain.url()).await.expect("connects");
    assert!(!remote.capabilities().durable);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut logged = config();
    logged.log = Some(rpc_broker::log::LogConfig::new(dir.path()));
    let logged = start(logged).await;
    let remote = Remote::connect(&logged.url()).await.expect("connects");
    assert!(remote.capabilities().durable);
    // An older client's Welcome has no flags byte, in its own version.
    let mut stream = TcpStream::connect(logged.local_addr()).await.expect("connects");
    let old = encode(&ClientFrame::Hello { version: 5, token: String::new(), name: "old".into() });
    stream.write_all(&old).await.expect("writes");
    let mut frames = FramedRead::new(stream, FrameCodec::new(MAX_FRAME));
    let welcome = frames.next().await.expect("a frame").expect("a whole frame");
    assert_eq!(welcome.len(), 1 + 2 + 4 + 4, "a version-5 Welcome is 11 bytes");
    assert!(matches!(ServerFrame::parse(welcome), Ok(ServerFrame::Welcome { version: 5, flags: 0, .. })));
}

/// A durable queue keeps what its messages carry across a restart: priorities order them again, a TTL that ran
/// out while the broker was down drops its message, a delay still holds its message back, a dead letter stays
/// in the dead-letter queue, and a publisher's retry of a message it had published is taken once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_queue_keeps_priorities_ttls_delays_dead_letters_and_ids_across_a_restart() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut config = config();
    config.log = Some(rpc_broker::log::LogConfig::new(dir.path()));
    let message = |priority: Option<u8>| {
        let mut envelope = Envelope::new(Kind::Oneway);
        envelope.priority = priority;
        envelope
    };
    let (low, high) = (message(Some(0)), message(Some(9)));
    let mut short = message(None);
    short.deadline_ms = Some(1);
    let mut later = message(None);
    later.delay_ms = Some(600);
    let dead = message(None);
    let acked = message(None);
    {
        let server = start(config.clone()).await;
        let remote = Remote::connect(&server.url()).await.expect("connects");
        for queue in ["jobs", "poison"] {
            remote.declare_queue(queue, &QueueOptions::new().durable(true)).await.expect("declares");
        }
        for envelope in [&low, &high, &short, &later] {
            remote.publish("jobs", envelope.clone(), rpc_core::transport::Confirm::Broker).await.expect("publishes");
        }
        remote.publish("poison", dead.clone(), rpc_core::transport::Confirm::Broker).await.expect("publishes");
        let mut consumer = remote.consume("poison", ConsumeOptions::new()).await.expect("consumes");
        next(&mut consumer).await.handle.dead_letter().await.expect("dead-letters");
        remote.flush().await.expect("the broker has the settle");
        drop(consumer);
        // Taken and acked before the restart.
        remote.publish("poison", acked.clone(), rpc_core::transport::Confirm::Broker).await.expect("publishes");
        let mut consumer = remote.consume("poison", ConsumeOptions::new()).await.expect("consumes");
        next(&mut consumer).await.handle.ack().await.expect("acks");
        remote.flush().await.expect("the broker has the ack");
        // The short TTL runs out while the broker is down.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let server = start(config).await;
    assert_eq!(server.recovery().map(|recovery| recovery.messages), Some(5));
    let remote = Remote::connect(&server.url()).await.expect("connects");
    let jobs = remote.queue_stats("jobs").await.expect("stats");
    assert_eq!((jobs.ready, jobs.delayed, jobs.expired), (2, 1, 1), "{jobs:?}");
    assert_eq!(remote.queue_stats("poison.dlq").await.expect("stats").ready, 1);
    // A publisher that got no confirm for `low` sends it again: taken once. So is one sent again after it was
    // consumed.
    remote.publish("jobs", low.clone(), rpc_core::transport::Confirm::Broker).await.expect("publishes");
    assert_eq!(remote.queue_stats("jobs").await.expect("stats").deduplicated, 1);
    remote.publish("poison", acked.clone(), rpc_core::transport::Confirm::Broker).await.expect("publishes");
    let poison = remote.queue_stats("poison").await.expect("stats");
    assert_eq!((poison.ready, poison.deduplicated), (0, 1), "{poison:?}");
    let mut consumer = remote.consume("jobs", ConsumeOptions::new()).await.expect("consumes");
    for expected in [&high, &low, &later] {
        let delivery = next(&mut consumer).await;
        assert_eq!(delivery.envelope.id, expected.id);
        delivery.handle.ack().await.expect("acks");
    }
    let mut dead_letters = remote.consume("poison.dlq", ConsumeOptions::new()).await.expect("consumes");
    assert_eq!(next(&mut dead_letters).await.envelope.id, dead.id);
}

/// A broker with a data directory refuses a frame size its log records could not hold, at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_bounds_the_frame_size() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut config = config();
    config.max_frame = rpc_broker::log::MAX_MESSAGE + 1;
    config.log = Some(rpc_broker::log::LogConfig::new(dir.path()));
    let refused = BrokerServer::bind(SocketAddr::from(([127, 0, 0, 1], 0)), config).await;
    let error = refused.expect_err("refused");
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput, "{error}");
}

/// A worker's answer (`AckHandle::answer`) publishes the reply and acks the delivery in one step, and only
/// while the delivery is held: a worker that lost its delivery sends no reply. A reply whose inbox is gone
/// still acks. On both faces of the engine: the embedded broker and the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_replies_and_acks_only_while_its_delivery_is_held() {
    let embedded = rpc_broker::Embedded::new();
    answer_is_fenced(Arc::new(embedded.clone()), Arc::new(embedded)).await;
    let server = start(config()).await;
    let worker = Remote::connect(&server.url()).await.expect("connects");
    let observer = Remote::connect(&server.url()).await.expect("connects");
    answer_is_fenced(Arc::new(worker), Arc::new(observer)).await;
}

async fn answer_is_fenced(worker: Arc<dyn Transport>, observer: Arc<dyn Transport>) {
    let mut inbox = observer.open_inbox().await.expect("opens an inbox");
    let request = || {
        let mut envelope = Envelope::new(Kind::Request);
        envelope.correlation_id = Some(uuid::Uuid::new_v4());
        envelope.reply_to = Some(rpc_core::ReplyTo::Inbox(inbox.address.clone().into()));
        envelope
    };
    worker.declare_queue("answers", &QueueOptions::new()).await.expect("declares");
    let mut consumer = worker.consume("answers", ConsumeOptions::new().prefetch(1)).await.expect("consumes");

    // Held: the reply reaches the inbox and the delivery is acked.
    worker.publish("answers", request(), rpc_core::transport::Confirm::Broker).await.expect("publishes");
    let first = next(&mut consumer).await;
    let reply = first.envelope.reply(Ok(Bytes::from_static(b"\x2a")));
    let answered =
        first.handle.answer(&rpc_core::ReplyTo::Inbox(inbox.address.clone().into()), reply).await.expect("answers");
    assert_eq!(answered, rpc_core::transport::Answered::Sent);
    let got = next(&mut inbox.consumer).await;
    assert_eq!(got.envelope.correlation_id, first.envelope.correlation_id);
    assert_eq!(&got.envelope.body[..], b"\x2a");
    let seen = observer.queue_stats("answers").await.expect("stats");
    assert_eq!((seen.acked, seen.unacked), (1, 0), "{seen:?}");

    // An inbox that is gone: no reply, acked all the same.
    worker.publish("answers", request(), rpc_core::transport::Confirm::Broker).await.expect("publishes");
    let second = next(&mut consumer).await;
    let reply = second.envelope.reply(Ok(Bytes::from_static(b"\x01")));
    second.handle.answer(&rpc_core::ReplyTo::Inbox("inbox.gone".into()), reply).await.expect("acks");
    worker.flush().await.expect("flushes");
    let seen = observer.queue_stats("answers").await.expect("stats");
    assert_eq!((seen.acked, seen.unacked), (2, 0), "{seen:?}");

    // Lost (its consumer went, and the broker requeued it): no reply, the request waits for another worker.
    worker.publish("answers", request(), rpc_core::transport::Confirm::Broker).await.expect("publishes");
    let third = next(&mut consumer).await;
    drop(consumer);
    let reply = third.envelope.reply(Ok(Bytes::from_static(b"\x02")));
    match third.handle.answer(&rpc_core::ReplyTo::Inbox(inbox.address.clone().into()), reply).await {
        // The embedded broker knows at once; the server drops the frame of a delivery it no longer holds.
        Err(Error::DeliveryLost) | Ok(rpc_core::transport::Answered::Sent) => {}
        other => panic!("{other:?}"),
    }
    // Every frame the worker sent, then every delivery to the observer before its own sync, has arrived.
    worker.flush().await.expect("flushes");
    observer.flush().await.expect("flushes");
    assert!(inbox.consumer.try_next().is_none(), "a lost delivery's reply reached the caller");
    let seen = observer.queue_stats("answers").await.expect("stats");
    assert_eq!((seen.acked, seen.ready, seen.unacked), (2, 1, 0), "{seen:?}");
}

/// A service whose `call` panics before it returns a future (as a custom argument decoder can).
struct PanicsEagerly;

impl rpc_core::Service for PanicsEagerly {
    fn name(&self) -> &'static str {
        "PanicsEagerly"
    }

    fn methods(&self) -> &'static [rpc_core::MethodInfo] {
        &[]
    }

    fn call(
        &self,
        method: &str,
        _args: Bytes,
    ) -> rpc_core::transport::BoxFuture<'static, Result<Bytes, rpc_core::Status>> {
        if method == "boom" {
            panic!("decoding failed on purpose");
        }
        Box::pin(std::future::ready(Ok(Bytes::from_static(b"\x07"))))
    }
}

/// A panic in the synchronous part of a service's `call` is caught like one in its future: the caller gets an
/// `Internal` reply at once, the delivery is settled, and the worker goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_before_the_handlers_future_is_an_error_reply() {
    let embedded = rpc_broker::Embedded::new();
    let server = Server::new(embedded.clone()).serve(PanicsEagerly).await.expect("serves");
    let client = Client::connect(embedded.clone()).await.expect("connects");
    for _ in 0..2 {
        let call = client.request("PanicsEagerly", "boom", Bytes::from_static(b"\x80")).timeout(Duration::from_secs(5));
        match call.await {
            Err(Error::Remote(status)) => {
                assert_eq!(status.code(), rpc_core::Code::Internal);
                assert!(status.message().contains("decoding failed on purpose"), "{status}");
            }
            other => panic!("expected an internal-error status, got {other:?}"),
        }
    }
    let answer = client.request("PanicsEagerly", "fine", Bytes::from_static(b"\x80")).await.expect("serves on");
    assert_eq!(&answer[..], b"\x07");
    assert_eq!(server.stats().panicked, 2);
    let seen = embedded.queue_stats(&rpc_core::naming::service_queue(None, "PanicsEagerly")).await.expect("stats");
    assert_eq!((seen.acked, seen.unacked), (3, 0), "{seen:?}");
}

/// A client of the previous protocol version (which lacks only the quiet publish) is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_the_oldest_accepted_version_is_served() {
    let broker = start(config()).await;
    let mut raw = TcpStream::connect(broker.local_addr()).await.expect("connects");
    let hello = ClientFrame::Hello { version: OLDEST_CLIENT_VERSION, token: String::new(), name: "old".into() };
    raw.write_all(&encode(&hello)).await.expect("writes");
    raw.write_all(&encode(&ClientFrame::Sync { req: 1 })).await.expect("writes");
    let seen = frames_until_ok(raw, 1).await;
    assert!(matches!(seen.first(), Some(ServerFrame::Welcome { .. })), "{seen:?}");
}

async fn frames_until_ok(raw: TcpStream, req: u32) -> Vec<ServerFrame> {
    let mut frames = FramedRead::new(raw, FrameCodec::new(MAX_FRAME));
    let mut seen = Vec::new();
    while !matches!(seen.last(), Some(ServerFrame::Ok { req: answered, .. }) if *answered == req) {
        let frame = tokio::time::timeout(Duration::from_secs(5), frames.next()).await.expect("a frame");
        seen.push(ServerFrame::parse(frame.expect("open").expect("ok")).expect("parses"));
    }
    seen
}

/// A broker that is not there: the error names the address and the cause.
#[tokio::test]
async fn connecting_to_a_closed_port_names_the_address_and_the_cause() {
    let port =
        std::net::TcpListener::bind("127.0.0.1:0").and_then(|listener| listener.local_addr()).expect("a port").port();
    match Remote::connect(&format!("mqrpc://127.0.0.1:{port}")).await {
        Err(Error::Transport(error)) => {
            let message = error.to_string();
            assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
            assert!(message.to_lowercase().contains("refused"), "{message}");
        }
        other => panic!("expected a transport error, got {:?}", other.map(|_| ())),
    }
}

/// `GET /metrics` from `address`: the body.
async fn scrape(address: &str) -> String {
    let mut stream = TcpStream::connect(address).await.expect("the metrics endpoint accepts");
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").await.expect("sent");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("read");
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_metrics_answers_a_scrape_that_follows_the_queues() {
    use tokio::io::AsyncBufReadExt;
    let mut process = tokio::process::Command::new(env!("CARGO_BIN_EXE_rpc-broker"))
        .args(["serve", "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the binary runs");
    let mut lines = tokio::io::BufReader::new(process.stdout.take().expect("stdout")).lines();
    let mut next = async || tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await.expect("prints");
    let listening = next().await.expect("reads").expect("a line");
    let broker = listening.strip_prefix("listening on ").expect("the broker's address first").to_owned();
    let metrics = next().await.expect("reads").expect("a line");
    let metrics = metrics.strip_prefix("metrics on http://").and_then(|rest| rest.strip_suffix("/metrics"));
    let metrics = metrics.expect("then the metrics address").to_owned();

    let remote = Remote::connect(&format!("mqrpc://{broker}")).await.expect("connects");
    remote.declare_queue("metered", &QueueOptions::new()).await.expect("declares");
    let ready = |body: &str| {
        body.lines()
            .find(|line| line.starts_with(r#"mqrpc_broker_queue_messages{queue="metered",state="ready"}"#))
            .and_then(|line| line.rsplit(' ').next())
            .map(str::to_owned)
    };
    let body = scrape(&metrics).await;
    assert!(body.contains("# TYPE mqrpc_broker_connections gauge"), "{body}");
    assert_eq!(ready(&body).as_deref(), Some("0"), "{body}");
    for n in 0..3 {
        let mut envelope = Envelope::new(Kind::Oneway);
        envelope.method = format!("m{n}").into();
        remote.publish("metered", envelope, rpc_core::transport::Confirm::Broker).await.expect("publishes");
    }
    let body = scrape(&metrics).await;
    assert_eq!(ready(&body).as_deref(), Some("3"), "{body}");
    assert!(body.contains(r#"mqrpc_broker_queue_published_total{queue="metered"} 3"#), "{body}");
    process.kill().await.expect("stops");
}

/// A private subscription gets every copy published to its topic while it exists, each subscription its own,
/// and leaves nothing behind: on both faces of the engine, and on the server its queue is gone with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_subscriptions_get_every_copy_and_go_with_their_consumer() {
    private_subscriptions(Arc::new(rpc_broker::Embedded::new())).await;
    let server = start(config()).await;
    private_subscriptions(Arc::new(Remote::connect(&server.url()).await.expect("connects"))).await;
    // The last consumer's cancel is on its way as the transport drops.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<String> =
            server.queues().into_iter().map(|(name, _)| name).filter(|name| name.contains('@')).collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "private groups outlived their consumers: {left:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn private_subscriptions(transport: Arc<dyn Transport>) {
    let marked = |n: u32| {
        let mut envelope = Envelope::new(Kind::Oneway);
        envelope.attempt = n;
        envelope
    };
    let mut first = transport.subscribe_private("news").await.expect("subscribes");
    let mut second = transport.subscribe_private("news").await.expect("subscribes");
    transport.publish_topic("news", marked(1)).await.expect("publishes");
    assert_eq!(next(&mut first).await.envelope.attempt, 1);
    assert_eq!(next(&mut second).await.envelope.attempt, 1);
    drop(second);
    transport.publish_topic("news", marked(2)).await.expect("publishes");
    assert_eq!(next(&mut first).await.envelope.attempt, 2);
    drop(first);
    // Nobody subscribes now: the copy has nowhere to go, and a subscription made later does not see it.
    transport.publish_topic("news", marked(3)).await.expect("publishes");
    let mut late = transport.subscribe_private("news").await.expect("subscribes");
    transport.publish_topic("news", marked(4)).await.expect("publishes");
    assert_eq!(next(&mut late).await.envelope.attempt, 4);
}
