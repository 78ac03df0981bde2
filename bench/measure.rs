//! Running the variants: the processes they need, the latency and throughput loops, the CPU accounting.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use rpc_core::{Server, Transport};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::Config;
use crate::report::{self, Sample};
use crate::roles::{CONCURRENCY, PREFETCH};
use crate::variants::{self, Adder, BenchServer, Caller, Variant};

/// Throughput is measured at each of these numbers of calls in flight.
pub(crate) const INFLIGHT: [usize; 2] = [64, 256];

/// A child process playing a role; killed when dropped.
#[derive(Debug)]
pub(crate) struct Process {
    _child: tokio::process::Child,
    pid: u32,
}

impl Process {
    /// Starts `bench --role <args>` and waits for its `ready` line, whose detail it returns.
    pub(crate) async fn start(args: &[&str]) -> Result<(Process, String), String> {
        let exe = std::env::current_exe().map_err(|error| format!("cannot find this program: {error}"))?;
        let mut child = tokio::process::Command::new(exe)
            .arg("--role")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|error| format!("cannot start role {args:?}: {error}"))?;
        let pid = child.id().ok_or("the child exited at once")?;
        let stdout = child.stdout.take().ok_or("the child has no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let wait = async {
            loop {
                match lines.next_line().await {
                    Ok(Some(line)) => {
                        if let Some(detail) = line.strip_prefix("ready ") {
                            return Ok(detail.to_owned());
                        }
                    }
                    Ok(None) => return Err(format!("role {args:?} exited before it was ready")),
                    Err(error) => return Err(format!("role {args:?}: {error}")),
                }
            }
        };
        let detail = tokio::time::timeout(Duration::from_secs(120), wait)
            .await
            .map_err(|_| format!("role {args:?} was not ready within 120 s"))??;
        Ok((Process { _child: child, pid }, detail))
    }

    /// Starts the own broker; returns it and its URL.
    pub(crate) async fn broker() -> Result<(Process, String), String> {
        let (process, url, _) = Process::durable_broker(None).await?;
        Ok((process, url))
    }

    /// Starts the own broker with its durable queues in `dir`, if given; returns it, its URL and the messages it
    /// read back.
    pub(crate) async fn durable_broker(dir: Option<&std::path::Path>) -> Result<(Process, String, usize), String> {
        let dir = dir.map(|dir| dir.display().to_string());
        let args: Vec<&str> = std::iter::once("broker").chain(dir.as_deref()).collect();
        let (process, detail) = Process::start(&args).await?;
        let (url, recovered) = detail.split_once(' ').ok_or_else(|| format!("the broker said `{detail}`"))?;
        let recovered = recovered.parse().map_err(|_| format!("the broker said `{detail}`"))?;
        Ok((process, url.to_owned(), recovered))
    }

    /// Its process id.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Kills it (SIGKILL) and waits until it is gone.
    pub(crate) async fn kill(mut self) -> Result<(), String> {
        self._child.kill().await.map_err(|error| format!("cannot kill role {}: {error}", self.pid))
    }
}

/// User plus system CPU time of `pid`, in clock ticks of 10 ms (`USER_HZ`), from `/proc/<pid>/stat`.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces: the fields that matter come after its last `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Microseconds per `USER_HZ` tick.
const TICK_US: f64 = 10_000.0;

/// Process ids whose command name is one of `names`.
fn pids_named(names: &[&str]) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| names.contains(&comm.trim_end()))
        })
        .collect()
}

/// Process ids holding a TCP socket that listens on `port`, from `/proc/net/tcp{,6}` and `/proc/<pid>/fd`.
fn pids_listening(port: u16) -> Vec<u32> {
    let mut sockets = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(table) = std::fs::read_to_string(table) else { continue };
        for line in table.lines().skip(1) {
            // `sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode`
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields.get(1).and_then(|local| u16::from_str_radix(local.rsplit(':').next()?, 16).ok());
            if let (Some(local_port), Some(&"0A"), Some(inode)) = (local_port, fields.get(3), fields.get(9))
                && local_port == port
            {
                sockets.push(format!("socket:[{inode}]"));
            }
        }
    }
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
                fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
                    .any(|link| link.to_str().is_some_and(|link| sockets.iter().any(|socket| socket == link)))
            })
        })
        .collect()
}

