//! Memory: the own broker holding a million queued messages, and a client after many calls that timed out.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use rpc_core::{Envelope, Kind, QueueOptions, Transport};

use crate::measure::{Process, RemoveOnDrop, data_dir};
use crate::variants::BenchClient;

/// The memory figures of one run.
#[derive(Clone, Debug)]
pub(crate) struct MemoryReport {
    /// Messages queued in the broker.
    pub(crate) queued: usize,
    /// The broker's RSS before publishing, in bytes.
    pub(crate) broker_idle_rss: u64,
    /// The broker's RSS holding them, in bytes.
    pub(crate) broker_rss: u64,
    /// How long publishing them took.
    pub(crate) publish_time: Duration,
    /// Calls that timed out, over both rounds of calls.
    pub(crate) timed_out: usize,
    /// Calls that failed otherwise (they should not).
    pub(crate) other_failures: usize,
    /// The client's RSS after a warm-up, in bytes.
    pub(crate) client_rss_before: u64,
    /// The client's RSS after the calls, in bytes.
    pub(crate) client_rss_after: u64,
    /// The client's RSS after as many calls again, in bytes.
    pub(crate) client_rss_again: u64,
    /// The client's pending map after the calls (it must be 0).
    pub(crate) pending_after: usize,
    /// Messages in the durable queue of the broker killed and started again.
    pub(crate) restart_records: usize,
    /// How many it read back.
    pub(crate) restart_recovered: usize,
    /// From starting the broker again to its serving.
    pub(crate) restart_time: Duration,
}

/// A process's resident set size in bytes, from `/proc/<pid>/status`.
pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Puts `count` 100-byte messages on `queue` through `transport`, 4,096 at a time; how long it took.
async fn fill(transport: &impl Transport, queue: &str, count: usize) -> Result<Duration, String> {
    let body = Bytes::from(vec![7u8; 100]);
    let started = Instant::now();
    let failures = futures::stream::iter(0..count)
        .map(|_| {
            let mut envelope = Envelope::new(Kind::Oneway);
            envelope.service = "Memory".into();
            envelope.method = "store".into();
            envelope.body = body.clone();
            transport.publish(queue, envelope, rpc_core::transport::Confirm::Broker)
        })
        .buffer_unordered(4096)
        .filter(|result| std::future::ready(result.is_err()))
        .count()
        .await;
    if failures > 0 {
        return Err(format!("{failures} of {count} publishes failed"));
    }
    Ok(started.elapsed())
}

/// Measures the memory figures, each against a broker process of its own, and the time a broker killed with
/// `restart_records` messages in a durable queue takes to serve again.
pub(crate) async fn measure(
    queued: usize,
    timed_out_calls: usize,
    restart_records: usize,
) -> Result<MemoryReport, String> {
    let (broker, url) = Process::broker().await?;
    let broker_idle_rss = rss_bytes(broker.pid()).ok_or("cannot read the broker's RSS")?;
    let transport = rpc_broker::Remote::connect(&url).await.map_err(|error| error.to_string())?;
    let queue = "mqrpc.bench.memory";
    transport.declare_queue(queue, &QueueOptions::new()).await.map_err(|error| error.to_string())?;
    let publish_time = fill(&transport, queue, queued).await?;
    let stats = transport.queue_stats(queue).await.map_err(|error| error.to_string())?;
    if stats.ready != queued {
        return Err(format!("the queue holds {} messages, not {queued}", stats.ready));
    }
    let broker_rss = rss_bytes(broker.pid()).ok_or("cannot read the broker's RSS")?;
    drop(transport);
    drop(broker);

    let (broker, url) = Process::broker().await?;
    let (_client, line) = Process::start(&["client-memory", &url, &timed_out_calls.to_string()]).await?;
    drop(broker);

    let dir = data_dir();
    let _cleanup = RemoveOnDrop(dir.clone());
    let (broker, url, _) = Process::durable_broker(Some(&dir)).await?;
    let transport = rpc_broker::Remote::connect(&url).await.map_err(|error| error.to_string())?;
    transport.declare_queue(queue, &QueueOptions::new().durable(true)).await.map_err(|error| error.to_string())?;
    fill(&transport, queue, restart_records).await?;
    drop(transport);
    broker.kill().await?;
    let started = Instant::now();
    let (broker, _, restart_recovered) = Process::durable_broker(Some(&dir)).await?;
    let restart_time = started.elapsed();
    broker.kill().await?;
    let field = |name: &str| -> Result<u64, String> {
        line.split_whitespace()
            .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
            .and_then(|value| value.parse().ok())
            .ok_or_else(|| format!("the client printed no {name}: `{line}`"))
    };
    Ok(MemoryReport {
        queued,
        broker_idle_rss,
        broker_rss,
        publish_time,
        timed_out: field("timed_out")? as usize,
        other_failures: field("other")? as usize,
        client_rss_before: field("rss_before")?,
        client_rss_after: field("rss_after")?,
        client_rss_again: field("rss_again")?,
        pending_after: field("pending")? as usize,
        restart_records,
        restart_recovered,
        restart_time,
    })
}

/// The `client-memory` role: `calls` calls with a 50 ms budget to a queue no worker consumes, 10,000 at a time,
/// after a warm-up of 1,000, then as many again; prints
/// `ready timed_out=.. other=.. rss_before=.. rss_after=.. rss_again=.. pending=..`.
pub(crate) async fn client_role(url: &str, calls: usize) -> Result<(), String> {
    let transport = rpc_broker::Remote::connect(url).await.map_err(|error| error.to_string())?;
    let queue = rpc_core::naming::service_queue(None, "Bench");
    transport.declare_queue(&queue, &QueueOptions::new()).await.map_err(|error| error.to_string())?;
    let client = rpc_core::Client::connect(transport).await.map_err(|error| error.to_string())?;
    let bench = BenchClient::new(&client);
    let run = |count: usize| {
        let bench = bench.clone();
        async move {
            let mut timed_out = 0;
            let mut other = 0;
            let mut results = futures::stream::iter(0..count)
                .map(|n| {
                    std::future::IntoFuture::into_future(bench.add(n as i64, 1).timeout(Duration::from_millis(50)))
                })
                .buffer_unordered(10_000);
            while let Some(result) = results.next().await {
                match result {
                    Err(rpc_core::Error::Timeout(_)) => timed_out += 1,
                    _ => other += 1,
                }
            }
            (timed_out, other)
        }
    };
    run(1_000).await;
    let pid = std::process::id();
    let rss_before = rss_bytes(pid).ok_or("cannot read this process's RSS")?;
    let (timed_out, other) = run(calls).await;
    let pending = client.stats().pending;
    let rss_after = rss_bytes(pid).ok_or("cannot read this process's RSS")?;
    // The same again: memory that the allocator keeps for reuse stays level; a leak would grow again.
    let (again_timed_out, again_other) = run(calls).await;
    let rss_again = rss_bytes(pid).ok_or("cannot read this process's RSS")?;
    let pending = pending.max(client.stats().pending);
    let (timed_out, other) = (timed_out + again_timed_out, other + again_other);
    crate::roles::ready(&format!(
        "timed_out={timed_out} other={other} rss_before={rss_before} rss_after={rss_after} rss_again={rss_again} \
         pending={pending}"
    ));
    Ok(())
}
