//! End-to-end tests: the scenario suite over every transport.

mqrpc_tests::scenario_suite!(embedded, mqrpc_tests::EmbeddedHarness::new());
mqrpc_tests::scenario_suite!(own_broker, mqrpc_tests::RemoteHarness::start().await);
mqrpc_tests::scenario_suite!(
    rabbitmq,
    mqrpc_tests::AmqpHarness::from_env(),
    needs mqrpc_amqp = "needs RabbitMQ: MQRPC_AMQP_URL (bash .ci/brokers)",
);
mqrpc_tests::scenario_suite!(
    rabbitmq_transient,
    mqrpc_tests::AmqpHarness::transient(),
    needs mqrpc_amqp = "needs RabbitMQ: MQRPC_AMQP_URL (bash .ci/brokers)",
);
mqrpc_tests::scenario_suite!(
    nats_jetstream,
    mqrpc_tests::NatsHarness::jetstream(),
    needs mqrpc_nats = "needs NATS: MQRPC_NATS_URL (bash .ci/brokers)",
);
mqrpc_tests::scenario_suite!(
    kafka,
    mqrpc_tests::KafkaHarness::from_env(),
    needs mqrpc_kafka = "needs Kafka: MQRPC_KAFKA_URL (bash .ci/brokers)",
);
mqrpc_tests::scenario_suite!(
    activemq,
    mqrpc_tests::StompHarness::activemq(),
    needs mqrpc_stomp = "needs ActiveMQ: MQRPC_STOMP_URL (bash .ci/brokers)",
    ignore "ActiveMQ deletes a queue only through JMX or its web console; STOMP has no command for it": [
        deleted_queue_is_gone_with_its_messages,
    ],
);
mqrpc_tests::scenario_suite!(
    rabbitmq_stomp,
    mqrpc_tests::StompHarness::rabbitmq(),
    needs mqrpc_stomp_rabbit = "needs RabbitMQ's STOMP plugin: MQRPC_STOMP_RABBIT_URL (bash .ci/brokers)",
    ignore "RabbitMQ gives a STOMP client no queue figures (queue_stats), which these read, and deletes a queue only through AMQP or its management API": [
        deleted_queue_is_gone_with_its_messages,
        dead_letter_after_max_deliveries,
        dead_letters_are_listed_and_replayed_with_their_key,
    ],
);
mqrpc_tests::scenario_suite!(zeromq, mqrpc_tests::ZmqHarness::new());
mqrpc_tests::scenario_suite!(
    redis_streams,
    mqrpc_tests::RedisStreamsHarness::from_env(),
    needs mqrpc_redis = "needs Redis: MQRPC_REDIS_URL (bash .ci/brokers)",
);
mqrpc_tests::scenario_suite!(
    nats_core,
    mqrpc_tests::NatsHarness::core(),
    needs mqrpc_nats = "needs NATS: MQRPC_NATS_URL (bash .ci/brokers)",
    ignore "core NATS holds no message: nothing is redelivered or waits for a worker (JetStream mode runs it)": [
        redelivery_when_a_worker_disappears,
        graceful_shutdown_loses_nothing,
        forced_shutdown_requeues_running_calls,
    ],
);

/// Worker processes that really die: `kill -9` in the middle of calls, and load spread over several processes.
mod processes {
    use std::future::IntoFuture;
    use std::process::Command;
    use std::time::Duration;

    use futures::future::join_all;
    use mqrpc_tests::service::ProbeClient;
    use mqrpc_tests::{RemoteHarness, WorkerProcess};
    use rpc_core::Client;

    /// A worker process serving the probe service through the broker at `url`.
    fn start(url: &str, namespace: &str, name: &str, concurrency: usize) -> WorkerProcess {
        let mut command = Command::new(env!("CARGO_BIN_EXE_probe-worker"));
        command.args([url, namespace, name, &concurrency.to_string()]);
        WorkerProcess::spawn(command)
    }