/// The port of the first broker of a Kafka URL (`[kafka://]host:port[,...]`).
fn kafka_port(url: &str) -> Option<u16> {
    let brokers = url.strip_prefix("kafka://").unwrap_or(url);
    brokers.split(',').next()?.rsplit(':').next()?.parse().ok()
}

/// The port of a STOMP URL (`stomp://[login:passcode@]host[:port][/vhost]`).
fn stomp_port(url: &str) -> Option<u16> {
    rpc_broker::adapter::stomp::connection::StompUrl::parse(url).ok().map(|url| url.port)
}

/// Which part of a variant a process plays, for the CPU split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Part {
    /// This process: the callers (and, in-process variants, everything).
    Client = 0,
    /// The process that answers.
    Responder = 1,
    /// The broker.
    Broker = 2,
}

/// The CPU time of a set of processes, by part.
#[derive(Clone, Debug)]
struct Cpu {
    pids: Vec<(Part, u32)>,
}

impl Cpu {
    /// Ticks so far, by part.
    fn read(&self) -> [u64; 3] {
        let mut ticks = [0; 3];
        for &(part, pid) in &self.pids {
            ticks[part as usize] += cpu_ticks(pid).unwrap_or(0);
        }
        ticks
    }

    /// Microseconds spent since `before`, by part.
    fn since(&self, before: [u64; 3]) -> [f64; 3] {
        let now = self.read();
        std::array::from_fn(|part| now[part].saturating_sub(before[part]) as f64 * TICK_US)
    }
}

/// Runs every variant for `config.rounds` rounds, then memory, then prints and writes the report.
pub(crate) async fn run(config: Config) -> Result<(), String> {
    let steps = config.rounds * config.variants.len() * (1 + INFLIGHT.len()) + usize::from(config.memory);
    let progress = ProgressBar::new(steps as u64);
    progress.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} {msg}")
            .map_err(|error| error.to_string())?
            .progress_chars("=> "),
    );
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut failures = Vec::new();
    for round in 0..config.rounds {
        // Alternate the order from round to round, so that no variant always runs on a warm or a cold machine.
        let mut order = config.variants.clone();
        let shift = round % order.len().max(1);
        order.rotate_left(shift);
        if round % 2 == 1 {
            order.reverse();
        }
        for variant in order {
            progress.set_message(format!("round {}/{}: {}", round + 1, config.rounds, variant.name()));
            // The machine as the variant finds it: how fast its cores hand each other a cache line now.
            let round_trip = tokio::task::spawn_blocking(core_round_trip).await.ok().flatten();
            match run_variant(variant, &config, &progress).await {
                Ok(measured) => samples
                    .extend(measured.into_iter().map(|sample| sample.in_round(round).with_core_round_trip(round_trip))),
                Err(error) => {
                    progress.println(format!("{}: {error}", variant.name()));
                    failures.push(format!("{} (round {}): {error}", variant.name(), round + 1));
                }
            }
        }
    }
    let memory = if config.memory {
        progress.set_message("memory: 1,000,000 queued messages, then 100,000 timed-out calls");
        let measured =
            crate::memory::measure(config.queued_messages, config.timed_out_calls, config.restart_records).await;
        progress.inc(1);
        match measured {
            Ok(memory) => Some(memory),
            Err(error) => {
                failures.push(format!("memory: {error}"));
                None
            }
        }
    } else {
        None
    };
    progress.finish_and_clear();
    report::report(&config, &samples, memory.as_ref(), &failures, started.elapsed())?;
    if failures.is_empty() { Ok(()) } else { Err(format!("{} measurement(s) failed", failures.len())) }
}

