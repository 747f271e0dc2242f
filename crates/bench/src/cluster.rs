//! `shoal-bench cluster`: a cluster of `shoal server` processes on loopback, started
//! and stopped by the benchmark.
//!
//! 1. Start: pick one free UDP port per node (bind port 0, read it, drop the socket),
//!    start node-1 (it creates the development CA in a directory shared by all
//!    nodes), then the others, each seeded with every other node's address. Wait until
//!    every node's `GET /v1/members` shows all nodes up and ready and its
//!    `GET /v1/ring` holds all of them.
//! 2. Register phase: `--sessions` SDK clients, session `s` homed on node `s mod N`
//!    (its `ClientConfig::servers` names only that node), each registering
//!    `--instances-per-session` instances over `--services` services, `--concurrency`
//!    in flight per session, all at once. Timed until the last acknowledgement, and
//!    until every node's `GET /v1/node` counts every instance (polled every 20 ms).
//! 3. Visibility phase, once per `--visibility-rate`: see `visibility.rs`. The
//!    registering sessions stay open meanwhile, so the registry stays populated.
//! 4. Close: the registering sessions say Goodbye; timed until every node counts no
//!    instance of theirs.
//! 5. Remap phase: see `remap.rs` (kills the last node, restarts it, adds one more).
//! 6. Stop every node; remove the directories unless `--keep-dirs` or the run failed.
//!
//! Before each phase the benchmark waits for the rest of the machine to be quiet
//! (`--quiet-share`); each phase records every node's CPU seconds and RSS, the
//! benchmark's own CPU, and what other processes used meanwhile.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use shoal_client::{Client, ClientConfig, ServiceKey};
use tokio::task::JoinSet;

use crate::cpu::{wait_quiet, CpuMark, PhaseCpu, QuietWait};
use crate::machine::Machine;
use crate::node::{shoal_binary, NodeSpec, SpawnedNode};
use crate::progress::Progress;
use crate::single_node::{connect_all, register_all, NAMESPACE, REQUEST_TIMEOUT};
use crate::stats::Latency;
use crate::{cluster_report, remap, visibility, ClusterArgs, Phase};

/// Group of the register phase's services.
const REGISTER_GROUP: &str = "shoal-bench";
/// How long a cluster may take to converge after a start, a kill or a join.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the registrations may take to reach every node after the last
/// acknowledgement, or the instances to disappear after a close.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Interval of the `GET /v1/node` polls that time visibility on every node.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Everything one run measured; written as JSON.
#[derive(Debug, Serialize)]
pub struct ClusterResult {
    /// Always `cluster`.
    pub benchmark: &'static str,
    /// Where and when it ran.
    pub machine: Machine,
    /// The parameters of the run.
    pub config: RunConfig,
    /// The nodes as started (node id, QUIC address, process id).
    pub nodes: Vec<NodeInfo>,
    /// Seconds from starting the first node until every node saw all of them up,
    /// ready and in its ring.
    pub startup_seconds: f64,
    /// The register phase, if it ran.
    pub register: Option<RegisterPhase>,
    /// One visibility phase per rate.
    pub visibility: Vec<visibility::VisibilityPhase>,
    /// The close of the registering sessions, if they were opened.
    pub close: Option<ClosePhase>,
    /// The remap phase, if it ran.
    pub remap: Option<remap::RemapPhase>,
}

/// The parameters of a run.
#[derive(Debug, Serialize)]
pub struct RunConfig {
    pub nodes: usize,
    pub phases: Vec<Phase>,
    pub sessions: usize,
    pub instances_per_session: usize,
    pub services: usize,
    pub concurrency: usize,
    pub visibility_rates: Vec<u64>,
    pub visibility_seconds: u64,
    pub visibility_services: usize,
    pub visibility_slots: usize,
    pub visibility_writers: usize,
    pub visibility_in_flight: usize,
    pub remap_keys: usize,
    pub quiet_share: f64,
    /// The threads of the load generator (`SHOAL_BENCH_THREADS`).
    pub load_generator_threads: usize,
    /// The command line of the run.
    pub command: String,
}

