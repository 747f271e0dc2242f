//! The replicated form of the registry: version stamps, operations, tombstones,
//! digests and snapshots.
//!
//! Every instance and every service's settings carry a [`Stamp`], assigned by the node
//! that made the change (the service's owner) from a hybrid logical clock. Copies merge
//! record by record, last writer wins: an operation applies when its stamp is above the
//! stamp the record has here, live or deleted. Deletions leave tombstones, so that an
//! older write arriving late cannot bring a deleted instance back; tombstones are
//! dropped after [`ReplicationSettings::tombstone_ttl_ms`].
//!
//! Merging is idempotent and commutative: applying the same set of operations in any
//! order, with any duplicates, gives the same [`Registry::dump_replicated`].

use std::net::IpAddr;
use std::ops::Bound;

use foldhash::HashMap;
use serde::{Deserialize, Serialize};

use crate::compact::Key;
use crate::error::StorageError;
use crate::model::*;
use crate::registry::{Change, Registry};
use crate::validate::{
    validate_address, validate_instance_state, validate_name, validate_service_key,
    validate_service_meta, NameKind,
};

/// The version of a record: a hybrid logical clock value and the origin that assigned
/// it. Ordered by `(time, origin)`, so two different writers never tie.
///
/// `time` is `max(now_ms << 16, last + 1)` on the writer, where `last` is the highest
/// time the writer has made or seen: its upper 48 bits are milliseconds, its lower 16
/// a counter, and it never goes backwards even if the wall clock does.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct Stamp {
    /// Hybrid logical clock value.
    pub time: u64,
    /// Stable hash of the writer's node id ([`origin_of`]); breaks ties.
    pub origin: u64,
}

impl Stamp {
    /// The version of a record that never existed; below every real stamp.
    pub const ZERO: Stamp = Stamp { time: 0, origin: 0 };

    /// The milliseconds part of the stamp (`time >> 16`), for lag metrics.
    pub fn millis(&self) -> u64 {
        self.time >> 16
    }
}

/// The largest milliseconds value a stamp holds (2^48 - 1, about year 10889).
const MAX_STAMP_MS: u64 = (1 << 48) - 1;

/// The origin of a node: the stable 64-bit hash of its id.
pub fn origin_of(node: &NodeId) -> u64 {
    let mut h = Fnv::new();
    h.str(&node.0);
    h.finish()
}

/// One instance record as replication carries it: live (`state` is `Some`) or deleted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstanceOp {
    /// The service.
    pub service: ServiceKey,
    /// The instance.
    pub key: InstanceKey,
    /// Its version.
    pub stamp: Stamp,
    /// The instance, or `None` for a tombstone. Its `stamp` (local revision) and
    /// `last_beat_ms` are local to each node and ignored on receipt.
    pub state: Option<Instance>,
    /// For a Ttl instance that expiry marked unhealthy: the health its client last
    /// declared (restored by the next beat on whichever node owns it then).
    #[serde(default)]
    pub lapsed: Option<bool>,
    /// True when the instance was deleted by liveness (session end, Ttl expiry) rather
    /// than by its client; the session's home may re-assert it if the session is alive.
    #[serde(default)]
    pub reaped: bool,
}

/// A service's settings as replication carries them. Default settings act as the
/// settings' tombstone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetaOp {
    /// The service.
    pub service: ServiceKey,
    /// The settings' version.
    pub stamp: Stamp,
    /// The settings.
    pub meta: ServiceMeta,
}

/// One replicated change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// An instance was written or deleted.
    Instance(InstanceOp),
    /// A service's settings were written.
    Meta(MetaOp),
}

impl Op {
    /// The service the operation is about.
    pub fn service(&self) -> &ServiceKey {
        match self {
            Op::Instance(op) => &op.service,
            Op::Meta(op) => &op.service,
        }
    }

    /// The operation's version.
    pub fn stamp(&self) -> Stamp {
        match self {
            Op::Instance(op) => op.stamp,
            Op::Meta(op) => op.stamp,
        }
    }
}

/// Everything a registry holds about one service, tombstones included: what snapshots
/// and anti-entropy repairs carry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceRecord {
    /// The service.
    pub service: ServiceKey,
    /// Its operations: the settings (if they were ever set), then each instance, live
    /// or deleted.
    pub ops: Vec<Op>,
}

/// A service as every copy must agree on it: [`Registry::dump_replicated`].
///
/// Node-local fields are left out: each instance's `stamp` (local revision) and
/// `last_beat_ms` read 0. Tombstones are left out too (each node drops them on its own
/// schedule).
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicatedService {
    /// The service.
    pub key: ServiceKey,
    /// The settings' version, [`Stamp::ZERO`] for default settings.
    pub meta_stamp: Stamp,
    /// The settings.
    pub meta: ServiceMeta,
    /// The live instances with their versions, sorted by key.
    pub instances: Vec<(Stamp, Instance)>,
}

/// How a registry takes part in replication. See [`Registry::set_replication`].
#[derive(Clone, Debug)]
pub struct ReplicationSettings {
    /// This node's [`origin_of`]; goes into every stamp it assigns.
    pub origin: u64,
    /// The ring position of a service's `placement_bytes`: must be the ring's own
    /// function (`shoal_ring::position`), so that range digests cover ring arcs.
    pub placement: fn(&[u8]) -> u64,
    /// How long a tombstone is kept, in ms of the caller's clock.
    pub tombstone_ttl_ms: u64,
    /// Whether local writes record the operations to replicate ([`Registry::take_ops`]).
    pub record_ops: bool,
}

impl Default for ReplicationSettings {
    /// Origin 0, placement by [`stable_hash`], tombstones kept 60 s, no op recording.
    fn default() -> Self {
        ReplicationSettings {
            origin: 0,
            placement: stable_hash,
            tombstone_ttl_ms: 60_000,
            record_ops: false,
        }
    }
}

/// A deleted record: its version and when this node deleted it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Tomb {
    pub(crate) stamp: Stamp,
    pub(crate) deleted_at_ms: u64,
    /// Deleted by liveness (session end, Ttl expiry) rather than by the client.
    pub(crate) reaped: bool,
}

/// The tombstones of one service.
#[derive(Clone, Debug, Default)]
pub(crate) struct Tombs {
    pub(crate) instances: HashMap<Key, Tomb>,
    /// The version of default settings, when they were set explicitly.
    pub(crate) meta: Option<Tomb>,
}

