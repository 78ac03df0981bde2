//! A client process for the interop tests: calls the suite's `Probe` service, whoever serves it, through a
//! broker, and checks the answers.
//!
//! ```text
//! probe-client URL NAMESPACE
//! ```
//!
//! `URL` picks the transport as `probe-worker` does: `mqrpc://` our broker, `amqp://` RabbitMQ, `nats://` NATS
//! (JetStream mode when `MQRPC_PROBE_STREAM_PREFIX` names the harness's stream prefix). It runs a fixed list of
//! checks with the typed client (`ProbeClient`) against the service queue `NAMESPACE.suite.Probe`: `add`'s
//! result; `div`'s application errors arriving typed (`MathError`); a method the worker does not serve
//! (`whoami`, which the Python worker of `tests/interop` leaves out) answered as `UnknownMethod`; arguments
//! as an array accepted and ill-typed, missing or undecodable ones answered as `InvalidArgument` (through the
//! untyped `Client::request`); a 1 ms budget ending the call typed, the worker serving the next; a oneway
//! `record`, then `count` counting on; 1,000 concurrent `add` calls all answered correctly; and no call left
//! pending at the end. It prints one line per check, `ok NAME` or `FAIL NAME: WHY`, and exits with status 1 if
//! any failed (2 for bad usage or a transport that cannot be set up).

use std::time::Duration;

use futures::future::join_all;
use mqrpc_tests::service::{MathError, ProbeClient};
use rpc_core::{Code, Error};

/// How long a single call may take before its check fails.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How many `add` calls run at once in the `concurrent` check.
const CONCURRENT: i64 = 1000;

/// The outcome of one check: `Err` says why it failed.
type Outcome = Result<(), String>;

async fn check_add(probe: &ProbeClient) -> Outcome {
    match probe.add(2, 3).timeout(CALL_TIMEOUT).await {
        Ok(5) => Ok(()),
        other => Err(format!("add(2, 3) gave {other:?}, not Ok(5)")),
    }
}

async fn check_div(probe: &ProbeClient) -> Outcome {
    match probe.div(8, 2).timeout(CALL_TIMEOUT).await {
        Ok(Ok(4)) => {}
        other => return Err(format!("div(8, 2) gave {other:?}, not Ok(Ok(4))")),
    }
    match probe.div(1, 0).timeout(CALL_TIMEOUT).await {
        Ok(Err(MathError::DivideByZero)) => {}
        other => return Err(format!("div(1, 0) gave {other:?}, not Ok(Err(DivideByZero))")),
    }
    match probe.div(7, 2).timeout(CALL_TIMEOUT).await {
        Ok(Err(MathError::NotExact { remainder: 1 })) => Ok(()),
        other => Err(format!("div(7, 2) gave {other:?}, not Ok(Err(NotExact {{ remainder: 1 }}))")),
    }
}

async fn check_unknown_method(probe: &ProbeClient) -> Outcome {
    match probe.whoami().timeout(CALL_TIMEOUT).await {
        Err(Error::Remote(status)) if status.code() == Code::UnknownMethod => Ok(()),
        other => Err(format!("whoami() gave {other:?}, not Err(Remote(UnknownMethod))")),
    }
}

async fn check_bad_arguments(client: &rpc_core::Client) -> Outcome {
    let service = "suite.Probe";
    // Arguments as an array of the values in parameter order are accepted.
    let array = rmp_serde::to_vec(&(2i64, 3i64)).map_err(|error| error.to_string())?;
    match client.request(service, "add", array.into()).timeout(CALL_TIMEOUT).await {
        Ok(body) if rmp_serde::from_slice::<i64>(&body).ok() == Some(5) => {}
        other => return Err(format!("add([2, 3]) gave {other:?}, not 5")),
    }
    // A string where an i64 belongs, a missing parameter, and a body that is not MessagePack.
    let wrong_type = rmp_serde::to_vec_named(&std::collections::BTreeMap::from([("a", "two"), ("b", "three")]))
        .map_err(|error| error.to_string())?;
    let missing =
        rmp_serde::to_vec_named(&std::collections::BTreeMap::from([("a", 2i64)])).map_err(|error| error.to_string())?;
    for (what, args) in [("a string argument", wrong_type), ("a missing one", missing), ("not MessagePack", vec![0xc1])]
    {
        match client.request(service, "add", args.into()).timeout(CALL_TIMEOUT).await {
            Err(Error::Remote(status)) if status.code() == Code::InvalidArgument => {}
            other => return Err(format!("add with {what} gave {other:?}, not Err(Remote(InvalidArgument))")),
        }
    }
    Ok(())
}