/// A node as started.
#[derive(Debug, Clone, Serialize)]
pub struct NodeInfo {
    pub id: String,
    pub quic_addr: String,
    pub http_addr: String,
    pub pid: u32,
}

/// When the registrations were visible on one node.
#[derive(Debug, Clone, Serialize)]
pub struct NodeSeconds {
    /// The node's id.
    pub node: String,
    /// Seconds from the phase's start until its `GET /v1/node` counted every instance
    /// (`None`: not within the timeout).
    pub seconds: Option<f64>,
}

/// Figures of the register phase.
#[derive(Debug, Serialize)]
pub struct RegisterPhase {
    /// The wait for a quiet machine before it.
    pub quiet: QuietWait,
    /// Sessions per node, in node order.
    pub sessions_per_node: Vec<usize>,
    /// Instances registered and acknowledged.
    pub instances: u64,
    /// Failed registrations (the run fails if there is any).
    pub errors: u64,
    /// Wall time from the first request to the last acknowledgement.
    pub ack_seconds: f64,
    /// Acknowledged registrations per second.
    pub ack_per_second: f64,
    /// Latency of one registration, as the SDK caller sees it.
    pub latency: Latency,
    /// When each node counted every instance.
    pub visible: Vec<NodeSeconds>,
    /// From the first request until the last node counted every instance.
    pub all_visible_seconds: Option<f64>,
    /// Instances / all_visible_seconds.
    pub all_visible_per_second: Option<f64>,
    /// CPU seconds of all nodes together per 1000 registrations (to all visible).
    pub nodes_cpu_ms_per_1000: Option<f64>,
    /// CPU and memory from the first request until all were visible.
    pub cpu: PhaseCpu,
}

/// Figures of the close of the registering sessions.
#[derive(Debug, Serialize)]
pub struct ClosePhase {
    /// Sessions closed with Goodbye.
    pub sessions: usize,
    /// Their instances.
    pub instances: u64,
    /// When each node counted none of them any more.
    pub gone: Vec<NodeSeconds>,
    /// From the first Goodbye until the last node counted none.
    pub all_gone_seconds: Option<f64>,
    pub cpu: PhaseCpu,
}

/// One node of the cluster as the benchmark knows it.
pub struct ClusterNode {
    pub id: String,
    pub quic_addr: String,
    pub http_addr: String,
    pub pid: u32,
    /// `None` once killed.
    process: Option<SpawnedNode>,
}

/// The cluster this run started.
pub struct Cluster {
    binary: PathBuf,
    /// The run's directory: the shared CA, one data directory and log per node.
    pub dir: PathBuf,
    ca_dir: PathBuf,
    /// The development CA the clients trust.
    pub ca_file: PathBuf,
    /// Every node started, in order; killed ones stay, without a process.
    pub nodes: Vec<ClusterNode>,
    /// Worker threads of each node: the machine's CPUs divided among the nodes first
    /// started (a restarted node gets as many).
    worker_threads: usize,
}

/// Worker threads for each of `nodes` nodes on this machine: its CPUs divided among
/// them, at least one each (as `shoal dev` gives its nodes). Three nodes of two
/// threads each on two CPUs used 30 % more CPU per registration than of one thread
/// each, much of it waking and switching threads (docs/benchmarks.md, twenty-fourth
/// series).
pub fn shared_worker_threads(nodes: usize) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cpus / nodes.max(1)).max(1)
}

