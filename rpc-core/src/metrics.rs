//! Metrics of clients and servers, through the [`metrics`](https://docs.rs/metrics) facade (feature `metrics`).
//!
//! The framework records; the application picks the exporter by installing a recorder
//! (`metrics-exporter-prometheus` for a Prometheus scrape, or any other). Install it **before** the clients and
//! servers start: they register their metrics once, and what is registered before a recorder exists records
//! nothing. Without the feature, nothing here is compiled into the call path.
//!
//! Labels are bounded: the service and method names (a server labels a method it does not have `unknown`),
//! an outcome from a fixed set ([`Error::kind`], [`Code::label`](crate::Code::label)); never a correlation id,
//! key or caller.
//!
//! | metric | type | labels | what |
//! |---|---|---|---|
//! | `mqrpc_client_calls_total` | counter | service, method, outcome | calls ended: `ok`, an [`Error::kind`] (`timeout`, `queue_full`, `application_error`...), or `dropped` (the caller dropped the call's future) |
//! | `mqrpc_client_call_duration_seconds` | histogram | service, method | from the call's send to its end, every outcome |
//! | `mqrpc_client_calls_in_flight` | gauge | service | calls waiting for their reply |
//! | `mqrpc_client_timeouts_total` | counter | service, method | calls that ended by their deadline |
//! | `mqrpc_client_late_replies_total` | counter | | replies that came for no waiting call |
//! | `mqrpc_client_lost_replies_total` | counter | | calls whose reply address was lost while they waited (sent again where [`resend_lost_calls`](crate::ClientBuilder::resend_lost_calls) allows) |
//! | `mqrpc_server_handled_total` | counter | service, method, code | requests answered or acked: `ok` or the reply's [`Code::label`](crate::Code::label) |
//! | `mqrpc_server_handler_duration_seconds` | histogram | service, method | handler run time |
//! | `mqrpc_server_retries_total` | counter | service | failed requests put back for another attempt |
//! | `mqrpc_server_dead_lettered_total` | counter | service | requests dead-lettered after their last attempt |
//! | `mqrpc_server_fenced_total` | counter | service | replies not sent because the broker took the request back |
//! | `mqrpc_server_cancelled_total` | counter | service | handlers stopped because their caller cancelled |
//! | `mqrpc_server_dedup_hits_total` | counter | service | requests answered from the dedup store instead of running |
//! | `mqrpc_server_expired_total` | counter | service | requests not run, or stopped, at their deadline |
//! | `mqrpc_server_panics_total` | counter | service | handlers that panicked |

#[cfg(feature = "metrics")]
pub(crate) use enabled::*;

#[cfg(not(feature = "metrics"))]
pub(crate) use disabled::*;

use crate::error::Error;

/// The outcome label of a call's result.
fn outcome<T>(result: &Result<T, Error>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(error) => error.kind(),
    }
}

#[cfg(feature = "metrics")]
mod enabled {
    use std::borrow::Cow;
    use std::cell::RefCell;
    use std::sync::{LazyLock, Mutex, PoisonError};
    use std::time::Instant;

    use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

    use crate::error::Error;
    use crate::method::MethodInfo;
    use crate::status::Status;

    type Name = Cow<'static, str>;

    /// A client's own metrics; those of its calls are per (service, method), shared by every client.
    pub(crate) struct ClientMetrics {
        late: Counter,
        lost: Counter,
    }

    impl ClientMetrics {
        pub(crate) fn new() -> ClientMetrics {
            ClientMetrics {
                late: counter!("mqrpc_client_late_replies_total"),
                lost: counter!("mqrpc_client_lost_replies_total"),
            }
        }

        /// Counts a reply that came for no waiting call.
        pub(crate) fn late_reply(&self) {
            self.late.increment(1);
        }

        /// Counts a call whose reply address was lost while it waited.
        pub(crate) fn lost_reply(&self) {
            self.lost.increment(1);
        }
    }

    /// The handles of one (service, method).
    struct MethodCalls {
        service: Name,
        method: Name,
        ok: Counter,
        timeouts: Counter,
        duration: Histogram,
        in_flight: Gauge,
    }

    impl MethodCalls {
        fn new(service: &Name, method: &Name) -> MethodCalls {
            let (service_label, method_label) = (service.to_string(), method.to_string());
            MethodCalls {
                service: service.clone(),
                method: method.clone(),
                ok: counter!(
                    "mqrpc_client_calls_total",
                    "service" => service_label.clone(),
                    "method" => method_label.clone(),
                    "outcome" => "ok"
                ),
                timeouts: counter!(
                    "mqrpc_client_timeouts_total",
                    "service" => service_label.clone(),
                    "method" => method_label.clone()
                ),
                duration: histogram!(
                    "mqrpc_client_call_duration_seconds",
                    "service" => service_label.clone(),
                    "method" => method_label
                ),
                in_flight: gauge!("mqrpc_client_calls_in_flight", "service" => service_label),
            }
        }

