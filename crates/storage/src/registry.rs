//! The registry: every service of every namespace, and the index of sessions.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::IpAddr;

use foldhash::{HashMap, HashMapExt};

use crate::compact::{Key, Names, Sessions, Slot, NO_SESSION};
use crate::error::StorageError;
use crate::model::*;
use crate::replica::{
    instance_hash, meta_hash, InstanceOp, MetaOp, Op, ReplicationSettings, Stamp, Tomb, Tombs,
};
use crate::validate::{
    canonical_ip, validate_address, validate_instance, validate_instance_key,
    validate_instance_settings, validate_name, validate_service_key, validate_service_meta,
    NameKind,
};

/// Bounds that validation enforces. Defaults are documented in docs/configuration.md.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Longest namespace, group, service or cluster name, in bytes.
    pub max_name_len: usize,
    /// Most metadata entries on one instance or service.
    pub max_metadata_entries: usize,
    /// Longest metadata key, in bytes.
    pub max_metadata_key_len: usize,
    /// Longest metadata value, in bytes.
    pub max_metadata_value_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_name_len: 128,
            max_metadata_entries: 64,
            max_metadata_key_len: 128,
            max_metadata_value_len: 1024,
        }
    }
}

/// A service changed: its key and its new revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The service that changed.
    pub key: ServiceKey,
    /// Its revision after the change.
    pub revision: u64,
}

/// One service: its settings, revision and instances.
#[derive(Debug)]
pub(crate) struct ServiceEntry {
    /// The service's id in [`Registry::service_keys`], for the indexes.
    pub(crate) id: u32,
    pub(crate) meta: ServiceMeta,
    /// The stamp of the last change to this service.
    pub(crate) revision: u64,
    /// The live instances, each with its version and lapse (see [`Slot`]).
    ///
    /// Ttl instances that expiry marked unhealthy are "lapsed", each with the health
    /// its client last declared. While lapsed an instance reads `healthy == false`; a
    /// beat ends the lapse and restores the declared health.
    pub(crate) instances: HashMap<Key, Slot>,
    /// How many of `instances` read healthy, kept as they change, so that a listing of
    /// services costs one step per service, not one per instance.
    pub(crate) healthy: usize,
    /// The version of `meta`: [`Stamp::ZERO`] while `meta` is the default (the version
    /// of explicitly set default settings is kept as a tombstone).
    pub(crate) meta_stamp: Stamp,
    /// Wrapping sum of the digest hashes of the live instances and of the settings.
    pub(crate) sum: u64,
    /// When it last changed here (the registry's latest `now_ms` then).
    pub(crate) changed_ms: u64,
}

impl ServiceEntry {
    fn new(id: u32) -> Self {
        ServiceEntry {
            id,
            meta: ServiceMeta::default(),
            revision: 0,
            instances: HashMap::new(),
            healthy: 0,
            meta_stamp: Stamp::ZERO,
            sum: 0,
            changed_ms: 0,
        }
    }

    /// An entry with no instances and default settings is not kept.
    fn is_disposable(&self) -> bool {
        self.instances.is_empty() && self.meta == ServiceMeta::default()
    }
}

/// The secondary indexes: which instances each session owns, and when each Ttl
/// instance is next due for expiry. Both name services by id and instances by
/// compact key.
#[derive(Debug, Default)]
pub(crate) struct Index {
    pub(crate) sessions: Sessions,
    /// `(due_ms, service id, instance)` for every Ttl instance: when it becomes
    /// unhealthy (not lapsed) or is removed (lapsed). See [`Slot::due_ms`].
    pub(crate) deadlines: BTreeSet<(u64, u32, Key)>,
}

impl Index {
    /// Indexes a live instance; sets its session id.
    fn add(&mut self, service: u32, key: Key, slot: &mut Slot, session: Option<SessionId>) {
        match session {
            Some(s) => slot.session = self.sessions.attach(s, service, key),
            None => self.add_deadline(service, key, slot),
        }
    }

    fn remove(&mut self, service: u32, key: Key, slot: &Slot) {
        if slot.session != NO_SESSION {
            self.sessions.detach(slot.session, service, key);
        } else {
            self.remove_deadline(service, key, slot);
        }
    }

    fn add_deadline(&mut self, service: u32, key: Key, slot: &Slot) {
        if let Some(due) = slot.due_ms() {
            self.deadlines.insert((due, service, key));
        }
    }

    fn remove_deadline(&mut self, service: u32, key: Key, slot: &Slot) {
        if let Some(due) = slot.due_ms() {
            self.deadlines.remove(&(due, service, key));
        }
    }
}

/// The order of instances in answers and dumps: by key (cluster, ip, port), the ip
/// compared as text.
fn by_key(a: &Instance, b: &Instance) -> std::cmp::Ordering {
    (a.cluster.as_str(), a.ip.as_str(), a.port).cmp(&(b.cluster.as_str(), b.ip.as_str(), b.port))
}

/// Gives back most of a map's spare room once it holds under a quarter of what it
/// could (maps do not shrink on their own; a service that once held many instances
/// would keep their room).
pub(crate) fn shrink<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > 64 && map.len() * 4 < map.capacity() {
        map.shrink_to(map.len() * 2);
    }
}

/// Takes the next stamp of the counter.
fn bump(counter: &mut u64) -> u64 {
    let stamp = *counter;
    *counter += 1;
    stamp
}

fn not_found(service: &ServiceKey, instance: &InstanceKey) -> StorageError {
    StorageError::NotFound(format!(
        "instance {instance} is not registered in service {service}"
    ))
}

/// The registry state. See the crate docs.
///
/// # Revisions and stamps
///
/// The registry has one stamp counter, starting at 1. Every change takes the next
/// stamp: the changed service's revision becomes that stamp, and so does the `stamp`
/// of every instance the change wrote. Revisions therefore strictly increase, per
/// service and over the whole registry, also across the removal and re-creation of a
/// service. A request that fails takes no stamp.
///
/// A service with no instances and default [`ServiceMeta`] is not kept (so churn of
/// unique names does not leak memory). [`Registry::query`] of a service that does not
/// exist answers revision 0, which means "no such service", even if the service existed
/// before; the [`Change`] that removed it carries the removal's (higher) revision.
/// Watchers should therefore order updates by the revisions of the [`Change`] stream,
/// not by comparing query answers across a removal.
///
/// # Ttl expiry
///
/// A Ttl instance without a beat for `unhealthy_after_ms` is marked unhealthy by
/// [`Registry::expire`] (it "lapses"); a beat ends the lapse and restores the health
/// its client declared, so a client-declared unhealthy instance stays unhealthy. After
/// `remove_after_ms` without a beat it is removed.
///
/// # Addresses
///
/// IP addresses are stored in canonical form (as [`std::net::IpAddr`] prints them: `::1`,
/// not `0:0::1` or `0:0:0:0:0:0:0:1`); every operation that takes an instance key
/// canonicalizes it the same way, so any spelling of an address names the same instance.
#[derive(Debug)]
pub struct Registry {
    pub(crate) limits: Limits,
    pub(crate) namespaces: BTreeSet<String>,
    /// The services with live data or settings. Hashed: every write looks its service
    /// up several times, and comparing keys along a tree cost more than hashing one.
    pub(crate) services: HashMap<ServiceKey, ServiceEntry>,
    /// The keys of `services`, ordered, so that listing a namespace or group is a
    /// range scan and dumps are sorted.
    pub(crate) by_name: BTreeSet<ServiceKey>,
    /// The key of each service entry, by the entry's id; `None` for a free id.
    pub(crate) service_keys: Vec<Option<ServiceKey>>,
    /// Ids of `service_keys` free for reuse.
    free_service_ids: Vec<u32>,
    /// The cluster names of the live instances' keys.
    pub(crate) clusters: Names,
    /// Number of live instances, over all services.
    instance_total: usize,
    pub(crate) index: Index,
    /// The stamp the next change takes.
    next_stamp: u64,
    /// How this registry takes part in replication.
    pub(crate) repl: ReplicationSettings,
    /// The hybrid logical clock: the highest version time assigned or seen.
    pub(crate) hlc: u64,
    /// The latest `now_ms` any operation was given (for operations that take none).
    pub(crate) last_now_ms: u64,
    /// Tombstones, by service. Instance tombstones
    /// are keyed by compact key; their cluster names count as uses in `clusters`.
    /// Hashed, not ordered: a write to a service asks for its tombstones once or
    /// twice, and a tree of services with tombstones (every service a departed
    /// session had instances in, for the tombstones' lifetime) compared three names
    /// per level; `placed` and `tomb_gc` keep the orders that are needed.
    pub(crate) tombs: HashMap<ServiceKey, Tombs>,
    /// `(deleted_at_ms, instance or None for settings, service)` of every tombstone, in
    /// the order they were made, for [`Registry::gc_tombstones`]. An entry stays when
    /// its tombstone is dropped early (the instance came back) or replaced: collection
    /// skips an entry whose tombstone is gone or is dated otherwise. So dropping a
    /// tombstone, on every registration that brings an instance back within the
    /// tombstones' lifetime (a fleet's restart), costs nothing here; an ordered set of
    /// them cost a search by date on every drop and on every deletion. At most one
    /// entry per tombstone made within the lifetime.
    pub(crate) tomb_gc: VecDeque<(u64, Option<Key>, ServiceKey)>,
    /// Number of tombstones held (instances and settings).
    pub(crate) tomb_total: usize,
    /// `(ring position, service)` of every service with live data or tombstones.
    pub(crate) placed: BTreeSet<(u64, ServiceKey)>,
    /// Operations recorded by local writes, for [`Registry::take_ops`].
    pub(crate) outbox: Vec<Op>,
    /// Changes (to a value never used before in this process) whenever a service's
    /// digest, the set of services with live data, or their placement changes.
    pub(crate) content_generation: u64,
}

impl Registry {
    /// An empty registry whose only namespace is [`DEFAULT_NAMESPACE`].
    pub fn new(limits: Limits) -> Self {
        Registry {
            limits,
            namespaces: BTreeSet::from([DEFAULT_NAMESPACE.to_string()]),
            services: HashMap::new(),
            by_name: BTreeSet::new(),
            service_keys: Vec::new(),
            free_service_ids: Vec::new(),
            clusters: Names::default(),
            instance_total: 0,
            index: Index::default(),
            next_stamp: 1,
            repl: ReplicationSettings::default(),
            hlc: 0,
            last_now_ms: 0,
            tombs: HashMap::new(),
            tomb_gc: VecDeque::new(),
            tomb_total: 0,
            placed: BTreeSet::new(),
            outbox: Vec::new(),
            content_generation: crate::next_generation(),
        }
    }

