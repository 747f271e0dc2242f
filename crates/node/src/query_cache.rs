//! A per-node cache of encoded query answers.
//!
//! A query's answer depends only on the service's state, and the registry gives every
//! change of a service a new revision: two queries with the same filters that find the
//! service at the same revision get the same answer. So the node encodes an answer
//! once, keeps the bytes under `(service, clusters, healthy_only)` with the revision it
//! was read at, and answers later identical queries by framing those bytes with each
//! request's id ([`shoal_proto::append_response_frame`]), without reading the
//! instances again. A lookup compares the cached revision with the service's current
//! one, read under the replica's read lock, so a changed service is never answered
//! from the cache.
//!
//! Answers holding a Ttl instance are not cached: a beat moves such an instance's
//! `last_beat_ms` without a new revision. Answers of services that do not exist
//! (revision 0) are not cached either: they are small.
//!
//! The cache holds at most `max_bytes` of answers (`query_cache_bytes`). When an
//! insert goes above that, the least recently used quarter of the entries is evicted
//! at once (one pass over the entries, so eviction is amortised).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use shoal_storage::{Lease, ServiceKey, ServiceView};

/// Fixed cost counted per entry besides its bytes (key, map slot).
const ENTRY_OVERHEAD_BYTES: usize = 256;

/// What a query asked: the cache key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct QueryKey {
    /// The service.
    pub service: ServiceKey,
    /// The clusters filter, as the client sent it.
    pub clusters: Vec<String>,
    /// Healthy and enabled instances only.
    pub healthy_only: bool,
}

impl QueryKey {
    fn cost(&self, body: &[u8]) -> usize {
        let key = self.service.namespace.len()
            + self.service.group.len()
            + self.service.service.len()
            + self.clusters.iter().map(String::len).sum::<usize>();
        ENTRY_OVERHEAD_BYTES + key + body.len()
    }
}

/// The encoded `result` of a query's answer (see [`shoal_proto::encode_result`]).
pub type EncodedAnswer = Arc<[u8]>;

struct Entry {
    revision: u64,
    body: EncodedAnswer,
    /// The tick of its last use, for eviction.
    used: u64,
    cost: usize,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<QueryKey, Entry>,
    bytes: usize,
    tick: u64,
}

/// The cache; see the module docs.
pub struct QueryCache {
    max_bytes: usize,
    inner: Mutex<Inner>,
}

