//! The Redis dedup store shared by workers (`rpc_broker::adapter::redis_dedup::RedisDedup`), against the Redis at
//! `MQRPC_REDIS_URL` (`.ci/run` sets it; a build without it ignores these tests).

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use mqrpc_tests::service::{Events, ProbeClient, ProbeServer, Worker};
use mqrpc_tests::{eventually_async, log_from_env, required_url};
use rpc_broker::adapter::redis_dedup::RedisDedup;
use rpc_core::{Begin, Client, Code, DedupStore, Server, Status};
use uuid::Uuid;

use crate::WAIT;

/// A store on the test Redis with keys of its own.
async fn store(prefix: &str) -> RedisDedup {
    log_from_env();
    let url = required_url("MQRPC_REDIS_URL");
    let store = RedisDedup::connect(&url).await.expect("connects to Redis at MQRPC_REDIS_URL");
    store.prefix(prefix.to_owned()).window(Duration::from_secs(60))
}

/// Keys of this test run only.
fn prefix() -> String {
    format!("mqrpc:test:{}:", Uuid::new_v4().simple())
}

/// Three workers, each with its own connection to the store, take 300 calls: 100 keys, each sent three times
/// at once. Every key runs once in all, and the duplicates get its reply wherever they land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_redis), ignore = "needs Redis: MQRPC_REDIS_URL (bash .ci/brokers)")]
async fn workers_sharing_the_store_run_each_key_once() {
    let prefix = prefix();
    let broker = rpc_broker::Embedded::new();
    let events = Arc::new(Events::default());
    let mut servers = Vec::new();
    for name in ["a", "b", "c"] {
        let store = store(&prefix).await;
        let worker = Worker { name: name.into(), events: Arc::clone(&events), client: None };
        let server = Server::new(broker.clone()).concurrency(8).prefetch(8).dedup(store);
        servers.push(server.serve(ProbeServer::new(worker)).await.expect("serves"));
    }
    let client = Client::connect(broker.clone()).await.expect("connects");
    let probe = ProbeClient::new(&client);
    let calls = (0..100).flat_map(|n| (0..3).map(move |_| (n, format!("order-{n}"))).collect::<Vec<_>>());
    let replies = join_all(calls.map(|(n, key)| probe.count(n).idempotency_key(key).timeout(WAIT).into_future())).await;
    assert!(replies.iter().all(|reply| matches!(reply, Ok(1))), "{replies:?}");
    let counts = events.counts.lock().expect("not poisoned").clone();
    assert_eq!(counts.len(), 100);
    assert!(counts.values().all(|count| *count == 1), "a key ran twice: {counts:?}");
    let stats: Vec<_> = servers.iter().map(|server| server.stats()).collect();
    assert_eq!(stats.iter().map(|stats| stats.deduplicated).sum::<u64>(), 200, "{stats:?}");
    assert!(stats.iter().filter(|stats| stats.handled > 0).count() >= 2, "one worker took everything: {stats:?}");
}

/// A claim holds other workers back until its outcome is stored; an abandoned claim frees the key at once; the
/// claim of a worker that died (its store dropped, no more renewals) frees the key once its lease runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_redis), ignore = "needs Redis: MQRPC_REDIS_URL (bash .ci/brokers)")]
async fn claims_are_exclusive_and_run_out_with_their_worker() {
    let prefix = prefix();
    let first = store(&prefix).await;
    let second = store(&prefix).await;
    assert!(matches!(first.begin("k").await, Ok(Begin::Execute)));
    assert!(matches!(second.begin("k").await, Ok(Begin::InProgress(_))));
    let failed = Status::new(Code::Application, "refused").with_details(Bytes::from_static(b"\x01"));
    first.complete("k", Err(failed.clone())).await.expect("stored");
    match second.begin("k").await {
        Ok(Begin::Done(Err(status))) => assert_eq!(status, failed),
        other => panic!("expected the stored failure, got {other:?}"),
    }

    assert!(matches!(first.begin("abandoned").await, Ok(Begin::Execute)));
    first.abandon("abandoned").await;
    assert!(matches!(second.begin("abandoned").await, Ok(Begin::Execute)));
    second.complete("abandoned", Ok(Bytes::from_static(b"\x07"))).await.expect("stored");
    assert!(matches!(first.begin("abandoned").await, Ok(Begin::Done(Ok(body))) if &body[..] == b"\x07"));

    // A worker with a short lease claims a key and dies before completing it.
    let short = store(&prefix).await.lease(Duration::from_millis(300));
    assert!(matches!(short.begin("orphan").await, Ok(Begin::Execute)));
    // While it lives, it renews the claim past its lease.
    let renewed = tokio::time::Instant::now() + Duration::from_millis(900);
    while tokio::time::Instant::now() < renewed {
        assert!(matches!(second.begin("orphan").await, Ok(Begin::InProgress(_))), "a live claim ran out");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(short);
    eventually_async("the dead worker's claim to run out", WAIT, || async {
        matches!(second.begin("orphan").await, Ok(Begin::Execute))
    })
    .await;
}
