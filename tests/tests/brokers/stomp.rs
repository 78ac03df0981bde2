//! The STOMP 1.2 connection (`rpc_broker::adapter::stomp::Connection`) and transport against the two real STOMP
//! servers `.ci/brokers` starts: ActiveMQ Classic (`MQRPC_STOMP_URL`) and RabbitMQ's STOMP plugin
//! (`MQRPC_STOMP_RABBIT_URL`). A binary body with NUL bytes and headers that need escaping travel both ways
//! unchanged; a message left unacknowledged when its connection goes comes again; a request is answered through
//! the caller's temp queue, correlation id and all; a refused login is a typed error; a subscription dropped
//! before its receipt unsubscribes; the transport finds delayed delivery and cancel where the server has them, and
//! refuses a message past its size limit instead of taking it again and again; a request read back is the one
//! published, though it goes without what its reader infers. The queues made on RabbitMQ are
//! deleted (a SEND to `/queue/X` declares a durable queue there); ActiveMQ drops its idle test queues itself
//! (`.ci/activemq.xml`).

use std::time::Duration;

use bytes::Bytes;
use rpc_broker::adapter::stomp::codec::{Command, Frame};
use rpc_broker::adapter::stomp::connection::{ConnectOptions, Connection};
use rpc_core::Error;
use uuid::Uuid;

use crate::WAIT;

async fn connect(url: &str) -> Connection {
    Connection::connect(url, &ConnectOptions::default()).await.expect("connects to the STOMP server")
}

/// A SEND with a body of every byte value and headers with the characters STOMP escapes comes back as one
/// MESSAGE, byte for byte; left unacknowledged when its connection goes (a worker that died), it comes again to
/// a subscription on another connection. (An UNSUBSCRIBE alone gives it back on ActiveMQ, not on RabbitMQ,
/// which holds it for the connection until it closes.)
async fn messages_travel_intact_and_come_again_unacked(url: &str, server: &str) -> String {
    let prefetch = [("activemq.prefetchSize", "1"), ("prefetch-count", "1")];
    let connection = connect(url).await;
    assert!(connection.server().starts_with(server), "{} is not {server}", connection.server());
    let queue = format!("/queue/mqrpc-test-{}", Uuid::new_v4().simple());
    let body: Bytes = (0..=255u8).chain(*b"\0end\0").collect::<Vec<u8>>().into();
    let odd = "a:b\\c\nd\re";
    let mut subscription = connection.subscribe(&queue, "client-individual", &prefetch).await.expect("subscribes");
    let mut frame = Frame::new(Command::Send)
        .header("destination", &queue)
        .header("persistent", "true")
        .header("mqrpc-odd", odd)
        .header("content-type", "application/msgpack");
    frame.body = body.clone();
    connection.send(frame).await.expect("the server has the message");

    let message = tokio::time::timeout(WAIT, subscription.next()).await.expect("delivered").expect("open");
    assert_eq!(message.command, Command::Message);
    assert_eq!(message.body, body, "the body, NUL bytes and all");
    assert_eq!(message.get("mqrpc-odd"), Some(odd), "the header, unescaped");
    assert_eq!(message.get("subscription"), Some(subscription.id()));
    let first_id = message.get("message-id").expect("a message id").to_owned();
    // Not acknowledged: the connection goes, and the message waits for the next consumer.
    drop(subscription);
    drop(connection);
    let connection = connect(url).await;
    let mut again = connection.subscribe(&queue, "client-individual", &prefetch).await.expect("subscribes again");
    let message = tokio::time::timeout(WAIT, again.next()).await.expect("delivered again").expect("open");
    assert_eq!(message.body, body);
    if server == "ActiveMQ/" {
        assert_eq!(message.get("message-id"), Some(first_id.as_str()), "the same message");
    }
    connection.ack(message.get("ack").expect("an ack id")).expect("acks");
    connection.sync().await.expect("the server took the ack");
    drop(again);
    drop(connection);
    // Acknowledged: nothing comes to a subscription on a third connection.
    let connection = connect(url).await;
    let mut third = connection.subscribe(&queue, "client-individual", &[]).await.expect("subscribes a third time");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), third.next()).await.is_err(),
        "an acknowledged message came again"
    );
    queue
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_stomp), ignore = "needs ActiveMQ: MQRPC_STOMP_URL (bash .ci/brokers)")]
async fn activemq_carries_stomp_messages_intact_and_redelivers_unacked_ones() {
    let url = mqrpc_tests::required_url("MQRPC_STOMP_URL");
    messages_travel_intact_and_come_again_unacked(&url, "ActiveMQ/").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(mqrpc_stomp_rabbit),
    ignore = "needs RabbitMQ's STOMP plugin: MQRPC_STOMP_RABBIT_URL (bash .ci/brokers)"
)]
async fn rabbitmq_carries_stomp_messages_intact_and_redelivers_unacked_ones() {
    let url = mqrpc_tests::required_url("MQRPC_STOMP_RABBIT_URL");
    let queue = messages_travel_intact_and_come_again_unacked(&url, "RabbitMQ/").await;
    delete_rabbitmq_queue(&queue);
}

