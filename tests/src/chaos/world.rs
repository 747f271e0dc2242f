//! What the harness knows about the cluster at each moment: which node is up, frozen,
//! down or starting, since when its answers must be consistent, the partition in force,
//! and when each fault happened. The checkers read it to decide what a node must show.

use std::time::{Duration, Instant};

/// A node's state as the harness made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeState {
    /// Running and ready.
    Up,
    /// Being started (or restarted): not yet ready.
    Starting,
    /// SIGSTOPped.
    Frozen,
    /// Killed.
    Down,
}

/// One node's track.
#[derive(Clone, Debug)]
pub struct NodeTrack {
    /// What the harness did to it last.
    pub state: NodeState,
    /// From when its answers are held to the checkers' rules (set when it comes back:
    /// at once after a restart, since a node answers nothing before it loaded the
    /// registry; later after a thaw or a heal, when it is a stale copy catching up).
    pub check_from: Instant,
    /// Bumped at every change of state; a poll that saw it change is discarded.
    pub epoch: u64,
}

/// The shared picture of the cluster.
#[derive(Debug)]
pub struct World {
    /// When the scenario started (every time in reports is ms since this).
    pub t0: Instant,
    /// The same moment as UNIX-epoch milliseconds (to read the nodes' stamps).
    pub t0_unix_ms: u64,
    /// Per node.
    pub nodes: Vec<NodeTrack>,
    /// During a partition: the group of each node.
    pub groups: Option<Vec<usize>>,
    /// Bumped when a partition starts or heals.
    pub partition_epoch: u64,
    /// When each fault step was carried out (for zombie deadlines).
    pub fault_times: Vec<Instant>,
    /// The steps as carried out: (ms since t0, what).
    pub log: Vec<(u64, String)>,
    /// When the cluster stopped or started being whole (every node up, no
    /// partition): (when, whole), in time order.
    pub wholeness: Vec<(Instant, bool)>,
}

impl World {
    /// A world of `n` nodes, all up.
    pub fn new(n: usize) -> World {
        let now = Instant::now();
        World {
            t0: now,
            t0_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            nodes: (0..n)
                .map(|_| NodeTrack {
                    state: NodeState::Up,
                    check_from: now,
                    epoch: 0,
                })
                .collect(),
            groups: None,
            partition_epoch: 0,
            fault_times: Vec::new(),
            log: Vec::new(),
            wholeness: vec![(now, true)],
        }
    }

    /// Whether every node is up and the network whole.
    pub fn is_whole(&self) -> bool {
        self.groups.is_none() && self.nodes.iter().all(|n| n.state == NodeState::Up)
    }

    /// Notes a change of wholeness (call after changing nodes or the partition).
    pub fn note_wholeness(&mut self) {
        let whole = self.is_whole();
        if self.wholeness.last().map(|w| w.1) != Some(whole) {
            self.wholeness.push((Instant::now(), whole));
        }
    }

    /// If the cluster was not whole at `t`: when it became whole again (`None` if it
    /// still is not). `Some(t)` if it was whole.
    fn whole_again(&self, t: Instant) -> Option<Instant> {
        let i = self.wholeness.partition_point(|w| w.0 <= t);
        let whole_at_t = i == 0 || self.wholeness[i - 1].1;
        if whole_at_t {
            return Some(t);
        }
        self.wholeness[i..].iter().find(|w| w.1).map(|w| w.0)
    }

    /// Milliseconds since the start.
    pub fn ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.t0).as_millis() as u64
    }

    /// Records a fault step carried out now.
    pub fn record(&mut self, what: impl Into<String>) {
        let now = Instant::now();
        self.fault_times.push(now);
        let line = (self.ms(now), what.into());
        println!("chaos: +{:>6} ms  {}", line.0, line.1);
        self.log.push(line);
    }

    /// Sets node `i`'s state (and `check_from` when it comes up).
    pub fn set(&mut self, i: usize, state: NodeState, check_from: Option<Instant>) {
        let n = &mut self.nodes[i];
        n.state = state;
        n.epoch += 1;
        if let Some(t) = check_from {
            n.check_from = t;
        }
        self.note_wholeness();
    }

    /// Whether two nodes can talk now.
    pub fn same_side(&self, a: usize, b: usize) -> bool {
        match &self.groups {
            None => true,
            Some(g) => g[a] == g[b],
        }
    }

    /// The time by which an instance of a client that crashed at `crashed` must be
    /// gone everywhere: `bound` after the later of the crash, the moment the cluster
    /// was whole again if it was not at the crash, and the last fault step that came
    /// before that deadline (a fault restarts the clocks that delete it: a restarted
    /// owner counts the grace again, self-preservation holds deletions). Far in the
    /// future while the cluster is not whole.
    pub fn zombie_deadline(&self, crashed: Instant, bound: Duration) -> Instant {
        let never = Instant::now() + Duration::from_secs(86_400);
        let mut from = crashed;
        loop {
            match self.whole_again(from) {
                Some(t) => from = t,
                None => return never,
            }
            let limit = from + bound;
            let later = self
                .fault_times
                .iter()
                .copied()
                .filter(|&t| t > from && t <= limit)
                .max();
            match later {
                Some(t) => from = t,
                None => return from + bound,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zombie_deadlines_wait_for_a_whole_cluster_and_restart_after_faults() {
        let mut w = World::new(3);
        let b = Duration::from_secs(20);
        let t0 = w.t0;
        // A crash in a quiet cluster: crash + bound.
        assert_eq!(w.zombie_deadline(t0, b), t0 + b);
        // A node down from +1 s to +30 s: for a crash at +0 the kill at +1 s is a fault
        // step within the bound, and the cluster is whole again only at +30 s.
        let at = |s: u64| t0 + Duration::from_secs(s);
        w.wholeness = vec![(t0, true), (at(1), false), (at(30), true)];
        w.fault_times = vec![at(1), at(30)];
        assert_eq!(w.zombie_deadline(t0, b), at(30) + b);
        // A crash while it is down: from the moment it is whole again.
        assert_eq!(w.zombie_deadline(at(10), b), at(30) + b);
        // A crash after: plain.
        assert_eq!(w.zombie_deadline(at(31), b), at(31) + b);
        // Still broken: far away.
        w.wholeness.push((at(40), false));
        assert!(w.zombie_deadline(at(41), b) > Instant::now() + Duration::from_secs(3600));
    }
}