/// The median time, over a few tries, for two threads pinned to the first two cores to hand one cache line to
/// each other and back: what every hand-off between threads or processes (a wake-up, a channel, a lock, a
/// socket's buffer) pays at least on those cores now. `None` with one core, or where threads cannot be pinned.
///
/// On a virtual machine it moves with where the host puts the virtual CPUs: two that share a cache hand a line
/// over several times faster than two that do not, and every figure with threads or processes handing work to
/// each other moves with it.
pub(crate) fn core_round_trip() -> Option<Duration> {
    /// Round trips per try, and the time a try may take at most.
    const TRIPS: u32 = 20_000;
    const LIMIT: Duration = Duration::from_millis(100);
    /// The line, alone in its cache line: a neighbour written by either thread would slow the hand-off down.
    #[repr(align(128))]
    struct Line(AtomicU64);

    let cores = core_affinity::get_core_ids().filter(|cores| cores.len() >= 2)?;
    let (asker_core, answerer_core) = (cores[0], cores[1]);
    let mut tries: Vec<Duration> = (0..5)
        .filter_map(|_| {
            // Odd: the answerer's turn; even: the asker's; `u64::MAX`: stop.
            let line = Line(AtomicU64::new(0));
            let line = &line.0;
            std::thread::scope(|scope| {
                let answerer = scope.spawn(move || {
                    if !core_affinity::set_for_current(answerer_core) {
                        return;
                    }
                    let mut seen = 0;
                    loop {
                        match line.load(Ordering::Acquire) {
                            u64::MAX => return,
                            value if value != seen && value % 2 == 1 => {
                                seen = value + 1;
                                line.store(seen, Ordering::Release);
                            }
                            _ => std::hint::spin_loop(),
                        }
                    }
                });
                // Fresh threads for both ends: a pinned thread of the runtime's pool would stay pinned.
                let asker = scope.spawn(move || {
                    if !core_affinity::set_for_current(asker_core) {
                        return None;
                    }
                    let started = Instant::now();
                    for trip in 0..u64::from(TRIPS) {
                        let asked = 2 * trip + 1;
                        line.store(asked, Ordering::Release);
                        let mut spins = 0_u32;
                        while line.load(Ordering::Acquire) != asked + 1 {
                            std::hint::spin_loop();
                            spins = spins.wrapping_add(1);
                            if spins.is_multiple_of(4096) && started.elapsed() > LIMIT {
                                return None;
                            }
                        }
                    }
                    Some(started.elapsed() / TRIPS)
                });
                let took = asker.join().ok().flatten();
                line.store(u64::MAX, Ordering::Release);
                let _ = answerer.join();
                took
            })
        })
        .collect();
    tries.sort_unstable();
    tries.get(tries.len() / 2).copied()
}

