//! `shoal-bench compare`: the same scenarios against a 3-node rnacos cluster (Nacos v1
//! HTTP API) and a 3-node Shoal cluster (QUIC through the SDK) on loopback, one after
//! the other, never both at once. One table with both figures and their ratio, a JSON
//! file with everything, and an SVG of the latency distributions.
//!
//! Per target, in this order, on one cluster:
//!
//! 1. **register**: `--sessions` clients, client `s` starting at node `s mod N`, each
//!    with `--concurrency` requests in flight (Shoal: one SDK client, that many
//!    pipelined requests on its QUIC connection; rnacos: that many HTTP/1.1 keep-alive
//!    connections), register `--instances-per-session` instances each over
//!    `--services` services. Timed until the last acknowledgement and until every
//!    node counts every instance (polled every 20 ms). Resident memory of the nodes
//!    before and after, per instance held.
//!    **roundtrip** then sends `--roundtrip-requests` requests, on the same sessions
//!    with the same concurrency, that the server answers without touching the registry
//!    (Shoal: Ping; rnacos: `GET /health`, which asks its health actor): what the
//!    transport, the server's request path and the load generator alone allow on this
//!    machine, the ceiling of one registration per request.
//!    From here on rnacos instances are kept alive by beats (`PUT .../beat`, every
//!    `--beat-interval-ms` per instance, from `--beat-lanes` connections per node), as
//!    a Nacos 1.x client does; Shoal's stay with their sessions.
//! 2. **query**: `--query-clients` clients per node, each with `--concurrency` in
//!    flight, list random services (healthy only) for `--query-seconds`.
//! 3. **keepalive**: nothing but holding the instances for `--keepalive-seconds`:
//!    the nodes' CPU seconds and the bytes on loopback (an upper bound of the bytes on
//!    the wire: every process's loopback traffic counts).
//! 4. **visibility**: a writer on node 1 writes at `--visibility-rate` (register or
//!    replace an instance with metadata `seq`); pollers on every node list the written
//!    services in a loop; a write is visible on a node when a poll there first shows
//!    its `seq`, and visible everywhere at the latest of those. Same method for both
//!    targets; the poll period is reported as the resolution.
//! 5. **push**: Shoal only: subscribers on every node, write-to-push latency (see
//!    `visibility.rs`). rnacos pushes changes only to its gRPC (Nacos 2.x) clients; its
//!    v1 UDP listener resends lists periodically rather than on change, so write-to-push
//!    is not expressible over the v1 HTTP API.
//! 6. **churn**: instances join and leave at `--churn-rate` each per second for
//!    `--churn-seconds`, `--churn-population` alive at a time.
//! 7. **failover**: node N is killed with SIGKILL while the instances are held
//!    (beats go on for rnacos). Every 200 ms: a probe write to every service through
//!    every survivor (1 s timeout each; all must succeed: every service has an owner
//!    again) and every survivor's count of the held instances (plus the probes).
//!    Failover time = from the kill to the end of the first round after which every
//!    round passed both checks, within `--failover-window`.
//!
//! Between keepalive and visibility, **register-batch** (Shoal only; the Nacos v1 HTTP
//! API registers one instance per request): `--batch-rounds` times the register
//! population, with RegisterMany, `--batch` per request; then closed again.
//!
//! Once a cluster is formed it runs idle for `--settle-seconds` before the first
//! scenario (an rnacos node pulls the others' naming data 1, 15 and 45 s after it joins
//! and pushes its own at 30 s).
//! Before each scenario the benchmark waits for a quiet machine (`--quiet-share`), and
//! records what other processes used during it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use shoal_storage::{InstanceSpec, ServiceKey};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::cpu::{wait_quiet, CpuMark, PhaseCpu, QuietWait};
use crate::machine::Machine;
use crate::node::shoal_binary;
use crate::procstat;
use crate::progress::Progress;
use crate::rnacos::rnacos_binary;
use crate::stats::{Latency, Samples};
use crate::target::{
    time_until_count, Counter, Harness, Inst, Lane, Names, Nodes, TargetKind, REQUEST_TIMEOUT,
};
use crate::{compare_report, visibility, ClusterArgs, Phase};

/// A scenario of `shoal-bench compare`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    Register,
    Roundtrip,
    RegisterBatch,
    Query,
    Keepalive,
    Visibility,
    Push,
    Churn,
    Failover,
}

/// Options of `shoal-bench compare`.
#[derive(clap::Args, Debug, Clone)]
pub struct CompareArgs {
    /// Targets, in the order they run (one after the other, never together).
    #[arg(long, value_delimiter = ',', default_value = "rnacos,shoal")]
    pub targets: Vec<TargetKind>,
    /// Scenarios (register always runs: the others use its instances).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "register,roundtrip,query,keepalive,register-batch,visibility,push,churn,failover"
    )]
    pub scenarios: Vec<Scenario>,
    /// Nodes per cluster.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Register: client sessions.
    #[arg(long, default_value_t = 100)]
    pub sessions: usize,
    /// Register: instances per session.
    #[arg(long, default_value_t = 140)]
    pub instances_per_session: usize,
    /// Register: services the instances are spread over (instance g in service g mod K).
    #[arg(long, default_value_t = 100)]
    pub services: usize,
    /// Requests in flight per client (Shoal: on its one connection; rnacos: that many
    /// keep-alive connections).
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Register-batch (Shoal): instances per RegisterMany request (at most 1024).
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Register-batch (Shoal): each session registers this many times the register
    /// scenario's instances. The default's 14 000 took RegisterMany about 0.15 s, too
    /// short for the count poller to time "visible on every node" (it pauses up to
    /// 200 ms between rounds); 10 makes it 140 000.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_rounds: u64,
    /// Roundtrip: empty requests in all, spread evenly over the register scenario's
    /// sessions (at least one each). The register scenario's default 14 000 would take
    /// Shoal about 75 ms, too short to measure; 140 000 take it about 1 s and rnacos
    /// about 3 s (its instances get no beats meanwhile, and rnacos marks them unhealthy
    /// only after 15 s).
    #[arg(long, default_value_t = 140_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub roundtrip_requests: u64,
    /// Register (Shoal): use RegisterMany (`--batch` per request) for the register
    /// scenario too, e.g. to load a million instances for keepalive quickly. The table
    /// says so.
    #[arg(long)]
    pub batch_register: bool,
    /// Register (Shoal, an experiment): each session registers only in services that
    /// its home node owns (asked of the ring before the timing starts), so that no
    /// registration is forwarded. Measures what forwarding costs; the table says so.
    #[arg(long)]
    pub home_owned: bool,
    /// RegisterMany (Shoal): requests in flight over all sessions together. A fleet
    /// that starts at once paces itself like this; without a bound, 10 000 sessions
    /// offer the cluster a million registrations in one go and the owners shed the
    /// forwards that waited past `forward_timeout_ms`.
    #[arg(long, default_value_t = 64)]
    pub batches_in_flight: usize,
    /// Shoal clients: QUIC keep-alive interval in ms (default: the SDK's, 6 000). It
    /// only fires when the nodes' heartbeats (every 5 s by default) are slower; each
    /// session costs the cluster about one packet each way per interval of the faster.
    #[arg(long)]
    pub keep_alive_ms: Option<u64>,
    /// Shoal clients: QUIC idle timeout in ms, above `--keep-alive-ms` (default: the
    /// SDK's, 12 000; with `--keep-alive-ms` alone, 4x that interval).
    #[arg(long)]
    pub idle_timeout_ms: Option<u64>,
    /// rnacos: interval of the beats of each instance, in ms (the Nacos default).
    #[arg(long, default_value_t = 5000)]
    pub beat_interval_ms: u64,
    /// rnacos: beat connections per node.
    #[arg(long, default_value_t = 8)]
    pub beat_lanes: usize,
    /// Query: clients per node.
    #[arg(long, default_value_t = 8)]
    pub query_clients: usize,
    /// Query: seconds.
    #[arg(long, default_value_t = 10)]
    pub query_seconds: u64,
    /// Keepalive: seconds of holding the instances.
    #[arg(long, default_value_t = 20)]
    pub keepalive_seconds: u64,
    /// Visibility: writes per second through node 1.
    #[arg(long, default_value_t = 1000)]
    pub visibility_rate: u64,
    /// Visibility and push: seconds of writing.
    #[arg(long, default_value_t = 10)]
    pub visibility_seconds: u64,
    /// Visibility: services written round-robin (and polled on every node).
    #[arg(long, default_value_t = 20)]
    pub visibility_services: usize,
    /// Visibility: instance slots per service (a write replaces the one made
    /// services x slots writes earlier).
    #[arg(long, default_value_t = 64)]
    pub visibility_slots: usize,
    /// Visibility: polling lanes per node.
    #[arg(long, default_value_t = 4)]
    pub visibility_pollers: usize,
    /// Visibility: writer lanes (requests in flight) on node 1.
    #[arg(long, default_value_t = 32)]
    pub visibility_writers: usize,
    /// Push (Shoal): writes per second through node 1.
    #[arg(long, default_value_t = 2000)]
    pub push_rate: u64,
    /// Push (Shoal): writer sessions on node 1.
    #[arg(long, default_value_t = 8)]
    pub push_writers: usize,
    /// Churn: joins per second (as many leaves once the population is reached).
    #[arg(long, default_value_t = 500)]
    pub churn_rate: u64,
    /// Churn: seconds.
    #[arg(long, default_value_t = 10)]
    pub churn_seconds: u64,
    /// Churn: instances alive at a time.
    #[arg(long, default_value_t = 1000)]
    pub churn_population: usize,
    /// Failover: seconds watched after the kill.
    #[arg(long, default_value_t = 40)]
    pub failover_window: u64,
    /// Wait before each scenario until other processes used at most this share of the
    /// machine over 3 s (1 = do not wait).
    #[arg(long, default_value_t = 0.10)]
    pub quiet_share: f64,
    /// Longest wait for a quiet machine, in seconds; then the scenario runs anyway.
    #[arg(long, default_value_t = 120)]
    pub quiet_timeout: u64,
    /// Seconds each cluster runs, ready and idle, before its first scenario. An rnacos
    /// node that joins a cluster pulls the other nodes' naming data 1, 15 and 45 s later
    /// and pushes its own at 30 s; a register phase running into the 15 s pull with
    /// 100 000 instances held stalls for seconds. A cluster that has run for a minute
    /// has done with it, as one in service has; both targets wait the same.
    #[arg(long, default_value_t = 50)]
    pub settle_seconds: u64,
    /// The `shoal` binary (default: next to this executable).
    #[arg(long)]
    pub shoal_bin: Option<PathBuf>,
    /// The `rnacos` binary (default: on the PATH or in ~/.cargo/bin).
    #[arg(long)]
    pub rnacos_bin: Option<PathBuf>,
    /// Seed of the random choices of the query scenario.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Keep the nodes' directories.
    #[arg(long)]
    pub keep_dirs: bool,
    /// JSON result.
    #[arg(long, default_value = "target/bench/compare.json")]
    pub out: PathBuf,
    /// SVG plot of the latency distributions.
    #[arg(long, default_value = "target/bench/compare-latency.svg")]
    pub svg: PathBuf,
}