/// A request with a `reply-to` of the caller's private temp queue and a `correlation-id`, answered by a worker
/// on another connection to the `reply-to` it sees (which the server rewrote): the reply reaches the caller with
/// its correlation id. ActiveMQ wants a SUBSCRIBE to the temp queue; RabbitMQ makes it on the SEND and refuses
/// a SUBSCRIBE to it.
async fn a_request_is_answered_through_a_temp_queue(url: &str, subscribe_to_temp_queue: bool) -> String {
    let caller = connect(url).await;
    let temp = "/temp-queue/replies";
    let mut replies = match subscribe_to_temp_queue {
        true => caller.subscribe(temp, "auto", &[]).await.expect("subscribes to its temp queue"),
        false => caller.listen(temp).expect("listens"),
    };
    let service = format!("/queue/mqrpc-test-{}", Uuid::new_v4().simple());
    let worker = connect(url).await;
    let mut requests = worker.subscribe(&service, "client-individual", &[]).await.expect("the worker subscribes");
    let request = Frame::new(Command::Send)
        .header("destination", &service)
        .header("reply-to", temp)
        .header("correlation-id", "call:1");
    caller.send(request).await.expect("the request is queued");
    let request = tokio::time::timeout(WAIT, requests.next()).await.expect("a request").expect("open");
    let reply_to = request.get("reply-to").expect("a reply-to").to_owned();
    assert_ne!(reply_to, temp, "the server names the caller's temp queue for the worker");
    let mut reply = Frame::new(Command::Send)
        .header("destination", &reply_to)
        .header("correlation-id", request.get("correlation-id").expect("a correlation id"));
    reply.body = Bytes::from_static(b"\x05");
    worker.send(reply).await.expect("the reply is sent");
    worker.ack(request.get("ack").expect("an ack id")).expect("acks");
    let reply = tokio::time::timeout(WAIT, replies.next()).await.expect("a reply").expect("open");
    assert_eq!((reply.get("correlation-id"), &reply.body[..]), (Some("call:1"), &b"\x05"[..]));
    service
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_stomp), ignore = "needs ActiveMQ: MQRPC_STOMP_URL (bash .ci/brokers)")]
async fn activemq_answers_a_request_through_a_temp_queue() {
    a_request_is_answered_through_a_temp_queue(&mqrpc_tests::required_url("MQRPC_STOMP_URL"), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(mqrpc_stomp_rabbit),
    ignore = "needs RabbitMQ's STOMP plugin: MQRPC_STOMP_RABBIT_URL (bash .ci/brokers)"
)]
async fn rabbitmq_answers_a_request_through_a_temp_queue() {
    let url = mqrpc_tests::required_url("MQRPC_STOMP_RABBIT_URL");
    let service = a_request_is_answered_through_a_temp_queue(&url, false).await;
    delete_rabbitmq_queue(&service);
}

