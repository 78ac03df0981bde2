//! The soak: a producer ten times faster than its workers, for minutes, against a bounded queue, on our broker
//! and on RabbitMQ. It shows what flow control promises: every call is answered, or refused at once with
//! `QueueFull`; none is lost silently (no call ends by its timeout) and the broker's memory stays flat.
//!
//! ```text
//! cargo build --release -p mqrpc-bench
//! ./target/release/soak [--seconds 300] [--only own-broker|rabbitmq] [--amqp amqp://guest:guest@127.0.0.1:5672/%2f]
//! ```
//!
//! The worker runs `WORKER_SLOTS` calls at once, each taking `SERVICE_TIME` (a capacity of 200 calls/s); the
//! producer offers ten times that, paced by a 1 ms ticker, and each call waits at most `CALL_TIMEOUT`. The
//! queue holds at most `MAX_LEN` requests. Every ten seconds a row: what was offered, answered and refused in
//! those ten seconds, the queue's depth, and the resident memory of the broker and of this process (the
//! client and the worker, whose dedup store keeps each answered call's outcome for `DEDUP_WINDOW`). Our broker
//! runs as a child process (this program with `--role broker`); RabbitMQ's memory is its `beam.smp` process's.

mod child;

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rpc_broker::Remote;
use rpc_broker::adapter::amqp::Amqp;
use rpc_core::dedup::MemoryDedup;
use rpc_core::{Client, Error, QueueOptions, Server, Transport};

/// The worker's handlers at once.
const WORKER_SLOTS: usize = 2;
/// How long one call takes in the worker.
const SERVICE_TIME: Duration = Duration::from_millis(10);
/// The producer's offered rate over the worker's capacity.
const OVERLOAD: u64 = 10;
/// The queue's maximum length.
const MAX_LEN: usize = 500;
/// How long a call waits for its answer; a call in the queue waits at most `MAX_LEN` / capacity (2.5 s).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Calls the producer has in flight at most; past it, it counts the calls it held back.
const MAX_IN_FLIGHT: usize = 20_000;
/// How long the worker's dedup store keeps an outcome.
const DEDUP_WINDOW: Duration = Duration::from_secs(60);
/// How often a row is printed.
const ROW: Duration = Duration::from_secs(10);

#[rpc_core::service]
trait Slow {
    /// Takes `SERVICE_TIME`; returns `n + 1`.
    async fn work(&self, n: u64) -> u64;
}

struct Worker {
    ran: Arc<AtomicU64>,
}

impl Slow for Worker {
    async fn work(&self, n: u64) -> u64 {
        tokio::time::sleep(SERVICE_TIME).await;
        self.ran.fetch_add(1, Ordering::Relaxed);
        n + 1
    }
}

/// How calls ended.
#[derive(Default)]
struct Tally {
    offered: AtomicU64,
    answered: AtomicU64,
    refused: AtomicU64,
    timed_out: AtomicU64,
    wrong: AtomicU64,
    other: AtomicU64,
    held_back: AtomicU64,
}

