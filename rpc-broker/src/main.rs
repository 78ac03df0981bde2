//! `rpc-broker`: the mqrpc broker server and the commands to operate it.
//!
//! ```text
//! rpc-broker serve --listen 127.0.0.1:7878 [--token TOKEN] [--users FILE] [--tls-cert FILE --tls-key FILE
//!                  [--tls-client-ca FILE]] [--insecure]
//!                  [--data-dir DIR [--fsync always|never] [--quarantine]]
//!                  [--metrics 127.0.0.1:9464] [--dashboard 127.0.0.1:8080]
//! rpc-broker queues                                   # name, depth, delayed, unacked, consumers, DLQ depth
//! rpc-broker call Calculator add '{"a": 2, "b": 3}'   # JSON in, MessagePack on the wire, JSON out
//! rpc-broker dlq list QUEUE                           # what the dead-letter queue of QUEUE holds
//! rpc-broker dlq replay QUEUE                         # put it back on QUEUE
//! rpc-broker delete QUEUE...                          # delete queues with their messages and dead letters
//! rpc-broker ping Calculator [--wait-ms 1000]         # the live workers of a service: who, version, load
//! ```
//!
//! `call` and `ping` also take the URL of another broker in `--broker`, for the adapters this binary was built
//! with (`--features amqp,nats,kafka,redis,stomp,zmq`): `amqp://`, `nats://`, `kafka://HOST:PORT`, `redis://`,
//! `stomp://`, and
//! `zmq://HOST:PORT,...` (the workers' endpoints; `call` only: a ZeroMQ worker hears broadcasts, pings
//! included, from the nodes it lists as peers, and it does not list this command's).
//!
//! Every flag can also come from the environment (`MQRPC_LISTEN`, `MQRPC_TOKEN`, `MQRPC_BROKER`, ...: see
//! `rpc-broker help serve`). Run it from the repository root with `cargo run -p rpc-broker -- serve`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, Subcommand};
use rpc_broker::server::{BrokerServer, ServerConfig};
use rpc_broker::{Remote, RemoteOptions};
use rpc_core::codec::{self, Limits};
use rpc_core::dead_letters::DeadLetters;
use rpc_core::{Client, Code, Error, naming};

#[derive(Parser)]
#[command(name = "rpc-broker", version, about = "The mqrpc broker server and its operator commands")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the broker server.
    Serve(Box<Serve>),
    /// Lists the queues: name, depth, delayed, unacked, consumers, dead-letter depth.
    Queues(Connect),
    /// Calls METHOD of SERVICE with JSON arguments and prints the JSON result.
    Call {
        /// The service's name.
        service: String,
        /// The method's name.
        method: String,
        /// The arguments, a JSON object keyed by parameter name.
        #[arg(default_value = "{}")]
        args: String,
        /// How long to wait for the reply, in milliseconds.
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
        /// The namespace the service runs in, if any.
        #[arg(long, env = "MQRPC_NAMESPACE")]
        namespace: Option<String>,
        #[command(flatten)]
        connect: Connect,
    },
    /// Inspects or replays a queue's dead letters.
    Dlq {
        #[command(subcommand)]
        action: Dlq,
    },
    /// Lists the live workers of SERVICE: id, version, host, pid, uptime, requests in flight, handled, failed.
    /// Fails when none answers.
    Ping {
        /// The service's name.
        service: String,
        /// How long to wait for answers, in milliseconds.
        #[arg(long, default_value_t = 1_000)]
        wait_ms: u64,
        /// The namespace the service runs in, if any.
        #[arg(long, env = "MQRPC_NAMESPACE")]
        namespace: Option<String>,
        #[command(flatten)]
        connect: Connect,
    },
    /// Deletes each QUEUE with the messages it holds, and its dead-letter queue; consumers of them end.
    Delete {
        /// The queues to delete, e.g. `Calculator` or `staging.Calculator`.
        #[arg(required = true)]
        queues: Vec<String>,
        #[command(flatten)]
        connect: Connect,
    },
}

