//! Playing a scenario: start, load, faults, checks, settle, report.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shoal_storage::ServiceKey;

use super::cluster::{ChaosCluster, Mode};
use super::ledger::{InstKey, Ledger, Violations};
use super::load::{self, Doomed, LoadSpec};
use super::schedule::{Fault, Schedule};
use super::subscriber::{self, SdkSubscriber, SubBook, ViewSet};
use super::world::{NodeState, World};
use crate::{http_get, Value};

/// The bounds the checkers hold the cluster to. Defaults assume the node's default
/// replication timings (`down_after_ms` 2.5 s, anti-entropy every 5 s) and the
/// arguments of [`super::node_args`] (`--idle-timeout-ms 5000`,
/// `--session-grace-ms 10000`).
#[derive(Clone, Debug)]
pub struct Bounds {
    /// Replication delay: an acknowledged write must be on every consistent node this
    /// long after it was acknowledged, and a deregistration gone.
    pub replication: Duration,
    /// A thawed (SIGCONT) node is a stale copy; it must be consistent again this long
    /// after it resumed (anti-entropy runs every 5 s).
    pub thaw_recovery: Duration,
    /// After a partition heals, every node must be consistent again this long after.
    pub heal_recovery: Duration,
    /// After the whole cluster was killed and restarted, the clients must have rebuilt
    /// the registry this long after the last node is ready (they reconnect with a
    /// back-off of up to 5 s, then re-register).
    pub rebuild: Duration,
    /// After the faults end and the load stops: identical dumps, every node up and
    /// ready in every node's view, one owner per service everywhere.
    pub convergence: Duration,
    /// An instance of a crashed client is gone everywhere this long after the crash
    /// (or after the last fault step that followed it): the node's idle timeout (5 s)
    /// + `session_grace_ms` (10 s) + 8 s of detection and replication slack.
    pub zombie: Duration,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            replication: Duration::from_secs(2),
            thaw_recovery: Duration::from_secs(12),
            heal_recovery: Duration::from_secs(20),
            rebuild: Duration::from_secs(20),
            convergence: Duration::from_secs(30),
            zombie: Duration::from_secs(23),
        }
    }
}

/// Counters of the checkers.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Dumps checked.
    pub polls: usize,
    /// Dumps thrown away because the node's state changed during the poll.
    pub discarded_polls: usize,
    /// Polls of a node the harness had up that got no answer.
    pub failed_polls: usize,
    /// Absences inside a tolerated window (a node catching up after a thaw, a heal or
    /// a full restart): allowed, but counted to show what the windows cover.
    pub tolerated_misses: usize,
    /// A first Deregister answered NotFound while some node was not consistent.
    pub stale_not_found: usize,
}

/// One look at a node's `/v1/node`.
#[derive(Clone, Debug)]
pub struct NodeSample {
    /// Milliseconds since the scenario started.
    pub ms: u64,
    /// Whether it was ready.
    pub ready: bool,
    /// Whether self-preservation was on.
    pub self_preservation: bool,
    /// Its instance count.
    pub instances: u64,
}

/// State shared by the load, the subscribers and the checkers.
pub struct Shared {
    /// The cluster as the harness made it.
    pub world: Mutex<World>,
    /// What the clients did.
    pub ledger: Mutex<Ledger>,
    /// What the checkers found.
    pub violations: Mutex<Violations>,
    /// The subscribers.
    pub subs: Mutex<SubBook>,
    /// Counters.
    pub stats: Mutex<Stats>,
    /// Per node: `/v1/node` over time.
    pub samples: Mutex<Vec<Vec<NodeSample>>>,
    /// (node, instance) pairs seen present at least once (to tell a flap, which
    /// disappears, from a write that never arrived).
    pub seen: Mutex<HashSet<(usize, InstKey)>>,
    /// The bounds.
    pub bounds: Bounds,
    /// The services of the load.
    pub services: Vec<ServiceKey>,
    /// The nodes' QUIC addresses.
    pub quic: Vec<SocketAddr>,
    /// The CA clients trust.
    pub ca_file: PathBuf,
}

/// A scenario to play.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Its name (in reports).
    pub name: String,
    /// Cluster size.
    pub nodes: usize,
    /// Loopback or network namespaces.
    pub mode: Mode,
    /// The faults.
    pub schedule: Schedule,
    /// The clients.
    pub load: LoadSpec,
    /// The bounds.
    pub bounds: Bounds,
    /// Extra `shoal server` arguments of every node.
    pub node_args: Vec<String>,
    /// How long the load runs before the fault phase.
    pub warmup: Duration,
}

impl Scenario {
    /// A scenario with the default bounds, node arguments and warm-up.
    pub fn new(
        name: &str,
        nodes: usize,
        mode: Mode,
        schedule: Schedule,
        load: LoadSpec,
    ) -> Scenario {
        Scenario {
            name: name.to_string(),
            nodes,
            mode,
            schedule,
            load,
            bounds: Bounds::default(),
            node_args: super::node_args(),
            warmup: Duration::from_secs(3),
        }
    }
}