    /// The limits this registry validates against.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Adds a namespace (validated as a name). Returns false if it already existed.
    pub fn add_namespace(&mut self, namespace: &str) -> Result<bool, StorageError> {
        validate_name(NameKind::Namespace, namespace, &self.limits)?;
        if self.namespaces.contains(namespace) {
            return Ok(false);
        }
        Ok(self.namespaces.insert(namespace.to_string()))
    }

    /// The namespaces, sorted.
    pub fn namespaces(&self) -> Vec<String> {
        self.namespaces.iter().cloned().collect()
    }

    /// The stamp of the latest change, 0 before the first one. Every revision and
    /// instance stamp in the registry is at most this.
    pub fn last_stamp(&self) -> u64 {
        self.next_stamp - 1
    }

    fn check_namespace(&self, namespace: &str) -> Result<(), StorageError> {
        if self.namespaces.contains(namespace) {
            Ok(())
        } else {
            Err(StorageError::UnknownNamespace(namespace.to_string()))
        }
    }

    /// Validates a service key, then checks that its namespace exists.
    fn check_service(&self, service: &ServiceKey) -> Result<(), StorageError> {
        validate_service_key(service, &self.limits)?;
        self.check_namespace(&service.namespace)
    }

    /// Validates an instance key and returns it with its ip in canonical form.
    fn canonical_key(&self, key: &InstanceKey) -> Result<InstanceKey, StorageError> {
        validate_instance_key(key, &self.limits)?;
        Ok(InstanceKey {
            cluster: key.cluster.clone(),
            ip: canonical_ip(&key.ip)?.into_owned(),
            port: key.port,
        })
    }

    // ---- between the public forms and the compact ones (see the `compact` module) ----

    /// The compact key of a canonical instance key; `None` when no live instance can
    /// have it (its cluster is not in use).
    pub(crate) fn find_key(&self, key: &InstanceKey) -> Option<Key> {
        Some(Key {
            cluster: self.clusters.find(&key.cluster)?,
            ip: crate::compact::parse_ip(&key.ip)?,
            port: key.port,
        })
    }

    /// The public form of a compact key.
    pub(crate) fn public_key(&self, key: &Key) -> InstanceKey {
        InstanceKey {
            cluster: self.clusters.name(key.cluster).to_string(),
            ip: crate::compact::ip_text(&key.ip),
            port: key.port,
        }
    }

    /// The public form of a live instance.
    pub(crate) fn materialize(&self, key: &Key, slot: &Slot) -> Instance {
        Instance {
            ip: crate::compact::ip_text(&key.ip),
            port: key.port,
            cluster: self.clusters.name(key.cluster).to_string(),
            weight: slot.weight,
            healthy: slot.healthy(),
            enabled: slot.enabled(),
            metadata: slot.metadata(),
            lease: match slot.ttl() {
                Some(ttl) => Lease::Ttl(ttl.clone()),
                None => Lease::Session(self.index.sessions.session(slot.session)),
            },
            last_beat_ms: slot.last_beat_ms,
            stamp: slot.stamp,
        }
    }

    /// A live instance by its canonical key: the service's id, the compact key, the
    /// slot.
    pub(crate) fn find_slot(
        &self,
        service: &ServiceKey,
        key: &InstanceKey,
    ) -> Option<(u32, Key, &Slot)> {
        let entry = self.services.get(service)?;
        let k = self.find_key(key)?;
        entry.instances.get(&k).map(|slot| (entry.id, k, slot))
    }

