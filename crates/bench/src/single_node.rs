//! `shoal-bench single-node`: registration and query load on one node over QUIC.
//!
//! 1. Start a node (or use `--servers`), connect `--sessions` SDK clients.
//! 2. Register phase: every session registers `--instances-per-session` instances,
//!    spread over `--services` services, with up to `--concurrency` requests in flight
//!    per session, all sessions at once. Timed until the last one is acknowledged.
//! 3. Check with one listing that the node holds exactly what was registered.
//! 4. Query phase: `--query-clients` further clients, each with `--concurrency` tasks,
//!    query random services (healthy instances only, the SDK's usual read) for
//!    `--query-seconds`. The registering sessions stay open meanwhile, so their
//!    instances stay registered.
//! 5. Close every session; stop the node if this run started it.
//!
//! Around each phase the node's CPU seconds (utime + stime) are read from /proc, and its
//! resident memory before and after the register phase.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use shoal_client::{Client, ClientConfig, InstanceSpec, QueryOptions, ServiceKey};
use tokio::task::JoinSet;

use crate::machine::Machine;
use crate::node::{shoal_binary, SpawnedNode};
use crate::procstat;
use crate::progress::Progress;
use crate::report;
use crate::stats::{Latency, Samples};
use crate::SingleNodeArgs;

/// The namespace the benchmark writes to (the one every node has).
pub(crate) const NAMESPACE: &str = "public";
/// The group of the benchmark's services, apart from anything else on the node.
const GROUP: &str = "shoal-bench";
/// Request timeout of the benchmark's clients: generous, so that a slow answer under
/// load counts as latency rather than as an error.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Everything one run measured; written as JSON.
#[derive(Debug, Serialize)]
pub struct SingleNodeResult {
    /// Always `single-node`.
    pub benchmark: &'static str,
    /// Where and when it ran.
    pub machine: Machine,
    /// The parameters of the run.
    pub config: RunConfig,
    /// The register phase.
    pub register: RegisterPhase,
    /// The node's memory around the register phase.
    pub memory: Memory,
    /// The query phase.
    pub query: QueryPhase,
}

/// The parameters of a run.
#[derive(Debug, Serialize)]
pub struct RunConfig {
    pub sessions: usize,
    pub instances_per_session: usize,
    pub services: usize,
    pub query_seconds: u64,
    pub concurrency: usize,
    pub query_clients: usize,
    pub seed: u64,
    /// `spawned` (this run started the node) or `external` (`--servers`).
    pub node: &'static str,
    /// The command line of the run.
    pub command: String,
}

/// CPU seconds used during a phase, by the node and by this benchmark process.
#[derive(Debug, Serialize)]
pub struct CpuUse {
    /// Node: user + system seconds; `None` when its process is unknown.
    pub server_seconds: Option<f64>,
    /// Node: CPU seconds per wall second, in percent of one core.
    pub server_percent: Option<f64>,
    /// This benchmark (the clients): user + system seconds.
    pub client_seconds: Option<f64>,
    /// This benchmark: percent of one core.
    pub client_percent: Option<f64>,
    /// Every other process on the machine: busy CPU seconds of the whole machine minus
    /// the node's and the benchmark's. Near zero on a quiet machine; when it is not,
    /// the figures were made next to other work.
    pub others_seconds: Option<f64>,
}

/// Figures of the register phase.
#[derive(Debug, Serialize)]
pub struct RegisterPhase {
    /// Instances registered and acknowledged.
    pub instances: u64,
    /// Failed registrations (the run fails if there is any).
    pub errors: u64,
    /// Wall time from the first request to the last acknowledgement.
    pub seconds: f64,
    /// Acknowledged registrations per second.
    pub per_second: f64,
    /// Latency of one registration, as the SDK caller sees it.
    pub latency: Latency,
    /// Node CPU seconds per 1000 registrations.
    pub server_cpu_ms_per_1000: Option<f64>,
    pub cpu: CpuUse,
}

