//! RabbitMQ and NATS beyond the shared suite: plain clients of each broker calling our workers with the
//! documented properties and headers, durable mode (requests published while no worker runs are served once
//! one starts), quorum queues and direct reply-to. Each test needs its broker's URL variable (`.ci/run` sets
//! them); a build without it ignores them.

use std::collections::BTreeMap;
use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::join_all;
use mqrpc_tests::service::{Events, ProbeClient, ProbeServer, Worker};
use mqrpc_tests::tidy::Recording;
use mqrpc_tests::{AmqpHarness, Available, Harness, NatsHarness};
use rpc_core::transport::Confirm;
use rpc_core::{Client, QueueOptions, Server, ServerHandle, Transport, naming};
use uuid::Uuid;

use crate::WAIT;

fn namespace() -> String {
    format!("b{}", Uuid::new_v4().simple())
}

async fn worker(transport: Arc<dyn Transport>, namespace: &str) -> ServerHandle {
    worker_with(transport, namespace, QueueOptions::new()).await
}

async fn worker_with(transport: Arc<dyn Transport>, namespace: &str, options: QueueOptions) -> ServerHandle {
    let worker = Worker { name: "w".into(), events: Arc::new(Events::default()), client: None };
    Server::new(transport)
        .namespace(namespace)
        .queue_options(options)
        .serve(ProbeServer::new(worker))
        .await
        .expect("the worker starts")
}

/// The arguments of `add`, as any MessagePack library writes a map.
fn add_args(a: i64, b: i64) -> Vec<u8> {
    rmp_serde::to_vec_named(&BTreeMap::from([("a", a), ("b", b)])).expect("encodes")
}

/// A cluster's nodes as a URL list: a node that does not answer is passed over for the next, a worker and a
/// caller given the list serve and call, and a list that names no node is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_amqp), ignore = "needs RabbitMQ: MQRPC_AMQP_URL (bash .ci/brokers)")]
async fn an_amqp_url_list_skips_a_node_that_does_not_answer() {
    use rpc_broker::adapter::amqp::Amqp;

    let harness = AmqpHarness::from_env().available();
    let namespace = namespace();
    // Nothing listens on port 1.
    let nodes = format!("amqp://guest:guest@127.0.0.1:1/%2f, {}", harness.url());
    let transport = Amqp::connect(&nodes).await.expect("connects to the node that answers");
    assert!(!format!("{transport:?}").contains("guest:guest"), "Debug shows a password: {transport:?}");
    // The harness deletes the queues these connections make.
    let tidy = |transport: Amqp| Arc::new(Recording::new(Arc::new(transport), Arc::clone(harness.named())));
    let _worker = worker(tidy(transport), &namespace).await;
    let caller =
        Client::builder(tidy(Amqp::connect(&nodes).await.expect("connects"))).namespace(&namespace).connect().await;
    let probe = ProbeClient::new(&caller.expect("a client"));
    assert_eq!(probe.add(2, 3).timeout(WAIT).await.expect("answered"), 5);
    let none = Amqp::connect(" , ").await;
    assert!(matches!(none, Err(rpc_core::Error::InvalidArgument(_))), "{none:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_amqp), ignore = "needs RabbitMQ: MQRPC_AMQP_URL (bash .ci/brokers)")]
async fn a_plain_amqp_client_calls_a_service() {
    use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable};
    use lapin::{BasicProperties, Connection, ConnectionProperties};

    let harness = AmqpHarness::from_env().available();
    let namespace = namespace();
    let _worker = worker(harness.connect().await, &namespace).await;

    let connection = Connection::connect(harness.url(), ConnectionProperties::default()).await.expect("connects");
    let channel = connection.create_channel().await.expect("a channel");
    let exclusive = QueueDeclareOptions { exclusive: true, auto_delete: true, ..QueueDeclareOptions::default() };
    let replies = channel.queue_declare("".into(), exclusive, FieldTable::default()).await.expect("a reply queue");
    let no_ack = BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() };
    let mut replies = channel
        .basic_consume(replies.name().clone(), "".into(), no_ack, FieldTable::default())
        .await
        .expect("consumes");
    let queue = naming::service_queue(Some(&namespace), "suite.Probe");

    for (correlation_id, method, body) in
        [("call-1", "add", add_args(2, 3)), ("call-2", "no_such_method", add_args(0, 0))]
    {
        let properties = BasicProperties::default()
            .with_reply_to(replies.queue())
            .with_correlation_id(correlation_id.into())
            .with_type(method.into())
            .with_content_type("application/msgpack".into());
        channel
            .basic_publish("".into(), queue.as_str().into(), BasicPublishOptions::default(), &body, properties)
            .await
            .expect("publishes")
            .await
            .expect("confirmed");
        let reply = tokio::time::timeout(WAIT, replies.next()).await.expect("a reply").expect("open").expect("ok");
        assert_eq!(reply.properties.correlation_id().as_ref().map(|id| id.as_str()), Some(correlation_id));
        let status =
            reply.properties.headers().as_ref().and_then(|headers| headers.inner().get("mqrpc-status").cloned());
        if method == "add" {
            assert_eq!(status, None, "an ok reply has no status header");
            assert_eq!(rmp_serde::from_slice::<i64>(&reply.data).expect("a MessagePack integer"), 5);
        } else {
            assert_eq!(status, Some(AMQPValue::LongLongInt(2)), "unknown method is status 2");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_nats), ignore = "needs NATS: MQRPC_NATS_URL (bash .ci/brokers)")]
