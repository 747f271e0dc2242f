//! What a client keeps per instance slot (a service and an instance key in it): its
//! session-bound registrations, to re-assert after a reconnect, and its recent
//! deregistrations, to repeat.

use foldhash::{HashMap, HashMapExt};

use shoal_storage::{InstanceKey, ServiceKey};

/// Values by service, then by instance key.
///
/// Every register call records its instance here, so this is on the path of each
/// write. A call finds its service by reference and copies the service key only for a
/// service that holds nothing yet. One ordered map of `(service, instance)` pairs
/// instead compared a dozen service keys (three strings each) per insert and copied
/// the key every time; with thousands of instances per client (an agent that
/// registers for others) that was a fifth of the load generator's CPU
/// (docs/benchmarks.md, tenth series).
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

    pub(crate) fn get_mut(&mut self, service: &ServiceKey, key: &InstanceKey) -> Option<&mut V> {
        self.services.get_mut(service)?.get_mut(key)
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
        *slots.get_mut(&service("b"), &instance(1)).unwrap() += 1;
        assert_eq!(slots.remove(&service("b"), &instance(1)), Some(4));
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
}
