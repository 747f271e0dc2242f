//! The data model: typed identifiers and the records the registry holds.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The namespace every registry has, and the default of every request.
pub const DEFAULT_NAMESPACE: &str = "public";
/// The group a service belongs to when none is given.
pub const DEFAULT_GROUP: &str = "DEFAULT_GROUP";
/// The cluster an instance belongs to when none is given.
pub const DEFAULT_CLUSTER: &str = "DEFAULT";

/// Identifies a client session across the whole cluster.
///
/// Sessions are minted by the node a client first connects to (random 128 bits), so
/// that a client can resume the same session on any node after a failover.
///
/// On the wire (MessagePack) it is a 128-bit integer; in human-readable formats (JSON)
/// it is 32 hex digits, because JSON numbers lose precision above 2^53.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u128);

impl Serialize for SessionId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            s.serialize_u128(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for SessionId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            u128::deserialize(d).map(SessionId)
        }
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl std::str::FromStr for SessionId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        u128::from_str_radix(s, 16).map(SessionId)
    }
}

/// Identifies a Shoal node. Stable across restarts of the same node (it comes from
/// configuration), and the input of ring placement.
///
/// Shared text: a node's id is copied into every routed write, queued batch and link,
/// and each copy is a reference count.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub Arc<str>);

impl NodeId {
    /// A node id from its text.
    pub fn new(id: impl AsRef<str>) -> Self {
        NodeId(Arc::from(id.as_ref()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

// Hash, Eq and Ord of a `NodeId` are those of its text, so maps keyed by it can be
// looked up by `&str`.
impl std::borrow::Borrow<str> for NodeId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The key of a service: `(namespace, group, service)`.
///
/// Its parts are shared: a write's key is copied into the replication queue, the
/// forwarded message, the change pushed to subscribers and the registry's indexes, and
/// each copy is a reference count, not three strings. It reads as its parts
/// (`key.service`), compares and orders as they do, and is on the wire exactly what
/// [`ServiceKeyParts`] is.
///
/// Its ring position and its hash are computed once, when the key is made: a write's
/// key is looked up in several maps and placed on the ring on every node it passes, and
/// each of those hashed the three strings again.
#[derive(Clone)]
pub struct ServiceKey(Arc<KeyInner>);

struct KeyInner {
    parts: ServiceKeyParts,
    /// [`stable_hash`](crate::stable_hash) of the placement bytes: the ring position.
    position: u64,
    /// What the key hashes as in maps: the parts hashed with this process's seed (not
    /// the position, which anyone can compute: many names of one position would
    /// share a bucket).
    hash: u64,
    /// When every part is a valid name as far as its characters go: the longest
    /// part's length (which the limits judge).
    longest_valid_part: Option<usize>,
}

/// The seed of [`ServiceKey`]'s hash: random, once per process.
fn key_hasher() -> &'static foldhash::fast::FixedState {
    static STATE: std::sync::OnceLock<foldhash::fast::FixedState> = std::sync::OnceLock::new();
    STATE.get_or_init(|| {
        use std::hash::BuildHasher;
        foldhash::fast::FixedState::with_seed(foldhash::fast::RandomState::default().hash_one(0u64))
    })
}

impl PartialEq for ServiceKey {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
            || (self.0.hash == other.0.hash && self.0.parts == other.0.parts)
    }
}

impl Eq for ServiceKey {}

impl std::hash::Hash for ServiceKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.0.hash);
    }
}

impl PartialOrd for ServiceKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ServiceKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.parts.cmp(&other.0.parts)
    }
}

impl Serialize for ServiceKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.parts.serialize(s)
    }
}

// By hand: serde's `Arc<T>` decodes into a `Box<T>` first and copies it into the `Arc`,
// two allocations where one will do.
impl<'de> Deserialize<'de> for ServiceKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        ServiceKeyParts::deserialize(d).map(ServiceKey::from)
    }
}

