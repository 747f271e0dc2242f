//! `shoal-bench`: the load generator of Shoal.
//!
//! `shoal-bench single-node` measures one node over QUIC through the Rust SDK: how fast
//! many sessions register their instances, how fast a few clients query them, what that
//! costs the node in CPU seconds and memory. By default it starts its own `shoal server`
//! on ephemeral ports in a temporary directory and stops it afterwards; `--servers` and
//! `--ca` point it at a node that is already running instead.
//!
//! It measures and reports; it never judges. The figures go to `docs/benchmarks.md` by
//! hand, with the machine they were measured on.

mod machine;
mod node;
mod procstat;
mod progress;
mod report;
mod single_node;
mod stats;

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

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::SingleNode(args) => runtime.block_on(single_node::run(args)),
    }
}
