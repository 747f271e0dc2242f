//! What the clients did (the ledger) and what the checkers found wrong (violations).
//!
//! Every registration the load makes uses a fresh `(service, ip, port)`, so an
//! instance key names exactly one registration: its history is a few timestamps.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// An instance as the checkers name it: service name, ip, port (namespace, group and
/// cluster are the defaults for every instance the load makes).
pub type InstKey = (String, String, u16);

/// The history of one registration.
#[derive(Clone, Debug)]
pub struct Reg {
    /// Which client made it (`c3`, `doomed-sdk-2`, `doomed-cli-5`...).
    pub client: String,
    /// The nodes that client may be homed on (its server list, by index).
    pub servers: Vec<usize>,
    /// First Register sent.
    pub attempted: Instant,
    /// Register answered `Applied`.
    pub acked: Option<Instant>,
    /// The node the client was connected to when the Register was answered.
    pub acked_via: Option<String>,
    /// Register gave up with an error: it may or may not have been applied.
    pub failed: bool,
    /// First Deregister sent.
    pub dereg_requested: Option<Instant>,
    /// Deregister answered.
    pub dereg_acked: Option<Instant>,
    /// The node the client was connected to when the Deregister was answered.
    pub dereg_via: Option<String>,
    /// The client crashed (close without Goodbye, or kill -9 of its process).
    pub crashed: Option<Instant>,
    /// The Deregister was answered NotFound, or `Ok(0)` (the SDK's "already gone
    /// after a retry"): the client takes it as gone.
    pub dereg_not_found: bool,
}

impl Reg {
    /// Its history in ms since `t0`, for violation reports.
    pub fn history(&self, t0: Instant) -> String {
        let ms = |t: Instant| t.saturating_duration_since(t0).as_millis();
        let mut s = format!("sent +{}", ms(self.attempted));
        if let Some(a) = self.acked {
            s += &format!(
                ", acked +{} via {}",
                ms(a),
                self.acked_via.as_deref().unwrap_or("?")
            );
        }
        if self.failed {
            s += ", register failed";
        }
        if let Some(d) = self.dereg_requested {
            s += &format!(", dereg sent +{}", ms(d));
        }
        if let Some(d) = self.dereg_acked {
            s += &format!(
                ", dereg acked +{} via {}",
                ms(d),
                self.dereg_via.as_deref().unwrap_or("?")
            );
        }
        if let Some(c) = self.crashed {
            s += &format!(", client crashed +{}", ms(c));
        }
        s
    }

    /// Whether the instance must be in the final registry: acknowledged, never
    /// deregistered, its client alive.
    pub fn live(&self) -> bool {
        self.acked.is_some()
            && !self.failed
            && self.dereg_requested.is_none()
            && self.crashed.is_none()
    }

    /// Whether the final registry may hold it or not: a failed Register whose
    /// clean-up Deregister did not succeed either.
    pub fn undecided(&self) -> bool {
        self.crashed.is_none()
            && self.dereg_acked.is_none()
            && (self.failed || self.dereg_requested.is_some())
    }
}

/// Every registration the load made, and what writes cost.
#[derive(Debug, Default)]
pub struct Ledger {
    /// By instance key.
    pub regs: BTreeMap<InstKey, Reg>,
    /// Latency of each successful write, retries included.
    pub write_latencies: Vec<Duration>,
    /// Writes retried at least once.
    pub retried_writes: usize,
}

impl Ledger {
    /// A Register is about to be sent.
    pub fn attempt(&mut self, key: &InstKey, client: &str, servers: &[usize]) {
        self.regs.entry(key.clone()).or_insert_with(|| Reg {
            client: client.to_string(),
            servers: servers.to_vec(),
            attempted: Instant::now(),
            acked: None,
            acked_via: None,
            failed: false,
            dereg_requested: None,
            dereg_acked: None,
            dereg_via: None,
            crashed: None,
            dereg_not_found: false,
        });
    }

    /// The Register was applied; `via` is the client's home node then.
    pub fn acked(&mut self, key: &InstKey, via: Option<String>) {
        if let Some(r) = self.regs.get_mut(key) {
            r.acked.get_or_insert_with(Instant::now);
            r.acked_via = via;
        }
    }

    /// The Register gave up.
    pub fn failed(&mut self, key: &InstKey) {
        if let Some(r) = self.regs.get_mut(key) {
            r.failed = true;
        }
    }

    /// A Deregister is about to be sent.
    pub fn dereg_requested(&mut self, key: &InstKey) {
        if let Some(r) = self.regs.get_mut(key) {
            r.dereg_requested.get_or_insert_with(Instant::now);
        }
    }

    /// The Deregister was answered; `via` is the client's home node then.
    pub fn dereg_acked(&mut self, key: &InstKey, via: Option<String>) {
        if let Some(r) = self.regs.get_mut(key) {
            r.dereg_acked.get_or_insert_with(Instant::now);
            r.dereg_via = via;
        }
    }

    /// Client `client` crashed now.
    pub fn crashed(&mut self, client: &str) {
        let now = Instant::now();
        for r in self.regs.values_mut().filter(|r| r.client == client) {
            r.crashed.get_or_insert(now);
        }
    }

    /// The instances the final registry must hold.
    pub fn expected_final(&self) -> Vec<&InstKey> {
        self.regs
            .iter()
            .filter(|(_, r)| r.live())
            .map(|(k, _)| k)
            .collect()
    }
}

/// What the checkers found, deduplicated: one entry per (kind, where, what) with the
/// first time it was seen and how often.
#[derive(Debug, Default, Clone)]
pub struct Violations {
    entries: BTreeMap<(String, String, String), Entry>,
}

#[derive(Debug, Clone)]
struct Entry {
    first_ms: u64,
    last_ms: u64,
    count: usize,
    detail: String,
}

impl Violations {
    /// Records one finding of `kind` at `place` about `what`, at `ms` since the start.
    pub fn add(&mut self, kind: &str, place: &str, what: &str, ms: u64, detail: String) {
        let e = self
            .entries
            .entry((kind.to_string(), place.to_string(), what.to_string()))
            .or_insert(Entry {
                first_ms: ms,
                last_ms: ms,
                count: 0,
                detail,
            });
        e.count += 1;
        e.last_ms = ms;
    }

    /// True when nothing was found.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Distinct findings.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Distinct findings per kind.
    pub fn by_kind(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for (kind, _, _) in self.entries.keys() {
            *out.entry(kind.clone()).or_insert(0) += 1;
        }
        out
    }

    /// A readable list, at most `max` entries, taking from every kind in turn so
    /// that each kind shows.
    pub fn render(&self, max: usize) -> String {
        let mut by_kind: BTreeMap<&str, Vec<_>> = BTreeMap::new();
        for (key, e) in &self.entries {
            by_kind.entry(key.0.as_str()).or_default().push((key, e));
        }
        let mut picked = Vec::new();
        let mut round = 0;
        while picked.len() < max.min(self.entries.len()) {
            for list in by_kind.values() {
                if let Some(item) = list.get(round) {
                    if picked.len() < max {
                        picked.push(*item);
                    }
                }
            }
            round += 1;
        }
        picked.sort_by(|a, b| a.0.cmp(b.0));
        let mut s = String::new();
        for ((kind, place, what), e) in picked {
            let _ = writeln!(
                s,
                "  [{kind}] {place}: {what} (+{} ms .. +{} ms, {}x) {}",
                e.first_ms, e.last_ms, e.count, e.detail
            );
        }
        if self.entries.len() > max {
            let _ = writeln!(s, "  ... and {} more", self.entries.len() - max);
        }
        s
    }
}
