//! Seeded fault schedules: what happens to which node or client, and when.

use std::fmt;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// How a doomed client runs (and so how it dies).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DoomedKind {
    /// An SDK client in the test process; dies by `close_abruptly` (no Goodbye).
    Sdk,
    /// A `shoal register` process; dies by `kill -9` (the node notices by its idle
    /// timeout).
    Cli,
}

/// One thing the schedule does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// `kill -9` these nodes at once.
    Kill(Vec<usize>),
    /// Start these killed nodes again (same id, data directory and ports), one after
    /// another.
    Restart(Vec<usize>),
    /// `kill -STOP`.
    Freeze(usize),
    /// `kill -CONT`.
    Thaw(usize),
    /// Cut the network between groups (network namespaces only).
    Partition(Vec<Vec<usize>>),
    /// Remove every cut.
    Heal,
    /// Start doomed client `id`, homed on any of `servers`, with `instances`
    /// registrations (1 for a CLI client).
    SpawnDoomed {
        /// Its number.
        id: usize,
        /// SDK or CLI.
        kind: DoomedKind,
        /// Node indices it may connect to.
        servers: Vec<usize>,
        /// How many instances it registers.
        instances: usize,
    },
    /// Crash doomed client `id`.
    CrashDoomed(usize),
}

impl Fault {
    /// Whether this step changes a node or the network (clients' crashes are not
    /// faults of the cluster).
    pub fn is_node_fault(&self) -> bool {
        !matches!(self, Fault::SpawnDoomed { .. } | Fault::CrashDoomed(_))
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = |v: &[usize]| {
            v.iter()
                .map(|i| format!("n{i}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        match self {
            Fault::Kill(v) => write!(f, "kill -9 {}", names(v)),
            Fault::Restart(v) => write!(f, "restart {}", names(v)),
            Fault::Freeze(i) => write!(f, "SIGSTOP n{i}"),
            Fault::Thaw(i) => write!(f, "SIGCONT n{i}"),
            Fault::Partition(groups) => {
                let g: Vec<String> = groups.iter().map(|g| format!("[{}]", names(g))).collect();
                write!(f, "partition {}", g.join(" | "))
            }
            Fault::Heal => write!(f, "heal the network"),
            Fault::SpawnDoomed {
                id,
                kind,
                servers,
                instances,
            } => write!(
                f,
                "start doomed client d{id} ({kind:?}, {instances} instance(s), servers {})",
                names(servers)
            ),
            Fault::CrashDoomed(id) => write!(f, "crash doomed client d{id}"),
        }
    }
}

/// A step: a fault at an offset from the start of the fault phase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// Milliseconds after the fault phase starts.
    pub at_ms: u64,
    /// What to do.
    pub fault: Fault,
}

/// A whole schedule: the steps in time order, and how long the fault phase lasts (the
/// load runs that long even if the last step comes earlier).
#[derive(Clone, Debug)]
pub struct Schedule {
    /// The seed it came from.
    pub seed: u64,
    /// Length of the fault phase.
    pub duration_ms: u64,
    /// The steps, sorted by time.
    pub steps: Vec<Step>,
}

impl Schedule {
    /// A schedule from explicit steps (sorted here).
    pub fn new(seed: u64, duration_ms: u64, mut steps: Vec<Step>) -> Schedule {
        steps.sort_by_key(|s| s.at_ms);
        Schedule {
            seed,
            duration_ms,
            steps,
        }
    }

    /// How many steps of each kind.
    pub fn counts(&self) -> String {
        let mut kills = 0;
        let mut restarts = 0;
        let mut freezes = 0;
        let mut partitions = 0;
        let mut crashes = 0;
        for s in &self.steps {
            match &s.fault {
                Fault::Kill(v) => kills += v.len(),
                Fault::Restart(v) => restarts += v.len(),
                Fault::Freeze(_) => freezes += 1,
                Fault::Partition(_) => partitions += 1,
                Fault::CrashDoomed(_) => crashes += 1,
                _ => {}
            }
        }
        format!(
            "{kills} kill -9, {restarts} restarts, {freezes} freezes, {partitions} partitions, {crashes} client crashes"
        )
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "schedule (seed {}, fault phase {} ms; times from its start): {}",
            self.seed,
            self.duration_ms,
            self.counts()
        )?;
        for s in &self.steps {
            writeln!(f, "  +{:>6} ms  {}", s.at_ms, s.fault)?;
        }
        Ok(())
    }
}