    /// The live instances of a service entry, sorted by key (cluster, ip, port as
    /// text), each with its slot.
    pub(crate) fn sorted_instances<'a>(
        &'a self,
        entry: &'a ServiceEntry,
    ) -> Vec<(&'a Slot, Instance)> {
        let mut out: Vec<(&Slot, Instance)> = entry
            .instances
            .iter()
            .map(|(k, slot)| (slot, self.materialize(k, slot)))
            .collect();
        out.sort_unstable_by(|(_, a), (_, b)| by_key(a, b));
        out
    }

    /// The key of the service entry with id `id`.
    pub(crate) fn service_key(&self, id: u32) -> &ServiceKey {
        self.service_keys[id as usize]
            .as_ref()
            .expect("the id of a live service entry")
    }

    /// The id of the service's entry, created (and placed) if needed.
    fn ensure_entry(&mut self, service: &ServiceKey) -> u32 {
        if let Some(e) = self.services.get(service) {
            return e.id;
        }
        let id = match self.free_service_ids.pop() {
            Some(id) => {
                self.service_keys[id as usize] = Some(service.clone());
                id
            }
            None => {
                self.service_keys.push(Some(service.clone()));
                u32::try_from(self.service_keys.len() - 1).expect("fewer than 2^32 services")
            }
        };
        self.services.insert(service.clone(), ServiceEntry::new(id));
        self.by_name.insert(service.clone());
        // Placed while it has an entry (see `place`).
        self.placed
            .insert((self.placement_of(service), service.clone()));
        self.content_generation = crate::next_generation();
        id
    }

    /// Registers or replaces the instance `spec.key()` of `service`. Without a Ttl in
    /// the spec, the instance's lease is `Session(session)`; with one, `Ttl` and its
    /// last beat is `now_ms`. Creates the service if it does not exist.
    /// Validates everything first; on error nothing changes.
    ///
    /// Replacing resets the instance entirely: new lease, last beat `now_ms`, no lapse.
    /// Every call is a change (takes a stamp), even if nothing differs.
    pub fn register(
        &mut self,
        service: &ServiceKey,
        spec: InstanceSpec,
        session: SessionId,
        now_ms: u64,
    ) -> Result<Change, StorageError> {
        self.check_service(service)?;
        let (addr, text) = validate_address(&spec.cluster, &spec.ip, spec.port, &self.limits)?;
        validate_instance_settings(&spec, &self.limits)?;
        let ip = match text {
            Cow::Borrowed(_) => spec.ip,
            Cow::Owned(text) => text,
        };

        let version = self.next_version(now_ms);
        let stamp = bump(&mut self.next_stamp);
        let inst = Instance {
            ip,
            port: spec.port,
            cluster: spec.cluster,
            weight: spec.weight,
            healthy: spec.healthy,
            enabled: spec.enabled,
            metadata: spec.metadata,
            lease: match spec.ttl {
                Some(ttl) => Lease::Ttl(ttl),
                None => Lease::Session(session),
            },
            last_beat_ms: now_ms,
            stamp,
        };
        self.store_and_record(service, inst, addr, version, None, stamp);
        Ok(Change {
            key: service.clone(),
            revision: stamp,
        })
    }

    /// Changes weight, healthy, enabled and metadata of an existing instance; keeps
    /// its lease. `NotFound` if it is not registered.
    ///
    /// The spec's `ttl` is validated but ignored, and the last beat is kept (an update
    /// is not a beat). A lapsed Ttl instance stays unhealthy until its next beat, which
    /// then applies the health this update declared.
    pub fn update(
        &mut self,
        service: &ServiceKey,
        spec: InstanceSpec,
        now_ms: u64,
    ) -> Result<Change, StorageError> {
        self.check_service(service)?;
        validate_instance(&spec, &self.limits)?;
        let key = self.canonical_key(&spec.key())?;
        let (_, k, slot) = self
            .find_slot(service, &key)
            .ok_or_else(|| not_found(service, &key))?;
        let mut inst = self.materialize(&k, slot);
        let lapsed = slot.lapsed().map(|_| spec.healthy);
        let version = self.next_version(now_ms);
        let stamp = bump(&mut self.next_stamp);
        inst.weight = spec.weight;
        inst.enabled = spec.enabled;
        inst.metadata = spec.metadata;
        inst.healthy = lapsed.is_none() && spec.healthy;
        inst.stamp = stamp;
        self.store_and_record(service, inst, k.ip, version, lapsed, stamp);
        Ok(Change {
            key: service.clone(),
            revision: stamp,
        })
    }

    /// Removes an instance. `NotFound` if it is not registered.
    ///
    /// Leaves a tombstone dated by the latest `now_ms` the registry was given.
    pub fn deregister(
        &mut self,
        service: &ServiceKey,
        instance: &InstanceKey,
    ) -> Result<Change, StorageError> {
        self.deregister_at(service, instance, self.last_now_ms)
    }

    /// [`Registry::deregister`] at `now_ms` (which dates the tombstone and stamps the
    /// deletion).
    pub fn deregister_at(
        &mut self,
        service: &ServiceKey,
        instance: &InstanceKey,
        now_ms: u64,
    ) -> Result<Change, StorageError> {
        self.deregister_with(service, instance, now_ms, false)
    }

    /// Like [`Registry::deregister_at`], but an instance this copy does not hold is
    /// deleted all the same: a tombstone with a fresh stamp is written (and recorded for
    /// the peers), so that copies elsewhere that hold it, at an older stamp, drop it.
    /// For an owner whose copy may miss writes made elsewhere (it just took the service
    /// over, or resumed after a stall): its "not found" would be wrong.
    pub fn deregister_blind_at(
        &mut self,
        service: &ServiceKey,
        instance: &InstanceKey,
        now_ms: u64,
    ) -> Result<Change, StorageError> {
        self.deregister_with(service, instance, now_ms, true)
    }

    fn deregister_with(
        &mut self,
        service: &ServiceKey,
        instance: &InstanceKey,
        now_ms: u64,
        blind: bool,
    ) -> Result<Change, StorageError> {
        self.check_service(service)?;
        let key = self.canonical_key(instance)?;
        if !blind && self.find_slot(service, &key).is_none() {
            return Err(not_found(service, &key));
        }
        let version = self.next_version(now_ms);
        let stamp = bump(&mut self.next_stamp);
        self.kill(service, &key, version, self.last_now_ms, false);
        self.record_instance(service, key, version, None, None, false);
        self.set_revision(service, stamp);
        self.settle(service);
        Ok(Change {
            key: service.clone(),
            revision: stamp,
        })
    }

    /// A beat for a Ttl instance: refreshes its last beat, and makes it healthy again
    /// if expiry had marked it unhealthy (then returns the change). `NotFound` if it is
    /// not registered; a beat for a session instance is accepted and changes nothing.
    ///
    /// A beat ends a lapse in every case, but only reports a change when the instance
    /// becomes healthy again: one its client declared unhealthy stays unhealthy. The
    /// last beat never moves backwards (a beat older than the last one only counts as
    /// a beat at the same time).
    pub fn beat(
        &mut self,
        service: &ServiceKey,
        instance: &InstanceKey,
        now_ms: u64,
    ) -> Result<Option<Change>, StorageError> {
        self.check_service(service)?;
        let key = self.canonical_key(instance)?;
        self.note_now(now_ms);
        let (id, k, slot) = self
            .find_slot(service, &key)
            .ok_or_else(|| not_found(service, &key))?;
        if slot.ttl().is_none() {
            return Ok(None);
        }

        if slot.lapsed() == Some(true) {
            // The lapse ends and the declared health comes back: a replicated change.
            let mut inst = self.materialize(&k, slot);
            let version = self.next_version(now_ms);
            let stamp = bump(&mut self.next_stamp);
            inst.healthy = true;
            inst.stamp = stamp;
            inst.last_beat_ms = inst.last_beat_ms.max(now_ms);
            self.store_and_record(service, inst, k.ip, version, None, stamp);
            return Ok(Some(Change {
                key: service.clone(),
                revision: stamp,
            }));
        }
        let slot = self
            .services
            .get_mut(service)
            .and_then(|e| e.instances.get_mut(&k))
            .expect("found above");
        self.index.remove_deadline(id, k, slot);
        slot.set_lapsed(None);
        slot.last_beat_ms = slot.last_beat_ms.max(now_ms);
        self.index.add_deadline(id, k, slot);
        Ok(None)
    }

    /// Sets a service's protection threshold and metadata, creating the service if
    /// needed.
    ///
    /// Setting default settings on a service without instances removes it (it is not
    /// kept, see the type docs); the change is still reported.
    pub fn set_service_meta(
        &mut self,
        service: &ServiceKey,
        meta: ServiceMeta,
    ) -> Result<Change, StorageError> {
        self.check_service(service)?;
        validate_service_meta(&meta, &self.limits)?;

        let now_ms = self.last_now_ms;
        let version = self.next_version(now_ms);
        let stamp = bump(&mut self.next_stamp);
        if self.repl.record_ops {
            self.outbox.push(Op::Meta(MetaOp {
                service: service.clone(),
                stamp: version,
                meta: meta.clone(),
            }));
        }
        self.put_meta(service, meta, version, now_ms);
        self.set_revision(service, stamp);
        self.settle(service);
        Ok(Change {
            key: service.clone(),
            revision: stamp,
        })
    }

    /// Removes every instance bound to `session`; one change per service touched.
    ///
    /// The changes are sorted by service key. An unknown session gives no changes.
    pub fn remove_session(&mut self, session: SessionId) -> Vec<Change> {
        self.remove_session_in(session, &|_| true)
    }

    /// Removes the instances bound to `session` in the services `filter` selects (for
    /// an owner, the services it owns); one change per service touched, sorted by
    /// service key. The deletions are recorded as reaped (liveness, not the client).
    pub fn remove_session_in(
        &mut self,
        session: SessionId,
        filter: &dyn Fn(&ServiceKey) -> bool,
    ) -> Vec<Change> {
        let Some(members) = self.index.sessions.get(session) else {
            return Vec::new();
        };
        let mut by_id: HashMap<u32, Vec<Key>> = HashMap::new();
        for (id, k) in members.members() {
            by_id.entry(*id).or_default().push(*k);
        }
        // The services in key order, each with its instances in key order (by their
        // public form, which the recorded operations carry).
        let mut by_service: Vec<(ServiceKey, Vec<(InstanceKey, Key)>)> = by_id
            .into_iter()
            .filter(|(id, _)| filter(self.service_key(*id)))
            .map(|(id, keys)| {
                let mut keys: Vec<(InstanceKey, Key)> =
                    keys.into_iter().map(|k| (self.public_key(&k), k)).collect();
                keys.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                (self.service_key(id).clone(), keys)
            })
            .collect();
        by_service.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let now_ms = self.last_now_ms;
        let mut changes = Vec::with_capacity(by_service.len());
        for (service, keys) in by_service {
            let mut removed = false;
            for (key, k) in keys {
                let owned = self
                    .services
                    .get(&service)
                    .and_then(|e| e.instances.get(&k))
                    .is_some_and(|slot| {
                        slot.session != NO_SESSION
                            && self.index.sessions.session(slot.session) == session
                    });
                debug_assert!(owned, "session index names {key} wrongly");
                if owned {
                    let version = self.next_version(now_ms);
                    // The tombstone's use of the cluster name (the live one's goes).
                    self.clusters.retain(k.cluster);
                    self.kill_at(&service, k, &key, version, now_ms, true);
                    self.record_instance(&service, key, version, None, None, true);
                    removed = true;
                }
            }
            if !removed {
                continue;
            }
            let stamp = bump(&mut self.next_stamp);
            self.set_revision(&service, stamp);
            self.settle(&service);
            changes.push(Change {
                key: service,
                revision: stamp,
            });
        }
        changes
    }

    /// How many instances are bound to `session`.
    pub fn session_instance_count(&self, session: SessionId) -> usize {
        self.index.sessions.get(session).map_or(0, |s| s.len())
    }

    /// Ttl expiry at `now_ms`: instances without a beat for `unhealthy_after_ms` become
    /// unhealthy; without one for `remove_after_ms` are removed. One change per
    /// service touched.
    ///
    /// Marking unhealthy happens once per lapse, and is a change only if the instance
    /// was healthy. The changes are sorted by service key. The cost is proportional to
    /// the instances due (a deadline index), not to all instances, so calling this
    /// every second with a million instances is cheap.
    pub fn expire(&mut self, now_ms: u64) -> Vec<Change> {
        self.expire_in(now_ms, &|_| true)
    }

    /// [`Registry::expire`] for the services `filter` selects (those this node owns).
    /// A due instance of another service is left to its owner: its lease restarts here
    /// (as if it had beaten now), so it does not come due again at every call.
    pub fn expire_in(&mut self, now_ms: u64, filter: &dyn Fn(&ServiceKey) -> bool) -> Vec<Change> {
        self.note_now(now_ms);
        let mut due: BTreeMap<ServiceKey, Vec<Key>> = BTreeMap::new();
        while self
            .index
            .deadlines
            .first()
            .is_some_and(|(at, _, _)| *at <= now_ms)
        {
            let (_, id, key) = self.index.deadlines.pop_first().expect("checked");
            due.entry(self.service_key(id).clone())
                .or_default()
                .push(key);
        }

        let mut changes = Vec::new();
        for (service, keys) in due {
            if !filter(&service) {
                for k in keys {
                    self.touch_ttl_unindexed(&service, k, now_ms);
                }
                continue;
            }
            let mut stamp: Option<u64> = None;
            for k in keys {
                let Some(entry) = self.services.get(&service) else {
                    debug_assert!(false, "deadline index names missing service {service}");
                    continue;
                };
                let id = entry.id;
                let Some(slot) = entry.instances.get(&k) else {
                    debug_assert!(false, "deadline index names a missing instance");
                    continue;
                };
                let Some(ttl) = slot.ttl() else {
                    debug_assert!(false, "deadline index names a session instance");
                    continue;
                };
                let idle = now_ms.saturating_sub(slot.last_beat_ms);
                let lapsed = slot.lapsed().is_some();
                if idle >= ttl.remove_after_ms {
                    // The index entry is already popped: put it back so kill removes it.
                    self.index.add_deadline(id, k, slot);
                    let key = self.public_key(&k);
                    let version = self.next_version(now_ms);
                    self.kill(&service, &key, version, now_ms, true);
                    self.record_instance(&service, key, version, None, None, true);
                    stamp.get_or_insert_with(|| bump(&mut self.next_stamp));
                } else if idle >= ttl.unhealthy_after_ms && !lapsed {
                    if slot.healthy() {
                        // Re-index first (put_live removes the current entry).
                        self.index.add_deadline(id, k, slot);
                        let mut inst = self.materialize(&k, slot);
                        let version = self.next_version(now_ms);
                        inst.healthy = false;
                        inst.stamp = *stamp.get_or_insert_with(|| bump(&mut self.next_stamp));
                        let revision = inst.stamp;
                        self.store_and_record(&service, inst, k.ip, version, Some(true), revision);
                    } else {
                        let slot = self
                            .services
                            .get_mut(&service)
                            .and_then(|e| e.instances.get_mut(&k))
                            .expect("found above");
                        slot.set_lapsed(Some(false));
                        self.index.add_deadline(id, k, slot);
                    }
                } else {
                    // Not due after all (the index is exact, so this does not happen):
                    // keep it indexed.
                    self.index.add_deadline(id, k, slot);
                }
            }
            if let Some(stamp) = stamp {
                self.set_revision(&service, stamp);
                self.settle(&service);
                changes.push(Change {
                    key: service,
                    revision: stamp,
                });
            }
        }
        changes
    }

    // ---- internal record keeping shared by local writes and replication ----

    /// Remembers the latest `now_ms` seen: operations that take no time (deregister,
    /// set_service_meta, remove_session) stamp and date their tombstones with it.
    pub fn note_now(&mut self, now_ms: u64) {
        self.last_now_ms = self.last_now_ms.max(now_ms);
    }

    /// Takes the next local revision.
    pub(crate) fn bump_revision(&mut self) -> u64 {
        bump(&mut self.next_stamp)
    }

    /// Sets a service's revision, if the service is kept.
    pub(crate) fn set_revision(&mut self, service: &ServiceKey, revision: u64) {
        if let Some(e) = self.services.get_mut(service) {
            e.revision = revision;
            e.changed_ms = self.last_now_ms;
        }
    }

    /// Records an instance operation for replication (when recording is on). Takes
    /// the key and the state: the operation keeps them, without a copy.
    fn record_instance(
        &mut self,
        service: &ServiceKey,
        key: InstanceKey,
        version: Stamp,
        state: Option<Instance>,
        lapsed: Option<bool>,
        reaped: bool,
    ) {
        if self.repl.record_ops {
            self.outbox.push(Op::Instance(InstanceOp {
                service: service.clone(),
                key,
                stamp: version,
                state,
                lapsed,
                reaped,
            }));
        }
    }

    /// A local write's store: [`Registry::put_live`], then the operation recorded for
    /// the peers, which takes `inst` itself (only its metadata, when it has any, is
    /// copied for the store).
    fn store_and_record(
        &mut self,
        service: &ServiceKey,
        mut inst: Instance,
        addr: IpAddr,
        version: Stamp,
        lapsed: Option<bool>,
        revision: u64,
    ) {
        if !self.repl.record_ops {
            let metadata = std::mem::take(&mut inst.metadata);
            self.put_live(service, &inst, metadata, addr, version, lapsed, revision);
            return;
        }
        let metadata = inst.metadata.clone();
        self.put_live(service, &inst, metadata, addr, version, lapsed, revision);
        let key = inst.key();
        self.record_instance(service, key, version, Some(inst), lapsed, false);
    }

    /// Stores `inst` live at `version` (lapsed with the declared health `lapsed`),
    /// replacing what its key held, live or deleted, and sets the service's revision to
    /// `revision`. Keeps the indexes and the digest sum; creates the service entry if
    /// needed. A service that holds an instance is never disposable, so there is
    /// nothing for [`Registry::settle`] to do after this.
    ///
    /// On the path of every write and every replicated operation: the service is looked
    /// up twice (whether it has an entry, then the entry) and the instance once (an
    /// entry, not a remove and an insert); the revision is set on the entry at hand.
    /// `addr` is `inst.ip` parsed, which every caller has at hand already. The
    /// instance is read, not kept: `metadata` is what the store keeps as its metadata
    /// (`inst.metadata` is not read), so that a caller that still needs `inst` copies
    /// no more than that.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn put_live(
        &mut self,
        service: &ServiceKey,
        inst: &Instance,
        metadata: BTreeMap<String, String>,
        addr: IpAddr,
        version: Stamp,
        lapsed: Option<bool>,
        revision: u64,
    ) {
        if !self.services.contains_key(service) {
            self.ensure_entry(service);
        }
        let Instance {
            ref ip,
            port,
            ref cluster,
            weight,
            healthy,
            enabled,
            metadata: _,
            ref lease,
            last_beat_ms,
            stamp,
        } = *inst;
        let hash = instance_hash(cluster, ip, port, version);
        // The cluster name is taken before a tombstone of the same key gives its use
        // back, so that the name is never dropped in between.
        let k = Key {
            cluster: self.clusters.acquire(cluster),
            ip: addr,
            port,
        };
        self.drop_tomb(service, Some(k));
        let (ttl, session) = match lease {
            Lease::Ttl(t) => (Some(t.clone()), None),
            Lease::Session(s) => (None, Some(*s)),
        };
        let mut slot = Slot {
            version,
            stamp,
            last_beat_ms,
            weight,
            extra: Slot::extra_of(metadata, ttl),
            session: NO_SESSION,
            flags: Slot::flags_of(healthy, enabled, lapsed),
        };
        let entry = self.services.get_mut(service).expect("just ensured");
        let id = entry.id;
        let healthy = slot.healthy();
        match entry.instances.entry(k) {
            std::collections::hash_map::Entry::Occupied(mut held) => {
                self.clusters.release(k.cluster);
                if held.get().healthy() {
                    entry.healthy -= 1;
                }
                self.index.remove(id, k, held.get());
                let old_hash = instance_hash(cluster, ip, port, held.get().version);
                entry.sum = entry.sum.wrapping_sub(old_hash);
                self.index.add(id, k, &mut slot, session);
                held.insert(slot);
            }
            std::collections::hash_map::Entry::Vacant(free) => {
                self.instance_total += 1;
                self.index.add(id, k, &mut slot, session);
                free.insert(slot);
            }
        }
        if healthy {
            entry.healthy += 1;
        }
        entry.sum = entry.sum.wrapping_add(hash);
        entry.revision = revision;
        entry.changed_ms = self.last_now_ms;
        self.content_generation = crate::next_generation();
    }

    /// Deletes an instance at `version`: removes it if live and leaves a tombstone.
    /// Returns whether a live instance was removed.
    pub(crate) fn kill(
        &mut self,
        service: &ServiceKey,
        key: &InstanceKey,
        version: Stamp,
        now_ms: u64,
        reaped: bool,
    ) -> bool {
        // The tombstone's use of the cluster name, taken first so that a name whose
        // last live use goes here is kept.
        let k = Key {
            cluster: self.clusters.acquire(&key.cluster),
            ip: crate::compact::parse_ip(&key.ip).expect("a canonical address"),
            port: key.port,
        };
        self.kill_at(service, k, key, version, now_ms, reaped)
    }

    /// [`Registry::kill`] of the instance with compact key `k` (whose public form is
    /// `key`), the tombstone's use of the cluster name already taken. Looks the
    /// service's entry and its tombstones up once each; a tombstone already held for
    /// the key is replaced (and its use of the name given back).
    fn kill_at(
        &mut self,
        service: &ServiceKey,
        k: Key,
        key: &InstanceKey,
        version: Stamp,
        now_ms: u64,
        reaped: bool,
    ) -> bool {
        let mut removed = false;
        let entry = self.services.get_mut(service);
        let has_entry = entry.is_some();
        if let Some(entry) = entry {
            if let Some(old) = entry.instances.remove(&k) {
                if old.healthy() {
                    entry.healthy -= 1;
                }
                self.index.remove(entry.id, k, &old);
                self.clusters.release(k.cluster);
                let old_hash = instance_hash(&key.cluster, &key.ip, key.port, old.version);
                entry.sum = entry.sum.wrapping_sub(old_hash);
                self.instance_total -= 1;
                removed = true;
                shrink(&mut entry.instances);
            }
        }
        let tomb = Tomb {
            stamp: version,
            deleted_at_ms: now_ms,
            reaped,
        };
        let tombs = self.tombs.entry(service.clone()).or_default();
        if tombs.instances.insert(k, tomb).is_some() {
            // Replaced: its entry in `tomb_gc` no longer matches.
            self.clusters.release(k.cluster);
        } else {
            self.tomb_total += 1;
        }
        self.tomb_gc.push_back((now_ms, Some(k), service.clone()));
        if !has_entry {
            // (A service with an entry is placed already.)
            self.place(service);
        }
        if removed {
            self.content_generation = crate::next_generation();
        }
        removed
    }

    /// Sets a service's settings at `version`. Default settings are kept as a
    /// tombstone of the settings, others on the entry (created if needed).
    pub(crate) fn put_meta(
        &mut self,
        service: &ServiceKey,
        meta: ServiceMeta,
        version: Stamp,
        now_ms: u64,
    ) {
        self.drop_tomb(service, None);
        if let Some(e) = self.services.get_mut(service) {
            if e.meta_stamp != Stamp::ZERO {
                e.sum = e.sum.wrapping_sub(meta_hash(e.meta_stamp));
            }
            e.meta_stamp = Stamp::ZERO;
            e.meta = ServiceMeta::default();
        }
        if meta == ServiceMeta::default() {
            self.tombs.entry(service.clone()).or_default().meta = Some(Tomb {
                stamp: version,
                deleted_at_ms: now_ms,
                reaped: false,
            });
            // `drop_tomb` above took any earlier one.
            self.tomb_total += 1;
            self.tomb_gc.push_back((now_ms, None, service.clone()));
        } else {
            self.ensure_entry(service);
            let e = self.services.get_mut(service).expect("just ensured");
            e.meta = meta;
            e.meta_stamp = version;
            e.sum = e.sum.wrapping_add(meta_hash(version));
        }
        self.content_generation = crate::next_generation();
        self.place(service);
    }

    /// Drops the tombstone of an instance (`Some`, its compact key) or of the settings
    /// (`None`).
    fn drop_tomb(&mut self, service: &ServiceKey, k: Option<Key>) {
        let Some(t) = self.tombs.get_mut(service) else {
            return;
        };
        let tomb = match k {
            Some(k) => {
                let tomb = t.instances.remove(&k);
                shrink(&mut t.instances);
                tomb
            }
            None => t.meta.take(),
        };
        let empty = t.is_empty();
        if tomb.is_some() {
            // Its entry in `tomb_gc` stays, and is skipped when it comes due.
            if let Some(k) = k {
                self.clusters.release(k.cluster);
            }
            self.tomb_total -= 1;
        }
        if empty {
            self.tombs.remove(service);
        }
    }

    /// Drops a service entry that holds nothing, and keeps the placement index in step
    /// with what is held about the service.
    pub(crate) fn settle(&mut self, service: &ServiceKey) {
        if self
            .services
            .get(service)
            .is_some_and(ServiceEntry::is_disposable)
        {
            if let Some(e) = self.services.remove(service) {
                self.by_name.remove(service);
                self.service_keys[e.id as usize] = None;
                self.free_service_ids.push(e.id);
                self.content_generation = crate::next_generation();
            }
        }
        self.place(service);
    }

    /// Adds or removes the service in the placement index, as it is held or not.
    fn place(&mut self, service: &ServiceKey) {
        if self.services.contains_key(service) {
            // A service with an entry was placed when the entry was made
            // (`ensure_entry`): nothing to do, and no key to copy, on every write.
            return;
        }
        let held = self.tombs.contains_key(service);
        let entry = (self.placement_of(service), service.clone());
        if held {
            if !self.placed.contains(&entry) {
                self.placed.insert(entry);
            }
        } else {
            self.placed.remove(&entry);
        }
    }

    /// Rebuilds the placement index (after the placement function changed).
    pub(crate) fn rebuild_placed(&mut self) {
        let keys: BTreeSet<ServiceKey> = self
            .services
            .keys()
            .chain(self.tombs.keys())
            .cloned()
            .collect();
        self.placed = keys
            .into_iter()
            .map(|k| (self.placement_of(&k), k))
            .collect();
        self.content_generation = crate::next_generation();
    }

    /// Restarts a Ttl instance's lease at `now_ms` (indexed).
    pub(crate) fn touch_ttl(&mut self, service: &ServiceKey, k: Key, now_ms: u64) {
        let Some(entry) = self.services.get_mut(service) else {
            return;
        };
        let Some(slot) = entry.instances.get_mut(&k) else {
            return;
        };
        self.index.remove_deadline(entry.id, k, slot);
        slot.last_beat_ms = slot.last_beat_ms.max(now_ms);
        self.index.add_deadline(entry.id, k, slot);
    }

    /// Restarts a Ttl instance's lease whose deadline was already popped.
    fn touch_ttl_unindexed(&mut self, service: &ServiceKey, k: Key, now_ms: u64) {
        let Some(entry) = self.services.get_mut(service) else {
            return;
        };
        let Some(slot) = entry.instances.get_mut(&k) else {
            return;
        };
        slot.last_beat_ms = slot.last_beat_ms.max(now_ms);
        self.index.add_deadline(entry.id, k, slot);
    }

    /// The instances of a service. `clusters` empty means all clusters.
    /// `healthy_only` returns healthy, enabled instances, unless the healthy share is
    /// at or below the service's protection threshold (when that is above 0): then all
    /// enabled instances, with `protected` set. An unknown service gives an empty
    /// view at revision 0; an unknown namespace is an error.
    ///
    /// The healthy share is `healthy and enabled / enabled`, counted over the selected
    /// clusters; with no enabled instance there is no protection. Without
    /// `healthy_only` every instance of the selected clusters is returned, disabled
    /// and unhealthy ones included, and `protected` is false. Instances are sorted by
    /// key (cluster, ip, port). Cluster names are validated. A session-bound
    /// instance's lease reads `Session(SessionId(0))`: answers go to any client, and a
    /// session id is what resumes a session.
    pub fn query(
        &self,
        service: &ServiceKey,
        clusters: &[String],
        healthy_only: bool,
    ) -> Result<ServiceView, StorageError> {
        self.check_service(service)?;
        for cluster in clusters {
            validate_name(NameKind::Cluster, cluster, &self.limits)?;
        }
        let Some(entry) = self.services.get(service) else {
            return Ok(ServiceView {
                key: service.clone(),
                revision: 0,
                instances: Vec::new(),
                protected: false,
            });
        };
        // Only clusters in use can match.
        let wanted: Vec<u32> = clusters
            .iter()
            .filter_map(|c| self.clusters.find(c))
            .collect();
        let selected = entry
            .instances
            .iter()
            .filter(|(k, _)| clusters.is_empty() || wanted.contains(&k.cluster));
        let (mut instances, protected): (Vec<Instance>, bool) = if healthy_only {
            let enabled: Vec<(&Key, &Slot)> = selected.filter(|(_, s)| s.enabled()).collect();
            let healthy = enabled.iter().filter(|(_, s)| s.healthy()).count();
            let threshold = entry.meta.protect_threshold;
            let protected = threshold > 0.0
                && !enabled.is_empty()
                && (healthy as f64 / enabled.len() as f64) <= threshold;
            let instances = enabled
                .into_iter()
                .filter(|(_, s)| protected || s.healthy())
                .map(|(k, s)| self.materialize(k, s))
                .collect();
            (instances, protected)
        } else {
            (
                selected.map(|(k, s)| self.materialize(k, s)).collect(),
                false,
            )
        };
        instances.sort_unstable_by(by_key);
        // A session id is what a client presents to resume its session: answers, which
        // any client may read, never carry one (the lease says only "session-bound").
        for inst in &mut instances {
            if let Lease::Session(id) = &mut inst.lease {
                *id = SessionId(0);
            }
        }
        Ok(ServiceView {
            key: service.clone(),
            revision: entry.revision,
            instances,
            protected,
        })
    }

    /// The services of a namespace (optionally one group), sorted by key.
    pub fn list_services(
        &self,
        namespace: &str,
        group: Option<&str>,
    ) -> Result<Vec<ServiceSummary>, StorageError> {
        validate_name(NameKind::Namespace, namespace, &self.limits)?;
        if let Some(group) = group {
            validate_name(NameKind::Group, group, &self.limits)?;
        }
        self.check_namespace(namespace)?;
        let start = ServiceKey::new(namespace, group.unwrap_or(""), "");
        Ok(self
            .by_name
            .range(start..)
            .take_while(|k| k.namespace == namespace && group.is_none_or(|g| k.group == g))
            .map(|key| {
                let entry = &self.services[key];
                ServiceSummary {
                    key: key.clone(),
                    instances: entry.instances.len(),
                    healthy: entry.healthy,
                    revision: entry.revision,
                }
            })
            .collect())
    }

    /// A service's settings, if the service exists.
    pub fn service_meta(&self, service: &ServiceKey) -> Option<&ServiceMeta> {
        self.services.get(service).map(|e| &e.meta)
    }

    /// A service's revision (the stamp of its last change), `None` if it does not
    /// exist. Equal revisions mean equal query answers (for the same filters), so
    /// readers may cache answers by it.
    pub fn service_revision(&self, service: &ServiceKey) -> Option<u64> {
        self.services.get(service).map(|e| e.revision)
    }

    /// Number of services.
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Number of instances, over all services.
    pub fn instance_count(&self) -> usize {
        self.instance_total
    }

    /// Every service with its settings and instances, sorted by key and instance key:
    /// two registries with the same content give equal dumps.
    pub fn dump(&self) -> Vec<(ServiceKey, ServiceMeta, Vec<Instance>)> {
        self.by_name
            .iter()
            .map(|key| (key, &self.services[key]))
            .map(|(key, entry)| {
                (
                    key.clone(),
                    entry.meta.clone(),
                    self.sorted_instances(entry)
                        .into_iter()
                        .map(|(_, inst)| inst)
                        .collect(),
                )
            })
            .collect()
    }
}

