//! The chaos harness: a cluster of real `shoal server` processes, a steady load of SDK
//! and CLI clients, a seeded schedule of faults, and invariant checkers that watch the
//! whole run.
//!
//! A scenario ([`Scenario`]) names a cluster size, a network mode ([`Mode`]), a load
//! ([`LoadSpec`]), a fault [`Schedule`] and the [`Bounds`] the checkers hold the cluster
//! to. [`run`] plays it:
//!
//! 1. starts the nodes ([`ChaosCluster`]): on loopback, or each in its own network
//!    namespace on a bridge ([`NetLab`]) so that partitions are real network cuts;
//! 2. starts the load: stable SDK clients registering and deregistering instances,
//!    a raw protocol subscriber per node, an SDK subscriber that fails over, and
//!    *doomed* clients (SDK or `shoal register` processes) that the schedule crashes;
//! 3. plays the schedule: `kill -9` and restart (same id, data directory and ports),
//!    `SIGSTOP`/`SIGCONT`, the whole cluster killed and restarted, partitions and
//!    heals, client crashes. Every step is logged with its actual time;
//! 4. while it plays, a poller per node reads `/v1/dump` and `/v1/node` and checks every
//!    instance against the [`Ledger`] of what the clients did (no flap, no stale
//!    deletion, no zombie, no phantom), and the subscribers check every push;
//! 5. when the faults end and the load stops, it waits for convergence (identical
//!    dumps, everyone up and ready) within [`Bounds::convergence`], and for the final
//!    registry to be exactly the live clients' registrations, the crashed clients' gone.
//!
//! Everything random comes from one seed ([`chaos_seed`]); the schedule is printed at the
//! start and in the failure message. `SHOAL_CHAOS_SEED=<seed>` replays a run's schedule
//! (the load's timing still varies with the machine, the faults do not).
//!
//! What each checker holds the cluster to is written down on [`Bounds`] and in
//! `docs/reliability.md`.

mod cluster;
mod ledger;
mod load;
mod netlab;
mod run;
mod schedule;
mod subscriber;
mod world;

pub use cluster::{ChaosCluster, Mode};
pub use ledger::{InstKey, Ledger, Reg, Violations};
pub use load::{ClientPlan, LoadSpec};
pub use netlab::NetLab;
pub use run::{run, tally, Bounds, NodeSample, Report, Scenario, Stats};
pub use schedule::{DoomedKind, Fault, Schedule, ScheduleSpec, Step};

/// The seed of a chaos run: `SHOAL_CHAOS_SEED` when set (to replay a failure), else
/// `default` (the fixed seeds of the short suite).
pub fn chaos_seed(default: u64) -> u64 {
    std::env::var("SHOAL_CHAOS_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(default)
}

/// Serializes chaos scenarios within one test binary: each one starts several node
/// processes and wants the machine's cores to itself, or its timing bounds mean
/// little. Hold the guard for the whole test.
pub async fn exclusive() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// The `shoal server` arguments of the chaos clusters: a 5 s idle timeout, so that a
/// crashed client is noticed sooner than with the defaults, with the node's keep-alive
/// and heartbeat inside it; and the grace period the checkers' bounds assume (see
/// [`Bounds`]), stated so that a change of the defaults does not move them.
pub fn node_args() -> Vec<String> {
    [
        "--idle-timeout-ms",
        "5000",
        "--keep-alive-interval-ms",
        "2000",
        "--heartbeat-interval-ms",
        "1500",
        "--session-grace-ms",
        "10000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}
