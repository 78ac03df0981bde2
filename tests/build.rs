//! Tells the tests which external brokers this build can reach: each `MQRPC_*` variable set when the tests are
//! built turns on a cfg, and a test that needs a variable that is unset is ignored, with the reason, instead of
//! passing without running. `eval "$(bash .ci/brokers)"` sets them all (`.ci/run` does).

fn main() {
    let settings = [
        ("MQRPC_AMQP_URL", "mqrpc_amqp"),
        ("MQRPC_NATS_URL", "mqrpc_nats"),
        ("MQRPC_REDIS_URL", "mqrpc_redis"),
        ("MQRPC_KAFKA_URL", "mqrpc_kafka"),
        ("MQRPC_TANSU", "mqrpc_tansu"),
        ("MQRPC_AMQP_CTL", "mqrpc_amqp_ctl"),
        ("MQRPC_NATS_SERVER", "mqrpc_nats_server"),
        ("MQRPC_STOMP_URL", "mqrpc_stomp"),
        ("MQRPC_STOMP_RABBIT_URL", "mqrpc_stomp_rabbit"),
        ("MQRPC_ACTIVEMQ", "mqrpc_activemq"),
        ("MQRPC_CHROMEDRIVER", "mqrpc_chromedriver"),
        ("MQRPC_REDIS_SERVER", "mqrpc_redis_server"),
        ("MQRPC_RABBITMQ_BIN", "mqrpc_rabbitmq_bin"),
    ];
    for (variable, cfg) in settings {
        println!("cargo::rustc-check-cfg=cfg({cfg})");
        println!("cargo::rerun-if-env-changed={variable}");
        if std::env::var_os(variable).is_some_and(|value| !value.is_empty()) {
            println!("cargo::rustc-cfg={cfg}");
        }
    }
    // Network namespaces (the partition tests) need root.
    println!("cargo::rustc-check-cfg=cfg(mqrpc_root)");
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status.lines().any(|line| line.starts_with("Uid:") && line.split_whitespace().nth(2) == Some("0"));
    if root {
        println!("cargo::rustc-cfg=mqrpc_root");
    }
}
