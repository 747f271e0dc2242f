//! A `shoal server` process started for one benchmark run. `single-node` starts one on
//! ephemeral ports in a fresh temporary data directory, stopped (and its directory
//! removed) at the end; `cluster` starts several with fixed ports, a shared development
//! CA and seeds, in directories it removes itself.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long the node may take to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running node that this benchmark started.
pub struct SpawnedNode {
    child: Child,
    /// Process id, for its CPU time and memory.
    pub pid: u32,
    /// QUIC address, as `ip:port`.
    pub quic_addr: String,
    /// HTTP address (admin API), as `ip:port`.
    pub http_addr: String,
    /// The development CA the node wrote, which the clients trust.
    pub ca_file: PathBuf,
    /// Its log (stderr).
    pub log_path: PathBuf,
    /// The directory to remove when it stops, when this node owns one.
    owned_dir: Option<PathBuf>,
}

/// How to start one node of a cluster.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// `--node-id`.
    pub node_id: String,
    /// `--data-dir` (created if missing).
    pub data_dir: PathBuf,
    /// `--dev-ca-dir`: the development CA shared by the cluster.
    pub dev_ca_dir: Option<PathBuf>,
    /// `--listen-addr` (QUIC, UDP).
    pub listen_addr: String,
    /// `--seed`, one per other node.
    pub seeds: Vec<String>,
    /// Where its stderr goes.
    pub log_path: PathBuf,
    /// `SHOAL_WORKER_THREADS`, unless this process's environment sets it (then the
    /// node inherits that).
    pub worker_threads: usize,
}

/// What the node prints on stdout once it serves:
/// `shoal node <id> ready: quic=IP:PORT http=IP:PORT ca=PATH`.
#[derive(Debug, PartialEq)]
struct ReadyLine {
    quic: String,
    http: String,
    ca: PathBuf,
}

fn parse_ready_line(line: &str) -> Option<ReadyLine> {
    let rest = line.trim_end().strip_prefix("shoal node ")?;
    let (_, fields) = rest.split_once(" ready: ")?;
    // The CA path is last and may contain spaces: take everything after " ca=".
    let (head, ca) = fields.split_once(" ca=")?;
    let field = |name: &str| {
        head.split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .map(str::to_string)
    };
    Some(ReadyLine {
        quic: field("quic=")?,
        http: field("http=")?,
        ca: PathBuf::from(ca),
    })
}

/// The `shoal` binary: the one given, else the one next to this executable (both are
/// built into the same target directory).
pub fn shoal_binary(given: Option<&Path>) -> Result<PathBuf> {
    let path = match given {
        Some(p) => p.to_path_buf(),
        None => {
            let me = std::env::current_exe().context("cannot find this executable's path")?;
            me.with_file_name(format!("shoal{}", std::env::consts::EXE_SUFFIX))
        }
    };
    if !path.is_file() {
        bail!(
            "no shoal binary at {} (build it with `cargo build --release --bin shoal`, or pass --shoal-bin)",
            path.display()
        );
    }
    Ok(path)
}

impl SpawnedNode {
    /// Starts `shoal server` on 127.0.0.1 with ephemeral ports in a new temporary
    /// directory and waits for its ready line. Its log (stderr) goes to `node.log` in
    /// that directory.
    pub async fn start(binary: &Path) -> Result<SpawnedNode> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!("shoal-bench-{}-{nanos}", std::process::id()));
        let data = dir.join("data");
        std::fs::create_dir_all(&data)
            .with_context(|| format!("cannot create {}", data.display()))?;
        let mut command = Command::new(binary);
        command
            .arg("server")
            .args(["--listen-addr", "127.0.0.1:0"])
            .args(["--http-addr", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(&data);
        let mut node = Self::spawn(command, &dir.join("node.log")).await?;
        node.owned_dir = Some(dir);
        Ok(node)
    }

    /// Starts one node of a cluster as `spec` says (HTTP on an ephemeral port) and
    /// waits for its ready line. The caller removes the directories.
    pub async fn start_member(binary: &Path, spec: &NodeSpec) -> Result<SpawnedNode> {
        std::fs::create_dir_all(&spec.data_dir)
            .with_context(|| format!("cannot create {}", spec.data_dir.display()))?;
        let mut command = Command::new(binary);
        command
            .arg("server")
            .args(["--node-id", &spec.node_id])
            .arg("--data-dir")
            .arg(&spec.data_dir)
            .args(["--listen-addr", &spec.listen_addr])
            .args(["--http-addr", "127.0.0.1:0"]);
        if let Some(ca_dir) = &spec.dev_ca_dir {
            command.arg("--dev-ca-dir").arg(ca_dir);
        }
        for seed in &spec.seeds {
            command.args(["--seed", seed]);
        }
        if std::env::var_os("SHOAL_WORKER_THREADS").is_none() {
            command.env("SHOAL_WORKER_THREADS", spec.worker_threads.to_string());
        }
        Self::spawn(command, &spec.log_path)
            .await
            .with_context(|| format!("starting {}", spec.node_id))
    }

    async fn spawn(mut command: Command, log_path: &Path) -> Result<SpawnedNode> {
        let log = std::fs::File::create(log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {}",
                    command.as_std().get_program().to_string_lossy()
                )
            })?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("the node exited at once; see {}", log_path.display()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("the node's stdout was not captured"))?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(READY_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(ready) = parse_ready_line(&line) {
                    return Ok(ready);
                }
            }
            Err(anyhow!("the node exited before it was ready"))
        })
        .await
        .map_err(|_| anyhow!("the node printed no ready line within {READY_TIMEOUT:?}"))
        .and_then(|r| r)
        .with_context(|| format!("see the node's log in {}", log_path.display()))?;
        // Keep reading stdout so that the node never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(SpawnedNode {
            child,
            pid,
            quic_addr: ready.quic,
            http_addr: ready.http,
            ca_file: ready.ca,
            log_path: log_path.to_path_buf(),
            owned_dir: None,
        })
    }

    /// Whether the process has exited (and how), without waiting.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Kills the node with SIGKILL, like a crash, and waits for it to exit.
    pub async fn kill(mut self) -> Result<()> {
        self.child.kill().await.context("cannot kill the node")
    }

    /// Kills the node, waits for it, and removes its directory if it made one.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(status) = self.exited() {
            bail!(
                "the node exited during the run ({status}); its log is in {}",
                self.log_path.display()
            );
        }
        self.child.kill().await.context("cannot kill the node")?;
        if let Some(dir) = &self.owned_dir {
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("cannot remove {}", dir.display()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line() {
        let line = "shoal node n-1a2b ready: quic=127.0.0.1:40123 http=127.0.0.1:40124 ca=/tmp/x y/ca.pem\n";
        assert_eq!(
            parse_ready_line(line),
            Some(ReadyLine {
                quic: "127.0.0.1:40123".into(),
                http: "127.0.0.1:40124".into(),
                ca: PathBuf::from("/tmp/x y/ca.pem"),
            })
        );
        assert_eq!(parse_ready_line("shoal node n ready: http=1:2"), None);
        assert_eq!(parse_ready_line("2024 INFO starting"), None);
    }
}
