//! The benchmark: `add(a, b)` over mqrpc and over what a user would otherwise pick, side by side in one run.
//!
//! With RabbitMQ on 127.0.0.1:5672, NATS on 127.0.0.1:4222, a Kafka-protocol broker on 127.0.0.1:9092 and
//! ActiveMQ's STOMP connector on 127.0.0.1:61623 (`bash .ci/brokers` starts them, Kafka as tansu), from the
//! repository root:
//!
//! ```text
//! cargo run --release -p mqrpc-bench                       # 3 rounds, 20,000 calls per latency run
//! cargo run --release -p mqrpc-bench -- --quick            # under 2 minutes
//! cargo run --release -p mqrpc-bench -- --only own-broker,nats-raw --json bench.jsonl --svg bench.svg
//! ```
//!
//! Each variant runs the same workload, `add(a: i64, b: i64) -> i64` with MessagePack arguments:
//!
//! | variant | what answers |
//! |---|---|
//! | `inproc-floor` | a tokio mpsc request channel and a oneshot reply, in this process (the floor) |
//! | `embedded` | mqrpc on the embedded broker, in this process |
//! | `embedded-otel` | the same with an OpenTelemetry layer recording every span of every call (see [`tracing`]), against `embedded` |
//! | `own-broker` | mqrpc through the `rpc-broker` server; broker and worker are two more processes |
//! | `own-durable` | the same with the service queue durable: the broker has a data directory and confirms each request after the fsync that covers it |
//! | `nats-raw` | async-nats `request()` to a plain subscriber process |
//! | `nats` | mqrpc on core NATS, worker in another process |
//! | `rabbitmq-raw` | hand-written lapin RPC: exclusive reply queue, correlation ids, a plain consumer process |
//! | `rabbitmq` | mqrpc on RabbitMQ, worker in another process |
//! | `kafka-raw` | hand-written rdkafka RPC: a reply topic per client read without a group, correlation ids, a consumer-group process |
//! | `kafka` | mqrpc on Kafka, worker in another process |
//! | `activemq-raw` | hand-written STOMP RPC on ActiveMQ: a temporary reply queue on the calling connection, correlation ids, a `client-individual` subscriber process with a prefetch; requests `persistent:true` without a receipt and replies not persistent, as the `activemq` variant sends them |
//! | `activemq` | mqrpc on ActiveMQ over STOMP, worker in another process |
//! | `redis-raw` | hand-written Redis Streams RPC: `XADD` with a correlation id and a reply stream, a consumer-group process acking and deleting each batch in one pipeline, replies read with `XREAD BLOCK` |
//! | `redis` | mqrpc on Redis Streams, worker in another process |
//! | `tarpc` | tarpc over TCP, server in another process: direct RPC with no queue (reference) |
//! | `zeromq` | mqrpc over ZeroMQ, worker in another process: brokerless, against `tarpc` |
//!
//! For each: latency with one call in flight (p50, p99, p99.9), throughput with 64 and 256 calls in flight, and
//! the CPU time per call of every process involved (this one, the responders and the broker, read from
//! `/proc/<pid>/stat`). The variants alternate over the rounds and the medians are reported, with each variant's
//! ratio to its baseline: ours against the raw client of the same broker, `own-broker` against `nats-raw`,
//! `embedded` against `inproc-floor`, `own-durable` against `own-broker`; the targets judged on those ratios list
//! each round's own ratio as well. Then memory: the own broker's RSS
//! holding 1,000,000 queued 100-byte messages, and a client's RSS after 100,000 calls that timed out; and the
//! time our broker, killed with 100,000 messages in a durable queue, takes to serve again. Before each variant of
//! each round it measures how long two threads pinned to the first two cores take to hand a cache line to each
//! other and back, and prints that beside the variant: on a virtual machine it moves with where the host puts
//! the virtual CPUs, and the figures of every variant whose threads or processes hand work to each other move
//! with it.
//!
//! The program first runs itself again with `GLIBC_TUNABLES=glibc.malloc.arena_max=1` unless that variable is
//! set (see [`one_malloc_arena`]; set it to anything else, even empty, to keep glibc's default). It re-invokes
//! itself for the processes it needs (`--role broker|responder|client-memory`). The broker runs a
//! single-threaded tokio runtime, as `rpc-broker serve` does by default; the responders and this process (the
//! client of every variant) run multi-threaded ones, with one worker thread per core unless `--workers N` says
//! otherwise for this process.