        fn record(&self, started: Instant, outcome: &'static str) {
            self.in_flight.decrement(1.0);
            self.duration.record(started.elapsed());
            match outcome {
                "ok" => self.ok.increment(1),
                other => {
                    if other == "timeout" {
                        self.timeouts.increment(1);
                    }
                    counter!(
                        "mqrpc_client_calls_total",
                        "service" => self.service.to_string(),
                        "method" => self.method.to_string(),
                        "outcome" => other
                    )
                    .increment(1);
                }
            }
        }
    }

    /// How many (service, method) pairs keep their handles for the life of the process; calls of pairs past
    /// it (names made up at run time) register theirs at each call.
    const KEPT: usize = 4_096;

    type Kept = hashbrown::HashMap<(Name, Name), &'static MethodCalls>;

    /// The handles kept, for the process.
    static KEPT_CALLS: LazyLock<Mutex<Kept>> = LazyLock::new(Mutex::default);

    thread_local! {
        /// The handles this thread has looked up: a call looks its method up without a lock or a shared write.
        static LOOKED_UP: RefCell<Kept> = RefCell::new(Kept::default());
    }

    /// `(service, method)` borrowed, to look a pair up without making its key; it hashes as the tuple of
    /// names does (a `Cow<str>` hashes as its `str`).
    #[derive(Hash)]
    struct Pair<'a>(&'a str, &'a str);

    impl hashbrown::Equivalent<(Name, Name)> for Pair<'_> {
        fn equivalent(&self, key: &(Name, Name)) -> bool {
            self.0 == key.0 && self.1 == key.1
        }
    }

    /// The kept handles of `(service, method)`; `None` past [`KEPT`] pairs.
    fn kept(service: &Name, method: &Name) -> Option<&'static MethodCalls> {
        LOOKED_UP.with(|looked_up| {
            if let Some(calls) = looked_up.borrow().get(&Pair(service, method)) {
                return Some(*calls);
            }
            let calls = {
                let mut kept = KEPT_CALLS.lock().unwrap_or_else(PoisonError::into_inner);
                match kept.get(&Pair(service, method)) {
                    Some(calls) => *calls,
                    None if kept.len() >= KEPT => return None,
                    None => {
                        // Leaked on purpose: at most `KEPT` of them, each kept for the life of the process.
                        let calls: &'static MethodCalls = Box::leak(Box::new(MethodCalls::new(service, method)));
                        kept.insert((service.clone(), method.clone()), calls);
                        calls
                    }
                }
            };
            looked_up.borrow_mut().insert((service.clone(), method.clone()), calls);
            Some(calls)
        })
    }

    enum Calls {
        Kept(&'static MethodCalls),
        Own(Box<MethodCalls>),
    }

    impl Calls {
        fn get(&self) -> &MethodCalls {
            match self {
                Calls::Kept(calls) => calls,
                Calls::Own(calls) => calls,
            }
        }
    }

    /// One call, metered from its send to its end; a call whose future is dropped first counts as `dropped`.
    pub(crate) struct CallMeter {
        calls: Option<Calls>,
        started: Instant,
    }

    impl CallMeter {
        pub(crate) fn start(_: &ClientMetrics, service: &Name, method: &Name) -> CallMeter {
            let calls = match kept(service, method) {
                Some(calls) => Calls::Kept(calls),
                None => Calls::Own(Box::new(MethodCalls::new(service, method))),
            };
            calls.get().in_flight.increment(1.0);
            CallMeter { calls: Some(calls), started: Instant::now() }
        }

        pub(crate) fn finish<T>(mut self, result: &Result<T, Error>) {
            if let Some(calls) = self.calls.take() {
                calls.get().record(self.started, super::outcome(result));
            }
        }
    }

    impl Drop for CallMeter {
        fn drop(&mut self) {
            if let Some(calls) = self.calls.take() {
                calls.get().record(self.started, "dropped");
            }
        }
    }

    /// A server's metrics, registered when it starts.
    pub(crate) struct ServerMetrics {
        service: &'static str,
        methods: hashbrown::HashMap<&'static str, MethodHandling>,
        unknown: MethodHandling,
        pub(crate) retries: Counter,
        pub(crate) dead_lettered: Counter,
        pub(crate) fenced: Counter,
        pub(crate) cancelled: Counter,
        pub(crate) dedup_hits: Counter,
        pub(crate) expired: Counter,
        pub(crate) panics: Counter,
    }

    struct MethodHandling {
        name: &'static str,
        ok: Counter,
        duration: Histogram,
    }

    impl MethodHandling {
        fn new(service: &'static str, name: &'static str) -> MethodHandling {
            MethodHandling {
                name,
                ok: counter!("mqrpc_server_handled_total", "service" => service, "method" => name, "code" => "ok"),
                duration: histogram!("mqrpc_server_handler_duration_seconds", "service" => service, "method" => name),
            }
        }
    }

    impl ServerMetrics {
        pub(crate) fn new(service: &'static str, methods: &'static [MethodInfo]) -> ServerMetrics {
            let count = |name: &'static str| counter!(name, "service" => service);
            ServerMetrics {
                service,
                methods: methods
                    .iter()
                    .map(|method| (method.name, MethodHandling::new(service, method.name)))
                    .collect(),
                unknown: MethodHandling::new(service, "unknown"),
                retries: count("mqrpc_server_retries_total"),
                dead_lettered: count("mqrpc_server_dead_lettered_total"),
                fenced: count("mqrpc_server_fenced_total"),
                cancelled: count("mqrpc_server_cancelled_total"),
                dedup_hits: count("mqrpc_server_dedup_hits_total"),
                expired: count("mqrpc_server_expired_total"),
                panics: count("mqrpc_server_panics_total"),
            }
        }

        fn method(&self, method: &str) -> &MethodHandling {
            self.methods.get(method).unwrap_or(&self.unknown)
        }

        /// Counts a request of `method` answered (or acked) with `result`.
        pub(crate) fn handled(&self, method: &str, result: &Result<bytes::Bytes, Status>) {
            let handling = self.method(method);
            match result {
                Ok(_) => handling.ok.increment(1),
                Err(status) => self.handled_with(handling.name, status.code().label()),
            }
        }

        /// Counts a request of `method` dead-lettered.
        pub(crate) fn handled_dead_lettered(&self, method: &str) {
            self.handled_with(self.method(method).name, crate::status::Code::DeadLettered.label());
        }

        fn handled_with(&self, method: &'static str, code: &'static str) {
            counter!("mqrpc_server_handled_total", "service" => self.service, "method" => method, "code" => code)
                .increment(1);
        }

        /// Records how long a handler of `method` ran, from `started`.
        pub(crate) fn ran(&self, method: &str, started: Started) {
            self.method(method).duration.record(started.0.elapsed());
        }
    }

    /// When something timed began.
    pub(crate) struct Started(Instant);

    impl Started {
        pub(crate) fn now() -> Started {
            Started(Instant::now())
        }
    }
}

