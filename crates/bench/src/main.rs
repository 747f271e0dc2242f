//! `shoal-bench`: the load generator of Shoal.
//!
//! `shoal-bench single-node` measures one node over QUIC through the Rust SDK: how fast
//! many sessions register their instances, how fast a few clients query them, what that
//! costs the node in CPU seconds and memory. By default it starts its own `shoal server`
//! on ephemeral ports in a temporary directory and stops it afterwards; `--servers` and
//! `--ca` point it at a node that is already running instead.
//!
//! `shoal-bench cluster` starts a cluster of `shoal server` processes on loopback
//! (3 by default) and measures registrations/s through all nodes, the time from a write
//! to its push on every node, and how many services change owner when a node dies or
//! joins; see `cluster.rs`.
//!
//! `shoal-bench compare` runs the same scenarios against a 3-node rnacos cluster (over
//! the Nacos v1 HTTP API) and a 3-node Shoal cluster, one after the other, and prints
//! both figures and their ratio; see `compare.rs`.
//!
//! It measures and reports; it never judges. The figures go to `docs/benchmarks.md` by
//! hand, with the machine they were measured on.

/// The load generator allocates and frees every instance of every answer it decodes
/// (a few strings each, 140 instances an answer, 30 000 answers a second); with the
/// system allocator that was a third of its CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod cluster;
mod cluster_report;
mod compare;
mod compare_report;
mod cpu;
mod http;
mod httpc;
mod machine;
mod node;
mod procstat;
mod progress;
mod remap;
mod report;
mod rnacos;
mod single_node;
mod stats;
mod target;
mod visibility;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Load generator and benchmarks for Shoal.
#[derive(Parser, Debug)]
#[command(name = "shoal-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Register many instances on one node, then query them; report rates, latency
    /// percentiles, the node's CPU seconds and its memory.
    SingleNode(SingleNodeArgs),
    /// Start a cluster of nodes on loopback; measure registrations/s through all of
    /// them, write-to-visible-everywhere latency, owner remapping on a node's death and
    /// on a join, and every node's CPU seconds and memory.
    Cluster(ClusterArgs),
    /// Run the same scenarios against a 3-node rnacos cluster (Nacos v1 HTTP API) and
    /// a 3-node Shoal cluster, one after the other; print both figures and their ratio,
    /// write JSON and an SVG of the latency distributions.
    Compare(Box<compare::CompareArgs>),
}

/// Options of `shoal-bench cluster`.
#[derive(clap::Args, Debug, Clone)]
pub struct ClusterArgs {
    /// Nodes in the cluster (node-1 ... node-N); the remap phase kills node-N and adds
    /// node-(N+1).
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Phases to run, comma-separated: register, visibility, remap.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "register,visibility,remap"
    )]
    pub phases: Vec<Phase>,
    /// Register phase: client sessions, spread evenly over the nodes (session s is
    /// homed on node s mod N and knows only that node).
    #[arg(long, default_value_t = 60)]
    pub sessions: usize,
    /// Register phase: instances each session registers.
    #[arg(long, default_value_t = 1000)]
    pub instances_per_session: usize,
    /// Register phase: services the instances are spread over (instance g goes to
    /// service g mod K).
    #[arg(long, default_value_t = 6000)]
    pub services: usize,
    /// Register phase: requests in flight per session.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Visibility phase: target write rates, one phase each (writes per second,
    /// comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "2000")]
    pub visibility_rate: Vec<u64>,
    /// Visibility phase: how long the writer writes at each rate, in seconds.
    #[arg(long, default_value_t = 10)]
    pub visibility_seconds: u64,
    /// Visibility phase: services the writer updates round-robin, each subscribed to
    /// by one client per node.
    #[arg(long, default_value_t = 200)]
    pub visibility_services: usize,
    /// Visibility phase: instances per service that the writes rotate over (a write
    /// replaces the one made services x slots writes earlier).
    #[arg(long, default_value_t = 16)]
    pub visibility_slots: usize,
    /// Visibility phase: writer sessions, all homed on node-1; write n goes to writer
    /// n mod W. (A node serves one session's requests one after another, so one
    /// writer's rate is bounded by its node's time per request.)
    #[arg(long, default_value_t = 1)]
    pub visibility_writers: usize,
    /// Visibility phase: most writes in flight at once, over all writers.
    #[arg(long, default_value_t = 1024)]
    pub visibility_in_flight: usize,
    /// Remap phase: service keys whose owners are compared.
    #[arg(long, default_value_t = 10_000)]
    pub remap_keys: usize,
    /// Before each phase, wait until other processes used at most this share of the
    /// machine's CPUs over 3 s (1 = do not wait).
    #[arg(long, default_value_t = 0.10)]
    pub quiet_share: f64,
    /// Longest wait for a quiet machine before a phase, in seconds; then it runs anyway
    /// and the result says so.
    #[arg(long, default_value_t = 900)]
    pub quiet_timeout: u64,
    /// The `shoal` binary to start (default: `shoal` next to this executable).
    #[arg(long)]
    pub shoal_bin: Option<PathBuf>,
    /// Keep the nodes' directories (logs, data) after the run.
    #[arg(long)]
    pub keep_dirs: bool,
    /// Where to write the JSON result.
    #[arg(long, default_value = "target/bench/cluster.json")]
    pub out: PathBuf,
}

