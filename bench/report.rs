//! The figures: medians across rounds, the table with ratios and targets, JSON lines and an SVG chart.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use crate::Config;
use crate::memory::MemoryReport;
use crate::variants::Variant;

/// One measurement of one variant at one number of calls in flight.
#[derive(Clone, Debug)]
pub(crate) struct Sample {
    /// Which variant.
    pub(crate) variant: Variant,
    /// Calls in flight: 1 is the latency run.
    pub(crate) inflight: usize,
    /// Latency percentiles in microseconds.
    pub(crate) p50_us: f64,
    /// See `p50_us`.
    pub(crate) p99_us: f64,
    /// See `p50_us`.
    pub(crate) p999_us: f64,
    /// Calls completed per second.
    pub(crate) calls_per_s: f64,
    /// CPU time of every process involved, per call.
    pub(crate) cpu_us_per_call: f64,
    /// The same, split: this process, the responder, the broker.
    pub(crate) cpu_split_us: [f64; 3],
    /// Calls that failed or returned a wrong sum.
    pub(crate) errors: u64,
    /// What the first of them came to.
    pub(crate) first_error: Option<String>,
    /// The round it was measured in, from 0 (0 for a median).
    pub(crate) round: usize,
    /// The cores' round trip measured just before its variant ran ([`core_round_trip`]), in nanoseconds; NaN
    /// when unknown.
    ///
    /// [`core_round_trip`]: crate::measure::core_round_trip
    pub(crate) core_round_trip_ns: f64,
}

impl Sample {
    /// A sample from the latencies of the calls (nanoseconds), how many completed in `elapsed`, and the CPU
    /// time they cost in microseconds.
    pub(crate) fn new(
        variant: Variant,
        inflight: usize,
        mut nanos: Vec<u64>,
        calls: u64,
        elapsed: Duration,
        cpu_us: [f64; 3],
        errors: u64,
    ) -> Sample {
        nanos.sort_unstable();
        let percentile = |p: f64| -> f64 {
            if nanos.is_empty() {
                return f64::NAN;
            }
            let rank = ((p * nanos.len() as f64).ceil() as usize).clamp(1, nanos.len());
            nanos[rank - 1] as f64 / 1_000.0
        };
        let calls_f = calls.max(1) as f64;
        Sample {
            variant,
            inflight,
            p50_us: percentile(0.50),
            p99_us: percentile(0.99),
            p999_us: percentile(0.999),
            calls_per_s: calls as f64 / elapsed.as_secs_f64().max(1e-9),
            cpu_us_per_call: cpu_us.iter().sum::<f64>() / calls_f,
            cpu_split_us: cpu_us.map(|us| us / calls_f),
            errors,
            first_error: None,
            round: 0,
            core_round_trip_ns: f64::NAN,
        }
    }

    /// The sample as measured in round `round`.
    pub(crate) fn in_round(mut self, round: usize) -> Sample {
        self.round = round;
        self
    }

    /// The sample with the cores' round trip measured before its variant ran.
    pub(crate) fn with_core_round_trip(mut self, round_trip: Option<Duration>) -> Sample {
        self.core_round_trip_ns = round_trip.map_or(f64::NAN, |round_trip| round_trip.as_nanos() as f64);
        self
    }

    /// The sample with what its first failed call came to.
    pub(crate) fn with_first_error(mut self, first_error: Option<String>) -> Sample {
        self.first_error = first_error;
        self
    }

    fn mode(&self) -> &'static str {
        if self.inflight == 1 { "latency" } else { "throughput" }
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|value| !value.is_nan());
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 { values[middle] } else { (values[middle - 1] + values[middle]) / 2.0 }
}

