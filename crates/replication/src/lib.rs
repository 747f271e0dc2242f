//! The Distro engine of Shoal: membership, failure detection, ownership, replication,
//! session liveness, anti-entropy and snapshot load, as pure code.
//!
//! # The model
//!
//! Every node holds all data; each service has one **owner**, the node the
//! consistent-hash ring ([`shoal_ring`]) assigns it to. The owner takes the service's
//! writes, stamps each changed record with its hybrid logical clock
//! ([`shoal_storage::Stamp`]), and sends the operations to every peer in batches.
//! Copies merge record by record, last writer wins, with tombstones for deletions, so
//! applying the same operations in any order with any duplicates gives the same state.
//! Reads are served from the local copy.
//!
//! **Membership.** A node learns members from the links the node opens to its seeds
//! ([`Replica::peer_link_up`]) and from gossip: every [`Ping`] carries the sender's
//! view, so a joiner becomes known to all. Members are Up, Suspect or Down by the time
//! since they were last heard from (any message counts). The ring holds this node (once
//! ready) and the members that are Up or Suspect *and* ready: a Suspect keeps its
//! services, so a slow probe does not move ownership back and forth.
//!
//! **Readiness.** A starting node owns nothing. It streams a full snapshot from a ready
//! peer ([`PeerMsg::SnapshotRequest`] / [`PeerMsg::SnapshotChunk`], pulled one chunk at
//! a time), then announces itself ready and enters the rings. If it hears of no ready
//! peer within `bootstrap_wait_ms`, the whole cluster is starting: it becomes ready
//! with what it has.
//!
//! **Writes.** [`Replica::route`] names the owner. A node that receives a forwarded
//! write applies it whatever its own ring says: views that differ for a moment cause
//! neither a loop nor an error. Operations wait at most `batch_window_ms` (or until
//! `batch_max_ops`) per peer; a Down peer gets nothing queued, and anti-entropy or a
//! snapshot brings it up to date later, so a slow or dead peer never holds memory.
//!
//! **Liveness.** Instances live as long as their client's session. The session's home
//! node announces opens and closes in the same batches ([`SessionAnnounce`]); every node
//! keeps the session table. The owner of a service deletes the instances of a session
//! that closed, or that has been disconnected, orphaned (home Down) or unknown for
//! `session_grace_ms`. Such deletions are marked *reaped*: if the session is in fact
//! alive at its home (the other side of a partition reaped it), the home registers the
//! instances again. Ttl instances are expired by their owner only.
//!
//! **Self-preservation.** When more than `self_preservation_fraction` of the other
//! members are Down at once, a node is more likely cut off than they are all dead: it
//! suspends liveness deletions and Ttl expiry until the view recovers
//! ([`Replica::self_preservation_active`]). Clean closes still delete.
//!
//! **Anti-entropy.** Every `anti_entropy_interval_ms`, an owner sends each peer one
//! hash per ring range it owns ([`PeerMsg::Digest`]); the peer answers with its
//! per-service digests in the ranges that differ, and the two exchange the records of
//! the services that differ. In sync, that is one hash per owned range per interval.
//! The digests leave behind every batch queued for that peer, so the peer compares
//! them with everything made before them; a service the owner changed after they left
//! is compared again next round (its change is on its way), so a stream of writes
//! does not make every round resend the services it touches.
//!
//! # The shape of the API
//!
//! Like foca or openraft's engine, [`Replica`] does no I/O and reads no clock: inputs
//! ([`Replica::handle`], [`Replica::tick`], [`Replica::apply_write`], …) take `now_ms`
//! and return [`Action`]s that the node executes: send a [`PeerMsg`], dial a member,
//! push changed services to subscribers. The node holds it under a mutex. The [`sim`]
//! module runs whole clusters of engines over a simulated network with virtual time.
//!
//! Stamps take their milliseconds from `now_ms`, so the node should pass UNIX-epoch
//! milliseconds (wall clock): clocks then agree across nodes to within their skew, and
//! the hybrid clock keeps order even when one is behind.
#![deny(missing_docs)]

mod config;
mod engine;
mod msg;
pub mod sim;

pub use config::Config;
pub use engine::{Action, MemberInfo, MemberState, Replica, Route};
pub use msg::*;