/// Which way a figure is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Better {
    Higher,
    Lower,
    /// Context, not a score.
    Neither,
}

/// One figure of one target.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub scenario: &'static str,
    pub metric: String,
    pub unit: &'static str,
    pub better: Better,
    pub value: Option<f64>,
    /// Why there is no value, or how to read it.
    pub note: Option<String>,
}

/// Everything one target's run measured.
#[derive(Debug, Serialize)]
pub struct TargetRun {
    pub target: TargetKind,
    pub startup_seconds: f64,
    pub figures: Vec<Figure>,
    /// Latency distributions by scenario, for the plot.
    pub latencies: BTreeMap<String, Latency>,
    /// Raw figures of each scenario (CPU per node, quiet waits, counts).
    pub details: BTreeMap<String, serde_json::Value>,
    /// Set if the run stopped early.
    pub error: Option<String>,
}

impl TargetRun {
    fn fig(
        &mut self,
        scenario: &'static str,
        metric: &str,
        unit: &'static str,
        better: Better,
        value: Option<f64>,
    ) {
        self.figures.push(Figure {
            scenario,
            metric: metric.to_string(),
            unit,
            better,
            value,
            note: None,
        });
    }

    fn na(&mut self, scenario: &'static str, metric: &str, note: &str) {
        self.figures.push(Figure {
            scenario,
            metric: metric.to_string(),
            unit: "",
            better: Better::Neither,
            value: None,
            note: Some(note.to_string()),
        });
    }

    fn detail(&mut self, scenario: &str, value: impl Serialize) {
        self.details.insert(
            scenario.to_string(),
            serde_json::to_value(value).unwrap_or_default(),
        );
    }

    /// "CPU of all nodes per 1000 `what`" (milliseconds of the nodes' CPU per thousand
    /// of `count`) and the same of the load generator, then the CPU figures common to
    /// every scenario.
    fn cpu_per_thousand(&mut self, scenario: &'static str, what: &str, cpu: &PhaseCpu, count: u64) {
        self.fig(
            scenario,
            &format!("CPU of all nodes per 1000 {what}"),
            "ms",
            Better::Lower,
            (count > 0).then(|| cpu.nodes_seconds * 1e6 / count as f64),
        );
        // The clients' side of the same work (the SDK for Shoal, an HTTP client for
        // rnacos): not compared, as the two clients differ; the SDK's own cost, which
        // an application pays too, shows here.
        self.fig(
            scenario,
            &format!("CPU of the load generator per 1000 {what}"),
            "ms",
            Better::Neither,
            cpu.bench_seconds
                .filter(|_| count > 0)
                .map(|s| s * 1e6 / count as f64),
        );
        self.cpu_figures(scenario, cpu);
    }

    /// CPU figures common to every scenario.
    fn cpu_figures(&mut self, scenario: &'static str, cpu: &PhaseCpu) {
        self.fig(
            scenario,
            "CPU of all nodes",
            "% of a core",
            Better::Lower,
            Some(100.0 * cpu.nodes_seconds / cpu.wall_seconds),
        );
        self.machine_figures(scenario, cpu);
    }

    /// What else used the machine during the phase: other processes, and of that what
    /// the hypervisor took (steal), the share of the run's CPU time that went to other
    /// guests on a shared host. The second can be the larger (see
    /// [`PhaseCpu::steal_seconds`]).
    fn machine_figures(&mut self, scenario: &'static str, cpu: &PhaseCpu) {
        self.fig(
            scenario,
            "other processes",
            "% of machine",
            Better::Neither,
            cpu.others_seconds.map(|s| cpu.machine_percent(s)),
        );
        self.fig(
            scenario,
            "of which stolen by the hypervisor",
            "% of machine",
            Better::Neither,
            cpu.steal_seconds.map(|s| cpu.machine_percent(s)),
        );
        self.fig(
            scenario,
            "UDP datagrams dropped, receive buffer full",
            "",
            Better::Neither,
            cpu.udp_dropped.map(|n| n as f64),
        );
    }
}

/// The whole result file.
#[derive(Debug, Serialize)]
pub struct CompareResult {
    pub benchmark: &'static str,
    pub machine: Machine,
    pub command: String,
    pub nodes: usize,
    /// The worker threads each Shoal node was given (`SHOAL_WORKER_THREADS`).
    pub shoal_worker_threads: String,
    /// The HTTP workers each rnacos node was given (`RNACOS_HTTP_WORKERS`).
    pub rnacos_http_workers: String,
    /// The threads of the load generator, for both targets (`SHOAL_BENCH_THREADS`).
    pub load_generator_threads: usize,
    pub runs: Vec<TargetRun>,
}

pub async fn run(args: CompareArgs, load_generator_threads: usize) -> Result<()> {
    if args.nodes < 2 {
        bail!("--nodes must be at least 2");
    }
    if args.sessions == 0
        || args.instances_per_session == 0
        || args.services == 0
        || args.concurrency == 0
    {
        bail!(
            "--sessions, --instances-per-session, --services and --concurrency must be at least 1"
        );
    }
    let machine = Machine::describe();
    let shoal_bin = if args.targets.contains(&TargetKind::Shoal) {
        shoal_binary(args.shoal_bin.as_deref())?
    } else {
        PathBuf::new()
    };
    let rnacos_bin = if args.targets.contains(&TargetKind::Rnacos) {
        rnacos_binary(args.rnacos_bin.as_deref())?
    } else {
        PathBuf::new()
    };
    let mut result = CompareResult {
        benchmark: "compare",
        machine,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        nodes: args.nodes,
        shoal_worker_threads: std::env::var("SHOAL_WORKER_THREADS")
            .unwrap_or_else(|_| crate::cluster::shared_worker_threads(args.nodes).to_string()),
        rnacos_http_workers: std::env::var("RNACOS_HTTP_WORKERS")
            .unwrap_or_else(|_| crate::cluster::shared_worker_threads(args.nodes).to_string()),
        load_generator_threads,
        runs: Vec::new(),
    };
    for &kind in &args.targets {
        eprintln!("=== {} ===", kind.name());
        let harness = Harness::start(kind, args.nodes, &shoal_bin, &rnacos_bin)
            .await
            .with_context(|| format!("starting the {} cluster", kind.name()))?;
        let mut run = TargetRun {
            target: kind,
            startup_seconds: harness.startup_seconds,
            figures: Vec::new(),
            latencies: BTreeMap::new(),
            details: BTreeMap::new(),
            error: None,
        };
        let mut harness = harness;
        if args.settle_seconds > 0 {
            eprintln!(
                "[settle] the cluster runs idle for {} s before the first scenario",
                args.settle_seconds
            );
            tokio::time::sleep(Duration::from_secs(args.settle_seconds)).await;
        }
        if let Some(k) = args.keep_alive_ms {
            let idle = args.idle_timeout_ms.unwrap_or(k.saturating_mul(4));
            harness.liveness = Some((Duration::from_millis(k), Duration::from_millis(idle)));
        } else if let Some(idle) = args.idle_timeout_ms {
            let keep_alive = shoal_client::ClientConfig::default()
                .keep_alive_interval
                .min(Duration::from_millis(idle / 2));
            harness.liveness = Some((keep_alive, Duration::from_millis(idle)));
        }
        let outcome = scenarios(&args, &mut harness, &mut run).await;
        let failed = outcome.is_err();
        if let Err(e) = outcome {
            eprintln!("{}: the run stopped: {e:#}", kind.name());
            run.error = Some(format!("{e:#}"));
        }
        if let Err(e) = harness.stop(args.keep_dirs || failed).await {
            eprintln!("warning: stopping {}: {e:#}", kind.name());
        }
        result.runs.push(run);
        // Let the machine settle before the next target.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    println!("{}", compare_report::table(&result));
    for path in [&args.out, &args.svg] {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&result)? + "\n")
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    std::fs::write(&args.svg, compare_report::svg(&result))
        .with_context(|| format!("cannot write {}", args.svg.display()))?;
    eprintln!("wrote {} and {}", args.out.display(), args.svg.display());
    if let Some(bad) = result.runs.iter().find(|r| r.error.is_some()) {
        bail!(
            "the {} run stopped early: {}",
            bad.target.name(),
            bad.error.clone().unwrap_or_default()
        );
    }
    Ok(())
}

async fn quiet(args: &CompareArgs, h: &Harness, phase: &str) -> QuietWait {
    wait_quiet(
        phase,
        &h.pids(),
        args.quiet_share,
        Duration::from_secs(args.quiet_timeout),
    )
    .await
}

/// Runs the scenarios asked for on one target.
async fn scenarios(args: &CompareArgs, h: &mut Harness, run: &mut TargetRun) -> Result<()> {
    let has = |s: Scenario| args.scenarios.contains(&s);
    let mut reg = register(args, h, run).await?;
    if has(Scenario::Roundtrip) {
        // Before rnacos's beats start, as register ran without them.
        roundtrip(args, h, run, &mut reg).await?;
    }
    let beater = Beater::start(args, h, &reg).await?;
    if has(Scenario::Query) {
        query(args, h, run, &reg).await?;
    }
    if has(Scenario::Keepalive) {
        keepalive(args, h, run, &reg, &beater).await?;
    }
    // After keepalive: the memory it frees stays with the nodes' allocators and would
    // count as held by the register scenario's instances.
    if has(Scenario::RegisterBatch) {
        register_batch(args, h, run).await?;
    }
    if has(Scenario::Visibility) {
        poll_visibility(args, h, run).await?;
    }
    if has(Scenario::Push) {
        push(args, h, run).await?;
    }
    if has(Scenario::Churn) {
        churn(args, h, run).await?;
    }
    if has(Scenario::Failover) {
        failover(args, h, run, &reg, &beater).await?;
    }
    beater.stop().await;
    // Goodbye from every session at once (one after the other takes minutes with
    // thousands of sessions).
    let mut closing = JoinSet::new();
    for lanes in reg.sessions {
        if let Some(first) = lanes.into_iter().next() {
            closing.spawn(first.close());
        }
    }
    while closing.join_next().await.is_some() {}
    Ok(())
}