impl Schedule {
    /// The whole cluster killed at once and restarted while the clients keep running:
    /// a doomed client crashes before the outage, one during it, one after it.
    pub fn full_restart(seed: u64, nodes: usize) -> Schedule {
        let mut rng = StdRng::seed_from_u64(seed);
        let all: Vec<usize> = (0..nodes).collect();
        let kill = rng.random_range(8_000..=12_000);
        let down = rng.random_range(3_000..=8_000);
        let back = kill + down;
        let doomed = |id: usize, kind: DoomedKind, spawn: u64, crash: u64| {
            [
                Step {
                    at_ms: spawn,
                    fault: Fault::SpawnDoomed {
                        id,
                        kind,
                        servers: all.clone(),
                        instances: if kind == DoomedKind::Sdk { 2 } else { 1 },
                    },
                },
                Step {
                    at_ms: crash,
                    fault: Fault::CrashDoomed(id),
                },
            ]
        };
        let mut steps = vec![
            Step {
                at_ms: kill,
                fault: Fault::Kill(all.clone()),
            },
            Step {
                at_ms: back,
                fault: Fault::Restart(all.clone()),
            },
        ];
        steps.extend(doomed(0, DoomedKind::Sdk, 1_000, kill - 2_000));
        steps.extend(doomed(1, DoomedKind::Cli, 2_000, kill + 1_000));
        steps.extend(doomed(2, DoomedKind::Sdk, back + 6_000, back + 10_000));
        Schedule::new(seed, back + 20_000, steps)
    }

    /// Self-preservation: 3 of 5 nodes (chosen by the seed) killed at once and
    /// restarted one at a time, 3 s apart, from 20 s later. Doomed clients homed on the
    /// victims die with them; one homed on a survivor crashes while the survivors
    /// preserve. Returns the schedule and the victims.
    pub fn self_preservation(seed: u64) -> (Schedule, Vec<usize>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut order: Vec<usize> = (0..5).collect();
        order.shuffle(&mut rng);
        let mut victims = order[..3].to_vec();
        victims.sort();
        let survivor = order[3];
        let kill = 6_000;
        let back = kill + 20_000;
        let mut steps = vec![Step {
            at_ms: kill,
            fault: Fault::Kill(victims.clone()),
        }];
        // The operator brings them back one at a time, 3 s apart.
        for (k, &v) in victims.iter().enumerate() {
            steps.push(Step {
                at_ms: back + 3_000 * k as u64,
                fault: Fault::Restart(vec![v]),
            });
        }
        for (id, &v) in victims.iter().enumerate() {
            steps.push(Step {
                at_ms: 500,
                fault: Fault::SpawnDoomed {
                    id,
                    kind: DoomedKind::Sdk,
                    servers: vec![v],
                    instances: 2,
                },
            });
            steps.push(Step {
                at_ms: kill + 1,
                fault: Fault::CrashDoomed(id),
            });
        }
        steps.push(Step {
            at_ms: 700,
            fault: Fault::SpawnDoomed {
                id: 3,
                kind: DoomedKind::Cli,
                servers: vec![survivor],
                instances: 1,
            },
        });
        steps.push(Step {
            at_ms: kill + 5_000,
            fault: Fault::CrashDoomed(3),
        });
        (Schedule::new(seed, back + 18_000, steps), victims)
    }
}

