//! The `rpc-broker` command line on the brokers users run, through the adapters it is built with; apart from
//! server.rs, whose tests need no external broker.

#![cfg(all(feature = "amqp", feature = "nats"))]

mod support;

use std::sync::Arc;
use std::time::Duration;

use rpc_core::{ConsumeOptions, Envelope, Error, Kind, QueueOptions, Transport};
use support::cli;

/// `rpc-broker dlq list` and `rpc-broker delete` on the brokers users run, through the adapters: a dead letter
/// of a RabbitMQ queue and of a JetStream stream is listed, then the queue and its dead-letter queue are deleted
/// with what they hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(mqrpc_amqp, mqrpc_nats)),
    ignore = "needs RabbitMQ and NATS with JetStream: MQRPC_AMQP_URL, MQRPC_NATS_URL (bash .ci/brokers)"
)]
async fn operator_commands_delete_queues_on_rabbitmq_and_jetstream() {
    use rpc_broker::adapter::amqp::Amqp;
    use rpc_broker::adapter::nats::{Nats, NatsOptions};
    let amqp = std::env::var("MQRPC_AMQP_URL").expect("MQRPC_AMQP_URL");
    let nats = std::env::var("MQRPC_NATS_URL").expect("MQRPC_NATS_URL");
    let rabbitmq: Arc<dyn Transport> = Arc::new(Amqp::connect(&amqp).await.expect("connects to RabbitMQ"));
    let jetstream: Arc<dyn Transport> =
        Arc::new(Nats::connect_with(&nats, NatsOptions::jetstream()).await.expect("connects to NATS"));
    for (url, flags, transport) in [(amqp, &[][..], rabbitmq), (nats, &["--jetstream"][..], jetstream)] {
        let queue = format!("cli-delete-{}", uuid::Uuid::new_v4().simple());
        let dead_letters = format!("{queue}.dlq");
        transport.declare_queue(&queue, &QueueOptions::new()).await.expect("declares");
        let mut envelope = Envelope::new(Kind::Oneway);
        envelope.service = "Jobs".into();
        envelope.method = "run".into();
        transport.publish(&queue, envelope, rpc_core::transport::Confirm::Broker).await.expect("publishes");
        let mut consumer = transport.consume(&queue, ConsumeOptions::new()).await.expect("consumes");
        let delivery =
            tokio::time::timeout(Duration::from_secs(5), consumer.next()).await.expect("a job").expect("open");
        delivery.handle.dead_letter().await.expect("dead-letters");
        drop(consumer);

        let listed = cli(&url, &[&["dlq", "list", queue.as_str()][..], flags].concat()).await;
        assert!(listed.contains(&format!("1 message(s) in {dead_letters}")), "{url}: {listed}");
        let deleted = cli(&url, &[&["delete", queue.as_str()][..], flags].concat()).await;
        assert!(deleted.contains(&format!("deleted {queue} and {dead_letters}")), "{url}: {deleted}");
        for name in [&queue, &dead_letters] {
            let stats = transport.queue_stats(name).await;
            assert!(matches!(stats, Err(Error::NoRoute(_))), "{url}: {name} is still there: {stats:?}");
        }
    }
}