impl Tombs {
    pub(crate) fn is_empty(&self) -> bool {
        self.instances.is_empty() && self.meta.is_none()
    }
}

/// FNV-1a 64 over explicit bytes, with the MurmurHash3 `fmix64` finalizer. Stable
/// across platforms and Rust versions (unlike `std`'s `DefaultHasher`).
pub(crate) struct Fnv(u64);

impl Fnv {
    pub(crate) fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    pub(crate) fn bytes(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
    /// A length-prefixed string, so that adjacent strings cannot run into each other.
    pub(crate) fn str(&mut self, s: &str) {
        self.bytes(&(s.len() as u32).to_le_bytes());
        self.bytes(s.as_bytes());
    }
    pub(crate) fn finish(&self) -> u64 {
        fmix64(self.0)
    }
}

fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// The stable 64-bit hash of `bytes` (FNV-1a 64 then `fmix64`).
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h = Fnv::new();
    h.bytes(bytes);
    h.finish()
}

/// The digest contribution of one live instance record.
pub(crate) fn instance_hash(cluster: &str, ip: &str, port: u16, stamp: Stamp) -> u64 {
    let mut h = Fnv::new();
    h.bytes(&[1]);
    h.str(cluster);
    h.str(ip);
    h.bytes(&port.to_le_bytes());
    h.u64(stamp.time);
    h.u64(stamp.origin);
    h.finish()
}

/// The digest contribution of a service's (non-default) settings.
pub(crate) fn meta_hash(stamp: Stamp) -> u64 {
    let mut h = Fnv::new();
    h.bytes(&[2]);
    h.u64(stamp.time);
    h.u64(stamp.origin);
    h.finish()
}

/// A service's digest from the sum of its record hashes: 0 when it holds nothing live.
pub(crate) fn service_digest(key: &ServiceKey, sum: u64) -> u64 {
    if sum == 0 {
        return 0;
    }
    let mut h = Fnv::new();
    h.str(&key.namespace);
    h.str(&key.group);
    h.str(&key.service);
    h.u64(sum);
    h.finish()
}

/// Whether `pos` lies in the ring arc `start..=end` (wrapping when `start > end`).
pub fn in_arc(start: u64, end: u64, pos: u64) -> bool {
    if start <= end {
        (start..=end).contains(&pos)
    } else {
        pos >= start || pos <= end
    }
}

impl Registry {
    /// Turns on replication: stamps carry `settings.origin`, digests place services with
    /// `settings.placement`, and (with `record_ops`) every local write records the
    /// operations that [`Registry::take_ops`] hands to the replication engine.
    pub fn set_replication(&mut self, settings: ReplicationSettings) {
        self.repl = settings;
        self.rebuild_placed();
    }

    /// The replication settings.
    pub fn replication(&self) -> &ReplicationSettings {
        &self.repl
    }

    /// The operations recorded by local writes since the last call, oldest first.
    pub fn take_ops(&mut self) -> Vec<Op> {
        std::mem::take(&mut self.outbox)
    }

    /// The highest clock value this registry has assigned or seen.
    pub fn clock(&self) -> u64 {
        self.hlc
    }

    /// Moves the clock past `stamp` (a stamp seen from elsewhere), so that the next
    /// local write wins over it.
    pub fn observe(&mut self, stamp: Stamp) {
        self.hlc = self.hlc.max(stamp.time);
    }

    /// A new stamp from the hybrid logical clock.
    pub fn next_version(&mut self, now_ms: u64) -> Stamp {
        self.note_now(now_ms);
        let time = (now_ms.min(MAX_STAMP_MS) << 16).max(self.hlc.saturating_add(1));
        self.hlc = time;
        Stamp {
            time,
            origin: self.repl.origin,
        }
    }

    /// The ring position of a service under the configured placement.
    pub fn placement_of(&self, service: &ServiceKey) -> u64 {
        service.with_placement_bytes(|b| (self.repl.placement)(b))
    }

    /// The version of an instance here: live, deleted, or [`Stamp::ZERO`] if unknown.
    pub fn instance_version(&self, service: &ServiceKey, key: &InstanceKey) -> Stamp {
        self.version_at(service, self.find_key(key))
    }

    /// The version of the instance at compact key `k`; `None` (a key whose cluster name
    /// is not held) is neither live nor deleted.
    fn version_at(&self, service: &ServiceKey, k: Option<Key>) -> Stamp {
        let Some(k) = k else {
            return Stamp::ZERO;
        };
        if let Some(slot) = self.services.get(service).and_then(|e| e.instances.get(&k)) {
            return slot.version;
        }
        self.tombs
            .get(service)
            .and_then(|t| t.instances.get(&k))
            .map_or(Stamp::ZERO, |t| t.stamp)
    }

    /// The version of a service's settings here ([`Stamp::ZERO`] if never set).
    pub fn meta_version(&self, service: &ServiceKey) -> Stamp {
        let live = self
            .services
            .get(service)
            .map_or(Stamp::ZERO, |e| e.meta_stamp);
        let dead = self
            .tombs
            .get(service)
            .and_then(|t| t.meta)
            .map_or(Stamp::ZERO, |t| t.stamp);
        live.max(dead)
    }

    /// One live instance (`key` with its ip in canonical form).
    pub fn instance(&self, service: &ServiceKey, key: &InstanceKey) -> Option<Instance> {
        self.find_slot(service, key)
            .map(|(_, k, slot)| self.materialize(&k, slot))
    }

    /// The session of a live instance held with a session lease, without building the
    /// instance.
    pub fn instance_session(&self, service: &ServiceKey, key: &InstanceKey) -> Option<SessionId> {
        let (_, _, slot) = self.find_slot(service, key)?;
        match slot.ttl() {
            Some(_) => None,
            None => Some(self.index.sessions.session(slot.session)),
        }
    }

    /// Number of tombstones held (instances and settings).
    pub fn tombstone_count(&self) -> usize {
        self.tomb_total
    }

    /// Checks a remote operation before anything is applied.
    fn check_op(&self, op: &Op) -> Result<(), StorageError> {
        match op {
            Op::Instance(op) => self.check_instance_op(op).map(|_| ()),
            Op::Meta(op) => self.check_meta_op(op),
        }
    }

