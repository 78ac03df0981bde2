//! The service the scenarios call, and a worker that records what it did.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// The error `div` returns, to check that user errors arrive typed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MathError {
    /// Division by zero.
    DivideByZero,
    /// A quotient with a remainder.
    NotExact {
        /// What was left over.
        remainder: i64,
    },
}

/// Every kind of method the scenarios need.
#[rpc_core::service(name = "suite.Probe")]
pub trait Probe {
    /// `a + b`.
    async fn add(&self, a: i64, b: i64) -> i64;
    /// `a / b`, or a typed error.
    async fn div(&self, a: i64, b: i64) -> Result<i64, MathError>;
    /// Works for `millis` milliseconds, then returns them.
    async fn work(&self, millis: u64) -> u64;
    /// Waits until the test opens the gate.
    async fn gate(&self);
    /// Panics.
    async fn boom(&self) -> i64;
    /// The worker's name and the attempt it sees.
    async fn whoami(&self) -> (String, u32);
    /// The caller's identity as the handler's context has it.
    async fn caller(&self) -> Option<String>;
    /// How many milliseconds the request being handled has left.
    async fn remaining(&self) -> Option<u64>;
    /// Calls `remaining` on the same service, with the client's default timeout, and returns its answer.
    async fn nested(&self) -> Option<u64>;
    /// The `traceparent` header of the request being handled.
    async fn trace_parent(&self) -> Option<String>;
    /// Its own request's `traceparent`, and the one that `trace_parent` on the same service sees when called from
    /// here.
    async fn nested_trace(&self) -> (Option<String>, Option<String>);
    /// Panics on attempts up to `failures`, then returns the attempt it succeeded on.
    async fn flaky(&self, failures: u32) -> u32;
    /// An effect: counts one more execution for `n` and returns the count.
    async fn count(&self, n: i64) -> u64;
    /// The effect of `count`, then `millis` milliseconds of work before answering with the count: a handler
    /// whose effect precedes a long tail.
    async fn count_then_wait(&self, n: i64, millis: u64) -> u64;
    /// An effect on the worker's sink: takes a few milliseconds, appends the call's idempotency key, then
    /// takes a few more; returns `n`.
    async fn effect(&self, n: i64) -> i64;
    /// The effect of `effect`, then `millis` milliseconds of work before answering: a handler a test can
    /// pause or kill between its effect and its reply.
    async fn effect_then_wait(&self, n: i64, millis: u64) -> i64;
    /// Panics while the worker is broken ([`Events::broken`]); otherwise records the call's idempotency key
    /// and returns `n`.
    async fn fragile(&self, n: i64) -> i64;
    /// Records `n`.
    #[rpc(oneway)]
    async fn record(&self, n: i64);
    /// Records `n` in every subscriber group.
    #[rpc(broadcast)]
    async fn announce(&self, n: i64);
}

/// What a worker saw, shared with the test.
#[derive(Debug, Default)]
pub struct Events {
    /// Executions finished, per method.
    finished: Mutex<HashMap<&'static str, u64>>,
    /// `work` calls started.
    pub started: AtomicU64,
    /// `work` calls running now.
    pub running: AtomicU64,
    /// The most `work` calls that ran at once.
    pub most_running: AtomicU64,
    /// Executions of `count`, per argument.
    pub counts: Mutex<HashMap<i64, u64>>,
    /// Values received by `record` and `announce`, in order.
    pub recorded: Mutex<Vec<i64>>,
    /// While set, `fragile` panics.
    pub broken: std::sync::atomic::AtomicBool,
    /// The idempotency keys `fragile` ran with, in order.
    pub keys: Mutex<Vec<String>>,
    /// Opened by the test to release `gate` calls.
    pub gate: Notify,
    /// Where `effect` appends the keys it applied, one line each (a file shared by worker processes).
    pub sink: Mutex<Option<std::fs::File>>,
}

impl Events {
    /// How many calls of `method` finished.
    pub fn finished(&self, method: &str) -> u64 {
        self.finished.lock().expect("not poisoned").get(method).copied().unwrap_or(0)
    }

    fn finish(&self, method: &'static str) {
        *self.finished.lock().expect("not poisoned").entry(method).or_default() += 1;
    }

    /// The values recorded so far.
    pub fn recorded(&self) -> Vec<i64> {
        self.recorded.lock().expect("not poisoned").clone()
    }
}

/// A worker implementation that records into [`Events`].
#[derive(Debug)]
pub struct Worker {
    /// Its name, returned by `whoami`.
    pub name: String,
    /// What it saw.
    pub events: std::sync::Arc<Events>,
    /// For `nested`: a client to call the service again.
    pub client: Option<rpc_core::Client>,
}

