//! RabbitMQ nodes of a test's own, started from RabbitMQ's scripts (`MQRPC_RABBITMQ_BIN`): names
//! `mqrpc<id>-<letter>@localhost`, ports, directories and an Erlang cookie of their own, no plugins. They are
//! killed when the value is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use uuid::Uuid;

use crate::free_port;

/// One node of a [`RabbitNodes`].
#[derive(Debug)]
pub struct Node {
    /// The Erlang node name, `mqrpc<id>-<letter>@localhost`.
    pub name: String,
    /// Its AMQP port on loopback.
    pub port: u16,
    directory: PathBuf,
}

/// A set of RabbitMQ nodes, each on its own, or joined into one cluster by [`RabbitNodes::cluster`].
#[derive(Debug)]
pub struct RabbitNodes {
    directory: tempfile::TempDir,
    bin: PathBuf,
    /// The nodes, in the order they were started.
    pub nodes: Vec<Node>,
    /// The `rabbitmq-server` scripts that started the nodes.
    scripts: Vec<Child>,
}

impl RabbitNodes {
    /// Starts `count` nodes (at most 26) with RabbitMQ's scripts in `bin`, each with `config` added to its
    /// `rabbitmq.conf` after its AMQP listener, and waits until every one runs.
    pub fn start(bin: &str, count: usize, config: &str) -> RabbitNodes {
        let directory = tempfile::tempdir().expect("a directory");
        let bin = PathBuf::from(bin);
        let home = directory.path().join("home");
        std::fs::create_dir_all(&home).expect("a home");
        let cookie = home.join(".erlang.cookie");
        std::fs::write(&cookie, Uuid::new_v4().simple().to_string().to_uppercase()).expect("a cookie");
        std::fs::set_permissions(&cookie, std::os::unix::fs::PermissionsExt::from_mode(0o400)).expect("private");
        let id = &Uuid::new_v4().simple().to_string()[..8];
        let mut nodes = RabbitNodes { directory, bin, nodes: Vec::new(), scripts: Vec::new() };
        for letter in ('a'..='z').take(count) {
            let (port, distribution) = (free_port(), free_port());
            let name = format!("mqrpc{id}-{letter}@localhost");
            let dir = nodes.directory.path().join(letter.to_string());
            std::fs::create_dir_all(&dir).expect("a node directory");
            std::fs::write(dir.join("enabled_plugins"), "").expect("writes");
            let conf = format!("listeners.tcp.default = 127.0.0.1:{port}\nloopback_users = none\n{config}\n");
            std::fs::write(dir.join("rabbitmq.conf"), conf).expect("writes");
            let script = Command::new(nodes.bin.join("rabbitmq-server"))
                .env("HOME", &home)
                .env("RABBITMQ_NODENAME", &name)
                .env("RABBITMQ_NODE_PORT", port.to_string())
                .env("RABBITMQ_DIST_PORT", distribution.to_string())
                .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
                .env("RABBITMQ_LOG_BASE", dir.join("log"))
                .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
                .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"))
                .env("RABBITMQ_PID_FILE", dir.join("pid"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("rabbitmq-server runs");
            nodes.scripts.push(script);
            nodes.nodes.push(Node { name, port, directory: dir });
        }
        for node in &nodes.nodes {
            let pid = node.directory.join("pid");
            nodes.ctl(&node.name, &["wait", &pid.to_string_lossy(), "--timeout", "120"]);
        }
        nodes
    }

    /// Starts three nodes and joins the second and third to the first.
    pub fn cluster(bin: &str) -> RabbitNodes {
        let cluster = RabbitNodes::start(bin, 3, "");
        let first = cluster.nodes[0].name.clone();
        for node in &cluster.nodes[1..] {
            cluster.ctl(&node.name, &["stop_app"]);
            cluster.ctl(&node.name, &["join_cluster", &first]);
            cluster.ctl(&node.name, &["start_app"]);
        }
        cluster
    }

    /// `rabbitmqctl -n node args`, which must succeed; its output.
    pub fn ctl(&self, node: &str, args: &[&str]) -> String {
        let output = Command::new(self.bin.join("rabbitmqctl"))
            .env("HOME", self.directory.path().join("home"))
            .args(["-n", node])
            .args(args)
            .output()
            .expect("rabbitmqctl runs");
        assert!(output.status.success(), "rabbitmqctl -n {node} {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// A directory of the nodes' own, for files their configuration names (removed with them).
    pub fn directory(&self) -> &Path {
        self.directory.path()
    }

    /// The AMQP URL of node `n` as `guest`, on the default virtual host.
    pub fn url(&self, n: usize) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.nodes[n].port)
    }

    /// The node that leads quorum queue `queue`, asked of node `n`.
    pub fn leader(&self, n: usize, queue: &str) -> Option<String> {
        let listed = self.ctl(&self.nodes[n].name, &["list_queues", "-q", "--no-table-headers", "name", "leader"]);
        listed.lines().find_map(|line| {
            let mut columns = line.split_whitespace();
            (columns.next() == Some(queue)).then(|| columns.next().map(str::to_owned)).flatten()
        })
    }

    /// Kills node `name`'s Erlang VM with SIGKILL.
    pub fn kill(&self, name: &str) {
        let node = self.nodes.iter().find(|node| node.name == name).expect("a node of the set");
        let pid = std::fs::read_to_string(node.directory.join("pid")).expect("its pid");
        let killed = Command::new("kill").args(["-9", pid.trim()]).status().expect("kill runs");
        assert!(killed.success(), "kill -9 {pid}");
    }
}

impl Drop for RabbitNodes {
    fn drop(&mut self) {
        for node in &self.nodes {
            if let Ok(pid) = std::fs::read_to_string(node.directory.join("pid")) {
                let _ = Command::new("kill").args(["-9", pid.trim()]).stderr(Stdio::null()).status();
            }
        }
        for script in &mut self.scripts {
            let _ = script.kill();
            let _ = script.wait();
        }
    }
}