/// Sets up `variant`, measures it and tears it down.
async fn run_variant(variant: Variant, config: &Config, progress: &ProgressBar) -> Result<Vec<Sample>, String> {
    let mut pids = vec![(Part::Client, std::process::id())];
    let mut brokers = pids_named(variant.broker_processes());
    // Tests start private tansu brokers beside the one the bench uses, and `java` names any JVM: only the one
    // on the broker's port counts.
    let port = match variant {
        Variant::KafkaRaw | Variant::Kafka => Some(kafka_port(&config.kafka_url)),
        Variant::ActivemqRaw | Variant::Activemq => Some(stomp_port(&config.stomp_url)),
        _ => None,
    };
    if let Some(port) = port {
        let listening = port.map(pids_listening).unwrap_or_default();
        brokers.retain(|pid| listening.contains(pid));
    }
    pids.extend(brokers.into_iter().map(|pid| (Part::Broker, pid)));
    let mut processes = Vec::new();
    let mut cleanup = None;
    let start = |args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Process::start(&args).await
    };
    let responder = |address: &str| vec!["responder".to_owned(), variant.name().to_owned(), address.to_owned()];
    let samples = match variant {
        Variant::InprocFloor => measure(variant, Arc::new(variants::Floor::start()), &pids, config, progress).await,
        Variant::Embedded | Variant::EmbeddedOtel => {
            crate::tracing::record(variant == Variant::EmbeddedOtel)?;
            let transport = rpc_broker::Embedded::new();
            let _server = Server::new(transport.clone())
                .concurrency(CONCURRENCY)
                .prefetch(PREFETCH)
                .serve(BenchServer::new(Adder))
                .await
                .map_err(|error| error.to_string())?;
            let caller = variants::Mqrpc::connect(transport).await?;
            let samples = measure(variant, Arc::new(caller), &pids, config, progress).await;
            crate::tracing::record(false)?;
            samples
        }
        Variant::OwnBroker | Variant::OwnDurable => {
            let dir = data_dir();
            let durable = (variant == Variant::OwnDurable).then_some(dir.as_path());
            let (broker, url, _) = Process::durable_broker(durable).await?;
            cleanup = Some(RemoveOnDrop(dir));
            pids.push((Part::Broker, broker.pid()));
            processes.push(broker);
            let (worker, _) = start(responder(&url)).await?;
            pids.push((Part::Responder, worker.pid()));
            processes.push(worker);
            let transport = rpc_broker::Remote::connect(&url).await.map_err(|error| error.to_string())?;
            let caller = variants::Mqrpc::connect(transport).await?;
            measure(variant, Arc::new(caller), &pids, config, progress).await
        }
        Variant::NatsRaw | Variant::Nats => {
            let (worker, _) = start(responder(&config.nats_url)).await?;
            pids.push((Part::Responder, worker.pid()));
            processes.push(worker);
            if variant == Variant::NatsRaw {
                let caller = variants::NatsRaw::connect(&config.nats_url).await?;
                measure(variant, Arc::new(caller), &pids, config, progress).await
            } else {
                let transport = rpc_broker::adapter::nats::Nats::connect(&config.nats_url)
                    .await
                    .map_err(|error| error.to_string())?;
                let caller = variants::Mqrpc::connect(transport).await?;
                measure(variant, Arc::new(caller), &pids, config, progress).await
            }
        }
        Variant::RabbitmqRaw | Variant::Rabbitmq => {
            let (worker, _) = start(responder(&config.amqp_url)).await?;
            pids.push((Part::Responder, worker.pid()));
            processes.push(worker);
            if variant == Variant::RabbitmqRaw {
                let caller = variants::RabbitRaw::connect(&config.amqp_url).await?;
                measure(variant, Arc::new(caller), &pids, config, progress).await
            } else {
                // Transient requests, as the raw variant sends them (the queue is durable all the same).
                let options = rpc_broker::adapter::amqp::AmqpOptions::new().persistent(false);
                let transport = rpc_broker::adapter::amqp::Amqp::connect_with(&config.amqp_url, options)
                    .await
                    .map_err(|error| error.to_string())?;
                let caller = variants::Mqrpc::connect(transport).await?;
                measure(variant, Arc::new(caller), &pids, config, progress).await
            }
        }
        Variant::KafkaRaw | Variant::Kafka => {
            let transport = if variant == Variant::Kafka {
                let transport =
                    rpc_broker::adapter::kafka::Kafka::connect_with(&config.kafka_url, variants::kafka_options())
                        .await
                        .map_err(|error| error.to_string())?;
                // A new service queue, as `kafka-raw`'s responder makes a new request topic: tansu reads a
                // partition by listing every batch it holds, so the queue's history would slow this run down.
                let queue = rpc_core::naming::service_queue(None, "Bench");
                transport.delete_queue(&queue).await.map_err(|error| error.to_string())?;
                Some(transport)
            } else {
                None
            };
            // The responder says it is ready once its consumer group has assigned it the request topic's
            // partitions (the adapter's `consume` returns then).
            let (worker, _) = start(responder(&config.kafka_url)).await?;
            pids.push((Part::Responder, worker.pid()));
            processes.push(worker);
            match transport {
                None => {
                    let caller = variants::KafkaRaw::connect(&config.kafka_url).await?;
                    measure(variant, Arc::new(caller), &pids, config, progress).await
                }
                Some(transport) => {
                    let caller = variants::Mqrpc::connect(transport).await?;
                    measure(variant, Arc::new(caller), &pids, config, progress).await
                }
            }
        }
        Variant::ActivemqRaw | Variant::Activemq => {
            let (worker, _) = start(responder(&config.stomp_url)).await?;
            pids.push((Part::Responder, worker.pid()));
            processes.push(worker);
            if variant == Variant::ActivemqRaw {
                let caller = variants::ActivemqRaw::connect(&config.stomp_url).await?;
                measure(variant, Arc::new(caller), &pids, config, progress).await
            } else {
                // The transport's defaults: requests `persistent:true` without a receipt, replies not persistent.
                let transport = rpc_broker::adapter::stomp::Stomp::connect(&config.stomp_url)
                    .await
                    .map_err(|error| error.to_string())?;
                let caller = variants::Mqrpc::connect(transport).await?;
                measure(variant, Arc::new(caller), &pids, config, progress).await
            }
        }
        Variant::RedisRaw | Variant::Redis => {
            let transport = if variant == Variant::Redis {
                let transport = rpc_broker::adapter::redis_streams::RedisStreams::connect(&config.redis_url)
                    .await
                    .map_err(|error| error.to_string())?;
                // A new service queue, as `redis-raw`'s responder makes a new request stream.
                let queue = rpc_core::naming::service_queue(None, "Bench");
                transport.delete_queue(&queue).await.map_err(|error| error.to_string())?;
                Some(transport)
            } else {
                None
            };
            let (worker, _) = start(responder(&config.redis_url)).await?;
            pids.push((Part::Responder, worker.pid()));
            processes.push(worker);
            match transport {
                None => {
                    let caller = variants::RedisRaw::connect(&config.redis_url).await?;
                    measure(variant, Arc::new(caller), &pids, config, progress).await
                }
                Some(transport) => {
                    let caller = variants::Mqrpc::connect(transport).await?;
                    measure(variant, Arc::new(caller), &pids, config, progress).await
                }
            }
        }
        Variant::Zeromq => {
            let (worker, endpoint) = start(responder("-")).await?;
            pids.push((Part::Responder, worker.pid()));
            processes.push(worker);
            let options = rpc_broker::adapter::zmq::ZmqOptions::new().peers([endpoint]);
            let transport = rpc_broker::adapter::zmq::Zmq::start(options).await.map_err(|error| error.to_string())?;
            let caller = variants::Mqrpc::connect(transport).await?;
            measure(variant, Arc::new(caller), &pids, config, progress).await
        }
        Variant::Tarpc => {
            let (server, address) = start(responder("-")).await?;
            pids.push((Part::Responder, server.pid()));
            processes.push(server);
            let caller = variants::Tarpc::connect(&address).await?;
            measure(variant, Arc::new(caller), &pids, config, progress).await
        }
    };
    drop(processes);
    // The broker's directory goes once the broker has.
    drop(cleanup);
    samples
}

