//! Subscriptions: the local cache of subscribed services and the handles that watch it.
//!
//! Every subscribed service has one `tokio::sync::watch` channel holding its latest
//! full instance list. The connection's reader task is the only writer: it applies the
//! view in the Subscribe response and every Push in the order they arrive on the
//! stream, so a late response can never overwrite a newer push.

use std::collections::HashMap;
use std::sync::Mutex;

use shoal_storage::{ServiceKey, ServiceView};
use tokio::sync::watch;

/// A live subscription to one service: its latest instance list, and each change.
///
/// Views are full instance lists, so a slow reader loses nothing by skipping: `next`
/// always returns the latest view, and views that were replaced before it was called
/// are not replayed. The subscription survives reconnects: after a failover the client
/// subscribes again on the new node and delivers its view if it differs.
#[derive(Debug, Clone)]
pub struct Subscription {
    key: ServiceKey,
    rx: watch::Receiver<ServiceView>,
}

impl Subscription {
    pub(crate) fn new(key: ServiceKey, rx: watch::Receiver<ServiceView>) -> Self {
        Subscription { key, rx }
    }

    /// The service this subscription watches.
    pub fn key(&self) -> &ServiceKey {
        &self.key
    }

    /// The latest view of the service (the initial one until a change arrives).
    pub fn current(&self) -> ServiceView {
        self.rx.borrow().clone()
    }

    /// Waits for the view to change and returns the new one. `None` once the service
    /// is unsubscribed or the client is closed (a view not yet seen by then is
    /// dropped: [`Subscription::current`] still has it).
    pub async fn next(&mut self) -> Option<ServiceView> {
        self.rx.changed().await.ok()?;
        // `changed` also reports a last unseen view after the sender is gone.
        self.rx.has_changed().ok()?;
        Some(self.rx.borrow_and_update().clone())
    }
}

/// One subscribed service in the cache.
#[derive(Debug)]
enum Slot {
    /// Subscribe sent, no view yet.
    Starting,
    /// The latest view, and the channel its watchers read.
    Live(watch::Sender<ServiceView>),
}

/// The subscribed services and their latest views.
#[derive(Debug, Default)]
pub(crate) struct SubscriptionCache {
    slots: Mutex<HashMap<ServiceKey, Slot>>,
}

impl SubscriptionCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ServiceKey, Slot>> {
        // A panic while holding this lock cannot leave the map inconsistent (every
        // critical section is a single insert, remove or send), so poisoning is ignored.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a subscription. `Some` when the service already has a view (no round
    /// trip needed), `None` when a Subscribe must be sent.
    pub(crate) fn begin(&self, key: &ServiceKey) -> Option<Subscription> {
        let mut slots = self.lock();
        match slots.get(key) {
            Some(Slot::Live(tx)) => Some(Subscription::new(key.clone(), tx.subscribe())),
            Some(Slot::Starting) => None,
            None => {
                slots.insert(key.clone(), Slot::Starting);
                None
            }
        }
    }

    /// The subscription of a service whose Subscribe was answered. `None` if the
    /// service was unsubscribed meanwhile.
    pub(crate) fn attach(&self, key: &ServiceKey) -> Option<Subscription> {
        match self.lock().get(key) {
            Some(Slot::Live(tx)) => Some(Subscription::new(key.clone(), tx.subscribe())),
            _ => None,
        }
    }

    /// Drops a subscription that never got its first view (its Subscribe failed).
    pub(crate) fn abandon(&self, key: &ServiceKey) {
        let mut slots = self.lock();
        if matches!(slots.get(key), Some(Slot::Starting)) {
            slots.remove(key);
        }
    }

    /// Records a view of a subscribed service. Returns true if watchers were woken
    /// (the view differs from the cached one). Views of services not subscribed are
    /// ignored.
    pub(crate) fn apply(&self, key: &ServiceKey, view: ServiceView) -> bool {
        let mut slots = self.lock();
        Self::apply_to(slots.get_mut(key), view)
    }

    /// [`apply`](Self::apply) under the view's own key (a push).
    pub(crate) fn apply_push(&self, view: ServiceView) -> bool {
        let mut slots = self.lock();
        Self::apply_to(slots.get_mut(&view.key), view)
    }

    fn apply_to(slot: Option<&mut Slot>, view: ServiceView) -> bool {
        match slot {
            None => false,
            Some(slot @ Slot::Starting) => {
                *slot = Slot::Live(watch::channel(view).0);
                true
            }
            Some(Slot::Live(tx)) => tx.send_if_modified(|cur| {
                if *cur == view {
                    false
                } else {
                    *cur = view;
                    true
                }
            }),
        }
    }

    /// Forgets a subscription; its watchers see the end. True if it existed.
    pub(crate) fn remove(&self, key: &ServiceKey) -> bool {
        self.lock().remove(key).is_some()
    }

    /// Every subscribed service (to subscribe again after a reconnect).
    pub(crate) fn keys(&self) -> Vec<ServiceKey> {
        let mut keys: Vec<_> = self.lock().keys().cloned().collect();
        keys.sort();
        keys
    }

    /// The cached view of a subscribed service.
    pub(crate) fn cached(&self, key: &ServiceKey) -> Option<ServiceView> {
        match self.lock().get(key) {
            Some(Slot::Live(tx)) => Some(tx.borrow().clone()),
            _ => None,
        }
    }

    /// Forgets every subscription (the client is closing).
    pub(crate) fn clear(&self) {
        self.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(rev: u64) -> ServiceView {
        ServiceView {
            key: ServiceKey::named("orders"),
            revision: rev,
            instances: vec![],
            protected: false,
        }
    }

    #[tokio::test]
    async fn first_view_then_only_changes_wake_watchers() {
        let cache = SubscriptionCache::default();
        let key = ServiceKey::named("orders");
        assert!(cache.begin(&key).is_none());
        assert!(cache.apply(&key, view(1)));
        let mut sub = cache.attach(&key).expect("live after the first view");
        assert_eq!(sub.current().revision, 1);

        assert!(!cache.apply(&key, view(1)), "same view wakes nobody");
        assert!(cache.apply(&key, view(2)));
        assert_eq!(sub.next().await.map(|v| v.revision), Some(2));

        // A second subscriber shares the cache without a round trip.
        let again = cache.begin(&key).expect("already live");
        assert_eq!(again.current().revision, 2);

        assert!(cache.remove(&key));
        assert_eq!(sub.next().await, None, "unsubscribe ends the watchers");
        assert!(
            !cache.apply(&key, view(3)),
            "views of unsubscribed services are ignored"
        );
        assert_eq!(cache.cached(&key), None);
    }

    #[test]
    fn abandon_only_drops_a_starting_slot() {
        let cache = SubscriptionCache::default();
        let key = ServiceKey::named("orders");
        cache.begin(&key);
        cache.abandon(&key);
        assert!(cache.keys().is_empty());
        cache.begin(&key);
        cache.apply(&key, view(1));
        cache.abandon(&key);
        assert_eq!(cache.keys(), vec![key]);
    }
}
