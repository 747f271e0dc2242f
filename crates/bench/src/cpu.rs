//! CPU use of several processes over a phase, and waiting for a quiet machine.
//!
//! The cluster benchmark runs several node processes and itself on a machine that
//! others may share; each phase records what every node, the benchmark and everything
//! else used, and a phase can wait until the rest of the machine is quiet.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::procstat;

/// CPU seconds and memory of one node over a phase.
#[derive(Debug, Clone, Serialize)]
pub struct NodeUse {
    /// The node's id.
    pub node: String,
    /// User + system seconds the node used in the phase.
    pub cpu_seconds: Option<f64>,
    /// The same in percent of one core (per wall second).
    pub cpu_percent: Option<f64>,
    /// Resident memory at the start of the phase.
    pub rss_start_bytes: Option<u64>,
    /// Resident memory at the end of the phase.
    pub rss_end_bytes: Option<u64>,
}

/// CPU use of a phase: every node, this benchmark, and everything else.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseCpu {
    /// Wall time the figures cover.
    pub wall_seconds: f64,
    /// One entry per node that ran through the whole phase.
    pub nodes: Vec<NodeUse>,
    /// Sum of the nodes' CPU seconds.
    pub nodes_seconds: f64,
    /// This benchmark process (the clients): user + system seconds.
    pub bench_seconds: Option<f64>,
    /// This benchmark in percent of one core.
    pub bench_percent: Option<f64>,
    /// Busy CPU seconds of the whole machine minus the nodes' and the benchmark's:
    /// other processes. Near zero on a quiet machine.
    pub others_seconds: Option<f64>,
    /// CPU time the hypervisor gave to other guests while this machine's CPUs had work
    /// (steal), which the machine's busy time, and so `others_seconds`, counts. Near
    /// zero on a host that is not shared. It can exceed `others_seconds`: the nodes' and
    /// the benchmark's own counters can include time stolen while they ran (seen on a
    /// host whose hypervisor took a third of the machine).
    pub steal_seconds: Option<f64>,
    /// UDP datagrams the whole machine dropped in the phase because a receive buffer
    /// was full ([`procstat::udp_receive_buffer_drops`]). Zero on a run that measures
    /// only its work; above zero, the figures include recovering those datagrams.
    pub udp_dropped: Option<u64>,
}

impl PhaseCpu {
    /// CPU seconds as a percentage of the whole machine (every CPU) over the phase.
    pub fn machine_percent(&self, seconds: f64) -> f64 {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        100.0 * seconds / (self.wall_seconds * cpus)
    }
}

/// Counters at the start of a phase.
pub struct CpuMark {
    at: Instant,
    nodes: Vec<(String, u32, Option<f64>, Option<u64>)>,
    bench: Option<f64>,
    machine: Option<f64>,
    steal: Option<f64>,
    udp_dropped: Option<u64>,
}

impl CpuMark {
    /// Reads the counters of these nodes (id, pid), this process and the machine now.
    pub fn now(nodes: &[(String, u32)]) -> Self {
        CpuMark {
            at: Instant::now(),
            nodes: nodes
                .iter()
                .map(|(id, pid)| {
                    (
                        id.clone(),
                        *pid,
                        procstat::cpu_seconds(*pid),
                        procstat::rss_bytes(*pid),
                    )
                })
                .collect(),
            bench: procstat::cpu_seconds(std::process::id()),
            machine: procstat::machine_busy_seconds(),
            steal: procstat::machine_steal_seconds(),
            udp_dropped: procstat::udp_receive_buffer_drops(),
        }
    }

    /// When the mark was taken.
    pub fn at(&self) -> Instant {
        self.at
    }

    /// What was used since the mark. A node that has exited meanwhile has no figures.
    pub fn since(&self) -> PhaseCpu {
        let wall = self.at.elapsed().as_secs_f64().max(1e-9);
        let mut nodes = Vec::with_capacity(self.nodes.len());
        let mut nodes_seconds = 0.0;
        for (id, pid, cpu0, rss0) in &self.nodes {
            let cpu = procstat::cpu_seconds(*pid).zip(*cpu0).map(|(b, a)| b - a);
            nodes_seconds += cpu.unwrap_or(0.0);
            nodes.push(NodeUse {
                node: id.clone(),
                cpu_seconds: cpu,
                cpu_percent: cpu.map(|s| 100.0 * s / wall),
                rss_start_bytes: *rss0,
                rss_end_bytes: procstat::rss_bytes(*pid),
            });
        }
        let bench = procstat::cpu_seconds(std::process::id())
            .zip(self.bench)
            .map(|(b, a)| b - a);
        let machine = procstat::machine_busy_seconds()
            .zip(self.machine)
            .map(|(b, a)| b - a);
        let others = machine
            .zip(bench)
            .map(|(m, b)| (m - b - nodes_seconds).max(0.0));
        PhaseCpu {
            wall_seconds: wall,
            nodes,
            nodes_seconds,
            bench_seconds: bench,
            bench_percent: bench.map(|s| 100.0 * s / wall),
            others_seconds: others,
            steal_seconds: procstat::machine_steal_seconds()
                .zip(self.steal)
                .map(|(b, a)| (b - a).max(0.0)),
            udp_dropped: procstat::udp_receive_buffer_drops()
                .zip(self.udp_dropped)
                .map(|(b, a)| b.saturating_sub(a)),
        }
    }
}

/// How long a phase waited for the machine to be quiet, and how quiet it was.
#[derive(Debug, Clone, Serialize)]
pub struct QuietWait {
    /// Seconds spent waiting.
    pub waited_seconds: f64,
    /// Share of the machine (all CPUs) that other processes used in the last 3 s
    /// window before the phase started.
    pub others_share: Option<f64>,
    /// False when the wait gave up (the phase ran anyway).
    pub quiet: bool,
}

/// The window over which the machine's quiet is judged.
const QUIET_WINDOW: Duration = Duration::from_secs(3);

/// Waits until, over a 3 s window, processes other than these nodes and this benchmark
/// used at most `max_share` of the machine's CPUs, or until `timeout` (then it says
/// so and returns). A `max_share` of 1 or more does not wait.
pub async fn wait_quiet(
    phase: &str,
    nodes: &[(String, u32)],
    max_share: f64,
    timeout: Duration,
) -> QuietWait {
    let started = Instant::now();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    if max_share >= 1.0 {
        return QuietWait {
            waited_seconds: 0.0,
            others_share: None,
            quiet: true,
        };
    }
    let mut last_report = Instant::now();
    loop {
        let mark = CpuMark::now(nodes);
        tokio::time::sleep(QUIET_WINDOW).await;
        let cpu = mark.since();
        let share = cpu.others_seconds.map(|s| s / (cpu.wall_seconds * cpus));
        let quiet = share.is_none_or(|s| s <= max_share);
        if quiet || started.elapsed() >= timeout {
            if !quiet {
                eprintln!(
                    "[{phase}] warning: the machine was not quiet within {timeout:?}; running anyway"
                );
            }
            return QuietWait {
                waited_seconds: started.elapsed().as_secs_f64(),
                others_share: share,
                quiet,
            };
        }
        if last_report.elapsed() >= Duration::from_secs(15) || started.elapsed() < QUIET_WINDOW * 2
        {
            eprintln!(
                "[{phase}] waiting for a quiet machine: other processes used {:.0}% of it \
                 over the last 3 s (limit {:.0}%)",
                100.0 * share.unwrap_or(0.0),
                100.0 * max_share
            );
            last_report = Instant::now();
        }
    }
}
