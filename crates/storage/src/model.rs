//! The data model: typed identifiers and the records the registry holds.

use std::collections::BTreeMap;
use std::fmt;

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
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub String);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The key of a service: `(namespace, group, service)`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceKey {
    /// Namespace; `public` by default.
    pub namespace: String,
    /// Group; `DEFAULT_GROUP` by default.
    pub group: String,
    /// Service name.
    pub service: String,
}

impl ServiceKey {
    /// A key in the given namespace and group.
    pub fn new(
        namespace: impl Into<String>,
        group: impl Into<String>,
        service: impl Into<String>,
    ) -> Self {
        ServiceKey {
            namespace: namespace.into(),
            group: group.into(),
            service: service.into(),
        }
    }

    /// A key in the default namespace and group.
    pub fn named(service: impl Into<String>) -> Self {
        Self::new(DEFAULT_NAMESPACE, DEFAULT_GROUP, service)
    }

    /// The bytes that placement hashes: the three parts, each length-prefixed (u32 LE),
    /// so that `("a","bc")` and `("ab","c")` never collide. Stable across versions.
    pub fn placement_bytes(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(12 + self.namespace.len() + self.group.len() + self.service.len());
        for part in [&self.namespace, &self.group, &self.service] {
            out.extend_from_slice(&(part.len() as u32).to_le_bytes());
            out.extend_from_slice(part.as_bytes());
        }
        out
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
