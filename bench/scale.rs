//! Scale on our broker: what each connected client and each queue costs the broker, what 256 calls in flight
//! spread over 10,000 connected clients give against the same calls from one client, and how calls/s and p99
//! grow with the number of workers, from 1 to 16.
//!
//! ```text
//! cargo build --release -p mqrpc-bench
//! ./target/release/scale [--clients 10000] [--queues 10000] [--calls 50000]
//! ```
//!
//! Our broker runs as a child process (this program with `--role broker`, a single-threaded runtime as
//! `rpc-broker serve` runs it, its connection limit raised to fit), so that its resident set and CPU time are
//! its own; the clients and workers are this process. Every row is measured in the same run, the baselines
//! (one client; one worker) included: compare within a run. Each client is a connection and its inbox (a
//! `Client`), which heartbeats every second as every client does.

mod child;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rpc_broker::Remote;
use rpc_core::{Client, QueueOptions, Server, Transport};

/// Calls in flight at once in every throughput row.
const IN_FLIGHT: usize = 256;
/// The worker counts of the worker rows.
const WORKERS: [usize; 5] = [1, 2, 4, 8, 16];
/// How long the idle broker is watched for its CPU time with every client connected.
const IDLE: Duration = Duration::from_secs(5);

#[rpc_core::service]
trait Adder {
    /// `a + b`.
    async fn add(&self, a: i64, b: i64) -> i64;
}

struct Add;

impl Adder for Add {
    async fn add(&self, a: i64, b: i64) -> i64 {
        a + b
    }
}

struct Settings {
    clients: usize,
    queues: usize,
    calls: usize,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let broker = args.first().map(String::as_str) == Some("--role");
    let mut builder = if broker {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        if broker {
            return child::broker_role(100_000).await;
        }
        let mut settings = Settings { clients: 10_000, queues: 10_000, calls: 50_000 };
        let mut rest = args.iter();
        while let Some(arg) = rest.next() {
            let value = rest.next().ok_or(format!("{arg} needs a value"))?;
            let number: usize = value.parse().map_err(|_| format!("{arg} takes a number"))?;
            match arg.as_str() {
                "--clients" => settings.clients = number.max(1),
                "--queues" => settings.queues = number,
                "--calls" => settings.calls = number.max(IN_FLIGHT),
                other => return Err(format!("unknown argument `{other}`")),
            }
        }
        run(&settings).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("scale: {error}");
            ExitCode::FAILURE
        }
    }
}

/// A process's resident set in KiB.
fn rss_kib(pid: u32) -> Result<f64, String> {
    child::rss_kib(pid).ok_or_else(|| format!("cannot read the resident set of process {pid}"))
}

/// A process's CPU time (user and system), from `/proc/<pid>/stat`.
fn cpu_time(pid: u32) -> Result<Duration, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|error| error.to_string())?;
    // The fields after the command's closing parenthesis; utime and stime are the 14th and 15th of the line.
    let after = stat.rsplit_once(')').map(|(_, after)| after).ok_or("no command in stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |index: usize| fields.get(index).and_then(|field| field.parse::<u64>().ok()).ok_or("short stat");
    // Clock ticks are 100 a second on Linux.
    Ok(Duration::from_millis((ticks(11)? + ticks(12)?) * 10))
}

/// Calls/s and latencies of `calls` calls, `IN_FLIGHT` at a time, the n-th from `clients[n % len]`.
struct Throughput {
    per_second: f64,
    p50: Duration,
    p99: Duration,
}