/// The parts of a [`ServiceKey`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceKeyParts {
    /// Namespace; `public` by default.
    pub namespace: String,
    /// Group; `DEFAULT_GROUP` by default.
    pub group: String,
    /// Service name.
    pub service: String,
}

impl std::ops::Deref for ServiceKey {
    type Target = ServiceKeyParts;

    fn deref(&self) -> &ServiceKeyParts {
        &self.0.parts
    }
}

impl fmt::Debug for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceKey")
            .field("namespace", &self.namespace)
            .field("group", &self.group)
            .field("service", &self.service)
            .finish()
    }
}

impl From<ServiceKeyParts> for ServiceKey {
    fn from(parts: ServiceKeyParts) -> Self {
        use std::hash::BuildHasher;
        let position = parts.with_placement_bytes(crate::stable_hash);
        let hash = key_hasher().hash_one(&parts);
        let longest_valid_part =
            crate::validate::names_are_valid([&parts.namespace, &parts.group, &parts.service]);
        ServiceKey(Arc::new(KeyInner {
            parts,
            position,
            hash,
            longest_valid_part,
        }))
    }
}

impl ServiceKey {
    /// Whether two keys share their parts (one allocation, as the copies of one key
    /// do), not only equal them.
    pub fn ptr_eq(a: &ServiceKey, b: &ServiceKey) -> bool {
        Arc::ptr_eq(&a.0, &b.0)
    }

    /// A key in the given namespace and group.
    pub fn new(
        namespace: impl Into<String>,
        group: impl Into<String>,
        service: impl Into<String>,
    ) -> Self {
        ServiceKeyParts {
            namespace: namespace.into(),
            group: group.into(),
            service: service.into(),
        }
        .into()
    }

    /// The key's ring position: `shoal_ring::position` of its
    /// [`placement_bytes`](ServiceKeyParts::placement_bytes), computed once.
    pub fn position(&self) -> u64 {
        self.0.position
    }

    /// When every part is a valid name but for its length: the longest part's
    /// length. Judged once, when the key was made.
    pub(crate) fn longest_valid_part(&self) -> Option<usize> {
        self.0.longest_valid_part
    }

    /// A key in the default namespace and group.
    pub fn named(service: impl Into<String>) -> Self {
        Self::new(DEFAULT_NAMESPACE, DEFAULT_GROUP, service)
    }
}

impl ServiceKeyParts {
    /// The bytes that placement hashes: the three parts, each length-prefixed (u32 LE),
    /// so that `("a","bc")` and `("ab","c")` never collide. Stable across versions.
    pub fn placement_bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.placement_len()];
        self.fill_placement(&mut out);
        out
    }

    /// Calls `f` with [`placement_bytes`](Self::placement_bytes), built on the stack
    /// when they fit in 256 bytes: placing a service is part of every write's route and
    /// of every session's end.
    pub fn with_placement_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        const STACK: usize = 256;
        let len = self.placement_len();
        if len > STACK {
            return f(&self.placement_bytes());
        }
        let mut buf = [0u8; STACK];
        self.fill_placement(&mut buf[..len]);
        f(&buf[..len])
    }

    fn placement_len(&self) -> usize {
        12 + self.namespace.len() + self.group.len() + self.service.len()
    }

    /// Writes the placement bytes into `out`, exactly [`Self::placement_len`] long.
    fn fill_placement(&self, out: &mut [u8]) {
        let mut at = 0;
        for part in [&self.namespace, &self.group, &self.service] {
            out[at..at + 4].copy_from_slice(&(part.len() as u32).to_le_bytes());
            out[at + 4..at + 4 + part.len()].copy_from_slice(part.as_bytes());
            at += 4 + part.len();
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.group, self.service)
    }
}

/// Identifies an instance within its service: `(cluster, ip, port)`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct InstanceKey {
    /// Cluster name; `DEFAULT` by default.
    pub cluster: String,
    /// IP address (v4 or v6), as text.
    pub ip: String,
    /// Port, 1..=65535.
    pub port: u16,
}

