//! The two systems `shoal-bench compare` drives with the same scenarios: a Shoal cluster
//! through the Rust SDK (QUIC + MessagePack, one session per client) and an rnacos
//! cluster through the Nacos v1 HTTP API (HTTP/1.1 keep-alive, one request in flight per
//! connection). A scenario sees only [`Harness`] (start, count, kill, stop) and
//! [`Lane`] (one request at a time: register, deregister, list, beat).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use shoal_client::{Client, ClientConfig, InstanceSpec, QueryOptions, ServiceKey};

use crate::cluster::Cluster;
use crate::httpc::HttpConn;
use crate::rnacos::{self, RnacosCluster};
use crate::single_node::NAMESPACE;

/// Which system.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetKind {
    /// rnacos over the Nacos v1 HTTP API.
    Rnacos,
    /// Shoal over QUIC through the Rust SDK.
    Shoal,
}

impl TargetKind {
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Rnacos => "rnacos",
            TargetKind::Shoal => "shoal",
        }
    }
}

/// The services of one scenario: one group, `svc-NNNNN` names.
pub struct Names {
    pub group: String,
    pub services: Vec<String>,
    pub keys: Vec<ServiceKey>,
}

impl Names {
    pub fn new(group: &str, count: usize) -> Arc<Names> {
        let services: Vec<String> = (0..count).map(|k| format!("svc-{k:05}")).collect();
        let keys = services
            .iter()
            .map(|s| ServiceKey::new(NAMESPACE, group, s.clone()))
            .collect();
        Arc::new(Names {
            group: group.to_string(),
            services,
            keys,
        })
    }

    pub fn len(&self) -> usize {
        self.services.len()
    }
}

/// One instance to write: address and metadata.
#[derive(Debug, Clone)]
pub struct Inst {
    pub ip: String,
    pub port: u16,
    pub meta: Vec<(&'static str, String)>,
}

impl Inst {
    /// Instance number `g` of a run: 10.x.y.z from the low 24 bits, port 8080 + the rest.
    pub fn numbered(g: usize) -> Inst {
        Inst {
            ip: crate::single_node::numbered_ip(g),
            port: crate::single_node::numbered_port(g),
            meta: Vec::new(),
        }
    }

    /// The instance as the SDK takes it.
    pub fn into_spec(self) -> InstanceSpec {
        let mut spec = InstanceSpec::new(self.ip, self.port);
        for (k, v) in self.meta {
            spec.metadata.insert(k.to_string(), v);
        }
        spec
    }

    pub fn spec(&self) -> InstanceSpec {
        self.clone().into_spec()
    }

    fn meta_json(&self) -> Option<String> {
        if self.meta.is_empty() {
            return None;
        }
        let map: BTreeMap<&str, &str> = self.meta.iter().map(|(k, v)| (*k, v.as_str())).collect();
        serde_json::to_string(&map).ok()
    }
}

/// What a list call returned.
#[derive(Debug, Default)]
pub struct Listed {
    pub instances: usize,
    /// `(port, seq)` of the instances with a numeric `seq` in their metadata.
    pub seqs: Vec<(u16, u64)>,
}

/// One client connection that carries one request at a time: for Shoal a handle on an
/// SDK client (several lanes of one client share its QUIC connection, which is how one
/// application process talks to Shoal), for rnacos one HTTP/1.1 keep-alive connection.
pub enum Lane {
    Shoal(Client),
    Rnacos(HttpConn),
}

impl Lane {
    /// Registers `inst` in service `k`; Shoal's SDK takes the instance without a copy.
    pub async fn register(&mut self, names: &Names, k: usize, inst: Inst) -> Result<()> {
        match self {
            Lane::Shoal(c) => c
                .register(&names.keys[k], inst.into_spec())
                .await
                .map(drop)
                .map_err(Into::into),
            Lane::Rnacos(h) => {
                let meta = inst.meta_json();
                rnacos::register(
                    h,
                    &names.group,
                    &names.services[k],
                    &inst.ip,
                    inst.port,
                    meta.as_deref(),
                )
                .await
            }
        }
    }

    pub async fn deregister(&mut self, names: &Names, k: usize, inst: &Inst) -> Result<()> {
        match self {
            Lane::Shoal(c) => c
                .deregister(&names.keys[k], &inst.spec().key())
                .await
                .map(drop)
                .map_err(Into::into),
            Lane::Rnacos(h) => {
                rnacos::deregister(h, &names.group, &names.services[k], &inst.ip, inst.port).await
            }
        }
    }