#[cfg(test)]
impl Registry {
    /// Checks that the indexes agree with the services; panics if not.
    pub(crate) fn check_invariants(&self) {
        let mut sessions: HashMap<SessionId, foldhash::HashSet<(u32, Key)>> = HashMap::new();
        let mut deadlines = BTreeSet::new();
        let mut clusters: BTreeMap<String, usize> = BTreeMap::new();
        let mut total = 0;
        let mut ids = BTreeSet::new();
        assert_eq!(self.by_name.len(), self.services.len());
        assert!(self.by_name.iter().all(|k| self.services.contains_key(k)));
        for (service, entry) in &self.services {
            assert!(!entry.is_disposable(), "kept empty service {service}");
            assert!(entry.revision >= 1 && entry.revision < self.next_stamp);
            assert_eq!(self.service_key(entry.id), service);
            assert!(ids.insert(entry.id), "service id {} twice", entry.id);
            let mut sum = 0u64;
            assert_eq!(
                entry.healthy,
                entry.instances.values().filter(|s| s.healthy()).count(),
                "healthy count of {service}"
            );
            for (k, slot) in &entry.instances {
                let inst = self.materialize(k, slot);
                let key = inst.key();
                assert_eq!(self.find_key(&key), Some(*k));
                assert_eq!(canonical_ip(&key.ip).unwrap(), key.ip);
                *clusters.entry(key.cluster.clone()).or_default() += 1;
                total += 1;
                assert!(inst.stamp <= entry.revision);
                assert!(slot.version.time <= self.hlc);
                assert!(slot
                    .extra
                    .as_ref()
                    .is_none_or(|e| !e.metadata.is_empty() || e.ttl.is_some()));
                sum =
                    sum.wrapping_add(instance_hash(&key.cluster, &key.ip, key.port, slot.version));
                let lapsed = slot.lapsed().is_some();
                match &inst.lease {
                    Lease::Session(s) => {
                        assert!(!lapsed);
                        sessions.entry(*s).or_default().insert((entry.id, *k));
                    }
                    Lease::Ttl(_) => {
                        assert_eq!(slot.session, NO_SESSION);
                        if lapsed {
                            assert!(!inst.healthy, "lapsed {key} reads healthy");
                        }
                        deadlines.insert((slot.due_ms().unwrap(), entry.id, *k));
                    }
                }
            }
            // The digest sum agrees with the content.
            assert_eq!(
                entry.meta_stamp == Stamp::ZERO,
                entry.meta == ServiceMeta::default()
            );
            if entry.meta_stamp != Stamp::ZERO {
                sum = sum.wrapping_add(meta_hash(entry.meta_stamp));
            }
            assert_eq!(sum, entry.sum, "digest sum of {service}");
        }
        assert_eq!(total, self.instance_total);
        assert_eq!(
            self.service_keys.iter().flatten().count(),
            self.services.len()
        );
        assert_eq!(sessions, self.index.sessions.all());
        assert_eq!(deadlines, self.index.deadlines);
        // Tombstones: never beside a live record; each indexed for collection.
        let mut gc = BTreeSet::new();
        for (service, t) in &self.tombs {
            assert!(!t.is_empty());
            for (k, tomb) in &t.instances {
                let key = self.public_key(k);
                assert_eq!(self.find_key(&key), Some(*k));
                *clusters.entry(key.cluster.clone()).or_default() += 1;
                assert!(
                    self.find_slot(service, &key).is_none(),
                    "{key} live and dead"
                );
                gc.insert((tomb.deleted_at_ms, Some(*k), service.clone()));
            }
            if let Some(tomb) = t.meta {
                assert_eq!(
                    self.services
                        .get(service)
                        .map_or(Stamp::ZERO, |e| e.meta_stamp),
                    Stamp::ZERO
                );
                gc.insert((tomb.deleted_at_ms, None, service.clone()));
            }
        }
        assert_eq!(gc.len(), self.tomb_total);
        let queued: BTreeSet<_> = self.tomb_gc.iter().cloned().collect();
        assert!(
            gc.is_subset(&queued),
            "a tombstone not queued for collection"
        );
        assert_eq!(clusters, self.clusters.uses());
        let placed: BTreeSet<(u64, ServiceKey)> = self
            .services
            .keys()
            .chain(self.tombs.keys())
            .map(|k| (self.placement_of(k), k.clone()))
            .collect();
        assert_eq!(placed, self.placed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S1: SessionId = SessionId(1);
    const S2: SessionId = SessionId(2);

    fn reg() -> Registry {
        Registry::new(Limits::default())
    }

    fn svc(name: &str) -> ServiceKey {
        ServiceKey::named(name)
    }

    fn spec(ip: &str, port: u16) -> InstanceSpec {
        InstanceSpec::new(ip, port)
    }

    fn ttl_spec(ip: &str, port: u16) -> InstanceSpec {
        InstanceSpec {
            ttl: Some(TtlLease::default()),
            ..spec(ip, port)
        }
    }

    fn ikey(ip: &str, port: u16) -> InstanceKey {
        spec(ip, port).key()
    }

    fn all(r: &Registry, s: &ServiceKey) -> Vec<Instance> {
        r.query(s, &[], false).unwrap().instances
    }

    fn one(r: &Registry, s: &ServiceKey, k: &InstanceKey) -> Instance {
        r.instance(s, k).expect("instance present")
    }

    #[test]
    fn new_registry() {
        let r = reg();
        assert_eq!(r.namespaces(), vec!["public".to_string()]);
        assert_eq!(r.service_count(), 0);
        assert_eq!(r.instance_count(), 0);
        assert_eq!(r.last_stamp(), 0);
        assert_eq!(r.limits(), &Limits::default());
        assert!(r.dump().is_empty());
    }

    #[test]
    fn namespaces() {
        let mut r = reg();
        assert!(r.add_namespace("dev").unwrap());
        assert!(!r.add_namespace("dev").unwrap());
        assert!(!r.add_namespace("public").unwrap());
        assert!(matches!(
            r.add_namespace("bad ns"),
            Err(StorageError::InvalidName {
                what: "namespace",
                ..
            })
        ));
        assert_eq!(
            r.namespaces(),
            vec!["dev".to_string(), "public".to_string()]
        );
        let k = ServiceKey::new("dev", "g", "s");
        r.register(&k, spec("10.0.0.1", 80), S1, 0).unwrap();
        assert_eq!(all(&r, &k).len(), 1);
    }

    #[test]
    fn register_and_query() {
        let mut r = reg();
        let s = svc("orders");
        let c = r.register(&s, spec("10.0.0.1", 80), S1, 5).unwrap();
        assert_eq!(
            c,
            Change {
                key: s.clone(),
                revision: 1
            }
        );
        let v = r.query(&s, &[], true).unwrap();
        assert_eq!(v.key, s);
        assert_eq!(v.revision, 1);
        assert!(!v.protected);
        assert_eq!(
            v.instances,
            vec![Instance {
                ip: "10.0.0.1".into(),
                port: 80,
                cluster: DEFAULT_CLUSTER.into(),
                weight: 1.0,
                healthy: true,
                enabled: true,
                metadata: BTreeMap::new(),
                // Answers never carry a session id.
                lease: Lease::Session(SessionId(0)),
                last_beat_ms: 5,
                stamp: 1,
            }]
        );
        assert_eq!(one(&r, &s, &ikey("10.0.0.1", 80)).lease, Lease::Session(S1));
        assert_eq!(r.session_instance_count(S1), 1);
        assert_eq!(r.service_count(), 1);
        assert_eq!(r.instance_count(), 1);
        r.check_invariants();
    }

    #[test]
    fn replace_instance() {
        let mut r = reg();
        let s = svc("orders");
        r.register(&s, spec("10.0.0.1", 80), S1, 0).unwrap();
        let mut sp = spec("10.0.0.1", 80);
        sp.weight = 3.0;
        sp.metadata.insert("v".into(), "2".into());
        let c = r.register(&s, sp, S1, 7).unwrap();
        assert_eq!(c.revision, 2);
        let v = all(&r, &s);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].weight, 3.0);
        assert_eq!(v[0].metadata["v"], "2");
        assert_eq!(v[0].last_beat_ms, 7);
        assert_eq!(v[0].stamp, 2);
        assert_eq!(r.session_instance_count(S1), 1);
        r.check_invariants();
    }

