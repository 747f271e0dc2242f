//! rnacos, the peer `shoal-bench compare` measures Shoal against: a cluster of `rnacos`
//! processes on loopback, and the calls of the Nacos v1 HTTP naming API that the
//! scenarios make.
//!
//! Cluster: node `i` (1-based) gets its own HTTP and gRPC port
//! (`RNACOS_HTTP_PORT`, `RNACOS_GRPC_PORT`; the gRPC port also carries raft and the
//! naming cluster's own traffic), its own data directory (`RNACOS_DATA_DIR`) and
//! `RNACOS_RAFT_NODE_ID=i`; node 1 initialises the raft group
//! (`RNACOS_RAFT_AUTO_INIT=true`), the others join it (`RNACOS_RAFT_JOIN_ADDR`). The web
//! console is off (`RNACOS_HTTP_CONSOLE_PORT=0`) and the log level is `warn`
//! (`RUST_LOG`), since at `info` rnacos logs every HTTP request, which no production
//! deployment under load would do. Each process runs in its own directory, so no
//! `.env` file of the caller's is read.
//!
//! Calls (all with `namespaceId=public`, ephemeral instances):
//! - register: `POST /nacos/v1/ns/instance` (form body);
//! - deregister: `DELETE /nacos/v1/ns/instance?...`;
//! - beat: `PUT /nacos/v1/ns/instance/beat?...` (light beat: ip and port, as the Nacos 1.x
//!   SDK sends once the server said `lightBeatEnabled`); a beat for an unknown instance
//!   creates it, as in Nacos;
//! - list: `GET /nacos/v1/ns/instance/list?serviceName=GROUP%40%40SERVICE&healthyOnly=true`;
//! - count per node: `GET /nacos/v1/ns/catalog/services?groupNameParam=GROUP` (rnacos's
//!   service catalogue, `ipCount` and `healthyInstanceCount` per service).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use tokio::process::{Child, Command};

use crate::httpc::{encode, HttpConn};

/// How long a node may take to answer HTTP after its start.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the cluster may take until a write on any node is listed by every node.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(45);
/// Cluster starts tried before giving up. rnacos 0.8.8 sometimes panics in its raft
/// state machine right at startup on a busy machine (`raftapply.rs:421`, an actor used
/// before it is wired); such a cluster never forms, so it is stopped and started
/// again in fresh directories.
const START_ATTEMPTS: usize = 3;
/// Timeout of the HTTP calls the harness makes (not the measured ones).
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// One rnacos process.
pub struct RnacosNode {
    pub id: String,
    pub http_addr: String,
    pub grpc_addr: String,
    pub pid: u32,
    child: Option<Child>,
    pub log_path: PathBuf,
}

/// A cluster of rnacos processes this run started.
pub struct RnacosCluster {
    pub dir: PathBuf,
    pub nodes: Vec<RnacosNode>,
}

/// `n` distinct free TCP ports on 127.0.0.1 (all bound before any is dropped).
fn free_tcp_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .context("binding TCP port 0")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// The `rnacos` binary: the one given, else `rnacos` on the PATH or in ~/.cargo/bin.
pub fn rnacos_binary(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = given {
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        bail!("no rnacos binary at {}", p.display());
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("rnacos"))
                .collect()
        })
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cargo/bin/rnacos"));
    }
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        anyhow!(
            "no rnacos binary found (install it with `cargo install rnacos --version 0.8.8 --locked`, \
             or pass --rnacos-bin)"
        )
    })
}