impl Tally {
    fn snapshot(&self) -> [u64; 7] {
        [
            self.offered.load(Ordering::Relaxed),
            self.answered.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
            self.timed_out.load(Ordering::Relaxed),
            self.wrong.load(Ordering::Relaxed),
            self.other.load(Ordering::Relaxed),
            self.held_back.load(Ordering::Relaxed),
        ]
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        if args.first().map(String::as_str) == Some("--role") {
            return child::broker_role(rpc_broker::server::ServerConfig::default().max_connections).await;
        }
        let mut seconds = 300u64;
        let mut only: Option<String> = None;
        let mut amqp =
            std::env::var("MQRPC_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
        let mut rest = args.iter();
        while let Some(arg) = rest.next() {
            let mut value = || rest.next().cloned().ok_or(format!("{arg} needs a value"));
            match arg.as_str() {
                "--seconds" => seconds = value()?.parse().map_err(|_| "--seconds takes a number".to_owned())?,
                "--only" => only = Some(value()?),
                "--amqp" => amqp = value()?,
                other => return Err(format!("unknown argument `{other}`")),
            }
        }
        let duration = Duration::from_secs(seconds);
        let mut failed = false;
        if only.as_deref().is_none_or(|only| only == "own-broker") {
            let (child, url, pid) = child::start_broker().await?;
            let transport: Arc<dyn Transport> =
                Arc::new(Remote::connect(&url).await.map_err(|error| error.to_string())?);
            failed |= !soak("own-broker", transport, Some(pid), duration).await?;
            drop(child);
        }
        if only.as_deref().is_none_or(|only| only == "rabbitmq") {
            let transport: Arc<dyn Transport> =
                Arc::new(Amqp::connect(&amqp).await.map_err(|error| format!("RabbitMQ: {error}"))?);
            failed |= !soak("rabbitmq", transport, beam_pid(), duration).await?;
        }
        if failed { Err("calls were lost".to_owned()) } else { Ok(()) }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("soak: {error}");
            ExitCode::FAILURE
        }
    }
}

/// The pid of RabbitMQ's Erlang VM on this machine, if one runs.
fn beam_pid() -> Option<u32> {
    let output = std::process::Command::new("pgrep").args(["-o", "beam.smp"]).output().ok()?;
    String::from_utf8_lossy(&output.stdout).trim().parse().ok()
}

/// A process's resident set in MiB.
fn rss_mib(pid: u32) -> Option<f64> {
    child::rss_kib(pid).map(|kib| kib / 1024.0)
}

fn mib(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |value| format!("{value:.1}"))
}