/// Registers `per` instances for each of `clients` (instance `g = s * per + i` in
/// service `g mod K`, as the register scenario does) with RegisterMany, `batch` per
/// request and `in_flight` requests at once per client, at most `total_in_flight` over
/// all clients together. Items a node refused as unavailable (an owner shedding forwards
/// that waited too long, or no owner yet) are sent again after a pause, up to
/// [`BATCH_RETRIES`] times, as an application would. Returns the request latencies,
/// the registrations that failed for good, the first error and the items resent.
async fn register_many_over(
    clients: &[shoal_client::Client],
    names: &Arc<Names>,
    per: usize,
    batch: usize,
    (in_flight, total_in_flight): (usize, usize),
    done: &Arc<AtomicU64>,
) -> Result<(Samples, u64, Option<String>, u64)> {
    let limit = Arc::new(tokio::sync::Semaphore::new(total_in_flight.max(1)));
    let resent = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for (s, client) in clients.iter().enumerate() {
        let items: Vec<(ServiceKey, InstanceSpec)> = (0..per)
            .map(|i| {
                let g = s * per + i;
                (
                    names.keys[g % names.len()].clone(),
                    Inst::numbered(g).into_spec(),
                )
            })
            .collect();
        let chunks: Vec<Vec<(ServiceKey, InstanceSpec)>> =
            items.chunks(batch).map(<[_]>::to_vec).collect();
        let queue = Arc::new(Mutex::new(chunks.into_iter()));
        for _ in 0..in_flight.max(1) {
            let (client, queue, done, limit, resent) = (
                client.clone(),
                queue.clone(),
                done.clone(),
                limit.clone(),
                resent.clone(),
            );
            tasks.spawn(async move {
                let mut samples = Samples::default();
                let mut errors = 0u64;
                let mut first_error = None;
                loop {
                    let Some(mut chunk) = queue.lock().unwrap().next() else {
                        return (samples, errors, first_error);
                    };
                    // The chunk, then what of it was refused as unavailable, until
                    // nothing is left or the retries are used up.
                    for attempt in 0..=BATCH_RETRIES {
                        if attempt > 0 {
                            resent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        let n = chunk.len() as u64;
                        let permit = limit.acquire().await.expect("never closed");
                        let t = Instant::now();
                        let outcome = client.register_many(chunk.clone()).await;
                        drop(permit);
                        let outcomes = match outcome {
                            Ok(outcomes) => outcomes,
                            Err(e) => {
                                errors += n;
                                first_error.get_or_insert(format!("{e:#}"));
                                break;
                            }
                        };
                        samples.record(t.elapsed());
                        let mut again = Vec::new();
                        for (item, o) in chunk.into_iter().zip(outcomes) {
                            match o {
                                Ok(_) => {
                                    done.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(e) if attempt < BATCH_RETRIES && retryable(&e) => {
                                    again.push(item)
                                }
                                Err(e) => {
                                    errors += 1;
                                    first_error.get_or_insert(e.to_string());
                                }
                            }
                        }
                        if again.is_empty() {
                            break;
                        }
                        chunk = again;
                    }
                }
            });
        }
    }
    let mut samples = Samples::default();
    let mut errors = 0;
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        let (part, e, first) = joined?;
        samples.merge(part);
        errors += e;
        if first_error.is_none() {
            first_error = first;
        }
    }
    Ok((samples, errors, first_error, resent.load(Ordering::Relaxed)))
}

/// Records how many items of a batched registration were refused and sent again.
fn resent_figure(run: &mut TargetRun, scenario: &'static str, resent: u64) {
    run.fig(
        scenario,
        "items refused as unavailable and sent again",
        "",
        Better::Lower,
        Some(resent as f64),
    );
}

/// Times an item refused as unavailable is sent again.
const BATCH_RETRIES: usize = 5;

/// Whether a node refused an item for a reason that passes (shed load, no owner yet).
fn retryable(e: &shoal_client::ClientError) -> bool {
    matches!(
        e,
        shoal_client::ClientError::Server(b)
            if matches!(b.code, shoal_proto::ErrorCode::Unavailable | shoal_proto::ErrorCode::NotReady)
    )
}

/// Shoal only: `--batch-rounds` times the register scenario's population, in a group
/// of its own, registered with RegisterMany (`--batch` instances per request,
/// `--concurrency` requests in flight per session); then closed again, so that the
/// later scenarios see the cluster as the register scenario left it.
async fn register_batch(args: &CompareArgs, h: &mut Harness, run: &mut TargetRun) -> Result<()> {
    const S: &str = "register-batch";
    if matches!(h.nodes, Nodes::Rnacos(_)) {
        let why = "not expressible: the Nacos v1 HTTP API registers one instance per request";
        for metric in [
            "registrations/s, acknowledged",
            "registrations/s, visible on every node",
        ] {
            run.na(S, metric, why);
        }
        return Ok(());
    }
    let names = Names::new("cmpbatch", args.services);
    let q = quiet(args, h, S).await;
    let sessions = h
        .clients(args.sessions, false, 1, REQUEST_TIMEOUT)
        .await
        .context("connecting the sessions")?;
    let counters = h.counters().await?;
    let per = args.instances_per_session * args.batch_rounds as usize;
    let total = (args.sessions * per) as u64;
    let batch = args.batch.clamp(1, shoal_proto::MAX_BATCH_ITEMS);
    eprintln!(
        "[{S}] {} sessions x {per} instances over {} services, {batch} per request, {} requests in flight per session",
        args.sessions, args.services, args.concurrency
    );
    let done = Arc::new(AtomicU64::new(0));
    let progress = Progress::start(S, done.clone(), Some(total));
    let mark = CpuMark::now(&h.pids());
    let started = mark.at();
    let poller = count_until(counters, names.group.clone(), total, started);
    let mut clients = Vec::new();
    for lanes in sessions {
        let Some(Lane::Shoal(client)) = lanes.into_iter().next() else {
            bail!("register-batch needs Shoal sessions");
        };
        clients.push(client);
    }
    let (samples, errors, first_error, resent) = register_many_over(
        &clients,
        &names,
        per,
        batch,
        (args.concurrency, args.batches_in_flight),
        &done,
    )
    .await?;
    let ack_seconds = started.elapsed().as_secs_f64();
    resent_figure(run, S, resent);
    drop(progress);
    if let Some(e) = first_error {
        poller.abort();
        bail!("{errors} batched registrations failed; the first: {e}");
    }
    eprintln!(
        "[{S}] all acknowledged after {ack_seconds:.2} s; waiting until every node counts them"
    );
    let (visible, mut counters) = poller.await?;
    let cpu = mark.since();
    h.check_alive()?;
    let all_visible = latest(&visible);
    let latency = samples.summarize();
    registration_rates(run, S, total, ack_seconds, all_visible);
    run.fig(
        S,
        "request latency p50 (one batch)",
        "ms",
        Better::Lower,
        Some(latency.p50_ms),
    );
    run.fig(
        S,
        "request latency p99 (one batch)",
        "ms",
        Better::Lower,
        Some(latency.p99_ms),
    );
    run.cpu_per_thousand(S, "registrations", &cpu, total);
    run.detail(
        S,
        RegisterDetail {
            quiet: q,
            instances: total,
            errors,
            ack_seconds,
            visible_seconds: visible,
            rss_before: Vec::new(),
            rss_after: Vec::new(),
            cpu,
        },
    );
    // Goodbye from every batch session at once; wait until the nodes hold none.
    let mut closing = JoinSet::new();
    for client in clients {
        closing.spawn(async move {
            let _ = client.close().await;
        });
    }
    while closing.join_next().await.is_some() {}
    let now = Instant::now();
    time_until_count(
        &mut counters,
        &names.group,
        0,
        now,
        now + Duration::from_secs(60),
    )
    .await;
    Ok(())
}

/// The latest of the nodes' times, if every node has one.
fn latest(per_node: &[Option<f64>]) -> Option<f64> {
    per_node
        .iter()
        .copied()
        .collect::<Option<Vec<f64>>>()
        .map(|v| v.into_iter().fold(0.0, f64::max))
}

/// The two rates of a registration phase: until all were acknowledged, and until every
/// node counted them.
fn registration_rates(
    run: &mut TargetRun,
    scenario: &'static str,
    total: u64,
    ack_seconds: f64,
    all_visible: Option<f64>,
) {
    run.fig(
        scenario,
        "registrations/s, acknowledged",
        "/s",
        Better::Higher,
        Some(total as f64 / ack_seconds),
    );
    run.fig(
        scenario,
        "registrations/s, visible on every node",
        "/s",
        Better::Higher,
        all_visible.map(|s| total as f64 / s),
    );
}

/// Resident memory of the nodes now, by pid.
fn rss(pids: &[(String, u32)]) -> Vec<Option<u64>> {
    pids.iter().map(|(_, p)| procstat::rss_bytes(*p)).collect()
}

/// Mean growth of the nodes' RSS between two readings, per instance (each node holds
/// every instance, so this is per instance and per node).
fn rss_per_instance(before: &[Option<u64>], after: &[Option<u64>], instances: u64) -> Option<f64> {
    let deltas: Vec<f64> = before
        .iter()
        .zip(after)
        .map(|(b, a)| Some(a.as_ref()?.saturating_sub((*b)?) as f64))
        .collect::<Option<_>>()?;
    if deltas.is_empty() || instances == 0 {
        return None;
    }
    Some(deltas.iter().sum::<f64>() / deltas.len() as f64 / instances as f64)
}

/// What the register scenario leaves for the others.
struct Registered {
    names: Arc<Names>,
    /// The sessions, kept open (Shoal's instances live with them).
    sessions: Vec<Vec<Lane>>,
    total: u64,
    rss_before: Vec<Option<u64>>,
}

#[derive(Serialize)]
struct RegisterDetail {
    quiet: QuietWait,
    instances: u64,
    errors: u64,
    ack_seconds: f64,
    visible_seconds: Vec<Option<f64>>,
    rss_before: Vec<Option<u64>>,
    rss_after: Vec<Option<u64>>,
    cpu: PhaseCpu,
}

async fn register(args: &CompareArgs, h: &mut Harness, run: &mut TargetRun) -> Result<Registered> {
    const S: &str = "register";
    let names = Names::new("cmpreg", args.services);
    let q = quiet(args, h, S).await;
    let sessions = h
        .clients(args.sessions, false, args.concurrency, REQUEST_TIMEOUT)
        .await
        .context("connecting the sessions")?;
    let counters = h.counters().await?;
    let per = args.instances_per_session;
    let total = (args.sessions * per) as u64;
    eprintln!(
        "[{S}] {} sessions x {per} instances over {} services, {} in flight per session",
        args.sessions, args.services, args.concurrency
    );
    let rss_before = rss(&h.pids());
    let done = Arc::new(AtomicU64::new(0));
    let progress = Progress::start(S, done.clone(), Some(total));
    let mark = CpuMark::now(&h.pids());
    let started = mark.at();
    let poller = count_until(counters, names.group.clone(), total, started);
    let batched = args.batch_register && matches!(h.nodes, Nodes::Shoal(_));
    if batched {
        let clients: Vec<shoal_client::Client> = sessions
            .iter()
            .filter_map(|lanes| match lanes.first() {
                Some(Lane::Shoal(c)) => Some(c.clone()),
                _ => None,
            })
            .collect();
        let batch = args.batch.clamp(1, shoal_proto::MAX_BATCH_ITEMS);
        let (samples, errors, first_error, resent) = register_many_over(
            &clients,
            &names,
            per,
            batch,
            (args.concurrency, args.batches_in_flight),
            &done,
        )
        .await?;
        resent_figure(run, S, resent);
        return finish_register(
            args,
            h,
            run,
            Finish {
                q,
                names,
                sessions,
                samples,
                errors,
                first_error,
                progress,
                poller,
                mark,
                rss_before,
                total,
            },
        )
        .await;
    }
    // The services each session registers in: all of them, or its home's own.
    let services: Vec<Arc<Vec<usize>>> = if args.home_owned {
        home_owned_services(&sessions, &names).await?
    } else {
        let all = Arc::new((0..names.len()).collect());
        (0..sessions.len()).map(|_| Arc::clone(&all)).collect()
    };
    let op = Registering {
        names: names.clone(),
        services,
        per,
    };
    let ran = each_lane(sessions, per, &done, op).await?;
    finish_register(
        args,
        h,
        run,
        Finish {
            q,
            names,
            sessions: ran.sessions,
            samples: ran.samples,
            errors: ran.errors,
            first_error: ran.first_error,
            progress,
            poller,
            mark,
            rss_before,
            total,
        },
    )
    .await
}

/// What [`each_lane`] gives back.
struct LaneRun {
    /// The lanes again, by session.
    sessions: Vec<Vec<Lane>>,
    /// Latencies of the requests that succeeded.
    samples: Samples,
    /// Requests that failed, and the first failure.
    errors: u64,
    first_error: Option<String>,
}

/// What each request of [`each_lane`] does: `run(lane, s, i)` is request `i` of session
/// `s`. A trait rather than a closure that boxes its future: the future of one request
/// (the SDK's call, about 2 KB) then lives in its lane's task, not in a box allocated and
/// copied per request (docs/benchmarks.md, thirty-second series).
trait LaneOp: Send + Sync + 'static {
    fn run<'a>(
        &'a self,
        lane: &'a mut Lane,
        s: usize,
        i: usize,
    ) -> impl std::future::Future<Output = Result<()>> + Send + 'a;
}

