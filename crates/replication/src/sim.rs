//! An in-memory cluster for tests: N engines, a message network with seeded drops,
//! delays, cut links and partitions, and virtual time.
//!
//! The simulator plays the node's part: it executes the engines' [`Action`]s over its
//! network, in the same way the node does over QUIC, so scenarios exercise the
//! production code path of the engine. Everything is deterministic for a given seed.
//!
//! ```
//! use shoal_replication::sim::Sim;
//! use shoal_replication::Config;
//!
//! let mut sim = Sim::new(1, Config::default());
//! for name in ["a", "b", "c"] {
//!     sim.add_node(name);
//! }
//! sim.run_for(5_000);
//! assert!(sim.all_ready());
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use shoal_storage::{Change, NodeId, ReplicatedService, SessionId, StorageError};

use crate::config::Config;
use crate::engine::{Action, Replica, Route};
use crate::msg::{ForwardOutcome, PeerMsg, Write};

/// The seed of a randomized test: `SHOAL_TEST_SEED` if set, else `default`. Printed, so
/// that a failure can be replayed.
pub fn test_seed(default: u64) -> u64 {
    let seed = std::env::var("SHOAL_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    eprintln!("SHOAL_TEST_SEED={seed}");
    seed
}

/// The network's behaviour.
#[derive(Clone, Debug, PartialEq)]
pub struct NetConfig {
    /// Chance that a message is lost, 0.0..=1.0.
    pub drop_probability: f64,
    /// Smallest one-way delay.
    pub min_delay_ms: u64,
    /// Largest one-way delay.
    pub max_delay_ms: u64,
    /// How often every engine's `tick` runs.
    pub tick_ms: u64,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            drop_probability: 0.0,
            min_delay_ms: 1,
            max_delay_ms: 3,
            tick_ms: 5,
        }
    }
}

/// What a client write through [`Sim::write`] did.
#[derive(Clone, Debug, PartialEq)]
pub enum WriteResult {
    /// Applied on the node it was sent to (its owner there).
    Applied(Option<Change>),
    /// Forwarded to the owner; the outcome lands in [`Sim::forward_outcome`].
    Forwarded {
        /// The owner it went to.
        to: NodeId,
        /// The forward's id.
        id: u64,
    },
    /// Refused.
    Rejected(StorageError),
    /// No ready owner known.
    Unavailable,
}

/// A filter that drops matching messages: `(from, to, message) -> drop?`.
pub type DropFilter = Box<dyn FnMut(&NodeId, &NodeId, &PeerMsg) -> bool>;

struct Envelope {
    from: NodeId,
    to: NodeId,
    msg: PeerMsg,
}

/// The simulated cluster. See the module docs.
pub struct Sim {
    now_ms: u64,
    config: Config,
    net: NetConfig,
    nodes: BTreeMap<NodeId, Replica>,
    rng: u64,
    queue: BTreeMap<(u64, u64), Envelope>,
    seq: u64,
    /// Per ordered pair, the delivery time of the last message: links are FIFO.
    last_at: HashMap<(NodeId, NodeId), u64>,
    links: BTreeSet<(NodeId, NodeId)>,
    cut: BTreeSet<(NodeId, NodeId)>,
    filter: Option<DropFilter>,
    /// Frozen nodes (a SIGSTOPped process): no ticks; what reaches them waits.
    frozen: BTreeSet<NodeId>,
    held: Vec<Envelope>,
    published: BTreeMap<NodeId, Vec<Change>>,
    forwards: HashMap<(NodeId, u64), ForwardOutcome>,
    forward_batches: HashMap<(NodeId, u64), Vec<ForwardOutcome>>,
    /// Each node's replicated dump at the moment it last became ready.
    at_ready: BTreeMap<NodeId, Vec<ReplicatedService>>,
    delivered: u64,
    dropped: u64,
}

fn pair(a: &NodeId, b: &NodeId) -> (NodeId, NodeId) {
    if a <= b {
        (a.clone(), b.clone())
    } else {
        (b.clone(), a.clone())
    }
}

