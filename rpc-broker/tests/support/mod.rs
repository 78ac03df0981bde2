//! What the broker server's test binaries share: a service to call, a broker on loopback with small limits, and
//! the frames of a peer that speaks the protocol by hand; the `rpc-broker` binary.

// Each test binary uses a part of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rpc_broker::protocol::{ClientFrame, ErrorCode, Frame, PROTOCOL_VERSION, ServerFrame};
use rpc_broker::server::{BrokerServer, ServerConfig};

#[rpc_core::service]
pub(crate) trait Echo {
    async fn echo(&self, n: u64) -> u64;
}

pub(crate) struct EchoImpl;

impl Echo for EchoImpl {
    async fn echo(&self, n: u64) -> u64 {
        n
    }
}

pub(crate) const MAX_FRAME: usize = 1024 * 1024;

pub(crate) fn config() -> ServerConfig {
    let mut config = ServerConfig::default();
    config.max_frame = MAX_FRAME;
    config.handshake_timeout = Duration::from_secs(1);
    config.heartbeat = Duration::from_millis(200);
    config
}

pub(crate) async fn start(config: ServerConfig) -> BrokerServer {
    BrokerServer::bind(SocketAddr::from(([127, 0, 0, 1], 0)), config).await.expect("the broker starts")
}

pub(crate) fn encode(frame: &impl Frame) -> Bytes {
    let mut buf = BytesMut::new();
    frame.encode(&mut buf);
    buf.freeze()
}

pub(crate) fn hello(token: &str) -> Bytes {
    encode(&ClientFrame::Hello { version: PROTOCOL_VERSION, token: token.into(), name: "raw".into() })
}

/// A `Publish` of `payload` to `queue` with no options: `quiet`, or confirmed by `req` (0: unconfirmed).
pub(crate) fn publish_frame(req: u32, queue: &str, payload: Bytes, quiet: bool) -> ClientFrame {
    ClientFrame::Publish {
        req,
        queue: queue.into(),
        priority: 0,
        ttl_ms: None,
        delay_ms: None,
        key: None,
        id: None,
        payload,
        quiet,
    }
}

/// The frames the broker sends on `raw` up to the `Ok` of request `req`, each within 5 s.
pub(crate) fn error_codes(frames: &[ServerFrame]) -> Vec<(u32, ErrorCode)> {
    frames
        .iter()
        .filter_map(|frame| match frame {
            ServerFrame::Error { req, code, .. } => Some((*req, *code)),
            _ => None,
        })
        .collect()
}

/// Runs the `rpc-broker` binary with `args` against `url`; returns its stdout, or panics with its stderr.
pub(crate) async fn cli(url: &str, args: &[&str]) -> String {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_rpc-broker"))
        .args(args)
        .env("MQRPC_BROKER", url)
        .output()
        .await
        .expect("the binary runs");
    assert!(output.status.success(), "rpc-broker {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}