/// What a run did and found.
#[derive(Clone, Debug)]
pub struct Report {
    /// Scenario name.
    pub name: String,
    /// Its seed.
    pub seed: u64,
    /// Its schedule.
    pub schedule: Schedule,
    /// Why it did not run, if it did not.
    pub skipped: Option<String>,
    /// The steps as carried out (ms since start, what).
    pub executed: Vec<(u64, String)>,
    /// When the fault phase started (ms since start).
    pub fault_phase_ms: u64,
    /// What the checkers found.
    pub violations: Violations,
    /// Counters of the checkers.
    pub stats: Stats,
    /// Per node: `/v1/node` over time.
    pub samples: Vec<Vec<NodeSample>>,
    /// Registrations attempted / acknowledged; deregistrations acknowledged.
    pub registrations: (usize, usize),
    /// Deregistrations acknowledged.
    pub deregistrations: usize,
    /// Instances of crashed clients.
    pub crashed_instances: usize,
    /// Writes retried at least once, and the slowest write (retries included).
    pub retried_writes: usize,
    /// Slowest successful write.
    pub max_write: Duration,
    /// Views the raw subscribers got; duplicates among them; views of the SDK
    /// subscriber.
    pub views: (usize, usize, usize),
    /// From the end of the load to identical dumps (None: never within the bound).
    pub convergence: Option<Duration>,
    /// The final registry: instances.
    pub final_instances: usize,
    /// Wall time of the whole run.
    pub wall: Duration,
}

impl Report {
    /// A one-paragraph summary.
    pub fn summary(&self) -> String {
        if let Some(why) = &self.skipped {
            return format!("chaos {}: SKIPPED: {why}", self.name);
        }
        let mut s = String::new();
        let _ = writeln!(
            s,
            "chaos {} (seed {}): {} in {:.0} s; faults: {}",
            self.name,
            self.seed,
            if self.violations.is_empty() {
                "no violations".to_string()
            } else {
                format!(
                    "{} VIOLATION(S) {:?}",
                    self.violations.len(),
                    self.violations.by_kind()
                )
            },
            self.wall.as_secs_f64(),
            self.schedule.counts()
        );
        let _ = writeln!(
            s,
            "  registrations {} sent / {} acknowledged, {} deregistrations, {} instances of crashed clients, {} retried writes, slowest write {:.1} s",
            self.registrations.0,
            self.registrations.1,
            self.deregistrations,
            self.crashed_instances,
            self.retried_writes,
            self.max_write.as_secs_f64()
        );
        let _ = writeln!(
            s,
            "  polls {} checked / {} discarded / {} failed, {} tolerated absences; views {} (raw, {} duplicates) + {} (SDK); convergence {}; final registry {} instances",
            self.stats.polls,
            self.stats.discarded_polls,
            self.stats.failed_polls,
            self.stats.tolerated_misses,
            self.views.0,
            self.views.1,
            self.views.2,
            self.convergence
                .map_or("NOT REACHED".to_string(), |d| format!("{:.1} s", d.as_secs_f64())),
            self.final_instances
        );
        s
    }

    /// One row of the table in docs/reliability.md.
    pub fn table_row(&self) -> String {
        if let Some(why) = &self.skipped {
            return format!("| {} | {} | skipped: {why} | | | | |", self.seed, self.name);
        }
        let kinds: Vec<String> = self
            .violations
            .by_kind()
            .into_iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        format!(
            "| {} | {} | {} | {} / {} | {} | {} | {} |",
            self.seed,
            self.name,
            self.schedule.counts(),
            self.registrations.1,
            self.deregistrations,
            self.crashed_instances,
            self.convergence
                .map_or("not reached".to_string(), |d| format!(
                    "{:.1} s",
                    d.as_secs_f64()
                )),
            if kinds.is_empty() {
                "none".to_string()
            } else {
                kinds.join(", ")
            }
        )
    }