/// The median of every field across rounds, per variant and number in flight.
fn medians(samples: &[Sample]) -> BTreeMap<(Variant, usize), (Sample, usize)> {
    let mut groups: BTreeMap<(Variant, usize), Vec<&Sample>> = BTreeMap::new();
    for sample in samples {
        groups.entry((sample.variant, sample.inflight)).or_default().push(sample);
    }
    groups
        .into_iter()
        .map(|(key, group)| {
            let field = |get: fn(&Sample) -> f64| median(group.iter().map(|sample| get(sample)).collect());
            let sample = Sample {
                variant: key.0,
                inflight: key.1,
                p50_us: field(|s| s.p50_us),
                p99_us: field(|s| s.p99_us),
                p999_us: field(|s| s.p999_us),
                calls_per_s: field(|s| s.calls_per_s),
                cpu_us_per_call: field(|s| s.cpu_us_per_call),
                cpu_split_us: [
                    field(|s| s.cpu_split_us[0]),
                    field(|s| s.cpu_split_us[1]),
                    field(|s| s.cpu_split_us[2]),
                ],
                errors: group.iter().map(|sample| sample.errors).sum(),
                first_error: group.iter().find_map(|sample| sample.first_error.clone()),
                round: 0,
                core_round_trip_ns: field(|s| s.core_round_trip_ns),
            };
            (key, (sample, group.len()))
        })
        .collect()
}

/// The machine, in one line: CPU model, cores, kernel.
pub(crate) fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name")?.split_once(':').map(|(_, name)| name.trim().to_owned()))
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(usize::from).unwrap_or(1);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{model}, {cores} cores, Linux {}", kernel.trim())
}

/// The core round trip each variant found before it ran, round by round (NaN where unknown). The samples of one
/// run of a variant share theirs.
fn round_trips_by_variant(samples: &[Sample]) -> BTreeMap<Variant, Vec<f64>> {
    let mut runs: BTreeMap<(Variant, usize), f64> = BTreeMap::new();
    for sample in samples {
        runs.insert((sample.variant, sample.round), sample.core_round_trip_ns);
    }
    let mut by_variant: BTreeMap<Variant, Vec<f64>> = BTreeMap::new();
    for ((variant, _), ns) in runs {
        by_variant.entry(variant).or_default().push(ns);
    }
    by_variant
}

/// The cores' round trips the run's variants found ([`round_trips_by_variant`]), in one line: their median and
/// range.
fn round_trips(by_variant: &BTreeMap<Variant, Vec<f64>>) -> String {
    let values: Vec<f64> = by_variant.values().flatten().copied().filter(|ns| !ns.is_nan()).collect();
    if values.is_empty() {
        return "core round trip: not measured".to_owned();
    }
    let (low, high) = values.iter().fold((f64::INFINITY, 0.0_f64), |(low, high), &ns| (low.min(ns), high.max(ns)));
    format!(
        "core round trip (one cache line between two threads and back, before each variant): median {:.0} ns, \
         {low:.0}-{high:.0} ns over the run",
        median(values)
    )
}

/// Today's date (UTC), as `YYYY-MM-DD`.
fn today() -> String {
    let seconds = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let days = (seconds / 86_400) as i64 + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

fn ratio(ours: f64, theirs: f64) -> String {
    if ours.is_nan() || theirs.is_nan() || theirs == 0.0 { "-".into() } else { format!("{:.2}x", ours / theirs) }
}

fn number(value: f64) -> String {
    if value.is_nan() {
        return "-".into();
    }
    let whole = value.round() as u64;
    let digits = whole.to_string();
    let mut out = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

fn micros(value: f64) -> String {
    if value.is_nan() {
        "-".into()
    } else if value < 10.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.0}")
    }
}

