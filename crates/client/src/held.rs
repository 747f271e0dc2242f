//! What a client keeps per instance slot (a service and an instance key in it): its
//! session-bound registrations, to re-assert after a reconnect ([`Registrations`]), and
//! its recent deregistrations, to repeat ([`Slots`]).

use std::hash::BuildHasher;
use std::sync::Arc;

use foldhash::{HashMap, HashMapExt};
use hashbrown::hash_table::{Entry, HashTable};

use shoal_storage::{InstanceKey, InstanceSpec, ServiceKey};

/// Values by service, then by instance key: the recent deregistrations.
///
/// A call finds its service by reference and copies the service key only for a
/// service that holds nothing yet (one ordered map of `(service, instance)` pairs,
/// which the registrations once were, compared a dozen service keys per insert and
/// copied the key every time: docs/benchmarks.md, tenth series).
/// A service whose last slot goes is removed, so no service is ever held empty.
#[derive(Debug)]
pub(crate) struct Slots<V> {
    services: HashMap<ServiceKey, HashMap<InstanceKey, V>>,
}

impl<V> Default for Slots<V> {
    fn default() -> Self {
        Slots {
            services: HashMap::new(),
        }
    }
}

impl<V> Slots<V> {
    /// Sets the value of a slot; returns the one it replaced.
    pub(crate) fn insert(&mut self, service: &ServiceKey, key: InstanceKey, value: V) -> Option<V> {
        match self.services.get_mut(service) {
            Some(instances) => instances.insert(key, value),
            None => {
                let mut instances = HashMap::new();
                instances.insert(key, value);
                self.services.insert(service.clone(), instances);
                None
            }
        }
    }

    /// Removes a slot; returns its value.
    pub(crate) fn remove(&mut self, service: &ServiceKey, key: &InstanceKey) -> Option<V> {
        let instances = self.services.get_mut(service)?;
        let old = instances.remove(key)?;
        if instances.is_empty() {
            self.services.remove(service);
        }
        Some(old)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    pub(crate) fn clear(&mut self) {
        self.services.clear();
    }

    /// Every slot, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&ServiceKey, &InstanceKey, &V)> {
        self.services
            .iter()
            .flat_map(|(service, instances)| instances.iter().map(move |(k, v)| (service, k, v)))
    }

    /// Keeps only the slots whose value passes `keep`.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) {
        self.services.retain(|_, instances| {
            instances.retain(|_, v| keep(v));
            !instances.is_empty()
        });
    }
}

/// The session-bound registrations a client holds: each instance by service, found by
/// its own `(cluster, ip, port)`.
///
/// Every register call records its instance here before it is sent, so this is on the
/// path of each write: the record is the request's own copy of the instance (an `Arc`,
/// sent from there by reference), and it is found by the instance's fields, so no
/// separate [`InstanceKey`] is made for it. A copy of the instance and a key of two
/// strings per registration were most of what the record cost (docs/benchmarks.md,
/// thirty-fifth series). A service whose last instance goes is removed.
#[derive(Debug, Default)]
pub(crate) struct Registrations {
    /// Each service with its instances, found by the service's hash.
    services: HashTable<(ServiceKey, HashTable<Arc<InstanceSpec>>)>,
    hasher: foldhash::fast::RandomState,
}

/// The identity of an instance within its service, by reference.
type KeyRef<'a> = (&'a str, &'a str, u16);

fn spec_key(spec: &InstanceSpec) -> KeyRef<'_> {
    (&spec.cluster, &spec.ip, spec.port)
}

fn key_ref(key: &InstanceKey) -> KeyRef<'_> {
    (&key.cluster, &key.ip, key.port)
}

impl Registrations {
    /// The instances of `service`, if it holds any.
    fn instances(&mut self, service: &ServiceKey) -> Option<&mut HashTable<Arc<InstanceSpec>>> {
        let hash = self.hasher.hash_one(service);
        self.services
            .find_mut(hash, |(s, _)| s == service)
            .map(|(_, instances)| instances)
    }

    /// Holds `spec` in its slot; returns the one it replaced.
    pub(crate) fn insert(
        &mut self,
        service: &ServiceKey,
        spec: Arc<InstanceSpec>,
    ) -> Option<Arc<InstanceSpec>> {
        let hasher = &self.hasher;
        let (_, instances) = self
            .services
            .entry(
                hasher.hash_one(service),
                |(s, _)| s == service,
                |(s, _)| hasher.hash_one(s),
            )
            .or_insert_with(|| (service.clone(), HashTable::new()))
            .into_mut();
        let key = spec_key(&spec);
        match instances.entry(
            hasher.hash_one(key),
            |s| spec_key(s) == key,
            |s| hasher.hash_one(spec_key(s)),
        ) {
            Entry::Occupied(mut held) => Some(std::mem::replace(held.get_mut(), spec)),
            Entry::Vacant(slot) => {
                slot.insert(spec);
                None
            }
        }
    }

    /// Removes the instance `key` names; returns it.
    pub(crate) fn remove(
        &mut self,
        service: &ServiceKey,
        key: &InstanceKey,
    ) -> Option<Arc<InstanceSpec>> {
        let key = key_ref(key);
        let hash = self.hasher.hash_one(key);
        let service_hash = self.hasher.hash_one(service);
        let Ok(mut entry) = self
            .services
            .find_entry(service_hash, |(s, _)| s == service)
        else {
            return None;
        };
        let instances = &mut entry.get_mut().1;
        let (old, _) = instances
            .find_entry(hash, |s| spec_key(s) == key)
            .ok()?
            .remove();
        if instances.is_empty() {
            entry.remove();
        }
        Some(old)
    }