impl Sim {
    /// An empty cluster; every engine gets `config`, the network [`NetConfig::default`].
    pub fn new(seed: u64, config: Config) -> Self {
        Sim {
            now_ms: 1_000_000,
            config,
            net: NetConfig::default(),
            nodes: BTreeMap::new(),
            rng: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            queue: BTreeMap::new(),
            seq: 0,
            last_at: HashMap::new(),
            links: BTreeSet::new(),
            cut: BTreeSet::new(),
            filter: None,
            frozen: BTreeSet::new(),
            held: Vec::new(),
            published: BTreeMap::new(),
            forwards: HashMap::new(),
            forward_batches: HashMap::new(),
            at_ready: BTreeMap::new(),
            delivered: 0,
            dropped: 0,
        }
    }

    /// Changes the network's behaviour.
    pub fn set_net(&mut self, net: NetConfig) {
        self.net = net;
    }

    /// Drops the messages `filter` selects (until [`Sim::clear_filter`]).
    pub fn set_filter(&mut self, filter: DropFilter) {
        self.filter = Some(filter);
    }

    /// Removes the drop filter.
    pub fn clear_filter(&mut self) {
        self.filter = None;
    }

    /// Virtual time.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Messages delivered and dropped so far.
    pub fn traffic(&self) -> (u64, u64) {
        (self.delivered, self.dropped)
    }

    /// Starts a node named `name`, with the first running node (by id) as its seed.
    pub fn add_node(&mut self, name: &str) -> NodeId {
        let seed_node = self.nodes.keys().next().cloned();
        self.add_node_with_seeds(name, seed_node.into_iter().collect())
    }

    /// Starts a node that dials the given seeds.
    pub fn add_node_with_seeds(&mut self, name: &str, seeds: Vec<NodeId>) -> NodeId {
        let id = NodeId::new(name);
        let seed = self.random();
        let replica = Replica::new(
            id.clone(),
            format!("sim://{name}"),
            self.config.clone(),
            seed,
            self.now_ms,
        );
        self.nodes.insert(id.clone(), replica);
        for s in seeds {
            self.connect(&id, &s);
        }
        id
    }

    /// Stops a node (a crash: it says nothing). Its links go down at its peers.
    pub fn kill(&mut self, id: &NodeId) {
        self.nodes.remove(id);
        self.frozen.remove(id);
        self.held.retain(|e| &e.to != id);
        let gone: Vec<_> = self
            .links
            .iter()
            .filter(|(a, b)| a == id || b == id)
            .cloned()
            .collect();
        for (a, b) in gone {
            self.links.remove(&(a.clone(), b.clone()));
            let other = if &a == id { b } else { a };
            let now = self.now_ms;
            if let Some(r) = self.nodes.get_mut(&other) {
                let actions = r.peer_link_down(id, now);
                self.execute(&other, actions);
            }
        }
    }

    /// Freezes a node, as SIGSTOP does: it stops ticking and handling messages; what
    /// is sent to it waits (in its socket buffers) until [`Sim::thaw`]. Its links stay
    /// up.
    pub fn freeze(&mut self, id: &NodeId) {
        self.frozen.insert(id.clone());
    }

    /// Resumes a frozen node, as SIGCONT does: its first tick runs at once, late by
    /// the length of the freeze; what waited for it is handled from the next step of
    /// the simulation on, so that writes made right after `thaw` (the client requests
    /// that queued up in the process) see the node as its first tick left it.
    pub fn thaw(&mut self, id: &NodeId) {
        if !self.frozen.remove(id) {
            return;
        }
        let now = self.now_ms;
        if let Some(r) = self.nodes.get_mut(id) {
            let actions = r.tick(now);
            self.execute(id, actions);
        }
        let (mine, rest): (Vec<Envelope>, Vec<Envelope>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|e| &e.to == id);
        self.held = rest;
        for env in mine {
            self.seq += 1;
            self.queue.insert((now, self.seq), env);
        }
    }