    #[test]
    fn replace_moves_session_index() {
        let mut r = reg();
        let (a, b) = (svc("a"), svc("b"));
        let k = ikey("10.0.0.1", 80);
        r.register(&a, spec("10.0.0.1", 80), S1, 0).unwrap();
        r.register(&b, spec("10.0.0.1", 80), S1, 0).unwrap();
        assert_eq!(r.session_instance_count(S1), 2);

        // Another session takes over a's instance.
        r.register(&a, spec("10.0.0.1", 80), S2, 0).unwrap();
        assert_eq!(r.session_instance_count(S1), 1);
        assert_eq!(r.session_instance_count(S2), 1);
        assert_eq!(one(&r, &a, &k).lease, Lease::Session(S2));
        r.check_invariants();

        // A Ttl registration takes over b's.
        r.register(&b, ttl_spec("10.0.0.1", 80), S1, 0).unwrap();
        assert_eq!(r.session_instance_count(S1), 0);
        assert!(matches!(one(&r, &b, &k).lease, Lease::Ttl(_)));
        r.check_invariants();

        // Removing S1 now touches nothing.
        assert!(r.remove_session(S1).is_empty());
        assert_eq!(r.instance_count(), 2);

        // And a session registration takes b back from Ttl: no expiry any more.
        r.register(&b, spec("10.0.0.1", 80), S1, 0).unwrap();
        assert_eq!(r.session_instance_count(S1), 1);
        assert!(r.expire(1_000_000).is_empty());
        assert_eq!(r.instance_count(), 2);
        r.check_invariants();
    }