/// The register scenario's request: instance `s * per + i` into its service.
struct Registering {
    names: Arc<Names>,
    /// The services each session registers in, by session.
    services: Vec<Arc<Vec<usize>>>,
    per: usize,
}

impl LaneOp for Registering {
    fn run<'a>(
        &'a self,
        lane: &'a mut Lane,
        s: usize,
        i: usize,
    ) -> impl std::future::Future<Output = Result<()>> + Send + 'a {
        let g = s * self.per + i;
        let services = &self.services[s];
        let k = services[g % services.len()];
        lane.register(&self.names, k, Inst::numbered(g))
    }
}

/// The roundtrip scenario's request: an empty one.
struct Pinging;

impl LaneOp for Pinging {
    fn run<'a>(
        &'a self,
        lane: &'a mut Lane,
        _: usize,
        _: usize,
    ) -> impl std::future::Future<Output = Result<()>> + Send + 'a {
        lane.ping()
    }
}

/// The lanes of each session `s` make `op.run(lane, s, i)` for `i` in `0..per` between
/// them, each lane one request at a time, all sessions at once; each success counts in
/// `done`.
async fn each_lane<O: LaneOp>(
    sessions: Vec<Vec<Lane>>,
    per: usize,
    done: &Arc<AtomicU64>,
    op: O,
) -> Result<LaneRun> {
    let n = sessions.len();
    let op = Arc::new(op);
    let mut tasks = JoinSet::new();
    for (s, lanes) in sessions.into_iter().enumerate() {
        let next = Arc::new(AtomicUsize::new(0));
        for mut lane in lanes {
            let (next, done, op) = (next.clone(), done.clone(), op.clone());
            tasks.spawn(async move {
                let mut samples = Samples::default();
                let mut errors = 0u64;
                let mut first_error = None;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= per {
                        return (s, lane, samples, errors, first_error);
                    }
                    let t = Instant::now();
                    match op.run(&mut lane, s, i).await {
                        Ok(()) => {
                            samples.record(t.elapsed());
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert(format!("{e:#}"));
                        }
                    }
                }
            });
        }
    }
    let mut ran = LaneRun {
        sessions: (0..n).map(|_| Vec::new()).collect(),
        samples: Samples::with_capacity(n * per),
        errors: 0,
        first_error: None,
    };
    while let Some(joined) = tasks.join_next().await {
        let (s, lane, part, e, first) = joined?;
        ran.sessions[s].push(lane);
        ran.samples.merge(part);
        ran.errors += e;
        if ran.first_error.is_none() {
            ran.first_error = first;
        }
    }
    Ok(ran)
}

/// For `--home-owned`: for each session, the services its home node owns (asked of
/// the ring through the first session).
async fn home_owned_services(
    sessions: &[Vec<Lane>],
    names: &Names,
) -> Result<Vec<Arc<Vec<usize>>>> {
    let clients: Vec<&shoal_client::Client> = sessions
        .iter()
        .map(|lanes| match lanes.first() {
            Some(Lane::Shoal(c)) => Ok(c),
            _ => Err(anyhow!("--home-owned is for Shoal sessions only")),
        })
        .collect::<Result<_>>()?;
    let first = clients.first().ok_or_else(|| anyhow!("no session"))?;
    let mut owned: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (k, key) in names.keys.iter().enumerate() {
        let owner = first
            .ring(Some(key))
            .await?
            .owner
            .ok_or_else(|| anyhow!("no owner of {key}"))?;
        owned.entry(owner.0.to_string()).or_default().push(k);
    }
    let owned: BTreeMap<String, Arc<Vec<usize>>> =
        owned.into_iter().map(|(n, ks)| (n, Arc::new(ks))).collect();
    clients
        .iter()
        .map(|c| {
            let home = c
                .welcome()
                .map(|w| w.node_id.0)
                .ok_or_else(|| anyhow!("a session has no home"))?;
            owned
                .get(&*home)
                .cloned()
                .ok_or_else(|| anyhow!("{home} owns no service"))
        })
        .collect()
}

/// Watches, in the background, until every node counts `total` instances in `group`
/// (at most 120 s from `started`); gives the times and the counters back.
fn count_until(
    mut counters: Vec<(usize, Counter)>,
    group: String,
    total: u64,
    started: Instant,
) -> tokio::task::JoinHandle<CountedUntil> {
    tokio::spawn(async move {
        let reached = time_until_count(
            &mut counters,
            &group,
            total,
            started,
            started + Duration::from_secs(120),
        )
        .await;
        (reached, counters)
    })
}

/// When each node counted every instance, and the counters.
type CountedUntil = (Vec<Option<f64>>, Vec<(usize, Counter)>);

/// What the register scenario measured, for [`finish_register`].
struct Finish {
    q: QuietWait,
    names: Arc<Names>,
    sessions: Vec<Vec<Lane>>,
    samples: Samples,
    errors: u64,
    first_error: Option<String>,
    progress: Progress,
    poller: tokio::task::JoinHandle<CountedUntil>,
    mark: CpuMark,
    rss_before: Vec<Option<u64>>,
    total: u64,
}

/// The register scenario once every registration was answered: waits until every node
/// counts them and records the figures.
async fn finish_register(
    args: &CompareArgs,
    h: &mut Harness,
    run: &mut TargetRun,
    f: Finish,
) -> Result<Registered> {
    const S: &str = "register";
    let Finish {
        q,
        names,
        sessions: by_session,
        samples,
        errors,
        first_error,
        progress,
        poller,
        mark,
        rss_before,
        total,
    } = f;
    let started = mark.at();
    if args.batch_register && matches!(h.nodes, Nodes::Shoal(_)) {
        run.na(
            S,
            "registered with",
            &format!(
                "RegisterMany, {} per request (--batch-register)",
                args.batch
            ),
        );
    }
    if args.home_owned && matches!(h.nodes, Nodes::Shoal(_)) {
        run.na(
            S,
            "registered in",
            "services the session's home node owns (--home-owned): none forwarded",
        );
    }
    let ack_seconds = started.elapsed().as_secs_f64();
    drop(progress);
    if let Some(e) = first_error {
        poller.abort();
        bail!("{errors} registrations failed; the first: {e}");
    }
    eprintln!(
        "[{S}] all acknowledged after {ack_seconds:.2} s; waiting until every node counts them"
    );
    let (visible, _counters) = poller.await?;
    let cpu = mark.since();
    h.check_alive()?;
    let rss_after = rss(&h.pids());
    let all_visible = latest(&visible);
    let latency = samples.summarize();
    registration_rates(run, S, total, ack_seconds, all_visible);
    run.fig(
        S,
        "time until visible on every node",
        "s",
        Better::Lower,
        all_visible,
    );
    run.fig(
        S,
        "register latency p50",
        "ms",
        Better::Lower,
        Some(latency.p50_ms),
    );
    run.fig(
        S,
        "register latency p99",
        "ms",
        Better::Lower,
        Some(latency.p99_ms),
    );
    run.cpu_per_thousand(S, "registrations", &cpu, total);
    run.fig(
        S,
        "RSS per instance per node, after register",
        "B",
        Better::Lower,
        rss_per_instance(&rss_before, &rss_after, total),
    );
    run.latencies.insert(S.into(), latency);
    run.detail(
        S,
        RegisterDetail {
            quiet: q,
            instances: total,
            errors,
            ack_seconds,
            visible_seconds: visible,
            rss_before: rss_before.clone(),
            rss_after,
            cpu,
        },
    );
    if all_visible.is_none() {
        bail!("not every node counted the {total} instances within 120 s");
    }
    Ok(Registered {
        names,
        sessions: by_session,
        total,
        rss_before,
    })
}