/// Deletes the queue a test's `/queue/X` destination made on RabbitMQ.
fn delete_rabbitmq_queue(destination: &str) {
    let name = destination.trim_start_matches("/queue/");
    let status = std::process::Command::new("rabbitmqctl")
        .args(["delete_queue", name])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("runs rabbitmqctl");
    assert!(status.success(), "the test's queue `{name}` is deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(mqrpc_stomp_rabbit),
    ignore = "needs RabbitMQ's STOMP plugin: MQRPC_STOMP_RABBIT_URL (bash .ci/brokers)"
)]
async fn a_refused_login_is_unauthorized_and_a_closed_connection_is_disconnected() {
    let url = mqrpc_tests::required_url("MQRPC_STOMP_RABBIT_URL");
    let wrong = url.replacen("guest:guest@", "guest:wrong-passcode@", 1);
    assert_ne!(wrong, url, "the URL carries guest's credentials");
    match Connection::connect(&wrong, &ConnectOptions::default()).await {
        Err(Error::Unauthorized(message)) => assert!(!message.contains("wrong-passcode"), "{message}"),
        other => panic!("a wrong passcode connected: {other:?}"),
    }
    // A frame the server refuses (a SEND without a destination) is an ERROR: the send fails typed, and the
    // connection, which the server closes after an ERROR, says so.
    let connection = connect(&url).await;
    let refused = connection.send(Frame::new(Command::Send)).await;
    assert!(matches!(refused, Err(Error::Transport(_))), "{refused:?}");
    mqrpc_tests::eventually("the connection closes", WAIT, || connection.is_closed()).await;
    assert!(matches!(connection.send_unconfirmed(Frame::new(Command::Send)), Err(Error::Disconnected)));
}

/// A SUBSCRIBE whose future is dropped before the receipt comes (a caller that gave up) unsubscribes: the
/// server does not keep a consumer nobody reads, which would hold the queue's messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_stomp), ignore = "needs ActiveMQ: MQRPC_STOMP_URL (bash .ci/brokers)")]
async fn a_subscription_dropped_before_its_receipt_unsubscribes() {
    use futures::FutureExt;
    let connection = connect(&mqrpc_tests::required_url("MQRPC_STOMP_URL")).await;
    let queue = format!("/queue/mqrpc-test-{}", Uuid::new_v4().simple());
    let subscribing = connection.subscribe(&queue, "client-individual", &[]);
    assert!(subscribing.now_or_never().is_none(), "the receipt came before the first poll returned");
    let mut frame = Frame::new(Command::Send).header("destination", &queue);
    frame.body = Bytes::from_static(b"kept");
    connection.send(frame).await.expect("the server has the message");
    let other = connect(&mqrpc_tests::required_url("MQRPC_STOMP_URL")).await;
    let mut subscription = other.subscribe(&queue, "auto", &[]).await.expect("subscribes");
    let message = tokio::time::timeout(WAIT, subscription.next()).await.expect("the message comes").expect("open");
    assert_eq!(message.body, Bytes::from_static(b"kept"));
}

/// The transport finds out what the server holds: ActiveMQ as `.ci/activemq.xml` runs it has its scheduler on
/// (delayed delivery) and cancels calls; RabbitMQ's STOMP plugin does neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(mqrpc_stomp, mqrpc_stomp_rabbit)),
    ignore = "needs ActiveMQ and RabbitMQ's STOMP plugin: MQRPC_STOMP_URL, MQRPC_STOMP_RABBIT_URL (bash .ci/brokers)"
)]
async fn delayed_delivery_and_cancel_are_found_where_the_server_has_them() {
    use rpc_core::Transport;
    let activemq = rpc_broker::adapter::stomp::Stomp::connect(&mqrpc_tests::required_url("MQRPC_STOMP_URL"))
        .await
        .expect("connects");
    let capabilities = activemq.capabilities();
    assert!(capabilities.delayed_delivery && capabilities.cancel, "{capabilities:?}");
    let rabbitmq = rpc_broker::adapter::stomp::Stomp::connect(&mqrpc_tests::required_url("MQRPC_STOMP_RABBIT_URL"))
        .await
        .expect("connects");
    let capabilities = rabbitmq.capabilities();
    assert!(!capabilities.delayed_delivery && !capabilities.cancel, "{capabilities:?}");
    let refused = rabbitmq.cancel("mqrpc-test", Uuid::new_v4()).await;
    assert!(matches!(refused, Err(Error::Unsupported(_))), "{refused:?}");
}

