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

/// Stream entries as `XRANGE` returns them: ids and field names and values.
type Entries<N, V> = Vec<(String, Vec<(N, V)>)>;

/// A oneway envelope of `method` whose call has `correlation_id`.
fn call(method: &str, correlation_id: uuid::Uuid) -> Envelope {
    let mut envelope = Envelope::new(Kind::Oneway);
    envelope.service = "suite.Probe".into();
    envelope.method = method.into();
    envelope.correlation_id = Some(correlation_id);
    envelope
}

/// The correlation ids of the entries in `stream`, in order.
async fn correlation_ids(connection: &mut redis::aio::MultiplexedConnection, stream: &str) -> Vec<uuid::Uuid> {
    let entries: Entries<Vec<u8>, Vec<u8>> =
        redis::cmd("XRANGE").arg(stream).arg("-").arg("+").query_async(connection).await.expect("read");
    entries
        .into_iter()
        .filter_map(|(_, fields)| {
            let (envelope, _) =
                rpc_broker::adapter::redis_streams::read_entry(fields, &rpc_core::codec::Limits::default())
                    .expect("an envelope");
            envelope.correlation_id
        })
        .collect()
}

/// A cancel looks through the queue's ready entries, past hundreds of others and in both forms, and removes
/// its call's request only: not one that carries the id elsewhere (as its message id, or inside its body). A
/// cancel that finds nothing goes on the queue's stream of cancels, for the consumers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_redis), ignore = "needs Redis: MQRPC_REDIS_URL (bash .ci/brokers)")]
async fn a_cancel_removes_its_own_request_from_the_queue_and_no_other() {
    let harness = RedisStreamsHarness::from_env().expect("MQRPC_REDIS_URL");
    let queue = format!("cancel.{}", uuid::Uuid::new_v4().simple());
    let stream = format!("{}q:{queue}", harness.prefix());
    let redis = redis::Client::open(harness.url()).expect("a Redis URL");
    let mut connection = redis.get_multiplexed_async_connection().await.expect("connects");
    let (compact, fields) = (transport(&harness, true).await, transport(&harness, false).await);
    compact.declare_queue(&queue, &QueueOptions::default()).await.expect("declared");
    let mut expected = Vec::new();
    for n in 0..300_usize {
        // Of every shape the walk over an envelope skips: headers, a deadline, a key, bodies of each size class.
        let mut filler = call("add", uuid::Uuid::new_v4());
        filler.headers.insert(format!("h{n}"), "v".repeat(n));
        filler.deadline_ms = Some(u64::MAX >> (n % 64));
        filler.idempotency_key = Some(format!("key-{n}").into());
        filler.body = Bytes::from(vec![0xa1; [3, 300, 70_000][n % 3]]);
        expected.extend(filler.correlation_id);
        compact.publish(&queue, filler, Confirm::Broker).await.expect("published");
    }
    let (target, in_fields, absent) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    // Decoys: the target's id as a message id, and inside a body as `{"c": <its 16 bytes>}`.
    let mut as_id = call("add", uuid::Uuid::new_v4());
    as_id.id = target;
    let mut in_body = call("add", uuid::Uuid::new_v4());
    let mut body = vec![0x81, 0xa1, b'c', 0xc4, 0x10];
    body.extend_from_slice(target.as_bytes());
    in_body.body = Bytes::from(body);
    for decoy in [as_id, in_body] {
        expected.extend(decoy.correlation_id);
        compact.publish(&queue, decoy, Confirm::Broker).await.expect("published");
    }
    fields.publish(&queue, call("add", in_fields), Confirm::Broker).await.expect("published");
    compact.publish(&queue, call("add", target), Confirm::Broker).await.expect("published");
    // Written by another program, its keys in another order: the correlation id last, after headers, a body
    // holding the decoy and a deadline, which the walk skips.
    let foreign = uuid::Uuid::new_v4();
    let mut bytes = vec![0x89, 0xa1, b'h', 0x81, 0xa1, b'x', 0xa1, b'y', 0xa1, b'b', 0xc5, 0x00, 0x20];
    bytes.extend_from_slice(&[0x81, 0xa1, b'c', 0xc4, 0x10]);
    bytes.extend_from_slice(foreign.as_bytes());
    bytes.extend_from_slice(&[0; 11]);
    bytes.extend_from_slice(&[0xa1, b'd', 0xce, 0x00, 0x00, 0x13, 0x88, 0xa1, b'v', 0x01, 0xa1, b'k', 0x02]);
    bytes.extend_from_slice(&[0xa1, b'i', 0xc4, 0x10]);
    bytes.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    bytes.extend_from_slice(&[0xa1, b's', 0xa3, b'a', b'b', b'c', 0xa1, b'm', 0xa3, b'a', b'd', b'd']);
    bytes.extend_from_slice(&[0xa1, b'c', 0xc4, 0x10]);
    let mut decoy_first = bytes.clone();
    bytes.extend_from_slice(foreign.as_bytes());
    let other = uuid::Uuid::new_v4();
    decoy_first.extend_from_slice(other.as_bytes());
    for (envelope, correlation_id) in [(decoy_first, other), (bytes, foreign)] {
        let _: String = redis::cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg(ENVELOPE)
            .arg(envelope)
            .query_async(&mut connection)
            .await
            .expect("added");
        expected.push(correlation_id);
    }
    expected.pop();

    compact.cancel(&queue, target).await.expect("cancelled");
    fields.cancel(&queue, in_fields).await.expect("cancelled");
    compact.cancel(&queue, foreign).await.expect("cancelled");
    assert_eq!(correlation_ids(&mut connection, &stream).await, expected, "only the three cancelled calls went");
    let stats = compact.queue_stats(&queue).await.expect("stats");
    assert_eq!((stats.ready, stats.cancelled), (expected.len(), 3), "{stats:?}");

    compact.cancel(&queue, absent).await.expect("cancelled");
    let cancels: Entries<String, String> = redis::cmd("XRANGE")
        .arg(format!("{}x:{queue}", harness.prefix()))
        .arg("-")
        .arg("+")
        .query_async(&mut connection)
        .await
        .expect("read");
    let told: Vec<&str> = cancels.iter().flat_map(|(_, fields)| fields.iter().map(|(_, id)| id.as_str())).collect();
    assert_eq!(told, [absent.simple().to_string()], "only the cancel that found nothing is told to consumers");
    assert_eq!(compact.queue_stats(&queue).await.expect("stats").cancelled, 3);
}