    pub(crate) fn get_mut(
        &mut self,
        service: &ServiceKey,
        key: &InstanceKey,
    ) -> Option<&mut Arc<InstanceSpec>> {
        let key = key_ref(key);
        let hash = self.hasher.hash_one(key);
        self.instances(service)?
            .find_mut(hash, |s| spec_key(s) == key)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    pub(crate) fn clear(&mut self) {
        self.services.clear();
    }

    /// Every registration, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&ServiceKey, &Arc<InstanceSpec>)> {
        self.services
            .iter()
            .flat_map(|(service, instances)| instances.iter().map(move |s| (service, s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str) -> ServiceKey {
        ServiceKey::new("public", "DEFAULT_GROUP", name)
    }

    fn instance(port: u16) -> InstanceKey {
        InstanceKey {
            cluster: "DEFAULT".into(),
            ip: "10.0.0.1".into(),
            port,
        }
    }

    #[test]
    fn insert_replace_remove_and_iterate() {
        let mut slots = Slots::default();
        assert!(slots.is_empty());
        assert_eq!(slots.insert(&service("a"), instance(1), 1), None);
        assert_eq!(slots.insert(&service("a"), instance(2), 2), None);
        assert_eq!(slots.insert(&service("b"), instance(1), 3), None);
        assert_eq!(slots.iter().count(), 3);
        assert_eq!(slots.insert(&service("a"), instance(1), 10), Some(1));
        assert_eq!(slots.iter().count(), 3);
        assert_eq!(slots.remove(&service("b"), &instance(1)), Some(3));
        assert_eq!(slots.remove(&service("b"), &instance(1)), None);
        assert_eq!(slots.remove(&service("c"), &instance(1)), None);
        assert_eq!(slots.iter().count(), 2);
        assert!(
            !slots.services.contains_key(&service("b")),
            "an emptied service goes"
        );
        let mut all: Vec<(String, u16, i32)> = slots
            .iter()
            .map(|(s, k, v)| (s.service.clone(), k.port, *v))
            .collect();
        all.sort();
        assert_eq!(all, vec![("a".into(), 1, 10), ("a".into(), 2, 2)]);
        slots.clear();
        assert!(slots.is_empty());
        assert_eq!(slots.iter().count(), 0);
    }

    #[test]
    fn retain_drops_emptied_services() {
        let mut slots = Slots::default();
        for port in 0..10u16 {
            slots.insert(
                &service(if port < 5 { "a" } else { "b" }),
                instance(port),
                port,
            );
        }
        slots.retain(|v| *v >= 7);
        assert_eq!(slots.iter().count(), 3);
        assert!(!slots.services.contains_key(&service("a")));
        slots.retain(|_| false);
        assert!(slots.is_empty());
    }

    #[test]
    fn registrations_by_the_instance_s_own_key() {
        let spec = |port: u16, weight: f64| {
            let mut s = InstanceSpec::new("10.0.0.1", port);
            s.weight = weight;
            Arc::new(s)
        };
        let mut regs = Registrations::default();
        assert!(regs.is_empty());
        assert!(regs.insert(&service("a"), spec(1, 1.0)).is_none());
        assert!(regs.insert(&service("a"), spec(2, 1.0)).is_none());
        assert!(regs.insert(&service("b"), spec(1, 1.0)).is_none());
        assert_eq!(regs.iter().count(), 3);
        // The same (cluster, ip, port) replaces; another cluster is another slot.
        let old = regs.insert(&service("a"), spec(1, 5.0)).expect("replaced");
        assert_eq!(old.weight, 1.0);
        let mut other = InstanceSpec::new("10.0.0.1", 1);
        other.cluster = "other".into();
        assert!(regs.insert(&service("a"), Arc::new(other)).is_none());
        assert_eq!(regs.iter().count(), 4);
        assert_eq!(
            regs.get_mut(&service("a"), &instance(1)).unwrap().weight,
            5.0
        );
        *regs.get_mut(&service("b"), &instance(1)).unwrap() = spec(1, 7.0);
        assert_eq!(
            regs.remove(&service("b"), &instance(1)).unwrap().weight,
            7.0
        );
        assert!(regs.remove(&service("b"), &instance(1)).is_none());
        assert!(regs.remove(&service("c"), &instance(1)).is_none());
        assert!(
            regs.instances(&service("b")).is_none(),
            "an emptied service goes"
        );
        assert_eq!(regs.services.len(), 1);
        let mut all: Vec<(String, String, u16)> = regs
            .iter()
            .map(|(s, i)| (s.service.clone(), i.cluster.clone(), i.port))
            .collect();
        all.sort();
        assert_eq!(
            all,
            vec![
                ("a".into(), "DEFAULT".into(), 1),
                ("a".into(), "DEFAULT".into(), 2),
                ("a".into(), "other".into(), 1)
            ]
        );
        // Many slots in one service: the table grows and still finds each.
        for port in 100..1100u16 {
            regs.insert(&service("big"), spec(port, 1.0));
        }
        for port in 100..1100u16 {
            assert!(regs.get_mut(&service("big"), &instance(port)).is_some());
        }
        regs.clear();
        assert!(regs.is_empty());
        assert_eq!(regs.iter().count(), 0);
    }
}