async fn throughput(clients: &[Client], calls: usize) -> Result<Throughput, String> {
    let started = Instant::now();
    let outcomes: Vec<Result<Duration, String>> = futures::stream::iter(0..calls)
        .map(|n| {
            let client = clients[n % clients.len()].clone();
            async move {
                let sent = Instant::now();
                let a = i64::try_from(n).unwrap_or(0);
                match AdderClient::new(&client).add(a, 1).timeout(Duration::from_secs(30)).await {
                    Ok(sum) if sum == a + 1 => Ok(sent.elapsed()),
                    Ok(sum) => Err(format!("call {n} answered {sum}")),
                    Err(error) => Err(format!("call {n}: {error}")),
                }
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    let took = started.elapsed();
    let mut latencies = outcomes.into_iter().collect::<Result<Vec<_>, _>>()?;
    latencies.sort_unstable();
    let at = |fraction: f64| latencies[((latencies.len() as f64 * fraction) as usize).min(latencies.len() - 1)];
    Ok(Throughput { per_second: calls as f64 / took.as_secs_f64(), p50: at(0.5), p99: at(0.99) })
}

/// [`throughput`], with the CPU time per call of the broker (process `pid`) and of this process.
async fn measured(pid: u32, clients: &[Client], calls: usize) -> Result<(Throughput, (f64, f64)), String> {
    let (broker, this) = (cpu_time(pid)?, cpu_time(std::process::id())?);
    let measured = throughput(clients, calls).await?;
    let per_call = |cpu: Duration| cpu.as_secs_f64() * 1e6 / calls as f64;
    let broker = per_call(cpu_time(pid)?.saturating_sub(broker));
    let this = per_call(cpu_time(std::process::id())?.saturating_sub(this));
    Ok((measured, (broker, this)))
}

/// Starts `count` workers of `Adder` in `namespace`, each on a connection of its own.
async fn workers(url: &str, namespace: &str, count: usize) -> Result<Vec<rpc_core::ServerHandle>, String> {
    let mut handles = Vec::with_capacity(count);
    for _ in 0..count {
        let transport = Remote::connect(url).await.map_err(|error| format!("a worker connects: {error}"))?;
        let handle = Server::new(transport)
            .namespace(namespace)
            .serve(AdderServer::new(Add))
            .await
            .map_err(|error| format!("a worker serves: {error}"))?;
        handles.push(handle);
    }
    Ok(handles)
}

async fn stop(handles: Vec<rpc_core::ServerHandle>) {
    for handle in handles {
        handle.shutdown(Duration::from_secs(5)).await;
    }
}

fn micros(duration: Duration) -> u128 {
    duration.as_micros()
}

async fn run(settings: &Settings) -> Result<(), String> {
    let (_child, url, pid) = child::start_broker().await?;
    let namespace = format!("scale{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    println!("mqrpc scale, {}", std::env::var("MQRPC_BENCH_MACHINE").unwrap_or_else(|_| machine()));
    println!("our broker: a child process, one thread; clients and workers: this process\n");

    // The baseline: one worker and one client, on an otherwise empty broker.
    let empty = rss_kib(pid)?;
    let baseline_workers = workers(&url, &namespace, 1).await?;
    let one = vec![Client::builder(connect(&url).await?).namespace(&namespace).connect().await.map_err(text)?];
    let (baseline, baseline_cpu) = measured(pid, &one, settings.calls).await?;

    // Every client connected, each with its inbox.
    let before_clients = rss_kib(pid)?;
    let started = Instant::now();
    let mut clients = Vec::with_capacity(settings.clients);
    for chunk in 0..settings.clients.div_ceil(256) {
        let count = (settings.clients - chunk * 256).min(256);
        let connected = futures::future::join_all((0..count).map(|_| async {
            Client::builder(connect(&url).await?).namespace(&namespace).connect().await.map_err(text)
        }))
        .await;
        for client in connected {
            clients.push(client?);
        }
    }
    let connecting = started.elapsed();
    // Settled: their handshakes, inboxes and first heartbeats done.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_clients = rss_kib(pid)?;
    let idle_cpu = {
        let before = cpu_time(pid)?;
        tokio::time::sleep(IDLE).await;
        cpu_time(pid)?.saturating_sub(before)
    };

    // Every queue declared, empty.
    let deployment = connect(&url).await?;
    for n in 0..settings.queues {
        deployment.declare_queue(&format!("{namespace}.idle.q{n}"), &QueueOptions::new()).await.map_err(text)?;
    }
    let after_queues = rss_kib(pid)?;
    let (spread, spread_cpu) = measured(pid, &clients, settings.calls).await?;
    let after_calls = rss_kib(pid)?;
    stop(baseline_workers).await;

    println!("## Connected clients and queues\n");
    println!("| what | broker RSS (MiB) | per item |");
    println!("|---|---|---|");
    let per = |from: f64, to: f64, count: usize| {
        if count == 0 { "-".to_owned() } else { format!("{:.1} KiB", (to - from) / count as f64) }
    };
    println!("| empty broker | {:.1} | |", empty / 1024.0);
    println!("| one worker and one client, after {} calls | {:.1} | |", settings.calls, before_clients / 1024.0);
    println!(
        "| {} more clients connected (each a connection and its inbox; {:.1} s to connect them) | {:.1} | {} a client |",
        settings.clients,
        connecting.as_secs_f64(),
        after_clients / 1024.0,
        per(before_clients, after_clients, settings.clients)
    );
    println!(
        "| {} empty queues declared | {:.1} | {} a queue |",
        settings.queues,
        after_queues / 1024.0,
        per(after_clients, after_queues, settings.queues)
    );
    println!("| after {} calls spread over the clients | {:.1} | |", settings.calls, after_calls / 1024.0);
    println!(
        "\nThe idle broker with every client connected: {:.0} ms of CPU in {} s ({:.1}% of a core: the clients' \
         heartbeats).\n",
        idle_cpu.as_secs_f64() * 1_000.0,
        IDLE.as_secs(),
        idle_cpu.as_secs_f64() * 100.0 / IDLE.as_secs_f64()
    );

    println!("## {IN_FLIGHT} calls in flight, one worker\n");
    println!("| callers | calls/s | ratio | p50 µs | p99 µs | CPU µs a call: broker / clients and worker |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| one client, the service's queue alone on the broker | {:.0} | - | {} | {} | {:.1} / {:.1} |",
        baseline.per_second,
        micros(baseline.p50),
        micros(baseline.p99),
        baseline_cpu.0,
        baseline_cpu.1
    );
    println!(
        "| {} clients in turn, {} more queues on the broker | {:.0} | {:.2}x | {} | {} | {:.1} / {:.1} |",
        settings.clients,
        settings.queues,
        spread.per_second,
        spread.per_second / baseline.per_second,
        micros(spread.p50),
        micros(spread.p99),
        spread_cpu.0,
        spread_cpu.1
    );
    for client in &clients {
        client.close();
    }
    drop(clients);
    for n in 0..settings.queues {
        deployment.delete_queue(&format!("{namespace}.idle.q{n}")).await.map_err(text)?;
    }

    println!("\n## {IN_FLIGHT} calls in flight from one client, 1 to {} workers\n", WORKERS[WORKERS.len() - 1]);
    println!("| workers | calls/s | ratio | p50 µs | p99 µs | broker CPU µs a call |");
    println!("|---|---|---|---|---|---|");
    let mut first = None;
    for count in WORKERS {
        let handles = workers(&url, &namespace, count).await?;
        let cpu = cpu_time(pid)?;
        let measured = throughput(&one, settings.calls).await?;
        let broker_cpu = cpu_time(pid)?.saturating_sub(cpu);
        stop(handles).await;
        let base = *first.get_or_insert(measured.per_second);
        println!(
            "| {count} | {:.0} | {:.2}x | {} | {} | {:.1} |",
            measured.per_second,
            measured.per_second / base,
            micros(measured.p50),
            micros(measured.p99),
            broker_cpu.as_secs_f64() * 1e6 / settings.calls as f64
        );
    }
    Ok(())
}

async fn connect(url: &str) -> Result<Remote, String> {
    Remote::connect(url).await.map_err(text)
}

fn text(error: rpc_core::Error) -> String {
    error.to_string()
}

/// The processor's model and the number of cores, from `/proc/cpuinfo`.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name").and_then(|rest| rest.split_once(':')))
        .map_or("unknown processor", |(_, model)| model.trim());
    format!("{model}, {} cores", std::thread::available_parallelism().map_or(0, std::num::NonZero::get))
}