    async fn client(harness: &RemoteHarness, namespace: &str) -> Client {
        let transport = rpc_broker::Remote::connect(&harness.url()).await.expect("connects");
        Client::builder(transport).namespace(namespace).connect().await.expect("client")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kill_9_of_a_worker_mid_calls_loses_no_call() {
        let harness = RemoteHarness::start().await;
        let namespace = format!("kill{}", uuid::Uuid::new_v4().simple());
        let mut doomed = start(&harness.url(), &namespace, "doomed", 8);
        let _survivor = start(&harness.url(), &namespace, "survivor", 8);
        let client = client(&harness, &namespace).await;
        let probe = ProbeClient::new(&client);
        let calls: Vec<_> =
            (0..300).map(|_| tokio::spawn(probe.work(20).timeout(Duration::from_secs(60)).into_future())).collect();
        // Let both workers take calls, then kill one while it holds unacked requests.
        mqrpc_tests::eventually("calls to be under way", Duration::from_secs(20), || {
            calls.iter().filter(|call| call.is_finished()).count() >= 30
        })
        .await;
        doomed.kill();
        let mut answered = 0;
        for call in calls {
            assert_eq!(call.await.expect("joins").expect("answered despite the kill"), 20);
            answered += 1;
        }
        assert_eq!(answered, 300);
        assert_eq!(client.stats().pending, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ten_thousand_calls_across_four_worker_processes() {
        let harness = RemoteHarness::start().await;
        let namespace = format!("four{}", uuid::Uuid::new_v4().simple());
        let _workers: Vec<_> = (0..4).map(|n| start(&harness.url(), &namespace, &format!("worker-{n}"), 32)).collect();
        let client = client(&harness, &namespace).await;
        let probe = ProbeClient::new(&client);
        let calls = (0..10_000i64).map(|n| probe.add(n, 7).timeout(Duration::from_secs(120)).into_future());
        let results = join_all(calls).await;
        for (n, result) in results.into_iter().enumerate() {
            assert_eq!(result.expect("answered"), n as i64 + 7);
        }
        // Every worker took part.
        let names = join_all((0..400).map(|_| probe.whoami().timeout(Duration::from_secs(30)).into_future())).await;
        let mut seen: Vec<String> = names.into_iter().map(|result| result.expect("answered").0).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 4, "workers that answered: {seen:?}");
        assert_eq!(client.stats().pending, 0);
    }
}

/// What the worker does with a handler that runs past its caller's deadline under a dedup claim.
mod overrun {
    use std::sync::Arc;
    use std::time::Duration;

    use mqrpc_tests::service::{Events, ProbeClient, ProbeServer, Worker};
    use rpc_broker::Embedded;
    use rpc_core::{Client, Error, Server};

    /// Past its overrun the handler is stopped, and its key's outcome is stored as `DeadlineExceeded`: a retry
    /// with the key gets that outcome, and the handler does not run again.
    #[tokio::test]
    async fn a_handler_stopped_past_its_overrun_is_not_run_again() {
        let broker = Embedded::new();
        let events = Arc::new(Events::default());
        let worker = Worker { name: "w".into(), events: Arc::clone(&events), client: None };
        let server = Server::new(broker.clone())
            .overrun(Duration::from_millis(100))
            .serve(ProbeServer::new(worker))
            .await
            .expect("serves");
        let client = Client::builder(broker).connect().await.expect("connects");
        let probe = ProbeClient::new(&client);
        let first = probe.count_then_wait(1, 60_000).idempotency_key("stuck").timeout(Duration::from_millis(100)).await;
        assert!(matches!(first, Err(Error::Timeout(_))), "{first:?}");
        // The retry waits for the running execution until it is stopped, then gets its stored outcome (a
        // `DeadlineExceeded` status, which the client reports as its timeout).
        let retry = probe.count_then_wait(1, 0).idempotency_key("stuck").timeout(Duration::from_secs(5)).await;
        assert!(matches!(retry, Err(Error::Timeout(_))), "{retry:?}");
        assert_eq!(server.stats().deduplicated, 1, "the retry was not answered from the store");
        assert_eq!(events.counts.lock().expect("not poisoned").get(&1), Some(&1), "the key ran again");
        assert_eq!(events.finished("count_then_wait"), 0);
    }

    /// Without a dedup store nothing says whether a handler made its effect, and a handler stops at the
    /// deadline as before.
    #[tokio::test]
    async fn without_a_dedup_store_a_handler_stops_at_the_deadline() {
        let broker = Embedded::new();
        let events = Arc::new(Events::default());
        let worker = Worker { name: "w".into(), events: Arc::clone(&events), client: None };
        let server = Server::new(broker.clone()).without_dedup().serve(ProbeServer::new(worker)).await.expect("serves");
        let client = Client::builder(broker).connect().await.expect("connects");
        let probe = ProbeClient::new(&client);
        let call = probe.count_then_wait(1, 60_000).timeout(Duration::from_millis(100)).await;
        assert!(matches!(call, Err(Error::Timeout(_))), "{call:?}");
        mqrpc_tests::eventually("the handler to be stopped", Duration::from_secs(5), || server.stats().expired == 1)
            .await;
        assert_eq!(events.finished("count_then_wait"), 0);
    }
}
