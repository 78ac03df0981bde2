//! A worker process for the fault tests: serves the suite's `Probe` service through a broker.
//!
//! ```text
//! probe-worker URL NAMESPACE NAME [CONCURRENCY [PREFETCH]]
//! probe-worker --broker [PORT [DATA_DIR]]
//! ```
//!
//! With `--broker` it runs our broker instead, on loopback port `PORT` (default 0: a free one), keeping durable
//! queues in `DATA_DIR` if given, for tests that measure their own process alone or kill the broker or measure
//! it (its token, receive budget, memory high-watermark and connection limit from `MQRPC_PROBE_BROKER_TOKEN`,
//! `_RECEIVE_BUDGET`, `_WATERMARK` and `_MAX_CONNECTIONS` if set): it prints
//! `ready`, then the broker's URL, then how many messages it read back from `DATA_DIR`, and serves until killed; on SIGTERM it stops gracefully (its log written and
//! synced) and exits.
//!
//! `URL` picks the transport: `mqrpc://` our broker, `amqp://` RabbitMQ, `nats://` NATS (JetStream mode when
//! `MQRPC_PROBE_STREAM_PREFIX` names the harness's stream prefix). `MQRPC_PROBE_SINK` names a file where the
//! `effect` methods append the keys they applied. `MQRPC_PROBE_DEDUP_REDIS` names a Redis whose dedup store the
//! worker shares with the others (keys prefixed with the namespace, a claim's lease 1 s) instead of keeping its
//! own in memory. Prints `ready` on stdout once it is consuming. On SIGTERM it
//! shuts down gracefully (no new requests, running ones finish within 10 s, buffered ones go back to the
//! queue), prints `stopped` with the shutdown report and the server's counters as `name=value` pairs, and
//! exits.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use mqrpc_tests::service::{Events, ProbeServer, Worker};
use rpc_core::Error;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    if std::env::args().nth(1).as_deref() == Some("--broker") {
        return broker().await;
    }
    let (Some(url), Some(namespace), Some(name)) = (args.next(), args.next(), args.next()) else {
        eprintln!("usage: probe-worker URL NAMESPACE NAME [CONCURRENCY [PREFETCH]]");
        std::process::exit(2);
    };
    let concurrency = args.next().and_then(|n| n.parse().ok()).unwrap_or(16);
    let prefetch = args.next().and_then(|n| n.parse().ok()).unwrap_or(concurrency as u32);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let events = Events::default();
    if let Some(path) = std::env::var_os("MQRPC_PROBE_SINK") {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path);
        *events.sink.lock().expect("not poisoned") = Some(file.map_err(|error| Error::Transport(Box::new(error)))?);
    }
    let events = Arc::new(events);
    let worker = Worker { name, events: Arc::clone(&events), client: None };
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|error| Error::Transport(Box::new(error)))?;
    let mut server = rpc_core::Server::new(mqrpc_tests::process_transport(&url).await?)
        .namespace(namespace.clone())
        .concurrency(concurrency)
        .prefetch(prefetch);
    if let Ok(redis) = std::env::var("MQRPC_PROBE_DEDUP_REDIS") {
        let store = rpc_broker::adapter::redis_dedup::RedisDedup::connect(&redis)
            .await?
            .prefix(format!("mqrpc:probe:{namespace}:"))
            .lease(Duration::from_secs(1));
        server = server.dedup(store);
    }
    let server = server.serve(ProbeServer::new(worker)).await?;
    println!("ready");
    let _ = std::io::stdout().flush();
    terminate.recv().await;
    let report = server.shutdown(Duration::from_secs(10)).await;
    let stats = report.stats;
    println!(
        "stopped released={} finished={} aborted={} handled={} failed={} fenced={} revoked={} deduplicated={} \
         expired={} work_started={} work_running={}",
        report.released,
        report.finished,
        report.aborted,
        stats.handled,
        stats.failed,
        stats.fenced,
        stats.revoked,
        stats.deduplicated,
        stats.expired,
        events.started.load(std::sync::atomic::Ordering::SeqCst),
        events.running.load(std::sync::atomic::Ordering::SeqCst),
    );
    let _ = std::io::stdout().flush();
    Ok(())
}

/// Runs our broker on loopback until killed, or until SIGTERM.
async fn broker() -> Result<(), Error> {
    let mut args = std::env::args().skip(2);
    let port = args.next().and_then(|port| port.parse().ok()).unwrap_or(0);
    let mut config = rpc_broker::server::ServerConfig::default();
    config.log = args.next().map(rpc_broker::log::LogConfig::new);
    config.token = std::env::var("MQRPC_PROBE_BROKER_TOKEN").ok();
    let number = |name: &str| std::env::var(name).ok().and_then(|value| value.parse::<usize>().ok());
    if let Some(budget) = number("MQRPC_PROBE_BROKER_RECEIVE_BUDGET") {
        config.receive_budget = budget;
    }
    if let Some(watermark) = number("MQRPC_PROBE_BROKER_WATERMARK") {
        config.memory_high_watermark = watermark;
    }
    if let Some(connections) = number("MQRPC_PROBE_BROKER_MAX_CONNECTIONS") {
        config.max_connections = connections;
    }
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|error| Error::Transport(Box::new(error)))?;
    let server = rpc_broker::server::BrokerServer::bind(address, config)
        .await
        .map_err(|error| Error::Transport(Box::new(error)))?;
    let recovered = server.recovery().map_or(0, |recovery| recovery.messages);
    println!("ready\n{}\n{recovered}", server.url());
    let _ = std::io::stdout().flush();
    terminate.recv().await;
    drop(server);
    Ok(())
}
