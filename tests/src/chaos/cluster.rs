//! A cluster of `shoal server` processes the chaos harness can kill, restart, freeze
//! and cut off.
//!
//! Unlike [`crate::Node`], every node's addresses are fixed before it first starts
//! (so a restart comes back where its peers knew it, and every node is seeded with
//! every other), and a node can run inside a network namespace.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::netlab::NetLab;
use crate::{http_get, shoal_bin, unique_temp_dir, Value};

/// Where the nodes run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// On 127.0.0.1, each on its own ports. No partitions.
    Loopback,
    /// Each in its own network namespace on a bridge; partitions are real cuts.
    Netns,
}

/// How long a node may take to print its ready line (a restart loads the registry
/// from a peer first).
const READY_TIMEOUT: Duration = Duration::from_secs(45);

struct ChaosNode {
    id: String,
    quic: SocketAddr,
    http: SocketAddr,
    advertise: Option<String>,
    namespace: Option<String>,
    root: PathBuf,
    child: Option<Child>,
    frozen: bool,
}

impl ChaosNode {
    fn log(&self) -> PathBuf {
        self.root.join("node.log")
    }
}

/// N node processes sharing one development CA.
pub struct ChaosCluster {
    nodes: Vec<ChaosNode>,
    ca_dir: PathBuf,
    args: Vec<String>,
    keep: bool,
    // Dropped after the nodes (see Drop).
    lab: Option<NetLab>,
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("binding an ephemeral UDP port")
        .port()
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("binding an ephemeral TCP port")
        .port()
}

impl ChaosCluster {
    /// Starts `n` nodes one after another (each ready before the next starts), every
    /// node seeded with every other. `args` are extra `shoal server` arguments for
    /// every node. `Err` when the mode cannot be set up here (no root for namespaces);
    /// a node that fails to start panics.
    pub async fn start(n: usize, mode: Mode, args: &[String]) -> Result<ChaosCluster, String> {
        let lab = match mode {
            Mode::Loopback => None,
            Mode::Netns => Some(NetLab::create(n)?),
        };
        let ca_dir = unique_temp_dir("shoal-chaos-ca");
        let mut nodes = Vec::new();
        for i in 0..n {
            let (quic, http, advertise, namespace) = match &lab {
                None => (
                    SocketAddr::from(([127, 0, 0, 1], free_udp_port())),
                    SocketAddr::from(([127, 0, 0, 1], free_tcp_port())),
                    None,
                    None,
                ),
                Some(lab) => (
                    SocketAddr::from((lab.ip(i), 7400)),
                    SocketAddr::from((lab.ip(i), 7401)),
                    Some(lab.ip(i).to_string()),
                    Some(lab.namespace(i).to_string()),
                ),
            };
            nodes.push(ChaosNode {
                id: format!("n{i}"),
                quic,
                http,
                advertise,
                namespace,
                root: unique_temp_dir(&format!("shoal-chaos-n{i}")),
                child: None,
                frozen: false,
            });
        }
        let mut cluster = ChaosCluster {
            nodes,
            ca_dir,
            args: args.to_vec(),
            keep: false,
            lab,
        };
        for i in 0..n {
            cluster.spawn(i).await;
        }
        Ok(cluster)
    }

    /// Keep the logs and data directories when dropped (a run that found
    /// violations), and print where they are.
    pub fn keep_logs(&mut self) {
        self.keep = true;
    }

    /// How many nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True for a cluster of no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`'s id (`n{i}`).
    pub fn id(&self, i: usize) -> &str {
        &self.nodes[i].id
    }

    /// Node `i`'s QUIC address.
    pub fn quic(&self, i: usize) -> SocketAddr {
        self.nodes[i].quic
    }

    /// Node `i`'s HTTP address.
    pub fn http(&self, i: usize) -> SocketAddr {
        self.nodes[i].http
    }

    /// The CA certificate clients trust.
    pub fn ca_file(&self) -> PathBuf {
        self.ca_dir.join("ca.pem")
    }