async fn a_plain_nats_client_calls_a_service() {
    let harness = NatsHarness::core().available();
    let namespace = namespace();
    let _worker = worker(harness.connect().await, &namespace).await;
    let client = async_nats::connect(harness.url()).await.expect("connects");
    let subject = naming::service_queue(Some(&namespace), "suite.Probe");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("mqrpc-method", "add");
    let reply = tokio::time::timeout(WAIT, client.request_with_headers(subject, headers, add_args(40, 2).into()))
        .await
        .expect("in time")
        .expect("answered");
    assert!(reply.headers.as_ref().and_then(|headers| headers.get("mqrpc-status")).is_none());
    assert_eq!(rmp_serde::from_slice::<i64>(&reply.payload).expect("a MessagePack integer"), 42);

    // Nobody serves this subject: the plain client sees NATS's own no-responders error, and ours too.
    let nobody = client.request("nobody.here", add_args(1, 1).into()).await;
    assert!(matches!(nobody.map_err(|error| error.kind()), Err(async_nats::RequestErrorKind::NoResponders)));
}

/// A hostile header from any NATS client (a value holding a lone `\r`, which async-nats 0.51 panicked its
/// connection task on) reaches the worker's subscription: the worker drops or answers that message and goes on
/// serving on the same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_nats), ignore = "needs NATS: MQRPC_NATS_URL (bash .ci/brokers)")]
async fn a_header_value_holding_a_carriage_return_does_not_take_the_worker_down() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    let harness = NatsHarness::core().available();
    let namespace = namespace();
    let _worker = worker(harness.connect().await, &namespace).await;
    let client = Client::builder(harness.connect().await).namespace(&namespace).connect().await.expect("client");
    let probe = ProbeClient::new(&client);
    assert_eq!(probe.add(1, 1).timeout(WAIT).await.expect("answered before"), 2);

    // The raw protocol: a plain TCP client publishing with headers (HPUB), one value cut by a `\r`.
    let address = harness.url().trim_start_matches("nats://").to_owned();
    let stream = tokio::net::TcpStream::connect(&address).await.expect("connects");
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let info = lines.next_line().await.expect("reads").expect("the server's INFO");
    assert!(info.starts_with("INFO "), "{info}");
    let subject = naming::service_queue(Some(&namespace), "suite.Probe");
    let header = "NATS/1.0\r\nmqrpc-method: a\rdd\r\nX-Hostile: \r\r\n\r\n";
    let payload = "\u{80}";
    let hpub = format!(
        "CONNECT {{\"verbose\":false,\"headers\":true}}\r\nHPUB {subject} _INBOX.hostile {} {}\r\n{header}{payload}\r\nPING\r\n",
        header.len(),
        header.len() + payload.len(),
    );
    write.write_all(hpub.as_bytes()).await.expect("publishes");
    loop {
        let line =
            tokio::time::timeout(WAIT, lines.next_line()).await.expect("in time").expect("reads").expect("a line");
        assert!(!line.starts_with("-ERR"), "the server refused the message: {line}");
        if line == "PONG" {
            break;
        }
    }

    // The same worker, on the same connection, answers the next calls.
    for n in 0..10 {
        assert_eq!(probe.add(n, 1).timeout(WAIT).await.expect("answered after the hostile header"), n + 1);
    }
}

/// A oneway envelope of `size` body bytes, numbered `n` in its method name.
fn oneway(n: usize, size: usize) -> rpc_core::Envelope {
    let mut envelope = rpc_core::Envelope::new(rpc_core::Kind::Oneway);
    envelope.method = format!("m{n}").into();
    envelope.body = vec![7; size].into();
    envelope
}

/// A plain NATS client subscribed to a fresh subject ending in `name`, once the server has the subscription.
async fn plain_subscriber(url: &str, name: &str) -> (async_nats::Client, String, async_nats::Subscriber) {
    let plain = async_nats::connect(url).await.expect("connects");
    let subject = format!("{}.{name}", namespace());
    let received = plain.subscribe(subject.clone()).await.expect("subscribes");
    plain.flush().await.expect("the server has the subscription");
    (plain, subject, received)
}

/// `count` oneway messages to `subject` through `transport`, each published from a task of its own.
fn spawn_publishes(
    transport: &Arc<rpc_broker::adapter::nats::Nats>,
    subject: &str,
    count: usize,
) -> Vec<tokio::task::JoinHandle<Result<(), rpc_core::Error>>> {
    (0..count)
        .map(|n| {
            let (transport, subject) = (Arc::clone(transport), subject.to_owned());
            tokio::spawn(async move { transport.publish(&subject, oneway(n, 64), Confirm::Broker).await })
        })
        .collect()
}