    #[test]
    fn update_instance() {
        let mut r = reg();
        let s = svc("orders");
        let k = ikey("10.0.0.1", 80);
        r.register(&s, ttl_spec("10.0.0.1", 80), S1, 100).unwrap();
        let mut sp = spec("10.0.0.1", 80); // no ttl: the lease is kept anyway
        sp.weight = 0.0;
        sp.healthy = false;
        sp.enabled = false;
        sp.metadata.insert("k".into(), "v".into());
        let c = r.update(&s, sp, 900).unwrap();
        assert_eq!(c.revision, 2);
        let i = one(&r, &s, &k);
        assert_eq!(i.weight, 0.0);
        assert!(!i.healthy);
        assert!(!i.enabled);
        assert_eq!(i.metadata["k"], "v");
        assert_eq!(i.lease, Lease::Ttl(TtlLease::default()));
        assert_eq!(i.last_beat_ms, 100);
        assert_eq!(i.stamp, 2);
        r.check_invariants();
    }

    #[test]
    fn update_not_found() {
        let mut r = reg();
        let s = svc("orders");
        assert!(matches!(
            r.update(&s, spec("10.0.0.1", 80), 0),
            Err(StorageError::NotFound(_))
        ));
        r.register(&s, spec("10.0.0.1", 80), S1, 0).unwrap();
        let err = r.update(&s, spec("10.0.0.1", 81), 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "not found: instance DEFAULT/10.0.0.1:81 is not registered in service public/DEFAULT_GROUP/orders"
        );
    }

    #[test]
    fn deregister_instance() {
        let mut r = reg();
        let s = svc("orders");
        r.register(&s, spec("10.0.0.1", 80), S1, 0).unwrap();
        r.register(&s, spec("10.0.0.2", 80), S1, 0).unwrap();
        let c = r.deregister(&s, &ikey("10.0.0.1", 80)).unwrap();
        assert_eq!(c.revision, 3);
        assert_eq!(all(&r, &s).len(), 1);
        assert_eq!(r.session_instance_count(S1), 1);
        assert!(matches!(
            r.deregister(&s, &ikey("10.0.0.1", 80)),
            Err(StorageError::NotFound(_))
        ));
        r.check_invariants();

        // The last instance goes: the service goes with it.
        let c = r.deregister(&s, &ikey("10.0.0.2", 80)).unwrap();
        assert_eq!(c.revision, 4);
        assert_eq!(r.service_count(), 0);
        assert_eq!(r.session_instance_count(S1), 0);
        let v = r.query(&s, &[], false).unwrap();
        assert_eq!(v.revision, 0);
        assert!(v.instances.is_empty());
        assert!(matches!(
            r.deregister(&s, &ikey("10.0.0.2", 80)),
            Err(StorageError::NotFound(_))
        ));
        r.check_invariants();
    }