#[derive(Subcommand)]
enum Dlq {
    /// Shows the dead letters of QUEUE without removing them.
    List {
        /// The queue whose dead letters to show.
        queue: String,
        #[command(flatten)]
        connect: Connect,
    },
    /// Moves the dead letters of QUEUE back onto QUEUE, keeping their idempotency keys.
    Replay {
        /// The queue whose dead letters to replay.
        queue: String,
        #[command(flatten)]
        connect: Connect,
    },
}

#[derive(clap::Args)]
struct Connect {
    /// The broker's URL: mqrpc://[token@]host:port, or mqrpcs:// for TLS; `call`, `ping`, `dlq` and `delete`
    /// also take the schemes of the adapters built in (amqp://, nats://, kafka://, redis://, stomp://, zmq://).
    #[arg(long, env = "MQRPC_BROKER", default_value = "mqrpc://127.0.0.1:7878")]
    broker: String,
    /// A PEM file of certificates to trust for mqrpcs://.
    #[arg(long, env = "MQRPC_CA")]
    ca: Option<PathBuf>,
    /// With nats://, the services' JetStream streams (servers made with `NatsOptions::jetstream()`) rather
    /// than core NATS, which holds no queue.
    #[arg(long, env = "MQRPC_JETSTREAM")]
    jetstream: bool,
}

