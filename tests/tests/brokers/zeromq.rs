//! ZeroMQ, brokerless, beyond the shared suite: the caller's windows and its bound on waiting calls, the
//! worker's bound on what a caller sends past them, and the typed refusals.

use std::future::IntoFuture;
use std::sync::Arc;

use mqrpc_tests::eventually;
use mqrpc_tests::service::{Events, ProbeClient, ProbeServer, Worker};
use rpc_broker::adapter::zmq::{Zmq, ZmqOptions};
use rpc_core::{Client, Error, Server, naming};

use super::WAIT;

/// Serves the probe service on `node` one call at a time (concurrency and prefetch 1: a window of 1).
async fn serve_one_at_a_time(node: &Zmq, namespace: &str) -> (rpc_core::ServerHandle, Arc<Events>) {
    let events = Arc::new(Events::default());
    let worker = Worker { name: "w".into(), events: Arc::clone(&events), client: None };
    let server = Server::new(node.clone())
        .namespace(namespace)
        .concurrency(1)
        .prefetch(1)
        .serve(ProbeServer::new(worker))
        .await
        .expect("serves");
    (server, events)
}

/// A worker that runs one call at a time (its window is 1): the next two calls wait in the caller, which holds
/// at most two, and the one after them is refused at once with `QueueFull`, unsent. The waiting calls are
/// answered once the window frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_past_every_window_wait_in_the_caller_then_are_refused_with_queue_full() {
    let namespace = format!("zq{}", uuid::Uuid::new_v4().simple());
    let node = Zmq::start(ZmqOptions::new().bind("tcp://127.0.0.1:0")).await.expect("binds");
    let (_server, events) = serve_one_at_a_time(&node, &namespace).await;
    let endpoint = node.endpoint().expect("bound").to_owned();
    let caller = Zmq::start(ZmqOptions::new().peers([endpoint]).max_waiting(2)).await.expect("connects");
    assert_eq!(caller.live_workers(), 1);
    let client = Client::builder(caller).namespace(&namespace).connect().await.expect("client");
    let probe = ProbeClient::new(&client);
    let calls: Vec<_> = (0..3).map(|_| tokio::spawn(probe.work(200).timeout(WAIT).into_future())).collect();
    eventually("one call to run and two to wait", WAIT, || {
        client.stats().pending == 3 && events.started.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    let queue = naming::service_queue(Some(&namespace), "suite.Probe");
    match probe.work(1).timeout(WAIT).await {
        Err(Error::QueueFull(full)) => assert_eq!(full, queue),
        other => panic!("expected QueueFull past the waiting calls, got {other:?}"),
    }
    for call in calls {
        assert_eq!(call.await.expect("joins").expect("answered once the window frees"), 200);
    }
    assert_eq!(events.started.load(std::sync::atomic::Ordering::SeqCst), 3, "the refused call was sent");
    assert_eq!(events.most_running.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(client.stats().pending, 0);
}

/// What has no meaning without a broker is refused with `Unsupported`, never faked; a node that binds nothing
/// cannot serve or publish to a topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_needs_a_broker_is_refused() {
    use rpc_core::{ConsumeOptions, Envelope, Kind, QueueOptions, Transport};
    let caller = Zmq::start(ZmqOptions::new()).await.expect("starts");
    for options in
        [QueueOptions::new().durable(true), QueueOptions::new().max_len(3), QueueOptions::new().max_deliveries(2)]
    {
        let refused = caller.declare_queue("q", &options).await;
        assert!(matches!(refused, Err(Error::Unsupported(_))), "{options:?}: {refused:?}");
    }
    assert!(matches!(caller.queue_stats("q").await, Err(Error::Unsupported(_))));
    assert!(matches!(caller.cancel("q", uuid::Uuid::new_v4()).await, Err(Error::Unsupported(_))));
    assert!(matches!(caller.consume("q", ConsumeOptions::new()).await, Err(Error::Unsupported(_))));
    let refused = caller.publish_topic("t", Envelope::new(Kind::Oneway)).await;
    assert!(matches!(refused, Err(Error::Unsupported(_))), "{refused:?}");
    let mut delayed = Envelope::new(Kind::Oneway);
    delayed.delay_ms = Some(10);
    let refused = caller.publish("q", delayed, rpc_core::transport::Confirm::Broker).await;
    assert!(matches!(refused, Err(Error::Unsupported("delayed delivery"))), "{refused:?}");
    // Nobody serves `q`: a call fails at once.
    let refused = caller.publish("q", Envelope::new(Kind::Oneway), rpc_core::transport::Confirm::Broker).await;
    assert!(matches!(refused, Err(Error::NoResponders(ref queue)) if queue == "q"), "{refused:?}");
}

/// A caller that ignores the windows (a raw DEALER socket): the worker keeps `max_backlog` requests waiting for
/// its consumer and answers the next one `ResourceExhausted`, unrun, so that such a caller cannot grow its memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_workers_backlog_bound_are_answered_resource_exhausted() {
    use bytes::Bytes;
    use rpc_broker::adapter::zmq::wire::{self, Command};
    use rpc_core::{Envelope, Kind, ReplyTo, codec};
    use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

    let namespace = format!("zb{}", uuid::Uuid::new_v4().simple());
    let node = Zmq::start(ZmqOptions::new().bind("tcp://127.0.0.1:0").max_backlog(2)).await.expect("binds");
    let (_server, events) = serve_one_at_a_time(&node, &namespace).await;
    let mut socket = zeromq::DealerSocket::new();
    socket.connect(node.endpoint().expect("bound")).await.expect("connects");
    let send = |command: Command| ZmqMessage::try_from(command.frames()).expect("frames");
    socket.send(send(Command::Hello { node: uuid::Uuid::new_v4(), publishes: Bytes::new() })).await.expect("sends");
    let queue = naming::service_queue(Some(&namespace), "suite.Probe");
    for seq in 1..=4u64 {
        let mut request = Envelope::new(Kind::Request);
        request.method = "gate".into();
        request.body = codec::encode(&std::collections::BTreeMap::<String, i64>::new()).expect("encodes");
        request.reply_to = Some(ReplyTo::Inbox("raw".into()));
        request.correlation_id = Some(uuid::Uuid::new_v4());
        request.deadline_ms = Some(20_000);
        let envelope = codec::encode_envelope(&request).expect("encodes");
        let queue = Bytes::copy_from_slice(queue.as_bytes());
        let command = Command::Request { seq, delivery_count: 1, queued_ms: 0, queue, envelope };
        socket.send(send(command)).await.expect("sends");
    }
    let answer = tokio::time::timeout(WAIT, async {
        loop {
            let message = socket.recv().await.expect("receives");
            match Command::parse(&message.into_vec(), &codec::Limits::default()).expect("parses") {
                Command::Answer { seq, inbox, envelope } => {
                    return (
                        seq,
                        wire::text(&inbox).to_owned(),
                        codec::decode_envelope_bytes(&envelope, &codec::Limits::default()),
                    );
                }
                Command::Ready { .. } | Command::Pong => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
    .expect("an answer");
    let (seq, inbox, reply) = answer;
    assert_eq!((seq, inbox.as_str()), (4, "raw"));
    let reply = reply.expect("decodes");
    assert_eq!(reply.status().code(), rpc_core::Code::ResourceExhausted, "{:?}", reply.status());
    assert_eq!(events.finished("gate"), 0);
    events.gate.notify_waiters();
}
