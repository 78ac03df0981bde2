//! The two forms of a Redis Streams entry: the envelope whole in one field (`mqrpc-envelope`, what mqrpc writes by
//! default) and one field per envelope field beside `body` (`RedisStreamsOptions::compact(false)`, and every reply
//! to an address that is not an mqrpc inbox). A client and a worker that write different forms understand each
//! other, and each form is what lands in the stream. And the names of consumers that went away do not pile up in
//! a queue's group.

use std::sync::Arc;

use bytes::Bytes;
use mqrpc_tests::RedisStreamsHarness;
use mqrpc_tests::service::{Events, MathError, ProbeClient, ProbeServer, Worker};
use rpc_broker::adapter::redis_streams::{BODY, ENVELOPE, RedisStreams, RedisStreamsOptions};
use rpc_core::transport::Confirm;
use rpc_core::{Client, ConsumeOptions, Envelope, Kind, QueueOptions, Server, Transport};

use crate::WAIT;

/// A transport with the harness's prefix (so its keys go with the harness) writing the form `compact` says.
async fn transport(harness: &RedisStreamsHarness, compact: bool) -> RedisStreams {
    let options = RedisStreamsOptions::new()
        .prefix(harness.prefix())
        .visibility(std::time::Duration::from_secs(2))
        .compact(compact);
    RedisStreams::connect_with(harness.url(), options).await.expect("connects to Redis at MQRPC_REDIS_URL")
}

/// A worker writing one form answers a client writing the other, both ways round, typed results and typed
/// errors alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_redis), ignore = "needs Redis: MQRPC_REDIS_URL (bash .ci/brokers)")]
async fn a_client_and_a_worker_writing_different_forms_understand_each_other() {
    let harness = RedisStreamsHarness::from_env().expect("MQRPC_REDIS_URL");
    for (worker_compact, client_compact) in [(true, false), (false, true)] {
        let namespace = format!("forms{}", uuid::Uuid::new_v4().simple());
        let worker = Worker { name: "w".into(), events: Arc::new(Events::default()), client: None };
        let _server = Server::new(transport(&harness, worker_compact).await)
            .namespace(&namespace)
            .serve(ProbeServer::new(worker))
            .await
            .expect("the worker starts");
        let client = Client::builder(transport(&harness, client_compact).await)
            .namespace(&namespace)
            .connect()
            .await
            .expect("client");
        let probe = ProbeClient::new(&client);
        let sum = probe.add(2, 3).timeout(WAIT).await;
        assert_eq!(sum.expect("answered"), 5, "worker compact {worker_compact}, client compact {client_compact}");
        let quotient = probe.div(1, 0).timeout(WAIT).await.expect("answered");
        assert_eq!(quotient, Err(MathError::DivideByZero), "a typed error across forms");
        assert_eq!(client.stats().pending, 0);
    }
}

/// What each form puts in the stream: one `mqrpc-envelope` field (the envelope, which decodes back to the one
/// sent) and the time sent, or the `mqrpc-*` fields and `body`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_redis), ignore = "needs Redis: MQRPC_REDIS_URL (bash .ci/brokers)")]
async fn each_form_is_what_lands_in_the_stream() {
    let harness = RedisStreamsHarness::from_env().expect("MQRPC_REDIS_URL");
    let queue = format!("forms.{}", uuid::Uuid::new_v4().simple());
    let stream = format!("{}q:{queue}", harness.prefix());
    let redis = redis::Client::open(harness.url()).expect("a Redis URL");
    let mut connection = redis.get_multiplexed_async_connection().await.expect("connects");
    for compact in [true, false] {
        let transport = transport(&harness, compact).await;
        transport.declare_queue(&queue, &QueueOptions::default()).await.expect("declared");
        let mut envelope = Envelope::new(Kind::Oneway);
        envelope.service = "suite.Probe".into();
        envelope.method = "add".into();
        envelope.body = Bytes::from_static(b"\x92\x01\x02");
        transport.publish(&queue, envelope.clone(), Confirm::Broker).await.expect("published");

        let entries: redis::streams::StreamRangeReply =
            redis::cmd("XRANGE").arg(&stream).arg("-").arg("+").query_async(&mut connection).await.expect("read");
        let [entry] = entries.ids.as_slice() else { panic!("one entry, got {}", entries.ids.len()) };
        let mut names: Vec<&str> = entry.map.keys().map(String::as_str).collect();
        names.sort_unstable();
        if compact {
            assert_eq!(names, ["mqrpc-envelope", "mqrpc-sent-at-ms"]);
            let bytes: Vec<u8> = entry.get(ENVELOPE).expect("the envelope field");
            let decoded = rpc_core::codec::decode_envelope(&bytes, &rpc_core::codec::Limits::default())
                .expect("the field is an envelope");
            assert_eq!(decoded, envelope, "the envelope whole");
        } else {
            assert!(!names.contains(&ENVELOPE), "fields only: {names:?}");
            for name in ["mqrpc-kind", "mqrpc-id", "mqrpc-service", "mqrpc-method", "mqrpc-sent-at-ms", BODY] {
                assert!(names.contains(&name), "{name} in {names:?}");
            }
            assert_eq!(entry.get::<String>("mqrpc-method").as_deref(), Some("add"));
            assert_eq!(entry.get::<Vec<u8>>(BODY).as_deref(), Some(&b"\x92\x01\x02"[..]));
        }
        let _: i64 =
            redis::cmd("XTRIM").arg(&stream).arg("MAXLEN").arg(0).query_async(&mut connection).await.expect("emptied");
    }
}

