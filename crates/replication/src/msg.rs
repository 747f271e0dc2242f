//! What peers say to each other, and what clients ask a node to write.
//!
//! Every type here is serde; the node frames [`PeerMsg`] as MessagePack: maps with field
//! names (`to_vec_named`) towards a peer of another message shape, so fields can be
//! added without breaking older peers (new fields carry `#[serde(default)]`), and arrays
//! between peers that announced the same shape (the node's `PEER_MESSAGE_SHAPE`, which
//! changes with any field of these types; see docs/replication.md). [`Ping`] carries [`PEER_PROTOCOL_VERSION`]: a node ignores
//! the pings of a peer whose major version it does not speak, which keeps that peer out
//! of its ring.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use shoal_storage::{
    InstanceKey, InstanceSpec, NodeId, Op, ServiceKey, ServiceMeta, ServiceRecord, SessionId, Stamp,
};

/// The version of the peer protocol. A peer with another version is not a member.
pub const PEER_PROTOCOL_VERSION: u32 = 1;

/// A message between two nodes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PeerMsg {
    /// Probe and gossip: who I am, whether I am ready, whom I know.
    Ping(Ping),
    /// Answer to a ping.
    Ack(Ack),
    /// Replicated changes and session announcements from their writer.
    Batch(Batch),
    /// A client write that the sender routed to the receiver (its owner there). The
    /// receiver applies it whatever its own ring says, and answers [`PeerMsg::ForwardReply`].
    Forward {
        /// Chosen by the sender, echoed in the reply.
        id: u64,
        /// The write.
        write: Write,
        /// When the sender sent it (its `now_ms`; 0 from a sender that does not say).
        /// A forward older than `forward_ttl_ms` on arrival is refused unapplied: its
        /// sender has given up on it and may have sent the write again, and the client
        /// may have written since (a late copy would win over a later deregistration).
        #[serde(default)]
        sent_ms: u64,
    },
    /// Several client writes that the sender routed to the receiver (the runs of
    /// writes of one or more of its client sessions, see [`crate::Replica::forward_many`]):
    /// applied in order, as [`PeerMsg::Forward`] each, and answered with one
    /// [`PeerMsg::ForwardManyReply`].
    ForwardMany {
        /// Chosen by the sender, echoed in the reply.
        id: u64,
        /// The writes, each session's in its client's order. One sequence on the wire.
        writes: WriteRuns,
        /// When the sender sent them (as in [`PeerMsg::Forward`]).
        sent_ms: u64,
    },
    /// The outcomes of a [`PeerMsg::ForwardMany`], one per write, in its order.
    ForwardManyReply {
        /// The id of the [`PeerMsg::ForwardMany`].
        id: u64,
        /// What happened to each write.
        outcomes: Vec<ForwardOutcome>,
    },
    /// The outcome of a forwarded write.
    ForwardReply {
        /// The id of the [`PeerMsg::Forward`].
        id: u64,
        /// What happened.
        outcome: ForwardOutcome,
    },
    /// A starting node asks for the next chunk of a full snapshot.
    SnapshotRequest {
        /// Continue after this service (the `next` of the previous chunk); `None` for
        /// the first chunk.
        after: Option<ServiceKey>,
    },
    /// One chunk of a snapshot.
    SnapshotChunk(SnapshotChunk),
    /// Anti-entropy, step 1 (owner to peer): the digests of the ring ranges the
    /// sender owns.
    Digest {
        /// One entry per owned range.
        ranges: Vec<RangeDigest>,
    },
    /// Anti-entropy, step 2 (peer to owner): for the ranges whose digest differed, the
    /// peer's per-service digests.
    DigestReply {
        /// `(service, digest)` of every service the peer holds in those ranges.
        services: Vec<(ServiceKey, u64)>,
        /// The ranges that differed, `(start, end)`: the owner also sends what it holds
        /// there that the peer did not list.
        ranges: Vec<(u64, u64)>,
    },
    /// Anti-entropy, step 3: the sender's records of services that differ.
    Repair {
        /// The records; merged last-writer-wins.
        records: Vec<ServiceRecord>,
    },
    /// Anti-entropy, step 3 (owner to peer): send me your records of these services
    /// (where the peer may know something newer, e.g. after a partition).
    RepairRequest {
        /// The services.
        services: Vec<ServiceKey>,
    },
}

/// A probe, which also gossips membership.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ping {
    /// The sender's [`PEER_PROTOCOL_VERSION`].
    pub version: u32,
    /// The address peers dial the sender at.
    pub addr: String,
    /// Whether the sender has loaded its snapshot and owns services.
    pub ready: bool,
    /// The members the sender knows, `(id, address)`, so that a joining node becomes
    /// known to every member.
    #[serde(default)]
    pub members: Vec<(NodeId, String)>,
}

/// Answer to a [`Ping`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    /// The sender's [`PEER_PROTOCOL_VERSION`].
    pub version: u32,
    /// Whether the sender is ready.
    pub ready: bool,
}

/// Changes from their writer, in the order it made them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    /// Record operations, each with its owner stamp. Shared with the batches of the
    /// other peers that carry them (on the wire each is just the operation).
    #[serde(default, deserialize_with = "shared_ops")]
    pub ops: Vec<Arc<Op>>,
    /// Session announcements of sessions whose home is the sender.
    #[serde(default)]
    pub sessions: Vec<SessionAnnounce>,
}

/// Decodes forwarded writes into an `Arc` without serde's intermediate `Box`.
/// The writes of a [`PeerMsg::ForwardMany`]: runs of writes, each shared with its
/// sender's record of it (kept to route the run again if no answer comes, without a
/// copy). On the wire they are one sequence of writes, the runs one after the other; a
/// receiver reads them as one run.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct WriteRuns(pub Vec<Arc<Vec<Write>>>);