    /// Lists the healthy instances of service `k`.
    pub async fn list(&mut self, names: &Names, k: usize) -> Result<Listed> {
        match self {
            Lane::Shoal(c) => {
                let view = c.query(&names.keys[k], QueryOptions::healthy()).await?;
                let seqs = view
                    .instances
                    .iter()
                    .filter_map(|i| Some((i.port, i.metadata.get("seq")?.parse().ok()?)))
                    .collect();
                Ok(Listed {
                    instances: view.instances.len(),
                    seqs,
                })
            }
            Lane::Rnacos(h) => {
                let a = rnacos::list(h, &names.group, &names.services[k], true).await?;
                Ok(Listed {
                    instances: a.instances,
                    seqs: a.seqs,
                })
            }
        }
    }

    /// A request the server answers without touching the registry: Ping for Shoal,
    /// `GET /health` for rnacos.
    pub async fn ping(&mut self) -> Result<()> {
        match self {
            Lane::Shoal(c) => c.ping().await.map(drop).map_err(Into::into),
            Lane::Rnacos(h) => rnacos::health(h).await,
        }
    }

    /// Keeps an instance alive: a beat for rnacos; nothing for Shoal, whose session
    /// does it.
    pub async fn beat(&mut self, names: &Names, k: usize, inst: &Inst) -> Result<()> {
        match self {
            Lane::Shoal(_) => Ok(()),
            Lane::Rnacos(h) => {
                rnacos::beat(h, &names.group, &names.services[k], &inst.ip, inst.port).await
            }
        }
    }

    /// Closes a Shoal session with Goodbye (its instances go at once).
    pub async fn close(self) {
        if let Lane::Shoal(c) = self {
            let _ = c.close().await;
        }
    }
}

/// Counts what a node holds, through its client API.
pub enum Counter {
    Shoal(Client),
    Rnacos(HttpConn),
}

impl Counter {
    /// Healthy instances of the group that this node holds.
    pub async fn count(&mut self, group: &str) -> Result<u64> {
        match self {
            Counter::Shoal(c) => {
                let list = c.list_services(NAMESPACE, Some(group)).await?;
                Ok(list.iter().map(|s| s.healthy as u64).sum())
            }
            Counter::Rnacos(h) => Ok(rnacos::count(h, group).await?.1),
        }
    }
}

/// The cluster of one target, started for the run.
pub enum Nodes {
    Shoal(Cluster),
    Rnacos(RnacosCluster),
}

/// A running cluster of one target and how to reach each node.
pub struct Harness {
    pub kind: TargetKind,
    pub nodes: Nodes,
    /// Client addresses: QUIC for Shoal, HTTP for rnacos.
    pub addrs: Vec<String>,
    pub ids: Vec<String>,
    pub alive: Vec<bool>,
    ca_file: PathBuf,
    pub startup_seconds: f64,
    /// Shoal clients' QUIC keep-alive interval and idle timeout (default: the SDK's).
    pub liveness: Option<(Duration, Duration)>,
}

/// Connection attempts of a benchmark client before the run stops.
const CONNECT_TRIES: u32 = 3;

/// Timeout of a measured request: generous, so a slow answer counts as latency.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

impl Harness {
    /// Starts `n` nodes of `kind`.
    pub async fn start(
        kind: TargetKind,
        n: usize,
        shoal_bin: &std::path::Path,
        rnacos_bin: &std::path::Path,
    ) -> Result<Harness> {
        match kind {
            TargetKind::Shoal => {
                let (cluster, startup) = Cluster::start(shoal_bin, n).await?;
                let addrs = cluster.nodes.iter().map(|n| n.quic_addr.clone()).collect();
                let ids = cluster.nodes.iter().map(|n| n.id.clone()).collect();
                let ca_file = cluster.ca_file.clone();
                Ok(Harness {
                    kind,
                    nodes: Nodes::Shoal(cluster),
                    addrs,
                    ids,
                    alive: vec![true; n],
                    ca_file,
                    startup_seconds: startup,
                    liveness: None,
                })
            }
            TargetKind::Rnacos => {
                let (cluster, startup) = RnacosCluster::start(rnacos_bin, n).await?;
                let addrs = cluster.nodes.iter().map(|n| n.http_addr.clone()).collect();
                let ids = cluster.nodes.iter().map(|n| n.id.clone()).collect();
                Ok(Harness {
                    kind,
                    nodes: Nodes::Rnacos(cluster),
                    addrs,
                    ids,
                    alive: vec![true; n],
                    ca_file: PathBuf::new(),
                    startup_seconds: startup,
                    liveness: None,
                })
            }
        }
    }

