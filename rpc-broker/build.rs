//! Tells the integration tests which external brokers this build can reach: `MQRPC_AMQP_URL` and
//! `MQRPC_NATS_URL`, set when the tests are built, turn on `mqrpc_amqp` and `mqrpc_nats`; a test that needs one
//! that is unset is ignored, with the reason, instead of passing without running. Nothing else reads them.

fn main() {
    for (variable, cfg) in [("MQRPC_AMQP_URL", "mqrpc_amqp"), ("MQRPC_NATS_URL", "mqrpc_nats")] {
        println!("cargo::rustc-check-cfg=cfg({cfg})");
        println!("cargo::rerun-if-env-changed={variable}");
        if std::env::var_os(variable).is_some_and(|value| !value.is_empty()) {
            println!("cargo::rustc-cfg={cfg}");
        }
    }
}