async fn check_short_deadline(probe: &ProbeClient) -> Outcome {
    // Its budget runs out on the way or in the queue: the caller's own deadline ends it, typed, whatever the
    // worker makes of it, and the worker serves the next call.
    match probe.add(1, 1).timeout(Duration::from_millis(1)).await {
        Err(Error::Timeout(_)) => {}
        Err(Error::Remote(status)) if status.code() == Code::DeadlineExceeded => {}
        Ok(2) => {}
        other => return Err(format!("add(1, 1) with 1 ms gave {other:?}, not Timeout, DeadlineExceeded or 2")),
    }
    check_add(probe).await
}

async fn check_oneway(probe: &ProbeClient) -> Outcome {
    // A key of its own, so that a worker that serves several runs still starts counting at 1.
    let n = i64::from(std::process::id()) * 1000 + 17;
    probe.record(7).await.map_err(|error| format!("record(7) was not sent: {error}"))?;
    for expected in 1..=2 {
        match probe.count(n).timeout(CALL_TIMEOUT).await {
            Ok(count) if count == expected => {}
            other => return Err(format!("count({n}) call {expected} after record gave {other:?}, not Ok({expected})")),
        }
    }
    Ok(())
}

async fn check_concurrent(probe: &ProbeClient) -> Outcome {
    let calls = (0..CONCURRENT).map(|i| async move { (i, probe.add(i, 2 * i).timeout(Duration::from_secs(30)).await) });
    let wrong: Vec<String> = join_all(calls)
        .await
        .into_iter()
        .filter(|(i, result)| !matches!(result, Ok(sum) if *sum == 3 * i))
        .map(|(i, result)| format!("add({i}, {}) gave {result:?}", 2 * i))
        .collect();
    match wrong.first() {
        None => Ok(()),
        Some(first) => Err(format!("{} of {CONCURRENT} calls wrong, the first: {first}", wrong.len())),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(url), Some(namespace)) = (args.next(), args.next()) else {
        eprintln!("usage: probe-client URL NAMESPACE");
        std::process::exit(2);
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let client = match mqrpc_tests::process_transport(&url).await {
        Ok(transport) => rpc_core::Client::builder(transport).namespace(namespace).connect().await,
        Err(error) => Err(error),
    };
    let client = match client {
        Ok(client) => client,
        Err(error) => {
            println!("FAIL connect: {error}");
            std::process::exit(2);
        }
    };
    let probe = ProbeClient::new(&client);
    let mut failed = false;
    let mut report = |name: &str, outcome: Outcome| match outcome {
        Ok(()) => println!("ok {name}"),
        Err(why) => {
            failed = true;
            println!("FAIL {name}: {why}");
        }
    };
    report("add", check_add(&probe).await);
    report("div", check_div(&probe).await);
    report("unknown_method", check_unknown_method(&probe).await);
    report("bad_arguments", check_bad_arguments(&client).await);
    report("short_deadline", check_short_deadline(&probe).await);
    report("oneway", check_oneway(&probe).await);
    report("concurrent", check_concurrent(&probe).await);
    let pending = client.stats().pending;
    report("no_pending", if pending == 0 { Ok(()) } else { Err(format!("{pending} calls still pending")) });
    std::process::exit(i32::from(failed));
}