    /// Whether the run found a violation of a kind not listed in
    /// `SHOAL_CHAOS_TOLERATE`.
    pub fn failed(&self) -> bool {
        let tolerated: Vec<String> = std::env::var("SHOAL_CHAOS_TOLERATE")
            .unwrap_or_default()
            .split(',')
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty())
            .collect();
        self.violations
            .by_kind()
            .keys()
            .any(|k| !tolerated.contains(k))
    }

    /// The replay hint.
    pub fn replay(&self) -> String {
        format!(
            "replay: SHOAL_CHAOS_SEED={seed} cargo test -p shoal-tests --test chaos (or chaos_partition) -- --nocapture <test name>; a long-run seed: make chaos SEED={seed}",
            seed = self.seed
        )
    }

    /// Panics with the seed, the schedule, what was carried out and every violation,
    /// unless the run was clean (or skipped).
    ///
    /// `SHOAL_CHAOS_TOLERATE=kind,kind` lists kinds of violations that are printed but
    /// do not fail (to look past a known bug while it is being fixed).
    pub fn assert_ok(&self) {
        println!("{}", self.summary());
        if self.skipped.is_some() || self.violations.is_empty() {
            return;
        }
        if !self.failed() {
            println!(
                "chaos {}: only tolerated violations (SHOAL_CHAOS_TOLERATE):\n{}",
                self.name,
                self.violations.render(40)
            );
            return;
        }
        let executed: String = self
            .executed
            .iter()
            .map(|(ms, what)| format!("  +{ms:>6} ms  {what}\n"))
            .collect();
        panic!(
            "chaos scenario {} failed\n{}\n{}\ncarried out (ms since the start; the fault phase began at +{} ms):\n{}violations:\n{}{}",
            self.name,
            self.summary(),
            self.schedule,
            self.fault_phase_ms,
            executed,
            self.violations.render(40),
            self.replay()
        );
    }

    /// The samples of node `i` between `from_ms` and `to_ms`.
    pub fn samples_between(&self, i: usize, from_ms: u64, to_ms: u64) -> Vec<&NodeSample> {
        self.samples[i]
            .iter()
            .filter(|s| s.ms >= from_ms && s.ms <= to_ms)
            .collect()
    }

    /// When the first carried-out step whose text starts with `what_starts_with` happened
    /// (ms since start).
    pub fn executed_at(&self, what_starts_with: &str) -> Option<u64> {
        self.executed
            .iter()
            .find(|(_, w)| w.starts_with(what_starts_with))
            .map(|(ms, _)| *ms)
    }
}

/// Which node wrote a record, and when (from its stamp), as "n1 at +12345 ms".
fn writer_of(version: &Value, world: &World, nodes: usize) -> String {
    let time = version[0].as_u64().unwrap_or(0);
    let origin = version[1].as_u64().unwrap_or(0);
    let who = (0..nodes)
        .find(|i| shoal_storage::origin_of(&shoal_storage::NodeId::new(format!("n{i}"))) == origin)
        .map_or(format!("origin {origin}"), |i| format!("n{i}"));
    let at = (time >> 16) as i64 - world.t0_unix_ms as i64;
    format!("{who} at {at:+} ms")
}

/// The instances listed in a `/v1/dump`, by key, and per service.
fn parse_dump(dump: &Value) -> (HashSet<InstKey>, HashMap<String, ViewSet>) {
    let (all, per, _) = parse_dump_versions(dump);
    (all, per)
}

/// Like [`parse_dump`], with each instance's `version` (stamp time, origin).
fn parse_dump_versions(
    dump: &Value,
) -> (
    HashSet<InstKey>,
    HashMap<String, ViewSet>,
    HashMap<InstKey, Value>,
) {
    let mut all = HashSet::new();
    let mut per = HashMap::new();
    let mut versions = HashMap::new();
    for s in dump.as_array().into_iter().flatten() {
        let name = s["key"]["service"].as_str().unwrap_or_default().to_string();
        let set: &mut ViewSet = per.entry(name.clone()).or_default();
        for i in s["instances"].as_array().into_iter().flatten() {
            let ip = i["ip"].as_str().unwrap_or_default().to_string();
            let port = i["port"].as_u64().unwrap_or(0) as u16;
            set.insert((ip.clone(), port));
            versions.insert((name.clone(), ip.clone(), port), i["version"].clone());
            all.insert((name.clone(), ip, port));
        }
    }
    (all, per, versions)
}

/// How long before a fault step an acknowledged write may still sit in its owner's
/// batch (`batch_window_ms` is 5 ms; the rest is scheduling slack on a loaded machine),
/// and how long before its client has the answer the owner may have given it (the
/// answer of a forwarded write travels through the client's home).
const AP_WINDOW: Duration = Duration::from_millis(100);