/// A message past a reader's size limit is not a poison message: the worker acks it and answers its caller
/// `ResourceExhausted` (it would otherwise close its connection, and the server deliver it again, forever), and
/// goes on serving; a reply past the client's limit fails its call with the same code instead of its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_stomp), ignore = "needs ActiveMQ: MQRPC_STOMP_URL (bash .ci/brokers)")]
async fn a_message_past_the_size_limit_is_refused_not_redelivered() {
    use std::sync::Arc;

    use mqrpc_tests::Harness;
    use mqrpc_tests::service::{Events, ProbeServer, Worker};
    use rpc_broker::adapter::stomp::StompOptions;
    use rpc_broker::adapter::stomp::codec::Limits;
    use rpc_core::{Client, Code, Server, Transport};

    let url = mqrpc_tests::required_url("MQRPC_STOMP_URL");
    let small = |limit: usize| {
        let limits = Limits { max_frame_bytes: limit, ..Limits::default() };
        mqrpc_tests::StompHarness::with(
            &url,
            StompOptions::new().connect(ConnectOptions { limits, ..ConnectOptions::default() }),
        )
    };
    let namespace = format!("b{}", Uuid::new_v4().simple());
    let events = Arc::new(Events::default());
    let worker = Worker { name: "w".into(), events: Arc::clone(&events), client: None };
    let worker_transport: Arc<dyn Transport> = Arc::new(small(1_024).stomp().await);
    let server = Server::new(worker_transport)
        .namespace(&namespace)
        .serve(ProbeServer::new(worker))
        .await
        .expect("the worker starts");
    let client = Client::builder(mqrpc_tests::StompHarness::activemq().expect("configured").stomp().await)
        .namespace(&namespace)
        .connect()
        .await
        .expect("connects");
    // `count`'s argument is a MessagePack map; a 4 KiB one, past the worker's limit.
    let big = rmp_serde::to_vec_named(&std::collections::BTreeMap::from([("n", "x".repeat(4_096))])).expect("encodes");
    let refused = client.request("suite.Probe", "count", big.into()).timeout(WAIT).await;
    match refused {
        Err(Error::Remote(status)) => {
            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
            assert!(status.message().contains("limit of 1024"), "{status:?}");
        }
        other => panic!("expected ResourceExhausted, got {other:?}"),
    }
    let small_args = rmp_serde::to_vec_named(&std::collections::BTreeMap::from([("a", 2), ("b", 3)])).expect("encodes");
    let sum = client.request("suite.Probe", "add", small_args.clone().into()).timeout(WAIT).await.expect("answered");
    assert_eq!(rmp_serde::from_slice::<i64>(&sum).expect("an integer"), 5);
    mqrpc_tests::eventually("the add to be handled", WAIT, || server.stats().handled == 1).await;
    assert!(events.counts.lock().expect("not poisoned").is_empty(), "the refused message reached its handler");
    // A reply past the client's own limit (a worker whose name is 64 KiB answers `whoami`): the call fails at
    // once with the reason.
    let other = format!("b{}", Uuid::new_v4().simple());
    let named = Worker { name: "w".repeat(65_536), events: Arc::new(Events::default()), client: None };
    let _named = Server::new(mqrpc_tests::StompHarness::activemq().expect("configured").connect().await)
        .namespace(&other)
        .serve(ProbeServer::new(named))
        .await
        .expect("the worker starts");
    let tight = Client::builder(small(16_384).stomp().await).namespace(&other).connect().await.expect("connects");
    // No arguments: an empty MessagePack map.
    let far = tight.request("suite.Probe", "whoami", Bytes::from_static(&[0x80])).timeout(WAIT).await;
    assert!(matches!(&far, Err(Error::Remote(status)) if status.code() == Code::ResourceExhausted), "{far:?}");
}