impl RnacosCluster {
    /// Starts `n` nodes and waits until a write through any node is listed by all;
    /// tries again (fresh directories) when a start fails.
    pub async fn start(binary: &Path, n: usize) -> Result<(RnacosCluster, f64)> {
        let mut attempt = 1;
        loop {
            match Self::start_once(binary, n).await {
                Ok(started) => return Ok(started),
                Err(e) if attempt < START_ATTEMPTS => {
                    eprintln!(
                        "warning: rnacos cluster start {attempt} failed, trying again: {e:#}"
                    );
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn start_once(binary: &Path, n: usize) -> Result<(RnacosCluster, f64)> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir =
            std::env::temp_dir().join(format!("shoal-bench-rnacos-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let ports = free_tcp_ports(2 * n)?;
        let started = Instant::now();
        let mut cluster = RnacosCluster {
            dir,
            nodes: Vec::new(),
        };
        let first_grpc = format!("127.0.0.1:{}", ports[1]);
        for i in 0..n {
            let (http, grpc) = (ports[2 * i], ports[2 * i + 1]);
            let id = format!("rnacos-{}", i + 1);
            let node_dir = cluster.dir.join(&id);
            std::fs::create_dir_all(&node_dir)?;
            let log_path = cluster.dir.join(format!("{id}.log"));
            let log = std::fs::File::create(&log_path)?;
            let mut command = Command::new(binary);
            command
                .current_dir(&node_dir)
                .env("RUST_LOG", "warn")
                .env("RNACOS_HTTP_PORT", http.to_string())
                .env("RNACOS_GRPC_PORT", grpc.to_string())
                .env("RNACOS_HTTP_CONSOLE_PORT", "0")
                .env("RNACOS_SDK_HOST", "127.0.0.1")
                .env("RNACOS_DATA_DIR", node_dir.join("data"))
                .env("RNACOS_RAFT_NODE_ID", (i + 1).to_string())
                .env("RNACOS_RAFT_NODE_ADDR", format!("127.0.0.1:{grpc}"))
                .env(
                    "RNACOS_RAFT_AUTO_INIT",
                    if i == 0 { "true" } else { "false" },
                )
                .stdin(Stdio::null())
                .stdout(Stdio::from(log.try_clone()?))
                .stderr(Stdio::from(log))
                .kill_on_drop(true);
            // Its HTTP workers: the machine's CPUs divided among the nodes, as Shoal's
            // nodes get worker threads (measured faster for rnacos too, docs/
            // benchmarks.md, twenty-fourth series), unless this process's environment
            // says (then the node inherits that).
            if std::env::var_os("RNACOS_HTTP_WORKERS").is_none() {
                command.env(
                    "RNACOS_HTTP_WORKERS",
                    crate::cluster::shared_worker_threads(n).to_string(),
                );
            }
            if i > 0 {
                command.env("RNACOS_RAFT_JOIN_ADDR", &first_grpc);
            }
            let child = command
                .spawn()
                .with_context(|| format!("cannot start {}", binary.display()))?;
            let pid = child
                .id()
                .ok_or_else(|| anyhow!("{id} exited at once; see {}", log_path.display()))?;
            let node = RnacosNode {
                id,
                http_addr: format!("127.0.0.1:{http}"),
                grpc_addr: format!("127.0.0.1:{grpc}"),
                pid,
                child: Some(child),
                log_path,
            };
            let ready = wait_http(&node).await;
            cluster.nodes.push(node);
            if let Err(e) = ready {
                let _ = cluster.stop(true).await;
                return Err(e);
            }
            let node = cluster.nodes.last().ok_or_else(|| anyhow!("no node"))?;
            eprintln!(
                "started {} (pid {}) http={} grpc={}",
                node.id, node.pid, node.http_addr, node.grpc_addr
            );
        }
        if let Err(e) = cluster.wait_converged().await {
            let _ = cluster.stop(true).await;
            return Err(e);
        }
        let seconds = started.elapsed().as_secs_f64();
        eprintln!("rnacos cluster of {n} converged {seconds:.2} s after the first start");
        Ok((cluster, seconds))
    }

    /// Registers one probe instance through each node in a few services and waits
    /// until every node lists all of them (then removes them): the cluster routes and
    /// replicates.
    async fn wait_converged(&mut self) -> Result<()> {
        let started = Instant::now();
        let group = "cmpconverge";
        let services: Vec<String> = (0..8).map(|k| format!("probe-{k}")).collect();
        loop {
            self.check_alive()?;
            for node in &self.nodes {
                let log = std::fs::read_to_string(&node.log_path).unwrap_or_default();
                if log.contains("panicked") {
                    bail!(
                        "{} panicked at startup; see {}",
                        node.id,
                        node.log_path.display()
                    );
                }
            }
            let mut pending = Vec::new();
            for (i, node) in self.nodes.iter().enumerate() {
                let mut conn = HttpConn::new(vec![node.http_addr.clone()], ADMIN_TIMEOUT);
                for s in &services {
                    if let Err(e) = register(&mut conn, group, s, &probe_ip(i), 7000, None).await {
                        pending.push(format!("{}: register: {e:#}", node.id));
                        break;
                    }
                }
            }
            if pending.is_empty() {
                for node in &self.nodes {
                    let mut conn = HttpConn::new(vec![node.http_addr.clone()], ADMIN_TIMEOUT);
                    for s in &services {
                        match list(&mut conn, group, s, false).await {
                            Ok(answer) if answer.instances == self.nodes.len() => {}
                            Ok(answer) => pending.push(format!(
                                "{} lists {} of {} in {s}",
                                node.id,
                                answer.instances,
                                self.nodes.len()
                            )),
                            Err(e) => pending.push(format!("{}: list: {e:#}", node.id)),
                        }
                    }
                }
            }
            if pending.is_empty() {
                break;
            }
            if started.elapsed() > CONVERGE_TIMEOUT {
                bail!(
                    "the rnacos cluster did not converge within {CONVERGE_TIMEOUT:?}: {}; logs in {}",
                    pending.join("; "),
                    self.dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        for (i, node) in self.nodes.iter().enumerate() {
            let mut conn = HttpConn::new(vec![node.http_addr.clone()], ADMIN_TIMEOUT);
            for s in &services {
                deregister(&mut conn, group, s, &probe_ip(i), 7000).await?;
            }
        }
        Ok(())
    }

    /// (id, pid) of the nodes that run.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| (n.id.clone(), n.pid))
            .collect()
    }

    /// Fails if a node that should run has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        for node in &mut self.nodes {
            if let Some(child) = &mut node.child {
                if let Ok(Some(status)) = child.try_wait() {
                    bail!(
                        "{} exited ({status}); its log is {}",
                        node.id,
                        node.log_path.display()
                    );
                }
            }
        }
        Ok(())
    }

    /// Kills node `index` with SIGKILL.
    pub async fn kill(&mut self, index: usize) -> Result<()> {
        let node = &mut self.nodes[index];
        let mut child = node
            .child
            .take()
            .ok_or_else(|| anyhow!("{} is not running", node.id))?;
        child.kill().await.context("cannot kill rnacos")
    }

    /// Stops every node; removes the directory unless `keep`.
    pub async fn stop(mut self, keep: bool) -> Result<()> {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill().await;
            }
        }
        if keep {
            eprintln!(
                "the rnacos nodes' logs and data are in {}",
                self.dir.display()
            );
        } else {
            std::fs::remove_dir_all(&self.dir)
                .with_context(|| format!("cannot remove {}", self.dir.display()))?;
        }
        Ok(())
    }
}

fn probe_ip(i: usize) -> String {
    format!("10.253.0.{}", i + 1)
}

/// Waits until the node answers a list call.
async fn wait_http(node: &RnacosNode) -> Result<()> {
    let started = Instant::now();
    loop {
        let mut conn = HttpConn::new(vec![node.http_addr.clone()], ADMIN_TIMEOUT);
        if list(&mut conn, "cmpready", "ready", false).await.is_ok() {
            return Ok(());
        }
        if started.elapsed() > READY_TIMEOUT {
            bail!(
                "{} did not answer HTTP within {READY_TIMEOUT:?}; see {}",
                node.id,
                node.log_path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn instance_params(group: &str, service: &str, ip: &str, port: u16) -> String {
    format!(
        "namespaceId=public&groupName={}&serviceName={}&ip={ip}&port={port}&ephemeral=true",
        encode(group),
        encode(service)
    )
}

/// `POST /nacos/v1/ns/instance`: registers (or updates) an ephemeral instance.
/// `metadata` is a JSON object as text.
pub async fn register(
    conn: &mut HttpConn,
    group: &str,
    service: &str,
    ip: &str,
    port: u16,
    metadata: Option<&str>,
) -> Result<()> {
    let mut form = instance_params(group, service, ip, port);
    form.push_str("&weight=1&healthy=true&enabled=true");
    if let Some(m) = metadata {
        form.push_str("&metadata=");
        form.push_str(&encode(m));
    }
    conn.request("POST", "/nacos/v1/ns/instance", Some(&form))
        .await?
        .ok()
        .map(drop)
}

/// `DELETE /nacos/v1/ns/instance`.
pub async fn deregister(
    conn: &mut HttpConn,
    group: &str,
    service: &str,
    ip: &str,
    port: u16,
) -> Result<()> {
    let path = format!(
        "/nacos/v1/ns/instance?{}",
        instance_params(group, service, ip, port)
    );
    conn.request("DELETE", &path, None).await?.ok().map(drop)
}

/// `GET /health`: rnacos asks its health actor and answers `success`.
///
/// A keep-alive connection that rnacos closed while it sat idle fails the next
/// request sent on it; this one is idempotent, so after a failure to send or read it
/// goes once more, on a new connection, as an HTTP client would send it. An answer
/// other than 200 is not sent again.
pub async fn health(conn: &mut HttpConn) -> Result<()> {
    let response = match conn.request("GET", "/health", None).await {
        Ok(response) => response,
        Err(_) => conn.request("GET", "/health", None).await?,
    };
    response.ok().map(drop)
}

/// `PUT /nacos/v1/ns/instance/beat` (light beat).
pub async fn beat(
    conn: &mut HttpConn,
    group: &str,
    service: &str,
    ip: &str,
    port: u16,
) -> Result<()> {
    let path = format!(
        "/nacos/v1/ns/instance/beat?namespaceId=public&serviceName={}&groupName={}&ip={ip}&port={port}&ephemeral=true",
        encode(&format!("{group}@@{service}")),
        encode(group)
    );
    conn.request("PUT", &path, None).await?.ok().map(drop)
}

/// What a list call returned.
#[derive(Debug, Default)]
pub struct ListAnswer {
    /// Instances in the answer.
    pub instances: usize,
    /// `(port, seq)` of each instance whose metadata has a numeric `seq`.
    pub seqs: Vec<(u16, u64)>,
}

#[derive(Deserialize)]
struct ListBody {
    #[serde(default)]
    hosts: Vec<Host>,
}

#[derive(Deserialize)]
struct Host {
    #[serde(default)]
    port: u16,
    #[serde(default)]
    metadata: HashMap<String, String>,
}

/// `GET /nacos/v1/ns/instance/list`.
pub async fn list(
    conn: &mut HttpConn,
    group: &str,
    service: &str,
    healthy_only: bool,
) -> Result<ListAnswer> {
    let path = format!(
        "/nacos/v1/ns/instance/list?namespaceId=public&serviceName={}&groupName={}&healthyOnly={healthy_only}",
        encode(&format!("{group}@@{service}")),
        encode(group)
    );
    let body = conn.request("GET", &path, None).await?.ok()?;
    parse_list(&body)
}

/// Parses a list answer.
fn parse_list(body: &[u8]) -> Result<ListAnswer> {
    let parsed: ListBody = serde_json::from_slice(body).context("list answer is not JSON")?;
    let seqs = parsed
        .hosts
        .iter()
        .filter_map(|h| Some((h.port, h.metadata.get("seq")?.parse().ok()?)))
        .collect();
    Ok(ListAnswer {
        instances: parsed.hosts.len(),
        seqs,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CatalogBody {
    #[serde(default)]
    service_list: Vec<CatalogService>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CatalogService {
    #[serde(default)]
    ip_count: u64,
    #[serde(default)]
    healthy_instance_count: u64,
}

/// `(instances, healthy instances)` a node holds in a group (its service catalogue).
pub async fn count(conn: &mut HttpConn, group: &str) -> Result<(u64, u64)> {
    let path = format!(
        "/nacos/v1/ns/catalog/services?namespaceId=public&groupNameParam={}&pageNo=1&pageSize=1000000",
        encode(group)
    );
    let body = conn.request("GET", &path, None).await?.ok()?;
    parse_catalog(&body)
}

fn parse_catalog(body: &[u8]) -> Result<(u64, u64)> {
    let parsed: CatalogBody =
        serde_json::from_slice(body).context("catalogue answer is not JSON")?;
    Ok(parsed.service_list.iter().fold((0, 0), |(a, h), s| {
        (a + s.ip_count, h + s.healthy_instance_count)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_answers() {
        let body = br#"{"name":"g@@s","clusters":"","cacheMillis":10000,"hosts":[
            {"ip":"10.0.0.1","port":8080,"valid":true,"healthy":true,"metadata":{"seq":"7","t":"1"}},
            {"ip":"10.0.0.2","port":8081,"healthy":true,"metadata":{}}],
            "lastRefTime":1,"checksum":"","allIPs":false}"#;
        let a = parse_list(body).unwrap();
        assert_eq!(a.instances, 2);
        assert_eq!(a.seqs, vec![(8080, 7)]);
        assert_eq!(parse_list(br#"{"hosts":[]}"#).unwrap().instances, 0);
        assert!(parse_list(b"error").is_err());
    }

    #[test]
    fn catalogue_counts() {
        let body = br#"{"count":2,"serviceList":[
            {"name":"a","groupName":"g","ipCount":3,"healthyInstanceCount":2},
            {"name":"b","groupName":"g","ipCount":4,"healthyInstanceCount":4}]}"#;
        assert_eq!(parse_catalog(body).unwrap(), (7, 6));
    }
}