    /// The QUIC addresses of nodes `which`, as client server lists want them.
    pub fn servers(&self, which: &[usize]) -> Vec<String> {
        which
            .iter()
            .map(|&i| self.nodes[i].quic.to_string())
            .collect()
    }

    /// The network lab, in namespace mode.
    pub fn lab(&self) -> Option<&NetLab> {
        self.lab.as_ref()
    }

    /// Whether node `i`'s process runs (frozen or not).
    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// Whether node `i` is SIGSTOPped.
    pub fn is_frozen(&self, i: usize) -> bool {
        self.nodes[i].frozen
    }

    /// Node `i`'s process id.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().map(|c| c.id())
    }

    /// The last `lines` lines of node `i`'s log.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let path = self.nodes[i].log();
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let all: Vec<&str> = text.lines().collect();
                let from = all.len().saturating_sub(lines);
                format!("--- {} ---\n{}", path.display(), all[from..].join("\n"))
            }
            Err(e) => format!("(cannot read {}: {e})", path.display()),
        }
    }

    /// Where node `i`'s log is.
    pub fn log_path(&self, i: usize) -> PathBuf {
        self.nodes[i].log()
    }

    fn command(&self, i: usize) -> Command {
        let node = &self.nodes[i];
        let mut cmd = match &node.namespace {
            None => Command::new(shoal_bin()),
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(shoal_bin());
                c
            }
        };
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("SHOAL_") {
                cmd.env_remove(name);
            }
        }
        cmd.arg("server")
            .arg("--node-id")
            .arg(&node.id)
            .arg("--listen-addr")
            .arg(node.quic.to_string())
            .arg("--http-addr")
            .arg(node.http.to_string())
            .arg("--data-dir")
            .arg(node.root.join("data"))
            .arg("--dev-ca-dir")
            .arg(&self.ca_dir);
        if let Some(host) = &node.advertise {
            cmd.arg("--advertise-host").arg(host);
        }
        for (j, other) in self.nodes.iter().enumerate() {
            if j != i {
                cmd.arg("--seed").arg(other.quic.to_string());
            }
        }
        cmd.args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        cmd
    }

    /// Starts node `i` (which must not run) and waits for its ready line.
    async fn spawn(&mut self, i: usize) {
        assert!(self.nodes[i].child.is_none(), "n{i} is already running");
        let log_path = self.nodes[i].log();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log_path.display()));
        {
            use std::io::Write;
            let mut l = &log;
            let _ = writeln!(l, "----- chaos harness: starting n{i} -----");
        }
        let mut child = self
            .command(i)
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start n{i}: {e}"));
        let stdout = child.stdout.take().expect("stdout was piped");
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let id = self.nodes[i].id.clone();
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut seen = Vec::new();
        loop {
            let ready = rx.try_iter().any(|line| {
                let ok = line.starts_with(&format!("shoal node {id} ready:"));
                seen.push(line);
                ok
            });
            if ready {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "n{i} exited ({status}) before it was ready; stdout {seen:?}\n{}",
                    self.log_tail(i, 40)
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "n{i} printed no ready line within {READY_TIMEOUT:?}; stdout {seen:?}\n{}",
                    self.log_tail(i, 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.nodes[i].child = Some(child);
        self.nodes[i].frozen = false;
    }

    /// `kill -9` node `i` and reap it. A frozen node dies too.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.nodes[i].frozen = false;
    }

    /// Starts the killed node `i` again: same id, data directory, addresses; waits for
    /// its ready line (it loaded the registry from a peer, or found none and started
    /// cold).
    pub async fn restart(&mut self, i: usize) {
        self.spawn(i).await;
    }

    /// `kill -STOP` node `i`.
    pub fn freeze(&mut self, i: usize) {
        if let Some(pid) = self.pid(i) {
            crate::send_signal("STOP", pid);
            self.nodes[i].frozen = true;
        }
    }

    /// `kill -CONT` node `i`.
    pub fn thaw(&mut self, i: usize) {
        if let Some(pid) = self.pid(i) {
            crate::send_signal("CONT", pid);
            self.nodes[i].frozen = false;
        }
    }

    /// Cuts the network between `groups` (namespace mode only).
    pub fn partition(&self, groups: &[Vec<usize>]) -> Result<(), String> {
        match &self.lab {
            Some(lab) => lab.partition(groups),
            None => Err("partitions need Mode::Netns".into()),
        }
    }

    /// Removes every cut (namespace mode only; nothing to do on loopback).
    pub fn heal(&self) -> Result<(), String> {
        match &self.lab {
            Some(lab) => lab.heal(),
            None => Ok(()),
        }
    }

    /// `GET path` on node `i`, parsed as JSON.
    pub async fn get_json(&self, i: usize, path: &str) -> Result<Value, String> {
        let r = http_get(self.nodes[i].http, path)
            .await
            .map_err(|e| format!("n{i} GET {path}: {e}"))?;
        if r.status != 200 {
            return Err(format!("n{i} GET {path}: {} {}", r.status, r.body));
        }
        serde_json::from_str(&r.body).map_err(|e| format!("n{i} GET {path}: not JSON: {e}"))
    }

    /// A service (`reg-<k>`, default namespace and group) that node `owner` owns, as
    /// node `asked` sees the ring.
    pub async fn service_owned_by(&self, asked: usize, owner: usize) -> shoal_storage::ServiceKey {
        for k in 0..1_000 {
            let ring = self
                .get_json(asked, &format!("/v1/ring?service=reg-{k}"))
                .await
                .unwrap();
            if ring["owner"] == self.id(owner) {
                return shoal_storage::ServiceKey::named(format!("reg-{k}"));
            }
        }
        panic!("no service owned by n{owner}");
    }

    /// Which running nodes list an instance of `service` on `port` in their dump.
    pub async fn holders(&self, service: &shoal_storage::ServiceKey, port: u16) -> Vec<usize> {
        let mut out = Vec::new();
        for i in 0..self.len() {
            if !self.is_running(i) {
                continue;
            }
            let dump = self.get_json(i, "/v1/dump").await.unwrap();
            let listed = dump.as_array().into_iter().flatten().any(|s| {
                s["key"]["service"] == service.service.as_str()
                    && s["instances"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|inst| inst["port"] == port)
            });
            if listed {
                out.push(i);
            }
        }
        out
    }

    /// One look: `Ok` when every node runs, sees every node up and ready, and every
    /// `/v1/dump` is identical; else what differs.
    pub async fn check_converged(&self) -> Result<(), String> {
        for i in 0..self.len() {
            if !self.is_running(i) || self.is_frozen(i) {
                return Err(format!("n{i} is not running"));
            }
        }
        for i in 0..self.len() {
            let members = self.get_json(i, "/v1/members").await?;
            for j in 0..self.len() {
                let id = &self.nodes[j].id;
                let m = members
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|m| m["id"] == id.as_str());
                let ok = m.is_some_and(|m| m["state"] == "up" && m["ready"] == true);
                if !ok {
                    return Err(format!("n{i} sees {id} as {m:?}"));
                }
            }
        }
        let mut first: Option<Value> = None;
        for i in 0..self.len() {
            let dump = self.get_json(i, "/v1/dump").await?;
            match &first {
                None => first = Some(dump),
                Some(reference) if *reference != dump => {
                    return Err(format!(
                        "dumps of n0 and n{i} differ: {}",
                        crate::dump_difference(reference, &dump)
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

impl Drop for ChaosCluster {
    fn drop(&mut self) {
        let panicking = std::thread::panicking() || self.keep;
        for i in 0..self.nodes.len() {
            if let Some(mut child) = self.nodes[i].child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            if panicking {
                eprintln!("{}", self.log_tail(i, 30));
            }
        }
        if panicking {
            eprintln!(
                "chaos: node logs and data kept under {}",
                self.nodes
                    .iter()
                    .map(|n| n.root.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        } else {
            for n in &self.nodes {
                let _ = std::fs::remove_dir_all(&n.root);
            }
            let _ = std::fs::remove_dir_all(&self.ca_dir);
        }
        // Namespaces go after the processes in them.
        self.lab = None;
    }
}