/// A fresh directory for a broker's log.
pub(crate) fn data_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("mqrpc-bench-{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()))
}

/// Removes a directory when dropped.
pub(crate) struct RemoveOnDrop(pub(crate) std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Latency at one in flight, then throughput at each of [`INFLIGHT`].
async fn measure<C: Caller>(
    variant: Variant,
    caller: Arc<C>,
    pids: &[(Part, u32)],
    config: &Config,
    progress: &ProgressBar,
) -> Result<Vec<Sample>, String> {
    let cpu = Cpu { pids: pids.to_vec() };
    let mut samples = vec![latency(variant, &*caller, &cpu, config).await?];
    progress.inc(1);
    for inflight in INFLIGHT {
        samples.push(throughput(variant, Arc::clone(&caller), inflight, &cpu, config).await?);
        progress.inc(1);
    }
    Ok(samples)
}

/// `config.latency_calls` calls one after the other, after `config.warmup_calls`.
async fn latency<C: Caller>(variant: Variant, caller: &C, cpu: &Cpu, config: &Config) -> Result<Sample, String> {
    for n in 0..config.warmup_calls as i64 {
        let sum = caller.add(n, 1).await?;
        if sum != n + 1 {
            return Err(format!("add({n}, 1) returned {sum}"));
        }
    }
    let mut nanos = Vec::with_capacity(config.latency_calls);
    let mut errors = 0;
    let mut first_error = None;
    let ticks = cpu.read();
    let started = Instant::now();
    for n in 0..config.latency_calls as i64 {
        let call = Instant::now();
        let result = caller.add(n, 1).await;
        nanos.push(call.elapsed().as_nanos() as u64);
        if result != Ok(n + 1) {
            errors += 1;
            first_error.get_or_insert_with(|| failure(n, &result));
        }
    }
    let elapsed = started.elapsed();
    let cpu_us = cpu.since(ticks);
    Ok(Sample::new(variant, 1, nanos, config.latency_calls as u64, elapsed, cpu_us, errors)
        .with_first_error(first_error))
}

/// `inflight` callers in a loop: a warm-up, then a measured window.
async fn throughput<C: Caller>(
    variant: Variant,
    caller: Arc<C>,
    inflight: usize,
    cpu: &Cpu,
    config: &Config,
) -> Result<Sample, String> {
    const WARMUP: u8 = 0;
    const MEASURE: u8 = 1;
    const STOP: u8 = 2;
    let phase = Arc::new(AtomicU8::new(WARMUP));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None));
    let tasks: Vec<_> = (0..inflight)
        .map(|task| {
            let (caller, phase, done, errors) =
                (Arc::clone(&caller), Arc::clone(&phase), Arc::clone(&done), Arc::clone(&errors));
            let first_error = Arc::clone(&first_error);
            tokio::spawn(async move {
                let mut nanos = Vec::new();
                let mut n = task as i64;
                loop {
                    let began = phase.load(Ordering::Acquire);
                    if began == STOP {
                        break;
                    }
                    let call = Instant::now();
                    let result = caller.add(n, 1).await;
                    if began == MEASURE && phase.load(Ordering::Acquire) == MEASURE {
                        nanos.push(call.elapsed().as_nanos() as u64);
                    }
                    if result != Ok(n + 1) {
                        errors.fetch_add(1, Ordering::Relaxed);
                        if began == MEASURE
                            && let Ok(mut first) = first_error.lock()
                        {
                            first.get_or_insert_with(|| failure(n, &result));
                        }
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    n += inflight as i64;
                }
                nanos
            })
        })
        .collect();
    tokio::time::sleep(config.warmup).await;
    let (calls, ticks, errors_before) = (done.load(Ordering::Relaxed), cpu.read(), errors.load(Ordering::Relaxed));
    let started = Instant::now();
    phase.store(MEASURE, Ordering::Release);
    tokio::time::sleep(config.window).await;
    let calls = done.load(Ordering::Relaxed) - calls;
    let cpu_us = cpu.since(ticks);
    let elapsed = started.elapsed();
    let failed = errors.load(Ordering::Relaxed) - errors_before;
    phase.store(STOP, Ordering::Release);
    let mut nanos = Vec::new();
    for task in tasks {
        let joined = tokio::time::timeout(variants::CALL_TIMEOUT + Duration::from_secs(5), task)
            .await
            .map_err(|_| "a caller did not finish its last call".to_owned())?
            .map_err(|error| format!("a caller failed: {error}"))?;
        nanos.extend(joined);
    }
    let first_error = first_error.lock().ok().and_then(|mut first| first.take());
    Ok(Sample::new(variant, inflight, nanos, calls, elapsed, cpu_us, failed).with_first_error(first_error))
}

/// What the call `add(n, 1)` came to when it did not return `n + 1`.
fn failure(n: i64, result: &Result<i64, String>) -> String {
    match result {
        Ok(sum) => format!("add({n}, 1) returned {sum}"),
        Err(error) => error.clone(),
    }
}
