//! A tansu (Kafka protocol) broker of a test's own.

use std::process::{Child, Command, Stdio};

use crate::on_a_free_port;

/// A tansu (Kafka) broker of the test's own, on a free port, with memory storage. It advertises `advertised` as its
/// address, where clients reach it through a relay or a TLS terminator in front of it.
#[derive(Debug)]
pub struct PrivateTansu {
    /// The port it listens on.
    pub port: u16,
    child: Child,
}

impl PrivateTansu {
    /// Starts the `tansu` at `binary` on a free port, advertising `advertised`, and waits until it is ready.
    pub fn start(binary: &str, advertised: u16) -> PrivateTansu {
        on_a_free_port("tansu", |port| PrivateTansu::spawn(binary, port, advertised))
    }

    /// Starts the broker and waits until it says it is ready.
    fn spawn(binary: &str, port: u16, advertised: u16) -> std::io::Result<PrivateTansu> {
        use std::io::{BufRead, BufReader};

        let child = Command::new(binary)
            .args(["broker", "--listener-url", &format!("tcp://127.0.0.1:{port}")])
            .args(["--advertised-listener-url", &format!("tcp://127.0.0.1:{advertised}")])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let mut server = PrivateTansu { port, child };
        let stdout = server.child.stdout.take().ok_or_else(|| std::io::Error::other("no stdout"))?;
        // It prints `ready in ...` once it listens, or exits (the port was taken).
        for line in BufReader::new(stdout).lines() {
            if line?.starts_with("ready in") {
                return Ok(server);
            }
        }
        let status = server.child.wait()?;
        Err(std::io::Error::other(format!("tansu exited before it was ready: {status}")))
    }
}

impl Drop for PrivateTansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