/// Runs the soak on `transport` for `duration`; `true` when no call was lost.
async fn soak(
    name: &str,
    transport: Arc<dyn Transport>,
    broker_pid: Option<u32>,
    duration: Duration,
) -> Result<bool, String> {
    let namespace = format!("soak{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let queue = rpc_core::naming::service_queue(Some(&namespace), "Slow");
    let ran = Arc::new(AtomicU64::new(0));
    let server = Server::new(Arc::clone(&transport))
        .namespace(&namespace)
        .concurrency(WORKER_SLOTS)
        .prefetch(u32::try_from(WORKER_SLOTS).unwrap_or(1))
        .queue_options(QueueOptions::new().max_len(MAX_LEN))
        // Every call carries an idempotency key, and the store keeps each answered call's outcome for its
        // window: a minute here (the default, ten), so that the worker's memory levels off within the run.
        .dedup(MemoryDedup::new(65_536, DEDUP_WINDOW))
        .serve(SlowServer::new(Worker { ran: Arc::clone(&ran) }))
        .await
        .map_err(|error| format!("{name}: the worker: {error}"))?;
    let client = Client::builder(Arc::clone(&transport))
        .namespace(&namespace)
        .connect()
        .await
        .map_err(|error| format!("{name}: the client: {error}"))?;
    let capacity =
        u64::try_from(WORKER_SLOTS).unwrap_or(1) * 1_000 / u64::try_from(SERVICE_TIME.as_millis()).unwrap_or(1);
    let rate = capacity * OVERLOAD;
    println!(
        "\n## {name}: {} s, worker capacity {capacity} calls/s, offered {rate} calls/s, queue max_len {MAX_LEN}\n",
        duration.as_secs()
    );
    println!(
        "| t (s) | offered | answered | refused (QueueFull) | lost (timeout) | other | queue depth | broker RSS (MiB) | client+worker RSS (MiB) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let tally = Arc::new(Tally::default());
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let started = Instant::now();
    let producer = {
        let (tally, slots, client) = (Arc::clone(&tally), Arc::clone(&slots), client.clone());
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_millis(1));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut sent = 0u64;
            while started.elapsed() < duration {
                ticker.tick().await;
                // As many calls as the rate asks for by now: the pace holds when a tick comes late.
                let due = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX) * rate / 1_000_000;
                while sent < due {
                    sent += 1;
                    tally.offered.fetch_add(1, Ordering::Relaxed);
                    let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                        tally.held_back.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    let (tally, client, n) = (Arc::clone(&tally), client.clone(), sent);
                    tokio::spawn(async move {
                        let outcome = SlowClient::new(&client).work(n).timeout(CALL_TIMEOUT).await;
                        let counter = match outcome {
                            Ok(answer) if answer == n + 1 => &tally.answered,
                            Ok(_) => &tally.wrong,
                            Err(Error::QueueFull(_)) => &tally.refused,
                            Err(Error::Timeout(_)) => {
                                let sent_at = started.elapsed().saturating_sub(CALL_TIMEOUT);
                                eprintln!("call {n}, sent at about {:.1} s, timed out", sent_at.as_secs_f64());
                                &tally.timed_out
                            }
                            Err(error) => {
                                tracing::warn!(%error, "a call failed");
                                &tally.other
                            }
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        drop(slot);
                    });
                }
            }
        })
    };
    let own_pid = std::process::id();
    let mut last = tally.snapshot();
    let mut samples: BTreeMap<u64, (Option<f64>, Option<f64>)> = BTreeMap::new();
    let mut next_row = started + ROW;
    loop {
        tokio::time::sleep_until(next_row.into()).await;
        let now = tally.snapshot();
        let depth =
            transport.queue_stats(&queue).await.map_or_else(|_| "-".to_owned(), |stats| stats.ready.to_string());
        let (broker, own) = (broker_pid.and_then(rss_mib), rss_mib(own_pid));
        let t = next_row.duration_since(started).as_secs();
        samples.insert(t, (broker, own));
        println!(
            "| {t} | {} | {} | {} | {} | {} | {depth} | {} | {} |",
            now[0] - last[0],
            now[1] - last[1],
            now[2] - last[2],
            now[3] - last[3],
            now[4] - last[4] + now[5] - last[5] + now[6] - last[6],
            mib(broker),
            mib(own)
        );
        last = now;
        next_row += ROW;
        if next_row.duration_since(started) > duration {
            break;
        }
    }
    producer.await.map_err(|error| error.to_string())?;
    // Every call resolves by its timeout: wait for the last ones.
    let settle = Instant::now();
    while slots.available_permits() < MAX_IN_FLIGHT && settle.elapsed() < CALL_TIMEOUT + Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let [offered, answered, refused, timed_out, wrong, other, held_back] = tally.snapshot();
    let unresolved = offered - answered - refused - timed_out - wrong - other - held_back;
    let ran = ran.load(Ordering::Relaxed);
    let late = client.stats().late_replies;
    let first = samples.range(60..).next().or_else(|| samples.iter().next()).map(|(_, sample)| *sample);
    let end = samples.values().next_back().copied();
    println!(
        "\n{name}: offered {offered}, answered {answered} ({:.1}%), refused with QueueFull {refused}, lost (timed \
         out) {timed_out}, wrong answers {wrong}, other errors {other}, held back by the producer {held_back}, \
         unresolved {unresolved}; the handler ran {ran} times; replies that found no call waiting {late}",
        100.0 * answered as f64 / offered.max(1) as f64
    );
    if let (Some((broker_first, own_first)), Some((broker_end, own_end))) = (first, end) {
        println!(
            "{name}: broker RSS from the first minute's end to the last row {} -> {} MiB; client+worker {} -> {} MiB",
            mib(broker_first),
            mib(broker_end),
            mib(own_first),
            mib(own_end)
        );
    }
    server.shutdown(Duration::from_secs(5)).await;
    let _ = transport.delete_queue(&queue).await;
    let _ = transport.delete_queue(&rpc_core::naming::dead_letter_queue(&queue)).await;
    Ok(timed_out == 0 && wrong == 0 && other == 0 && unresolved == 0 && held_back == 0)
}
