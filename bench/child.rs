//! What the soak and the scale programs share: our broker as a child process of the program itself (run with
//! `--role broker`), so that its resident set and CPU time are its own, and a process's resident set.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

/// `--role broker`: our broker, as `rpc-broker serve` runs it, taking at most `max_connections`; prints its URL.
pub(crate) async fn broker_role(max_connections: usize) -> Result<(), String> {
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let mut config = rpc_broker::server::ServerConfig::default();
    config.max_connections = max_connections;
    let mut server =
        rpc_broker::server::BrokerServer::bind(address, config).await.map_err(|error| error.to_string())?;
    println!("ready {}", server.url());
    server.run().await;
    Ok(())
}

/// Starts our broker as a child process (this program with `--role broker`); the child, its URL and its pid.
pub(crate) async fn start_broker() -> Result<(tokio::process::Child, String, u32), String> {
    let exe = std::env::current_exe().map_err(|error| format!("cannot find this program: {error}"))?;
    let mut child = tokio::process::Command::new(exe)
        .args(["--role", "broker"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| format!("cannot start the broker: {error}"))?;
    let pid = child.id().ok_or("the broker exited at once")?;
    let stdout = child.stdout.take().ok_or("the broker has no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .map_err(|_| "the broker did not start within 30 s".to_owned())?
        .map_err(|error| error.to_string())?
        .ok_or("the broker exited")?;
    let url = line.strip_prefix("ready ").ok_or(format!("the broker said `{line}`"))?.to_owned();
    Ok((child, url, pid))
}

/// A process's resident set in KiB, from `/proc/<pid>/status`.
pub(crate) fn rss_kib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
