//! Prometheus metrics: a broker server, a worker and a client in one process, scraped over HTTP from the
//! endpoint `rpc-broker serve --metrics` runs; the scrape reads as the Prometheus text format, and the numbers
//! move with the traffic, by exactly what was sent.
//!
//! A test binary of its own: it installs the process's global metrics recorder.

use std::sync::Arc;
use std::time::Duration;

use mqrpc_tests::prometheus::{Scrape, parse, scrape};
use mqrpc_tests::service::{Events, ProbeClient, ProbeServer, Worker};
use rpc_core::{Client, RetryPolicy, Server, naming};

const SERVICE: &str = "suite.Probe";

async fn read(address: std::net::SocketAddr) -> Scrape {
    let text = scrape(address).await;
    parse(&text).unwrap_or_else(|error| panic!("the scrape is not the Prometheus text format: {error}\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_parses_and_moves_with_the_calls() {
    let harness = mqrpc_tests::RemoteHarness::start().await;
    // Installed before the client and the server start: they register their metrics once.
    let metrics = rpc_broker::monitoring::Metrics::install(harness.server().monitor()).expect("installs");
    let address = metrics.spawn("127.0.0.1:0".parse().expect("an address")).await.expect("serves");
    let namespace = "metrics";
    let queue = naming::service_queue(Some(namespace), SERVICE);
    let connect = || async { rpc_broker::Remote::connect(&harness.url()).await.expect("connects") };
    let worker = Worker { name: "w".into(), events: Arc::new(Events::default()), client: None };
    let retry = RetryPolicy::attempts(3).backoff(Duration::from_millis(1), Duration::from_millis(5));
    let _server = Server::new(connect().await)
        .namespace(namespace)
        .retry(retry)
        .serve(ProbeServer::new(worker))
        .await
        .expect("serves");
    let client = Client::builder(connect().await).namespace(namespace).connect().await.expect("connects");
    let probe = ProbeClient::new(&client);

    for n in 0..10 {
        assert_eq!(probe.add(n, 1).await.expect("answered"), n + 1);
    }
    for _ in 0..3 {
        assert!(probe.div(1, 0).await.expect("answered").is_err());
    }
    assert_eq!(probe.flaky(1).await.expect("succeeds on its second attempt"), 2);
    let timeout = probe.work(2_000).timeout(Duration::from_millis(50)).await;
    assert!(matches!(timeout, Err(rpc_core::Error::Timeout(_))), "{timeout:?}");

    let client_calls = |scrape: &Scrape, method: &str, outcome: &str| {
        scrape.value("mqrpc_client_calls_total", &[("service", SERVICE), ("method", method), ("outcome", outcome)])
    };
    let handled = |scrape: &Scrape, method: &str, code: &str| {
        scrape.value("mqrpc_server_handled_total", &[("service", SERVICE), ("method", method), ("code", code)])
    };
    let first = read(address).await;
    assert_eq!(client_calls(&first, "add", "ok"), Some(10.0));
    assert_eq!(client_calls(&first, "div", "ok"), Some(3.0), "an application error is a call answered");
    assert_eq!(client_calls(&first, "work", "timeout"), Some(1.0));
    assert_eq!(first.value("mqrpc_client_timeouts_total", &[("method", "work")]), Some(1.0));
    assert_eq!(
        first.value("mqrpc_client_call_duration_seconds_count", &[("service", SERVICE), ("method", "add")]),
        Some(10.0)
    );
    assert_eq!(handled(&first, "add", "ok"), Some(10.0));
    assert_eq!(handled(&first, "flaky", "internal"), None, "a retried attempt is not an answer");
    assert_eq!(handled(&first, "flaky", "ok"), Some(1.0));
    assert_eq!(first.value("mqrpc_server_retries_total", &[("service", SERVICE)]), Some(1.0));
    assert_eq!(first.value("mqrpc_server_panics_total", &[("service", SERVICE)]), Some(1.0));
    assert_eq!(
        first.value("mqrpc_server_handler_duration_seconds_count", &[("service", SERVICE), ("method", "add")]),
        Some(10.0)
    );
    assert_eq!(first.types.get("mqrpc_server_handler_duration_seconds").map(String::as_str), Some("histogram"));
    let published = first.value("mqrpc_broker_queue_published_total", &[("queue", &queue)]).expect("the queue's");
    assert!(published >= 16.0, "{published} published to {queue}");
    assert_eq!(first.value("mqrpc_broker_queue_consumers", &[("queue", &queue)]), Some(1.0));
    assert!(first.value("mqrpc_broker_connections", &[]).is_some_and(|open| open >= 2.0));
    assert!(first.value("mqrpc_broker_inboxes", &[]).is_some_and(|inboxes| inboxes >= 1.0));
    assert!(first.value("mqrpc_broker_resident_memory_bytes", &[]).is_some_and(|bytes| bytes > 0.0));
    assert!(first.samples.iter().all(|sample| !sample.labels.get("queue").is_some_and(|q| q.starts_with("inbox."))));

    for n in 0..5 {
        probe.add(n, n).await.expect("answered");
    }
    let second = read(address).await;
    assert_eq!(client_calls(&second, "add", "ok"), Some(15.0));
    assert_eq!(handled(&second, "add", "ok"), Some(15.0));
    let published_after =
        second.value("mqrpc_broker_queue_published_total", &[("queue", &queue)]).expect("the queue's");
    assert_eq!(published_after - published, 5.0);
    let delivered = |scrape: &Scrape| scrape.value("mqrpc_broker_queue_delivered_total", &[("queue", &queue)]);
    assert_eq!(delivered(&second).zip(delivered(&first)).map(|(after, before)| after - before), Some(5.0));
    let acked = |scrape: &Scrape| scrape.value("mqrpc_broker_queue_acked_total", &[("queue", &queue)]);
    assert!(acked(&second) > acked(&first));
    assert_eq!(second.value("mqrpc_client_calls_in_flight", &[("service", SERVICE)]), Some(0.0));
}