/// `n` distinct free UDP ports on 127.0.0.1: all sockets are bound before any is
/// dropped, so the ports differ. Another process could take one before the node binds
/// it; the node then fails to start and the run says so.
pub fn free_udp_ports(n: usize) -> Result<Vec<u16>> {
    let sockets = (0..n)
        .map(|_| std::net::UdpSocket::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .context("binding UDP port 0")?;
    sockets.iter().map(|s| Ok(s.local_addr()?.port())).collect()
}

/// The id of node `i` (0-based): `node-{i+1}`.
pub fn node_id(i: usize) -> String {
    format!("node-{}", i + 1)
}

impl Cluster {
    /// Starts `n` nodes seeded with each other and waits until they converge.
    pub(crate) async fn start(binary: &Path, n: usize) -> Result<(Cluster, f64)> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!(
            "shoal-bench-cluster-{}-{nanos}",
            std::process::id()
        ));
        let ca_dir = dir.join("ca");
        std::fs::create_dir_all(&ca_dir)
            .with_context(|| format!("cannot create {}", ca_dir.display()))?;
        let addrs: Vec<String> = free_udp_ports(n)?
            .into_iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let mut cluster = Cluster {
            binary: binary.to_path_buf(),
            dir,
            ca_dir,
            ca_file: PathBuf::new(),
            nodes: Vec::new(),
            worker_threads: shared_worker_threads(n),
        };
        let started = Instant::now();
        let seeds_of = |i: usize| -> Vec<String> {
            addrs
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, a)| a.clone())
                .collect()
        };
        // node-1 first: it creates the shared development CA, which the others load.
        let first = cluster.spec(&node_id(0), &addrs[0], seeds_of(0), "");
        let node = SpawnedNode::start_member(&cluster.binary, &first).await?;
        cluster.ca_file = node.ca_file.clone();
        cluster.push(&node_id(0), node);
        let mut starting = JoinSet::new();
        for (i, addr) in addrs.iter().enumerate().skip(1) {
            let spec = cluster.spec(&node_id(i), addr, seeds_of(i), "");
            let binary = cluster.binary.clone();
            starting.spawn(async move { (i, SpawnedNode::start_member(&binary, &spec).await) });
        }
        let mut rest = Vec::new();
        while let Some(joined) = starting.join_next().await {
            let (i, node) = joined?;
            rest.push((i, node?));
        }
        rest.sort_by_key(|(i, _)| *i);
        for (i, node) in rest {
            cluster.push(&node_id(i), node);
        }
        for node in &cluster.nodes {
            eprintln!(
                "started {} (pid {}) quic={} http={}",
                node.id, node.pid, node.quic_addr, node.http_addr
            );
        }
        let ids: Vec<String> = (0..n).map(node_id).collect();
        cluster.wait_converged(&ids).await?;
        let startup = started.elapsed().as_secs_f64();
        eprintln!("cluster of {n} converged {startup:.2} s after the first start");
        Ok((cluster, startup))
    }

    fn spec(&self, id: &str, listen: &str, seeds: Vec<String>, suffix: &str) -> NodeSpec {
        NodeSpec {
            node_id: id.to_string(),
            data_dir: self.dir.join(format!("{id}{suffix}")),
            dev_ca_dir: Some(self.ca_dir.clone()),
            listen_addr: listen.to_string(),
            seeds,
            log_path: self.dir.join(format!("{id}{suffix}.log")),
            worker_threads: self.worker_threads,
        }
    }

    fn push(&mut self, id: &str, node: SpawnedNode) {
        let entry = ClusterNode {
            id: id.to_string(),
            quic_addr: node.quic_addr.clone(),
            http_addr: node.http_addr.clone(),
            pid: node.pid,
            process: Some(node),
        };
        match self.nodes.iter_mut().find(|n| n.id == id) {
            Some(old) => *old = entry,
            None => self.nodes.push(entry),
        }
    }

    /// Starts (or restarts, with a fresh data directory named with `suffix`) node `id`
    /// on `listen`, seeded with `seeds`. Does not wait for convergence.
    pub async fn start_node(
        &mut self,
        id: &str,
        listen: &str,
        seeds: Vec<String>,
        suffix: &str,
    ) -> Result<()> {
        let spec = self.spec(id, listen, seeds, suffix);
        let node = SpawnedNode::start_member(&self.binary, &spec).await?;
        eprintln!(
            "started {id} (pid {}) quic={} http={}",
            node.pid, node.quic_addr, node.http_addr
        );
        self.push(id, node);
        Ok(())
    }

    /// Kills node `id` with SIGKILL.
    pub async fn kill(&mut self, id: &str) -> Result<()> {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.id == id)
            .ok_or_else(|| anyhow!("no node {id}"))?;
        let process = node
            .process
            .take()
            .ok_or_else(|| anyhow!("{id} is not running"))?;
        process.kill().await
    }

    /// The nodes that run.
    pub fn live(&self) -> impl Iterator<Item = &ClusterNode> {
        self.nodes.iter().filter(|n| n.process.is_some())
    }

    /// The node called `id`.
    pub fn node(&self, id: &str) -> Result<&ClusterNode> {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .ok_or_else(|| anyhow!("no node {id}"))
    }

    /// (id, pid) of the nodes that run, for the CPU figures.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.live().map(|n| (n.id.clone(), n.pid)).collect()
    }

    /// A client configuration whose only server is this node: its home is fixed.
    pub fn client_config(&self, node: &ClusterNode) -> ClientConfig {
        ClientConfig::new([node.quic_addr.clone()], self.ca_file.clone())
            .with_client_name(format!("shoal-bench/{}", env!("CARGO_PKG_VERSION")))
            .with_request_timeout(REQUEST_TIMEOUT)
    }

    /// Fails if a node that should run has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        for node in &mut self.nodes {
            if let Some(process) = &mut node.process {
                if let Some(status) = process.exited() {
                    bail!(
                        "{} exited during the run ({status}); its log is {}",
                        node.id,
                        process.log_path.display()
                    );
                }
            }
        }
        Ok(())
    }

    /// Waits until every running node sees exactly `expected` in its ring and each of
    /// them up and ready among its members. Returns how long it took.
    pub async fn wait_converged(&mut self, expected: &[String]) -> Result<Duration> {
        let started = Instant::now();
        let want: BTreeSet<&str> = expected.iter().map(String::as_str).collect();
        loop {
            self.check_alive()?;
            let mut pending = Vec::new();
            for node in self.live() {
                match view_of(&node.http_addr).await {
                    Ok((ready_members, ring)) => {
                        let ring: BTreeSet<&str> = ring.iter().map(String::as_str).collect();
                        let members: BTreeSet<&str> =
                            ready_members.iter().map(String::as_str).collect();
                        if ring != want || !want.is_subset(&members) {
                            pending.push(format!(
                                "{}: ring {ring:?}, up and ready {members:?}",
                                node.id
                            ));
                        }
                    }
                    Err(e) => pending.push(format!("{}: {e:#}", node.id)),
                }
            }
            if pending.is_empty() {
                return Ok(started.elapsed());
            }
            if started.elapsed() > CONVERGE_TIMEOUT {
                bail!(
                    "the cluster did not converge on {expected:?} within {CONVERGE_TIMEOUT:?}: {}",
                    pending.join("; ")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops every node; removes the run's directory unless `keep`.
    pub(crate) async fn stop(self, keep: bool) -> Result<()> {
        let mut first_error = None;
        for node in self.nodes {
            if let Some(process) = node.process {
                if let Err(e) = process.stop().await {
                    first_error.get_or_insert(e.context(node.id));
                }
            }
        }
        if keep || first_error.is_some() {
            eprintln!("the nodes' logs and data are in {}", self.dir.display());
        } else {
            std::fs::remove_dir_all(&self.dir)
                .with_context(|| format!("cannot remove {}", self.dir.display()))?;
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// A node's view: the ids of members up and ready (itself included) from
/// `GET /v1/members`, and the ids in its ring from `GET /v1/ring`.
async fn view_of(http: &str) -> Result<(Vec<String>, Vec<String>)> {
    let members = crate::http::get_json(http, "/v1/members").await?;
    let ready = members
        .as_array()
        .ok_or_else(|| anyhow!("/v1/members is not a list"))?
        .iter()
        .filter(|m| m["state"] == "up" && m["ready"] == true)
        .filter_map(|m| m["id"].as_str().map(str::to_string))
        .collect();
    let ring = crate::http::get_json(http, "/v1/ring").await?;
    let ids = ring["shares"]
        .as_array()
        .ok_or_else(|| anyhow!("/v1/ring has no shares"))?
        .iter()
        .filter_map(|s| s[0].as_str().map(str::to_string))
        .collect();
    Ok((ready, ids))
}

/// The instance count of a node (`GET /v1/node`, field `instances`).
pub async fn instance_count(http: &str) -> Result<u64> {
    let node = crate::http::get_json(http, "/v1/node").await?;
    node["instances"]
        .as_u64()
        .ok_or_else(|| anyhow!("/v1/node has no instance count"))
}

/// Polls every node's instance count every [`POLL_INTERVAL`] until it equals
/// `target`, or until `deadline`; returns the seconds since `since` at which each node
/// first did (`None`: never before the deadline).
pub async fn time_until_count(
    nodes: Vec<(String, String)>,
    target: u64,
    since: Instant,
    deadline: Instant,
) -> Vec<NodeSeconds> {
    let mut reached: Vec<Option<f64>> = vec![None; nodes.len()];
    while Instant::now() < deadline && reached.iter().any(Option::is_none) {
        for (i, (_, http)) in nodes.iter().enumerate() {
            if reached[i].is_none() && instance_count(http).await.ok() == Some(target) {
                reached[i] = Some(since.elapsed().as_secs_f64());
            }
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    nodes
        .into_iter()
        .zip(reached)
        .map(|((node, _), seconds)| NodeSeconds { node, seconds })
        .collect()
}

/// The latest of the nodes' times, if every node has one.
pub fn all_seconds(per_node: &[NodeSeconds]) -> Option<f64> {
    per_node
        .iter()
        .map(|n| n.seconds)
        .collect::<Option<Vec<f64>>>()
        .map(|v| v.into_iter().fold(0.0, f64::max))
}

pub async fn run(args: ClusterArgs, load_generator_threads: usize) -> Result<()> {
    if args.nodes < 2 {
        bail!("--nodes must be at least 2");
    }
    if args.sessions == 0 || args.instances_per_session == 0 || args.services == 0 {
        bail!("--sessions, --instances-per-session and --services must be at least 1");
    }
    if args.concurrency == 0 || args.visibility_in_flight == 0 || args.visibility_writers == 0 {
        bail!("--concurrency, --visibility-in-flight and --visibility-writers must be at least 1");
    }
    if args.visibility_services == 0 || args.visibility_slots == 0 || args.remap_keys == 0 {
        bail!("--visibility-services, --visibility-slots and --remap-keys must be at least 1");
    }
    if args.visibility_rate.contains(&0) || args.visibility_seconds == 0 {
        bail!("--visibility-rate and --visibility-seconds must be above 0");
    }
    let machine = Machine::describe();
    let binary = shoal_binary(args.shoal_bin.as_deref())?;
    let config = RunConfig {
        nodes: args.nodes,
        phases: args.phases.clone(),
        sessions: args.sessions,
        instances_per_session: args.instances_per_session,
        services: args.services,
        concurrency: args.concurrency,
        visibility_rates: args.visibility_rate.clone(),
        visibility_seconds: args.visibility_seconds,
        visibility_services: args.visibility_services,
        visibility_slots: args.visibility_slots,
        visibility_writers: args.visibility_writers,
        visibility_in_flight: args.visibility_in_flight,
        remap_keys: args.remap_keys,
        quiet_share: args.quiet_share,
        load_generator_threads,
        command: std::env::args().collect::<Vec<_>>().join(" "),
    };
    eprintln!(
        "cluster: {} nodes from {}; phases {:?}",
        args.nodes,
        binary.display(),
        args.phases
    );
    let (mut cluster, startup_seconds) = Cluster::start(&binary, args.nodes).await?;
    let nodes = cluster
        .nodes
        .iter()
        .map(|n| NodeInfo {
            id: n.id.clone(),
            quic_addr: n.quic_addr.clone(),
            http_addr: n.http_addr.clone(),
            pid: n.pid,
        })
        .collect();
    let mut result = ClusterResult {
        benchmark: "cluster",
        machine,
        config,
        nodes,
        startup_seconds,
        register: None,
        visibility: Vec::new(),
        close: None,
        remap: None,
    };
    let outcome = measure(&args, &mut cluster, &mut result).await;
    let stopped = cluster.stop(args.keep_dirs || outcome.is_err()).await;
    outcome?;
    stopped?;

    println!("{}", cluster_report::table(&result));
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let json = serde_json::to_string_pretty(&result)?;
    std::fs::write(&args.out, json + "\n")
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

/// Runs the phases asked for, in order, filling `result`.
async fn measure(
    args: &ClusterArgs,
    cluster: &mut Cluster,
    result: &mut ClusterResult,
) -> Result<()> {
    let quiet_timeout = Duration::from_secs(args.quiet_timeout);
    let mut sessions = Vec::new();
    if args.phases.contains(&Phase::Register) {
        let quiet = wait_quiet("register", &cluster.pids(), args.quiet_share, quiet_timeout).await;
        let (phase, clients) = register_phase(args, cluster, quiet).await?;
        result.register = Some(phase);
        sessions = clients;
    }
    if args.phases.contains(&Phase::Visibility) {
        for (i, &rate) in args.visibility_rate.iter().enumerate() {
            let quiet = wait_quiet(
                "visibility",
                &cluster.pids(),
                args.quiet_share,
                quiet_timeout,
            )
            .await;
            let phase = visibility::run(args, cluster, i, rate, quiet).await?;
            result.visibility.push(phase);
        }
    }
    if !sessions.is_empty() {
        result.close = Some(close_phase(cluster, sessions).await?);
    }
    if args.phases.contains(&Phase::Remap) {
        let quiet = wait_quiet("remap", &cluster.pids(), args.quiet_share, quiet_timeout).await;
        result.remap = Some(remap::run(args, cluster, quiet).await?);
    }
    cluster.check_alive()
}

async fn register_phase(
    args: &ClusterArgs,
    cluster: &mut Cluster,
    quiet: QuietWait,
) -> Result<(RegisterPhase, Vec<Client>)> {
    let live: Vec<&ClusterNode> = cluster.live().collect();
    let n = live.len();
    let services: Arc<Vec<ServiceKey>> = Arc::new(
        (0..args.services)
            .map(|k| ServiceKey::new(NAMESPACE, REGISTER_GROUP, format!("svc-{k:06}")))
            .collect(),
    );
    // Session s is homed on node s mod n.
    let mut sessions_per_node = vec![0; n];
    let mut homed: Vec<Vec<Client>> = Vec::with_capacity(n);
    for (i, node) in live.iter().enumerate() {
        let count = args.sessions / n + usize::from(i < args.sessions % n);
        sessions_per_node[i] = count;
        homed.push(
            connect_all(&cluster.client_config(node), count)
                .await
                .with_context(|| format!("connecting sessions to {}", node.id))?,
        );
    }
    let mut sessions: Vec<Client> = Vec::with_capacity(args.sessions);
    let mut iters: Vec<_> = homed.into_iter().map(Vec::into_iter).collect();
    for s in 0..args.sessions {
        let client = iters[s % n]
            .next()
            .ok_or_else(|| anyhow!("session {s} was not connected"))?;
        sessions.push(client);
    }
    let counting: Vec<(String, String)> = live
        .iter()
        .map(|n| (n.id.clone(), n.http_addr.clone()))
        .collect();
    let mut baseline = 0;
    for (id, http) in &counting {
        let count = instance_count(http).await?;
        if count != 0 {
            eprintln!("warning: {id} already holds {count} instances");
        }
        baseline = baseline.max(count);
    }
    let per_session = args.instances_per_session;
    let total = (args.sessions * per_session) as u64;
    eprintln!(
        "register: {} sessions ({:?} per node) x {per_session} instances over {} services, \
         {} in flight per session",
        args.sessions, sessions_per_node, args.services, args.concurrency
    );

    let done = Arc::new(AtomicU64::new(0));
    let progress = Progress::start("register", done.clone(), Some(total));
    let mark = CpuMark::now(&cluster.pids());
    let started = mark.at();
    let poller = tokio::spawn(time_until_count(
        counting,
        baseline + total,
        started,
        started + SETTLE_TIMEOUT,
    ));
    let all = register_all(&sessions, &services, per_session, args.concurrency, &done).await?;
    let ack_seconds = started.elapsed().as_secs_f64();
    drop(progress);
    if let Some(e) = all.first_error {
        poller.abort();
        bail!("{} registrations failed; the first: {e}", all.errors);
    }
    eprintln!(
        "register: all acknowledged after {ack_seconds:.2} s; waiting until every node counts them"
    );
    let visible = poller.await?;
    let cpu = mark.since();
    cluster.check_alive()?;
    let all_visible = all_seconds(&visible);
    let instances = all.samples.len() as u64;
    let phase = RegisterPhase {
        quiet,
        sessions_per_node,
        instances,
        errors: all.errors,
        ack_seconds,
        ack_per_second: instances as f64 / ack_seconds,
        latency: all.samples.summarize(),
        all_visible_per_second: all_visible.map(|s| instances as f64 / s),
        all_visible_seconds: all_visible,
        visible,
        nodes_cpu_ms_per_1000: Some(cpu.nodes_seconds * 1000.0 * 1000.0 / instances as f64),
        cpu,
    };
    if phase.all_visible_seconds.is_none() {
        bail!(
            "not every node counted the {instances} instances within {SETTLE_TIMEOUT:?}: {:?}",
            phase.visible
        );
    }
    Ok((phase, sessions))
}

/// Closes the registering sessions with Goodbye and times until no node counts their
/// instances.
async fn close_phase(cluster: &mut Cluster, sessions: Vec<Client>) -> Result<ClosePhase> {
    let counting: Vec<(String, String)> = cluster
        .live()
        .map(|n| (n.id.clone(), n.http_addr.clone()))
        .collect();
    let mut instances = 0;
    for (_, http) in &counting {
        instances = instances.max(instance_count(http).await?);
    }
    let count = sessions.len();
    eprintln!("close: {count} sessions say Goodbye; waiting until no node counts an instance");
    let mark = CpuMark::now(&cluster.pids());
    let started = mark.at();
    let poller = tokio::spawn(time_until_count(
        counting,
        0,
        started,
        started + SETTLE_TIMEOUT,
    ));
    let mut closing = JoinSet::new();
    for client in sessions {
        closing.spawn(client.close());
    }
    while let Some(closed) = closing.join_next().await {
        if let Ok(Err(e)) = closed {
            eprintln!("warning: closing a session: {e}");
        }
    }
    let gone = poller.await?;
    let cpu = mark.since();
    cluster.check_alive()?;
    Ok(ClosePhase {
        sessions: count,
        instances,
        all_gone_seconds: all_seconds(&gone),
        gone,
        cpu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct() {
        let ports = free_udp_ports(4).unwrap();
        let distinct: BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), 4);
        assert!(ports.iter().all(|&p| p != 0));
    }

    #[test]
    fn all_seconds_needs_every_node() {
        let a = NodeSeconds {
            node: "a".into(),
            seconds: Some(1.5),
        };
        let b = NodeSeconds {
            node: "b".into(),
            seconds: Some(0.5),
        };
        let c = NodeSeconds {
            node: "c".into(),
            seconds: None,
        };
        assert_eq!(all_seconds(&[a.clone(), b.clone()]), Some(1.5));
        assert_eq!(all_seconds(&[a, b, c]), None);
    }
}