/// A call's request and two other messages reach a consumer of the queue as they were published, though the
/// request goes without what its reader infers (its id, which is its correlation id; its service, which is the
/// queue's name; its key, which is the correlation id's: docs/conformance.md, "STOMP 1.2").
async fn what_a_request_goes_without_is_read_back(harness: &mqrpc_tests::StompHarness) -> Vec<String> {
    use rpc_core::transport::Confirm;
    use rpc_core::{ConsumeOptions, Envelope, Kind, QueueOptions, ReplyTo, Transport};

    let transport = harness.stomp().await;
    let queue = format!("mqrpc-test-{}", Uuid::new_v4().simple());
    let callbacks = format!("{queue}.callbacks");
    for name in [&queue, &callbacks] {
        transport.declare_queue(name, &QueueOptions::new()).await.expect("declares");
    }
    let mut consumer = transport.consume(&queue, ConsumeOptions::new().prefetch(4)).await.expect("consumes");
    let correlation_id = Uuid::now_v7();
    let mut request = Envelope::new(Kind::Request);
    request.id = correlation_id;
    request.correlation_id = Some(correlation_id);
    request.service = queue.as_str().into();
    request.method = "add".into();
    request.reply_to = Some(ReplyTo::Queue(callbacks.as_str().into()));
    request.deadline_ms = Some(30_000);
    request.idempotency_key = Some(correlation_id.simple().to_string().into());
    request.headers.insert("tenant".into(), "acme".into());
    request.body = Bytes::from_static(b"\x82\xa1a\x02\xa1b\x03");
    // An id of its own, another service, no key.
    let mut other = request.clone();
    other.id = Uuid::now_v7();
    other.service = "Other".into();
    other.idempotency_key = None;
    let mut oneway = Envelope::new(Kind::Oneway);
    oneway.service = queue.as_str().into();
    oneway.method = "record".into();
    for envelope in [&request, &other, &oneway] {
        transport.publish(&queue, envelope.clone(), Confirm::Broker).await.expect("publishes");
    }
    // What is left of the deadline: less the time the message was queued.
    let as_sent = |mut read: Envelope, sent: &Envelope| {
        if let (Some(left), Some(budget)) = (read.deadline_ms, sent.deadline_ms) {
            assert!(left <= budget && left + 5_000 > budget, "{left} ms left of {budget}");
            read.deadline_ms = sent.deadline_ms;
        }
        read
    };
    for sent in [&request, &other, &oneway] {
        let delivery = tokio::time::timeout(WAIT, consumer.next()).await.expect("delivered").expect("open");
        assert_eq!(&as_sent(Envelope::clone(&delivery.envelope), sent), sent);
        if sent.id == request.id {
            // Its dead letter, on another queue, still names the service its first queue stood for.
            delivery.handle.dead_letter().await.expect("dead-letters");
        } else {
            delivery.handle.ack().await.expect("acks");
        }
    }
    let dead_letters = rpc_core::naming::dead_letter_queue(&queue);
    let mut letters = transport.consume(&dead_letters, ConsumeOptions::new()).await.expect("consumes the DLQ");
    let letter = tokio::time::timeout(WAIT, letters.next()).await.expect("dead-lettered").expect("open");
    assert_eq!(as_sent(Envelope::clone(&letter.envelope), &request), request);
    letter.handle.ack().await.expect("acks");
    vec![queue, callbacks]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_stomp), ignore = "needs ActiveMQ: MQRPC_STOMP_URL (bash .ci/brokers)")]
async fn activemq_reads_back_what_a_request_goes_without() {
    what_a_request_goes_without_is_read_back(&mqrpc_tests::StompHarness::activemq().expect("configured")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(mqrpc_stomp_rabbit),
    ignore = "needs RabbitMQ's STOMP plugin: MQRPC_STOMP_RABBIT_URL (bash .ci/brokers)"
)]
async fn rabbitmq_reads_back_what_a_request_goes_without() {
    let harness = mqrpc_tests::StompHarness::rabbitmq().expect("configured");
    // Each with the dead-letter queue its declaration made.
    for queue in what_a_request_goes_without_is_read_back(&harness).await {
        delete_rabbitmq_queue(&rpc_core::naming::dead_letter_queue(&queue));
        delete_rabbitmq_queue(&queue);
    }
}