/// How many consumers the group of `stream` lists.
async fn consumers(connection: &mut redis::aio::MultiplexedConnection, stream: &str) -> usize {
    let listed: Vec<redis::Value> =
        redis::cmd("XINFO").arg("CONSUMERS").arg(stream).arg("mqrpc").query_async(connection).await.expect("listed");
    listed.len()
}

/// A consumer whose process went away leaves its name in the group; once it has held nothing for twice the
/// visibility timeout (2 s here), a live consumer deletes it. The live one, idle as long, goes too (Redis before
/// 7.2 does not count a read that returns nothing), and is listed again with its next delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_redis), ignore = "needs Redis: MQRPC_REDIS_URL (bash .ci/brokers)")]
async fn consumers_that_went_away_are_deleted_from_the_group() {
    let harness = RedisStreamsHarness::from_env().expect("MQRPC_REDIS_URL");
    let queue = format!("sweep.{}", uuid::Uuid::new_v4().simple());
    let stream = format!("{}q:{queue}", harness.prefix());
    let redis = redis::Client::open(harness.url()).expect("a Redis URL");
    let mut connection = redis.get_multiplexed_async_connection().await.expect("connects");
    let transport = transport(&harness, true).await;
    transport.declare_queue(&queue, &QueueOptions::default()).await.expect("declared");
    let oneway = || {
        let mut envelope = Envelope::new(Kind::Oneway);
        envelope.method = "add".into();
        envelope
    };
    // Each consumer takes and acks one entry, so that the group knows it.
    let mut gone = transport.consume(&queue, ConsumeOptions::default()).await.expect("consumes");
    transport.publish(&queue, oneway(), Confirm::Broker).await.expect("published");
    let delivery = tokio::time::timeout(WAIT, gone.next()).await.expect("delivered").expect("open");
    delivery.handle.ack().await.expect("acked");
    drop(gone);
    let mut live = transport.consume(&queue, ConsumeOptions::default()).await.expect("consumes");
    transport.publish(&queue, oneway(), Confirm::Broker).await.expect("published");
    let delivery = tokio::time::timeout(WAIT, live.next()).await.expect("delivered").expect("open");
    delivery.handle.ack().await.expect("acked");
    assert_eq!(consumers(&mut connection, &stream).await, 2, "both consumers listed");

    mqrpc_tests::eventually_async("the consumers that hold nothing to be deleted", WAIT, || {
        let mut connection = connection.clone();
        let stream = stream.clone();
        async move { consumers(&mut connection, &stream).await == 0 }
    })
    .await;
    transport.publish(&queue, oneway(), Confirm::Broker).await.expect("published");
    let delivery = tokio::time::timeout(WAIT, live.next()).await.expect("the live consumer goes on").expect("open");
    delivery.handle.ack().await.expect("acked");
    assert_eq!(consumers(&mut connection, &stream).await, 1);
}