/// Waits for `count` messages on `received`.
async fn receive(received: &mut async_nats::Subscriber, count: usize) {
    for _ in 0..count {
        tokio::time::timeout(WAIT, received.next()).await.expect("every message arrives").expect("subscribed");
    }
}

/// The envelope of the next message on `received`, which the transport published whole in its body.
async fn next_envelope(received: &mut async_nats::Subscriber) -> rpc_core::Envelope {
    let message = tokio::time::timeout(WAIT, received.next()).await.expect("it arrives").expect("subscribed");
    rpc_core::codec::decode_envelope(&message.payload[9..], &rpc_core::codec::Limits::default()).expect("an envelope")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_nats), ignore = "needs NATS: MQRPC_NATS_URL (bash .ci/brokers)")]
async fn nats_messages_published_before_close_all_reach_the_server() {
    let harness = NatsHarness::core().available();
    let (_plain, subject, mut received) = plain_subscriber(harness.url(), "burst").await;

    // Published from many tasks at once, so that most wait in the transport's batches when it closes.
    const MESSAGES: usize = 2_000;
    let transport = Arc::new(rpc_broker::adapter::nats::Nats::connect(harness.url()).await.expect("connects"));
    for published in join_all(spawn_publishes(&transport, &subject, MESSAGES)).await {
        published.expect("the task ran").expect("published");
    }
    transport.close().await;
    receive(&mut received, MESSAGES).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_nats), ignore = "needs NATS: MQRPC_NATS_URL (bash .ci/brokers)")]
async fn nats_two_closes_at_once_lose_no_publish_that_returned_ok() {
    let harness = NatsHarness::core().available();
    let (_plain, subject, mut received) = plain_subscriber(harness.url(), "closes").await;
    const MESSAGES: usize = 4_000;
    let transport = Arc::new(rpc_broker::adapter::nats::Nats::connect(harness.url()).await.expect("connects"));
    let publishes = spawn_publishes(&transport, &subject, MESSAGES);

    // Two closes while the publishes are under way: neither returns before everything taken is flushed.
    tokio::join!(transport.close(), transport.close());
    let mut sent = 0;
    for published in join_all(publishes).await {
        match published.expect("the task ran") {
            Ok(()) => sent += 1,
            Err(rpc_core::Error::Shutdown) => {}
            Err(other) => panic!("a publish failed otherwise than with Shutdown: {other:?}"),
        }
    }
    // Every message whose publish returned Ok arrives.
    receive(&mut received, sent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_nats), ignore = "needs NATS: MQRPC_NATS_URL (bash .ci/brokers)")]