#[derive(clap::Args)]
struct Serve {
    /// The address to listen on.
    #[arg(long, env = "MQRPC_LISTEN", default_value = "127.0.0.1:7878")]
    listen: SocketAddr,
    /// Clients must present this token (with --users, a credential with every right).
    #[arg(long, env = "MQRPC_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Users and their rights on queues and topics, as JSON (see the `access` module's docs): a client
    /// presents a user's token and may do what that user's grants allow.
    #[arg(long, env = "MQRPC_USERS")]
    users: Option<PathBuf>,
    /// The TLS certificate chain (PEM).
    #[arg(long, env = "MQRPC_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The TLS private key (PEM).
    #[arg(long, env = "MQRPC_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Verify clients' certificates against the CA certificates in this file (PEM): mutual TLS. A client
    /// without a certificate signed by one of them cannot connect; with --users, a certificate listed there
    /// (`cert_sha256`) is that user.
    #[arg(long, env = "MQRPC_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Listen on a non-loopback address without a token.
    #[arg(long, env = "MQRPC_INSECURE")]
    insecure: bool,
    /// The largest frame accepted, in bytes.
    #[arg(long, env = "MQRPC_MAX_FRAME", default_value_t = 16 * 1024 * 1024)]
    max_frame: usize,
    /// Time a connection has to complete its handshake, in milliseconds.
    #[arg(long, env = "MQRPC_HANDSHAKE_TIMEOUT_MS", default_value_t = 10_000)]
    handshake_timeout_ms: u64,
    /// Heartbeat interval in milliseconds; a connection silent for three is closed.
    #[arg(long, env = "MQRPC_HEARTBEAT_MS", default_value_t = 1_000)]
    heartbeat_ms: u64,
    /// Connections open at once.
    #[arg(long, env = "MQRPC_MAX_CONNECTIONS", default_value_t = 1024)]
    max_connections: usize,
    /// Unacked deliveries per consumer (a larger prefetch is lowered to it).
    #[arg(long, env = "MQRPC_MAX_UNACKED", default_value_t = 10_000)]
    max_unacked: u32,
    /// Bytes waiting to be written to one connection before its frames stop being read.
    #[arg(long, env = "MQRPC_MAX_OUTBOUND", default_value_t = 64 * 1024 * 1024)]
    max_outbound: usize,
    /// Bytes of messages held past which publishes get QueueFull.
    #[arg(long, env = "MQRPC_MEMORY_HIGH_WATERMARK", default_value_t = 1024 * 1024 * 1024)]
    memory_high_watermark: usize,
    /// Bytes of large frames (over 64 KiB) being received across connections, past which a connection starting
    /// another is closed with the limit error.
    #[arg(long, env = "MQRPC_RECEIVE_BUDGET", default_value_t = 256 * 1024 * 1024)]
    receive_budget: usize,
    /// Keep durable queues in this directory: their messages survive a restart or a crash. Without it, every
    /// queue is in memory only.
    #[arg(long, env = "MQRPC_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// When the log is synced to disk: `always` before every publish confirm (a confirmed message survives a
    /// power loss), or `never` (it survives a crash of the broker, not of the machine).
    #[arg(long, env = "MQRPC_FSYNC", default_value = "always")]
    fsync: rpc_broker::log::FsyncPolicy,
    /// Bytes past which a segment file of the log is closed and a new one started.
    #[arg(long, env = "MQRPC_SEGMENT_SIZE", default_value_t = 64 * 1024 * 1024)]
    segment_size: u64,
    /// On a corrupt record in the log, copy its segment to DATA_DIR/quarantine, skip the damaged bytes and start
    /// with the records around them, instead of refusing to start.
    #[arg(long, env = "MQRPC_QUARANTINE")]
    quarantine: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics: the queues, connections, memory and log fsync time
    /// (port 0 picks a free port; the address is printed).
    #[arg(long, env = "MQRPC_METRICS")]
    metrics: Option<SocketAddr>,
    /// Serve the live dashboard at http://ADDR/: queues, rates, dead letters (inspect, replay) and connections,
    /// behind --token when one is set (port 0 picks a free port; the address is printed).
    #[arg(long, env = "MQRPC_DASHBOARD")]
    dashboard: Option<SocketAddr>,
    /// Threads serving connections. One engine serves every queue, so 1 (the default) spends the least CPU
    /// per message: no wake-ups across threads. More help with many TLS connections.
    #[arg(long, env = "MQRPC_THREADS", default_value_t = 1)]
    threads: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let threads = match &cli.command {
        Command::Serve(serve) => serve.threads,
        _ => 1,
    };
    let runtime = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()
    };
    match runtime {
        Ok(runtime) => runtime.block_on(run(cli)),
        Err(error) => {
            eprintln!("rpc-broker: cannot start the runtime: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Serve(serve) => run_server(*serve).await,
        Command::Queues(connect) => list_queues(&connect).await,
        Command::Call { service, method, args, timeout_ms, namespace, connect } => {
            call(&connect, &service, &method, &args, Duration::from_millis(timeout_ms), namespace).await
        }
        Command::Dlq { action: Dlq::List { queue, connect } } => dead_letters(&connect, &queue, false).await,
        Command::Dlq { action: Dlq::Replay { queue, connect } } => dead_letters(&connect, &queue, true).await,
        Command::Delete { queues, connect } => delete(&connect, &queues).await,
        Command::Ping { service, wait_ms, namespace, connect } => {
            ping(&connect, &service, Duration::from_millis(wait_ms), namespace).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("rpc-broker: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run_server(serve: Serve) -> Result<(), String> {
    if !serve.listen.ip().is_loopback() && serve.token.is_none() && serve.users.is_none() && !serve.insecure {
        return Err(format!(
            "refusing to listen on {} without --token or --users: anyone who can reach it could read and \
             publish; pass --token or --users, or --insecure to do it anyway",
            serve.listen
        ));
    }
    // The dashboard reaches dead letters through a connection of its own, trusting the server's certificate.
    let dashboard_options = match &serve.tls_cert {
        Some(cert) => {
            let pem = std::fs::read(cert).map_err(|error| format!("cannot read {}: {error}", cert.display()))?;
            RemoteOptions::new().tls_roots_pem(&pem).map_err(|error| error.to_string())?
        }
        None => RemoteOptions::new(),
    };
    let dashboard_token = serve.token.clone();
    let tls = match (&serve.tls_cert, &serve.tls_key) {
        (Some(cert), Some(key)) => Some(tls_config(cert, key, serve.tls_client_ca.as_deref())?),
        _ => None,
    };
    let mut config = ServerConfig::default();
    config.token = serve.token;
    if serve.users.is_some() && config.token.is_none() && serve.dashboard.is_some() {
        // The dashboard's own connection (dead letters) needs a credential with every right; with users and no
        // shared token, it gets one nobody else knows. Its visitors sign in as admin users.
        config.token = Some(uuid::Uuid::new_v4().simple().to_string());
    }
    if let Some(path) = &serve.users {
        let users = rpc_broker::access::Users::load(path)?;
        tracing::info!(users = users.len(), file = %path.display(), "users loaded");
        config.users = Some(std::sync::Arc::new(users));
    }
    config.max_frame = serve.max_frame;
    config.handshake_timeout = Duration::from_millis(serve.handshake_timeout_ms);
    config.heartbeat = Duration::from_millis(serve.heartbeat_ms.max(10));
    config.max_connections = serve.max_connections;
    config.max_unacked = serve.max_unacked;
    config.max_outbound = serve.max_outbound;
    config.memory_high_watermark = serve.memory_high_watermark;
    config.receive_budget = serve.receive_budget;
    config.tls = tls;
    if let Some(dir) = serve.data_dir {
        let mut log = rpc_broker::log::LogConfig::new(dir);
        log.fsync = serve.fsync;
        log.segment_size = serve.segment_size.max(4096);
        log.quarantine = serve.quarantine;
        config.log = Some(log);
    }
    let mut server = BrokerServer::bind(serve.listen, config)
        .await
        .map_err(|error| format!("cannot start on {}: {error}", serve.listen))?;
    tracing::info!(address = %server.local_addr(), "rpc-broker listening");
    println!("listening on {}", server.local_addr());
    if let Some(address) = serve.metrics {
        let metrics = rpc_broker::monitoring::Metrics::install(server.monitor())?;
        let bound =
            metrics.spawn(address).await.map_err(|error| format!("cannot serve metrics on {address}: {error}"))?;
        tracing::info!(address = %bound, "metrics at /metrics");
        println!("metrics on http://{bound}/metrics");
    }
    if let Some(address) = serve.dashboard {
        let dashboard =
            rpc_broker::dashboard::Dashboard::new(server.monitor(), server.url(), dashboard_options, dashboard_token);
        let bound = dashboard
            .spawn(address)
            .await
            .map_err(|error| format!("cannot serve the dashboard on {address}: {error}"))?;
        tracing::info!(address = %bound, "dashboard at /");
        println!("dashboard on http://{bound}/");
    }
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|error| format!("cannot watch for SIGTERM: {error}"))?;
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|error| format!("cannot watch for SIGHUP: {error}"))?;
    let monitor = server.monitor();
    let result = loop {
        tokio::select! {
            () = server.run() => break Err("the listener stopped".into()),
            _ = tokio::signal::ctrl_c() => break Ok(()),
            _ = terminate.recv() => break Ok(()),
            _ = hangup.recv() => reload_users(&monitor, serve.users.as_deref()),
        }
    };
    tracing::info!("rpc-broker stopping");
    result
}

/// Reads the users file again (on SIGHUP); a file that does not read leaves the users as they were.
fn reload_users(monitor: &rpc_broker::server::Monitor, path: Option<&Path>) {
    let Some(path) = path else {
        tracing::info!("SIGHUP: no users file to reload");
        return;
    };
    match rpc_broker::access::Users::load(path) {
        Ok(users) => {
            tracing::info!(users = users.len(), file = %path.display(), "users reloaded");
            println!("users reloaded from {}: {}", path.display(), users.len());
            monitor.replace_users(users);
        }
        Err(error) => {
            tracing::warn!(%error, "SIGHUP: the users file does not read; the users stay as they were");
            println!("users not reloaded, they stay as they were: {error}");
        }
    }
}

fn tls_config(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect)
        .map_err(|error| format!("cannot read the certificates in {}: {error}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|error| format!("cannot read the private key in {}: {error}", key.display()))?;
    let builder = rustls::ServerConfig::builder();
    let builder = match client_ca {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for certificate in CertificateDer::pem_file_iter(path)
                .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                .map_err(|error| format!("cannot read the certificates in {}: {error}", path.display()))?
            {
                roots
                    .add(certificate)
                    .map_err(|error| format!("a bad CA certificate in {}: {error}", path.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .map_err(|error| format!("cannot verify clients with {}: {error}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|error| format!("the certificate and key do not make a TLS configuration: {error}"))?;
    Ok(Arc::new(config))
}

async fn connect(connect: &Connect) -> Result<Remote, String> {
    let mut options = RemoteOptions::new();
    if let Some(ca) = &connect.ca {
        let pem = std::fs::read(ca).map_err(|error| format!("cannot read {}: {error}", ca.display()))?;
        options = options.tls_roots_pem(&pem).map_err(|error| error.to_string())?;
    }
    Remote::connect_with(&connect.broker, options)
        .await
        .map_err(|error| format!("cannot connect to {}: {error}", connect.broker))
}

/// A transport to the broker `--broker` names: ours, or another through the adapters built in.
async fn transport(target: &Connect) -> Result<Arc<dyn rpc_core::Transport>, String> {
    let url = target.broker.as_str();
    let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
    match scheme {
        "mqrpc" | "mqrpcs" => Ok(Arc::new(connect(target).await?)),
        #[cfg(feature = "amqp")]
        "amqp" | "amqps" => {
            Ok(Arc::new(rpc_broker::adapter::amqp::Amqp::connect(url).await.map_err(|error| unreachable(url, &error))?))
        }
        #[cfg(feature = "nats")]
        "nats" | "tls" => {
            use rpc_broker::adapter::nats::{Nats, NatsOptions};
            let options = if target.jetstream { NatsOptions::jetstream() } else { NatsOptions::new() };
            Ok(Arc::new(Nats::connect_with(url, options).await.map_err(|error| unreachable(url, &error))?))
        }
        #[cfg(feature = "kafka")]
        "kafka" => {
            let brokers = url.trim_start_matches("kafka://");
            Ok(Arc::new(
                rpc_broker::adapter::kafka::Kafka::connect(brokers).await.map_err(|error| unreachable(url, &error))?,
            ))
        }
        #[cfg(feature = "redis")]
        "redis" | "rediss" => {
            let transport = rpc_broker::adapter::redis_streams::RedisStreams::connect(url);
            Ok(Arc::new(transport.await.map_err(|error| unreachable(url, &error))?))
        }
        #[cfg(feature = "stomp")]
        "stomp" => Ok(Arc::new(
            rpc_broker::adapter::stomp::Stomp::connect(url).await.map_err(|error| unreachable(url, &error))?,
        )),
        #[cfg(feature = "zmq")]
        "zmq" => {
            use rpc_broker::adapter::zmq::{Zmq, ZmqOptions};
            let peers = url.trim_start_matches("zmq://").split(',').map(|endpoint| format!("tcp://{endpoint}"));
            Ok(Arc::new(Zmq::start(ZmqOptions::new().peers(peers)).await.map_err(|error| unreachable(url, &error))?))
        }
        _ => Err(format!(
            "`{url}`: this rpc-broker speaks mqrpc:// and mqrpcs://, and the schemes of the adapters it was built \
             with (amqp://, nats://, kafka://, redis://, stomp://, zmq://; cargo install with --features amqp,nats,...)"
        )),
    }
}

#[cfg_attr(
    not(any(feature = "amqp", feature = "nats", feature = "kafka", feature = "stomp", feature = "zmq")),
    allow(dead_code)
)]
fn unreachable(url: &str, error: &Error) -> String {
    format!("cannot connect to {url}: {error}")
}

async fn ping(target: &Connect, service: &str, wait: Duration, namespace: Option<String>) -> Result<(), String> {
    if target.broker.starts_with("zmq://") {
        return Err("a ZeroMQ worker hears pings only from the nodes it lists as peers: ping from one of those, \
                    with `Client::ping`"
            .into());
    }
    let transport = transport(target).await?;
    let workers = rpc_core::health::Ping::new(transport, namespace.as_deref(), service)
        .wait(wait)
        .await
        .map_err(|error| format!("pinging {service}: {error}"))?;
    if workers.is_empty() {
        return Err(format!("no worker of {service} answered within {} ms", wait.as_millis()));
    }
    println!(
        "{:<36} {:<10} {:<16} {:>8} {:>10} {:>9} {:>10} {:>8}",
        "worker", "version", "host", "pid", "uptime", "in flight", "handled", "failed"
    );
    for worker in &workers {
        println!(
            "{:<36} {:<10} {:<16} {:>8} {:>9}s {:>4}/{:<4} {:>10} {:>8}",
            worker.id,
            worker.version.as_deref().unwrap_or("-"),
            worker.host,
            worker.pid,
            worker.uptime_ms / 1_000,
            worker.in_flight,
            worker.concurrency,
            worker.handled,
            worker.failed,
        );
    }
    println!("{} worker(s) of {service} on {}", workers.len(), workers[0].system);
    Ok(())
}

async fn list_queues(target: &Connect) -> Result<(), String> {
    let remote = connect(target).await?;
    let queues = remote.list_queues().await.map_err(|error| error.to_string())?;
    let depth_of = |name: &str| queues.iter().find(|(queue, _)| queue == name).map(|(_, stats)| stats.ready);
    println!("{:<48} {:>10} {:>10} {:>10} {:>10} {:>10}", "queue", "depth", "delayed", "unacked", "consumers", "dlq");
    for (name, stats) in queues
        .iter()
        .filter(|(name, _)| !name.ends_with(".dlq") && !name.starts_with("inbox.") && !name.contains("@inbox."))
    {
        let dlq = depth_of(&naming::dead_letter_queue(name)).map_or_else(|| "-".to_owned(), |depth| depth.to_string());
        println!(
            "{name:<48} {:>10} {:>10} {:>10} {:>10} {dlq:>10}",
            stats.ready, stats.delayed, stats.unacked, stats.consumers
        );
    }
    Ok(())
}

fn json_to_msgpack(json: &str) -> Result<Bytes, String> {
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|error| format!("the arguments are not JSON: {error}"))?;
    if !value.is_object() {
        return Err("the arguments are a JSON object keyed by parameter name, like '{\"a\": 2}'".into());
    }
    codec::encode(&value).map_err(|error| error.to_string())
}

fn msgpack_to_json(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "null".into();
    }
    match codec::decode::<serde_json::Value>(bytes, &Limits::default()) {
        Ok(value) => value.to_string(),
        Err(error) => format!("<{} bytes that are not JSON-representable: {error}>", bytes.len()),
    }
}

async fn call(
    target: &Connect,
    service: &str,
    method: &str,
    args: &str,
    timeout: Duration,
    namespace: Option<String>,
) -> Result<(), String> {
    let args = json_to_msgpack(args)?;
    let mut builder = Client::builder(transport(target).await?);
    if let Some(namespace) = namespace {
        builder = builder.namespace(namespace);
    }
    let client = builder.connect().await.map_err(|error| error.to_string())?;
    match client.request(service.to_owned(), method.to_owned(), args).timeout(timeout).await {
        Ok(body) => {
            println!("{}", msgpack_to_json(&body));
            Ok(())
        }
        Err(Error::Remote(status)) if status.code() == Code::Application => {
            Err(format!("{service}.{method} returned an error: {}", msgpack_to_json(status.details())))
        }
        Err(error) => Err(format!("{service}.{method} failed: {error}")),
    }
}

async fn delete(target: &Connect, queues: &[String]) -> Result<(), String> {
    let transport = transport(target).await?;
    for queue in queues {
        for name in [queue.clone(), naming::dead_letter_queue(queue)] {
            transport.delete_queue(&name).await.map_err(|error| format!("deleting `{name}`: {error}"))?;
        }
        println!("deleted {queue} and {}", naming::dead_letter_queue(queue));
    }
    Ok(())
}

async fn dead_letters(target: &Connect, queue: &str, replay: bool) -> Result<(), String> {
    /// Dead letters handled per run: a listing holds them all unacked until it is done.
    const MOST: usize = 10_000;
    let dead = DeadLetters::of_queue(transport(target).await?, queue);
    if replay {
        let count = dead.replay(MOST).await.map_err(|error| format!("replaying onto {queue}: {error}"))?;
        println!("replayed {count} message(s) from {} onto {queue}", dead.dead_letter_queue());
        return Ok(());
    }
    let listed = dead.list(MOST).await.map_err(|error| error.to_string())?;
    for envelope in &listed {
        println!(
            "{} {}.{} attempt {} key {} args {}",
            envelope.id,
            envelope.service,
            envelope.method,
            envelope.attempt,
            envelope.idempotency_key.as_deref().unwrap_or("-"),
            msgpack_to_json(&envelope.body),
        );
    }
    println!("{} message(s) in {}", listed.len(), dead.dead_letter_queue());
    Ok(())
}
