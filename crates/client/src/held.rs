//! What a client keeps per instance slot (a service and an instance in it): its
//! session-bound registrations, to re-assert after a reconnect, and its recent
//! deregistrations, to repeat. Both are [`Slots`].

use std::hash::BuildHasher;
use std::sync::Arc;

use hashbrown::hash_table::{Entry, HashTable};

use shoal_storage::{InstanceKey, InstanceSpec, ServiceKey};

/// The identity of an instance within its service, by reference: `(cluster, ip, port)`.
type KeyRef<'a> = (&'a str, &'a str, u16);

fn key_ref(key: &InstanceKey) -> KeyRef<'_> {
    (&key.cluster, &key.ip, key.port)
}

/// A value held in [`Slots`], which names its own instance.
pub(crate) trait Slot {
    fn key(&self) -> KeyRef<'_>;
}

/// A registration: the instance itself, shared with the request that sent it.
impl Slot for Arc<InstanceSpec> {
    fn key(&self) -> KeyRef<'_> {
        (&self.cluster, &self.ip, self.port)
    }
}

/// A deregistration: the instance's key and what goes with it (when it was sent).
impl<T> Slot for (InstanceKey, T) {
    fn key(&self) -> KeyRef<'_> {
        key_ref(&self.0)
    }
}

/// Values by service, then by the instance each names.
///
/// Every register call records its instance here before it is sent, so this is on the
/// path of each write: the record is the request's own copy of the instance (an `Arc`,
/// sent from there by reference), found by the instance's own fields, so no separate
/// [`InstanceKey`] is made for it (a copy of the instance and a key of two strings per
/// registration were most of what the record cost: docs/benchmarks.md, thirty-fifth
/// series). A call copies the service key only for a service that holds nothing yet
/// (one ordered map of `(service, instance)` pairs compared a dozen service keys per
/// insert and copied the key every time: tenth series). A service whose last slot goes
/// is removed, so no service is ever held empty.
#[derive(Debug)]
pub(crate) struct Slots<V> {
    /// Each service with its slots, found by the service's hash.
    services: HashTable<(ServiceKey, HashTable<V>)>,
    hasher: foldhash::fast::RandomState,
}

impl<V> Default for Slots<V> {
    fn default() -> Self {
        Slots {
            services: HashTable::new(),
            hasher: Default::default(),
        }
    }
}

impl<V: Slot> Slots<V> {
    /// The slots of `service`, if it holds any.
    fn instances(&mut self, service: &ServiceKey) -> Option<&mut HashTable<V>> {
        let hash = self.hasher.hash_one(service);
        self.services
            .find_mut(hash, |(s, _)| s == service)
            .map(|(_, instances)| instances)
    }

    /// Holds `value` in the slot it names; returns the one it replaced.
    pub(crate) fn insert(&mut self, service: &ServiceKey, value: V) -> Option<V> {
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
        let key = value.key();
        match instances.entry(
            hasher.hash_one(key),
            |v| v.key() == key,
            |v| hasher.hash_one(v.key()),
        ) {
            Entry::Occupied(mut held) => Some(std::mem::replace(held.get_mut(), value)),
            Entry::Vacant(slot) => {
                slot.insert(value);
                None
            }
        }
    }

    /// Removes the slot `key` names; returns its value.
    pub(crate) fn remove(&mut self, service: &ServiceKey, key: &InstanceKey) -> Option<V> {
        let Ok(mut entry) = self
            .services
            .find_entry(self.hasher.hash_one(service), |(s, _)| s == service)
        else {
            return None;
        };
        let key = key_ref(key);
        let instances = &mut entry.get_mut().1;
        let (old, _) = instances
            .find_entry(self.hasher.hash_one(key), |v| v.key() == key)
            .ok()?
            .remove();
        if instances.is_empty() {
            entry.remove();
        }
        Some(old)
    }

    pub(crate) fn get_mut(&mut self, service: &ServiceKey, key: &InstanceKey) -> Option<&mut V> {
        let key = key_ref(key);
        let hash = self.hasher.hash_one(key);
        self.instances(service)?.find_mut(hash, |v| v.key() == key)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    pub(crate) fn clear(&mut self) {
        self.services.clear();
    }

    /// Every slot, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&ServiceKey, &V)> {
        self.services
            .iter()
            .flat_map(|(service, instances)| instances.iter().map(move |v| (service, v)))
    }

    /// Keeps only the slots whose value passes `keep`.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) {
        self.services.retain(|(_, instances)| {
            instances.retain(|v| keep(v));
            !instances.is_empty()
        });
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

    fn spec(port: u16, weight: f64) -> Arc<InstanceSpec> {
        let mut s = InstanceSpec::new("10.0.0.1", port);
        s.weight = weight;
        Arc::new(s)
    }

    #[test]
    fn insert_replace_remove_and_iterate() {
        let mut slots = Slots::default();
        assert!(slots.is_empty());
        assert!(slots.insert(&service("a"), spec(1, 1.0)).is_none());
        assert!(slots.insert(&service("a"), spec(2, 1.0)).is_none());
        assert!(slots.insert(&service("b"), spec(1, 1.0)).is_none());
        assert_eq!(slots.iter().count(), 3);
        // The same (cluster, ip, port) replaces; another cluster is another slot.
        let old = slots.insert(&service("a"), spec(1, 5.0)).expect("replaced");
        assert_eq!(old.weight, 1.0);
        let mut other = InstanceSpec::new("10.0.0.1", 1);
        other.cluster = "other".into();
        assert!(slots.insert(&service("a"), Arc::new(other)).is_none());
        assert_eq!(slots.iter().count(), 4);
        let held = slots.get_mut(&service("a"), &instance(1)).unwrap();
        assert_eq!(held.weight, 5.0);
        *slots.get_mut(&service("b"), &instance(1)).unwrap() = spec(1, 7.0);
        let removed = slots.remove(&service("b"), &instance(1)).unwrap();
        assert_eq!(removed.weight, 7.0);
        assert!(slots.remove(&service("b"), &instance(1)).is_none());
        assert!(slots.remove(&service("c"), &instance(1)).is_none());
        assert!(
            slots.instances(&service("b")).is_none(),
            "an emptied service goes"
        );
        assert_eq!(slots.services.len(), 1);
        let mut all: Vec<(String, String, u16)> = slots
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
            slots.insert(&service("big"), spec(port, 1.0));
        }
        for port in 100..1100u16 {
            assert!(slots.get_mut(&service("big"), &instance(port)).is_some());
        }
        slots.clear();
        assert!(slots.is_empty());
        assert_eq!(slots.iter().count(), 0);
    }

    #[test]
    fn keyed_values_and_retain_drops_emptied_services() {
        let mut slots = Slots::default();
        for port in 0..10u16 {
            let name = if port < 5 { "a" } else { "b" };
            assert!(slots
                .insert(&service(name), (instance(port), port))
                .is_none());
        }
        assert_eq!(
            slots.insert(&service("a"), (instance(1), 10)),
            Some((instance(1), 1))
        );
        assert_eq!(
            slots.remove(&service("a"), &instance(1)),
            Some((instance(1), 10))
        );
        slots.retain(|(_, v)| *v >= 7);
        let mut left: Vec<u16> = slots.iter().map(|(_, (_, v))| *v).collect();
        left.sort();
        assert_eq!(left, vec![7, 8, 9]);
        assert!(slots.instances(&service("a")).is_none());
        slots.retain(|_| false);
        assert!(slots.is_empty());
    }
}