/// Delayed calls published by one process are moved to the queue by another's consumer when due, the earliest
/// first, and count against the queue's maximum length while they wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_redis), ignore = "needs Redis: MQRPC_REDIS_URL (bash .ci/brokers)")]
async fn delayed_calls_reach_another_processs_consumer_when_due_and_count_against_the_length() {
    use std::time::{Duration, Instant};
    let harness = RedisStreamsHarness::from_env().expect("MQRPC_REDIS_URL");
    let queue = format!("delay.{}", uuid::Uuid::new_v4().simple());
    let (publisher, worker) = (transport(&harness, true).await, transport(&harness, false).await);
    publisher.declare_queue(&queue, &QueueOptions::new().max_len(2)).await.expect("declared");
    let (late, early) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let sent = Instant::now();
    for (correlation_id, delay) in [(late, 900), (early, 300)] {
        let mut envelope = call("add", correlation_id);
        envelope.delay_ms = Some(delay);
        publisher.publish(&queue, envelope, Confirm::Broker).await.expect("held");
    }
    let stats = publisher.queue_stats(&queue).await.expect("stats");
    assert_eq!((stats.ready, stats.delayed), (0, 2), "{stats:?}");
    let refused = publisher.publish(&queue, call("add", uuid::Uuid::new_v4()), Confirm::Broker).await;
    assert!(matches!(refused, Err(rpc_core::Error::QueueFull(_))), "{refused:?}");

    let mut consumer = worker.consume(&queue, ConsumeOptions::default()).await.expect("consumes");
    for (correlation_id, delay) in [(early, 300), (late, 900)] {
        let delivery = tokio::time::timeout(WAIT, consumer.next()).await.expect("delivered").expect("open");
        let waited = sent.elapsed();
        assert_eq!(delivery.envelope.correlation_id, Some(correlation_id), "the earliest due comes first");
        assert!(waited >= Duration::from_millis(delay), "delivered after {waited:?}, before its delay of {delay} ms");
        assert_eq!(delivery.envelope.delay_ms, None, "the delay is spent");
        delivery.handle.ack().await.expect("acked");
    }
    let stats = publisher.queue_stats(&queue).await.expect("stats");
    assert_eq!((stats.ready, stats.delayed, stats.unacked), (0, 0, 0), "{stats:?}");
}

/// A consumer holding a cancelled call's request hears of the cancel ([`AckHandle::cancelled`] completes). A
/// consumer that did not hold it remembers the cancel: when it claims the request later (its holder died), it
/// drops it unrun and counts it as cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_redis), ignore = "needs Redis: MQRPC_REDIS_URL (bash .ci/brokers)")]
async fn a_held_request_hears_of_its_cancel_and_is_dropped_unrun_when_claimed() {
    let harness = RedisStreamsHarness::from_env().expect("MQRPC_REDIS_URL");
    let queue = format!("early.{}", uuid::Uuid::new_v4().simple());
    let (first, second) = (transport(&harness, true).await, transport(&harness, true).await);
    first.declare_queue(&queue, &QueueOptions::default()).await.expect("declared");
    let (cancelled, kept) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let mut holder = first.consume(&queue, ConsumeOptions::default()).await.expect("consumes");
    first.publish(&queue, call("add", cancelled), Confirm::Broker).await.expect("published");
    let delivery = tokio::time::timeout(WAIT, holder.next()).await.expect("delivered").expect("open");
    // Started before the cancel, so that it hears of it.
    let mut other = second.consume(&queue, ConsumeOptions::default()).await.expect("consumes");
    let heard = delivery.handle.cancelled().expect("a queue's deliveries hear of cancels");
    first.cancel(&queue, cancelled).await.expect("cancelled");
    tokio::time::timeout(WAIT, heard).await.expect("the holder hears of the cancel");
    assert_eq!(first.queue_stats(&queue).await.expect("stats").cancelled, 0, "held, so not removed");

    // The holder goes away without settling: the other consumer claims the request past the visibility timeout
    // (2 s; it read the cancel with its reads meanwhile, every 300 ms at most) and drops it.
    drop(delivery);
    drop(holder);
    first.publish(&queue, call("add", kept), Confirm::Broker).await.expect("published");
    let delivery = tokio::time::timeout(WAIT, other.next()).await.expect("delivered").expect("open");
    assert_eq!(delivery.envelope.correlation_id, Some(kept));
    delivery.handle.ack().await.expect("acked");
    mqrpc_tests::eventually_async("the claimed request to be dropped unrun", WAIT, || async {
        second.queue_stats(&queue).await.is_ok_and(|stats| (stats.unacked, stats.cancelled) == (0, 1))
    })
    .await;
    assert!(other.try_next().is_none(), "the cancelled call's request was handed out");
}