impl QueryCache {
    /// A cache of at most `max_bytes` (0 disables it).
    pub fn new(max_bytes: usize) -> Self {
        QueryCache {
            max_bytes,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Whether answers are cached at all.
    pub fn enabled(&self) -> bool {
        self.max_bytes > 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        crate::state::lock(&self.inner)
    }

    /// The cached answer of `key` if it was read at `revision`. Counts a hit or a miss.
    pub fn get(&self, key: &QueryKey, revision: u64) -> Option<EncodedAnswer> {
        let found = {
            let mut inner = self.lock();
            inner.tick += 1;
            let tick = inner.tick;
            match inner.entries.get_mut(key) {
                Some(e) if e.revision == revision => {
                    e.used = tick;
                    Some(e.body.clone())
                }
                _ => None,
            }
        };
        if found.is_some() {
            metrics::counter!("shoal_query_cache_hits_total").increment(1);
        } else {
            metrics::counter!("shoal_query_cache_misses_total").increment(1);
        }
        found
    }

    /// The cached answer of `key` if it was read at `revision`, without counting a hit
    /// or a miss, nor a use: for the push thread, which takes a push's bytes from it.
    pub fn peek(&self, key: &QueryKey, revision: u64) -> Option<EncodedAnswer> {
        match self.lock().entries.get(key) {
            Some(e) if e.revision == revision => Some(e.body.clone()),
            _ => None,
        }
    }

    /// Keeps `body`, the answer of `key` read at `revision`, unless an answer read at
    /// a later revision is already there. Evicts the least recently used entries when
    /// the cache grows above its size.
    pub fn put(&self, key: QueryKey, revision: u64, body: EncodedAnswer) {
        let cost = key.cost(&body);
        if cost > self.max_bytes / 4 {
            // Larger than a quarter of the cache: it would evict too much.
            return;
        }
        let mut inner = self.lock();
        inner.tick += 1;
        let used = inner.tick;
        if inner
            .entries
            .get(&key)
            .is_some_and(|e| e.revision > revision)
        {
            return;
        }
        let entry = Entry {
            revision,
            body,
            used,
            cost,
        };
        if let Some(old) = inner.entries.insert(key, entry) {
            inner.bytes -= old.cost;
        }
        inner.bytes += cost;
        if inner.bytes > self.max_bytes {
            evict(&mut inner, self.max_bytes);
        }
        metrics::gauge!("shoal_query_cache_bytes").set(inner.bytes as f64);
        metrics::gauge!("shoal_query_cache_entries").set(inner.entries.len() as f64);
    }

    /// Entries and bytes held.
    #[cfg(test)]
    fn size(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.entries.len(), inner.bytes)
    }
}

/// Drops the least recently used entries: at least a quarter of them, and as many as
/// it takes for the rest to fit in three quarters of `max_bytes`.
fn evict(inner: &mut Inner, max_bytes: usize) {
    let mut by_use: Vec<(u64, usize)> = inner.entries.values().map(|e| (e.used, e.cost)).collect();
    // Most recently used first.
    by_use.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
    let keep_at_most = by_use.len() - by_use.len().div_ceil(4);
    let mut kept_bytes = 0;
    let mut keep = 0;
    while keep < keep_at_most && kept_bytes + by_use[keep].1 <= max_bytes / 4 * 3 {
        kept_bytes += by_use[keep].1;
        keep += 1;
    }
    // Ticks are unique, so this keeps exactly the `keep` most recently used.
    let cutoff = by_use[keep].0;
    let before = inner.entries.len();
    inner.entries.retain(|_, e| e.used > cutoff);
    inner.bytes = inner.entries.values().map(|e| e.cost).sum();
    metrics::counter!("shoal_query_cache_evictions_total")
        .increment((before - inner.entries.len()) as u64);
}

/// Whether an answer may be cached: see the module docs.
pub fn cacheable(view: &ServiceView) -> bool {
    view.revision != 0
        && !view
            .instances
            .iter()
            .any(|i| matches!(i.lease, Lease::Ttl(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> QueryKey {
        QueryKey {
            service: ServiceKey::named(name),
            clusters: Vec::new(),
            healthy_only: true,
        }
    }

    fn body(n: usize) -> EncodedAnswer {
        vec![7u8; n].into()
    }

    #[test]
    fn answers_only_at_the_revision_they_were_read_at() {
        let c = QueryCache::new(1 << 20);
        c.put(key("a"), 5, body(10));
        assert_eq!(c.get(&key("a"), 5).as_deref(), Some(&[7u8; 10][..]));
        assert!(c.get(&key("a"), 6).is_none());
        assert!(c.get(&key("b"), 5).is_none());
        assert!(c.peek(&key("a"), 5).is_some());
        assert!(c.peek(&key("a"), 6).is_none());
        let mut other = key("a");
        other.healthy_only = false;
        assert!(c.get(&other, 5).is_none());
        other.healthy_only = true;
        other.clusters = vec!["eu".into()];
        assert!(c.get(&other, 5).is_none());
    }

    #[test]
    fn an_older_answer_does_not_replace_a_newer_one() {
        let c = QueryCache::new(1 << 20);
        c.put(key("a"), 6, body(1));
        c.put(key("a"), 5, body(2));
        assert!(c.get(&key("a"), 6).is_some());
        assert!(c.get(&key("a"), 5).is_none());
        c.put(key("a"), 7, body(3));
        assert!(c.get(&key("a"), 7).is_some());
        assert_eq!(c.size().0, 1);
    }

    #[test]
    fn stays_within_its_size_and_evicts_the_least_recently_used() {
        let cost = key("s100").cost(&body(1000));
        let max = 100 * cost;
        let c = QueryCache::new(max);
        for i in 0..100 {
            c.put(key(&format!("s{i:03}")), 1, body(1000));
        }
        assert_eq!(c.size().0, 100);
        // s000 is used again: it is no longer among the least recently used.
        assert!(c.get(&key("s000"), 1).is_some());
        c.put(key("s100"), 1, body(1000));
        assert!(c.get(&key("s000"), 1).is_some());
        assert!(c.get(&key("s001"), 1).is_none());
        assert!(c.get(&key("s100"), 1).is_some());
        for i in 101..400 {
            c.put(key(&format!("s{i:03}")), 1, body(1000));
            let (entries, bytes) = c.size();
            assert!(bytes <= max, "{bytes} > {max}");
            assert!(entries >= 50, "{entries}");
        }
        assert!(c.get(&key("s399"), 1).is_some());
    }

    #[test]
    fn disabled_or_oversized_answers_are_not_kept() {
        let c = QueryCache::new(0);
        assert!(!c.enabled());
        c.put(key("a"), 1, body(10));
        assert!(c.get(&key("a"), 1).is_none());
        let c = QueryCache::new(4000);
        c.put(key("a"), 1, body(2000));
        assert!(c.get(&key("a"), 1).is_none());
    }
}
