//! The processes the benchmark starts by re-invoking itself: `--role broker|responder|client-memory ...`.
//!
//! Each prints one line `ready <detail>` on stdout once it serves, and runs until it is killed (the broker and
//! the responders) or has printed its result (`client-memory`).

use std::io::Write;
use std::process::ExitCode;

use rpc_core::{Server, Transport};

use crate::variants::{self, Adder, BenchServer, Variant};

/// Handlers a responder runs at once, and requests it holds: the same for every mqrpc variant.
pub(crate) const CONCURRENCY: usize = 256;
/// See [`CONCURRENCY`].
pub(crate) const PREFETCH: u32 = 512;

/// Tells the parent this process serves.
pub(crate) fn ready(detail: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "ready {detail}");
    let _ = stdout.flush();
}

/// Runs the role named in `args`: the broker on a single-threaded runtime, as `rpc-broker serve` runs by
/// default, the others on a multi-threaded one.
pub(crate) fn main(args: &[String]) -> ExitCode {
    let runtime = if args.first().is_some_and(|role| role == "broker") {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().enable_all().build()
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = runtime.block_on(async {
        match args.as_slice() {
            ["broker"] => broker(None).await,
            ["broker", dir] => broker(Some(dir)).await,
            ["responder", variant, address] => match Variant::parse(variant) {
                Some(variant) => responder(variant, address).await,
                None => Err(format!("no variant `{variant}`")),
            },
            ["client-memory", url, calls] => {
                let calls = calls.parse().map_err(|_| format!("`{calls}` is not a number"))?;
                crate::memory::client_role(url, calls).await
            }
            _ => Err(format!("unknown role {args:?}")),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("bench role {args:?}: {error}");
            ExitCode::FAILURE
        }
    }
}

/// The own broker on a free loopback port, with its durable queues in `dir` if given; its ready line is its URL
/// and the number of messages it read back from `dir`.
async fn broker(dir: Option<&str>) -> Result<(), String> {
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let mut config = rpc_broker::server::ServerConfig::default();
    config.log = dir.map(rpc_broker::log::LogConfig::new);
    let mut server =
        rpc_broker::server::BrokerServer::bind(address, config).await.map_err(|error| error.to_string())?;
    let recovered = server.recovery().map_or(0, |recovery| recovery.messages);
    ready(&format!("{} {recovered}", server.url()));
    server.run().await;
    Ok(())
}

/// Answers `add` for `variant`, through the broker at `address`.
async fn responder(variant: Variant, address: &str) -> Result<(), String> {
    match variant {
        Variant::OwnBroker | Variant::OwnDurable => {
            let transport = rpc_broker::Remote::connect(address).await.map_err(|error| error.to_string())?;
            serve(transport, variant == Variant::OwnDurable).await
        }
        Variant::Nats => {
            serve(rpc_broker::adapter::nats::Nats::connect(address).await.map_err(|error| error.to_string())?, false)
                .await
        }
        Variant::Rabbitmq => {
            serve(rpc_broker::adapter::amqp::Amqp::connect(address).await.map_err(|error| error.to_string())?, false)
                .await
        }
        Variant::Kafka => {
            let transport = rpc_broker::adapter::kafka::Kafka::connect_with(address, variants::kafka_options())
                .await
                .map_err(|error| error.to_string())?;
            serve(transport, false).await
        }
        Variant::Activemq => {
            serve(rpc_broker::adapter::stomp::Stomp::connect(address).await.map_err(|error| error.to_string())?, false)
                .await
        }
        Variant::Redis => {
            let transport = rpc_broker::adapter::redis_streams::RedisStreams::connect(address)
                .await
                .map_err(|error| error.to_string())?;
            serve(transport, false).await
        }
        Variant::RedisRaw => variants::redis_raw_responder(address).await,
        Variant::NatsRaw => variants::nats_raw_responder(address).await,
        Variant::RabbitmqRaw => variants::rabbit_raw_responder(address).await,
        Variant::KafkaRaw => variants::kafka_raw_responder(address).await,
        Variant::ActivemqRaw => variants::activemq_raw_responder(address).await,
        Variant::Tarpc => variants::tarpc_responder().await,
        Variant::Zeromq => {
            // Brokerless: the responder binds, and its ready line is where.
            let options = rpc_broker::adapter::zmq::ZmqOptions::new().bind("tcp://127.0.0.1:0");
            let transport = rpc_broker::adapter::zmq::Zmq::start(options).await.map_err(|error| error.to_string())?;
            let endpoint = transport.endpoint().unwrap_or_default().to_owned();
            let _server = Server::new(transport)
                .concurrency(CONCURRENCY)
                .prefetch(PREFETCH)
                .serve(BenchServer::new(Adder))
                .await
                .map_err(|error| error.to_string())?;
            ready(&endpoint);
            std::future::pending::<()>().await;
            Ok(())
        }
        Variant::InprocFloor | Variant::Embedded | Variant::EmbeddedOtel => {
            Err(format!("{} runs in the benchmark's process", variant.name()))
        }
    }
}

/// Serves `add`, on a durable queue if `durable`.
async fn serve(transport: impl Transport, durable: bool) -> Result<(), String> {
    let _server = Server::new(transport)
        .queue_options(rpc_core::QueueOptions::new().durable(durable))
        .concurrency(CONCURRENCY)
        .prefetch(PREFETCH)
        .serve(BenchServer::new(Adder))
        .await
        .map_err(|error| error.to_string())?;
    ready("serving");
    std::future::pending::<()>().await;
    Ok(())
}