    /// Checks a remote instance operation; returns its address, parsed (once: the
    /// version look-up and the store take it from here).
    fn check_instance_op(&self, op: &InstanceOp) -> Result<IpAddr, StorageError> {
        validate_service_key(&op.service, &self.limits)?;
        let (addr, text) =
            validate_address(&op.key.cluster, &op.key.ip, op.key.port, &self.limits)?;
        if text != op.key.ip.as_str() {
            return Err(StorageError::InvalidIp(op.key.ip.clone()));
        }
        if let Some(inst) = &op.state {
            if inst.ip != op.key.ip || inst.port != op.key.port || inst.cluster != op.key.cluster {
                return Err(StorageError::InvalidSetting(format!(
                    "operation for {} carries instance {}",
                    op.key,
                    inst.key()
                )));
            }
            // Its address is the key's, checked above.
            validate_instance_state(inst, &self.limits)?;
        }
        Ok(addr)
    }

    /// Checks a remote settings operation.
    fn check_meta_op(&self, op: &MetaOp) -> Result<(), StorageError> {
        validate_service_key(&op.service, &self.limits)?;
        validate_service_meta(&op.meta, &self.limits)
    }

    /// Applies an operation from another node if it is newer than what this registry
    /// holds for the record; returns the change when the visible state changed.
    ///
    /// Idempotent and commutative. Does not record operations (they are not local
    /// writes). Creates the operation's namespace if this node does not have it: every
    /// node holds every namespace's data. On error (a malformed operation) nothing
    /// changes.
    pub fn apply_remote(&mut self, op: Op, now_ms: u64) -> Result<Option<Change>, StorageError> {
        match op {
            Op::Instance(op) => {
                let addr = self.check_instance_op(&op)?;
                self.admit(&op.service, op.stamp, now_ms)?;
                Ok(self.apply_instance_op(op, addr, now_ms))
            }
            Op::Meta(op) => {
                self.check_meta_op(&op)?;
                self.admit(&op.service, op.stamp, now_ms)?;
                Ok(self.apply_meta_op(op, now_ms))
            }
        }
    }

    /// What every checked remote operation does before it is applied: the clocks
    /// observe it, and its namespace is created if this node lacks it.
    fn admit(
        &mut self,
        service: &ServiceKey,
        stamp: Stamp,
        now_ms: u64,
    ) -> Result<(), StorageError> {
        self.note_now(now_ms);
        self.observe(stamp);
        let ns = &service.namespace;
        if !self.namespaces.contains(ns) {
            validate_name(NameKind::Namespace, ns, &self.limits)?;
            self.namespaces.insert(ns.clone());
        }
        Ok(())
    }

    /// `addr` is the operation's address, parsed.
    fn apply_instance_op(&mut self, op: InstanceOp, addr: IpAddr, now_ms: u64) -> Option<Change> {
        let k = self.clusters.find(&op.key.cluster).map(|cluster| Key {
            cluster,
            ip: addr,
            port: op.key.port,
        });
        if op.stamp <= self.version_at(&op.service, k) {
            return None;
        }
        let service = op.service;
        match op.state {
            Some(mut inst) => {
                let revision = self.bump_revision();
                inst.stamp = revision;
                // Liveness of a Ttl instance is judged by its owner; a copy counts from
                // when it heard of the instance, so a new owner gives it a full lease.
                inst.last_beat_ms = now_ms;
                let lapsed = match inst.lease {
                    Lease::Ttl(_) => op.lapsed,
                    Lease::Session(_) => None,
                };
                let metadata = std::mem::take(&mut inst.metadata);
                self.put_live(&service, &inst, metadata, addr, op.stamp, lapsed, revision);
                Some(Change {
                    key: service,
                    revision,
                })
            }
            None => {
                let removed = self.kill(&service, &op.key, op.stamp, now_ms, op.reaped);
                let change = removed.then(|| {
                    let revision = self.bump_revision();
                    self.set_revision(&service, revision);
                    Change {
                        key: service.clone(),
                        revision,
                    }
                });
                self.settle(&service);
                change
            }
        }
    }

    fn apply_meta_op(&mut self, op: MetaOp, now_ms: u64) -> Option<Change> {
        if op.stamp <= self.meta_version(&op.service) {
            return None;
        }
        let current = self
            .services
            .get(&op.service)
            .map(|e| e.meta.clone())
            .unwrap_or_default();
        let visible = current != op.meta;
        self.put_meta(&op.service, op.meta, op.stamp, now_ms);
        let change = visible.then(|| {
            let revision = self.bump_revision();
            self.set_revision(&op.service, revision);
            Change {
                key: op.service.clone(),
                revision,
            }
        });
        self.settle(&op.service);
        change
    }

    /// Applies every operation of a record (see [`Registry::apply_remote`]); returns one
    /// change for the service if anything visible changed. All operations are checked
    /// first: on error nothing changes.
    pub fn apply_record(
        &mut self,
        record: ServiceRecord,
        now_ms: u64,
    ) -> Result<Option<Change>, StorageError> {
        for op in &record.ops {
            if op.service() != &record.service {
                return Err(StorageError::InvalidSetting(format!(
                    "record of {} holds an operation of {}",
                    record.service,
                    op.service()
                )));
            }
            self.check_op(op)?;
        }
        let mut last = None;
        for op in record.ops {
            if let Some(c) = self.apply_remote(op, now_ms)? {
                last = Some(c);
            }
        }
        Ok(last)
    }

    /// The digest of one service: a stable hash over the versions of its live
    /// instances and settings; 0 when it holds nothing live. Tombstones are left out, so
    /// that copies that dropped them at different times still agree.
    pub fn service_digest(&self, service: &ServiceKey) -> u64 {
        self.services
            .get(service)
            .map_or(0, |e| service_digest(service, e.sum))
    }

    /// The digest of the ring arc `start..=end` (wrapping when `start > end`): the
    /// wrapping sum of the digests of the services placed in it.
    pub fn range_digest(&self, start: u64, end: u64) -> u64 {
        self.placed_in(start, end)
            .fold(0u64, |acc, k| acc.wrapping_add(self.service_digest(k)))
    }

    /// The services placed in the arc `start..=end` (those with live data or
    /// tombstones), with their digests, in ring order.
    pub fn service_digests_in(&self, start: u64, end: u64) -> Vec<(ServiceKey, u64)> {
        self.placed_in(start, end)
            .map(|k| (k.clone(), self.service_digest(k)))
            .collect()
    }

