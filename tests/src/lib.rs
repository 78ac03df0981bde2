//! The end-to-end scenario suite of mqrpc, written against the [`Transport`] trait only, so that every
//! transport runs the same scenarios: a transport that passes it is a transport that works.
//!
//! A transport joins with one line in `tests/e2e.rs`:
//!
//! ```text
//! mqrpc_tests::scenario_suite!(embedded, mqrpc_tests::EmbeddedHarness::new());
//! ```

pub mod service;
pub mod suite;

use std::sync::Arc;
use std::time::Duration;

use rpc_core::{BoxFuture, Transport};

/// Opens connections to the broker under test.
pub trait Harness: Send + Sync + 'static {
    /// A new connection, as a separate process would open it. Connections of one harness share the broker.
    fn connect(&self) -> BoxFuture<'_, Arc<dyn Transport>>;
}

/// The embedded broker: every connection is a handle to the same in-process engine.
#[derive(Debug, Default)]
pub struct EmbeddedHarness {
    broker: rpc_broker::Embedded,
}

impl EmbeddedHarness {
    /// A harness on a fresh embedded broker.
    pub fn new() -> EmbeddedHarness {
        EmbeddedHarness::default()
    }
}

impl Harness for EmbeddedHarness {
    fn connect(&self) -> BoxFuture<'_, Arc<dyn Transport>> {
        let transport: Arc<dyn Transport> = Arc::new(self.broker.clone());
        Box::pin(std::future::ready(transport))
    }
}

/// Our own broker server on a free loopback port, reached through [`rpc_broker::Remote`]: each connection is a
/// TCP connection of its own, as a separate process would open.
#[derive(Debug)]
pub struct RemoteHarness {
    server: rpc_broker::server::BrokerServer,
}

impl RemoteHarness {
    /// Starts a broker server with the default configuration.
    pub async fn start() -> RemoteHarness {
        RemoteHarness::start_with(rpc_broker::server::ServerConfig::default()).await
    }

    /// Starts a broker server with `config`.
    pub async fn start_with(config: rpc_broker::server::ServerConfig) -> RemoteHarness {
        let address = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let server = rpc_broker::server::BrokerServer::bind(address, config).await.expect("the broker starts");
        RemoteHarness { server }
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The server.
    pub fn server(&self) -> &rpc_broker::server::BrokerServer {
        &self.server
    }
}

impl Harness for RemoteHarness {
    fn connect(&self) -> BoxFuture<'_, Arc<dyn Transport>> {
        Box::pin(async move {
            let remote = rpc_broker::Remote::connect(&self.url()).await.expect("connects to the broker");
            let transport: Arc<dyn Transport> = Arc::new(remote);
            transport
        })
    }
}

/// Waits until `condition` holds, checking every few milliseconds, and panics naming `what` after `limit`.
pub async fn eventually(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One `#[tokio::test]` per scenario of [`suite`] for the transport that `$harness` connects to.
#[macro_export]
macro_rules! scenario_suite {
    ($name:ident, $harness:expr) => {
        mod $name {
            $crate::scenario_suite!(@tests $harness;
                typed_results_and_typed_errors,
                unknown_method,
                timeout_leaves_no_pending_call,
                late_reply_is_dropped_and_counted,
                ten_thousand_concurrent_calls,
                panicking_handler_becomes_an_error_reply,
                redelivery_when_a_worker_disappears,
                queue_full_from_a_bounded_queue,
                dead_letter_after_max_deliveries,
                broadcast_reaches_each_group_once,
                competing_workers_share_the_load,
                durable_callback_after_the_caller_restarted,
                graceful_shutdown_loses_nothing,
                forced_shutdown_requeues_running_calls,
                expired_request_is_not_executed,
                oneway_call_runs,
                in_process_callback_receives_the_result,
                nested_call_inherits_the_deadline,
                priority_orders_calls_or_is_refused,
                durable_callback_panic_is_dead_lettered,
                closing_the_client_fails_waiting_calls,
            );
        }
    };
    (@tests $harness:expr; $($scenario:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                let harness = $harness;
                $crate::suite::$scenario(&harness).await;
            }
        )*
    };
}