async fn nats_a_publish_made_before_close_arrives_and_one_made_after_it_fails_with_shutdown() {
    let harness = NatsHarness::core().available();
    let (_plain, subject, mut received) = plain_subscriber(harness.url(), "late").await;
    let transport = rpc_broker::adapter::nats::Nats::connect(harness.url()).await.expect("connects");
    transport.publish(&subject, oneway(0, 64), Confirm::Broker).await.expect("published");

    // Made before the close, awaited after it: the outbox took it when it was made, and the close hands what it
    // took to the server.
    let early = transport.publish(&subject, oneway(1, 64), Confirm::Broker);
    transport.close().await;
    early.await.expect("taken before the close");
    // Made after the close: refused, not taken and lost.
    let late = transport.publish(&subject, oneway(2, 64), Confirm::Broker).await;
    assert!(matches!(late, Err(rpc_core::Error::Shutdown)), "refused, not taken and lost: {late:?}");
    let flushed = tokio::time::timeout(WAIT, transport.flush()).await.expect("a flush after the close returns");
    assert!(matches!(flushed, Err(rpc_core::Error::Shutdown)), "{flushed:?}");

    assert_eq!(next_envelope(&mut received).await.method, "m0", "the publish before the close reached the server");
    assert_eq!(next_envelope(&mut received).await.method, "m1", "the publish made before the close reached it too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_nats), ignore = "needs NATS: MQRPC_NATS_URL (bash .ci/brokers)")]
async fn nats_refuses_a_message_over_the_maximum_payload_and_goes_on() {
    let harness = NatsHarness::core().available();
    let (_plain, subject, mut received) = plain_subscriber(harness.url(), "sizes").await;
    let transport = rpc_broker::adapter::nats::Nats::connect(harness.url()).await.expect("connects");
    let max = transport.client().max_payload();

    let refused = transport.publish(&subject, oneway(0, max), Confirm::Broker).await;
    assert!(
        matches!(&refused, Err(rpc_core::Error::InvalidArgument(message)) if message.contains("maximum payload")),
        "{refused:?}"
    );
    transport.publish(&subject, oneway(1, 16), Confirm::Broker).await.expect("a small message after it is published");
    assert_eq!(next_envelope(&mut received).await.method, "m1", "only the small message reached the server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_nats), ignore = "needs NATS: MQRPC_NATS_URL (bash .ci/brokers)")]
async fn a_plain_jetstream_client_calls_a_service() {
    let harness = NatsHarness::jetstream().available();
    let namespace = namespace();
    let server = worker(harness.connect().await, &namespace).await;
    let client = async_nats::connect(harness.url()).await.expect("connects");
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.expect("subscribes");
    let jetstream = async_nats::jetstream::new(client);
    let subject = naming::service_queue(Some(&namespace), "suite.Probe");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("mqrpc-method", "add");
    headers.insert("mqrpc-reply-to", inbox.as_str());
    headers.insert("Nats-Msg-Id", "request-1");
    for _ in 0..2 {
        // The second publish is a retry with the same id: JetStream drops it, so it runs once.
        jetstream
            .publish_with_headers(subject.clone(), headers.clone(), add_args(20, 22).into())
            .await
            .expect("publishes")
            .await
            .expect("stored");
    }
    let reply = tokio::time::timeout(WAIT, replies.next()).await.expect("a reply").expect("open");
    assert_eq!(rmp_serde::from_slice::<i64>(&reply.payload).expect("a MessagePack integer"), 42);
    let duplicate = tokio::time::timeout(Duration::from_millis(500), replies.next()).await;
    assert!(duplicate.is_err(), "the retried request ran twice");
    // The reply address (without `mqrpc-reply-inbox`) is a plain subscriber's subject, which no stream captures:
    // the reply went on core NATS and the request was acked, not published to a stream that is not there and
    // run again when that failed.
    mqrpc_tests::eventually("the request to be handled", WAIT, || server.stats().handled == 1).await;
}

/// What a plain client meets on JetStream (docs/conformance.md): a stream message without `mqrpc-reply-to` is a
/// oneway call, run and acked (nothing stays pending); a plain core-NATS request to a subject a stream captures
/// gets the stream's PubAck as its reply; and a bounded queue counts a message handed out and not yet acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_nats), ignore = "needs NATS: MQRPC_NATS_URL (bash .ci/brokers)")]
async fn a_jetstream_message_without_a_reply_address_is_a_oneway_call_and_acked() {
    let harness = NatsHarness::jetstream().available();
    let namespace = namespace();
    let transport = harness.connect().await;
    let server = worker(Arc::clone(&transport), &namespace).await;
    let subject = naming::service_queue(Some(&namespace), "suite.Probe");
    let client = async_nats::connect(harness.url()).await.expect("connects");
    let jetstream = async_nats::jetstream::new(client.clone());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("mqrpc-method", "record");
    let arguments = rmp_serde::to_vec_named(&BTreeMap::from([("n", 7)])).expect("encodes");
    jetstream
        .publish_with_headers(subject.clone(), headers, arguments.into())
        .await
        .expect("publishes")
        .await
        .expect("stored");
    mqrpc_tests::eventually("the oneway call to be handled", WAIT, || server.stats().handled == 1).await;
    mqrpc_tests::eventually_async("the stream to hold nothing pending or unacked", WAIT, || async {
        transport.queue_stats(&subject).await.is_ok_and(|stats| stats.ready == 0 && stats.unacked == 0)
    })
    .await;

    // A core request to the captured subject: the stream stores it and answers with its PubAck.
    let reply = client.request(subject.clone(), add_args(1, 2).into()).await.expect("a reply");
    assert!(reply.payload.starts_with(b"{\"stream\":"), "not the stream's PubAck: {:?}", reply.payload);
    mqrpc_tests::eventually("the stored request to run too", WAIT, || server.stats().handled == 2).await;
    server.shutdown(Duration::from_secs(5)).await;

    // A queue of at most 2: one message handed out and unacked, one ready, and the third is refused.
    let queue = format!("{namespace}.bounded");
    transport.declare_queue(&queue, &QueueOptions::new().max_len(2)).await.expect("declares");
    let message = |n: u32| {
        let mut envelope = rpc_core::Envelope::new(rpc_core::Kind::Oneway);
        envelope.method = format!("m{n}").into();
        envelope
    };
    transport.publish(&queue, message(1), Confirm::Broker).await.expect("the first is taken");
    let mut consumer = transport.consume(&queue, rpc_core::ConsumeOptions::new()).await.expect("consumes");
    let held = tokio::time::timeout(WAIT, consumer.next()).await.expect("a delivery").expect("open");
    transport.publish(&queue, message(2), Confirm::Broker).await.expect("the second is taken");
    let third = transport.publish(&queue, message(3), Confirm::Broker).await;
    assert!(matches!(third, Err(rpc_core::Error::QueueFull(_))), "the unacked message is not counted: {third:?}");
    held.handle.ack().await.expect("acks");
    drop(consumer);
    transport.delete_queue(&queue).await.expect("deletes");
}

/// Requests made while no worker runs wait in the broker and are all answered once one starts.
async fn served_once_a_worker_starts(harness: &dyn Harness) {
    let namespace = namespace();
    let deployment = harness.connect().await;
    let queue = naming::service_queue(Some(&namespace), "suite.Probe");
    deployment.declare_queue(&queue, &QueueOptions::new().durable(true)).await.expect("declares the queue");
    let client = Client::builder(harness.connect().await).namespace(&namespace).connect().await.expect("client");
    let probe = ProbeClient::new(&client);
    let calls: Vec<_> =
        (0..50i64).map(|n| tokio::spawn(probe.add(n, 1).timeout(Duration::from_secs(60)).into_future())).collect();
    mqrpc_tests::eventually_async("the 50 requests to wait in the queue", WAIT, || async {
        deployment.queue_stats(&queue).await.map(|stats| stats.ready).unwrap_or(0) == 50
    })
    .await;
    let _worker = worker(harness.connect().await, &namespace).await;
    let results = join_all(calls).await;
    for (n, result) in results.into_iter().enumerate() {
        assert_eq!(result.expect("joins").expect("answered"), n as i64 + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_amqp), ignore = "needs RabbitMQ: MQRPC_AMQP_URL (bash .ci/brokers)")]
async fn rabbitmq_durable_queue_serves_requests_made_before_any_worker() {
    let harness = AmqpHarness::from_env().available();
    served_once_a_worker_starts(&harness).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_amqp), ignore = "needs RabbitMQ: MQRPC_AMQP_URL (bash .ci/brokers)")]
async fn rabbitmq_quorum_queue_serves_requests_made_before_any_worker() {
    let options = rpc_broker::adapter::amqp::AmqpOptions::new().quorum(true);
    let harness = AmqpHarness::with(options).available();
    served_once_a_worker_starts(&harness).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_nats), ignore = "needs NATS: MQRPC_NATS_URL (bash .ci/brokers)")]