impl WriteRuns {
    /// One run.
    pub fn one(writes: Arc<Vec<Write>>) -> Self {
        WriteRuns(vec![writes])
    }

    /// How many writes, over every run.
    pub fn len(&self) -> usize {
        self.0.iter().map(|run| run.len()).sum()
    }

    /// True when there is no write.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The writes, in order; a run that nobody else holds (one decoded from the wire)
    /// is taken, not copied.
    pub fn into_writes(self) -> impl Iterator<Item = Write> {
        self.0.into_iter().flat_map(Arc::unwrap_or_clone)
    }
}

impl Serialize for WriteRuns {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(self.len()))?;
        for w in self.0.iter().flat_map(|run| run.iter()) {
            seq.serialize_element(w)?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for WriteRuns {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<Write>::deserialize(d).map(|writes| WriteRuns::one(Arc::new(writes)))
    }
}

/// Decodes a batch's operations each straight into its `Arc` (serde's own `Arc<T>`
/// decodes into a `Box<T>` first and copies it: two allocations an operation).
fn shared_ops<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Arc<Op>>, D::Error> {
    struct Ops;
    impl<'de> serde::de::Visitor<'de> for Ops {
        type Value = Vec<Arc<Op>>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a sequence of operations")
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            // The length is the sender's word: trust it only up to a bound.
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
            while let Some(op) = seq.next_element::<Op>()? {
                out.push(Arc::new(op));
            }
            Ok(out)
        }
    }
    d.deserialize_seq(Ops)
}

/// The state of a client session as its home node announces it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionAnnounce {
    /// The session.
    pub session: SessionId,
    /// The node the client is (or was last) connected to.
    pub home: NodeId,
    /// What happened to it.
    pub state: SessionState,
    /// Stamped by the home's clock: a newer announcement replaces an older one.
    pub stamp: Stamp,
}

/// A session's state in an announcement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionState {
    /// Connected to its home.
    Live,
    /// The connection was lost; the client may resume within the grace period.
    Disconnected,
    /// Ended cleanly: its instances go now.
    Closed,
}

/// One chunk of a snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotChunk {
    /// Services, tombstones included.
    pub records: Vec<ServiceRecord>,
    /// Ask for the chunk after this service; `None` on the last chunk.
    pub next: Option<ServiceKey>,
    /// True on the last chunk.
    pub done: bool,
    /// On the last chunk: the sender's session table.
    #[serde(default)]
    pub sessions: Vec<SessionAnnounce>,
}

/// The digest of one ring range `start..=end` (wrapping when `start > end`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeDigest {
    /// First position (inclusive).
    pub start: u64,
    /// Last position (inclusive).
    pub end: u64,
    /// Wrapping sum of the service digests in the range.
    pub hash: u64,
}

/// A client write, as a node applies it or forwards it to the owner.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Write {
    /// Register or replace an instance; bound to `session` unless it has a Ttl.
    Register {
        /// The service.
        service: ServiceKey,
        /// The instance.
        instance: InstanceSpec,
        /// The client session that registers it.
        session: SessionId,
    },
    /// Change an existing instance.
    Update {
        /// The service.
        service: ServiceKey,
        /// The instance's new settings.
        instance: InstanceSpec,
    },
    /// Remove an instance.
    Deregister {
        /// The service.
        service: ServiceKey,
        /// Which instance.
        instance: InstanceKey,
    },
    /// Keep a Ttl instance alive.
    Beat {
        /// The service.
        service: ServiceKey,
        /// Which instance.
        instance: InstanceKey,
    },
    /// Set a service's settings.
    SetServiceMeta {
        /// The service.
        service: ServiceKey,
        /// Its new settings.
        meta: ServiceMeta,
    },
}

impl Write {
    /// The service the write is about (which decides its owner).
    pub fn service(&self) -> &ServiceKey {
        match self {
            Write::Register { service, .. }
            | Write::Update { service, .. }
            | Write::Deregister { service, .. }
            | Write::Beat { service, .. }
            | Write::SetServiceMeta { service, .. } => service,
        }
    }

    /// About how many bytes the write takes in a message: the lengths of its strings
    /// plus a fixed allowance for the rest. Bounds how many writes share one message
    /// ([`crate::Replica::forward_many`]); it need not be exact.
    pub fn approx_bytes(&self) -> usize {
        let service = self.service();
        let names = service.namespace.len() + service.group.len() + service.service.len();
        let meta = |m: &std::collections::BTreeMap<String, String>| -> usize {
            m.iter().map(|(k, v)| k.len() + v.len() + 4).sum()
        };
        let rest = match self {
            Write::Register { instance, .. } | Write::Update { instance, .. } => {
                instance.ip.len() + instance.cluster.len() + meta(&instance.metadata)
            }
            Write::Deregister { instance, .. } | Write::Beat { instance, .. } => {
                instance.ip.len() + instance.cluster.len()
            }
            Write::SetServiceMeta { meta: m, .. } => meta(&m.metadata),
        };
        64 + names + rest
    }
}

/// The outcome of a forwarded write.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ForwardOutcome {
    /// Applied by the owner; the service's revision on the owner (0 for a beat that
    /// changed nothing).
    Applied {
        /// The owner's revision of the service.
        revision: u64,
    },
    /// Refused: nothing changed.
    Rejected {
        /// `StorageError::code` of the refusal.
        code: String,
        /// The refusal's message.
        message: String,
    },
}