    /// (id, pid) of the running nodes.
    pub fn pids(&self) -> Vec<(String, u32)> {
        match &self.nodes {
            Nodes::Shoal(c) => c.pids(),
            Nodes::Rnacos(c) => c.pids(),
        }
    }

    /// Fails if a node that should run has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        match &mut self.nodes {
            Nodes::Shoal(c) => c.check_alive(),
            Nodes::Rnacos(c) => c.check_alive(),
        }
    }

    /// Indexes of the running nodes.
    pub fn live(&self) -> Vec<usize> {
        (0..self.addrs.len()).filter(|&i| self.alive[i]).collect()
    }

    /// The live addresses, starting at node `home`.
    fn rotated(&self, home: usize) -> Vec<String> {
        let n = self.addrs.len();
        (0..n)
            .map(|d| (home + d) % n)
            .filter(|&i| self.alive[i])
            .map(|i| self.addrs[i].clone())
            .collect()
    }

    fn shoal_config(&self, servers: Vec<String>, timeout: Duration) -> ClientConfig {
        let config = ClientConfig::new(servers, self.ca_file.clone())
            .with_client_name(format!("shoal-bench/{}", env!("CARGO_PKG_VERSION")))
            .with_request_timeout(timeout);
        match self.liveness {
            Some((keep_alive, idle)) => config.with_liveness(keep_alive, idle),
            None => config,
        }
    }

    /// One client with `lanes` lanes. `pinned`: it talks to node `home` only (for
    /// rnacos, it never moves to another node); otherwise it knows every live node
    /// and moves on failure (a Shoal client starts at a random one of them and resumes
    /// its session elsewhere; an rnacos lane starts at `home`).
    pub async fn client(
        &self,
        home: usize,
        pinned: bool,
        lanes: usize,
        timeout: Duration,
    ) -> Result<Vec<Lane>> {
        let servers = if pinned {
            vec![self.addrs[home].clone()]
        } else {
            self.rotated(home)
        };
        match self.kind {
            TargetKind::Shoal => {
                // A busy machine (thousands of handshakes at once) may miss the SDK's
                // connect timeout; try a few times before giving up.
                let mut tries = 0;
                let client = loop {
                    tries += 1;
                    match connect_shoal(self.shoal_config(servers.clone(), timeout)).await {
                        Ok(c) => break c,
                        Err(e) if tries >= CONNECT_TRIES => {
                            return Err(e).with_context(|| {
                                format!("connecting to {} ({tries} tries)", self.ids[home])
                            })
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                    }
                };
                Ok((0..lanes).map(|_| Lane::Shoal(client.clone())).collect())
            }
            TargetKind::Rnacos => Ok((0..lanes)
                .map(|_| Lane::Rnacos(HttpConn::new(servers.clone(), timeout)))
                .collect()),
        }
    }

    /// Opens `sessions` clients of `lanes` lanes, session `s` homed on node `s mod N`
    /// of the live nodes (see [`Harness::client`]), at most 16 connecting at once.
    pub async fn clients(
        &self,
        sessions: usize,
        pinned: bool,
        lanes: usize,
        timeout: Duration,
    ) -> Result<Vec<Vec<Lane>>> {
        let live = self.live();
        let mut out = Vec::with_capacity(sessions);
        for chunk in (0..sessions).collect::<Vec<_>>().chunks(16) {
            let mut batch = Vec::new();
            for &s in chunk {
                batch.push(self.client(live[s % live.len()], pinned, lanes, timeout));
            }
            let before = out.len();
            for client in join_all(batch).await {
                out.push(client?);
            }
            if sessions >= 1_000 && before / 1_000 != out.len() / 1_000 {
                eprintln!("connected {} of {sessions} sessions", out.len());
            }
        }
        Ok(out)
    }

    /// One counter per live node (index, counter).
    pub async fn counters(&self) -> Result<Vec<(usize, Counter)>> {
        let mut out = Vec::new();
        for i in self.live() {
            let counter = match self.kind {
                TargetKind::Shoal => Counter::Shoal(
                    connect_shoal(
                        self.shoal_config(vec![self.addrs[i].clone()], Duration::from_secs(5)),
                    )
                    .await
                    .with_context(|| format!("connecting a counter to {}", self.ids[i]))?,
                ),
                TargetKind::Rnacos => Counter::Rnacos(HttpConn::new(
                    vec![self.addrs[i].clone()],
                    Duration::from_secs(5),
                )),
            };
            out.push((i, counter));
        }
        Ok(out)
    }

    /// Kills node `i` with SIGKILL.
    pub async fn kill(&mut self, i: usize) -> Result<()> {
        if !self.alive[i] {
            bail!("{} is not running", self.ids[i]);
        }
        match &mut self.nodes {
            Nodes::Shoal(c) => c.kill(&self.ids[i]).await?,
            Nodes::Rnacos(c) => c.kill(i).await?,
        }
        self.alive[i] = false;
        Ok(())
    }

    /// Stops every node; keeps the directories if `keep`.
    pub async fn stop(self, keep: bool) -> Result<()> {
        match self.nodes {
            Nodes::Shoal(c) => c.stop(keep).await,
            Nodes::Rnacos(c) => c.stop(keep).await,
        }
    }
}