/// The node's resident memory.
#[derive(Debug, Serialize)]
pub struct Memory {
    /// After the sessions connected, before the first registration.
    pub rss_before_bytes: Option<u64>,
    /// After the last registration was acknowledged.
    pub rss_after_bytes: Option<u64>,
    /// (after - before) / instances: what one more instance costs, allocator slack
    /// included.
    pub rss_per_instance_bytes: Option<f64>,
}

/// Figures of the query phase.
#[derive(Debug, Serialize)]
pub struct QueryPhase {
    /// Clients that queried.
    pub clients: usize,
    /// Concurrent query tasks over all clients.
    pub tasks: usize,
    /// Answered queries.
    pub queries: u64,
    /// Failed queries.
    pub errors: u64,
    /// Wall time from the first query to the last answer.
    pub seconds: f64,
    /// Answered queries per second.
    pub per_second: f64,
    /// Latency of one query, as the SDK caller sees it.
    pub latency: Latency,
    /// Mean number of instances in an answer.
    pub instances_per_answer: f64,
    /// Node CPU seconds per 1000 queries.
    pub server_cpu_ms_per_1000: Option<f64>,
    pub cpu: CpuUse,
}

/// CPU counters at the start of a phase.
struct CpuMark {
    at: Instant,
    server: Option<f64>,
    client: Option<f64>,
    machine: Option<f64>,
}

impl CpuMark {
    fn now(server_pid: Option<u32>) -> Self {
        CpuMark {
            at: Instant::now(),
            server: server_pid.and_then(procstat::cpu_seconds),
            client: procstat::cpu_seconds(std::process::id()),
            machine: procstat::machine_busy_seconds(),
        }
    }

    fn since(&self, server_pid: Option<u32>) -> CpuUse {
        let end = CpuMark::now(server_pid);
        let wall = end.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let server = end.server.zip(self.server).map(|(b, a)| b - a);
        let client = end.client.zip(self.client).map(|(b, a)| b - a);
        let machine = end.machine.zip(self.machine).map(|(b, a)| b - a);
        let others = machine
            .zip(client)
            .map(|(m, c)| (m - c - server.unwrap_or(0.0)).max(0.0));
        CpuUse {
            server_seconds: server,
            server_percent: server.map(|s| 100.0 * s / wall),
            client_seconds: client,
            client_percent: client.map(|s| 100.0 * s / wall),
            others_seconds: others,
        }
    }
}

/// Where the node is and how to watch it.
struct Target {
    servers: Vec<String>,
    ca_file: std::path::PathBuf,
    pid: Option<u32>,
    spawned: Option<SpawnedNode>,
}