impl Schedule {
    /// Split brain: `n` nodes cut into two sides (2 and n-2, chosen by the seed) for
    /// 25 s, then healed. Doomed clients crash on each side during the cut, before it,
    /// and after the heal (one registered during the cut). Returns the schedule and the
    /// two sides.
    pub fn split_brain(seed: u64, n: usize) -> (Schedule, Vec<Vec<usize>>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut rng);
        let mut a = order[..2].to_vec();
        let mut b = order[2..].to_vec();
        a.sort();
        b.sort();
        let all: Vec<usize> = (0..n).collect();
        let cut = 5_000;
        let heal = cut + 25_000;
        let mut steps = vec![
            Step {
                at_ms: cut,
                fault: Fault::Partition(vec![a.clone(), b.clone()]),
            },
            Step {
                at_ms: heal,
                fault: Fault::Heal,
            },
        ];
        let mut doomed =
            |id: usize, kind: DoomedKind, servers: &[usize], spawn: u64, crash: u64| {
                steps.push(Step {
                    at_ms: spawn,
                    fault: Fault::SpawnDoomed {
                        id,
                        kind,
                        servers: servers.to_vec(),
                        instances: if kind == DoomedKind::Sdk { 2 } else { 1 },
                    },
                });
                steps.push(Step {
                    at_ms: crash,
                    fault: Fault::CrashDoomed(id),
                });
            };
        doomed(0, DoomedKind::Sdk, &a, 1_000, cut + 7_000);
        doomed(1, DoomedKind::Cli, &b, 1_500, cut + 9_000);
        doomed(2, DoomedKind::Sdk, &all, 2_000, 3_000);
        doomed(3, DoomedKind::Sdk, &a, cut + 3_000, heal + 4_000);
        doomed(4, DoomedKind::Cli, &b, cut + 3_500, heal + 4_500);
        (Schedule::new(seed, heal + 12_000, steps), vec![a, b])
    }
}

/// What a random schedule may contain.
#[derive(Clone, Debug)]
pub struct ScheduleSpec {
    /// Cluster size.
    pub nodes: usize,
    /// Length of the fault phase.
    pub duration_ms: u64,
    /// Most nodes killed or frozen at the same time. Keep it below half the cluster
    /// unless the scenario is about self-preservation: with most peers gone, the
    /// survivors rightly stop deleting, and crashed clients linger until the end.
    pub max_faulty: usize,
    /// Allow kill -9 + restart.
    pub kills: bool,
    /// Allow SIGSTOP + SIGCONT.
    pub freezes: bool,
    /// Allow partitions (network namespaces only).
    pub partitions: bool,
    /// Doomed clients started and crashed during the run.
    pub doomed: usize,
    /// Pause between the starts of two node faults, ms (min, max).
    pub gap_ms: (u64, u64),
}

impl ScheduleSpec {
    /// Kill/restart and freeze/thaw of one node at a time.
    pub fn kill_and_freeze(nodes: usize, duration_ms: u64) -> ScheduleSpec {
        ScheduleSpec {
            nodes,
            duration_ms,
            max_faulty: 1,
            kills: true,
            freezes: true,
            partitions: false,
            doomed: 4,
            gap_ms: (1_500, 5_000),
        }
    }