#[cfg(not(feature = "metrics"))]
mod disabled {
    use crate::error::Error;
    use crate::method::MethodInfo;
    use crate::status::Status;

    /// Nothing, without the `metrics` feature.
    pub(crate) struct ClientMetrics;

    impl ClientMetrics {
        pub(crate) fn new() -> ClientMetrics {
            ClientMetrics
        }

        pub(crate) fn late_reply(&self) {}
        pub(crate) fn lost_reply(&self) {}
    }

    /// Nothing, without the `metrics` feature.
    pub(crate) struct CallMeter;

    impl CallMeter {
        pub(crate) fn start(_: &ClientMetrics, _: &str, _: &str) -> CallMeter {
            CallMeter
        }

        pub(crate) fn finish<T>(self, result: &Result<T, Error>) {
            let _ = super::outcome(result);
        }
    }

    /// Counters that count nothing, without the `metrics` feature.
    pub(crate) struct NoCounter;

    impl NoCounter {
        pub(crate) fn increment(&self, _: u64) {}
    }

    /// Nothing, without the `metrics` feature.
    pub(crate) struct ServerMetrics {
        pub(crate) retries: NoCounter,
        pub(crate) dead_lettered: NoCounter,
        pub(crate) fenced: NoCounter,
        pub(crate) cancelled: NoCounter,
        pub(crate) dedup_hits: NoCounter,
        pub(crate) expired: NoCounter,
        pub(crate) panics: NoCounter,
    }

    impl ServerMetrics {
        pub(crate) fn new(_: &'static str, _: &'static [MethodInfo]) -> ServerMetrics {
            ServerMetrics {
                retries: NoCounter,
                dead_lettered: NoCounter,
                fenced: NoCounter,
                cancelled: NoCounter,
                dedup_hits: NoCounter,
                expired: NoCounter,
                panics: NoCounter,
            }
        }

        pub(crate) fn handled(&self, _: &str, _: &Result<bytes::Bytes, Status>) {}

        pub(crate) fn handled_dead_lettered(&self, _: &str) {}

        pub(crate) fn ran(&self, _: &str, _: Started) {}
    }

    /// Nothing, without the `metrics` feature: no clock is read, and a future that holds it is no larger.
    pub(crate) struct Started;

    impl Started {
        pub(crate) fn now() -> Started {
            Started
        }
    }
}