impl fmt::Display for InstanceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ip.contains(':') {
            write!(f, "{}/[{}]:{}", self.cluster, self.ip, self.port)
        } else {
            write!(f, "{}/{}:{}", self.cluster, self.ip, self.port)
        }
    }
}

/// How an instance is kept alive.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Lease {
    /// Lives as long as the client session that registered it (plus the grace period
    /// after an unclean disconnect).
    Session(SessionId),
    /// Kept alive by beats, for clients that cannot hold a connection.
    Ttl(TtlLease),
}

/// A lease kept alive by beats (Nacos v1 style).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TtlLease {
    /// After this long without a beat the instance is reported unhealthy.
    pub unhealthy_after_ms: u64,
    /// After this long without a beat the instance is removed.
    pub remove_after_ms: u64,
}

impl Default for TtlLease {
    fn default() -> Self {
        TtlLease {
            unhealthy_after_ms: 15_000,
            remove_after_ms: 30_000,
        }
    }
}

/// What a client asks to register: an instance before the registry stamps it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstanceSpec {
    /// IP address (v4 or v6), as text.
    pub ip: String,
    /// Port, 1..=65535.
    pub port: u16,
    /// Cluster name.
    #[serde(default = "default_cluster")]
    pub cluster: String,
    /// Relative weight for load balancing, 0.0..=10000.0; 0 takes no traffic.
    #[serde(default = "default_weight")]
    pub weight: f64,
    /// Whether the instance reports itself healthy.
    #[serde(default = "yes")]
    pub healthy: bool,
    /// Whether the instance takes traffic at all.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Free-form metadata.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// `None`: bound to the registering session. `Some`: kept alive by beats.
    #[serde(default)]
    pub ttl: Option<TtlLease>,
}

fn default_cluster() -> String {
    DEFAULT_CLUSTER.to_string()
}
fn default_weight() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}

impl InstanceSpec {
    /// An instance at `ip:port` in the default cluster with default settings.
    pub fn new(ip: impl Into<String>, port: u16) -> Self {
        InstanceSpec {
            ip: ip.into(),
            port,
            cluster: default_cluster(),
            weight: 1.0,
            healthy: true,
            enabled: true,
            metadata: BTreeMap::new(),
            ttl: None,
        }
    }

    /// The key this instance is stored under.
    pub fn key(&self) -> InstanceKey {
        InstanceKey {
            cluster: self.cluster.clone(),
            ip: self.ip.clone(),
            port: self.port,
        }
    }
}

/// An instance as the registry holds it and as queries return it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// IP address (v4 or v6), as text.
    pub ip: String,
    /// Port, 1..=65535.
    pub port: u16,
    /// Cluster name.
    pub cluster: String,
    /// Relative weight, 0.0..=10000.0.
    pub weight: f64,
    /// Healthy as reported by the client, and for Ttl leases, beats arriving in time.
    pub healthy: bool,
    /// Whether the instance takes traffic.
    pub enabled: bool,
    /// Free-form metadata.
    pub metadata: BTreeMap<String, String>,
    /// How the instance is kept alive.
    pub lease: Lease,
    /// For Ttl leases: the time of the last beat (ms, registry clock). For session
    /// leases: the time of registration.
    pub last_beat_ms: u64,
    /// The change stamp that last wrote this instance: monotonic per registry.
    pub stamp: u64,
}

impl Instance {
    /// The key this instance is stored under.
    pub fn key(&self) -> InstanceKey {
        InstanceKey {
            cluster: self.cluster.clone(),
            ip: self.ip.clone(),
            port: self.port,
        }
    }

    /// The session that owns this instance, if it has a session lease.
    pub fn session(&self) -> Option<SessionId> {
        match &self.lease {
            Lease::Session(s) => Some(*s),
            Lease::Ttl(_) => None,
        }
    }
}