/// Empty round trips: the register scenario's sessions and lanes send
/// `--roundtrip-requests` requests between them, each one the server answers without
/// touching the registry.
async fn roundtrip(
    args: &CompareArgs,
    h: &mut Harness,
    run: &mut TargetRun,
    reg: &mut Registered,
) -> Result<()> {
    const S: &str = "roundtrip";
    let q = quiet(args, h, S).await;
    let sessions = std::mem::take(&mut reg.sessions);
    let per = (args.roundtrip_requests as usize)
        .div_ceil(sessions.len().max(1))
        .max(1);
    let total = (per * sessions.len()) as u64;
    eprintln!(
        "[{S}] {} sessions x {per} empty requests, {} in flight per session",
        sessions.len(),
        args.concurrency
    );
    let done = Arc::new(AtomicU64::new(0));
    let progress = Progress::start(S, done.clone(), Some(total));
    let mark = CpuMark::now(&h.pids());
    let ran = each_lane(sessions, per, &done, Pinging).await?;
    reg.sessions = ran.sessions;
    let seconds = mark.at().elapsed().as_secs_f64();
    drop(progress);
    let cpu = mark.since();
    h.check_alive()?;
    if let Some(e) = ran.first_error {
        bail!("{} empty requests failed; the first: {e}", ran.errors);
    }
    let latency = ran.samples.summarize();
    run.fig(
        S,
        "empty requests/s, answered",
        "/s",
        Better::Higher,
        Some(total as f64 / seconds),
    );
    run.fig(S, "latency p50", "ms", Better::Lower, Some(latency.p50_ms));
    run.fig(S, "latency p99", "ms", Better::Lower, Some(latency.p99_ms));
    run.cpu_per_thousand(S, "requests", &cpu, total);
    run.latencies.insert(S.into(), latency);
    run.detail(
        S,
        RoundtripDetail {
            quiet: q,
            requests: total,
            seconds,
            cpu,
        },
    );
    Ok(())
}

#[derive(Serialize)]
struct RoundtripDetail {
    quiet: QuietWait,
    requests: u64,
    seconds: f64,
    cpu: PhaseCpu,
}

/// rnacos: beats every held instance every `--beat-interval-ms` (Shoal: nothing).
struct Beater {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    tasks: JoinSet<()>,
}