/// Checks one consistent poll of node `node` (`present`, read between `start` and
/// `end`) against the ledger.
fn evaluate(
    shared: &Shared,
    node: usize,
    present: &HashSet<InstKey>,
    versions: &HashMap<InstKey, Value>,
    start: Instant,
    end: Instant,
) {
    let b = &shared.bounds;
    let world = shared.world.lock().unwrap();
    let settled = world.nodes[node].check_from <= start;
    let ms = world.ms(start);
    let mut findings: Vec<(&str, String, String)> = Vec::new();
    let mut tolerated = 0;
    let mut newly_seen = Vec::new();
    {
        let ledger = shared.ledger.lock().unwrap();
        let seen = shared.seen.lock().unwrap();
        for key in present {
            if !ledger.regs.contains_key(key) {
                findings.push((
                    "phantom",
                    format!("{} {}:{}", key.0, key.1, key.2),
                    "listed, but no client registered it".into(),
                ));
            }
        }
        for (key, reg) in &ledger.regs {
            let reachable = reg.servers.iter().all(|&s| world.same_side(s, node));
            if !reachable {
                continue;
            }
            let here = present.contains(key);
            if here {
                newly_seen.push((node, key.clone()));
            }
            let name = || format!("{} {}:{} of {}", key.0, key.1, key.2, reg.client);
            let history = || reg.history(world.t0);
            let written = || {
                versions
                    .get(key)
                    .map(|v| writer_of(v, &world, world.nodes.len()))
                    .unwrap_or_default()
            };
            // Must be there: acknowledged, still wanted, its client alive.
            let must = reg.acked.is_some_and(|a| a + b.replication <= start)
                && !reg.failed
                && reg.dereg_requested.is_none_or(|d| d > end)
                && reg.crashed.is_none_or(|c| c > end);
            // Acknowledged just before a fault: the owner may have answered before its
            // batch left (the AP window of docs/reliability.md); it arrives when the
            // owner is back, when the node that takes its range over gets it from the
            // client's home, or when the client re-registers after failing over. Its
            // absence is tolerated here; `final-missing` still catches a loss for good.
            // The client has the answer after the owner gave it, by up to AP_WINDOW
            // (not before the request was sent): a fault in that time may have come
            // after the owner's answer too.
            let before_a_fault = |sent: Instant, a: Instant| {
                let from = a.checked_sub(AP_WINDOW).map_or(sent, |f| f.max(sent));
                world
                    .fault_times
                    .iter()
                    .any(|&f| f >= from && f <= a + AP_WINDOW)
            };
            let in_ap_window = reg.acked.is_some_and(|a| before_a_fault(reg.attempted, a));
            let never_seen = !seen.contains(&(node, key.clone()));
            if must && !here {
                if settled && !(in_ap_window && never_seen) {
                    let (kind, detail) = if seen.contains(&(node, key.clone())) {
                        (
                            "flap",
                            "an acknowledged instance of a live client disappeared",
                        )
                    } else {
                        (
                            "missing",
                            "an acknowledged instance of a live client never arrived",
                        )
                    };
                    findings.push((kind, name(), format!("{detail} ({})", history())));
                } else {
                    tolerated += 1;
                }
            }
            if here && settled {
                // The same AP window for a deletion acknowledged just before a fault:
                // tolerated here, `final-extra` catches it if it never spreads.
                let dereg_in_ap_window = reg
                    .dereg_acked
                    .zip(reg.dereg_requested)
                    .is_some_and(|(a, sent)| before_a_fault(sent, a));
                if dereg_in_ap_window && reg.dereg_acked.is_some_and(|d| d + b.replication <= start)
                {
                    tolerated += 1;
                } else if reg.dereg_acked.is_some_and(|d| d + b.replication <= start) {
                    findings.push((
                        "stale",
                        name(),
                        format!(
                            "still listed after its deregistration was acknowledged ({}; record written by {})",
                            history(),
                            written()
                        ),
                    ));
                } else if let Some(c) = reg.crashed {
                    let deadline = world.zombie_deadline(c, b.zombie);
                    if deadline <= start && reg.dereg_acked.is_none() {
                        findings.push((
                            "zombie",
                            name(),
                            format!(
                                "still listed after its deadline +{} ms ({}; record written by {})",
                                world.ms(deadline),
                                history(),
                                written()
                            ),
                        ));
                    }
                }
            }
        }
    }
    drop(world);
    {
        let mut seen = shared.seen.lock().unwrap();
        seen.extend(newly_seen);
    }
    {
        let mut stats = shared.stats.lock().unwrap();
        stats.polls += 1;
        stats.tolerated_misses += tolerated;
    }
    if !findings.is_empty() {
        let mut v = shared.violations.lock().unwrap();
        for (kind, what, detail) in findings {
            v.add(kind, &format!("n{node}"), &what, ms, detail);
        }
    }
}