async fn jetstream_serves_requests_made_before_any_worker() {
    let harness = NatsHarness::jetstream().available();
    served_once_a_worker_starts(&harness).await;
}

/// Quorum queues count every delivery: a message requeued up to the limit is dead-lettered by count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_amqp), ignore = "needs RabbitMQ: MQRPC_AMQP_URL (bash .ci/brokers)")]
async fn rabbitmq_quorum_queue_dead_letters_by_delivery_count() {
    let options = rpc_broker::adapter::amqp::AmqpOptions::new().quorum(true);
    let harness = AmqpHarness::with(options).available();
    mqrpc_tests::suite::dead_letter_after_max_deliveries(&harness).await;
    mqrpc_tests::suite::redelivery_when_a_worker_disappears(&harness).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_amqp), ignore = "needs RabbitMQ: MQRPC_AMQP_URL (bash .ci/brokers)")]
async fn rabbitmq_direct_reply_to_answers_calls() {
    let options = rpc_broker::adapter::amqp::AmqpOptions::new().direct_reply_to(true);
    let harness = AmqpHarness::with(options).available();
    mqrpc_tests::suite::typed_results_and_typed_errors(&harness).await;
    mqrpc_tests::suite::ten_thousand_concurrent_calls(&harness).await;
    mqrpc_tests::suite::call_to_a_missing_service_fails_at_once(&harness).await;
}

/// Transient requests (the bench's setting; the e2e suite runs every scenario with them too): a call's request
/// to a queue known to exist goes on the channel without confirms. Calls are answered, and once the queue is deleted the next call fails with `NoRoute`
/// from RabbitMQ's return, well before its timeout; the call after it is checked again and fails the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_amqp), ignore = "needs RabbitMQ: MQRPC_AMQP_URL (bash .ci/brokers)")]
async fn rabbitmq_unconfirmed_call_to_a_deleted_queue_fails_with_no_route() {
    use lapin::options::QueueDeleteOptions;
    use lapin::{Connection, ConnectionProperties};

    let options = rpc_broker::adapter::amqp::AmqpOptions::new().persistent(false);
    let harness = AmqpHarness::with(options).available();
    let namespace = namespace();
    let server = worker(harness.connect().await, &namespace).await;
    let client = Client::builder(harness.connect().await).namespace(&namespace).connect().await.expect("a client");
    let probe = ProbeClient::new(&client);
    // The first call is confirmed; its reply says the queue has no maximum length, so the next ones are not.
    for round in 0..3 {
        assert_eq!(probe.add(round, 1).timeout(WAIT).await.expect("answered"), round + 1);
    }
    server.shutdown(Duration::from_secs(5)).await;
    let queue = naming::service_queue(Some(&namespace), "suite.Probe");
    let connection = Connection::connect(harness.url(), ConnectionProperties::default()).await.expect("connects");
    let channel = connection.create_channel().await.expect("a channel");
    channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await.expect("deletes the queue");

    for _ in 0..2 {
        let started = tokio::time::Instant::now();
        match probe.add(1, 1).timeout(WAIT).await {
            Err(rpc_core::Error::NoRoute(name)) => assert_eq!(name, queue),
            other => panic!("expected NoRoute, got {other:?}"),
        }
        assert!(started.elapsed() < WAIT / 4, "the call waited {:?} for its timeout", started.elapsed());
    }
    assert_eq!(client.stats().pending, 0);
}