mod measure;
mod memory;
mod report;
mod roles;
mod tracing;
mod variants;

use std::path::PathBuf;
use std::time::Duration;

use crate::variants::Variant;

/// What one run measures, from the command line.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    /// Shorter runs: fewer calls, shorter windows.
    pub(crate) quick: bool,
    /// The variants to run, in order.
    pub(crate) variants: Vec<Variant>,
    /// Rounds over all variants; medians are taken across them.
    pub(crate) rounds: usize,
    /// Calls measured at one in flight (after warm-up).
    pub(crate) latency_calls: usize,
    /// Calls made before measuring.
    pub(crate) warmup_calls: usize,
    /// Warm-up before each throughput window.
    pub(crate) warmup: Duration,
    /// How long each throughput window lasts.
    pub(crate) window: Duration,
    /// Where the JSON lines go.
    pub(crate) json: Option<PathBuf>,
    /// Where the chart goes.
    pub(crate) svg: PathBuf,
    /// Whether to measure memory.
    pub(crate) memory: bool,
    /// Queued messages for the broker memory figure.
    pub(crate) queued_messages: usize,
    /// Timed-out calls for the client memory figure.
    pub(crate) timed_out_calls: usize,
    /// Messages in the durable queue of the broker restarted for the restart-time figure.
    pub(crate) restart_records: usize,
    /// RabbitMQ URL.
    pub(crate) amqp_url: String,
    /// NATS URL.
    pub(crate) nats_url: String,
    /// Kafka bootstrap servers (`host:port`, comma-separated; `kafka://` in front is allowed).
    pub(crate) kafka_url: String,
    /// ActiveMQ's STOMP URL.
    pub(crate) stomp_url: String,
    /// Redis's URL.
    pub(crate) redis_url: String,
    /// Worker threads of this process's runtime, which runs the callers of every variant and the responders
    /// of `inproc-floor` and `embedded`; tokio's default (one per core) when `None`.
    pub(crate) workers: Option<usize>,
}