/// Polls node `node`'s dump and info until `stop`, checking each consistent poll.
async fn poller(shared: Arc<Shared>, node: usize, http: SocketAddr, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        let snapshot = |shared: &Shared| {
            let w = shared.world.lock().unwrap();
            (w.nodes[node].state, w.nodes[node].epoch, w.partition_epoch)
        };
        let before = snapshot(&shared);
        if before.0 != NodeState::Up {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let start = Instant::now();
        let dump = http_get(http, "/v1/dump").await;
        let info = http_get(http, "/v1/node").await;
        let end = Instant::now();
        if snapshot(&shared) != before {
            shared.stats.lock().unwrap().discarded_polls += 1;
            continue;
        }
        let dump = dump
            .ok()
            .filter(|r| r.status == 200)
            .and_then(|r| serde_json::from_str::<Value>(&r.body).ok());
        let info = info
            .ok()
            .filter(|r| r.status == 200)
            .and_then(|r| serde_json::from_str::<Value>(&r.body).ok());
        match (dump, info) {
            (Some(dump), Some(info)) => {
                let (present, _, versions) = parse_dump_versions(&dump);
                evaluate(&shared, node, &present, &versions, start, end);
                let ms = shared.world.lock().unwrap().ms(start);
                shared.samples.lock().unwrap()[node].push(NodeSample {
                    ms,
                    ready: info["ready"] == true,
                    self_preservation: info["self_preservation"] == true,
                    instances: info["instances"].as_u64().unwrap_or(0),
                });
            }
            _ => shared.stats.lock().unwrap().failed_polls += 1,
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Everything a run holds while it plays.
struct Running {
    cluster: ChaosCluster,
    shared: Arc<Shared>,
    doomed: HashMap<usize, tokio::task::JoinHandle<Option<Doomed>>>,
    crashes: Vec<tokio::task::JoinHandle<()>>,
    seed: u64,
}

impl Running {
    async fn apply(&mut self, fault: &Fault) {
        let shared = Arc::clone(&self.shared);
        let b = shared.bounds.clone();
        match fault {
            Fault::Kill(nodes) => {
                {
                    let mut w = shared.world.lock().unwrap();
                    for &i in nodes {
                        w.set(i, NodeState::Down, None);
                    }
                }
                for &i in nodes {
                    self.cluster.kill9(i);
                }
                shared.world.lock().unwrap().record(fault.to_string());
            }
            Fault::Restart(nodes) => {
                let full = {
                    let w = shared.world.lock().unwrap();
                    w.nodes.iter().all(|n| n.state != NodeState::Up)
                };
                for &i in nodes {
                    shared
                        .world
                        .lock()
                        .unwrap()
                        .set(i, NodeState::Starting, None);
                    let started = Instant::now();
                    self.cluster.restart(i).await;
                    let mut w = shared.world.lock().unwrap();
                    // After a full-cluster restart the clients rebuild the registry:
                    // hold the node to the rules only after that.
                    let from = Instant::now() + if full { b.rebuild } else { Duration::ZERO };
                    w.set(i, NodeState::Up, Some(from));
                    w.record(format!(
                        "restart n{i} (ready after {} ms)",
                        started.elapsed().as_millis()
                    ));
                }
                if full {
                    // The registry is rebuilt by the clients from here.
                    let mut w = shared.world.lock().unwrap();
                    let from = Instant::now() + b.rebuild;
                    for n in w.nodes.iter_mut() {
                        n.check_from = n.check_from.max(from);
                    }
                }
            }
            Fault::Freeze(i) => {
                shared
                    .world
                    .lock()
                    .unwrap()
                    .set(*i, NodeState::Frozen, None);
                self.cluster.freeze(*i);
                shared.world.lock().unwrap().record(fault.to_string());
            }
            Fault::Thaw(i) => {
                self.cluster.thaw(*i);
                let mut w = shared.world.lock().unwrap();
                w.set(*i, NodeState::Up, Some(Instant::now() + b.thaw_recovery));
                w.record(fault.to_string());
            }
            Fault::Partition(groups) => {
                {
                    let mut w = shared.world.lock().unwrap();
                    let mut of = vec![usize::MAX; w.nodes.len()];
                    for (g, members) in groups.iter().enumerate() {
                        for &m in members {
                            of[m] = g;
                        }
                    }
                    w.groups = Some(of);
                    w.partition_epoch += 1;
                    w.note_wholeness();
                }
                if let Err(e) = self.cluster.partition(groups) {
                    panic!("cannot partition: {e}");
                }
                shared.world.lock().unwrap().record(fault.to_string());
            }
            Fault::Heal => {
                if let Err(e) = self.cluster.heal() {
                    panic!("cannot heal: {e}");
                }
                let mut w = shared.world.lock().unwrap();
                w.groups = None;
                w.partition_epoch += 1;
                w.note_wholeness();
                let from = Instant::now() + b.heal_recovery;
                for n in w.nodes.iter_mut() {
                    n.check_from = n.check_from.max(from);
                }
                w.record(fault.to_string());
            }
            Fault::SpawnDoomed {
                id,
                kind,
                servers,
                instances,
            } => {
                let task = tokio::spawn(load::spawn_doomed(
                    Arc::clone(&shared),
                    *id,
                    *kind,
                    servers.clone(),
                    *instances,
                    self.seed,
                ));
                self.doomed.insert(*id, task);
                let mut w = shared.world.lock().unwrap();
                let ms = w.ms(Instant::now());
                w.log.push((ms, fault.to_string()));
            }
            Fault::CrashDoomed(id) => {
                let Some(task) = self.doomed.remove(id) else {
                    return;
                };
                let shared = Arc::clone(&shared);
                let id = *id;
                self.crashes.push(tokio::spawn(async move {
                    let doomed = task.await.ok().flatten();
                    if let Some(d) = doomed {
                        load::crash(d).await;
                    }
                    let tag = format!("d{id}");
                    shared.ledger.lock().unwrap().crashed(&tag);
                    let mut w = shared.world.lock().unwrap();
                    let ms = w.ms(Instant::now());
                    w.log.push((ms, format!("crashed doomed client d{id}")));
                }));
            }
        }
    }

    /// One look at the end state: `Ok` when converged and exactly right; else
    /// `Err((converged, why))`.
    async fn final_check(&self, sdk: Option<&SdkSubscriber>) -> Result<(), (bool, String)> {
        self.cluster
            .check_converged()
            .await
            .map_err(|e| (false, e))?;
        // One owner per service everywhere.
        for service in &self.shared.services {
            let path = format!("/v1/ring?service={}", service.service);
            let mut owners = BTreeSet::new();
            for i in 0..self.cluster.len() {
                let ring = self
                    .cluster
                    .get_json(i, &path)
                    .await
                    .map_err(|e| (false, e))?;
                owners.insert(ring["owner"].to_string());
            }
            if owners.len() != 1 {
                return Err((
                    false,
                    format!(
                        "nodes disagree on the owner of {}: {owners:?}",
                        service.service
                    ),
                ));
            }
        }
        let dump = self
            .cluster
            .get_json(0, "/v1/dump")
            .await
            .map_err(|e| (false, e))?;
        let (present, per_service) = parse_dump(&dump);
        let (missing, extra) = self.final_difference(&present);
        if !missing.is_empty() || !extra.is_empty() {
            return Err((
                true,
                format!(
                    "final registry: {} missing {:?}, {} extra {:?}",
                    missing.len(),
                    missing.iter().take(5).collect::<Vec<_>>(),
                    extra.len(),
                    extra.iter().take(5).collect::<Vec<_>>()
                ),
            ));
        }
        for node in 0..self.cluster.len() {
            subscriber::raw_matches(&self.shared, node, &per_service).map_err(|e| (true, e))?;
        }
        if let Some(sdk) = sdk {
            for service in &self.shared.services {
                let want = per_service
                    .get(&service.service)
                    .cloned()
                    .unwrap_or_default();
                let got = sdk.cached(service).unwrap_or_default();
                if got != want {
                    return Err((
                        true,
                        format!(
                            "the SDK subscriber's cached {} has {} instances, the registry {}",
                            service.service,
                            got.len(),
                            want.len()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Instances the final registry lacks, and instances it should not hold.
    fn final_difference(&self, present: &HashSet<InstKey>) -> (Vec<InstKey>, Vec<InstKey>) {
        let ledger = self.shared.ledger.lock().unwrap();
        let missing: Vec<InstKey> = ledger
            .regs
            .iter()
            .filter(|(k, r)| r.live() && !present.contains(*k))
            .map(|(k, _)| k.clone())
            .collect();
        let extra: Vec<InstKey> = present
            .iter()
            .filter(|k| {
                ledger
                    .regs
                    .get(*k)
                    .is_none_or(|r| !r.live() && !r.undecided())
            })
            .cloned()
            .collect();
        (missing, extra)
    }
}

/// Plays `scenario` and reports what happened. Never panics on a violation (the
/// caller asserts with [`Report::assert_ok`]); panics if the harness itself cannot
/// work (a node that does not start).
pub async fn run(scenario: Scenario) -> Report {
    let wall = Instant::now();
    let seed = scenario.schedule.seed;
    println!(
        "chaos {}: seed {seed} (replay with SHOAL_CHAOS_SEED={seed}); {} nodes ({:?})\n{}",
        scenario.name, scenario.nodes, scenario.mode, scenario.schedule
    );
    let mut report = Report {
        name: scenario.name.clone(),
        seed,
        schedule: scenario.schedule.clone(),
        skipped: None,
        executed: Vec::new(),
        fault_phase_ms: 0,
        violations: Violations::default(),
        stats: Stats::default(),
        samples: Vec::new(),
        registrations: (0, 0),
        deregistrations: 0,
        crashed_instances: 0,
        retried_writes: 0,
        max_write: Duration::ZERO,
        views: (0, 0, 0),
        convergence: None,
        final_instances: 0,
        wall: Duration::ZERO,
    };
    let cluster =
        match ChaosCluster::start(scenario.nodes, scenario.mode, &scenario.node_args).await {
            Ok(c) => c,
            Err(why) => {
                println!("chaos {}: skipped: {why}", scenario.name);
                report.skipped = Some(why);
                return report;
            }
        };
    let n = cluster.len();
    let shared = Arc::new(Shared {
        world: Mutex::new(World::new(n)),
        ledger: Mutex::new(Ledger::default()),
        violations: Mutex::new(Violations::default()),
        subs: Mutex::new(SubBook {
            nodes: (0..n).map(|_| Default::default()).collect(),
            ..Default::default()
        }),
        stats: Mutex::new(Stats::default()),
        samples: Mutex::new(vec![Vec::new(); n]),
        seen: Mutex::new(HashSet::new()),
        bounds: scenario.bounds.clone(),
        services: load::services(scenario.load.services),
        quic: (0..n).map(|i| cluster.quic(i)).collect(),
        ca_file: cluster.ca_file(),
    });
    let mut running = Running {
        cluster,
        shared: Arc::clone(&shared),
        doomed: HashMap::new(),
        crashes: Vec::new(),
        seed,
    };
    let harness = |what: &str, detail: String| {
        let ms = shared.world.lock().unwrap().ms(Instant::now());
        shared
            .violations
            .lock()
            .unwrap()
            .add("harness", "harness", what, ms, detail);
    };

    // The cluster forms.
    let formed = Instant::now();
    let mut why = String::new();
    while formed.elapsed() < Duration::from_secs(60) {
        match running.cluster.check_converged().await {
            Ok(()) => {
                why.clear();
                break;
            }
            Err(e) => why = e,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if !why.is_empty() {
        let logs: String = (0..n)
            .map(|i| running.cluster.log_tail(i, 8) + "\n")
            .collect();
        panic!(
            "chaos {}: the cluster did not form within 60 s: {why}\n{logs}",
            scenario.name
        );
    }

    // Observers and load.
    let stop_observers = Arc::new(AtomicBool::new(false));
    let subs_task = tokio::spawn(subscriber::supervise_raw(
        Arc::clone(&shared),
        shared.quic.clone(),
        shared.ca_file.clone(),
        Arc::clone(&stop_observers),
    ));
    let pollers: Vec<_> = (0..n)
        .map(|i| {
            tokio::spawn(poller(
                Arc::clone(&shared),
                i,
                running.cluster.http(i),
                Arc::clone(&stop_observers),
            ))
        })
        .collect();
    let all: Vec<usize> = (0..n).collect();
    let sdk = if scenario.load.sdk_subscriber {
        match SdkSubscriber::start(
            Arc::clone(&shared),
            load::client_config(&shared, &all, "chaos-sdk-subscriber"),
        )
        .await
        {
            Ok(s) => Some(s),
            Err(e) => {
                harness("SDK subscriber", e);
                None
            }
        }
    } else {
        None
    };
    let stop_load = Arc::new(AtomicBool::new(false));
    let started = Arc::new(tokio::sync::Semaphore::new(0));
    let stable: Vec<_> = scenario
        .load
        .clients
        .iter()
        .enumerate()
        .map(|(i, plan)| {
            tokio::spawn(load::stable_client(
                Arc::clone(&shared),
                i,
                plan.clone(),
                seed,
                Arc::clone(&stop_load),
                Arc::clone(&started),
            ))
        })
        .collect();
    let want = stable.len() as u32;
    if tokio::time::timeout(Duration::from_secs(120), started.acquire_many(want))
        .await
        .is_err()
    {
        harness(
            "load starts",
            "stable clients not registered within 120 s".into(),
        );
    }
    tokio::time::sleep(scenario.warmup).await;

    // Faults.
    let phase = Instant::now();
    {
        let mut w = shared.world.lock().unwrap();
        report.fault_phase_ms = w.ms(phase);
        let ms = report.fault_phase_ms;
        w.log.push((ms, "fault phase starts".into()));
    }
    for step in &scenario.schedule.steps {
        tokio::time::sleep_until((phase + Duration::from_millis(step.at_ms)).into()).await;
        running.apply(&step.fault).await;
    }
    tokio::time::sleep_until((phase + Duration::from_millis(scenario.schedule.duration_ms)).into())
        .await;
    // Whatever the schedule left broken is mended (a well-formed schedule leaves
    // nothing).
    running.cluster.heal().ok();
    for i in 0..n {
        if running.cluster.is_frozen(i) {
            running.apply(&Fault::Thaw(i)).await;
        }
        if !running.cluster.is_running(i) {
            running.apply(&Fault::Restart(vec![i])).await;
        }
    }
    if shared.world.lock().unwrap().groups.is_some() {
        running.apply(&Fault::Heal).await;
    }
    let leftover: Vec<usize> = running.doomed.keys().copied().collect();
    for id in leftover {
        running.apply(&Fault::CrashDoomed(id)).await;
    }
    for t in std::mem::take(&mut running.crashes) {
        let _ = tokio::time::timeout(Duration::from_secs(60), t).await;
    }
    {
        let mut w = shared.world.lock().unwrap();
        let ms = w.ms(Instant::now());
        w.log.push((ms, "faults end".into()));
    }

    // The load stops; its clients stay connected.
    stop_load.store(true, Ordering::SeqCst);
    let mut clients = Vec::new();
    for t in stable {
        match tokio::time::timeout(Duration::from_secs(150), t).await {
            Ok(Ok(Some(c))) => clients.push(c),
            Ok(_) => {}
            Err(_) => harness("load stops", "a stable client did not stop in 150 s".into()),
        }
    }
    let load_end = Instant::now();
    {
        let mut w = shared.world.lock().unwrap();
        let ms = w.ms(load_end);
        w.log.push((ms, "load stops; settling".into()));
    }

    // Settle: convergence within the bound, then exactly the live registrations.
    let b = shared.bounds.clone();
    let conv_deadline = load_end + b.convergence;
    let zombie_deadline = {
        let w = shared.world.lock().unwrap();
        let ledger = shared.ledger.lock().unwrap();
        ledger
            .regs
            .values()
            .filter_map(|r| r.crashed)
            .map(|c| w.zombie_deadline(c, b.zombie))
            .max()
            .unwrap_or(load_end)
    };
    let final_deadline = conv_deadline.max(zombie_deadline) + Duration::from_secs(5);
    let mut first_converged: Option<Instant> = None;
    let mut last_why = String::new();
    let mut final_ok = false;
    loop {
        match running.final_check(sdk.as_ref()).await {
            Ok(()) => {
                first_converged.get_or_insert_with(Instant::now);
                final_ok = true;
                break;
            }
            Err((converged, why)) => {
                if converged {
                    first_converged.get_or_insert_with(Instant::now);
                }
                last_why = why;
            }
        }
        if Instant::now() > final_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let now_ms = |shared: &Shared| shared.world.lock().unwrap().ms(Instant::now());
    match first_converged {
        Some(t) if t <= conv_deadline => {
            report.convergence = Some(t.saturating_duration_since(load_end));
        }
        other => {
            report.convergence = other.map(|t| t.saturating_duration_since(load_end));
            shared.violations.lock().unwrap().add(
                "no-convergence",
                "cluster",
                "dumps",
                now_ms(&shared),
                format!(
                    "not converged within {:?} after the load stopped: {last_why}",
                    b.convergence
                ),
            );
        }
    }
    if !final_ok {
        // Say precisely what is wrong with the final registry, node by node.
        let t0 = shared.world.lock().unwrap().t0;
        let mut found = Vec::new();
        for i in 0..n {
            if let Ok(dump) = running.cluster.get_json(i, "/v1/dump").await {
                let (present, _, versions) = parse_dump_versions(&dump);
                let written = |k: &InstKey| {
                    let w = shared.world.lock().unwrap();
                    versions
                        .get(k)
                        .map(|v| format!("; record written by {}", writer_of(v, &w, n)))
                        .unwrap_or_default()
                };
                let (missing, extra) = running.final_difference(&present);
                let extra: Vec<(InstKey, String)> = extra
                    .into_iter()
                    .map(|k| {
                        let by = written(&k);
                        (k, by)
                    })
                    .collect();
                let ledger = shared.ledger.lock().unwrap();
                for k in missing {
                    let who = ledger
                        .regs
                        .get(&k)
                        .map(|r| r.client.clone())
                        .unwrap_or_default();
                    found.push((
                        "final-missing",
                        format!("n{i}"),
                        format!("{} {}:{} of {who}", k.0, k.1, k.2),
                        "an acknowledged instance of a live client is not in the final registry"
                            .to_string(),
                    ));
                }
                for (k, by) in extra {
                    let why = match ledger.regs.get(&k) {
                        None => "no client registered it".to_string(),
                        Some(r) if r.crashed.is_some() => {
                            format!("its client crashed (zombie): {}", r.history(t0))
                        }
                        Some(r) => format!("it was deregistered: {}", r.history(t0)),
                    } + &by;
                    let who = ledger
                        .regs
                        .get(&k)
                        .map(|r| r.client.clone())
                        .unwrap_or_default();
                    found.push((
                        "final-extra",
                        format!("n{i}"),
                        format!("{} {}:{} of {who}", k.0, k.1, k.2),
                        why,
                    ));
                }
            }
        }
        let ms = now_ms(&shared);
        let mut v = shared.violations.lock().unwrap();
        if found.is_empty() {
            v.add("final-state", "cluster", "end", ms, last_why.clone());
        }
        for (kind, place, what, detail) in found {
            v.add(kind, &place, &what, ms, detail);
        }
    }

    // Tear down.
    stop_observers.store(true, Ordering::SeqCst);
    for p in pollers {
        let _ = tokio::time::timeout(Duration::from_secs(15), p).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), subs_task).await;
    if let Some(sdk) = sdk {
        sdk.stop().await;
    }
    for c in clients {
        let _ = tokio::time::timeout(Duration::from_secs(5), c.close()).await;
    }

    // Report.
    {
        let ledger = shared.ledger.lock().unwrap();
        report.registrations = (
            ledger.regs.len(),
            ledger.regs.values().filter(|r| r.acked.is_some()).count(),
        );
        report.deregistrations = ledger
            .regs
            .values()
            .filter(|r| r.dereg_acked.is_some())
            .count();
        report.crashed_instances = ledger.regs.values().filter(|r| r.crashed.is_some()).count();
        report.retried_writes = ledger.retried_writes;
        report.max_write = ledger
            .write_latencies
            .iter()
            .copied()
            .max()
            .unwrap_or_default();
        report.final_instances = ledger.expected_final().len();
    }
    {
        let book = shared.subs.lock().unwrap();
        report.views = (book.views_seen, book.duplicates, book.sdk_views_seen);
    }
    report.stats = shared.stats.lock().unwrap().clone();
    report.samples = shared.samples.lock().unwrap().clone();
    report.executed = shared.world.lock().unwrap().log.clone();
    report.violations = shared.violations.lock().unwrap().clone();
    report.wall = wall.elapsed();
    if !report.violations.is_empty() {
        // Printed before the node logs (which the cluster prints as it is dropped), so
        // that an excerpt of the output that keeps its beginning shows what failed.
        println!(
            "chaos {}: {} violation(s), first the list, then the node logs:\n{}",
            report.name,
            report.violations.len(),
            report.violations.render(40)
        );
        running.cluster.keep_logs();
    } else if std::env::var_os("SHOAL_CHAOS_KEEP_LOGS").is_some() {
        running.cluster.keep_logs();
    }
    drop(running);
    report
}

/// Distinct kinds of violations in several reports, for a long run's summary.
pub fn tally(reports: &[Report]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for r in reports {
        for (k, v) in r.violations.by_kind() {
            *out.entry(k).or_insert(0) += v;
        }
    }
    out
}