/// Settings of a service as a whole.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
pub struct ServiceMeta {
    /// Protection threshold, 0.0..=1.0: when the healthy share of instances is at or
    /// below it, queries return all instances instead of only the healthy ones.
    pub protect_threshold: f64,
    /// Free-form metadata.
    pub metadata: BTreeMap<String, String>,
}

/// The answer to a query: the instances of a service at one revision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceView {
    /// Which service.
    pub key: ServiceKey,
    /// The service's revision: it grows with every change to the service.
    pub revision: u64,
    /// The instances that matched the query.
    pub instances: Vec<Instance>,
    /// True when the protection threshold was reached and unhealthy instances were
    /// returned along with the healthy ones.
    pub protected: bool,
}

/// One row of a service listing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceSummary {
    /// Which service.
    pub key: ServiceKey,
    /// Number of instances.
    pub instances: usize,
    /// Number of healthy instances.
    pub healthy: usize,
    /// The service's revision.
    pub revision: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_bytes_on_the_stack_are_the_placement_bytes() {
        let long = "s".repeat(300);
        for key in [
            ServiceKey::named("orders"),
            ServiceKey::new("", "", ""),
            ServiceKey::new("ns", "g", "x".repeat(256 - 12 - 3)),
            ServiceKey::new("ns", "g", "x".repeat(256 - 12 - 2)),
            ServiceKey::new("ns", "g", long),
        ] {
            let on_stack = key.with_placement_bytes(|b| b.to_vec());
            assert_eq!(on_stack, key.placement_bytes(), "{key}");
        }
    }

    #[test]
    fn a_shared_key_compares_and_orders_as_its_parts() {
        let a = ServiceKey::new("public", "g", "a");
        let b = ServiceKey::new("public", "g", "b");
        assert_eq!(a.clone(), ServiceKey::new("public", "g", "a"));
        assert!(a < b);
        assert_eq!(a.service, "a");
        assert_eq!(
            format!("{a:?}"),
            r#"ServiceKey { namespace: "public", group: "g", service: "a" }"#
        );
    }

    /// Keys made apart from the same parts are equal, hash alike, and carry the
    /// position of their placement bytes; keys of different parts are told apart
    /// (the cached hash is only a shortcut before the parts are compared).
    #[test]
    fn a_key_made_twice_is_equal_hashes_alike_and_is_placed_alike() {
        use std::hash::BuildHasher;
        let h = std::collections::hash_map::RandomState::new();
        let parts = [
            ("public", "g", "a"),
            ("public", "g", "b"),
            ("p", "ublicg", "a"),
            ("", "", ""),
        ];
        for (ns, g, s) in parts {
            let (x, y) = (ServiceKey::new(ns, g, s), ServiceKey::new(ns, g, s));
            assert!(!ServiceKey::ptr_eq(&x, &y));
            assert_eq!(x, y);
            assert_eq!(h.hash_one(&x), h.hash_one(&y));
            assert_eq!(x.position(), crate::stable_hash(&x.placement_bytes()));
            for (ns2, g2, s2) in parts {
                let z = ServiceKey::new(ns2, g2, s2);
                assert_eq!(x == z, (ns, g, s) == (ns2, g2, s2));
                assert_eq!(x.cmp(&z), (ns, g, s).cmp(&(ns2, g2, s2)));
            }
        }
        let set: std::collections::HashSet<ServiceKey> = parts
            .iter()
            .map(|(n, g, s)| ServiceKey::new(*n, *g, *s))
            .collect();
        assert_eq!(set.len(), parts.len());
    }

    #[test]
    fn a_node_id_is_found_by_its_text() {
        let mut m = BTreeMap::new();
        m.insert(NodeId::new("node-1"), 1);
        m.insert(NodeId::new("node-2"), 2);
        let (k, v) = m.get_key_value("node-2").unwrap();
        assert_eq!((k.as_str(), *v), ("node-2", 2));
        assert!(!m.contains_key("node-3"));
    }
}