/// Prints the tables and the targets, and writes the JSON lines and the chart.
pub(crate) fn report(
    config: &Config,
    samples: &[Sample],
    memory: Option<&MemoryReport>,
    failures: &[String],
    elapsed: Duration,
) -> Result<(), String> {
    let medians = medians(samples);
    let get = |variant: Variant, inflight: usize| medians.get(&(variant, inflight)).map(|(sample, _)| sample);
    let mut out = String::new();
    let rounds = medians.values().map(|(_, rounds)| *rounds).max().unwrap_or(0);
    let _ = writeln!(
        out,
        "mqrpc bench {}: add(i64, i64) -> i64, medians of {rounds} rounds{}, run in {:.0} s",
        today(),
        if config.quick { " (--quick)" } else { "" },
        elapsed.as_secs_f64()
    );
    let _ = writeln!(out, "machine: {}", machine());
    let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
    let _ = writeln!(out, "malloc: GLIBC_TUNABLES={}", if tunables.is_empty() { "(none)" } else { &tunables });
    let workers = config.workers.map_or_else(|| "one per core".to_owned(), |workers| workers.to_string());
    let _ = writeln!(out, "worker threads of this process's runtime: {workers}");
    let round_trips_by_variant = round_trips_by_variant(samples);
    let _ = writeln!(out, "{}", round_trips(&round_trips_by_variant));
    let _ = writeln!(
        out,
        "cpu: user+system time of every process of the variant (this one, responders, broker) per call\n"
    );
    let _ = writeln!(
        out,
        "latency, 1 call in flight ({} calls)\n{:<14} {:>9} {:>9} {:>9} {:>10} {:>9} {:>8}  p50 vs baseline",
        config.latency_calls, "variant", "p50 µs", "p99 µs", "p99.9 µs", "calls/s", "cpu µs", "errors"
    );
    for &variant in &config.variants {
        let Some(sample) = get(variant, 1) else {
            let _ = writeln!(out, "{:<14} (not measured)", variant.name());
            continue;
        };
        let versus = match variant.baseline().and_then(|baseline| Some((baseline, get(baseline, 1)?))) {
            Some((baseline, base)) => format!("{} of {}", ratio(sample.p50_us, base.p50_us), baseline.name()),
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "{:<14} {:>9} {:>9} {:>9} {:>10} {:>9} {:>8}  {versus}",
            variant.name(),
            micros(sample.p50_us),
            micros(sample.p99_us),
            micros(sample.p999_us),
            number(sample.calls_per_s),
            micros(sample.cpu_us_per_call),
            sample.errors,
        );
    }
    let _ = writeln!(out);
    let mut header = format!("throughput (calls/s)\n{:<14}", "variant");
    for inflight in crate::measure::INFLIGHT {
        let _ = write!(header, " {:>11} {:>7} {:>7} {:>8}", format!("@{inflight}"), "ratio", "cpu µs", "p50 µs");
    }
    let _ = writeln!(out, "{header} {:>7}  baseline", "errors");
    for &variant in &config.variants {
        let mut line = format!("{:<14}", variant.name());
        let mut errors = 0;
        for inflight in crate::measure::INFLIGHT {
            match get(variant, inflight) {
                Some(sample) => {
                    let base = variant.baseline().and_then(|baseline| get(baseline, inflight));
                    let versus = base.map_or_else(|| "-".into(), |base| ratio(sample.calls_per_s, base.calls_per_s));
                    errors += sample.errors;
                    let _ = write!(
                        line,
                        " {:>11} {versus:>7} {:>7} {:>8}",
                        number(sample.calls_per_s),
                        micros(sample.cpu_us_per_call),
                        micros(sample.p50_us)
                    );
                }
                None => {
                    let _ = write!(line, " {:>11} {:>7} {:>7} {:>8}", "-", "-", "-", "-");
                }
            }
        }
        let baseline = variant.baseline().map_or("", Variant::name);
        let _ = writeln!(out, "{line} {errors:>7}  {baseline}");
    }
    let _ = writeln!(
        out,
        "\ncpu µs per call by process, at 1 / 256 in flight; the core round trip before the variant, by round\n\
         {:<14} {:>15} {:>15} {:>15}  round trip ns",
        "variant", "this process", "responder", "broker"
    );
    for &variant in &config.variants {
        let split = |inflight| get(variant, inflight).map(|sample: &Sample| sample.cpu_split_us);
        let mut line = format!("{:<14}", variant.name());
        for part in 0..3 {
            let cell = match (split(1), split(256)) {
                (Some(one), Some(many)) => format!("{} / {}", micros(one[part]), micros(many[part])),
                _ => "-".into(),
            };
            let _ = write!(line, " {cell:>15}");
        }
        let rounds: Vec<String> = round_trips_by_variant
            .get(&variant)
            .into_iter()
            .flatten()
            .map(|ns| if ns.is_nan() { "-".to_owned() } else { format!("{ns:.0}") })
            .collect();
        let _ = writeln!(out, "{line}  {}", if rounds.is_empty() { "-".to_owned() } else { rounds.join(", ") });
    }
    let failed: Vec<&Sample> = medians.values().map(|(sample, _)| sample).filter(|sample| sample.errors > 0).collect();
    if !failed.is_empty() {
        let _ = writeln!(out, "\nfailed calls (all rounds), and what the first came to");
        for sample in failed {
            let _ = writeln!(
                out,
                "  {} at {} in flight: {} failed; first: {}",
                sample.variant.name(),
                sample.inflight,
                sample.errors,
                sample.first_error.as_deref().unwrap_or("-")
            );
        }
    }
    if let Some(memory) = memory {
        let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
        let _ = writeln!(
            out,
            "\nmemory\n  own broker holding {} queued 100-byte messages: RSS {:.0} MiB (idle {:.0} MiB, {:.0} bytes per \
             message; published in {:.1} s)",
            number(memory.queued as f64),
            mib(memory.broker_rss),
            mib(memory.broker_idle_rss),
            memory.broker_rss.saturating_sub(memory.broker_idle_rss) as f64 / memory.queued.max(1) as f64,
            memory.publish_time.as_secs_f64()
        );
        let _ = writeln!(
            out,
            "  client after {} calls that timed out (50 ms budget, 10,000 at a time): RSS {:.1} MiB -> {:.1} MiB, \
             after as many again {:.1} MiB; pending calls {}, other failures {}",
            number(memory.timed_out as f64 / 2.0),
            mib(memory.client_rss_before),
            mib(memory.client_rss_after),
            mib(memory.client_rss_again),
            memory.pending_after,
            memory.other_failures
        );
        let _ = writeln!(
            out,
            "  own broker killed with {} messages in a durable queue: serving again {:.2} s after it was started, \
             {} messages read back",
            number(memory.restart_records as f64),
            memory.restart_time.as_secs_f64(),
            number(memory.restart_recovered as f64)
        );
    }
    let _ = writeln!(out, "\ntargets");
    for (met, line) in targets(&get, samples, memory) {
        let _ = writeln!(out, "  [{}] {line}", if met { "met" } else { "NOT met" });
    }
    for failure in failures {
        let _ = writeln!(out, "  failed: {failure}");
    }
    print!("{out}");

    if let Some(path) = &config.json {
        let mut lines = String::new();
        for (sample, rounds) in medians.values() {
            let value = serde_json::json!({
                "variant": sample.variant.name(),
                "mode": sample.mode(),
                "inflight": sample.inflight,
                "p50_us": finite(sample.p50_us),
                "p99_us": finite(sample.p99_us),
                "p999_us": finite(sample.p999_us),
                "calls_per_s": finite(sample.calls_per_s),
                "cpu_us_per_call": finite(sample.cpu_us_per_call),
                "cpu_client_us_per_call": finite(sample.cpu_split_us[0]),
                "cpu_responder_us_per_call": finite(sample.cpu_split_us[1]),
                "cpu_broker_us_per_call": finite(sample.cpu_split_us[2]),
                "errors": sample.errors,
                "rounds": rounds,
                "core_round_trip_ns": finite(sample.core_round_trip_ns),
                "client_workers": config.workers,
            });
            let _ = writeln!(lines, "{value}");
        }
        if let Some(memory) = memory {
            let broker = serde_json::json!({
                "variant": "own-broker", "mode": "memory", "queued_messages": memory.queued,
                "rss_bytes": memory.broker_rss, "idle_rss_bytes": memory.broker_idle_rss,
            });
            let client = serde_json::json!({
                "variant": "own-broker", "mode": "client-memory", "timed_out_calls": memory.timed_out / 2,
                "rss_before_bytes": memory.client_rss_before, "rss_after_bytes": memory.client_rss_after,
                "rss_after_twice_bytes": memory.client_rss_again,
                "pending_after": memory.pending_after,
            });
            let restart = serde_json::json!({
                "variant": "own-durable", "mode": "restart", "records": memory.restart_records,
                "read_back": memory.restart_recovered, "restart_s": memory.restart_time.as_secs_f64(),
            });
            let _ = writeln!(lines, "{broker}\n{client}\n{restart}");
        }
        std::fs::write(path, lines).map_err(|error| format!("cannot write {}: {error}", path.display()))?;
        println!("JSON lines: {}", path.display());
    }
    if let Some(parent) = config.svg.parent().filter(|parent| !parent.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|error| format!("cannot create {}: {error}", parent.display()))?;
    }
    std::fs::write(&config.svg, chart(config, &get))
        .map_err(|error| format!("cannot write {}: {error}", config.svg.display()))?;
    println!("chart: {}", config.svg.display());
    Ok(())
}