/// A phase of `shoal-bench cluster`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Registrations/s through all nodes, until acknowledged and until visible.
    Register,
    /// Time from a write to its push on every node.
    Visibility,
    /// Owners before and after a node dies and after a node joins.
    Remap,
}

/// Options of `shoal-bench single-node`.
#[derive(clap::Args, Debug, Clone)]
pub struct SingleNodeArgs {
    /// Client sessions that register instances (one SDK client, one QUIC connection each).
    #[arg(long, default_value_t = 50)]
    pub sessions: usize,
    /// Instances each session registers.
    #[arg(long, default_value_t = 100)]
    pub instances_per_session: usize,
    /// Services the instances are spread over (instance g goes to service g mod K).
    #[arg(long, default_value_t = 500)]
    pub services: usize,
    /// Length of the query phase, in seconds.
    #[arg(long, default_value_t = 10)]
    pub query_seconds: u64,
    /// Requests in flight per client, in both phases.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Clients that query in the query phase (each with --concurrency tasks).
    #[arg(long, default_value_t = 4)]
    pub query_clients: usize,
    /// Addresses of a running node (host:port, comma-separated); with --ca. Without it,
    /// the benchmark starts its own node.
    #[arg(long, value_delimiter = ',', requires = "ca")]
    pub servers: Vec<String>,
    /// CA certificate (PEM) of the running node given with --servers.
    #[arg(long, requires = "servers")]
    pub ca: Option<PathBuf>,
    /// Process id of the node given with --servers, to measure its CPU and memory
    /// (only when it runs on this machine).
    #[arg(long, requires = "servers")]
    pub server_pid: Option<u32>,
    /// The `shoal` binary to start (default: `shoal` next to this executable).
    #[arg(long)]
    pub shoal_bin: Option<PathBuf>,
    /// Seed of the random choices (which service each query asks for); printed, so a
    /// run can be repeated with the same choices.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Where to write the JSON result.
    #[arg(long, default_value = "target/bench/single-node.json")]
    pub out: PathBuf,
}

/// Sets the load generator's threads, overriding [`load_threads`]' choice.
pub const THREADS_ENV: &str = "SHOAL_BENCH_THREADS";

/// The threads the load generator runs its clients on: [`THREADS_ENV`] when set (at
/// least 1); else, for `compare` and `cluster`, whose nodes run on this machine, the
/// share of its CPUs that each of those nodes gets
/// ([`cluster::shared_worker_threads`]): the load generator is one more process on the
/// same CPUs, and on two CPUs one thread of its own made registrations cheaper for both
/// targets (docs/benchmarks.md, twenty-fifth series); else (`single-node`, whose node
/// may run elsewhere) one per CPU. One thread runs on a current-thread runtime.
fn load_threads(command: &Command) -> anyhow::Result<usize> {
    if let Ok(text) = std::env::var(THREADS_ENV) {
        return match text.trim().parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => anyhow::bail!("{THREADS_ENV} must be a whole number of at least 1, not {text:?}"),
        };
    }
    Ok(match command {
        Command::Compare(args) => cluster::shared_worker_threads(args.nodes),
        Command::Cluster(args) => cluster::shared_worker_threads(args.nodes),
        Command::SingleNode(_) => std::thread::available_parallelism().map_or(1, |n| n.get()),
    })
}

/// `mi_option_arena_eager_commit` in mimalloc's `mi_option_t` (v2 and v3 alike).
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

fn main() -> anyhow::Result<()> {
    // Commit arena memory as it is used, not when an arena is reserved: each client's
    // QUIC endpoint reserves megabytes of receive buffers that it barely touches, and
    // with eager commit 10 000 clients took more memory than the machine has.
    // SAFETY: sets a process-wide option, which mimalloc allows at any time; it applies
    // to the arenas reserved from then on (measured: 2 000 clients peaked at 1.1 GB
    // with it, 4.8 GB without).
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) };
    let cli = Cli::parse();
    let threads = load_threads(&cli.command)?;
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    };
    match cli.command {
        Command::SingleNode(args) => runtime.block_on(single_node::run(args)),
        Command::Cluster(args) => runtime.block_on(cluster::run(args, threads)),
        Command::Compare(args) => runtime.block_on(async {
            // On Ctrl-C or SIGTERM the run is dropped, and with it every node process it
            // started (they are killed on drop), so none is left behind.
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                result = compare::run(*args, threads) => result,
                _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted; the nodes were stopped"),
                _ = term.recv() => anyhow::bail!("terminated; the nodes were stopped"),
            }
        }),
    }
}