impl Worker {
    /// Appends the call's idempotency key to the sink, if there is one, followed by this worker's name and the
    /// attempt, which say where a key that ran twice ran.
    fn apply_effect(&self) {
        let context = rpc_core::context::current();
        let attempt = context.as_ref().map_or(0, |context| context.attempt);
        let key = context.and_then(|context| context.idempotency_key).unwrap_or_default();
        if let Some(sink) = self.events.sink.lock().expect("not poisoned").as_mut() {
            use std::io::Write;
            // One write per line on a file opened for appending: lines of several processes never interleave.
            let line = format!("{key} {} {attempt} {}\n", self.name, std::process::id());
            sink.write_all(line.as_bytes()).expect("the sink takes the effect");
        }
    }
}

impl Probe for Worker {
    async fn add(&self, a: i64, b: i64) -> i64 {
        self.events.finish("add");
        a + b
    }

    async fn div(&self, a: i64, b: i64) -> Result<i64, MathError> {
        self.events.finish("div");
        if b == 0 {
            Err(MathError::DivideByZero)
        } else if a % b != 0 {
            Err(MathError::NotExact { remainder: a % b })
        } else {
            Ok(a / b)
        }
    }

    async fn work(&self, millis: u64) -> u64 {
        self.events.started.fetch_add(1, Ordering::SeqCst);
        let running = self.events.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.events.most_running.fetch_max(running, Ordering::SeqCst);
        // Counted down however the work ends: finished, or stopped at its deadline or by a shutdown.
        let _running = Running(&self.events.running);
        // Simulated work that takes time, the thing a shutdown must wait for or interrupt.
        tokio::time::sleep(Duration::from_millis(millis)).await;
        self.events.finish("work");
        millis
    }

    async fn gate(&self) {
        self.events.gate.notified().await;
        self.events.finish("gate");
    }

    async fn boom(&self) -> i64 {
        panic!("boom on purpose")
    }

    async fn whoami(&self) -> (String, u32) {
        self.events.finish("whoami");
        let attempt = rpc_core::context::current().map_or(0, |context| context.attempt);
        (self.name.clone(), attempt)
    }

    async fn caller(&self) -> Option<String> {
        rpc_core::context::current()?.caller
    }

    async fn remaining(&self) -> Option<u64> {
        let deadline = rpc_core::context::current()?.deadline?;
        u64::try_from(deadline.saturating_duration_since(tokio::time::Instant::now()).as_millis()).ok()
    }

    async fn nested(&self) -> Option<u64> {
        let client = self.client.as_ref()?;
        ProbeClient::new(client).remaining().await.ok().flatten()
    }

    async fn trace_parent(&self) -> Option<String> {
        rpc_core::context::current()?.headers.remove(rpc_core::trace::TRACEPARENT)
    }

    async fn nested_trace(&self) -> (Option<String>, Option<String>) {
        let own = self.trace_parent().await;
        let nested = match &self.client {
            Some(client) => ProbeClient::new(client).trace_parent().await.ok().flatten(),
            None => None,
        };
        (own, nested)
    }

    async fn flaky(&self, failures: u32) -> u32 {
        let attempt = rpc_core::context::current().map_or(0, |context| context.attempt);
        assert!(attempt > failures, "failing attempt {attempt} on purpose");
        self.events.finish("flaky");
        attempt
    }

    async fn count(&self, n: i64) -> u64 {
        self.events.finish("count");
        let mut counts = self.events.counts.lock().expect("not poisoned");
        let count = counts.entry(n).or_default();
        *count += 1;
        *count
    }

    async fn count_then_wait(&self, n: i64, millis: u64) -> u64 {
        let count = {
            let mut counts = self.events.counts.lock().expect("not poisoned");
            let count = counts.entry(n).or_default();
            *count += 1;
            *count
        };
        tokio::time::sleep(Duration::from_millis(millis)).await;
        self.events.finish("count_then_wait");
        count
    }

    async fn effect(&self, n: i64) -> i64 {
        tokio::time::sleep(Duration::from_millis(2)).await;
        self.apply_effect();
        tokio::time::sleep(Duration::from_millis(2)).await;
        self.events.finish("effect");
        n
    }

    async fn effect_then_wait(&self, n: i64, millis: u64) -> i64 {
        self.apply_effect();
        tokio::time::sleep(Duration::from_millis(millis)).await;
        self.events.finish("effect_then_wait");
        n
    }

    async fn fragile(&self, n: i64) -> i64 {
        assert!(!self.events.broken.load(Ordering::SeqCst), "fragile call {n} failing on purpose");
        let key = rpc_core::context::current().and_then(|context| context.idempotency_key).unwrap_or_default();
        self.events.keys.lock().expect("not poisoned").push(key);
        self.events.finish("fragile");
        n
    }

    async fn record(&self, n: i64) {
        self.events.recorded.lock().expect("not poisoned").push(n);
        self.events.finish("record");
    }

    async fn announce(&self, n: i64) {
        self.events.recorded.lock().expect("not poisoned").push(n);
        self.events.finish("announce");
    }
}

/// Counts a `work` call down when it ends, however it ends.
struct Running<'a>(&'a AtomicU64);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