fn finite(value: f64) -> Option<f64> {
    value.is_finite().then_some((value * 100.0).round() / 100.0)
}

/// The throughput ratio of `ours` to `theirs` at `inflight` in each round that measured both, in round order.
fn round_ratios(samples: &[Sample], ours: Variant, theirs: Variant, inflight: usize) -> Vec<f64> {
    let of = |variant: Variant, round: usize| {
        samples
            .iter()
            .find(|sample| sample.variant == variant && sample.inflight == inflight && sample.round == round)
            .map(|sample| sample.calls_per_s)
    };
    let rounds = samples.iter().map(|sample| sample.round + 1).max().unwrap_or(0);
    (0..rounds).filter_map(|round| Some(of(ours, round)? / of(theirs, round)?)).collect()
}

/// Each target with whether this run met it. A ratio target is judged on the medians; each round's own ratio
/// follows, so that a reader sees how far a ratio near its target moved within the run.
fn targets<'a>(
    get: &impl Fn(Variant, usize) -> Option<&'a Sample>,
    samples: &[Sample],
    memory: Option<&MemoryReport>,
) -> Vec<(bool, String)> {
    let mut targets = Vec::new();
    let throughput = |variant, inflight| get(variant, inflight).map(|sample: &Sample| sample.calls_per_s);
    let mut versus = |ours: Variant, theirs: Variant, inflight: usize, floor: f64| {
        if let (Some(a), Some(b)) = (throughput(ours, inflight), throughput(theirs, inflight)) {
            let rounds = round_ratios(samples, ours, theirs, inflight);
            let rounds = if rounds.len() > 1 {
                let listed: Vec<String> = rounds.iter().map(|ratio| format!("{ratio:.2}x")).collect();
                format!("; rounds {}", listed.join(", "))
            } else {
                String::new()
            };
            targets.push((
                a / b >= floor,
                format!(
                    "{} >= {floor:.2}x {} at {inflight} in flight: {:.2}x ({} vs {} calls/s{rounds})",
                    ours.name(),
                    theirs.name(),
                    a / b,
                    number(a),
                    number(b)
                ),
            ));
        }
    };
    versus(Variant::OwnBroker, Variant::NatsRaw, 256, 1.2);
    versus(Variant::OwnDurable, Variant::OwnBroker, 256, 0.5);
    versus(Variant::Nats, Variant::NatsRaw, 64, 0.95);
    versus(Variant::Nats, Variant::NatsRaw, 256, 0.95);
    versus(Variant::Rabbitmq, Variant::RabbitmqRaw, 64, 1.0);
    versus(Variant::Rabbitmq, Variant::RabbitmqRaw, 256, 1.0);
    versus(Variant::Activemq, Variant::ActivemqRaw, 64, 1.0);
    versus(Variant::Activemq, Variant::ActivemqRaw, 256, 1.0);
    versus(Variant::Redis, Variant::RedisRaw, 64, 1.0);
    versus(Variant::Redis, Variant::RedisRaw, 256, 1.0);
    if let (Some(ours), Some(theirs)) = (get(Variant::OwnBroker, 1), get(Variant::NatsRaw, 1)) {
        targets.push((
            ours.p50_us <= theirs.p50_us,
            format!(
                "own-broker p50 <= nats-raw p50 at 1 in flight: {} µs vs {} µs ({})",
                micros(ours.p50_us),
                micros(theirs.p50_us),
                ratio(ours.p50_us, theirs.p50_us)
            ),
        ));
    }
    if let (Some(traced), Some(untraced)) = (throughput(Variant::EmbeddedOtel, 256), throughput(Variant::Embedded, 256))
    {
        targets.push((
            true,
            format!(
                "reported: embedded with an OpenTelemetry layer recording every span, at 256 in flight: {} calls/s, \
                 {} of embedded",
                number(traced),
                ratio(traced, untraced)
            ),
        ));
    }
    if let Some(embedded) = throughput(Variant::Embedded, 256) {
        targets.push((
            embedded >= 1_000_000.0,
            format!("embedded >= 1,000,000 calls/s at 256 in flight: {} calls/s", number(embedded)),
        ));
    }
    if let Some(memory) = memory {
        let mib = memory.broker_rss as f64 / (1024.0 * 1024.0);
        targets.push((
            mib <= 300.0,
            format!("own broker RSS with {} queued messages <= 300 MiB: {mib:.0} MiB", number(memory.queued as f64)),
        ));
        targets.push((
            memory.pending_after == 0 && memory.other_failures == 0,
            format!(
                "client pending map back to 0 after {} timed-out calls: {} pending",
                number(memory.timed_out as f64 / 2.0),
                memory.pending_after
            ),
        ));
        targets.push((
            memory.restart_recovered == memory.restart_records && memory.restart_time <= Duration::from_secs(3),
            format!(
                "own broker restart with {} records in its log <= 3 s: {:.2} s ({} read back)",
                number(memory.restart_records as f64),
                memory.restart_time.as_secs_f64(),
                number(memory.restart_recovered as f64)
            ),
        ));
    }
    targets
}