    /// When a service last changed here: its latest visible change or deletion (ms of
    /// the registry's clock; 0 if it holds nothing of it).
    pub fn changed_ms(&self, service: &ServiceKey) -> u64 {
        let live = self.services.get(service).map_or(0, |e| e.changed_ms);
        let dead = self.tombs.get(service).map_or(0, |t| {
            t.instances
                .values()
                .chain(t.meta.iter())
                .map(|t| t.deleted_at_ms)
                .max()
                .unwrap_or(0)
        });
        live.max(dead)
    }

    /// How many services with live data (instances or settings) are placed in the arc
    /// `start..=end`: no allocation, for gauges.
    pub fn live_services_in(&self, start: u64, end: u64) -> usize {
        self.placed_in(start, end)
            .filter(|k| self.services.contains_key(*k))
            .count()
    }

    /// The services placed in the arc `start..=end`, in ring order.
    fn placed_in(&self, start: u64, end: u64) -> impl Iterator<Item = &ServiceKey> + '_ {
        let lower = |from: u64| {
            self.placed
                .range((from, ServiceKey::new("", "", ""))..)
                .map(|(p, k)| (*p, k))
        };
        let (first, second): (Box<dyn Iterator<Item = _>>, Box<dyn Iterator<Item = _>>) =
            if start <= end {
                (
                    Box::new(lower(start).take_while(move |(p, _)| *p <= end)),
                    Box::new(std::iter::empty()),
                )
            } else {
                (
                    Box::new(lower(start)),
                    Box::new(lower(0).take_while(move |(p, _)| *p <= end)),
                )
            };
        first.chain(second).map(|(_, k)| k)
    }

    /// Everything this registry holds about a service, tombstones included; `None` if
    /// nothing.
    pub fn record(&self, service: &ServiceKey) -> Option<ServiceRecord> {
        let entry = self.services.get(service);
        let tombs = self.tombs.get(service);
        if entry.is_none() && tombs.is_none() {
            return None;
        }
        let mut ops = Vec::new();
        let meta_stamp = self.meta_version(service);
        if meta_stamp != Stamp::ZERO {
            ops.push(Op::Meta(MetaOp {
                service: service.clone(),
                stamp: meta_stamp,
                meta: entry.map(|e| e.meta.clone()).unwrap_or_default(),
            }));
        }
        if let Some(e) = entry {
            for (slot, inst) in self.sorted_instances(e) {
                ops.push(Op::Instance(InstanceOp {
                    service: service.clone(),
                    key: inst.key(),
                    stamp: slot.version,
                    lapsed: slot.lapsed(),
                    state: Some(inst),
                    reaped: false,
                }));
            }
        }
        if let Some(t) = tombs {
            let mut dead: Vec<(InstanceKey, &Tomb)> = t
                .instances
                .iter()
                .map(|(k, tomb)| (self.public_key(k), tomb))
                .collect();
            dead.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            for (key, tomb) in dead {
                ops.push(Op::Instance(InstanceOp {
                    service: service.clone(),
                    key,
                    stamp: tomb.stamp,
                    state: None,
                    lapsed: None,
                    reaped: tomb.reaped,
                }));
            }
        }
        Some(ServiceRecord {
            service: service.clone(),
            ops,
        })
    }

    /// The records of the given services that exist here.
    pub fn records_of(&self, services: &[ServiceKey]) -> Vec<ServiceRecord> {
        services.iter().filter_map(|s| self.record(s)).collect()
    }

    /// The records of every service placed in the given arcs `(start, end)`.
    pub fn records_in(&self, ranges: &[(u64, u64)]) -> Vec<ServiceRecord> {
        ranges
            .iter()
            .flat_map(|&(s, e)| self.placed_in(s, e))
            .filter_map(|k| self.record(k))
            .collect()
    }

    /// Up to `max` records (at least 1), in ring order, after the service `after`
    /// (from the start when `None`), and the cursor of the next chunk (`None` after the
    /// last). The chunk also ends once its records hold `max_ops` operations or more, so
    /// that a chunk of large services stays a moderate message. Streams a full snapshot
    /// without holding it all.
    pub fn snapshot_chunk(
        &self,
        after: Option<&ServiceKey>,
        max: usize,
        max_ops: usize,
    ) -> (Vec<ServiceRecord>, Option<ServiceKey>) {
        let max = max.max(1);
        let start = match after {
            Some(k) => Bound::Excluded((self.placement_of(k), k.clone())),
            None => Bound::Unbounded,
        };
        let mut keys = self.placed.range((start, Bound::Unbounded)).peekable();
        let mut records: Vec<ServiceRecord> = Vec::new();
        let mut ops = 0;
        let mut last = None;
        while records.len() < max && ops < max_ops.max(1) {
            let Some((_, k)) = keys.next() else { break };
            last = Some(k.clone());
            if let Some(r) = self.record(k) {
                ops += r.ops.len();
                records.push(r);
            }
        }
        let next = if keys.peek().is_some() { last } else { None };
        (records, next)
    }

    /// Every service as all copies must agree on it, sorted by key. Two registries that
    /// applied the same operations give equal answers; see [`ReplicatedService`].
    pub fn dump_replicated(&self) -> Vec<ReplicatedService> {
        self.by_name
            .iter()
            .map(|key| (key, &self.services[key]))
            .map(|(key, e)| ReplicatedService {
                key: key.clone(),
                meta_stamp: e.meta_stamp,
                meta: e.meta.clone(),
                instances: self
                    .sorted_instances(e)
                    .into_iter()
                    .map(|(slot, mut inst)| {
                        inst.stamp = 0;
                        inst.last_beat_ms = 0;
                        (slot.version, inst)
                    })
                    .collect(),
            })
            .collect()
    }

    /// Drops the tombstones older than `tombstone_ttl_ms`; returns how many.
    pub fn gc_tombstones(&mut self, now_ms: u64) -> usize {
        let ttl = self.repl.tombstone_ttl_ms;
        let mut dropped = 0;
        // In the order the tombstones were made. One made after the clock went back,
        // dated earlier than those before it, waits behind them: late, never early.
        while let Some((at, _, _)) = self.tomb_gc.front() {
            if at.saturating_add(ttl) > now_ms {
                break;
            }
            let (at, key, service) = self.tomb_gc.pop_front().expect("checked above");
            // Only the tombstone this entry was made for: one dropped since (the
            // instance came back) or made again later has gone or carries another date.
            let Some(t) = self.tombs.get_mut(&service) else {
                continue;
            };
            match key {
                Some(k) => {
                    if t.instances.get(&k).is_none_or(|t| t.deleted_at_ms != at) {
                        continue;
                    }
                    t.instances.remove(&k);
                    self.clusters.release(k.cluster);
                    crate::registry::shrink(&mut t.instances);
                }
                None => {
                    if t.meta.is_none_or(|t| t.deleted_at_ms != at) {
                        continue;
                    }
                    t.meta = None;
                }
            }
            if t.is_empty() {
                self.tombs.remove(&service);
            }
            self.tomb_total -= 1;
            self.settle(&service);
            dropped += 1;
        }
        if self.tomb_gc.capacity() > 1024 && self.tomb_gc.len() < self.tomb_gc.capacity() / 4 {
            self.tomb_gc.shrink_to(self.tomb_gc.len() * 2);
        }
        dropped
    }

    /// The sessions that have instances here.
    pub fn sessions(&self) -> Vec<SessionId> {
        self.index.sessions.ids().collect()
    }

    /// Whether `session` holds instances here.
    pub fn holds_session(&self, session: SessionId) -> bool {
        self.index.sessions.get(session).is_some()
    }

    /// Changes whenever a session starts or stops holding instances here (see
    /// [`Registry::sessions`]); never takes the same value twice in a process.
    pub fn session_set_generation(&self) -> u64 {
        self.index.sessions.generation
    }

    /// Changes whenever a service's digest, the set of services with live data or
    /// their placement changes: range digests and counts of live services taken at
    /// the same generation are still valid. Never takes the same value twice in a
    /// process.
    pub fn content_generation(&self) -> u64 {
        self.content_generation
    }

    /// The services where `session` has instances, sorted.
    pub fn session_services(&self, session: SessionId) -> Vec<ServiceKey> {
        let Some(s) = self.index.sessions.get(session) else {
            return Vec::new();
        };
        let ids: std::collections::BTreeSet<u32> = s.members().map(|(id, _)| *id).collect();
        let mut out: Vec<ServiceKey> = ids
            .into_iter()
            .map(|id| self.service_key(id).clone())
            .collect();
        out.sort();
        out
    }

    /// Restarts the lease of every Ttl instance of the services `filter` selects, as if
    /// each had just beaten (no change, no stamp). For a node that just became the owner
    /// of those services: it did not see the beats that went to the previous owner.
    pub fn refresh_ttl_leases(&mut self, filter: &dyn Fn(&ServiceKey) -> bool, now_ms: u64) {
        let due: Vec<(ServiceKey, Key)> = self
            .index
            .deadlines
            .iter()
            .map(|(_, id, k)| (self.service_key(*id), *k))
            .filter(|(s, _)| filter(s))
            .map(|(s, k)| (s.clone(), k))
            .collect();
        for (service, k) in due {
            self.touch_ttl(&service, k, now_ms);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Limits;
    use std::collections::BTreeMap;

    /// A small deterministic generator (splitmix64) for the randomized tests.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// The seed of a randomized test: `SHOAL_TEST_SEED` if set, else a fixed one.
    /// Printed, so that a failure can be replayed.
    fn test_seed(default: u64) -> u64 {
        let seed = std::env::var("SHOAL_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default);
        eprintln!("SHOAL_TEST_SEED={seed}");
        seed
    }

    fn writer(origin: u64) -> Registry {
        let mut r = Registry::new(Limits::default());
        r.set_replication(ReplicationSettings {
            origin,
            record_ops: true,
            ..ReplicationSettings::default()
        });
        r
    }

    fn replica() -> Registry {
        writer(99)
    }

    /// A writer (origin 1) whose tombstones last `ttl_ms`.
    fn writer_keeping_tombstones_for(ttl_ms: u64) -> Registry {
        let mut w = writer(1);
        w.set_replication(ReplicationSettings {
            origin: 1,
            tombstone_ttl_ms: ttl_ms,
            record_ops: true,
            ..ReplicationSettings::default()
        });
        w
    }

    fn svc(name: &str) -> ServiceKey {
        ServiceKey::named(name)
    }

    fn ikey(ip: &str) -> InstanceKey {
        InstanceSpec::new(ip, 80).key()
    }

    fn digests(r: &Registry) -> (u64, u64, u64) {
        (
            r.range_digest(0, u64::MAX),
            r.range_digest(1 << 63, 1 << 62),
            r.range_digest(1 << 62, 1 << 63),
        )
    }

    /// Random writes by two owners (as on the two sides of a partition); every copy
    /// that applies all their operations, in any order and with duplicates, ends up
    /// equal, and the writers converge too once they exchange operations.
    #[test]
    fn any_order_with_duplicates_converges() {
        let seed = test_seed(7);
        let mut rng = Rng(seed);
        let mut writers = [writer(1), writer(2)];
        let mut ops: Vec<Op> = Vec::new();
        let mut now = 1_000u64;
        for _ in 0..2_000 {
            now += rng.below(50);
            let w = &mut writers[rng.below(2) as usize];
            let s = svc(&format!("s{}", rng.below(5)));
            let ip = format!("10.0.0.{}", rng.below(6));
            let session = SessionId(u128::from(rng.below(3) as u8));
            match rng.below(9) {
                0..=2 => {
                    let mut sp = InstanceSpec::new(&ip, 80);
                    if rng.below(2) == 0 {
                        sp.ttl = Some(TtlLease::default());
                    }
                    sp.weight = rng.below(100) as f64;
                    w.register(&s, sp, session, now).unwrap();
                }
                3 => {
                    let mut sp = InstanceSpec::new(&ip, 80);
                    sp.healthy = rng.below(2) == 0;
                    let _ = w.update(&s, sp, now);
                }
                4 => {
                    let _ = w.deregister_at(&s, &ikey(&ip), now);
                }
                5 => {
                    w.remove_session(session);
                }
                6 => {
                    now += rng.below(40_000);
                    w.expire(now);
                }
                7 => {
                    let _ = w.beat(&s, &ikey(&ip), now);
                }
                _ => {
                    let meta = ServiceMeta {
                        protect_threshold: [0.0, 0.5][rng.below(2) as usize],
                        ..ServiceMeta::default()
                    };
                    w.set_service_meta(&s, meta).unwrap();
                }
            }
            w.check_invariants();
            ops.extend(w.take_ops());
        }
        let mut copies = Vec::new();
        for _ in 0..3 {
            let mut r = replica();
            let mut shuffled = ops.clone();
            for i in (1..shuffled.len()).rev() {
                shuffled.swap(i, rng.below(i as u64 + 1) as usize);
            }
            let dups: Vec<Op> = (0..200)
                .map(|_| ops[rng.below(ops.len() as u64) as usize].clone())
                .collect();
            for op in shuffled.into_iter().chain(dups) {
                r.apply_remote(op, now).unwrap();
            }
            r.check_invariants();
            copies.push(r);
        }
        // The writers merge each other's operations.
        for op in &ops {
            for w in writers.iter_mut() {
                w.apply_remote(op.clone(), now).unwrap();
            }
        }
        let expected = copies[0].dump_replicated();
        assert!(!expected.is_empty());
        for r in copies.iter().chain(writers.iter()) {
            r.check_invariants();
            assert_eq!(r.dump_replicated(), expected);
            assert_eq!(digests(r), digests(&copies[0]));
        }
    }

    #[test]
    fn a_late_older_write_does_not_resurrect() {
        let mut w = writer(1);
        let s = svc("orders");
        w.register(&s, InstanceSpec::new("10.0.0.1", 80), SessionId(1), 10)
            .unwrap();
        w.deregister_at(&s, &ikey("10.0.0.1"), 20).unwrap();
        let ops = w.take_ops();
        assert_eq!(ops.len(), 2);
        let mut r = replica();
        // The deletion first, then the registration it deleted.
        assert_eq!(r.apply_remote(ops[1].clone(), 30).unwrap(), None);
        assert_eq!(r.apply_remote(ops[0].clone(), 31).unwrap(), None);
        assert_eq!(r.instance_count(), 0);
        assert_eq!(r.tombstone_count(), 1);
        assert_eq!(r.instance_version(&s, &ikey("10.0.0.1")), ops[1].stamp());
        r.check_invariants();
    }

    #[test]
    fn stamps_are_monotonic_and_follow_what_was_seen() {
        let mut a = writer(1);
        let s1 = a.next_version(100);
        let s2 = a.next_version(100);
        let s3 = a.next_version(50); // the wall clock went back
        assert!(s1 < s2 && s2 < s3);
        assert_eq!(s1.millis(), 100);
        let mut b = writer(2);
        b.observe(Stamp {
            time: 500 << 16,
            origin: 1,
        });
        assert!(b.next_version(10).millis() >= 500);
    }

    #[test]
    fn a_tombstone_made_again_is_collected_at_its_own_time() {
        let mut w = writer_keeping_tombstones_for(1_000);
        let s = svc("orders");
        let other = svc("billing");
        let spec = || InstanceSpec::new("10.0.0.1", 80);
        // Deleted at 100; back at 200 (the tombstone goes); deleted again at 500.
        w.register(&s, spec(), SessionId(1), 0).unwrap();
        w.deregister_at(&s, &ikey("10.0.0.1"), 100).unwrap();
        w.register(&other, spec(), SessionId(1), 150).unwrap();
        w.deregister_at(&other, &ikey("10.0.0.1"), 150).unwrap();
        w.register(&s, spec(), SessionId(1), 200).unwrap();
        assert_eq!(w.tombstone_count(), 1, "only billing's");
        w.check_invariants();
        w.deregister_at(&s, &ikey("10.0.0.1"), 500).unwrap();
        assert_eq!(w.tombstone_count(), 2);
        w.check_invariants();
        // 1 100: the first deletion's time. Its tombstone went at 200; the one made at
        // 500 stays.
        assert_eq!(w.gc_tombstones(1_100), 0);
        assert_eq!(w.tombstone_count(), 2);
        assert_ne!(w.instance_version(&s, &ikey("10.0.0.1")), Stamp::ZERO);
        assert_eq!(w.changed_ms(&s), 500);
        w.check_invariants();
        assert_eq!(w.gc_tombstones(1_150), 1, "billing's");
        assert_eq!(w.gc_tombstones(1_499), 0);
        assert_eq!(w.gc_tombstones(1_500), 1);
        assert_eq!(w.tombstone_count(), 0);
        assert!(w.record(&s).is_none());
        assert_eq!(w.clusters.len(), 0);
        w.check_invariants();
    }

    #[test]
    fn tombstones_are_collected_after_their_ttl() {
        let mut w = writer_keeping_tombstones_for(1_000);
        let s = svc("orders");
        w.register(&s, InstanceSpec::new("10.0.0.1", 80), SessionId(1), 0)
            .unwrap();
        w.deregister_at(&s, &ikey("10.0.0.1"), 100).unwrap();
        assert_eq!(w.tombstone_count(), 1);
        assert!(w.record(&s).is_some(), "the tombstone is still shipped");
        assert_eq!(w.gc_tombstones(1_099), 0);
        assert_eq!(w.gc_tombstones(1_100), 1);
        assert_eq!(w.tombstone_count(), 0);
        assert!(w.record(&s).is_none());
        // The cluster name went with its last use, the tombstone.
        assert_eq!(w.clusters.len(), 0);
        w.check_invariants();
    }

    #[test]
    fn settings_merge_last_writer_wins() {
        let mut a = writer(1);
        let s = svc("orders");
        let meta = ServiceMeta {
            protect_threshold: 0.5,
            ..ServiceMeta::default()
        };
        a.set_service_meta(&s, meta.clone()).unwrap();
        a.set_service_meta(&s, ServiceMeta::default()).unwrap();
        let ops = a.take_ops();
        let mut r = replica();
        assert!(r.apply_remote(ops[1].clone(), 0).unwrap().is_none());
        assert!(r.apply_remote(ops[0].clone(), 0).unwrap().is_none());
        assert_eq!(r.service_meta(&s), None);
        let mut r2 = replica();
        assert!(r2.apply_remote(ops[0].clone(), 0).unwrap().is_some());
        assert_eq!(r2.service_meta(&s), Some(&meta));
        assert!(r2.apply_remote(ops[1].clone(), 0).unwrap().is_some());
        assert_eq!(r2.dump_replicated(), r.dump_replicated());
        r.check_invariants();
        r2.check_invariants();
    }

    #[test]
    fn malformed_operations_change_nothing() {
        let mut r = replica();
        let s = svc("orders");
        let mut inst_op = InstanceOp {
            service: s.clone(),
            key: ikey("10.0.0.1"),
            stamp: Stamp { time: 5, origin: 1 },
            state: None,
            lapsed: None,
            reaped: false,
        };
        inst_op.key.port = 0;
        assert!(r.apply_remote(Op::Instance(inst_op.clone()), 0).is_err());
        inst_op.key = ikey("0:0::1");
        assert!(r.apply_remote(Op::Instance(inst_op.clone()), 0).is_err());
        inst_op.key = ikey("10.0.0.1");
        let mut w = writer(1);
        w.register(&s, InstanceSpec::new("10.0.0.2", 80), SessionId(1), 0)
            .unwrap();
        inst_op.state = w.instance(&s, &ikey("10.0.0.2"));
        assert!(r.apply_remote(Op::Instance(inst_op.clone()), 0).is_err());
        // A state no client write could make (weight, metadata) is refused as well.
        inst_op.key = ikey("10.0.0.2");
        let good = w.instance(&s, &ikey("10.0.0.2")).unwrap();
        let mut bad = good.clone();
        bad.weight = f64::NAN;
        inst_op.state = Some(bad);
        assert!(r.apply_remote(Op::Instance(inst_op.clone()), 0).is_err());
        let mut bad = good.clone();
        bad.metadata.insert("k".repeat(10_000), "v".into());
        inst_op.state = Some(bad);
        assert!(r.apply_remote(Op::Instance(inst_op.clone()), 0).is_err());
        let bad_ns = Op::Meta(MetaOp {
            service: ServiceKey::new("bad ns", "g", "s"),
            stamp: Stamp { time: 5, origin: 1 },
            meta: ServiceMeta::default(),
        });
        assert!(r.apply_remote(bad_ns, 0).is_err());
        assert!(r.dump_replicated().is_empty());
        assert_eq!(r.clock(), 0);
        // A record with one bad operation applies none of them.
        let mut rec = w.record(&s).unwrap();
        rec.ops.push(Op::Instance(inst_op));
        assert!(r.apply_record(rec, 0).is_err());
        assert!(r.dump_replicated().is_empty());
        // An unknown (valid) namespace is created: every node holds every namespace.
        let mut w2 = writer(1);
        w2.add_namespace("dev").unwrap();
        let k = ServiceKey::new("dev", "g", "s");
        w2.register(&k, InstanceSpec::new("10.0.0.2", 80), SessionId(1), 0)
            .unwrap();
        for op in w2.take_ops() {
            r.apply_remote(op, 0).unwrap();
        }
        assert_eq!(
            r.namespaces(),
            vec!["dev".to_string(), "public".to_string()]
        );
        r.check_invariants();
    }

    /// Malformed operations of a service the replica holds change nothing either.
    #[test]
    fn malformed_operations_of_known_services_change_nothing() {
        let s = svc("orders");
        let mut w = writer(1);
        w.register(&s, InstanceSpec::new("10.0.0.2", 80), SessionId(1), 0)
            .unwrap();
        let mut r = replica();
        for op in w.take_ops() {
            r.apply_remote(op, 0).unwrap();
        }
        let before = r.dump_replicated();
        let good = w.instance(&s, &ikey("10.0.0.2")).unwrap();
        let op = |key: InstanceKey, state: Option<Instance>| {
            Op::Instance(InstanceOp {
                service: s.clone(),
                key,
                stamp: Stamp { time: 9, origin: 1 },
                state,
                lapsed: None,
                reaped: false,
            })
        };
        let mut port0 = ikey("10.0.0.3");
        port0.port = 0;
        let mut nan = good.clone();
        nan.weight = f64::NAN;
        for bad in [
            op(port0, None),
            op(ikey("0:0::1"), None),
            op(ikey("10.0.0.256"), None),
            op(ikey("10.0.0.3"), Some(good.clone())),
            op(ikey("10.0.0.2"), Some(nan)),
        ] {
            assert!(r.apply_remote(bad.clone(), 5).is_err(), "{bad:?}");
        }
        assert_eq!(r.dump_replicated(), before);
        // A valid one still applies.
        let mut moved = good.clone();
        moved.weight = 3.0;
        assert!(r
            .apply_remote(op(ikey("10.0.0.2"), Some(moved)), 5)
            .unwrap()
            .is_some());
        r.check_invariants();
    }

    #[test]
    fn snapshot_chunks_copy_everything() {
        let mut w = writer(1);
        for i in 0..25 {
            let s = svc(&format!("s{i}"));
            w.register(&s, InstanceSpec::new("10.0.0.1", 80), SessionId(1), 0)
                .unwrap();
            if i % 5 == 0 {
                w.deregister_at(&s, &ikey("10.0.0.1"), 1).unwrap();
            }
        }
        let mut r = replica();
        let mut after = None;
        let mut chunks = 0;
        loop {
            let (records, next) = w.snapshot_chunk(after.as_ref(), 4, usize::MAX);
            assert!(records.len() <= 4);
            chunks += 1;
            for rec in records {
                r.apply_record(rec, 5).unwrap();
            }
            match next {
                Some(k) => after = Some(k),
                None => break,
            }
        }
        assert_eq!(chunks, 7);
        assert_eq!(r.dump_replicated(), w.dump_replicated());
        assert_eq!(r.tombstone_count(), 5);
        assert_eq!(digests(&r), digests(&w));
        r.check_invariants();
    }

    #[test]
    fn snapshot_chunks_end_at_the_operation_bound() {
        let mut w = writer(1);
        // 10 services of 7 instances each: 70 operations.
        for i in 0..10 {
            let s = svc(&format!("s{i}"));
            for k in 0..7 {
                w.register(
                    &s,
                    InstanceSpec::new(format!("10.0.0.{k}"), 80),
                    SessionId(1),
                    0,
                )
                .unwrap();
            }
        }
        let mut r = replica();
        let mut after = None;
        let mut sizes = Vec::new();
        loop {
            let (records, next) = w.snapshot_chunk(after.as_ref(), 100, 20);
            // Ends once 20 or more operations are in: 3 services (21 operations).
            sizes.push(records.iter().map(|r| r.ops.len()).sum::<usize>());
            for rec in records {
                r.apply_record(rec, 5).unwrap();
            }
            match next {
                Some(k) => after = Some(k),
                None => break,
            }
        }
        assert_eq!(sizes, vec![21, 21, 21, 7]);
        assert_eq!(r.dump_replicated(), w.dump_replicated());
    }

    /// The generations move with what digests, live-service counts and the set of
    /// sessions depend on, and only then: callers reuse what they computed while a
    /// generation stays.
    #[test]
    fn generations_follow_digests_and_the_set_of_sessions() {
        let mut w = writer(1);
        let (c0, s0) = (w.content_generation(), w.session_set_generation());
        let d0 = digests(&w);
        w.register(
            &svc("a"),
            InstanceSpec::new("10.0.0.1", 80),
            SessionId(1),
            0,
        )
        .unwrap();
        let (c1, s1) = (w.content_generation(), w.session_set_generation());
        assert_ne!(c1, c0);
        assert_ne!(s1, s0);
        assert_ne!(digests(&w), d0);
        assert!(w.holds_session(SessionId(1)));

        // Reads change nothing.
        w.query(&svc("a"), &[], false).unwrap();
        let _ = w.sessions();
        assert_eq!(
            (w.content_generation(), w.session_set_generation()),
            (c1, s1)
        );

        // Another instance of the same session: new content, same sessions.
        w.register(
            &svc("a"),
            InstanceSpec::new("10.0.0.2", 80),
            SessionId(1),
            0,
        )
        .unwrap();
        let c2 = w.content_generation();
        assert_ne!(c2, c1);
        assert_eq!(w.session_set_generation(), s1);

        // The session's last instance goes: both move; a second registry never
        // repeats a value the first one had.
        w.deregister(&svc("a"), &ikey("10.0.0.1")).unwrap();
        w.deregister(&svc("a"), &ikey("10.0.0.2")).unwrap();
        assert!(!w.holds_session(SessionId(1)));
        assert_ne!(w.session_set_generation(), s1);
        assert_ne!(w.content_generation(), c2);
        assert_eq!(digests(&w), d0);
        let other = writer(2);
        assert!(![c0, c1, c2, w.content_generation()].contains(&other.content_generation()));
    }

    #[test]
    fn range_digests_add_up_and_locate_differences() {
        let mut w = writer(1);
        for i in 0..50 {
            w.register(
                &svc(&format!("s{i}")),
                InstanceSpec::new("10.0.0.1", 80),
                SessionId(1),
                0,
            )
            .unwrap();
        }
        let mut r = replica();
        for op in w.take_ops() {
            r.apply_remote(op, 0).unwrap();
        }
        let cuts = [0u64, 1 << 60, 1 << 62, 1 << 63, u64::MAX - 5];
        let arcs: Vec<(u64, u64)> = (0..cuts.len())
            .map(|i| (cuts[i].wrapping_add(1), cuts[(i + 1) % cuts.len()]))
            .collect();
        let total = arcs
            .iter()
            .fold(0u64, |a, &(s, e)| a.wrapping_add(w.range_digest(s, e)));
        assert_eq!(total, w.range_digest(0, u64::MAX));
        assert_eq!(
            arcs.iter()
                .map(|&(s, e)| w.records_in(&[(s, e)]).len())
                .sum::<usize>(),
            50
        );
        // One change shows up in exactly the arc that holds the service.
        let s = svc("s7");
        w.update(&s, InstanceSpec::new("10.0.0.1", 80), 1).unwrap();
        let differing: Vec<_> = arcs
            .iter()
            .filter(|&&(a, b)| w.range_digest(a, b) != r.range_digest(a, b))
            .collect();
        assert_eq!(differing.len(), 1);
        let (a, b) = *differing[0];
        assert!(in_arc(a, b, w.placement_of(&s)));
        let theirs: BTreeMap<_, _> = r.service_digests_in(a, b).into_iter().collect();
        let diff: Vec<_> = w
            .service_digests_in(a, b)
            .into_iter()
            .filter(|(k, d)| theirs.get(k) != Some(d))
            .map(|(k, _)| k)
            .collect();
        assert_eq!(diff, vec![s.clone()]);
        for rec in w.records_of(&diff) {
            r.apply_record(rec, 2).unwrap();
        }
        assert_eq!(r.range_digest(0, u64::MAX), w.range_digest(0, u64::MAX));
    }

    #[test]
    fn owners_expire_and_reap_only_what_they_own() {
        let mut w = writer(1);
        let (mine, theirs) = (svc("mine"), svc("theirs"));
        let mut sp = InstanceSpec::new("10.0.0.1", 80);
        sp.ttl = Some(TtlLease::default());
        for s in [&mine, &theirs] {
            w.register(s, sp.clone(), SessionId(1), 0).unwrap();
            w.register(s, InstanceSpec::new("10.0.0.2", 80), SessionId(2), 0)
                .unwrap();
        }
        w.take_ops();
        let owned = |s: &ServiceKey| s.service == "mine";
        let changes = w.expire_in(15_000, &owned);
        assert_eq!(changes.len(), 1);
        let ops = w.take_ops();
        assert_eq!(ops.len(), 1);
        let Op::Instance(op) = &ops[0] else { panic!() };
        assert_eq!(op.lapsed, Some(true));
        assert!(!op.state.as_ref().unwrap().healthy);
        // The other service's instance got a fresh lease instead.
        assert!(w.instance(&theirs, &ikey("10.0.0.1")).unwrap().healthy);
        assert!(w.expire_in(29_000, &owned).is_empty());
        let changes = w.expire_in(30_000, &owned);
        assert_eq!(changes.len(), 1);
        assert!(matches!(
            &w.take_ops()[..],
            [Op::Instance(InstanceOp {
                state: None,
                reaped: true,
                ..
            })]
        ));

        let changes = w.remove_session_in(SessionId(2), &owned);
        assert_eq!(changes.len(), 1);
        assert_eq!(w.session_services(SessionId(2)), vec![theirs.clone()]);
        assert!(w
            .take_ops()
            .iter()
            .all(|op| matches!(op, Op::Instance(InstanceOp { reaped: true, .. }))));
        w.check_invariants();

        // A replica that takes over a lapsed instance restores health on the next beat.
        let mut r = replica();
        let mut w2 = writer(2);
        w2.register(&mine, sp.clone(), SessionId(1), 0).unwrap();
        w2.expire(15_000);
        for op in w2.take_ops() {
            r.apply_remote(op, 16_000).unwrap();
        }
        assert!(!r.instance(&mine, &ikey("10.0.0.1")).unwrap().healthy);
        assert!(r.beat(&mine, &ikey("10.0.0.1"), 17_000).unwrap().is_some());
        assert!(r.instance(&mine, &ikey("10.0.0.1")).unwrap().healthy);
        r.check_invariants();
    }
}
