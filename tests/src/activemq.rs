//! An ActiveMQ Classic of a test's own.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::on_a_free_port;

/// An ActiveMQ of the test's own (`MQRPC_ACTIVEMQ` names the `activemq` command, `MQRPC_ACTIVEMQ_CLASSPATH` the
/// jars it needs besides its own), on a free port, with `.ci/activemq.xml` and a data directory of its own, run in
/// the foreground (`activemq console`) in a process group of its own: killing the group kills the JVM (SIGKILL,
/// no shutdown), and starting it again on the same directory recovers its persistent messages from its journal.
pub struct PrivateActiveMq {
    command: String,
    classpath: String,
    port: u16,
    directory: std::path::PathBuf,
    /// The STOMP login and passcode the broker requires, if it requires one.
    login: Option<(String, String)>,
    child: Option<Child>,
}

impl std::fmt::Debug for PrivateActiveMq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateActiveMq").field("port", &self.port).field("directory", &self.directory).finish()
    }
}

impl PrivateActiveMq {
    /// Starts the broker of `.ci/activemq.xml`.
    pub fn start() -> PrivateActiveMq {
        PrivateActiveMq::start_with("", None)
    }

    /// Starts the broker with `plugins` (XML) among its plugins; `login`, a STOMP login and passcode, is what
    /// the check that it is up connects with.
    pub fn start_with(plugins: &str, login: Option<(&str, &str)>) -> PrivateActiveMq {
        let command = crate::required_url("MQRPC_ACTIVEMQ");
        let classpath = std::env::var("MQRPC_ACTIVEMQ_CLASSPATH").unwrap_or_default();
        on_a_free_port("ActiveMQ", |port| {
            let directory = std::env::temp_dir().join(format!("mqrpc-activemq-{}", Uuid::new_v4().simple()));
            std::fs::create_dir_all(&directory)?;
            let configuration = include_str!("../../.ci/activemq.xml")
                .replace("DATA_DIR", &directory.join("data").to_string_lossy())
                .replace("127.0.0.1:61623", &format!("127.0.0.1:{port}"))
                .replace("brokerName=\"mqrpc\"", &format!("brokerName=\"mqrpc-{port}\""))
                .replace("<statisticsBrokerPlugin/>", &format!("<statisticsBrokerPlugin/>{plugins}"));
            std::fs::write(directory.join("activemq.xml"), configuration)?;
            let mut server = PrivateActiveMq {
                command: command.clone(),
                classpath: classpath.clone(),
                port,
                directory,
                login: login.map(|(user, passcode)| (user.to_owned(), passcode.to_owned())),
                child: None,
            };
            server.spawn().map(|()| server)
        })
    }

    /// `stomp://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("stomp://127.0.0.1:{}", self.port)
    }

    /// Starts the broker and waits until it answers a STOMP CONNECT.
    pub fn spawn(&mut self) -> std::io::Result<()> {
        use std::os::unix::process::CommandExt;

        let user = Command::new("id").arg("-un").output()?;
        let configuration = format!("xbean:file:{}", self.directory.join("activemq.xml").to_string_lossy());
        let child = Command::new(&self.command)
            .args(["console", &configuration])
            .current_dir(&self.directory)
            .env("ACTIVEMQ_USER", String::from_utf8_lossy(&user.stdout).trim())
            .env("ACTIVEMQ_USER_CLASSPATH", &self.classpath)
            .env("ACTIVEMQ_PIDFILE", self.directory.join("pid"))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let child = self.child.insert(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait()? {
                return Err(std::io::Error::other(format!("ActiveMQ exited: {status}")));
            }
            match stomp_handshake(self.port, self.login.as_ref()) {
                Ok(()) => return Ok(()),
                Err(error) if Instant::now() >= deadline => {
                    return Err(std::io::Error::other(format!("ActiveMQ did not answer: {error}")));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Kills the broker's process group with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-s", "KILL", "--", &format!("-{}", child.id())]).status();
            let _ = child.wait();
            // The JVM is gone once nothing listens on its port any more.
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Whether an ActiveMQ answers a STOMP CONNECT on `port`, made with `login` if given.
fn stomp_handshake(port: u16, login: Option<&(String, String)>) -> std::io::Result<()> {
    use std::io::{Read, Write};

    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let credentials = login.map(|(user, passcode)| format!("login:{user}\npasscode:{passcode}\n")).unwrap_or_default();
    stream.write_all(format!("CONNECT\naccept-version:1.2\nhost:/\n{credentials}\n\0").as_bytes())?;
    let mut answer = [0u8; 256];
    let read = stream.read(&mut answer)?;
    let answer = String::from_utf8_lossy(&answer[..read]);
    if answer.starts_with("CONNECTED") && answer.contains("server:ActiveMQ") {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("not an ActiveMQ's answer: {answer:?}")))
    }
}

impl Drop for PrivateActiveMq {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}