/// A worker's queue with a maximum length: its replies do not say it is unbounded, so calls to it stay
/// confirmed and a full queue still refuses one with `QueueFull` at once (an unconfirmed publish would be
/// dropped without a word).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_amqp), ignore = "needs RabbitMQ: MQRPC_AMQP_URL (bash .ci/brokers)")]
async fn rabbitmq_calls_to_a_bounded_queue_stay_confirmed() {
    let options = rpc_broker::adapter::amqp::AmqpOptions::new().persistent(false);
    let harness = AmqpHarness::with(options).available();
    let namespace = namespace();
    let server = worker_with(harness.connect().await, &namespace, QueueOptions::new().max_len(3)).await;
    let transport = harness.connect().await;
    let client = Client::builder(Arc::clone(&transport)).namespace(&namespace).connect().await.expect("a client");
    let probe = ProbeClient::new(&client);
    for round in 0..3 {
        assert_eq!(probe.add(round, 1).timeout(WAIT).await.expect("answered"), round + 1);
    }
    server.shutdown(Duration::from_secs(5)).await;

    let queue = naming::service_queue(Some(&namespace), "suite.Probe");
    let queued: Vec<_> = (0..3).map(|n| tokio::spawn(probe.add(n, 1).timeout(WAIT).into_future())).collect();
    mqrpc_tests::eventually_async("three calls queued", WAIT, || async {
        transport.queue_stats(&queue).await.is_ok_and(|stats| stats.ready == 3)
    })
    .await;
    match probe.add(9, 9).timeout(WAIT).await {
        Err(rpc_core::Error::QueueFull(full)) => assert_eq!(full, queue),
        other => panic!("expected QueueFull, got {other:?}"),
    }
    for call in queued {
        call.abort();
    }
}

/// Workers on NATS answer the NATS service API (`$SRV.PING`, `$SRV.INFO`, `$SRV.STATS`) as `nats micro` and
/// async-nats's `service` module define it: a plain NATS client finds them and reads their figures, parsed here
/// with async-nats's own types.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_nats), ignore = "needs NATS: MQRPC_NATS_URL (bash .ci/brokers)")]
async fn workers_answer_the_nats_service_api() {
    use async_nats::service::{Info, PingResponse, Stats};
    let harness = NatsHarness::core().available();
    let namespace = namespace();
    let mut workers = Vec::new();
    for _ in 0..2 {
        let worker = Worker { name: "w".into(), events: Arc::new(Events::default()), client: None };
        let server = Server::new(harness.connect().await).namespace(&namespace).version("3.2.1");
        workers.push(server.serve(ProbeServer::new(worker)).await.expect("the worker starts"));
    }
    let caller = Client::builder(harness.connect().await).namespace(&namespace).connect().await.expect("connects");
    let mut ids: Vec<String> =
        caller.ping("suite.Probe").at_least(2).await.expect("pings").into_iter().map(|worker| worker.id).collect();
    ids.sort();
    let name = format!("{namespace}_suite_Probe");
    let queue = naming::service_queue(Some(&namespace), "suite.Probe");

    let nats = async_nats::connect(harness.url()).await.expect("connects");
    let answer = tokio::time::timeout(WAIT, nats.request(format!("$SRV.PING.{name}"), "".into()))
        .await
        .expect("in time")
        .expect("answered");
    let pong: PingResponse = serde_json::from_slice(&answer.payload).expect("a ping response");
    assert_eq!(
        (pong.kind.as_str(), pong.name.as_str(), pong.version.as_str()),
        ("io.nats.micro.v1.ping_response", name.as_str(), "3.2.1")
    );
    assert!(ids.contains(&pong.id), "{} is not one of {ids:?}", pong.id);

    // Every instance answers a request on the service's subject, as `nats micro info` gathers them.
    let infos: Vec<Info> = gather(&nats, &format!("$SRV.INFO.{name}"), 2).await;
    let mut answered: Vec<String> = infos.iter().map(|info| info.id.clone()).collect();
    answered.sort();
    assert_eq!(answered, ids);
    for info in &infos {
        assert_eq!(info.endpoints.len(), 1);
        assert_eq!(info.endpoints[0].subject, queue);
        assert_eq!(info.endpoints[0].queue_group, queue);
        let methods = info.endpoints[0].metadata.get("mqrpc.methods").expect("the methods");
        assert!(methods.split(',').any(|method| method == "add"), "{methods}");
    }
    // Also found by the API's catch-all subject, with the others there may be.
    let everyone: Vec<PingResponse> = gather(&nats, "$SRV.PING", 2).await;
    assert!(everyone.iter().filter(|pong| pong.name == name).count() >= 1);

    // Figures move with traffic: a call answered, and one the method failed.
    let probe = ProbeClient::new(&caller);
    assert_eq!(probe.add(2, 3).await.expect("answered"), 5);
    assert!(probe.div(1, 0).await.expect("answered").is_err());
    let mut requests = 0;
    let mut errors = 0;
    for id in &ids {
        let answer = tokio::time::timeout(WAIT, nats.request(format!("$SRV.STATS.{name}.{id}"), "".into()))
            .await
            .expect("in time")
            .expect("answered");
        let stats: Stats = serde_json::from_slice(&answer.payload).expect("a stats response");
        assert_eq!(&stats.id, id);
        let endpoint = &stats.endpoints[0];
        requests += endpoint.requests;
        errors += endpoint.errors;
        if endpoint.errors == 1 {
            let last = endpoint.last_error.as_ref().expect("the last error");
            assert_eq!(last.code, 1, "{last:?}");
        }
        if endpoint.requests > 0 {
            assert!(endpoint.processing_time > Duration::ZERO);
        }
    }
    assert_eq!((requests, errors), (2, 1));
    drop(workers);
}