/// A chart of throughput at each number in flight and of latency at one in flight, as SVG.
fn chart<'a>(config: &Config, get: &impl Fn(Variant, usize) -> Option<&'a Sample>) -> String {
    const ROW: f64 = 26.0;
    const LABEL: f64 = 110.0;
    const PANEL: f64 = 330.0;
    const TOP: f64 = 56.0;
    let variants = &config.variants;
    let height = TOP + ROW * variants.len() as f64 + 40.0;
    let width = LABEL + 2.0 * PANEL + 90.0;
    // The in-process floor would dwarf every brokered variant: the scale is set by the others, and its bar is
    // cut at the panel's edge (its figure is printed beside it).
    let max_throughput = variants
        .iter()
        .filter(|&&variant| variant != Variant::InprocFloor || variants.len() == 1)
        .flat_map(|&variant| crate::measure::INFLIGHT.map(|inflight| get(variant, inflight).map(|s| s.calls_per_s)))
        .flatten()
        .filter(|value| value.is_finite())
        .fold(1.0, f64::max);
    let max_latency = variants
        .iter()
        .filter_map(|&variant| get(variant, 1).map(|sample| sample.p99_us))
        .filter(|value| value.is_finite())
        .fold(1.0, f64::max);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="10" y="18" font-size="14" font-weight="bold">mqrpc bench {}: add(i64, i64), medians of {} rounds</text>"#,
        today(),
        config.rounds
    );
    let _ = writeln!(svg, r##"<text x="10" y="34" fill="#555">{}</text>"##, escape(&machine()));
    let left = LABEL;
    let right = LABEL + PANEL + 60.0;
    let _ = writeln!(
        svg,
        r##"<text x="{left}" y="50">throughput, calls/s (<tspan fill="#9bb7d4">64</tspan> / <tspan fill="#1f5f9f">256</tspan> in flight)</text>"##
    );
    let _ = writeln!(
        svg,
        r##"<text x="{right}" y="50">latency at 1 in flight, µs (<tspan fill="#e39b3a">p50</tspan>, tick: p99)</text>"##
    );
    for (row, &variant) in variants.iter().enumerate() {
        let y = TOP + ROW * row as f64;
        let _ =
            writeln!(svg, r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#, LABEL - 8.0, y + 16.0, variant.name());
        for (index, inflight) in crate::measure::INFLIGHT.into_iter().enumerate() {
            if let Some(sample) = get(variant, inflight).filter(|sample| sample.calls_per_s.is_finite()) {
                let w = (PANEL * sample.calls_per_s / max_throughput).min(PANEL);
                let color = if index == 0 { "#9bb7d4" } else { "#1f5f9f" };
                let bar_y = y + 3.0 + 10.0 * index as f64;
                let _ = writeln!(svg, r#"<rect x="{left}" y="{bar_y}" width="{w:.1}" height="9" fill="{color}"/>"#);
                if index == 1 {
                    let _ = writeln!(
                        svg,
                        r#"<text x="{:.1}" y="{:.1}" font-size="10">{}</text>"#,
                        left + w + 4.0,
                        bar_y + 9.0,
                        number(sample.calls_per_s)
                    );
                }
            }
        }
        if let Some(sample) = get(variant, 1).filter(|sample| sample.p50_us.is_finite()) {
            let w = PANEL * sample.p50_us / max_latency;
            let tick = right + PANEL * sample.p99_us / max_latency;
            let _ = writeln!(svg, r##"<rect x="{right}" y="{}" width="{w:.1}" height="14" fill="#e39b3a"/>"##, y + 4.0);
            if tick.is_finite() {
                let _ = writeln!(
                    svg,
                    r#"<line x1="{tick:.1}" x2="{tick:.1}" y1="{}" y2="{}" stroke="black"/>"#,
                    y + 2.0,
                    y + 20.0
                );
            }
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{}" font-size="10">{}</text>"#,
                right + w + 4.0,
                y + 15.0,
                micros(sample.p50_us)
            );
        }
    }
    let _ = writeln!(svg, "</svg>");
    svg
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(variant: Variant, inflight: usize, round: usize, calls_per_s: f64) -> Sample {
        let sample = Sample::new(variant, inflight, vec![1_000], 1, Duration::from_secs(1), [0.0; 3], 0);
        Sample { calls_per_s, ..sample }.in_round(round)
    }

    /// For each `(round, calls/s)`: own-broker at that rate and nats-raw at 100 calls/s, at 256 in flight.
    fn own_broker_against_nats_raw(rounds: &[(usize, f64)]) -> Vec<Sample> {
        rounds
            .iter()
            .flat_map(|&(round, ours)| {
                [sample(Variant::NatsRaw, 256, round, 100.0), sample(Variant::OwnBroker, 256, round, ours)]
            })
            .collect()
    }

    #[test]
    fn each_rounds_ratio_pairs_the_two_variants_of_that_round_and_skips_a_round_missing_one() {
        let mut samples = own_broker_against_nats_raw(&[(0, 150.0), (2, 120.0)]);
        samples.push(sample(Variant::OwnBroker, 64, 0, 999.0));
        // Round 1 lost its baseline.
        samples.push(sample(Variant::OwnBroker, 256, 1, 500.0));
        let ratios = round_ratios(&samples, Variant::OwnBroker, Variant::NatsRaw, 256);
        assert_eq!(ratios, vec![1.5, 1.2]);
        assert!(round_ratios(&samples, Variant::Nats, Variant::NatsRaw, 256).is_empty());
    }

    #[test]
    fn a_ratio_target_lists_each_rounds_ratio_after_the_medians() {
        let samples = own_broker_against_nats_raw(&[(0, 150.0), (1, 110.0), (2, 130.0)]);
        let medians = medians(&samples);
        let get = |variant: Variant, inflight: usize| medians.get(&(variant, inflight)).map(|(sample, _)| sample);
        let targets = targets(&get, &samples, None);
        let (met, line) = &targets[0];
        assert!(*met, "1.30x of the medians meets 1.2x: {line}");
        assert!(line.ends_with("1.30x (130 vs 100 calls/s; rounds 1.50x, 1.10x, 1.30x)"), "{line}");
    }

    #[test]
    fn core_round_trips_are_listed_by_round_and_summed_up_by_median_and_range() {
        let round_trip = |ns: u64| Some(Duration::from_nanos(ns));
        let samples = vec![
            // Two samples of one run of a variant share its round trip.
            sample(Variant::Embedded, 64, 0, 1.0).with_core_round_trip(round_trip(60)),
            sample(Variant::Embedded, 256, 0, 1.0).with_core_round_trip(round_trip(60)),
            sample(Variant::Embedded, 256, 1, 1.0).with_core_round_trip(round_trip(400)),
            sample(Variant::InprocFloor, 256, 0, 1.0).with_core_round_trip(round_trip(50)),
            sample(Variant::InprocFloor, 256, 1, 1.0).with_core_round_trip(None),
        ];
        let by_variant = round_trips_by_variant(&samples);
        assert_eq!(by_variant[&Variant::Embedded], vec![60.0, 400.0]);
        assert_eq!(by_variant[&Variant::InprocFloor][0], 50.0);
        assert!(by_variant[&Variant::InprocFloor][1].is_nan());
        let line = round_trips(&by_variant);
        assert!(line.ends_with("median 60 ns, 50-400 ns over the run"), "{line}");
        assert_eq!(round_trips(&BTreeMap::new()), "core round trip: not measured");
    }
}