    #[test]
    fn ip_spellings_name_the_same_instance() {
        let mut r = reg();
        let s = svc("v6");
        r.register(&s, spec("0:0:0:0:0:0:0:1", 80), S1, 0).unwrap();
        r.register(&s, spec("::1", 80), S1, 0).unwrap();
        let v = all(&r, &s);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].ip, "::1");
        r.deregister(&s, &ikey("0::1", 80)).unwrap();
        assert_eq!(r.instance_count(), 0);
        r.check_invariants();
    }

    #[test]
    fn remove_session_across_services() {
        let mut r = reg();
        let (a, b, c) = (svc("a"), svc("b"), svc("c"));
        r.register(&a, spec("10.0.0.1", 80), S1, 0).unwrap();
        r.register(&a, spec("10.0.0.1", 81), S1, 0).unwrap();
        r.register(&a, spec("10.0.0.2", 80), S2, 0).unwrap();
        r.register(&b, spec("10.0.0.1", 80), S1, 0).unwrap();
        r.register(&c, spec("10.0.0.3", 80), S2, 0).unwrap();
        r.register(&c, ttl_spec("10.0.0.4", 80), S1, 0).unwrap();
        assert_eq!(r.session_instance_count(S1), 3);
        assert_eq!(r.session_instance_count(S2), 2);

        let changes = r.remove_session(S1);
        assert_eq!(
            changes,
            vec![
                Change {
                    key: a.clone(),
                    revision: 7
                },
                Change {
                    key: b.clone(),
                    revision: 8
                },
            ]
        );
        assert_eq!(r.session_instance_count(S1), 0);
        assert_eq!(r.session_instance_count(S2), 2);
        let left: Vec<_> = all(&r, &a).iter().map(Instance::key).collect();
        assert_eq!(left, vec![ikey("10.0.0.2", 80)]);
        assert_eq!(r.query(&b, &[], false).unwrap().revision, 0);
        assert_eq!(r.service_count(), 2);
        // The Ttl instance registered over S1's connection is not bound to it.
        assert_eq!(all(&r, &c).len(), 2);
        assert!(r.remove_session(S1).is_empty());
        r.check_invariants();
    }

    #[test]
    fn ttl_unhealthy_then_removed() {
        let mut r = reg();
        let s = svc("legacy");
        let k = ikey("10.0.0.1", 80);
        r.register(&s, ttl_spec("10.0.0.1", 80), S1, 0).unwrap();
        assert_eq!(r.session_instance_count(S1), 0);
        assert!(r.expire(14_999).is_empty());
        assert!(one(&r, &s, &k).healthy);

        let c = r.expire(15_000);
        assert_eq!(
            c,
            vec![Change {
                key: s.clone(),
                revision: 2
            }]
        );
        let i = one(&r, &s, &k);
        assert!(!i.healthy);
        assert_eq!(i.stamp, 2);
        // Marked once: no further change until removal.
        assert!(r.expire(20_000).is_empty());
        assert!(r.expire(29_999).is_empty());
        r.check_invariants();

        let c = r.expire(30_000);
        assert_eq!(
            c,
            vec![Change {
                key: s.clone(),
                revision: 3
            }]
        );
        assert_eq!(r.instance_count(), 0);
        assert_eq!(r.service_count(), 0);
        assert!(matches!(
            r.beat(&s, &k, 30_001),
            Err(StorageError::NotFound(_))
        ));
        r.check_invariants();
    }

    #[test]
    fn ttl_removed_in_one_step_when_expire_is_late() {
        let mut r = reg();
        let s = svc("legacy");
        r.register(&s, ttl_spec("10.0.0.1", 80), S1, 0).unwrap();
        r.register(&s, ttl_spec("10.0.0.2", 80), S1, 20_000)
            .unwrap();
        // One pass removes the first and marks nothing else: one change.
        let c = r.expire(31_000);
        assert_eq!(c.len(), 1);
        let v = all(&r, &s);
        assert_eq!(v.len(), 1);
        assert!(v[0].healthy);
        // Then the second lapses and is removed.
        assert_eq!(r.expire(35_000).len(), 1);
        assert!(!all(&r, &s)[0].healthy);
        assert_eq!(r.expire(50_000).len(), 1);
        assert_eq!(r.service_count(), 0);
        r.check_invariants();
    }

    #[test]
    fn ttl_equal_timings() {
        let mut r = reg();
        let s = svc("legacy");
        let mut sp = ttl_spec("10.0.0.1", 80);
        sp.ttl = Some(TtlLease {
            unhealthy_after_ms: 10,
            remove_after_ms: 10,
        });
        r.register(&s, sp, S1, 0).unwrap();
        assert!(r.expire(9).is_empty());
        assert_eq!(r.expire(10).len(), 1);
        assert_eq!(r.instance_count(), 0);
        r.check_invariants();
    }

    #[test]
    fn beat_refreshes_and_revives() {
        let mut r = reg();
        let s = svc("legacy");
        let k = ikey("10.0.0.1", 80);
        r.register(&s, ttl_spec("10.0.0.1", 80), S1, 0).unwrap();

        // A beat in time changes nothing visible but moves the deadlines.
        assert_eq!(r.beat(&s, &k, 10_000).unwrap(), None);
        assert_eq!(one(&r, &s, &k).last_beat_ms, 10_000);
        assert_eq!(one(&r, &s, &k).stamp, 1);
        assert!(r.expire(15_000).is_empty());
        assert!(r.expire(24_999).is_empty());
        assert_eq!(r.expire(25_000).len(), 1);
        assert!(!one(&r, &s, &k).healthy);
        r.check_invariants();

        // A beat revives an instance expiry marked unhealthy.
        let c = r.beat(&s, &k, 26_000).unwrap();
        assert_eq!(
            c,
            Some(Change {
                key: s.clone(),
                revision: 3
            })
        );
        let i = one(&r, &s, &k);
        assert!(i.healthy);
        assert_eq!(i.stamp, 3);
        assert_eq!(i.last_beat_ms, 26_000);
        // And its deadlines start over.
        assert!(r.expire(40_999).is_empty());
        assert_eq!(r.expire(41_000).len(), 1);
        r.check_invariants();

        // A stale beat does not move the last beat backwards.
        r.beat(&s, &k, 42_000).unwrap();
        r.beat(&s, &k, 1_000).unwrap();
        assert_eq!(one(&r, &s, &k).last_beat_ms, 42_000);
        r.check_invariants();
    }

    #[test]
    fn beat_keeps_client_declared_unhealthy() {
        let mut r = reg();
        let s = svc("legacy");
        let k = ikey("10.0.0.1", 80);
        let mut sp = ttl_spec("10.0.0.1", 80);
        sp.healthy = false;
        r.register(&s, sp, S1, 0).unwrap();
        // Already unhealthy: lapsing is no change.
        assert!(r.expire(15_000).is_empty());
        assert_eq!(r.beat(&s, &k, 16_000).unwrap(), None);
        assert!(!one(&r, &s, &k).healthy);
        r.check_invariants();

        // Declared unhealthy by update while healthy: a beat does not revive it either.
        r.register(&s, ttl_spec("10.0.0.2", 80), S1, 16_000)
            .unwrap();
        let mut sp = spec("10.0.0.2", 80);
        sp.healthy = false;
        r.update(&s, sp, 16_000).unwrap();
        assert_eq!(r.beat(&s, &ikey("10.0.0.2", 80), 17_000).unwrap(), None);
        assert!(!one(&r, &s, &ikey("10.0.0.2", 80)).healthy);
        r.check_invariants();
    }

    #[test]
    fn update_while_lapsed() {
        let mut r = reg();
        let s = svc("legacy");
        let k = ikey("10.0.0.1", 80);
        r.register(&s, ttl_spec("10.0.0.1", 80), S1, 0).unwrap();
        assert_eq!(r.expire(15_000).len(), 1);

        // Declaring unhealthy while lapsed: the next beat keeps it unhealthy.
        let mut sp = spec("10.0.0.1", 80);
        sp.healthy = false;
        r.update(&s, sp.clone(), 15_500).unwrap();
        assert!(!one(&r, &s, &k).healthy);
        // Declaring healthy while lapsed: still unhealthy until a beat.
        sp.healthy = true;
        r.update(&s, sp.clone(), 15_600).unwrap();
        assert!(!one(&r, &s, &k).healthy);
        r.check_invariants();
        assert!(r.beat(&s, &k, 16_000).unwrap().is_some());
        assert!(one(&r, &s, &k).healthy);

        // Lapse again, declare unhealthy, beat: stays unhealthy.
        assert_eq!(r.expire(31_000).len(), 1);
        sp.healthy = false;
        r.update(&s, sp, 31_500).unwrap();
        assert_eq!(r.beat(&s, &k, 32_000).unwrap(), None);
        assert!(!one(&r, &s, &k).healthy);
        r.check_invariants();
    }

    #[test]
    fn beat_session_instance_and_not_found() {
        let mut r = reg();
        let s = svc("orders");
        let k = ikey("10.0.0.1", 80);
        assert!(matches!(r.beat(&s, &k, 0), Err(StorageError::NotFound(_))));
        r.register(&s, spec("10.0.0.1", 80), S1, 0).unwrap();
        let before = r.dump();
        assert_eq!(r.beat(&s, &k, 99).unwrap(), None);
        assert_eq!(r.dump(), before);
        assert!(matches!(
            r.beat(&s, &ikey("10.0.0.1", 81), 0),
            Err(StorageError::NotFound(_))
        ));
    }

    /// Four enabled instances of which one healthy, plus a disabled healthy one.
    fn protection_setup(threshold: f64) -> (Registry, ServiceKey) {
        let mut r = reg();
        let s = svc("orders");
        for (n, healthy, enabled) in [
            (1, true, true),
            (2, false, true),
            (3, false, true),
            (4, false, true),
            (5, true, false),
        ] {
            let mut sp = spec(&format!("10.0.0.{n}"), 80);
            sp.healthy = healthy;
            sp.enabled = enabled;
            r.register(&s, sp, S1, 0).unwrap();
        }
        r.set_service_meta(
            &s,
            ServiceMeta {
                protect_threshold: threshold,
                metadata: BTreeMap::new(),
            },
        )
        .unwrap();
        (r, s)
    }

    fn ips(v: &ServiceView) -> Vec<String> {
        v.instances.iter().map(|i| i.ip.clone()).collect()
    }

    #[test]
    fn protection_off() {
        let (r, s) = protection_setup(0.0);
        let v = r.query(&s, &[], true).unwrap();
        assert!(!v.protected);
        assert_eq!(ips(&v), vec!["10.0.0.1"]);
        // Without healthy_only: everything, disabled included, never protected.
        let v = r.query(&s, &[], false).unwrap();
        assert!(!v.protected);
        assert_eq!(v.instances.len(), 5);
    }

    #[test]
    fn protection_below_share() {
        // Healthy share 1/4 = 0.25 is above 0.2: no protection.
        let (r, s) = protection_setup(0.2);
        let v = r.query(&s, &[], true).unwrap();
        assert!(!v.protected);
        assert_eq!(ips(&v), vec!["10.0.0.1"]);
    }

    #[test]
    fn protection_on() {
        for t in [0.25, 0.5, 1.0] {
            let (r, s) = protection_setup(t);
            let v = r.query(&s, &[], true).unwrap();
            assert!(v.protected, "threshold {t}");
            // All enabled instances, sorted; the disabled one still left out.
            assert_eq!(
                ips(&v),
                vec!["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
            );
            let v = r.query(&s, &[], false).unwrap();
            assert!(!v.protected);
            assert_eq!(v.instances.len(), 5);
        }
    }

    #[test]
    fn protection_with_no_enabled_instance() {
        let mut r = reg();
        let s = svc("orders");
        let mut sp = spec("10.0.0.1", 80);
        sp.enabled = false;
        r.register(&s, sp, S1, 0).unwrap();
        r.set_service_meta(
            &s,
            ServiceMeta {
                protect_threshold: 1.0,
                metadata: BTreeMap::new(),
            },
        )
        .unwrap();
        let v = r.query(&s, &[], true).unwrap();
        assert!(!v.protected);
        assert!(v.instances.is_empty());
    }

    #[test]
    fn cluster_filter() {
        let mut r = reg();
        let s = svc("orders");
        for (cluster, ip) in [
            ("b", "10.0.0.2"),
            ("a", "10.0.0.9"),
            ("a", "10.0.0.1"),
            ("c", "10.0.0.3"),
        ] {
            let mut sp = spec(ip, 80);
            sp.cluster = cluster.into();
            r.register(&s, sp, S1, 0).unwrap();
        }
        let v = r.query(&s, &["c".into(), "a".into()], false).unwrap();
        let keys: Vec<_> = v
            .instances
            .iter()
            .map(|i| (i.cluster.as_str(), i.ip.as_str()))
            .collect();
        assert_eq!(
            keys,
            vec![("a", "10.0.0.1"), ("a", "10.0.0.9"), ("c", "10.0.0.3")]
        );
        assert!(r
            .query(&s, &["zz".into()], true)
            .unwrap()
            .instances
            .is_empty());
        assert!(matches!(
            r.query(&s, &["".into()], true),
            Err(StorageError::InvalidName {
                what: "cluster",
                ..
            })
        ));
        // Protection counts only the selected clusters.
        let mut sp = spec("10.0.0.2", 80);
        sp.cluster = "b".into();
        sp.healthy = false;
        r.update(&s, sp, 0).unwrap();
        r.set_service_meta(
            &s,
            ServiceMeta {
                protect_threshold: 0.5,
                metadata: BTreeMap::new(),
            },
        )
        .unwrap();
        let v = r.query(&s, &["b".into()], true).unwrap();
        assert!(v.protected);
        assert_eq!(v.instances.len(), 1);
        let v = r.query(&s, &["a".into()], true).unwrap();
        assert!(!v.protected);
        assert_eq!(v.instances.len(), 2);
    }

    #[test]
    fn service_meta_lifecycle() {
        let mut r = reg();
        let s = svc("orders");
        assert_eq!(r.service_meta(&s), None);
        let mut meta = ServiceMeta {
            protect_threshold: 0.5,
            metadata: BTreeMap::new(),
        };
        meta.metadata.insert("owner".into(), "team-a".into());
        let c = r.set_service_meta(&s, meta.clone()).unwrap();
        assert_eq!(c.revision, 1);
        // A service with settings and no instances is kept.
        assert_eq!(r.service_meta(&s), Some(&meta));
        assert_eq!(r.service_count(), 1);
        assert_eq!(r.query(&s, &[], true).unwrap().revision, 1);
        r.register(&s, spec("10.0.0.1", 80), S1, 0).unwrap();
        r.deregister(&s, &ikey("10.0.0.1", 80)).unwrap();
        assert_eq!(r.service_meta(&s), Some(&meta));
        // Back to defaults with no instances: the service is dropped.
        let c = r.set_service_meta(&s, ServiceMeta::default()).unwrap();
        assert_eq!(c.revision, 4);
        assert_eq!(r.service_meta(&s), None);
        assert_eq!(r.service_count(), 0);
        r.check_invariants();
    }

    #[test]
    fn revisions_strictly_increase() {
        let mut r = reg();
        let (a, b) = (svc("a"), svc("b"));
        let k = ikey("10.0.0.1", 80);
        let mut revs = vec![
            r.register(&a, spec("10.0.0.1", 80), S1, 0)
                .unwrap()
                .revision,
            r.register(&b, ttl_spec("10.0.0.1", 80), S1, 0)
                .unwrap()
                .revision,
            r.update(&a, spec("10.0.0.1", 80), 0).unwrap().revision,
            r.deregister(&a, &k).unwrap().revision,
            // a is gone; re-creating it continues above its last revision.
            r.register(&a, spec("10.0.0.1", 80), S2, 0)
                .unwrap()
                .revision,
        ];
        assert_eq!(r.query(&a, &[], false).unwrap().revision, 5);
        revs.extend(r.expire(15_000).iter().map(|c| c.revision));
        revs.push(r.beat(&b, &k, 16_000).unwrap().unwrap().revision);
        revs.push(
            r.set_service_meta(&b, ServiceMeta::default())
                .unwrap()
                .revision,
        );
        revs.extend(r.remove_session(S2).iter().map(|c| c.revision));
        revs.extend(r.expire(100_000).iter().map(|c| c.revision));
        assert_eq!(revs, (1..=10).collect::<Vec<u64>>());
        assert_eq!(r.last_stamp(), 10);
        assert_eq!(r.service_count(), 0);
        r.check_invariants();
    }

    #[test]
    fn unknown_namespace_on_every_operation() {
        let mut r = reg();
        let s = ServiceKey::new("nope", DEFAULT_GROUP, "orders");
        let k = ikey("10.0.0.1", 80);
        let unknown = || StorageError::UnknownNamespace("nope".into());
        assert_eq!(r.register(&s, spec("10.0.0.1", 80), S1, 0), Err(unknown()));
        assert_eq!(r.update(&s, spec("10.0.0.1", 80), 0), Err(unknown()));
        assert_eq!(r.deregister(&s, &k), Err(unknown()));
        assert_eq!(r.beat(&s, &k, 0), Err(unknown()));
        assert_eq!(
            r.set_service_meta(&s, ServiceMeta::default()),
            Err(unknown())
        );
        assert_eq!(r.query(&s, &[], true), Err(unknown()));
        assert_eq!(r.list_services("nope", None), Err(unknown()));
        assert_eq!(r.list_services("nope", Some("g")), Err(unknown()));
        assert_eq!(r.service_meta(&s), None);
        assert_eq!(r.last_stamp(), 0);
        assert!(r.dump().is_empty());

        // The key is validated before the namespace is looked up.
        let bad = ServiceKey::new("no pe", DEFAULT_GROUP, "orders");
        assert!(matches!(
            r.query(&bad, &[], true),
            Err(StorageError::InvalidName {
                what: "namespace",
                ..
            })
        ));
        let bad = ServiceKey::new("nope", DEFAULT_GROUP, "or/ders");
        assert!(matches!(
            r.register(&bad, spec("10.0.0.1", 80), S1, 0),
            Err(StorageError::InvalidName {
                what: "service",
                ..
            })
        ));
        // And the namespace before the instance.
        assert_eq!(r.register(&s, spec("bad", 80), S1, 0), Err(unknown()));
    }

    #[test]
    fn bad_requests_change_nothing() {
        let mut r = reg();
        let s = svc("orders");
        let k = ikey("10.0.0.1", 80);
        r.register(&s, spec("10.0.0.1", 80), S1, 0).unwrap();
        r.register(&s, ttl_spec("10.0.0.2", 80), S1, 0).unwrap();
        let before = r.dump();
        let stamp = r.last_stamp();

        let weird = |f: &dyn Fn(&mut InstanceSpec)| {
            let mut sp = spec("10.0.0.1", 80);
            f(&mut sp);
            sp
        };
        let bad_specs = [
            weird(&|s| s.port = 0),
            weird(&|s| s.ip = "10.0.0.300".into()),
            weird(&|s| s.weight = f64::NAN),
            weird(&|s| s.weight = -1.0),
            weird(&|s| s.cluster = "a b".into()),
            weird(&|s| {
                s.metadata.insert("".into(), "v".into());
            }),
            weird(&|s| {
                s.metadata.insert("k".into(), "v".repeat(1025));
            }),
            weird(&|s| {
                s.ttl = Some(TtlLease {
                    unhealthy_after_ms: 2,
                    remove_after_ms: 1,
                })
            }),
        ];
        for sp in bad_specs {
            assert!(r.register(&s, sp.clone(), S2, 1).is_err(), "{sp:?}");
            assert!(r.update(&s, sp, 1).is_err());
        }
        let bad_keys = [
            ServiceKey::new("", DEFAULT_GROUP, "orders"),
            ServiceKey::new(DEFAULT_NAMESPACE, "g g", "orders"),
            ServiceKey::new(DEFAULT_NAMESPACE, DEFAULT_GROUP, "x".repeat(129)),
        ];
        for bk in &bad_keys {
            assert!(r.register(bk, spec("10.0.0.1", 80), S2, 1).is_err());
            assert!(r.deregister(bk, &k).is_err());
            assert!(r.beat(bk, &k, 1).is_err());
            assert!(r.set_service_meta(bk, ServiceMeta::default()).is_err());
        }
        assert_eq!(
            r.deregister(&s, &ikey("10.0.0.1", 0)),
            Err(StorageError::InvalidPort(0))
        );
        assert_eq!(
            r.beat(&s, &ikey("nonsense", 80), 1),
            Err(StorageError::InvalidIp("nonsense".into()))
        );
        assert!(r.deregister(&s, &ikey("10.0.0.9", 80)).is_err());
        assert!(r.beat(&s, &ikey("10.0.0.9", 80), 1).is_err());
        assert!(r.update(&s, spec("10.0.0.9", 80), 1).is_err());
        for t in [f64::NAN, -0.1, 1.5] {
            let meta = ServiceMeta {
                protect_threshold: t,
                metadata: BTreeMap::new(),
            };
            assert!(matches!(
                r.set_service_meta(&s, meta),
                Err(StorageError::InvalidSetting(_))
            ));
        }
        let mut meta = ServiceMeta::default();
        for i in 0..65 {
            meta.metadata.insert(format!("k{i}"), String::new());
        }
        assert!(matches!(
            r.set_service_meta(&s, meta),
            Err(StorageError::InvalidMetadata(_))
        ));
        assert!(r.add_namespace("").is_err());
        assert!(r.list_services("", None).is_err());
        assert!(r.list_services(DEFAULT_NAMESPACE, Some("a b")).is_err());

        assert_eq!(r.dump(), before);
        assert_eq!(r.last_stamp(), stamp);
        assert_eq!(r.namespaces(), vec![DEFAULT_NAMESPACE.to_string()]);
        assert_eq!(r.session_instance_count(S2), 0);
        // No stamp was taken: the next change is the next revision.
        let c = r.deregister(&s, &k).unwrap();
        assert_eq!(c.revision, stamp + 1);
        r.check_invariants();
    }

    #[test]
    fn list_services_sorted_with_counts() {
        let mut r = reg();
        r.add_namespace("dev").unwrap();
        let keys = [
            ServiceKey::new("public", "g2", "a"),
            ServiceKey::new("public", "g1", "b"),
            ServiceKey::new("public", "g1", "a"),
            ServiceKey::new("dev", "g1", "a"),
            ServiceKey::new("public", "g10", "z"),
        ];
        for k in &keys {
            r.register(k, spec("10.0.0.1", 80), S1, 0).unwrap();
        }
        let mut sp = spec("10.0.0.2", 80);
        sp.healthy = false;
        r.register(&keys[2], sp, S1, 0).unwrap();

        let list = r.list_services("public", None).unwrap();
        let names: Vec<_> = list
            .iter()
            .map(|s| (s.key.group.as_str(), s.key.service.as_str()))
            .collect();
        assert_eq!(
            names,
            vec![("g1", "a"), ("g1", "b"), ("g10", "z"), ("g2", "a")]
        );
        assert_eq!(
            list[0],
            ServiceSummary {
                key: keys[2].clone(),
                instances: 2,
                healthy: 1,
                revision: 6,
            }
        );
        let g1: Vec<_> = r
            .list_services("public", Some("g1"))
            .unwrap()
            .into_iter()
            .map(|s| s.key)
            .collect();
        assert_eq!(g1, vec![keys[2].clone(), keys[1].clone()]);
        assert!(r.list_services("public", Some("g3")).unwrap().is_empty());
        assert_eq!(r.list_services("dev", None).unwrap().len(), 1);
    }

    #[test]
    fn dump_is_sorted_and_deterministic() {
        let build = |order: &[usize]| {
            let mut r = reg();
            let items = [
                (svc("b"), "10.0.0.2"),
                (svc("a"), "10.0.0.9"),
                (svc("a"), "10.0.0.1"),
                (ServiceKey::new("public", "A", "z"), "::1"),
            ];
            for &i in order {
                r.register(&items[i].0, spec(items[i].1, 80), S1, 0)
                    .unwrap();
            }
            r
        };
        let d = build(&[0, 1, 2, 3]).dump();
        let keys: Vec<_> = d
            .iter()
            .map(|(k, _, inst)| {
                (
                    k.to_string(),
                    inst.iter().map(|i| i.ip.clone()).collect::<Vec<_>>(),
                )
            })
            .collect();
        assert_eq!(
            keys,
            vec![
                ("public/A/z".to_string(), vec!["::1".to_string()]),
                (
                    "public/DEFAULT_GROUP/a".to_string(),
                    vec!["10.0.0.1".to_string(), "10.0.0.9".to_string()]
                ),
                (
                    "public/DEFAULT_GROUP/b".to_string(),
                    vec!["10.0.0.2".to_string()]
                ),
            ]
        );
        // Same operations in the same order: equal dumps.
        assert_eq!(d, build(&[0, 1, 2, 3]).dump());
    }

    /// Random operations; the indexes must agree with the content after every one.
    #[test]
    fn random_operations_keep_indexes_consistent() {
        let mut r = reg();
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |n: u64| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) % n
        };
        let mut now = 0u64;
        let mut last = 0u64;
        let mut collected = 0;
        for _ in 0..5_000 {
            let s = svc(&format!("s{}", next(4)));
            let ip = format!("10.0.0.{}", next(6));
            let session = SessionId(u128::from(next(3) as u8));
            let changes: Vec<Change> = match next(8) {
                0 | 1 => {
                    let mut sp = if next(2) == 0 {
                        spec(&ip, 80)
                    } else {
                        ttl_spec(&ip, 80)
                    };
                    sp.healthy = next(4) != 0;
                    vec![r.register(&s, sp, session, now).unwrap()]
                }
                2 => {
                    let mut sp = spec(&ip, 80);
                    sp.healthy = next(2) == 0;
                    r.update(&s, sp, now).into_iter().collect()
                }
                3 => r.deregister(&s, &ikey(&ip, 80)).into_iter().collect(),
                4 => r
                    .beat(&s, &ikey(&ip, 80), now)
                    .unwrap_or(None)
                    .into_iter()
                    .collect(),
                5 => r.remove_session(session),
                6 => {
                    now += next(20_000);
                    let changes = r.expire(now);
                    // Tombstones made again after an earlier one went must each go at
                    // their own time: none early, none left once due.
                    let ttl = r.repl.tombstone_ttl_ms;
                    let due = r
                        .tombs
                        .values()
                        .flat_map(|t| t.instances.values().chain(t.meta.iter()))
                        .filter(|t| t.deleted_at_ms.saturating_add(ttl) <= now)
                        .count();
                    assert_eq!(r.gc_tombstones(now), due);
                    collected += due;
                    changes
                }
                _ => {
                    let meta = ServiceMeta {
                        protect_threshold: if next(2) == 0 { 0.0 } else { 0.5 },
                        metadata: BTreeMap::new(),
                    };
                    vec![r.set_service_meta(&s, meta).unwrap()]
                }
            };
            for c in changes {
                assert!(c.revision > last);
                last = c.revision;
            }
            r.check_invariants();
        }
        assert!(collected > 100, "{collected} tombstones collected");
    }
}