    /// Cuts the network into groups: nodes of different groups cannot talk (their
    /// links go down, messages in flight between them are lost). Nodes not listed
    /// keep talking to everyone.
    pub fn partition(&mut self, groups: &[&[&str]]) {
        for (i, g) in groups.iter().enumerate() {
            for h in &groups[i + 1..] {
                for a in g.iter() {
                    for b in h.iter() {
                        let (a, b) = (NodeId::new(a), NodeId::new(b));
                        self.cut.insert(pair(&a, &b));
                        if self.links.remove(&pair(&a, &b)) {
                            let now = self.now_ms;
                            for (x, y) in [(&a, &b), (&b, &a)] {
                                if let Some(r) = self.nodes.get_mut(x) {
                                    let actions = r.peer_link_down(y, now);
                                    self.execute(x, actions);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Ends every partition; links come back when the engines ask to reconnect.
    pub fn heal(&mut self) {
        self.cut.clear();
    }

    /// The running nodes.
    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.keys().cloned().collect()
    }

    /// One engine.
    pub fn replica(&self, id: &NodeId) -> &Replica {
        &self.nodes[id]
    }

    /// One engine, mutably.
    pub fn replica_mut(&mut self, id: &NodeId) -> &mut Replica {
        self.nodes.get_mut(id).expect("no such node")
    }

    /// Whether every running node is ready.
    pub fn all_ready(&self) -> bool {
        self.nodes.values().all(Replica::is_ready)
    }

    /// What a node held when it last became ready: what it served its first reads
    /// from.
    pub fn dump_at_ready(&self, id: &NodeId) -> Option<&[ReplicatedService]> {
        self.at_ready.get(id).map(Vec::as_slice)
    }

    /// The replicated dump of one node.
    pub fn dump(&self, id: &NodeId) -> Vec<ReplicatedService> {
        self.nodes[id].registry().dump_replicated()
    }

    /// Whether every running node holds the same replicated state.
    pub fn converged(&self) -> bool {
        let mut dumps = self.nodes.values().map(|r| r.registry().dump_replicated());
        let Some(first) = dumps.next() else {
            return true;
        };
        dumps.all(|d| d == first)
    }

    /// The changes a node published to its subscribers so far.
    pub fn published(&self, id: &NodeId) -> &[Change] {
        self.published.get(id).map_or(&[], Vec::as_slice)
    }

    /// The outcome of a forwarded write, once it came back.
    pub fn forward_outcome(&self, via: &NodeId, id: u64) -> Option<&ForwardOutcome> {
        self.forwards.get(&(via.clone(), id))
    }

    /// The outcomes of writes sent with [`Sim::forward_many`], once they came back.
    pub fn forward_many_outcomes(&self, via: &NodeId, id: u64) -> Option<&[ForwardOutcome]> {
        self.forward_batches
            .get(&(via.clone(), id))
            .map(Vec::as_slice)
    }

    /// Writes that node `via` sends to `owner` in one message; returns the id whose
    /// outcomes land in [`Sim::forward_many_outcomes`].
    pub fn forward_many(&mut self, via: &NodeId, owner: &NodeId, writes: Vec<Write>) -> u64 {
        let now = self.now_ms;
        let replica = self.replica_mut(via);
        let (id, mut actions) = replica.forward_many(owner, Arc::new(writes), now);
        actions.extend(replica.flush_forwards());
        self.execute(via, actions);
        id
    }

    /// A client write sent to node `via`: applied there if it owns the service, else
    /// forwarded to the owner.
    pub fn write(&mut self, via: &NodeId, write: Write) -> WriteResult {
        let now = self.now_ms;
        let r = self.nodes.get_mut(via).expect("no such node");
        match r.route(write.service()) {
            Route::Local => match r.apply_write(write, now) {
                Ok((change, actions)) => {
                    self.execute(via, actions);
                    WriteResult::Applied(change)
                }
                Err(e) => WriteResult::Rejected(e),
            },
            Route::Forward(to) => {
                let (id, actions) = r.forward(&to, write, now);
                self.execute(via, actions);
                WriteResult::Forwarded { to, id }
            }
            Route::Unavailable => WriteResult::Unavailable,
        }
    }

    /// A client session opens (or resumes) at `home`.
    pub fn open_session(&mut self, home: &NodeId, session: SessionId) {
        let now = self.now_ms;
        let actions = self.replica_mut(home).session_opened(session, now);
        self.execute(home, actions);
    }

    /// A client session's connection ends at `home`.
    pub fn close_session(&mut self, home: &NodeId, session: SessionId, clean: bool) {
        let now = self.now_ms;
        let actions = self.replica_mut(home).session_closed(session, clean, now);
        self.execute(home, actions);
    }

    /// Runs the cluster for `ms` of virtual time.
    pub fn run_for(&mut self, ms: u64) {
        let end = self.now_ms + ms;
        while self.now_ms < end {
            self.now_ms = (self.now_ms + self.net.tick_ms).min(end);
            self.deliver_due();
            let ids = self.ids();
            for id in ids {
                if self.frozen.contains(&id) {
                    continue;
                }
                let now = self.now_ms;
                let actions = self.nodes.get_mut(&id).map(|r| r.tick(now));
                if let Some(actions) = actions {
                    self.execute(&id, actions);
                }
            }
        }
    }

    /// Runs until every node holds the same state and nothing is in flight, at most
    /// `max_ms`; returns the time it took, or `None` if it did not converge.
    pub fn run_until_converged(&mut self, max_ms: u64) -> Option<u64> {
        let start = self.now_ms;
        while self.now_ms - start < max_ms {
            self.run_for(100);
            if self.converged() && self.queue.is_empty() {
                return Some(self.now_ms - start);
            }
        }
        None
    }

    fn deliver_due(&mut self) {
        while let Some(entry) = self.queue.first_entry() {
            if entry.key().0 > self.now_ms {
                break;
            }
            let env = entry.remove();
            if self.frozen.contains(&env.to) {
                self.held.push(env);
                continue;
            }
            self.deliver(env);
        }
    }

    fn deliver(&mut self, env: Envelope) {
        if self.cut.contains(&pair(&env.from, &env.to))
            || !self.links.contains(&pair(&env.from, &env.to))
        {
            self.dropped += 1;
            return;
        }
        let now = self.now_ms;
        let Some(r) = self.nodes.get_mut(&env.to) else {
            self.dropped += 1;
            return;
        };
        self.delivered += 1;
        let actions = r.handle(&env.from, env.msg, now);
        let to = env.to;
        self.execute(&to, actions);
    }

    fn connect(&mut self, a: &NodeId, b: &NodeId) {
        if a == b
            || self.cut.contains(&pair(a, b))
            || !self.nodes.contains_key(a)
            || !self.nodes.contains_key(b)
            || self.links.contains(&pair(a, b))
        {
            return;
        }
        self.links.insert(pair(a, b));
        let now = self.now_ms;
        for (x, y) in [(a, b), (b, a)] {
            let addr = format!("sim://{}", y.0);
            let actions = self.replica_mut(x).peer_link_up(y.clone(), addr, now);
            self.execute(x, actions);
        }
    }

    fn execute(&mut self, from: &NodeId, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Send { to, msg } => self.send(from, to, msg),
                Action::Connect { to, .. } => self.connect(from, &to),
                Action::Publish(changes) => self
                    .published
                    .entry(from.clone())
                    .or_default()
                    .extend(changes),
                Action::ForwardDone { id, outcome } => {
                    self.forwards.insert((from.clone(), id), outcome);
                }
                Action::ForwardManyDone { id, outcomes } => {
                    self.forward_batches.insert((from.clone(), id), outcomes);
                }
                Action::Ready => {
                    let dump = self.dump(from);
                    self.at_ready.insert(from.clone(), dump);
                }
                Action::BatchApplied { .. } | Action::RingChanged(_) => {}
            }
        }
    }

    fn send(&mut self, from: &NodeId, to: NodeId, msg: PeerMsg) {
        if !self.links.contains(&pair(from, &to)) {
            self.dropped += 1;
            return;
        }
        if let Some(f) = &mut self.filter {
            if f(from, &to, &msg) {
                self.dropped += 1;
                return;
            }
        }
        if self.net.drop_probability > 0.0
            && (self.random() % 1_000_000) as f64 / 1_000_000.0 < self.net.drop_probability
        {
            self.dropped += 1;
            return;
        }
        let spread = self.net.max_delay_ms.saturating_sub(self.net.min_delay_ms) + 1;
        let delay = self.net.min_delay_ms + self.random() % spread;
        let key = (from.clone(), to.clone());
        let at = (self.now_ms + delay).max(self.last_at.get(&key).copied().unwrap_or(0));
        self.last_at.insert(key, at);
        self.seq += 1;
        self.queue.insert(
            (at, self.seq),
            Envelope {
                from: from.clone(),
                to,
                msg,
            },
        );
    }

    fn random(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}