    /// A random schedule from `seed`.
    pub fn generate(&self, seed: u64) -> Schedule {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut steps = Vec::new();
        let end = self.duration_ms;
        let all: Vec<usize> = (0..self.nodes).collect();
        // Busy intervals: (from, to, node); a partition makes every node busy.
        let mut busy: Vec<(u64, u64, usize)> = Vec::new();
        let mut t = rng.random_range(self.gap_ms.0..=self.gap_ms.1);
        while t + 3_000 < end {
            let active: Vec<usize> = busy
                .iter()
                .filter(|&&(a, b, _)| a <= t && t < b)
                .map(|&(_, _, n)| n)
                .collect();
            let free: Vec<usize> = all
                .iter()
                .copied()
                .filter(|n| !active.contains(n))
                .collect();
            if active.len() < self.max_faulty && !free.is_empty() {
                let mut kinds = Vec::new();
                if self.kills {
                    kinds.push(0);
                }
                if self.freezes {
                    kinds.push(1);
                }
                if self.partitions && active.is_empty() && self.nodes >= 2 {
                    kinds.push(2);
                }
                let node = free[rng.random_range(0..free.len())];
                match kinds.get(rng.random_range(0..kinds.len().max(1))).copied() {
                    Some(0) => {
                        let down = rng.random_range(2_000..=12_000);
                        let back = (t + down).min(end - 1_000);
                        steps.push(Step {
                            at_ms: t,
                            fault: Fault::Kill(vec![node]),
                        });
                        steps.push(Step {
                            at_ms: back,
                            fault: Fault::Restart(vec![node]),
                        });
                        busy.push((t, back + 1, node));
                    }
                    Some(1) => {
                        let frozen = if rng.random_bool(0.4) {
                            rng.random_range(500..=2_000)
                        } else {
                            rng.random_range(4_000..=12_000)
                        };
                        let back = (t + frozen).min(end - 1_000);
                        steps.push(Step {
                            at_ms: t,
                            fault: Fault::Freeze(node),
                        });
                        steps.push(Step {
                            at_ms: back,
                            fault: Fault::Thaw(node),
                        });
                        busy.push((t, back + 1, node));
                    }
                    Some(2) => {
                        let mut order = all.clone();
                        order.shuffle(&mut rng);
                        let cut = rng.random_range(1..self.nodes);
                        let mut a = order[..cut].to_vec();
                        let mut b = order[cut..].to_vec();
                        a.sort();
                        b.sort();
                        let length = rng.random_range(5_000..=20_000);
                        let back = (t + length).min(end - 1_000);
                        steps.push(Step {
                            at_ms: t,
                            fault: Fault::Partition(vec![a, b]),
                        });
                        steps.push(Step {
                            at_ms: back,
                            fault: Fault::Heal,
                        });
                        for &n in &all {
                            busy.push((t, back + 1, n));
                        }
                    }
                    _ => {}
                }
            }
            t += rng.random_range(self.gap_ms.0..=self.gap_ms.1);
        }
        // Doomed clients: started at random, crashed 3..12 s later, none in the
        // last 10 s (so their deadlines are not all after the end).
        for id in 0..self.doomed {
            let latest = end.saturating_sub(12_000).max(1_000);
            let spawn = rng.random_range(0..latest);
            let crash = (spawn + rng.random_range(3_000..=12_000)).min(end - 1_000);
            let kind = if rng.random_bool(0.5) {
                DoomedKind::Sdk
            } else {
                DoomedKind::Cli
            };
            let instances = match kind {
                DoomedKind::Sdk => rng.random_range(1..=3),
                DoomedKind::Cli => 1,
            };
            steps.push(Step {
                at_ms: spawn,
                fault: Fault::SpawnDoomed {
                    id,
                    kind,
                    servers: all.clone(),
                    instances,
                },
            });
            steps.push(Step {
                at_ms: crash.max(spawn + 1),
                fault: Fault::CrashDoomed(id),
            });
        }
        Schedule::new(seed, end, steps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_are_reproducible_and_keep_their_limits() {
        let spec = ScheduleSpec::kill_and_freeze(3, 60_000);
        for seed in 0..50 {
            let a = spec.generate(seed);
            let b = spec.generate(seed);
            assert_eq!(a.steps, b.steps, "seed {seed} gives one schedule");
            // Never more than one node out at once; every fault is undone in time.
            let mut out = [false; 3];
            for s in &a.steps {
                assert!(s.at_ms < 60_000);
                match &s.fault {
                    Fault::Kill(v) => {
                        for &n in v {
                            assert!(!out[n]);
                            out[n] = true;
                        }
                    }
                    Fault::Freeze(n) => {
                        assert!(!out[*n]);
                        out[*n] = true;
                    }
                    Fault::Restart(v) => {
                        for &n in v {
                            out[n] = false;
                        }
                    }
                    Fault::Thaw(n) => out[*n] = false,
                    _ => {}
                }
                assert!(out.iter().filter(|o| **o).count() <= 1, "seed {seed}: {a}");
            }
            assert!(out.iter().all(|o| !o), "seed {seed} ends healthy: {a}");
        }
    }
}