pub async fn run(args: SingleNodeArgs) -> Result<()> {
    if args.sessions == 0 || args.instances_per_session == 0 || args.services == 0 {
        bail!("--sessions, --instances-per-session and --services must be at least 1");
    }
    if args.concurrency == 0 || args.query_clients == 0 {
        bail!("--concurrency and --query-clients must be at least 1");
    }
    let machine = Machine::describe();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let target = match (&args.ca, args.servers.is_empty()) {
        (Some(ca), false) => Target {
            servers: args.servers.clone(),
            ca_file: ca.clone(),
            pid: args.server_pid,
            spawned: None,
        },
        _ => {
            let binary = shoal_binary(args.shoal_bin.as_deref())?;
            let node = SpawnedNode::start(&binary).await?;
            eprintln!(
                "started {} (pid {}) on quic={}",
                binary.display(),
                node.pid,
                node.quic_addr
            );
            Target {
                servers: vec![node.quic_addr.clone()],
                ca_file: node.ca_file.clone(),
                pid: Some(node.pid),
                spawned: Some(node),
            }
        }
    };
    let config = RunConfig {
        sessions: args.sessions,
        instances_per_session: args.instances_per_session,
        services: args.services,
        query_seconds: args.query_seconds,
        concurrency: args.concurrency,
        query_clients: args.query_clients,
        seed,
        node: if target.spawned.is_some() {
            "spawned"
        } else {
            "external"
        },
        command: std::env::args().collect::<Vec<_>>().join(" "),
    };
    eprintln!(
        "single-node: {} sessions x {} instances over {} services, {} in flight per client, \
         query {} s with {} clients; seed {seed}",
        args.sessions,
        args.instances_per_session,
        args.services,
        args.concurrency,
        args.query_seconds,
        args.query_clients
    );

    let outcome = measure(&args, &target, seed).await;
    // Stop the node whatever happened, then report.
    let stopped = match target.spawned {
        Some(node) => node.stop().await,
        None => Ok(()),
    };
    let (register, memory, query) = outcome?;
    stopped?;

    let result = SingleNodeResult {
        benchmark: "single-node",
        machine,
        config,
        register,
        memory,
        query,
    };
    println!("{}", report::table(&result));
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let json = serde_json::to_string_pretty(&result)?;
    std::fs::write(&args.out, json + "\n")
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

/// Connects, runs both phases, closes every session.
async fn measure(
    args: &SingleNodeArgs,
    target: &Target,
    seed: u64,
) -> Result<(RegisterPhase, Memory, QueryPhase)> {
    let client_config = ClientConfig::new(target.servers.clone(), target.ca_file.clone())
        .with_client_name(format!("shoal-bench/{}", env!("CARGO_PKG_VERSION")))
        .with_request_timeout(REQUEST_TIMEOUT);
    let services: Arc<Vec<ServiceKey>> = Arc::new(
        (0..args.services)
            .map(|k| ServiceKey::new(NAMESPACE, GROUP, format!("svc-{k:06}")))
            .collect(),
    );

    let sessions = connect_all(&client_config, args.sessions)
        .await
        .context("connecting the registering sessions")?;
    let rss_before = target.pid.and_then(procstat::rss_bytes);

    let register = register_phase(args, &sessions, &services, target.pid).await?;
    let rss_after = target.pid.and_then(procstat::rss_bytes);
    let memory = Memory {
        rss_before_bytes: rss_before,
        rss_after_bytes: rss_after,
        rss_per_instance_bytes: rss_after
            .zip(rss_before)
            .map(|(a, b)| (a as f64 - b as f64) / register.instances as f64),
    };
    check_registry(&sessions[0], args).await?;

    let readers = connect_all(&client_config, args.query_clients)
        .await
        .context("connecting the query clients")?;
    let query = query_phase(args, &readers, &services, target.pid, seed).await?;

    let mut closing = JoinSet::new();
    for client in sessions.into_iter().chain(readers) {
        closing.spawn(client.close());
    }
    while let Some(closed) = closing.join_next().await {
        if let Ok(Err(e)) = closed {
            eprintln!("warning: closing a session: {e}");
        }
    }
    Ok((register, memory, query))
}

/// Opens `n` sessions, a few at a time.
pub(crate) async fn connect_all(config: &ClientConfig, n: usize) -> Result<Vec<Client>> {
    let mut clients = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(16) {
        let mut connecting = JoinSet::new();
        for &i in chunk {
            let config = config.clone();
            connecting.spawn(async move { (i, crate::target::connect_shoal(config).await) });
        }
        let mut batch = Vec::with_capacity(chunk.len());
        while let Some(joined) = connecting.join_next().await {
            let (i, client) = joined?;
            batch.push((i, client.with_context(|| format!("session {i}"))?));
        }
        batch.sort_by_key(|(i, _)| *i);
        clients.extend(batch.into_iter().map(|(_, c)| c));
    }
    Ok(clients)
}

/// The instance number `g` (0-based over the whole run) as a distinct address:
/// 10.x.y.z from the low 24 bits, the port from the rest.
pub(crate) fn instance_spec(g: usize) -> InstanceSpec {
    InstanceSpec::new(numbered_ip(g), numbered_port(g))
}

/// The port of instance number `g`: 8080 plus the bits above the address's 24.
pub(crate) fn numbered_port(g: usize) -> u16 {
    8080 + u16::try_from(g >> 24).unwrap_or(0)
}

/// `10.x.y.z` from the low 24 bits of `g`. Written digit by digit: the load generator
/// makes one per registration, and `format!` cost it about 850 instructions of the
/// 15 000 it spends on one (callgrind, docs/benchmarks.md, twenty-sixth series).
pub(crate) fn numbered_ip(g: usize) -> String {
    fn octet(s: &mut String, v: usize) {
        let v = (v & 0xff) as u8;
        if v >= 100 {
            s.push(char::from(b'0' + v / 100));
        }
        if v >= 10 {
            s.push(char::from(b'0' + v / 10 % 10));
        }
        s.push(char::from(b'0' + v % 10));
    }
    let mut s = String::with_capacity(15);
    s.push_str("10.");
    octet(&mut s, g >> 16);
    s.push('.');
    octet(&mut s, g >> 8);
    s.push('.');
    octet(&mut s, g);
    s
}

/// What one task of a phase brings back.
#[derive(Default)]
pub(crate) struct TaskTally {
    pub(crate) samples: Samples,
    pub(crate) errors: u64,
    pub(crate) first_error: Option<String>,
    pub(crate) instances_seen: u64,
}

impl TaskTally {
    pub(crate) fn failed(&mut self, what: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(what);
        }
    }

    pub(crate) fn merge(&mut self, other: TaskTally) {
        self.samples.merge(other.samples);
        self.errors += other.errors;
        self.instances_seen += other.instances_seen;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// Registers `per_session` instances through each session, spread over `services`,
/// with up to `concurrency` requests in flight per session; counts acknowledgements in
/// `done`. Shared by the single-node and cluster scenarios.
pub(crate) async fn register_all(
    sessions: &[Client],
    services: &Arc<Vec<ServiceKey>>,
    per_session: usize,
    concurrency: usize,
    done: &Arc<AtomicU64>,
) -> Result<TaskTally> {
    let total = sessions.len() * per_session;
    let mut tasks = JoinSet::new();
    for (s, client) in sessions.iter().enumerate() {
        let next = Arc::new(AtomicUsize::new(0));
        for _ in 0..concurrency.min(per_session) {
            let (client, next, done, services) =
                (client.clone(), next.clone(), done.clone(), services.clone());
            tasks.spawn(async move {
                let mut tally = TaskTally::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= per_session {
                        return tally;
                    }
                    let g = s * per_session + i;
                    let service = &services[g % services.len()];
                    let started = Instant::now();
                    match client.register(service, instance_spec(g)).await {
                        Ok(_) => {
                            tally.samples.record(started.elapsed());
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => tally.failed(format!("register {}: {e}", service.service)),
                    }
                }
            });
        }
    }
    let mut all = TaskTally {
        samples: Samples::with_capacity(total),
        ..TaskTally::default()
    };
    while let Some(joined) = tasks.join_next().await {
        all.merge(joined?);
    }
    Ok(all)
}

async fn register_phase(
    args: &SingleNodeArgs,
    sessions: &[Client],
    services: &Arc<Vec<ServiceKey>>,
    server_pid: Option<u32>,
) -> Result<RegisterPhase> {
    let per_session = args.instances_per_session;
    let total = (sessions.len() * per_session) as u64;
    let done = Arc::new(AtomicU64::new(0));
    let progress = Progress::start("register", done.clone(), Some(total));
    let mark = CpuMark::now(server_pid);
    let all = register_all(sessions, services, per_session, args.concurrency, &done).await?;
    let seconds = mark.at.elapsed().as_secs_f64();
    let cpu = mark.since(server_pid);
    drop(progress);
    if let Some(e) = all.first_error {
        bail!("{} registrations failed; the first: {e}", all.errors);
    }
    let instances = all.samples.len() as u64;
    Ok(RegisterPhase {
        instances,
        errors: all.errors,
        seconds,
        per_second: instances as f64 / seconds,
        latency: all.samples.summarize(),
        server_cpu_ms_per_1000: cpu
            .server_seconds
            .map(|s| s * 1000.0 * 1000.0 / instances as f64),
        cpu,
    })
}

/// Checks that the node lists exactly the services and instances the run registered.
/// A single node holds every write it acknowledged, so the first listing matches. With
/// several `--servers` (a cluster), the listing node may hold a copy of writes that
/// other nodes acknowledged, which lags by milliseconds: it is listed again until it
/// matches, for up to [`CHECK_WAIT`].
async fn check_registry(client: &Client, args: &SingleNodeArgs) -> Result<()> {
    let expected_instances = args.sessions * args.instances_per_session;
    let expected_services = args.services.min(expected_instances);
    let deadline = Instant::now() + CHECK_WAIT;
    loop {
        let listed = client
            .list_services(NAMESPACE, Some(GROUP))
            .await
            .context("listing the services after registration")?;
        let instances: usize = listed.iter().map(|s| s.instances).sum();
        if listed.len() == expected_services && instances == expected_instances {
            eprintln!(
                "checked: the node lists {expected_services} services with {instances} instances"
            );
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "the node lists {} services with {instances} instances in group {GROUP} \
                 {} s after the last registration was acknowledged; expected \
                 {expected_services} services with {expected_instances} instances",
                listed.len(),
                CHECK_WAIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How long [`check_registry`] waits for the listing node to hold every registration.
const CHECK_WAIT: Duration = Duration::from_secs(10);

async fn query_phase(
    args: &SingleNodeArgs,
    readers: &[Client],
    services: &Arc<Vec<ServiceKey>>,
    server_pid: Option<u32>,
    seed: u64,
) -> Result<QueryPhase> {
    let done = Arc::new(AtomicU64::new(0));
    let progress = Progress::start("query", done.clone(), None);
    let mark = CpuMark::now(server_pid);
    let deadline = mark.at + Duration::from_secs(args.query_seconds);
    let mut tasks = JoinSet::new();
    for (c, client) in readers.iter().enumerate() {
        for t in 0..args.concurrency {
            let (client, done, services) = (client.clone(), done.clone(), services.clone());
            // One reproducible stream of choices per task.
            let mut rng = StdRng::seed_from_u64(
                seed ^ ((c as u64) << 32 | t as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            );
            tasks.spawn(async move {
                let mut tally = TaskTally::default();
                while Instant::now() < deadline {
                    let service = &services[rng.random_range(0..services.len())];
                    let started = Instant::now();
                    match client.query(service, QueryOptions::healthy()).await {
                        Ok(view) => {
                            tally.samples.record(started.elapsed());
                            tally.instances_seen += view.instances.len() as u64;
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => tally.failed(format!("query {}: {e}", service.service)),
                    }
                }
                tally
            });
        }
    }
    let mut all = TaskTally::default();
    while let Some(joined) = tasks.join_next().await {
        all.merge(joined?);
    }
    let seconds = mark.at.elapsed().as_secs_f64();
    let cpu = mark.since(server_pid);
    drop(progress);
    if let Some(e) = &all.first_error {
        eprintln!("warning: {} queries failed; the first: {e}", all.errors);
    }
    let queries = all.samples.len() as u64;
    Ok(QueryPhase {
        clients: readers.len(),
        tasks: readers.len() * args.concurrency,
        queries,
        errors: all.errors,
        seconds,
        per_second: queries as f64 / seconds,
        instances_per_answer: if queries == 0 {
            0.0
        } else {
            all.instances_seen as f64 / queries as f64
        },
        latency: all.samples.summarize(),
        server_cpu_ms_per_1000: cpu
            .server_seconds
            .filter(|_| queries > 0)
            .map(|s| s * 1000.0 * 1000.0 / queries as f64),
        cpu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_addresses_are_distinct_and_valid() {
        let a = instance_spec(0);
        let b = instance_spec(0x01_02_03);
        assert_eq!((a.ip.as_str(), a.port), ("10.0.0.0", 8080));
        assert_eq!((b.ip.as_str(), b.port), ("10.1.2.3", 8080));
        let c = instance_spec(1 << 24);
        assert_eq!((c.ip.as_str(), c.port), ("10.0.0.0", 8081));
    }

    #[test]
    fn numbered_addresses_read_as_formatted() {
        let formatted =
            |g: usize| format!("10.{}.{}.{}", (g >> 16) & 0xff, (g >> 8) & 0xff, g & 0xff);
        // Every octet value in every place, then a stride over all 2^24 (and beyond:
        // the bits above 24 go to the port).
        let every = (0..256).flat_map(|v| [v, v << 8, v << 16, v * 0x01_01_01]);
        for g in every.chain((0..1 << 26).step_by(9_973)) {
            assert_eq!(numbered_ip(g), formatted(g), "g = {g}");
        }
    }
}