/// Publishes an empty request to `subject` and gathers `count` JSON answers of type `T`.
async fn gather<T: serde::de::DeserializeOwned>(nats: &async_nats::Client, subject: &str, count: usize) -> Vec<T> {
    let inbox = nats.new_inbox();
    let mut answers = nats.subscribe(inbox.clone()).await.expect("subscribes");
    nats.publish_with_reply(subject.to_owned(), inbox, "".into()).await.expect("publishes");
    let mut gathered = Vec::new();
    while gathered.len() < count {
        let answer = tokio::time::timeout(WAIT, answers.next()).await.expect("in time").expect("open");
        gathered.push(serde_json::from_slice(&answer.payload).expect("JSON of the API"));
    }
    gathered
}

/// Publishes from many tasks on two threads to a bounded queue that a consumer drains meanwhile, so that
/// RabbitMQ acks some and nacks others: the messages whose publish returned `Ok` are exactly the ones the
/// consumer gets, and every other publish failed with `QueueFull`. (lapin takes a confirm's delivery tag and
/// queues the frames under two locks: without the adapter's own order, two publishes could swap confirms, a
/// refused one reported taken and a taken one refused.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_amqp), ignore = "needs RabbitMQ: MQRPC_AMQP_URL (bash .ci/brokers)")]
async fn amqp_confirms_go_to_their_own_publishes_when_a_bounded_queue_refuses_some() {
    const MESSAGES: usize = 20_000;
    let harness = AmqpHarness::from_env().available();
    let transport = harness.connect().await;
    let queue = format!("{}.bounded", namespace());
    transport.declare_queue(&queue, &QueueOptions::new().max_len(20)).await.expect("declares");
    let mut consumer = transport.consume(&queue, rpc_core::ConsumeOptions::new().prefetch(4)).await.expect("consumes");
    let received = tokio::spawn(async move {
        let mut ids = std::collections::HashSet::new();
        while let Ok(Some(delivery)) = tokio::time::timeout(Duration::from_secs(3), consumer.next()).await {
            ids.insert(delivery.envelope.id);
            delivery.handle.ack().await.expect("acks");
        }
        ids
    });
    let publisher = Arc::clone(&transport);
    let outcomes: Vec<(Uuid, Result<(), rpc_core::Error>)> = futures::stream::iter(0..MESSAGES)
        .map(|n| {
            let (transport, queue) = (Arc::clone(&publisher), queue.clone());
            async move {
                let envelope = oneway(n, 16);
                let id = envelope.id;
                let sent = tokio::spawn(async move { transport.publish(&queue, envelope, Confirm::Broker).await });
                (id, sent.await.expect("joins"))
            }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    let received = received.await.expect("joins");
    let taken: std::collections::HashSet<Uuid> =
        outcomes.iter().filter(|(_, outcome)| outcome.is_ok()).map(|(id, _)| *id).collect();
    let other: Vec<_> = outcomes
        .iter()
        .filter(|(_, outcome)| !matches!(outcome, Ok(()) | Err(rpc_core::Error::QueueFull(_))))
        .collect();
    assert!(other.is_empty(), "publishes that failed otherwise: {:?}", &other[..other.len().min(5)]);
    assert!(taken.len() < MESSAGES && !taken.is_empty(), "{} of {MESSAGES} taken: no refusals to test", taken.len());
    let reported_but_dropped = taken.difference(&received).count();
    let refused_but_delivered = received.difference(&taken).count();
    assert_eq!(
        (reported_but_dropped, refused_but_delivered),
        (0, 0),
        "{} taken, {} received",
        taken.len(),
        received.len()
    );
    transport.delete_queue(&queue).await.expect("deletes");
}

/// A harness deletes what its connections made when it is dropped: the service queue and its dead-letter queue,
/// a subscriber group's queue and the broadcast exchange, so that test runs leave a shared RabbitMQ as they
/// found it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_amqp), ignore = "needs RabbitMQ: MQRPC_AMQP_URL (bash .ci/brokers)")]
async fn a_harness_deletes_the_queues_and_exchanges_its_connections_made() {
    use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    use lapin::{Connection, ConnectionProperties, ExchangeKind};

    let harness = AmqpHarness::from_env().available();
    let url = harness.url().to_owned();
    let namespace = namespace();
    let worker = worker(harness.connect().await, &namespace).await;
    let client = Client::builder(harness.connect().await).namespace(&namespace).connect().await.expect("client");
    let probe = ProbeClient::new(&client);
    assert_eq!(probe.add(2, 3).timeout(WAIT).await.expect("answered"), 5);
    probe.announce(7).await.expect("broadcast");
    worker.shutdown(WAIT).await;
    drop(client);

    let queue = naming::service_queue(Some(&namespace), "suite.Probe");
    let (queues, topics) = (harness.named().queues(), harness.named().topics());
    assert!(queues.contains(&queue), "the service queue is noted: {queues:?}");
    assert!(queues.iter().any(|name| name.contains('@')), "a subscriber group's queue is noted: {queues:?}");
    assert!(!topics.is_empty(), "the broadcast topic is noted");

    let connection = Connection::connect(&url, ConnectionProperties::default()).await.expect("connects");
    let exists = |queue: String| {
        let connection = &connection;
        async move {
            let channel = connection.create_channel().await.expect("a channel");
            let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
            channel.queue_declare(queue.as_str().into(), passive, FieldTable::default()).await.is_ok()
        }
    };
    let exchange_exists = |topic: String| {
        let connection = &connection;
        async move {
            let channel = connection.create_channel().await.expect("a channel");
            let passive = ExchangeDeclareOptions { passive: true, ..ExchangeDeclareOptions::default() };
            let kind = ExchangeKind::Fanout;
            channel.exchange_declare(topic.as_str().into(), kind, passive, FieldTable::default()).await.is_ok()
        }
    };
    assert!(exists(queue.clone()).await, "the service queue is there before the harness goes");
    assert!(exists(format!("{queue}.dlq")).await, "and its dead-letter queue");

    drop(harness);
    for name in &queues {
        assert!(!exists(name.clone()).await, "`{name}` is deleted");
        assert!(!exists(format!("{name}.dlq")).await, "`{name}.dlq` is deleted");
    }
    for topic in &topics {
        assert!(!exchange_exists(topic.clone()).await, "the exchange `{topic}` is deleted");
    }
}

/// A handling that ran in a task of its own (its handler waited) leaves no reading of the clock on its thread: a
/// NATS call made on that thread seconds later is stamped with the time it is sent, and its worker does not take
/// it for a request queued since that handling, past its budget.
#[tokio::test(flavor = "current_thread")]
#[cfg_attr(not(mqrpc_nats), ignore = "needs NATS: MQRPC_NATS_URL (bash .ci/brokers)")]
async fn a_nats_call_made_after_a_handling_ran_in_a_task_on_its_thread_is_stamped_with_its_own_time() {
    let embedded = mqrpc_tests::EmbeddedHarness::new();
    let local_namespace = namespace();
    let _local_worker = worker(embedded.connect().await, &local_namespace).await;
    let local = Client::builder(embedded.connect().await).namespace(&local_namespace).connect().await.expect("client");
    // `work` waits on a timer: its handling leaves the inline poll for a task of its own, on this thread.
    ProbeClient::new(&local).work(1).timeout(WAIT).await.expect("answered");
    tokio::time::sleep(Duration::from_millis(2_500)).await;

    let harness = NatsHarness::core().available();
    let namespace = namespace();
    let _worker = worker(harness.connect().await, &namespace).await;
    let client = Client::builder(harness.connect().await).namespace(&namespace).connect().await.expect("client");
    // Two seconds of budget: a sending time taken from that handling's reading, 2.5 s old, would have spent it.
    let sum = ProbeClient::new(&client).add(2, 3).timeout(Duration::from_secs(2)).await;
    assert_eq!(sum.expect("answered within its budget"), 5);
}

/// The NATS client does not check the subjects it publishes to (the transport checks them first): a queue or a
/// reply subject that would break the protocol's line is refused with a typed error, nothing of it is written,
/// and the connection goes on serving calls.
#[tokio::test]
#[cfg_attr(not(mqrpc_nats), ignore = "needs NATS: MQRPC_NATS_URL (bash .ci/brokers)")]
async fn a_nats_subject_that_would_break_the_protocol_is_refused_and_the_connection_serves_on() {
    use rpc_core::{Envelope, Error, Kind, ReplyTo};
    let harness = NatsHarness::core().available();
    let namespace = namespace();
    let _worker = worker(harness.connect().await, &namespace).await;
    let transport = harness.connect().await;
    let client = Client::builder(Arc::clone(&transport)).namespace(&namespace).connect().await.expect("client");
    for queue in ["bad subject", "bad\r\nPUB x 1", "tab\there", "a..b", ""] {
        let published = transport.publish(queue, Envelope::new(Kind::Oneway), Confirm::Broker).await;
        assert!(matches!(published, Err(Error::InvalidArgument(_))), "{queue:?}: {published:?}");
    }
    // A request whose reply address (a callback queue) has whitespace, through the outbox.
    let mut request = Envelope::new(Kind::Request);
    request.correlation_id = Some(Uuid::now_v7());
    request.reply_to = Some(ReplyTo::Queue("bad reply".into()));
    let published = transport.publish(&format!("{namespace}.elsewhere"), request, Confirm::Broker).await;
    assert!(matches!(published, Err(Error::InvalidArgument(_))), "{published:?}");
    // A message with headers (a reply to a plain client's inbox) whose reply subject has a line break.
    let mut reply = Envelope::new(Kind::Reply);
    reply.correlation_id = Some(Uuid::now_v7());
    reply.reply_to = Some(ReplyTo::Queue("bad\r\nreply".into()));
    let published = transport.publish("_INBOX.plain.client", reply, Confirm::Sent).await;
    assert!(matches!(published, Err(Error::InvalidArgument(_))), "{published:?}");
    let sum = ProbeClient::new(&client).add(2, 3).timeout(WAIT).await;
    assert_eq!(sum.expect("the connection still serves"), 5);
}
