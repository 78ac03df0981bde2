//! One trace across client, broker and worker, over every transport: the spans the framework makes, exported
//! through OpenTelemetry's in-memory exporter (`mqrpc_tests::suite::spans_of_a_call_form_one_trace`).
//!
//! A test binary of its own: it installs a global subscriber, which the other suites run without.

macro_rules! traced {
    ($name:ident, $harness:expr $(, needs $cfg:ident = $needs:literal)? $(,)?) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[cfg_attr(not($cfg), ignore = $needs)])?
        async fn $name() {
            mqrpc_tests::suite::spans_of_a_call_form_one_trace(&mqrpc_tests::Available::available($harness)).await;
        }
    };
}

traced!(embedded, mqrpc_tests::EmbeddedHarness::new());
traced!(own_broker, mqrpc_tests::RemoteHarness::start().await);
traced!(rabbitmq, mqrpc_tests::AmqpHarness::from_env(), needs mqrpc_amqp = "needs RabbitMQ: MQRPC_AMQP_URL");
traced!(nats_core, mqrpc_tests::NatsHarness::core(), needs mqrpc_nats = "needs NATS: MQRPC_NATS_URL");
traced!(nats_jetstream, mqrpc_tests::NatsHarness::jetstream(), needs mqrpc_nats = "needs NATS: MQRPC_NATS_URL");
traced!(kafka, mqrpc_tests::KafkaHarness::from_env(), needs mqrpc_kafka = "needs Kafka: MQRPC_KAFKA_URL");
traced!(activemq, mqrpc_tests::StompHarness::activemq(), needs mqrpc_stomp = "needs ActiveMQ: MQRPC_STOMP_URL");
traced!(
    rabbitmq_stomp,
    mqrpc_tests::StompHarness::rabbitmq(),
    needs mqrpc_stomp_rabbit = "needs RabbitMQ's STOMP plugin: MQRPC_STOMP_RABBIT_URL",
);
traced!(zeromq, mqrpc_tests::ZmqHarness::new());