const USAGE: &str = "usage: bench [--quick] [--only VARIANTS] [--rounds N] [--json FILE] [--svg FILE] [--no-memory] [--workers N] [--window SECS]
  --workers N: worker threads of this process's runtime (default: one per core)
  --window SECS: how long each throughput measurement runs (default 3, 0.7 with --quick); longer to profile one
  VARIANTS: comma-separated, from inproc-floor,embedded,embedded-otel,own-broker,own-durable,nats-raw,nats,rabbitmq-raw,rabbitmq,kafka-raw,kafka,
    activemq-raw,activemq,redis-raw,redis,tarpc,zeromq
  brokers: MQRPC_AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f), MQRPC_NATS_URL (default nats://127.0.0.1:4222),
    MQRPC_KAFKA_URL (default 127.0.0.1:9092), MQRPC_STOMP_URL (ActiveMQ, default stomp://127.0.0.1:61623),
    MQRPC_REDIS_URL (default redis://127.0.0.1:6379)";

fn parse(args: &[String]) -> Result<Config, String> {
    let mut config = Config {
        quick: false,
        variants: Variant::ALL.to_vec(),
        rounds: 3,
        latency_calls: 20_000,
        warmup_calls: 2_000,
        warmup: Duration::from_millis(500),
        window: Duration::from_secs(3),
        json: None,
        svg: PathBuf::from("target/bench/bench.svg"),
        memory: true,
        queued_messages: 1_000_000,
        timed_out_calls: 100_000,
        restart_records: 100_000,
        amqp_url: std::env::var("MQRPC_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
        nats_url: std::env::var("MQRPC_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into()),
        kafka_url: std::env::var("MQRPC_KAFKA_URL").unwrap_or_else(|_| "127.0.0.1:9092".into()),
        stomp_url: std::env::var("MQRPC_STOMP_URL").unwrap_or_else(|_| "stomp://127.0.0.1:61623".into()),
        redis_url: std::env::var("MQRPC_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
        workers: None,
    };
    let mut rounds = None;
    let mut window = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value\n{USAGE}"));
        match arg.as_str() {
            "--quick" => config.quick = true,
            "--only" => {
                config.variants = value()?
                    .split(',')
                    .filter(|name| !name.is_empty())
                    .map(|name| Variant::parse(name).ok_or_else(|| format!("no variant `{name}`\n{USAGE}")))
                    .collect::<Result<_, _>>()?;
            }
            "--rounds" => {
                let n: usize = value()?.parse().map_err(|_| format!("--rounds takes a number\n{USAGE}"))?;
                rounds = Some(n.max(1));
            }
            "--json" => config.json = Some(PathBuf::from(value()?)),
            "--svg" => config.svg = PathBuf::from(value()?),
            "--no-memory" => config.memory = false,
            "--workers" => {
                let n: usize = value()?.parse().map_err(|_| format!("--workers takes a number\n{USAGE}"))?;
                config.workers = Some(n.max(1));
            }
            "--window" => {
                let seconds: f64 = value()?.parse().map_err(|_| format!("--window takes seconds\n{USAGE}"))?;
                if !(seconds.is_finite() && seconds > 0.0 && seconds <= 3_600.0) {
                    return Err(format!("--window takes seconds between 0 and 3600\n{USAGE}"));
                }
                window = Some(Duration::from_secs_f64(seconds));
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument `{other}`\n{USAGE}")),
        }
    }
    if config.quick {
        config.latency_calls = 2_000;
        config.warmup_calls = 500;
        config.warmup = Duration::from_millis(200);
        config.window = Duration::from_millis(700);
        config.queued_messages = 1_000_000;
        config.timed_out_calls = 100_000;
    }
    config.rounds = rounds.unwrap_or(3);
    config.window = window.unwrap_or(config.window);
    Ok(config)
}

/// The glibc tunable every process of a run starts with, unless `GLIBC_TUNABLES` is set already.
const ONE_MALLOC_ARENA: &str = "glibc.malloc.arena_max=1";

/// Runs this program again with glibc's malloc on one arena, unless `GLIBC_TUNABLES` is set; `None` when there
/// is nothing to do, the exit code when the new program could not start.
///
/// A thread that finds its malloc arena locked moves to another, so which threads share an arena depends on
/// what ran before in the process, and a thread freeing what another allocated may then take a second arena's
/// lock. The embedded variant, whose two runtime threads free each other's messages, ran at 170-184k calls/s
/// at 256 in flight after `inproc-floor` and at 480k without it, on the same build; on one arena, at 306-430k
/// after it, and the other variants as before. The processes the run starts inherit the variable.
#[cfg(unix)]
fn one_malloc_arena() -> Option<std::process::ExitCode> {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("GLIBC_TUNABLES").is_some() {
        return None;
    }
    let program = std::env::current_exe().ok()?;
    let error = std::process::Command::new(program)
        .args(std::env::args_os().skip(1))
        .env("GLIBC_TUNABLES", ONE_MALLOC_ARENA)
        .exec();
    eprintln!("cannot run the benchmark again with {ONE_MALLOC_ARENA}: {error}");
    Some(std::process::ExitCode::FAILURE)
}

#[cfg(not(unix))]
fn one_malloc_arena() -> Option<std::process::ExitCode> {
    None
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // First, in every process of the run: see the `tracing` module.
    if let Err(error) = tracing::install() {
        eprintln!("{error}");
        return std::process::ExitCode::FAILURE;
    }
    if args.first().map(String::as_str) == Some("--role") {
        return roles::main(&args[1..]);
    }
    if let Some(failed) = one_malloc_arena() {
        return failed;
    }
    let config = match parse(&args) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("{message}");
            return std::process::ExitCode::from(2);
        }
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = config.workers {
        runtime.worker_threads(workers);
    }
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(measure::run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("bench failed: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