/// The shortest and longest pause between two rounds of [`time_until_count`].
const POLL_MIN: Duration = Duration::from_millis(20);
const POLL_MAX: Duration = Duration::from_millis(200);

/// Polls every counter until it counts `target` instances of `group` (or until
/// `deadline`); the seconds since `since` at which each first did. The pause between
/// rounds is four times the last round's duration, so that counting a large registry
/// (a list of every service on every node) stays a small share of the nodes' work,
/// within [`POLL_MIN`] and [`POLL_MAX`].
pub async fn time_until_count(
    counters: &mut [(usize, Counter)],
    group: &str,
    target: u64,
    since: Instant,
    deadline: Instant,
) -> Vec<Option<f64>> {
    let mut reached: Vec<Option<f64>> = vec![None; counters.len()];
    while Instant::now() < deadline && reached.iter().any(Option::is_none) {
        let round = Instant::now();
        for (slot, (_, counter)) in reached.iter_mut().zip(counters.iter_mut()) {
            if slot.is_none() && counter.count(group).await.ok() == Some(target) {
                *slot = Some(since.elapsed().as_secs_f64());
            }
        }
        // Four times the round's own time, so that counting stays a small share of the
        // nodes' work, but never more than 200 ms: on a busy machine a round can take
        // half a second, and a longer pause measured the poller instead of the nodes
        // (every node held all 140 000 registrations when the last was acknowledged,
        // 4.6 s in, yet the poller reported them 7.2 s in).
        tokio::time::sleep((round.elapsed() * 4).clamp(POLL_MIN, POLL_MAX)).await;
    }
    reached
}

/// Awaits futures concurrently, results in order.
pub async fn join_all<F, T>(futures: Vec<F>) -> Vec<T>
where
    F: std::future::Future<Output = T>,
{
    let mut pinned: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<T>> = (0..pinned.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in pinned.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter()
        .map(|v| v.ok_or_else(|| anyhow!("a future did not finish")))
        .collect::<Result<Vec<T>>>()
        .unwrap_or_default()
}

/// Connects a Shoal client on the load generator's one UDP endpoint (per address
/// family), which all its clients share ([`Client::connect_on`]): one socket and one
/// receiving task for hundreds of sessions instead of one each. A load generator of 100
/// sessions used 13-28 % less CPU per registration so (four alternating pairs, median
/// 15 %; docs/benchmarks.md, twenty-fifth series); the nodes see the same sessions,
/// connections and packets, all from one port.
pub async fn connect_shoal(config: shoal_client::ClientConfig) -> shoal_client::Result<Client> {
    static V4: std::sync::OnceLock<shoal_client::Endpoint> = std::sync::OnceLock::new();
    static V6: std::sync::OnceLock<shoal_client::Endpoint> = std::sync::OnceLock::new();
    let ipv6 = config.servers.first().is_some_and(|s| s.starts_with('['));
    let slot = if ipv6 { &V6 } else { &V4 };
    let endpoint = match slot.get() {
        Some(ep) => ep.clone(),
        None => {
            let ep = shoal_client::new_endpoint(ipv6)?;
            slot.get_or_init(|| ep).clone()
        }
    };
    Client::connect_on(config, endpoint).await
}