impl Beater {
    async fn start(args: &CompareArgs, h: &Harness, reg: &Registered) -> Result<Beater> {
        let mut beater = Beater {
            stop: Arc::new(AtomicBool::new(false)),
            sent: Arc::new(AtomicU64::new(0)),
            errors: Arc::new(AtomicU64::new(0)),
            tasks: JoinSet::new(),
        };
        if h.kind != TargetKind::Rnacos {
            return Ok(beater);
        }
        let lanes: Vec<Lane> = h
            .clients(
                h.live().len() * args.beat_lanes,
                false,
                1,
                Duration::from_secs(5),
            )
            .await?
            .into_iter()
            .flatten()
            .collect();
        let count = lanes.len();
        let interval = Duration::from_millis(args.beat_interval_ms);
        let total = reg.total as usize;
        eprintln!(
            "beats: {total} instances every {interval:?} from {count} connections ({:.0}/s)",
            total as f64 / interval.as_secs_f64()
        );
        for (j, mut lane) in lanes.into_iter().enumerate() {
            let (stop, sent, errors, names) = (
                beater.stop.clone(),
                beater.sent.clone(),
                beater.errors.clone(),
                reg.names.clone(),
            );
            let mine: Vec<usize> = (j..total).step_by(count).collect();
            beater.tasks.spawn(async move {
                let start = Instant::now();
                let mut cycle = 0u32;
                loop {
                    for (i, &g) in mine.iter().enumerate() {
                        let due = start
                            + interval * cycle
                            + interval.mul_f64(i as f64 / mine.len().max(1) as f64);
                        tokio::time::sleep_until(due.into()).await;
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        match lane.beat(&names, g % names.len(), &Inst::numbered(g)).await {
                            Ok(()) => sent.fetch_add(1, Ordering::Relaxed),
                            Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                    cycle += 1;
                }
            });
        }
        Ok(beater)
    }

    async fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

#[derive(Serialize)]
struct QueryDetail {
    quiet: QuietWait,
    clients: usize,
    in_flight: usize,
    queries: u64,
    errors: u64,
    first_error: Option<String>,
    seconds: f64,
    instances_per_answer: f64,
    cpu: PhaseCpu,
}

async fn query(
    args: &CompareArgs,
    h: &mut Harness,
    run: &mut TargetRun,
    reg: &Registered,
) -> Result<()> {
    const S: &str = "query";
    let q = quiet(args, h, S).await;
    let n_clients = h.live().len() * args.query_clients;
    let clients = h
        .clients(n_clients, true, args.concurrency, REQUEST_TIMEOUT)
        .await?;
    eprintln!(
        "[{S}] {n_clients} clients x {} in flight list random services for {} s",
        args.concurrency, args.query_seconds
    );
    let done = Arc::new(AtomicU64::new(0));
    let progress = Progress::start(S, done.clone(), None);
    let mark = CpuMark::now(&h.pids());
    let deadline = mark.at() + Duration::from_secs(args.query_seconds);
    let mut tasks = JoinSet::new();
    for (c, lanes) in clients.into_iter().enumerate() {
        for (t, mut lane) in lanes.into_iter().enumerate() {
            let (done, names) = (done.clone(), reg.names.clone());
            let mut rng = StdRng::seed_from_u64(
                args.seed ^ (((c as u64) << 32) | t as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            );
            tasks.spawn(async move {
                let mut samples = Samples::default();
                let (mut errors, mut seen, mut first_error) = (0u64, 0u64, None);
                while Instant::now() < deadline {
                    let k = rng.random_range(0..names.len());
                    let t0 = Instant::now();
                    match lane.list(&names, k).await {
                        Ok(l) => {
                            samples.record(t0.elapsed());
                            seen += l.instances as u64;
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert(format!("{e:#}"));
                        }
                    }
                }
                (lane, samples, errors, seen, first_error)
            });
        }
    }
    let mut samples = Samples::default();
    let (mut errors, mut seen, mut first_error) = (0, 0, None);
    let mut lanes = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (lane, part, e, s, first) = joined?;
        lanes.push(lane);
        samples.merge(part);
        errors += e;
        seen += s;
        if first_error.is_none() {
            first_error = first;
        }
    }
    let seconds = mark.at().elapsed().as_secs_f64();
    let cpu = mark.since();
    drop(progress);
    drop(lanes);
    h.check_alive()?;
    let queries = samples.len() as u64;
    let latency = samples.summarize();
    run.fig(
        S,
        "queries/s",
        "/s",
        Better::Higher,
        Some(queries as f64 / seconds),
    );
    run.fig(
        S,
        "query latency p50",
        "ms",
        Better::Lower,
        Some(latency.p50_ms),
    );
    run.fig(
        S,
        "query latency p99",
        "ms",
        Better::Lower,
        Some(latency.p99_ms),
    );
    let per_answer = if queries == 0 {
        0.0
    } else {
        seen as f64 / queries as f64
    };
    run.fig(
        S,
        "instances per answer",
        "",
        Better::Neither,
        Some(per_answer),
    );
    run.fig(S, "query errors", "", Better::Lower, Some(errors as f64));
    run.cpu_per_thousand(S, "queries", &cpu, queries);
    run.latencies.insert(S.into(), latency);
    run.detail(
        S,
        QueryDetail {
            quiet: q,
            clients: n_clients,
            in_flight: n_clients * args.concurrency,
            queries,
            errors,
            first_error,
            seconds,
            instances_per_answer: per_answer,
            cpu,
        },
    );
    Ok(())
}

#[derive(Serialize)]
struct KeepaliveDetail {
    quiet: QuietWait,
    instances: u64,
    seconds: f64,
    loopback_bytes: Option<u64>,
    beats: u64,
    beat_errors: u64,
    rss_before_register: Vec<Option<u64>>,
    rss_end: Vec<Option<u64>>,
    cpu: PhaseCpu,
}

async fn keepalive(
    args: &CompareArgs,
    h: &mut Harness,
    run: &mut TargetRun,
    reg: &Registered,
    beater: &Beater,
) -> Result<()> {
    const S: &str = "keepalive";
    let q = quiet(args, h, S).await;
    eprintln!(
        "[{S}] holding {} instances for {} s",
        reg.total, args.keepalive_seconds
    );
    let progress = Progress::start(S, beater.sent.clone(), None);
    let mark = CpuMark::now(&h.pids());
    let lo0 = procstat::loopback_bytes();
    let (beats0, errors0) = (
        beater.sent.load(Ordering::Relaxed),
        beater.errors.load(Ordering::Relaxed),
    );
    tokio::time::sleep(Duration::from_secs(args.keepalive_seconds)).await;
    let lo = procstat::loopback_bytes().zip(lo0).map(|(b, a)| b - a);
    let cpu = mark.since();
    drop(progress);
    h.check_alive()?;
    let beats = beater.sent.load(Ordering::Relaxed) - beats0;
    let beat_errors = beater.errors.load(Ordering::Relaxed) - errors0;
    let rss_end = rss(&h.pids());
    let wall = cpu.wall_seconds;
    run.fig(
        S,
        "CPU of all nodes holding the instances",
        "% of a core",
        Better::Lower,
        Some(100.0 * cpu.nodes_seconds / wall),
    );
    run.fig(
        S,
        "CPU of all nodes per 1000 instances held",
        "ms/s",
        Better::Lower,
        Some(cpu.nodes_seconds * 1e6 / wall / reg.total as f64),
    );
    run.fig(
        S,
        "loopback bytes/s (upper bound of the wire)",
        "B/s",
        Better::Lower,
        lo.map(|b| b as f64 / wall),
    );
    run.fig(
        S,
        "beats/s sent by the clients",
        "/s",
        Better::Neither,
        Some(beats as f64 / wall),
    );
    run.fig(
        S,
        "beat errors",
        "",
        Better::Lower,
        Some(beat_errors as f64),
    );
    run.fig(
        S,
        "client (load generator) CPU",
        "% of a core",
        Better::Lower,
        cpu.bench_percent,
    );
    run.machine_figures(S, &cpu);
    run.fig(
        S,
        "RSS per instance per node, held",
        "B",
        Better::Lower,
        rss_per_instance(&reg.rss_before, &rss_end, reg.total),
    );
    run.detail(
        S,
        KeepaliveDetail {
            quiet: q,
            instances: reg.total,
            seconds: wall,
            loopback_bytes: lo,
            beats,
            beat_errors,
            rss_before_register: reg.rss_before.clone(),
            rss_end,
            cpu,
        },
    );
    Ok(())
}

/// Lanes shared by scheduled operations: take one, use it, give it back.
struct LanePool {
    lanes: Mutex<Vec<Lane>>,
    permits: Semaphore,
}

impl LanePool {
    fn new(lanes: Vec<Lane>) -> Arc<LanePool> {
        let n = lanes.len();
        Arc::new(LanePool {
            lanes: Mutex::new(lanes),
            permits: Semaphore::new(n),
        })
    }

    async fn with<T>(
        &self,
        f: impl for<'a> FnOnce(
            &'a mut Lane,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>,
    ) -> Result<T> {
        let _permit = self.permits.acquire().await?;
        let mut lane = self
            .lanes
            .lock()
            .map_err(|_| anyhow!("lane pool poisoned"))?
            .pop()
            .ok_or_else(|| anyhow!("lane pool empty"))?;
        let out = f(&mut lane).await;
        self.lanes
            .lock()
            .map_err(|_| anyhow!("lane pool poisoned"))?
            .push(lane);
        Ok(out)
    }

    fn into_lanes(self: Arc<Self>) -> Vec<Lane> {
        match Arc::try_unwrap(self) {
            Ok(pool) => pool.lanes.into_inner().unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }
}

/// Microseconds since `epoch`.
fn micros_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
}

#[derive(Serialize)]
struct VisibilityDetail {
    quiet: QuietWait,
    writes: u64,
    write_errors: u64,
    first_error: Option<String>,
    offered_per_second: f64,
    max_behind_schedule_ms: f64,
    ack: Latency,
    per_node: Vec<Latency>,
    everywhere: Latency,
    not_seen_everywhere: u64,
    polls_per_node: Vec<u64>,
    poll_period_ms: Vec<f64>,
    cpu: PhaseCpu,
}

/// Write-to-visible on every node, by polling lists (same method for both targets).
async fn poll_visibility(args: &CompareArgs, h: &mut Harness, run: &mut TargetRun) -> Result<()> {
    const S: &str = "visibility";
    let names = Names::new("cmpvis", args.visibility_services);
    let (m, slots) = (args.visibility_services, args.visibility_slots);
    let rate = args.visibility_rate.max(1);
    let total = rate * args.visibility_seconds;
    let q = quiet(args, h, S).await;
    let live = h.live();
    let writer = LanePool::new(
        h.client(live[0], true, args.visibility_writers, REQUEST_TIMEOUT)
            .await?,
    );
    let sent_at: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
    let arrivals: Vec<Arc<Vec<AtomicU64>>> = live
        .iter()
        .map(|_| Arc::new((0..total).map(|_| AtomicU64::new(0)).collect()))
        .collect();
    let polls: Vec<Arc<AtomicU64>> = live.iter().map(|_| Arc::new(AtomicU64::new(0))).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let epoch = Instant::now();
    let mut pollers = JoinSet::new();
    for (ni, &node) in live.iter().enumerate() {
        let lanes = h
            .client(node, true, args.visibility_pollers, REQUEST_TIMEOUT)
            .await?;
        let p = lanes.len();
        for (j, mut lane) in lanes.into_iter().enumerate() {
            let (names, sent_at, cells, polls, stop) = (
                names.clone(),
                sent_at.clone(),
                arrivals[ni].clone(),
                polls[ni].clone(),
                stop.clone(),
            );
            pollers.spawn(async move {
                let mine: Vec<usize> = (j..m).step_by(p).collect();
                while !stop.load(Ordering::Relaxed) {
                    for &k in &mine {
                        let Ok(listed) = lane.list(&names, k).await else {
                            continue;
                        };
                        polls.fetch_add(1, Ordering::Relaxed);
                        let now = micros_since(epoch);
                        for (_, seq) in listed.seqs {
                            let (Some(cell), Some(sent)) =
                                (cells.get(seq as usize), sent_at.get(seq as usize))
                            else {
                                continue;
                            };
                            let sent = sent.load(Ordering::Relaxed);
                            if sent > 0 && cell.load(Ordering::Relaxed) == 0 {
                                cell.store(now.saturating_sub(sent) + 1, Ordering::Relaxed);
                            }
                        }
                    }
                }
                lane
            });
        }
    }
    eprintln!(
        "[{S}] {total} writes at {rate}/s through {} over {m} services x {slots} slots; \
         {} pollers per node",
        h.ids[live[0]], args.visibility_pollers
    );
    let done = Arc::new(AtomicU64::new(0));
    let progress = Progress::start(S, done.clone(), Some(total));
    let polls0: Vec<u64> = polls.iter().map(|p| p.load(Ordering::Relaxed)).collect();
    let mark = CpuMark::now(&h.pids());
    let start = Instant::now();
    let mut writes = JoinSet::new();
    let mut max_behind = Duration::ZERO;
    let mut last_call = start;
    let mut n = 0u64;
    let mut acks = Samples::default();
    let (mut write_errors, mut first_error) = (0, None);
    let mut reap = |r: Result<Duration>| match r {
        Ok(l) => acks.record(l),
        Err(e) => {
            write_errors += 1;
            first_error.get_or_insert(format!("{e:#}"));
        }
    };
    while n < total {
        let due = start + Duration::from_secs_f64(n as f64 / rate as f64);
        tokio::time::sleep_until(due.into()).await;
        let due_now = ((start.elapsed().as_secs_f64() * rate as f64) as u64 + 1).min(total);
        while n < due_now {
            let scheduled = start + Duration::from_secs_f64(n as f64 / rate as f64);
            last_call = Instant::now();
            max_behind = max_behind.max(last_call.saturating_duration_since(scheduled));
            let (writer, names, sent_at, done) =
                (writer.clone(), names.clone(), sent_at.clone(), done.clone());
            writes.spawn(async move {
                let k = (n % m as u64) as usize;
                let slot = (n / m as u64) % slots as u64;
                let inst = Inst {
                    ip: "10.250.0.1".into(),
                    port: 20_000 + slot as u16,
                    meta: vec![("seq", n.to_string())],
                };
                let result = writer
                    .with(|lane| {
                        Box::pin(async move {
                            let t0 = Instant::now();
                            sent_at[n as usize]
                                .store(micros_since(epoch).max(1), Ordering::Relaxed);
                            let r = lane.register(&names, k, inst).await;
                            r.map(|_| t0.elapsed())
                        })
                    })
                    .await;
                done.fetch_add(1, Ordering::Relaxed);
                result.and_then(|r| r)
            });
            n += 1;
        }
        // Reap finished writes so the set stays small.
        while let Some(joined) = writes.try_join_next() {
            reap(joined?);
        }
    }
    let send_seconds = last_call.duration_since(start).as_secs_f64();
    while let Some(joined) = writes.join_next().await {
        reap(joined?);
    }
    drop(progress);
    // Drain: every write seen on every node, or nothing new for 2 s (30 s at most).
    let seen = |cells: &Vec<AtomicU64>| {
        cells
            .iter()
            .filter(|c| c.load(Ordering::Relaxed) > 0)
            .count()
    };
    let drain = Instant::now();
    let (mut last_sum, mut last_change) = (0, Instant::now());
    loop {
        let counts: Vec<usize> = arrivals.iter().map(|a| seen(a)).collect();
        if counts.iter().all(|&c| c as u64 >= total - write_errors) {
            break;
        }
        let sum: usize = counts.iter().sum();
        if sum != last_sum {
            (last_sum, last_change) = (sum, Instant::now());
        }
        if last_change.elapsed() > Duration::from_secs(2)
            || drain.elapsed() > Duration::from_secs(30)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cpu = mark.since();
    let wall = mark.at().elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut poll_lanes = Vec::new();
    while let Some(joined) = pollers.join_next().await {
        poll_lanes.push(joined?);
    }
    drop(poll_lanes);
    h.check_alive()?;
    let polls_per_node: Vec<u64> = polls
        .iter()
        .zip(&polls0)
        .map(|(p, a)| p.load(Ordering::Relaxed) - a)
        .collect();
    // A service is polled again every (services / pollers) polls of one poller.
    let poll_period_ms: Vec<f64> = polls_per_node
        .iter()
        .map(|&p| {
            if p == 0 {
                0.0
            } else {
                1000.0 * wall * m as f64 / p as f64
            }
        })
        .collect();
    let mut per_node = Vec::new();
    for cells in &arrivals {
        let mut s = Samples::default();
        for c in cells.iter() {
            let v = c.load(Ordering::Relaxed);
            if v > 0 {
                s.record(Duration::from_micros(v - 1));
            }
        }
        per_node.push(s.summarize());
    }
    let mut everywhere = Samples::default();
    for seq in 0..total as usize {
        let worst = arrivals
            .iter()
            .map(|cells| cells[seq].load(Ordering::Relaxed))
            .try_fold(0u64, |acc, v| (v > 0).then_some(acc.max(v - 1)));
        if let Some(us) = worst {
            everywhere.record(Duration::from_micros(us));
        }
    }
    let not_seen = (total - write_errors).saturating_sub(everywhere.len() as u64);
    // Clean up: remove the written instances.
    let lanes = writer.into_lanes();
    match h.kind {
        TargetKind::Shoal => {
            if let Some(first) = lanes.into_iter().next() {
                first.close().await;
            }
        }
        TargetKind::Rnacos => {
            let mut lanes = lanes;
            if let Some(lane) = lanes.first_mut() {
                for k in 0..m {
                    for slot in 0..slots {
                        let inst = Inst {
                            ip: "10.250.0.1".into(),
                            port: 20_000 + slot as u16,
                            meta: Vec::new(),
                        };
                        let _ = lane.deregister(&names, k, &inst).await;
                    }
                }
            }
        }
    }
    let mut counters = h.counters().await?;
    let gone = time_until_count(
        &mut counters,
        &names.group,
        0,
        Instant::now(),
        Instant::now() + Duration::from_secs(30),
    )
    .await;
    if gone.iter().any(Option::is_none) {
        eprintln!("[{S}] warning: the written instances did not all disappear within 30 s");
    }
    let ack = acks.summarize();
    let everywhere = everywhere.summarize();
    let offered = if send_seconds > 0.0 {
        (total - 1) as f64 / send_seconds
    } else {
        0.0
    };
    run.fig(S, "writes/s offered", "/s", Better::Higher, Some(offered));
    run.fig(S, "write ack p99", "ms", Better::Lower, Some(ack.p99_ms));
    run.fig(
        S,
        "visible on every node p50 (polling)",
        "ms",
        Better::Lower,
        Some(everywhere.p50_ms),
    );
    run.fig(
        S,
        "visible on every node p99 (polling)",
        "ms",
        Better::Lower,
        Some(everywhere.p99_ms),
    );
    run.fig(
        S,
        "writes not seen on every node",
        "",
        Better::Lower,
        Some(not_seen as f64),
    );
    let mean_period = poll_period_ms.iter().sum::<f64>() / poll_period_ms.len().max(1) as f64;
    run.fig(
        S,
        "poll period per service per node (resolution)",
        "ms",
        Better::Neither,
        Some(mean_period),
    );
    run.cpu_figures(S, &cpu);
    run.latencies.insert(S.into(), everywhere.clone());
    run.detail(
        S,
        VisibilityDetail {
            quiet: q,
            writes: total,
            write_errors,
            first_error,
            offered_per_second: offered,
            max_behind_schedule_ms: max_behind.as_secs_f64() * 1000.0,
            ack,
            per_node,
            everywhere,
            not_seen_everywhere: not_seen,
            polls_per_node,
            poll_period_ms,
            cpu,
        },
    );
    Ok(())
}

/// Write-to-push on every node: Shoal's subscriptions (the cluster benchmark's
/// visibility phase); not expressible for rnacos over the v1 HTTP API.
async fn push(args: &CompareArgs, h: &mut Harness, run: &mut TargetRun) -> Result<()> {
    const S: &str = "push";
    let cluster = match &mut h.nodes {
        Nodes::Shoal(c) => c,
        Nodes::Rnacos(_) => {
            let why = "not expressible: rnacos pushes changes only to gRPC (Nacos 2.x) \
                       subscribers; its v1 UDP listener resends lists periodically, not on change";
            for metric in [
                "write-to-push p50 (each node)",
                "write-to-push p99 (each node)",
                "pushed on every node p50",
                "pushed on every node p99",
            ] {
                run.na(S, metric, why);
            }
            return Ok(());
        }
    };
    let q = wait_quiet(
        S,
        &cluster.pids(),
        args.quiet_share,
        Duration::from_secs(args.quiet_timeout),
    )
    .await;
    let cargs = ClusterArgs {
        nodes: args.nodes,
        phases: vec![Phase::Visibility],
        sessions: 1,
        instances_per_session: 1,
        services: 1,
        concurrency: 1,
        visibility_rate: vec![args.push_rate],
        visibility_seconds: args.visibility_seconds,
        visibility_services: 200,
        visibility_slots: 16,
        visibility_writers: args.push_writers,
        visibility_in_flight: 1024,
        remap_keys: 1,
        quiet_share: 1.0,
        quiet_timeout: 0,
        shoal_bin: None,
        keep_dirs: false,
        out: PathBuf::new(),
    };
    let phase = visibility::run(&cargs, cluster, 0, args.push_rate, q).await?;
    let everywhere = &phase.all_nodes;
    run.fig(
        S,
        "writes/s offered",
        "/s",
        Better::Higher,
        Some(phase.sent_per_second),
    );
    run.fig(S, "write-to-push p50 (each node)", "ms", Better::Lower, {
        let v: Vec<f64> = phase.per_node.iter().map(|n| n.latency.p50_ms).collect();
        Some(v.iter().sum::<f64>() / v.len().max(1) as f64)
    });
    run.fig(S, "write-to-push p99 (each node)", "ms", Better::Lower, {
        let v: Vec<f64> = phase.per_node.iter().map(|n| n.latency.p99_ms).collect();
        Some(v.iter().sum::<f64>() / v.len().max(1) as f64)
    });
    run.fig(
        S,
        "pushed on every node p50",
        "ms",
        Better::Lower,
        Some(everywhere.p50_ms),
    );
    run.fig(
        S,
        "pushed on every node p99",
        "ms",
        Better::Lower,
        Some(everywhere.p99_ms),
    );
    run.fig(
        S,
        "writes not pushed on every node",
        "",
        Better::Lower,
        Some(phase.not_seen_everywhere as f64),
    );
    run.cpu_figures(S, &phase.cpu);
    run.latencies.insert(S.into(), everywhere.clone());
    run.detail(S, &phase);
    Ok(())
}

#[derive(Serialize)]
struct ChurnDetail {
    quiet: QuietWait,
    joins: u64,
    leaves: u64,
    errors: u64,
    first_error: Option<String>,
    offered_joins_per_second: f64,
    max_behind_schedule_ms: f64,
    settled_seconds: Vec<Option<f64>>,
    latency: Latency,
    cpu: PhaseCpu,
}

async fn churn(args: &CompareArgs, h: &mut Harness, run: &mut TargetRun) -> Result<()> {
    const S: &str = "churn";
    let names = Names::new("cmpchurn", args.services);
    let rate = args.churn_rate.max(1);
    let total = rate * args.churn_seconds;
    let population = args.churn_population as u64;
    let q = quiet(args, h, S).await;
    let live = h.live();
    let mut pools = Vec::new();
    for &node in &live {
        pools.push(LanePool::new(
            h.client(node, true, args.concurrency * 4, REQUEST_TIMEOUT)
                .await?,
        ));
    }
    let mut counters = h.counters().await?;
    eprintln!(
        "[{S}] {rate} joins/s and as many leaves, {population} alive, for {} s",
        args.churn_seconds
    );
    let done = Arc::new(AtomicU64::new(0));
    let progress = Progress::start(S, done.clone(), Some(total));
    let mark = CpuMark::now(&h.pids());
    let start = Instant::now();
    let mut ops = JoinSet::new();
    let mut max_behind = Duration::ZERO;
    let mut last_call = start;
    let mut n = 0u64;
    let mut samples = Samples::default();
    let (mut errors, mut first_error) = (0, None);
    let mut reap = |results: Vec<Result<Duration>>| {
        for r in results {
            match r {
                Ok(l) => samples.record(l),
                Err(e) => {
                    errors += 1;
                    first_error.get_or_insert(format!("{e:#}"));
                }
            }
        }
    };
    let base = 1 << 22; // apart from the register scenario's instance numbers
    while n < total {
        let due = start + Duration::from_secs_f64(n as f64 / rate as f64);
        tokio::time::sleep_until(due.into()).await;
        let due_now = ((start.elapsed().as_secs_f64() * rate as f64) as u64 + 1).min(total);
        while n < due_now {
            let scheduled = start + Duration::from_secs_f64(n as f64 / rate as f64);
            last_call = Instant::now();
            max_behind = max_behind.max(last_call.saturating_duration_since(scheduled));
            let join_pool = pools[(n % pools.len() as u64) as usize].clone();
            let leave = n.checked_sub(population);
            let leave_pool = leave.map(|l| pools[(l % pools.len() as u64) as usize].clone());
            let (names, done) = (names.clone(), done.clone());
            ops.spawn(async move {
                let mut out = Vec::new();
                let k = (n % names.len() as u64) as usize;
                let inst = Inst::numbered(base + n as usize);
                let names2 = names.clone();
                let r = join_pool
                    .with(move |lane| {
                        Box::pin(async move {
                            let t0 = Instant::now();
                            lane.register(&names2, k, inst).await.map(|_| t0.elapsed())
                        })
                    })
                    .await
                    .and_then(|r| r);
                out.push(r);
                if let (Some(l), Some(pool)) = (leave, leave_pool) {
                    let k = (l % names.len() as u64) as usize;
                    let inst = Inst::numbered(base + l as usize);
                    let r = pool
                        .with(move |lane| {
                            Box::pin(async move {
                                let t0 = Instant::now();
                                lane.deregister(&names, k, &inst)
                                    .await
                                    .map(|_| t0.elapsed())
                            })
                        })
                        .await
                        .and_then(|r| r);
                    out.push(r);
                }
                done.fetch_add(1, Ordering::Relaxed);
                out
            });
            n += 1;
        }
        while let Some(joined) = ops.try_join_next() {
            reap(joined?);
        }
    }
    let send_seconds = last_call.duration_since(start).as_secs_f64();
    while let Some(joined) = ops.join_next().await {
        reap(joined?);
    }
    drop(progress);
    let expected = population.min(total);
    let settled = time_until_count(
        &mut counters,
        &names.group,
        expected,
        start,
        Instant::now() + Duration::from_secs(60),
    )
    .await;
    let cpu = mark.since();
    h.check_alive()?;
    // Clean up the population that is left.
    let remaining: Vec<u64> = (total.saturating_sub(population)..total).collect();
    let mut leftovers = Vec::new();
    for pool in pools {
        leftovers.push(pool.into_lanes());
    }
    match h.kind {
        TargetKind::Shoal => {
            for lanes in leftovers {
                if let Some(first) = lanes.into_iter().next() {
                    first.close().await;
                }
            }
        }
        TargetKind::Rnacos => {
            if let Some(lane) = leftovers.iter_mut().flatten().next() {
                for &l in &remaining {
                    let k = (l % names.len() as u64) as usize;
                    let _ = lane
                        .deregister(&names, k, &Inst::numbered(base + l as usize))
                        .await;
                }
            }
        }
    }
    let latency = samples.summarize();
    let offered = if send_seconds > 0.0 {
        (total - 1) as f64 / send_seconds
    } else {
        0.0
    };
    run.fig(
        S,
        "joins/s offered (as many leaves)",
        "/s",
        Better::Higher,
        Some(offered),
    );
    run.fig(
        S,
        "join/leave latency p50",
        "ms",
        Better::Lower,
        Some(latency.p50_ms),
    );
    run.fig(
        S,
        "join/leave latency p99",
        "ms",
        Better::Lower,
        Some(latency.p99_ms),
    );
    run.fig(S, "churn errors", "", Better::Lower, Some(errors as f64));
    let settled_all = settled
        .iter()
        .copied()
        .collect::<Option<Vec<f64>>>()
        .map(|v| v.into_iter().fold(0.0, f64::max) - send_seconds);
    run.fig(
        S,
        "every node counts the final population, after the last op",
        "s",
        Better::Lower,
        settled_all,
    );
    run.cpu_per_thousand(S, "operations", &cpu, latency.count as u64);
    run.latencies.insert(S.into(), latency.clone());
    run.detail(
        S,
        ChurnDetail {
            quiet: q,
            joins: total,
            leaves: total.saturating_sub(population),
            errors,
            first_error,
            offered_joins_per_second: offered,
            max_behind_schedule_ms: max_behind.as_secs_f64() * 1000.0,
            settled_seconds: settled,
            latency,
            cpu,
        },
    );
    Ok(())
}

/// One probe round: a write to every service through every survivor.
#[derive(Serialize)]
struct ProbeRound {
    /// Seconds since the kill, at the start of the round.
    from: f64,
    /// Seconds since the kill, at the end of the round.
    at: f64,
    /// Probe writes that failed or took longer than 1 s.
    failed: usize,
}

/// One reading of every survivor's count of the held instances.
#[derive(Serialize)]
struct CountReading {
    /// Seconds since the kill, when read.
    at: f64,
    counts: Vec<Option<u64>>,
}

#[derive(Serialize)]
struct FailoverDetail {
    quiet: QuietWait,
    killed: String,
    expected: u64,
    probe_rounds: Vec<ProbeRound>,
    count_readings: Vec<CountReading>,
    recovered_seconds: Option<f64>,
    owned_seconds: Option<f64>,
    visible_seconds: Option<f64>,
    lowest_count: Option<u64>,
    beat_errors: u64,
    cpu: PhaseCpu,
}

/// One probe round: a write to every service through every survivor, one service per
/// lane at a time; how many failed.
/// Sets of probe clients in the failover scenario: rounds start every 100 ms and take
/// up to their 1 s timeout, so at most about 11 run at once.
const PROBE_SETS: usize = 12;

async fn probe_round(probes: &mut [(usize, Vec<Lane>)], names: &Names) -> usize {
    let mut futures = Vec::new();
    for (node, lanes) in probes.iter_mut() {
        let p = lanes.len();
        for (j, lane) in lanes.iter_mut().enumerate() {
            let node = *node;
            futures.push(async move {
                let mut failed = 0;
                for k in (j..names.len()).step_by(p) {
                    let inst = Inst {
                        ip: format!("10.254.{node}.1"),
                        port: 9000,
                        meta: Vec::new(),
                    };
                    if lane.register(names, k, inst).await.is_err() {
                        failed += 1;
                    }
                }
                failed
            });
        }
    }
    crate::target::join_all(futures).await.into_iter().sum()
}

/// From `(seconds, ok)` readings in time order: the first moment after which every
/// reading was ok, if the last one was.
fn recovered_at(readings: &[(f64, bool)]) -> Option<f64> {
    if !readings.last().is_some_and(|r| r.1) {
        return None;
    }
    match readings.iter().rposition(|r| !r.1) {
        Some(i) => readings.get(i + 1).map(|r| r.0),
        None => readings.first().map(|r| r.0),
    }
}

async fn failover(
    args: &CompareArgs,
    h: &mut Harness,
    run: &mut TargetRun,
    reg: &Registered,
    beater: &Beater,
) -> Result<()> {
    const S: &str = "failover";
    let q = quiet(args, h, S).await;
    let live = h.live();
    let victim = *live.last().ok_or_else(|| anyhow!("no node runs"))?;
    let survivors: Vec<usize> = live.iter().copied().filter(|&i| i != victim).collect();
    let names = reg.names.clone();
    // Rounds start every 100 ms whether or not the earlier ones ended (a round that
    // waits on the dead owner takes up to its 1 s timeout), each on a set of probe
    // clients of its own: PROBE_SETS sets in rotation.
    let mut sets: Vec<Vec<(usize, Vec<Lane>)>> = Vec::new();
    for _ in 0..PROBE_SETS {
        let mut probes = Vec::new();
        for &s in &survivors {
            let lanes = h
                .client(s, true, names.len().min(64), Duration::from_secs(1))
                .await?;
            probes.push((s, lanes));
        }
        sets.push(probes);
    }
    // Probes in place before the kill.
    let started = Instant::now();
    while probe_round(&mut sets[0], &names).await > 0 {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the probe writes do not all succeed before the kill");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let expected = reg.total + (names.len() * survivors.len()) as u64;
    let mut all = h.counters().await?;
    let reached = time_until_count(
        &mut all,
        &names.group,
        expected,
        Instant::now(),
        Instant::now() + Duration::from_secs(30),
    )
    .await;
    if reached.iter().any(Option::is_none) {
        bail!("before the kill, not every node counts {expected} instances: {reached:?}");
    }
    let mut counters: Vec<(usize, Counter)> =
        all.into_iter().filter(|(i, _)| *i != victim).collect();
    eprintln!(
        "[{S}] killing {} (SIGKILL); watching for {} s",
        h.ids[victim], args.failover_window
    );
    let errors0 = beater.errors.load(Ordering::Relaxed);
    let mark = CpuMark::now(&h.pids());
    h.kill(victim).await?;
    let killed = Instant::now();
    let window = Duration::from_secs(args.failover_window);
    let group = names.group.clone();
    let reader = tokio::spawn(async move {
        let mut readings = Vec::new();
        while killed.elapsed() < window {
            let at = killed.elapsed().as_secs_f64();
            let mut counts = Vec::new();
            for (_, c) in counters.iter_mut() {
                counts.push(c.count(&group).await.ok());
            }
            readings.push(CountReading { at, counts });
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        readings
    });
    let mut rounds = Vec::new();
    let mut last_print = Instant::now();
    let mut running = tokio::task::JoinSet::new();
    let mut next_start = killed;
    while killed.elapsed() < window || !running.is_empty() {
        while let Some(done) = running.try_join_next() {
            let (set, round): (Vec<(usize, Vec<Lane>)>, ProbeRound) = done?;
            if last_print.elapsed() >= Duration::from_secs(1) {
                eprintln!(
                    "[{S}] {:>5.1}s  probe writes failed: {}",
                    round.from, round.failed
                );
                last_print = Instant::now();
            }
            rounds.push(round);
            sets.push(set);
        }
        if killed.elapsed() < window && Instant::now() >= next_start {
            if let Some(mut set) = sets.pop() {
                let names = names.clone();
                running.spawn(async move {
                    let from = killed.elapsed().as_secs_f64();
                    let failed = probe_round(&mut set, &names).await;
                    let at = killed.elapsed().as_secs_f64();
                    (set, ProbeRound { from, at, failed })
                });
                next_start += Duration::from_millis(100);
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    rounds.sort_by(|a, b| a.from.total_cmp(&b.from));
    let readings = reader.await?;
    let cpu = mark.since();
    h.check_alive()?;
    // The start of the first round after which every round succeeded: every probe
    // sent from then on found an owner (resolution: the 100 ms between starts).
    let owned = recovered_at(
        &rounds
            .iter()
            .map(|r| (r.from, r.failed == 0))
            .collect::<Vec<_>>(),
    );
    let visible = recovered_at(
        &readings
            .iter()
            .map(|r| (r.at, r.counts.iter().all(|c| *c == Some(expected))))
            .collect::<Vec<_>>(),
    );
    let recovered = owned.zip(visible).map(|(a, b)| a.max(b));
    let lowest = readings
        .iter()
        .flat_map(|r| r.counts.iter().map(|c| c.unwrap_or(0)))
        .min();
    run.fig(S, "kill to every service owned", "s", Better::Lower, owned);
    run.fig(
        S,
        "kill to every instance visible on every survivor",
        "s",
        Better::Lower,
        visible,
    );
    run.fig(
        S,
        "kill to both (failover time)",
        "s",
        Better::Lower,
        recovered,
    );
    if recovered.is_none() {
        if let Some(f) = run.figures.last_mut() {
            f.note = Some(format!(
                "not recovered within the {} s window",
                args.failover_window
            ));
        }
    }
    run.fig(
        S,
        "most instances missing on a survivor",
        "",
        Better::Lower,
        lowest.map(|l| expected.saturating_sub(l) as f64),
    );
    run.cpu_figures(S, &cpu);
    run.detail(
        S,
        FailoverDetail {
            quiet: q,
            killed: h.ids[victim].clone(),
            expected,
            probe_rounds: rounds,
            count_readings: readings,
            recovered_seconds: recovered,
            owned_seconds: owned,
            visible_seconds: visible,
            lowest_count: lowest,
            beat_errors: beater.errors.load(Ordering::Relaxed) - errors0,
            cpu,
        },
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_is_after_the_last_bad_reading() {
        let r = [
            (0.2, false),
            (1.0, true),
            (2.0, false),
            (3.0, true),
            (4.0, true),
        ];
        assert_eq!(recovered_at(&r), Some(3.0));
        assert_eq!(recovered_at(&[(0.2, true), (0.4, true)]), Some(0.2));
        assert_eq!(recovered_at(&[(1.0, true), (2.0, false)]), None);
        assert_eq!(recovered_at(&[]), None);
    }

    #[test]
    fn rss_growth_per_instance() {
        let before = vec![Some(1000), Some(2000)];
        let after = vec![Some(3000), Some(4000)];
        assert_eq!(rss_per_instance(&before, &after, 10), Some(200.0));
        assert_eq!(rss_per_instance(&before, &[Some(1), None], 10), None);
    }
}
