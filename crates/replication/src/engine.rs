//! The engine: one node's view of the cluster and its replica of the registry.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use shoal_ring::Ring;
use shoal_storage::{
    origin_of, Change, Instance, InstanceSpec, Lease, Limits, NodeId, Op, Registry,
    ReplicationSettings, ServiceKey, ServiceRecord, SessionId, Stamp, StorageError,
};

use crate::config::Config;
use crate::msg::*;

/// How a member looks from here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MemberState {
    /// Heard from within `suspect_after_ms`.
    Up,
    /// Not heard from for `suspect_after_ms`; still owns its services (no flapping).
    Suspect,
    /// Not heard from for `down_after_ms`, or never heard from: out of the ring.
    Down,
}

/// A member as [`Replica::members`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberInfo {
    /// Its id.
    pub id: NodeId,
    /// The address it is dialled at.
    pub addr: String,
    /// Up, Suspect or Down.
    pub state: MemberState,
    /// Whether it said it is ready (owns services).
    pub ready: bool,
    /// When it was last heard from (`None`: only known from gossip).
    pub last_heard_ms: Option<u64>,
}

/// Where a write must go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// This node owns the service: [`Replica::apply_write`].
    Local,
    /// Forward it to the owner: [`Replica::forward`].
    Forward(NodeId),
    /// No ready node is known (this node is starting and has no ready peer yet).
    Unavailable,
}

/// What the node must do for the engine.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Send a message to a peer (drop it if there is no link or the link's queue is
    /// full: anti-entropy repairs what is lost).
    Send {
        /// The peer.
        to: NodeId,
        /// The message.
        msg: PeerMsg,
    },
    /// Open a link to a member learned from gossip (or whose link is down); call
    /// [`Replica::peer_link_up`] when it is up. Repeated every probe interval while
    /// the link is down: the node should ignore it while a dial is in flight.
    Connect {
        /// The member.
        to: NodeId,
        /// Its address.
        addr: String,
    },
    /// These services changed here: push them to their local subscribers.
    Publish(Vec<Change>),
    /// The owner answered a write this node forwarded with [`Replica::forward`]. Ids
    /// the node does not know are the engine's own forwards (re-asserted instances):
    /// ignore them.
    ForwardDone {
        /// The id [`Replica::forward`] returned.
        id: u64,
        /// What the owner did.
        outcome: ForwardOutcome,
    },
    /// The owner answered writes this node forwarded with [`Replica::forward_many`].
    ForwardManyDone {
        /// The id [`Replica::forward_many`] returned.
        id: u64,
        /// What the owner did with each write, in their order.
        outcomes: Vec<ForwardOutcome>,
    },
    /// A batch from a peer was applied: for the replication lag metric.
    BatchApplied {
        /// The writer.
        from: NodeId,
        /// Operations in the batch.
        ops: usize,
        /// `now_ms` minus the oldest owner stamp (ms part) of the batch: how long the
        /// oldest change took to get here (meaningful when node clocks are UNIX time).
        max_lag_ms: u64,
    },
    /// This node just became ready: it serves reads and owns services from now on.
    Ready,
    /// The ring changed; its members now.
    RingChanged(Vec<NodeId>),
}

/// A member as the engine keeps it.
#[derive(Clone, Debug)]
struct Member {
    addr: String,
    last_heard_ms: Option<u64>,
    ready: bool,
    link_up: bool,
    state: MemberState,
    /// When this node saw it go Down (or learned of it without hearing it).
    down_since_ms: u64,
    /// It came back (its link came up, it was Down, or it was not ready): once it
    /// says it is ready, send it the digests of the ranges this node owns at once,
    /// rather than at the next anti-entropy round.
    needs_digest: bool,
    /// When this node last sent it the digests of its ranges (its clock): a service
    /// changed here since then differs because of that change, which is on its way.
    digest_sent_ms: u64,
}

impl Member {
    /// Ready, not Down and linked: a starting node compares its snapshot with it and
    /// waits for its answer ([`Verify`]).
    fn can_answer(&self) -> bool {
        self.link_up && self.ready && self.state != MemberState::Down
    }
}

/// Changes waiting to be sent to one peer.
#[derive(Debug, Default)]
struct Outq {
    ops: Vec<Arc<Op>>,
    sessions: Vec<SessionAnnounce>,
    since_ms: u64,
}

impl Outq {
    fn len(&self) -> usize {
        self.ops.len() + self.sessions.len()
    }
}

/// Runs of client writes waiting to leave for their owner in one
/// [`PeerMsg::ForwardMany`] (see [`Replica::forward_many`]).
#[derive(Debug, Default)]
struct ForwardQueue {
    runs: Vec<Arc<Vec<Write>>>,
    /// The id of each run, in order.
    ids: Vec<u64>,
    /// [`Write::approx_bytes`] of the writes.
    bytes: usize,
    /// The `now_ms` of the first run queued: the message's `sent_ms`.
    since_ms: u64,
}

/// A [`PeerMsg::ForwardMany`] sent and not answered yet: the runs it carried.
#[derive(Debug)]
struct ForwardSent {
    parts: Vec<(u64, usize)>,
    sent_ms: u64,
}

/// At most this many writes share one [`PeerMsg::ForwardMany`]...
const FORWARD_MAX_WRITES: usize = 1024;
/// ...and about this many bytes of them ([`Write::approx_bytes`]); a single run may be
/// larger, and then leaves alone, as it came.
const FORWARD_MAX_BYTES: usize = 64 << 10;

/// A session as this node knows it.
#[derive(Clone, Debug)]
struct SessionEntry {
    home: NodeId,
    /// `home` as an index into [`Replica::homes`]: the periodic sweep of every session
    /// looks its home up by index instead of comparing node id strings.
    home_ix: u32,
    state: SessionState,
    stamp: Stamp,
    /// Local time of the last state change here.
    since_ms: u64,
    /// Local time this node first saw the (Live) session's home Down.
    orphaned_since_ms: Option<u64>,
}

/// Progress of the snapshot a starting node loads.
#[derive(Clone, Debug)]
struct SnapshotLoad {
    from: NodeId,
    after: Option<ServiceKey>,
    asked_ms: u64,
}

/// A starting node that has loaded its snapshot compares its copy with the owners'
/// before it is ready: the peer the snapshot came from may itself have missed writes
/// (it was frozen, or has just restarted), and a node serves reads and owns services
/// from the moment it is ready.
#[derive(Clone, Debug)]
struct Verify {
    /// The replies still awaited from each owner: one for the digests of its ranges,
    /// one more for the barrier sent behind a repair request (the records come first on
    /// the ordered link).
    pending: BTreeMap<NodeId, u32>,
    since_ms: u64,
}

/// Why a session's instances are to be deleted.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Doom {
    /// Closed cleanly: always.
    Closed,
    /// Disconnected, orphaned or unknown past the grace period: not under
    /// self-preservation.
    Lapsed,
}

/// One node's Distro engine. See the crate docs.
#[derive(Debug)]
pub struct Replica {
    me: NodeId,
    my_addr: String,
    config: Config,
    registry: Registry,
    members: BTreeMap<NodeId, Member>,
    ring: Ring,
    ready: bool,
    started_ms: u64,
    snapshot: Option<SnapshotLoad>,
    verify: Option<Verify>,
    queues: BTreeMap<NodeId, Outq>,
    sessions: HashMap<SessionId, SessionEntry>,
    /// Every session home seen, indexed by [`SessionEntry::home_ix`] (a handful of ids).
    homes: Vec<NodeId>,
    unknown_since: HashMap<SessionId, u64>,
    next_probe_ms: u64,
    next_anti_entropy_ms: u64,
    self_preservation: bool,
    next_forward_id: u64,
    /// Runs of forwarded client writes not sent yet, per owner.
    forward_queues: BTreeMap<NodeId, ForwardQueue>,
    /// The forward messages not answered yet, by their id.
    forwards_sent: HashMap<u64, ForwardSent>,
    rng: u64,
    /// When `tick` last ran: a tick late by more than `suspect_after_ms` means this
    /// node stalled (a paused process or VM), not that its peers went silent.
    last_tick_ms: Option<u64>,
    /// Until then this node's copy may miss writes made elsewhere (see
    /// [`Config::settle_ms`]).
    unsettled_until_ms: u64,
    /// Changes each time the ring is replaced.
    ring_generation: u64,
    /// The digests of the ranges this node owns, with the ring and registry
    /// generations they were computed at: holding a million instances still, a node
    /// does not walk its services again every anti-entropy round.
    digest_cache: Option<((u64, u64), Vec<RangeDigest>)>,
    /// Changes each time a session joins or leaves [`Replica::sessions`].
    session_table_generation: u64,
    /// The generations of the registry's sessions and of the table at which the
    /// sessions unknown to the table (`unknown_since`) were last worked out: while
    /// neither changed, neither did that set.
    unknown_checked: Option<(u64, u64)>,
}

impl Replica {
    /// A starting node with an empty registry of default limits.
    pub fn new(me: NodeId, my_addr: String, config: Config, seed: u64, now_ms: u64) -> Self {
        Self::with_registry(
            me,
            my_addr,
            config,
            Registry::new(Limits::default()),
            seed,
            now_ms,
        )
    }

    /// A starting node around the given registry (with the node's limits and
    /// namespaces). Turns the registry's replication on.
    pub fn with_registry(
        me: NodeId,
        my_addr: String,
        config: Config,
        mut registry: Registry,
        seed: u64,
        now_ms: u64,
    ) -> Self {
        registry.set_replication(ReplicationSettings {
            origin: origin_of(&me),
            placement: shoal_ring::position,
            tombstone_ttl_ms: config.tombstone_ttl_ms,
            record_ops: true,
        });
        registry.note_now(now_ms);
        let ring = Ring::new(config.vnodes.max(1)).expect("vnodes is at least 1");
        Replica {
            me,
            my_addr,
            registry,
            members: BTreeMap::new(),
            ring,
            ready: false,
            started_ms: now_ms,
            snapshot: None,
            verify: None,
            queues: BTreeMap::new(),
            sessions: HashMap::new(),
            homes: Vec::new(),
            unknown_since: HashMap::new(),
            next_probe_ms: now_ms,
            next_anti_entropy_ms: now_ms + config.anti_entropy_interval_ms,
            self_preservation: false,
            next_forward_id: 1,
            forward_queues: BTreeMap::new(),
            forwards_sent: HashMap::new(),
            rng: seed | 1,
            last_tick_ms: None,
            unsettled_until_ms: 0,
            ring_generation: 0,
            digest_cache: None,
            session_table_generation: 0,
            unknown_checked: None,
            config,
        }
    }

    // ---------------------------------------------------------------- reads

    /// This node's id.
    pub fn me(&self) -> &NodeId {
        &self.me
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The local copy of the registry; reads are served from it.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The registry, for setup (adding namespaces). Writes made through it are not
    /// replicated: use [`Replica::apply_write`].
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Whether this node has loaded its snapshot (or given up waiting for one): it
    /// owns services and answers reads.
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// Whether operations wait in some peer's batch: the caller's timer must then run
    /// [`Replica::tick`] every `batch_window_ms`, or they stay there.
    pub fn has_queued(&self) -> bool {
        self.queues.values().any(|q| q.len() > 0)
    }

    /// Whether liveness deletions are suspended because too many members are Down.
    pub fn self_preservation_active(&self) -> bool {
        self.self_preservation
    }

    /// The members other than this node, sorted by id.
    pub fn members(&self) -> Vec<MemberInfo> {
        self.members
            .iter()
            .map(|(id, m)| MemberInfo {
                id: id.clone(),
                addr: m.addr.clone(),
                state: m.state,
                ready: m.ready,
                last_heard_ms: m.last_heard_ms,
            })
            .collect()
    }

    /// The ring: this node if ready, and the members that are Up or Suspect and ready.
    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// The owner of a service on this node's ring (`None` while the ring is empty).
    pub fn owner(&self, service: &ServiceKey) -> Option<NodeId> {
        let id = self.ring.owner_at(service.position())?;
        Some(self.member_id(id))
    }

    /// The id of a node on the ring, shared with the member table (a reference count,
    /// not a copy of the text).
    fn member_id(&self, id: &str) -> NodeId {
        if id == self.me.as_str() {
            return self.me.clone();
        }
        match self.members.get_key_value(id) {
            Some((known, _)) => known.clone(),
            None => NodeId::new(id),
        }
    }

    /// How many services with live data this node owns (a walk over its ring ranges,
    /// without allocating: for gauges).
    pub fn owned_service_count(&self) -> usize {
        self.ring
            .ranges()
            .iter()
            .filter(|r| r.owner == self.me.as_str())
            .map(|r| self.registry.live_services_in(r.start, r.end))
            .sum()
    }

    /// Whether this node owns the service.
    pub fn owns(&self, service: &ServiceKey) -> bool {
        owns(&self.ring, &self.me, service)
    }

    /// Where a client write to `service` must go.
    pub fn route(&self, service: &ServiceKey) -> Route {
        match self.owner(service) {
            Some(o) if o == self.me => Route::Local,
            Some(o) => Route::Forward(o),
            None => Route::Unavailable,
        }
    }

    /// Operations and announcements waiting for a peer (for a queue-depth metric).
    pub fn queued_for(&self, peer: &NodeId) -> usize {
        self.queues.get(peer).map_or(0, Outq::len)
    }

    // ---------------------------------------------------------------- writes

    /// Applies a client write here (this node owns the service, or the write was
    /// forwarded to it: a forwarded write is applied whatever this node's ring says,
    /// so views that differ for a moment cause no loop). Stamps it, queues its
    /// operations for every peer, and returns the change (none for a beat that only
    /// refreshed a lease) with the actions, which include [`Action::Publish`].
    /// On error nothing visible changed and nothing is sent now; the one exception is
    /// a NotFound Deregister while this node is settling (see [`Config::settle_ms`]):
    /// it leaves a tombstone for the instance, which the next `tick` sends.
    pub fn apply_write(
        &mut self,
        write: Write,
        now_ms: u64,
    ) -> Result<(Option<Change>, Vec<Action>), StorageError> {
        self.registry.note_now(now_ms);
        // An owner whose copy may be incomplete (or a node that got a forward for a
        // service it does not own) deletes what it does not hold too: the instance may
        // be registered elsewhere, and would stay there for good.
        let unsure = matches!(write, Write::Deregister { .. })
            && (now_ms < self.unsettled_until_ms || !owns(&self.ring, &self.me, write.service()));
        let r = &mut self.registry;
        let change = match write {
            Write::Register {
                service,
                instance,
                session,
            } => r.register(&service, instance, session, now_ms).map(Some),
            Write::Update { service, instance } => r.update(&service, instance, now_ms).map(Some),
            Write::Deregister { service, instance } => {
                match r.deregister_at(&service, &instance, now_ms) {
                    Err(StorageError::NotFound(what)) if unsure => {
                        // Not here, but perhaps elsewhere at an older stamp: delete it
                        // there (the tombstone leaves with the next tick), and answer
                        // what this copy knows.
                        r.deregister_blind_at(&service, &instance, now_ms)?;
                        return Err(StorageError::NotFound(what));
                    }
                    other => other.map(Some),
                }
            }
            Write::Beat { service, instance } => r.beat(&service, &instance, now_ms),
            Write::SetServiceMeta { service, meta } => r.set_service_meta(&service, meta).map(Some),
        }?;
        let mut actions = self.queue_local_ops(now_ms);
        if let Some(c) = &change {
            actions.push(Action::Publish(vec![c.clone()]));
        }
        Ok((change, actions))
    }

    /// Sends a client write to `owner` (what [`Replica::route`] said). The answer comes
    /// back as [`Action::ForwardDone`] with the returned id; the node times it out.
    pub fn forward(&mut self, owner: &NodeId, write: Write, now_ms: u64) -> (u64, Vec<Action>) {
        let id = self.take_forward_id();
        let msg = PeerMsg::Forward {
            id,
            write,
            sent_ms: now_ms,
        };
        (
            id,
            vec![Action::Send {
                to: owner.clone(),
                msg,
            }],
        )
    }

    /// Forwards a run of client writes to `owner` (they all route to it); their answers
    /// come back together as [`Action::ForwardManyDone`] with the returned id. The
    /// writes are shared: the caller may keep them, to route them again, without a
    /// copy.
    ///
    /// The run is queued, not sent: the runs queued for one owner (those of several
    /// client sessions) leave together in one [`PeerMsg::ForwardMany`] with the next
    /// [`Replica::flush_forwards`], which the caller runs once the writes that came
    /// together are queued. They also leave before anything else this node sends the
    /// owner in a batch (so a session's later announcement never overtakes its writes),
    /// on every tick, and when a run would not fit with them (at most 1 024 writes and
    /// about 64 KiB a message).
    pub fn forward_many(
        &mut self,
        owner: &NodeId,
        writes: Arc<Vec<Write>>,
        now_ms: u64,
    ) -> (u64, Vec<Action>) {
        let id = self.take_forward_id();
        let n = writes.len();
        let bytes: usize = writes.iter().map(Write::approx_bytes).sum();
        let full = self.forward_queues.get(owner).is_some_and(|q| {
            let writes: usize = q.runs.iter().map(|run| run.len()).sum();
            writes > 0 && (writes + n > FORWARD_MAX_WRITES || q.bytes + bytes > FORWARD_MAX_BYTES)
        });
        let actions = if full {
            self.flush_forwards_to(owner)
        } else {
            Vec::new()
        };
        let q = self.forward_queues.entry(owner.clone()).or_default();
        if q.runs.is_empty() {
            q.since_ms = now_ms;
        }
        q.runs.push(writes);
        q.ids.push(id);
        q.bytes += bytes;
        (id, actions)
    }

    /// Sends the runs of writes queued by [`Replica::forward_many`], one message per
    /// owner.
    pub fn flush_forwards(&mut self) -> Vec<Action> {
        let owners: Vec<NodeId> = self.forward_queues.keys().cloned().collect();
        let mut actions = Vec::new();
        for owner in owners {
            actions.extend(self.flush_forwards_to(&owner));
        }
        actions
    }

    /// The ids of the runs of writes that the [`PeerMsg::ForwardMany`] of id `id`
    /// carries, while it is not answered: a caller that could not send the message
    /// fails them.
    pub fn forwarded_runs(&self, id: u64) -> impl Iterator<Item = u64> + '_ {
        self.forwards_sent
            .get(&id)
            .into_iter()
            .flat_map(|sent| sent.parts.iter().map(|&(run, _)| run))
    }

    /// Whether runs of writes wait for [`Replica::flush_forwards`].
    pub fn has_queued_forwards(&self) -> bool {
        !self.forward_queues.is_empty()
    }

    fn flush_forwards_to(&mut self, owner: &NodeId) -> Vec<Action> {
        let Some(q) = self.forward_queues.remove(owner) else {
            return Vec::new();
        };
        if q.runs.is_empty() {
            return Vec::new();
        }
        let id = self.take_forward_id();
        self.forwards_sent.insert(
            id,
            ForwardSent {
                parts: q
                    .ids
                    .into_iter()
                    .zip(q.runs.iter().map(|run| run.len()))
                    .collect(),
                sent_ms: q.since_ms,
            },
        );
        vec![Action::Send {
            to: owner.clone(),
            msg: PeerMsg::ForwardMany {
                id,
                writes: WriteRuns(q.runs),
                sent_ms: q.since_ms,
            },
        }]
    }

    /// The answer to a [`PeerMsg::ForwardMany`]: each run's outcomes, under the run's
    /// id. An answer with another number of outcomes than writes sent answers each
    /// run with none (the caller routes them again); an unknown id (an answer later
    /// than twice `forward_ttl_ms`) is dropped.
    fn forward_answered(&mut self, id: u64, outcomes: Vec<ForwardOutcome>) -> Vec<Action> {
        let Some(sent) = self.forwards_sent.remove(&id) else {
            return Vec::new();
        };
        let expected: usize = sent.parts.iter().map(|&(_, n)| n).sum();
        if outcomes.len() != expected {
            return sent
                .parts
                .into_iter()
                .map(|(id, _)| Action::ForwardManyDone {
                    id,
                    outcomes: Vec::new(),
                })
                .collect();
        }
        let mut outcomes = outcomes.into_iter();
        sent.parts
            .into_iter()
            .map(|(id, n)| Action::ForwardManyDone {
                id,
                outcomes: outcomes.by_ref().take(n).collect(),
            })
            .collect()
    }

    /// The next id of a forward (a single write, a run, or a message of runs).
    fn take_forward_id(&mut self) -> u64 {
        let id = self.next_forward_id;
        self.next_forward_id += 1;
        id
    }

    /// A forwarded write's outcome: applied here (its actions go to `actions`), or
    /// refused unapplied when it arrived after `forward_ttl_ms`.
    fn apply_forwarded(
        &mut self,
        write: Write,
        sent_ms: u64,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) -> ForwardOutcome {
        if sent_ms > 0 && now_ms > sent_ms.saturating_add(self.config.forward_ttl_ms) {
            return ForwardOutcome::Rejected {
                code: "unavailable".into(),
                message: format!(
                    "the forwarded write arrived {} ms after it was sent; not applied",
                    now_ms - sent_ms
                ),
            };
        }
        match self.apply_write(write, now_ms) {
            Ok((change, more)) => {
                actions.extend(more);
                ForwardOutcome::Applied {
                    revision: change.map_or(0, |c| c.revision),
                }
            }
            Err(e) => ForwardOutcome::Rejected {
                code: e.code().to_string(),
                message: e.to_string(),
            },
        }
    }

    /// A client session opened (or resumed) on this node, its home.
    pub fn session_opened(&mut self, session: SessionId, now_ms: u64) -> Vec<Action> {
        self.announce(session, SessionState::Live, now_ms)
    }

    /// A client session's connection ended on this node: `clean` for a Goodbye (its
    /// instances go now), otherwise it may resume within `session_grace_ms`, here or
    /// on another node.
    pub fn session_closed(&mut self, session: SessionId, clean: bool, now_ms: u64) -> Vec<Action> {
        let state = if clean {
            SessionState::Closed
        } else {
            SessionState::Disconnected
        };
        let mut actions = self.announce(session, state, now_ms);
        if clean {
            // Delete what this node owns at once; the other owners do on receipt.
            actions.extend(self.reap(session, now_ms));
        }
        actions
    }

    fn announce(&mut self, session: SessionId, state: SessionState, now_ms: u64) -> Vec<Action> {
        tracing::debug!(%session, ?state, "announcing a session of this node");
        let ann = SessionAnnounce {
            session,
            home: self.me.clone(),
            state,
            stamp: self.registry.next_version(now_ms),
        };
        self.merge_session(ann.clone(), now_ms);
        self.queue(Vec::new(), vec![ann], now_ms)
    }

    // ---------------------------------------------------------------- links

    /// A link to `node` (at `addr`) is up: the node dialled it (a seed, or after an
    /// [`Action::Connect`]) or accepted it.
    pub fn peer_link_up(&mut self, node: NodeId, addr: String, now_ms: u64) -> Vec<Action> {
        if node == self.me || !valid_id(&node) {
            return Vec::new();
        }
        let m = self.members.entry(node.clone()).or_insert(Member {
            addr: addr.clone(),
            last_heard_ms: None,
            ready: false,
            link_up: false,
            state: MemberState::Down,
            down_since_ms: now_ms,
            needs_digest: true,
            digest_sent_ms: 0,
        });
        m.link_up = true;
        m.needs_digest = true;
        if !addr.is_empty() {
            m.addr = addr;
        }
        let was_down = m.state == MemberState::Down;
        let mut actions = self.heard(&node, now_ms);
        if !was_down {
            // What was sent on the link this one replaces may have been lost with it
            // (a link that died while this node was frozen takes the announcements made
            // as it resumed). Registry records have anti-entropy; session announcements
            // have only this: tell the peer again the sessions this node is home to.
            // (A member back from Down got them from `heard`.)
            self.queue_own_sessions(&node, now_ms);
        }
        actions.push(Action::Send {
            to: node,
            msg: PeerMsg::Ping(self.ping()),
        });
        actions
    }

    /// The link to `node` went down. Its state follows from the probes.
    pub fn peer_link_down(&mut self, node: &NodeId, _now_ms: u64) -> Vec<Action> {
        if let Some(m) = self.members.get_mut(node) {
            m.link_up = false;
        }
        Vec::new()
    }

    // ---------------------------------------------------------------- input

    /// A message from a peer.
    pub fn handle(&mut self, from: &NodeId, msg: PeerMsg, now_ms: u64) -> Vec<Action> {
        if from == &self.me || !valid_id(from) {
            return Vec::new();
        }
        let mut actions = Vec::new();
        match &msg {
            PeerMsg::Ping(p) if p.version != PEER_PROTOCOL_VERSION => return actions,
            PeerMsg::Ack(a) if a.version != PEER_PROTOCOL_VERSION => return actions,
            PeerMsg::Ping(p) => {
                let m = self.members.entry(from.clone()).or_insert(Member {
                    addr: p.addr.clone(),
                    last_heard_ms: None,
                    ready: false,
                    link_up: true,
                    state: MemberState::Down,
                    down_since_ms: now_ms,
                    needs_digest: true,
                    digest_sent_ms: 0,
                });
                m.addr = p.addr.clone();
            }
            _ => {}
        }
        if !self.members.contains_key(from) {
            // Not introduced by a ping or a link yet: take the data (it merges safely)
            // but do not make it a member without an address.
            self.members.insert(
                from.clone(),
                Member {
                    addr: String::new(),
                    last_heard_ms: None,
                    ready: false,
                    link_up: true,
                    state: MemberState::Down,
                    down_since_ms: now_ms,
                    needs_digest: true,
                    digest_sent_ms: 0,
                },
            );
        }
        actions.extend(self.heard(from, now_ms));
        match msg {
            PeerMsg::Ping(p) => {
                actions.extend(self.set_ready(from, p.ready, now_ms));
                for (id, addr) in p.members {
                    if id == self.me || !valid_id(&id) || self.members.contains_key(&id) {
                        continue;
                    }
                    self.members.insert(
                        id.clone(),
                        Member {
                            addr: addr.clone(),
                            last_heard_ms: None,
                            ready: false,
                            link_up: false,
                            state: MemberState::Down,
                            down_since_ms: now_ms,
                            needs_digest: true,
                            digest_sent_ms: 0,
                        },
                    );
                    actions.push(Action::Connect { to: id, addr });
                }
                actions.push(Action::Send {
                    to: from.clone(),
                    msg: PeerMsg::Ack(Ack {
                        version: PEER_PROTOCOL_VERSION,
                        ready: self.ready,
                    }),
                });
            }
            PeerMsg::Ack(a) => actions.extend(self.set_ready(from, a.ready, now_ms)),
            PeerMsg::Batch(b) => actions.extend(self.on_batch(from, b, now_ms)),
            PeerMsg::Forward { id, write, sent_ms } => {
                let outcome = self.apply_forwarded(write, sent_ms, now_ms, &mut actions);
                // The sender gets the write's operations before the answer, on the
                // same ordered link: once its client has the acknowledgement, the
                // sender (the client's home) holds the write too, and anti-entropy
                // spreads it even if this node dies before its next batch leaves.
                // (A NotFound while settling leaves a tombstone: that goes too.)
                actions.extend(self.queue_local_ops(now_ms));
                actions.extend(self.flush(from));
                actions.push(Action::Send {
                    to: from.clone(),
                    msg: PeerMsg::ForwardReply { id, outcome },
                });
            }
            PeerMsg::ForwardMany {
                id,
                writes,
                sent_ms,
            } => {
                // The only reference once decoded: taken, not copied.
                let outcomes = writes
                    .into_writes()
                    .map(|w| self.apply_forwarded(w, sent_ms, now_ms, &mut actions))
                    .collect();
                // As for a single forward: the operations first, then the answer.
                actions.extend(self.queue_local_ops(now_ms));
                actions.extend(self.flush(from));
                actions.push(Action::Send {
                    to: from.clone(),
                    msg: PeerMsg::ForwardManyReply { id, outcomes },
                });
            }
            PeerMsg::ForwardReply { id, outcome } => {
                actions.push(Action::ForwardDone { id, outcome })
            }
            PeerMsg::ForwardManyReply { id, outcomes } => {
                actions.extend(self.forward_answered(id, outcomes))
            }
            PeerMsg::SnapshotRequest { after } => {
                if self.ready {
                    let (records, next) = self.registry.snapshot_chunk(
                        after.as_ref(),
                        self.config.chunk_max_services,
                        self.config.chunk_max_ops,
                    );
                    let done = next.is_none();
                    let sessions = if done {
                        self.session_table()
                    } else {
                        Vec::new()
                    };
                    actions.push(Action::Send {
                        to: from.clone(),
                        msg: PeerMsg::SnapshotChunk(SnapshotChunk {
                            records,
                            next,
                            done,
                            sessions,
                        }),
                    });
                }
            }
            PeerMsg::SnapshotChunk(chunk) => actions.extend(self.on_chunk(from, chunk, now_ms)),
            PeerMsg::Digest { ranges } => {
                let differing: Vec<(u64, u64)> = ranges
                    .iter()
                    .filter(|r| self.registry.range_digest(r.start, r.end) != r.hash)
                    .map(|r| (r.start, r.end))
                    .collect();
                // A starting node that compares its copy before it is ready (see
                // `Verify`) waits for an answer, even one that says nothing differs.
                let verifying = self.members.get(from).is_some_and(|m| !m.ready);
                if !differing.is_empty() || verifying {
                    let services = differing
                        .iter()
                        .flat_map(|&(s, e)| self.registry.service_digests_in(s, e))
                        .collect();
                    actions.push(Action::Send {
                        to: from.clone(),
                        msg: PeerMsg::DigestReply {
                            services,
                            ranges: differing,
                        },
                    });
                }
            }
            PeerMsg::DigestReply { services, ranges } => {
                // A service changed here since the digests left differs because of
                // that change, which is on its way in a batch: compare it next round.
                // (Without this, every service written during a burst of writes would
                // be sent whole every round.) A starting node that compares its snapshot
                // (see `Verify`) writes nothing of its own: what changed in its copy
                // since came from its peers, and every difference counts.
                let since = if self.verify.is_some() {
                    u64::MAX
                } else {
                    self.members
                        .get(from)
                        .map_or(u64::MAX, |m| m.digest_sent_ms)
                };
                let r = &self.registry;
                let theirs: HashMap<ServiceKey, u64> = services
                    .into_iter()
                    .filter(|(k, _)| r.changed_ms(k) < since)
                    .collect();
                let mut send = Vec::new();
                let mut ask = Vec::new();
                let mut mine_seen = BTreeSet::new();
                for &(s, e) in &ranges {
                    for (key, d) in self.registry.service_digests_in(s, e) {
                        if self.registry.changed_ms(&key) >= since {
                            continue;
                        }
                        match theirs.get(&key) {
                            Some(t) if *t == d => {}
                            Some(_) => {
                                // Theirs differs: each side may hold what the other
                                // lacks, deletions included (a copy that holds only
                                // tombstones has digest 0), so both records go.
                                ask.push(key.clone());
                                send.push(key.clone());
                            }
                            None => send.push(key.clone()),
                        }
                        mine_seen.insert(key);
                    }
                }
                for key in theirs.keys() {
                    if !mine_seen.contains(key) {
                        ask.push(key.clone());
                    }
                }
                // Bounded, quietest first: what changed here last is likely still in a
                // batch on its way, and the next round compares again.
                let cap = self.config.repair_max_services.max(1);
                if send.len() > cap || ask.len() > cap {
                    let r = &self.registry;
                    send.sort_by_cached_key(|k| r.changed_ms(k));
                    ask.sort_by_cached_key(|k| r.changed_ms(k));
                    send.truncate(cap);
                    ask.truncate(cap);
                }
                let records = self.registry.records_of(&send);
                actions.extend(self.repair_msgs(from, records));
                let asked = !ask.is_empty();
                if asked {
                    actions.push(Action::Send {
                        to: from.clone(),
                        msg: PeerMsg::RepairRequest { services: ask },
                    });
                }
                actions.extend(self.verify_answered(from, asked, now_ms));
            }
            PeerMsg::Repair { records } => {
                tracing::debug!(from = %from.0, records = records.len(), "repair");
                // The digests of the services of this node's own range, before.
                let own: Vec<(ServiceKey, u64)> = records
                    .iter()
                    .filter(|r| self.owns(&r.service))
                    .map(|r| (r.service.clone(), self.registry.service_digest(&r.service)))
                    .collect();
                actions.extend(self.apply_records(records, now_ms));
                let repaired_own = own
                    .iter()
                    .any(|(k, d)| self.registry.service_digest(k) != *d);
                if repaired_own && self.ready {
                    // This owner learnt from a peer what it lacked in its own range (a
                    // write whose owner died before its batch left reached only the
                    // client's home): the other copies may lack it too, and only this
                    // node's rounds compare that range. Compare it with every peer on
                    // the next tick (a later millisecond: a reply leaves out services
                    // changed since its digests left), not up to
                    // `anti_entropy_interval_ms` later.
                    self.next_anti_entropy_ms = self.next_anti_entropy_ms.min(now_ms + 1);
                }
            }
            PeerMsg::RepairRequest { services } => {
                let records = self.registry.records_of(&services);
                actions.extend(self.repair_msgs(from, records));
            }
        }
        actions.extend(self.digest_if_back(from, now_ms));
        actions
    }

    /// Time passes: probes, failure detection, batches, bootstrap, liveness, expiry,
    /// anti-entropy. Call it often (every few ms: batches leave on ticks).
    pub fn tick(&mut self, now_ms: u64) -> Vec<Action> {
        self.registry.note_now(now_ms);
        let stalled = self
            .last_tick_ms
            .is_some_and(|t| now_ms.saturating_sub(t) > self.config.suspect_after_ms);
        self.last_tick_ms = Some(now_ms);
        if stalled {
            // This node did not run for a while (a paused process or VM, a long GC):
            // the silence of its peers is its own. Hear them again rather than mark
            // them Down, which would make it own every service for a moment and apply
            // the writes queued meanwhile without replicating them. Its copy may have
            // missed writes: probe and exchange digests at once.
            for m in self.members.values_mut() {
                if m.state != MemberState::Down {
                    m.last_heard_ms = Some(now_ms);
                }
            }
            self.next_probe_ms = now_ms;
            self.next_anti_entropy_ms = now_ms;
            self.unsettle(now_ms);
            // Nor does the stall count towards a session's grace period: a home seen
            // Down before it may have come back meanwhile, a client may have resumed
            // elsewhere, and this node has not heard yet (bug 15 of docs/reliability.md:
            // an owner reaped at once, on resuming, the instances of a session whose
            // home had been back for seconds).
            self.restart_grace_clocks(now_ms);
        }
        // Runs of forwarded writes do not wait for a tick; this is only a backstop.
        let mut actions = self.flush_forwards();
        if !self.forwards_sent.is_empty() {
            // Answers later than this are refused by their owner anyway, and no
            // longer awaited here.
            let ttl = self.config.forward_ttl_ms.max(1).saturating_mul(2);
            self.forwards_sent
                .retain(|_, f| now_ms.saturating_sub(f.sent_ms) <= ttl);
        }
        actions.extend(self.queue_local_ops(now_ms));
        actions.extend(self.detect(now_ms));
        actions.extend(self.bootstrap(now_ms));

        if now_ms >= self.next_probe_ms {
            self.next_probe_ms = now_ms + self.config.probe_interval_ms;
            let ping = self.ping();
            for (id, m) in &self.members {
                if !m.link_up && !m.addr.is_empty() {
                    actions.push(Action::Connect {
                        to: id.clone(),
                        addr: m.addr.clone(),
                    });
                }
                actions.push(Action::Send {
                    to: id.clone(),
                    msg: PeerMsg::Ping(ping.clone()),
                });
            }
            actions.extend(self.housekeeping(now_ms));
        }

        if self.ready && now_ms >= self.next_anti_entropy_ms {
            self.next_anti_entropy_ms = now_ms + self.config.anti_entropy_interval_ms;
            actions.extend(self.anti_entropy(now_ms));
        }

        let due: Vec<NodeId> = self
            .queues
            .iter()
            .filter(|(_, q)| q.len() > 0 && now_ms >= q.since_ms + self.config.batch_window_ms)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            actions.extend(self.flush(&id));
        }
        actions
    }

    // ---------------------------------------------------------------- membership

    fn unsettle(&mut self, now_ms: u64) {
        self.unsettled_until_ms = self
            .unsettled_until_ms
            .max(now_ms.saturating_add(self.config.settle_ms));
    }

    /// Whether this node's copy may miss writes made elsewhere (see
    /// [`Config::settle_ms`]).
    pub fn is_settling(&self, now_ms: u64) -> bool {
        now_ms < self.unsettled_until_ms
    }

    /// If `node` came back and is ready now, and this node is ready: the digests of
    /// the ranges this node owns, for it, at once.
    fn digest_if_back(&mut self, node: &NodeId, now_ms: u64) -> Vec<Action> {
        if !self.ready {
            return Vec::new();
        }
        let Some(m) = self.members.get_mut(node) else {
            return Vec::new();
        };
        if !m.needs_digest || !m.ready || m.state == MemberState::Down {
            return Vec::new();
        }
        m.needs_digest = false;
        let ranges = self.my_range_digests();
        if ranges.is_empty() {
            return Vec::new();
        }
        self.send_digest(node, ranges, now_ms)
    }

    /// Sends `to` the digests of the ranges this node owns, behind everything queued
    /// for it: the peer compares them once it has applied every change made here before
    /// they were taken, so that a batch on its way makes no difference.
    fn send_digest(&mut self, to: &NodeId, ranges: Vec<RangeDigest>, now_ms: u64) -> Vec<Action> {
        let mut actions = self.flush(to);
        if let Some(m) = self.members.get_mut(to) {
            m.digest_sent_ms = now_ms;
        }
        actions.push(Action::Send {
            to: to.clone(),
            msg: PeerMsg::Digest { ranges },
        });
        actions
    }

    fn ping(&self) -> Ping {
        Ping {
            version: PEER_PROTOCOL_VERSION,
            addr: self.my_addr.clone(),
            ready: self.ready,
            members: self
                .members
                .iter()
                .filter(|(_, m)| m.state != MemberState::Down && !m.addr.is_empty())
                .map(|(id, m)| (id.clone(), m.addr.clone()))
                .collect(),
        }
    }

    /// The transport received bytes from `node` at `at_ms`, whether or not this node
    /// has processed them yet. A peer whose messages wait in this node's own queue
    /// (this node is busy, not the peer) is then not taken for dead. It does not
    /// bring back a peer already Down: a processed message does that.
    pub fn link_activity(&mut self, node: &NodeId, at_ms: u64) {
        if let Some(m) = self.members.get_mut(node) {
            if m.state != MemberState::Down {
                if let Some(t) = m.last_heard_ms {
                    m.last_heard_ms = Some(t.max(at_ms));
                }
            }
        }
    }

    /// Any message from `node` counts as hearing from it.
    fn heard(&mut self, node: &NodeId, now_ms: u64) -> Vec<Action> {
        let Some(m) = self.members.get_mut(node) else {
            return Vec::new();
        };
        m.last_heard_ms = Some(now_ms);
        let was = m.state;
        m.state = MemberState::Up;
        let mut actions = Vec::new();
        if was == MemberState::Down {
            m.needs_digest = true;
            // Back (or new): tell it the sessions this node is home to, which it may
            // have missed, and let it in the ring if it is ready.
            self.queue_own_sessions(node, now_ms);
            actions.extend(self.rebuild_ring(now_ms));
        }
        actions
    }

    /// Queues for `node` the announcements of every session this node is home to
    /// (live, disconnected or closed and not yet forgotten), with its next batch.
    fn queue_own_sessions(&mut self, node: &NodeId, now_ms: u64) {
        let anns = self.own_sessions();
        if anns.is_empty() {
            return;
        }
        let q = self.queues.entry(node.clone()).or_default();
        if q.len() == 0 {
            q.since_ms = now_ms;
        }
        q.sessions.extend(anns);
    }

    fn set_ready(&mut self, node: &NodeId, ready: bool, now_ms: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Some(m) = self.members.get_mut(node) {
            if m.ready != ready {
                m.ready = ready;
                m.needs_digest |= ready;
                actions.extend(self.rebuild_ring(now_ms));
            }
        }
        actions.extend(self.bootstrap(now_ms));
        actions
    }

    /// Failure detection from last-heard times.
    fn detect(&mut self, now_ms: u64) -> Vec<Action> {
        let mut changed = false;
        let mut gone = Vec::new();
        for (id, m) in self.members.iter_mut() {
            let state = match m.last_heard_ms {
                Some(t) if now_ms.saturating_sub(t) < self.config.suspect_after_ms => {
                    MemberState::Up
                }
                Some(t) if now_ms.saturating_sub(t) < self.config.down_after_ms => {
                    MemberState::Suspect
                }
                _ => MemberState::Down,
            };
            if state != m.state {
                if state == MemberState::Down {
                    m.down_since_ms = now_ms;
                    gone.push(id.clone());
                }
                changed |= (state == MemberState::Down) != (m.state == MemberState::Down);
                m.state = state;
            }
        }
        for id in gone {
            // A Down peer gets no batches; anti-entropy repairs it when it is back.
            self.queues.remove(&id);
        }
        if changed {
            self.rebuild_ring(now_ms)
        } else {
            Vec::new()
        }
    }

    /// Rebuilds the ring from the view; on a change, restarts the Ttl leases of the
    /// services this node just took over (the beats went to the previous owner).
    fn rebuild_ring(&mut self, now_ms: u64) -> Vec<Action> {
        let mut ids: Vec<&str> = self
            .members
            .iter()
            .filter(|(_, m)| m.state != MemberState::Down && m.ready)
            .map(|(id, _)| id.as_str())
            .collect();
        if self.ready {
            ids.push(self.me.as_str());
        }
        ids.sort_unstable();
        let current: Vec<&str> = self.ring.members().iter().map(|m| m.id.as_str()).collect();
        if ids == current {
            return Vec::new();
        }
        let Ok(ring) = Ring::from_members(self.ring.vnodes_per_weight(), ids.iter().copied())
        else {
            // Ids are validated when members are learned; keep the old ring.
            return Vec::new();
        };
        let member_left = current.iter().any(|id| !ids.contains(id));
        let old = std::mem::replace(&mut self.ring, ring);
        self.ring_generation += 1;
        self.unsettle(now_ms);
        if member_left {
            // A member left: this node may own ranges it did not. Writes for them may
            // have been applied by a node whose ring differed, and their batches lost
            // with a link (bug 13 of docs/reliability.md): compare them now, as with a
            // member that comes back, not up to `anti_entropy_interval_ms` later.
            self.next_anti_entropy_ms = now_ms;
        }
        let me = self.me.clone();
        let new = &self.ring;
        self.registry
            .refresh_ttl_leases(&|s| owns(new, &me, s) && !owns(&old, &me, s), now_ms);
        vec![Action::RingChanged(
            self.ring
                .members()
                .iter()
                .map(|m| self.member_id(&m.id))
                .collect(),
        )]
    }

    // ---------------------------------------------------------------- readiness

    fn bootstrap(&mut self, now_ms: u64) -> Vec<Action> {
        if self.ready {
            return Vec::new();
        }
        if let Some(v) = &mut self.verify {
            // An owner that went away (or stopped being one) is not waited for; nor is
            // any after `snapshot_timeout_ms`: the node is then ready with what it has,
            // and anti-entropy goes on from there.
            let members = &self.members;
            v.pending
                .retain(|id, _| members.get(id).is_some_and(Member::can_answer));
            if v.pending.is_empty() || now_ms >= v.since_ms + self.config.snapshot_timeout_ms {
                return self.become_ready(now_ms);
            }
            return Vec::new();
        }
        if let Some(load) = &self.snapshot {
            let source_ok = self
                .members
                .get(&load.from)
                .is_some_and(|m| m.state != MemberState::Down && m.ready);
            if source_ok && now_ms < load.asked_ms + self.config.snapshot_timeout_ms {
                return Vec::new();
            }
        }
        let ready_peers: Vec<NodeId> = self
            .members
            .iter()
            .filter(|(_, m)| m.state == MemberState::Up && m.ready)
            .map(|(id, _)| id.clone())
            .collect();
        if ready_peers.is_empty() {
            if self.snapshot.is_none() && now_ms >= self.started_ms + self.config.bootstrap_wait_ms
            {
                return self.become_ready(now_ms);
            }
            return Vec::new();
        }
        let from = ready_peers[(self.random() % ready_peers.len() as u64) as usize].clone();
        tracing::debug!(from = %from.0, "asking for the snapshot");
        // Start over from the same cursor: chunks merge, so repeats are harmless.
        let after = self.snapshot.take().and_then(|l| l.after);
        self.snapshot = Some(SnapshotLoad {
            from: from.clone(),
            after: after.clone(),
            asked_ms: now_ms,
        });
        vec![Action::Send {
            to: from,
            msg: PeerMsg::SnapshotRequest { after },
        }]
    }

    fn on_chunk(&mut self, from: &NodeId, chunk: SnapshotChunk, now_ms: u64) -> Vec<Action> {
        let mut actions = self.apply_records(chunk.records, now_ms);
        let Some(load) = &mut self.snapshot else {
            return actions;
        };
        if &load.from != from || self.ready {
            return actions;
        }
        if chunk.done {
            for ann in chunk.sessions {
                self.merge_session(ann, now_ms);
            }
            self.snapshot = None;
            actions.extend(self.start_verify(now_ms));
        } else {
            load.after = chunk.next.clone();
            load.asked_ms = now_ms;
            actions.push(Action::Send {
                to: from.clone(),
                msg: PeerMsg::SnapshotRequest { after: chunk.next },
            });
        }
        actions
    }

    /// The snapshot is loaded: send every owner in the ring (ready peers; this node is
    /// not in it yet) the digests of its ranges, and be ready once each has answered
    /// and sent what differs (see [`Verify`]).
    fn start_verify(&mut self, now_ms: u64) -> Vec<Action> {
        let mut by_owner: BTreeMap<NodeId, Vec<RangeDigest>> = BTreeMap::new();
        for r in self.ring.ranges() {
            let owner = self.member_id(&r.owner);
            if self.members.get(&owner).is_some_and(Member::can_answer) {
                by_owner.entry(owner).or_default().push(RangeDigest {
                    start: r.start,
                    end: r.end,
                    hash: self.registry.range_digest(r.start, r.end),
                });
            }
        }
        let mut actions = Vec::new();
        let mut pending = BTreeMap::new();
        for (owner, ranges) in by_owner {
            actions.extend(self.send_digest(&owner, ranges, now_ms));
            pending.insert(owner, 1);
        }
        tracing::debug!(
            owners = pending.len(),
            "snapshot loaded; comparing it with the owners"
        );
        if pending.is_empty() {
            actions.extend(self.become_ready(now_ms));
        } else {
            self.verify = Some(Verify {
                pending,
                since_ms: now_ms,
            });
        }
        actions
    }

    /// An owner answered the digests (or the barrier) a starting node sent it; `asked`:
    /// the answer made this node ask it for records, which are awaited behind a barrier
    /// (an empty digest, answered after the records on the ordered link).
    fn verify_answered(&mut self, from: &NodeId, asked: bool, now_ms: u64) -> Vec<Action> {
        let Some(v) = &mut self.verify else {
            return Vec::new();
        };
        let Some(left) = v.pending.get_mut(from) else {
            return Vec::new();
        };
        let mut actions = Vec::new();
        *left = left.saturating_sub(1);
        if asked {
            *left += 1;
            actions.push(Action::Send {
                to: from.clone(),
                msg: PeerMsg::Digest { ranges: Vec::new() },
            });
        }
        if *left == 0 {
            v.pending.remove(from);
        }
        if v.pending.is_empty() {
            actions.extend(self.become_ready(now_ms));
        }
        actions
    }

    fn become_ready(&mut self, now_ms: u64) -> Vec<Action> {
        self.ready = true;
        self.snapshot = None;
        self.verify = None;
        // The snapshot came from one peer: compare with the others at once.
        self.next_anti_entropy_ms = now_ms;
        self.unsettle(now_ms);
        let mut actions = vec![Action::Ready];
        actions.extend(self.rebuild_ring(now_ms));
        // Sessions the table says are live here belong to an earlier incarnation of
        // this node (a node serves no client before it is ready): their clients are not
        // connected to this process. Announce them disconnected, so the owners keep them
        // for the grace period and then delete them unless they resume. Without this, a
        // node restarted faster than `down_after_ms` would leave them live forever.
        let stale: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, e)| e.home == self.me && e.state == SessionState::Live)
            .map(|(s, _)| *s)
            .collect();
        for session in stale {
            actions.extend(self.announce(session, SessionState::Disconnected, now_ms));
        }
        let ping = self.ping();
        for id in self.members.keys() {
            actions.push(Action::Send {
                to: id.clone(),
                msg: PeerMsg::Ping(ping.clone()),
            });
        }
        actions
    }

    // ---------------------------------------------------------------- replication

    /// Queues the operations the registry recorded for every peer.
    fn queue_local_ops(&mut self, now_ms: u64) -> Vec<Action> {
        let ops = self.registry.take_ops();
        if ops.is_empty() {
            return Vec::new();
        }
        self.queue(ops, Vec::new(), now_ms)
    }

    /// Queues operations and announcements for every peer that is not Down; a full
    /// queue leaves at once.
    fn queue(&mut self, ops: Vec<Op>, anns: Vec<SessionAnnounce>, now_ms: u64) -> Vec<Action> {
        // One copy of each operation, shared by every peer's queue.
        let ops: Vec<Arc<Op>> = ops.into_iter().map(Arc::new).collect();
        // On the path of every local write: no list of the peers is made, and a peer's
        // id is copied only for a queue it did not have.
        let mut full = Vec::new();
        for (id, m) in &self.members {
            if m.state == MemberState::Down {
                continue;
            }
            if !self.queues.contains_key(id) {
                self.queues.insert(id.clone(), Outq::default());
            }
            let q = self.queues.get_mut(id).expect("just ensured");
            if q.len() == 0 {
                q.since_ms = now_ms;
            }
            q.ops.extend(ops.iter().cloned());
            q.sessions.extend(anns.iter().cloned());
            if q.len() >= self.config.batch_max_ops {
                full.push(id.clone());
            }
        }
        let mut actions = Vec::new();
        for id in full {
            actions.extend(self.flush(&id));
        }
        actions
    }

    fn flush(&mut self, peer: &NodeId) -> Vec<Action> {
        // Forwarded writes queued for the peer go first: a session's announcement
        // (closed, say) must not overtake the writes it made before.
        let mut actions = self.flush_forwards_to(peer);
        let Some(q) = self.queues.remove(peer) else {
            return actions;
        };
        if q.len() == 0 {
            return actions;
        }
        let max = self.config.batch_max_ops.max(1);
        let mut ops = q.ops.into_iter().peekable();
        let mut sessions = q.sessions.into_iter().peekable();
        while ops.peek().is_some() || sessions.peek().is_some() {
            let s: Vec<SessionAnnounce> = sessions.by_ref().take(max).collect();
            let o: Vec<Arc<Op>> = ops.by_ref().take(max - s.len()).collect();
            actions.push(Action::Send {
                to: peer.clone(),
                msg: PeerMsg::Batch(Batch {
                    ops: o,
                    sessions: s,
                }),
            });
        }
        actions
    }

    fn on_batch(&mut self, from: &NodeId, batch: Batch, now_ms: u64) -> Vec<Action> {
        let n = batch.ops.len();
        let oldest = batch.ops.iter().map(|op| op.stamp().millis()).min();
        for ann in batch.sessions {
            self.registry.observe(ann.stamp);
            self.merge_session(ann, now_ms);
        }
        let mut changes = Vec::new();
        let mut reassert = Vec::new();
        for op in batch.ops {
            // Decoded from the wire, the operation is not shared: no copy.
            let op = Arc::try_unwrap(op).unwrap_or_else(|shared| (*shared).clone());
            reassert.extend(self.reassertable(&op));
            if let Ok(Some(c)) = self.registry.apply_remote(op, now_ms) {
                changes.push(c);
            }
        }
        let mut actions = Vec::new();
        if !changes.is_empty() {
            actions.push(Action::Publish(changes));
        }
        if let Some(oldest) = oldest {
            actions.push(Action::BatchApplied {
                from: from.clone(),
                ops: n,
                max_lag_ms: now_ms.saturating_sub(oldest),
            });
        }
        actions.extend(self.reassert(reassert, now_ms));
        actions
    }

    fn apply_records(&mut self, records: Vec<ServiceRecord>, now_ms: u64) -> Vec<Action> {
        let mut changes = Vec::new();
        let mut reassert = Vec::new();
        for rec in records {
            for op in &rec.ops {
                reassert.extend(self.reassertable(op));
            }
            if let Ok(Some(c)) = self.registry.apply_record(rec, now_ms) {
                changes.push(c);
            }
        }
        let mut actions = Vec::new();
        if !changes.is_empty() {
            actions.push(Action::Publish(changes));
        }
        actions.extend(self.reassert(reassert, now_ms));
        actions
    }

    /// A reaped deletion of an instance whose session is live on this node (its home):
    /// the instance to register again. This is how "an instance whose session is
    /// alive somewhere stays" after the other side of a partition reaped it.
    fn reassertable(&self, op: &Op) -> Option<(ServiceKey, SessionId, Instance)> {
        let Op::Instance(op) = op else { return None };
        if !op.reaped || op.state.is_some() {
            return None;
        }
        if op.stamp <= self.registry.instance_version(&op.service, &op.key) {
            return None;
        }
        // The session first: most reaped instances belong to sessions that ended, and
        // building the instance allocates.
        let session = self.registry.instance_session(&op.service, &op.key)?;
        let e = self.sessions.get(&session)?;
        if e.home != self.me || e.state != SessionState::Live {
            return None;
        }
        let inst = self.registry.instance(&op.service, &op.key)?;
        Some((op.service.clone(), session, inst))
    }

    fn reassert(
        &mut self,
        items: Vec<(ServiceKey, SessionId, Instance)>,
        now_ms: u64,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        if items.is_empty() {
            return actions;
        }
        // The owners must hear that the sessions are live before the writes arrive.
        let mut anns: Vec<SessionAnnounce> = Vec::new();
        for (_, session, _) in &items {
            if let Some(e) = self.sessions.get(session) {
                anns.push(SessionAnnounce {
                    session: *session,
                    home: e.home.clone(),
                    state: e.state,
                    stamp: e.stamp,
                });
            }
        }
        actions.extend(self.queue(Vec::new(), anns, now_ms));
        let peers: Vec<NodeId> = self.queues.keys().cloned().collect();
        for p in peers {
            actions.extend(self.flush(&p));
        }
        for (service, session, inst) in items {
            tracing::debug!(%session, "re-asserting an instance reaped elsewhere");
            let write = Write::Register {
                service: service.clone(),
                instance: spec_of(&inst),
                session,
            };
            match self.route(&service) {
                Route::Local | Route::Unavailable => {
                    if let Ok((_, more)) = self.apply_write(write, now_ms) {
                        actions.extend(more);
                    }
                }
                Route::Forward(owner) => actions.extend(self.forward(&owner, write, now_ms).1),
            }
        }
        actions
    }

    /// Repair messages of at most `chunk_max_services` records and (unless one record
    /// alone is larger) `chunk_max_ops` operations each.
    fn repair_msgs(&self, to: &NodeId, records: Vec<ServiceRecord>) -> Vec<Action> {
        let max = self.config.chunk_max_services.max(1);
        let max_ops = self.config.chunk_max_ops.max(1);
        let mut actions = Vec::new();
        let mut chunk: Vec<ServiceRecord> = Vec::new();
        let mut ops = 0;
        for r in records {
            if !chunk.is_empty() && (chunk.len() >= max || ops + r.ops.len() > max_ops) {
                actions.push(Action::Send {
                    to: to.clone(),
                    msg: PeerMsg::Repair {
                        records: std::mem::take(&mut chunk),
                    },
                });
                ops = 0;
            }
            ops += r.ops.len();
            chunk.push(r);
        }
        if !chunk.is_empty() {
            actions.push(Action::Send {
                to: to.clone(),
                msg: PeerMsg::Repair { records: chunk },
            });
        }
        actions
    }

    /// The digests of the ring ranges this node owns.
    fn my_range_digests(&mut self) -> Vec<RangeDigest> {
        let generation = self.ownership_generation();
        if let Some((at, ranges)) = &self.digest_cache {
            if *at == generation {
                return ranges.clone();
            }
        }
        let ranges: Vec<RangeDigest> = self
            .ring
            .ranges()
            .iter()
            .filter(|r| r.owner == self.me.as_str())
            .map(|r| RangeDigest {
                start: r.start,
                end: r.end,
                hash: self.registry.range_digest(r.start, r.end),
            })
            .collect();
        self.digest_cache = Some((generation, ranges.clone()));
        ranges
    }

    /// What [`Replica::owned_service_count`] and this node's range digests depend on:
    /// while this stays the same, so do they (a gauge need not count again).
    pub fn ownership_generation(&self) -> (u64, u64) {
        (self.ring_generation, self.registry.content_generation())
    }

    fn anti_entropy(&mut self, now_ms: u64) -> Vec<Action> {
        let ranges = self.my_range_digests();
        if ranges.is_empty() {
            return Vec::new();
        }
        for m in self.members.values_mut() {
            if m.state != MemberState::Down && m.ready {
                m.needs_digest = false;
            }
        }
        let peers: Vec<NodeId> = self
            .members
            .iter()
            .filter(|(_, m)| m.state != MemberState::Down)
            .map(|(id, _)| id.clone())
            .collect();
        let mut actions = Vec::new();
        for id in peers {
            actions.extend(self.send_digest(&id, ranges.clone(), now_ms));
        }
        actions
    }

    // ---------------------------------------------------------------- sessions

    /// Merges a session announcement into the table. A newer stamp wins, except that
    /// the end of a session at one home never overrides the session live at another
    /// (the stale close of an old incarnation), and a session live at a new home
    /// overrides its end at an old one whatever their stamps (a resume elsewhere).
    fn merge_session(&mut self, ann: SessionAnnounce, now_ms: u64) {
        self.unknown_since.remove(&ann.session);
        let home_ix = match self.homes.iter().position(|h| h == &ann.home) {
            Some(i) => i,
            None => {
                self.homes.push(ann.home.clone());
                self.homes.len() - 1
            }
        } as u32;
        let entry = SessionEntry {
            home: ann.home.clone(),
            home_ix,
            state: ann.state,
            stamp: ann.stamp,
            since_ms: now_ms,
            orphaned_since_ms: None,
        };
        match self.sessions.get(&ann.session) {
            None => {
                self.sessions.insert(ann.session, entry);
                self.session_table_generation += 1;
            }
            Some(cur) => {
                let live = |s: SessionState| s == SessionState::Live;
                let other_home = cur.home != ann.home;
                let take = if other_home && live(cur.state) && !live(ann.state) {
                    false
                } else if other_home && !live(cur.state) && live(ann.state) {
                    true
                } else {
                    ann.stamp > cur.stamp
                };
                if cur.home != ann.home || cur.state != ann.state {
                    tracing::debug!(
                        session = %ann.session, home = %ann.home.0, state = ?ann.state,
                        was_home = %cur.home.0, was_state = ?cur.state, take,
                        "session announcement"
                    );
                }
                if take {
                    self.sessions.insert(ann.session, entry);
                }
            }
        }
    }

    fn session_table(&self) -> Vec<SessionAnnounce> {
        let mut out: Vec<SessionAnnounce> = self
            .sessions
            .iter()
            .map(|(s, e)| SessionAnnounce {
                session: *s,
                home: e.home.clone(),
                state: e.state,
                stamp: e.stamp,
            })
            .collect();
        out.sort_by_key(|a| a.session);
        out
    }

    fn own_sessions(&self) -> Vec<SessionAnnounce> {
        let mut out: Vec<SessionAnnounce> = self
            .session_table()
            .into_iter()
            .filter(|a| a.home == self.me)
            .collect();
        out.sort_by_key(|a| a.session);
        out
    }

    /// Deletes the instances of `session` in the services this node owns.
    fn reap(&mut self, session: SessionId, now_ms: u64) -> Vec<Action> {
        let ring = &self.ring;
        let me = &self.me;
        let changes = self
            .registry
            .remove_session_in(session, &|s| owns(ring, me, s));
        tracing::debug!(%session, removed = changes.len(), "session reaped");
        let mut actions = self.queue_local_ops(now_ms);
        if !changes.is_empty() {
            actions.push(Action::Publish(changes));
        }
        actions
    }

    /// Periodic work: self-preservation, session liveness, Ttl expiry, tombstones.
    fn housekeeping(&mut self, now_ms: u64) -> Vec<Action> {
        let known = self
            .members
            .values()
            .filter(|m| m.last_heard_ms.is_some())
            .count();
        let down = self
            .members
            .values()
            .filter(|m| m.last_heard_ms.is_some() && m.state == MemberState::Down)
            .count();
        let preserving = self.self_preservation;
        self.self_preservation =
            known > 0 && down as f64 > self.config.self_preservation_fraction * known as f64;
        if preserving && !self.self_preservation {
            // Leaving self-preservation: the sessions it held past their grace period
            // (disconnected, orphaned by a home still down, unknown) get a full grace
            // period from now, so that the clients of the members still coming back
            // can resume. Deleting them at once would be the mass expiry that
            // self-preservation exists to prevent, only later.
            self.restart_grace_clocks(now_ms);
        }

        let mut actions = Vec::new();
        self.registry.gc_tombstones(now_ms);
        let grace = self.config.session_grace_ms;
        let forget_after = grace.saturating_add(self.config.tombstone_ttl_ms);
        let before = self.sessions.len();
        self.sessions.retain(|_, e| {
            e.state == SessionState::Live || now_ms.saturating_sub(e.since_ms) < forget_after
        });
        if self.sessions.len() != before {
            self.session_table_generation += 1;
        }
        if !self.ready {
            return actions;
        }

        // Per home (a handful), not per session: None for this node, else whether the
        // home is Down (or not a member at all).
        let home_down: Vec<Option<bool>> = self
            .homes
            .iter()
            .map(|h| {
                (h != &self.me).then(|| {
                    self.members
                        .get(h)
                        .is_none_or(|m| m.state == MemberState::Down)
                })
            })
            .collect();
        // The table's sessions, without a lookup each: the sweep runs every probe
        // interval over every session (10 000 and more), and almost all are Live at
        // a home that is up. Only those with instances here can be doomed.
        let mut doomed = Vec::new();
        let registry = &self.registry;
        for (&session, e) in self.sessions.iter_mut() {
            let doom = match e.state {
                SessionState::Closed => Some(Doom::Closed),
                SessionState::Disconnected => {
                    (now_ms.saturating_sub(e.since_ms) >= grace).then_some(Doom::Lapsed)
                }
                SessionState::Live => match home_down[e.home_ix as usize] {
                    None => None,
                    Some(true) => {
                        // Orphaned from when this node first sees it orphaned while it
                        // holds instances here.
                        if e.orphaned_since_ms.is_none() && !registry.holds_session(session) {
                            continue;
                        }
                        let since = *e.orphaned_since_ms.get_or_insert(now_ms);
                        (now_ms.saturating_sub(since) >= grace).then_some(Doom::Lapsed)
                    }
                    Some(false) => {
                        e.orphaned_since_ms = None;
                        None
                    }
                },
            };
            match doom {
                Some(Doom::Closed) => doomed.push(session),
                Some(Doom::Lapsed) if !self.self_preservation => doomed.push(session),
                _ => {}
            }
        }
        doomed.retain(|s| registry.holds_session(*s));

        // Sessions with instances here that no node has announced: the set changes
        // only when the registry's sessions or the table's do.
        let generations = (
            self.registry.session_set_generation(),
            self.session_table_generation,
        );
        if self.unknown_checked != Some(generations) {
            for session in self.registry.sessions() {
                if !self.sessions.contains_key(&session) {
                    self.unknown_since.entry(session).or_insert(now_ms);
                }
            }
            let (registry, sessions) = (&self.registry, &self.sessions);
            self.unknown_since
                .retain(|s, _| registry.holds_session(*s) && !sessions.contains_key(s));
            self.unknown_checked = Some(generations);
        }
        if !self.self_preservation {
            doomed.extend(
                self.unknown_since
                    .iter()
                    .filter(|(_, since)| now_ms.saturating_sub(**since) >= grace)
                    .map(|(s, _)| *s),
            );
        }
        for session in doomed {
            actions.extend(self.reap(session, now_ms));
        }

        if !self.self_preservation {
            let ring = &self.ring;
            let me = &self.me;
            let changes = self.registry.expire_in(now_ms, &|s| owns(ring, me, s));
            actions.extend(self.queue_local_ops(now_ms));
            if !changes.is_empty() {
                actions.push(Action::Publish(changes));
            }
        }
        actions
    }

    /// Gives every session whose grace period runs (disconnected, orphaned by a home
    /// Down, unknown) a full grace period from `now_ms`.
    fn restart_grace_clocks(&mut self, now_ms: u64) {
        for e in self.sessions.values_mut() {
            if e.state == SessionState::Disconnected {
                e.since_ms = now_ms;
            }
            if e.orphaned_since_ms.is_some() {
                e.orphaned_since_ms = Some(now_ms);
            }
        }
        for since in self.unknown_since.values_mut() {
            *since = now_ms;
        }
    }

    fn random(&mut self) -> u64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn owns(ring: &Ring, me: &NodeId, service: &ServiceKey) -> bool {
    ring.owner_at(service.position()) == Some(me.as_str())
}

fn valid_id(id: &NodeId) -> bool {
    !id.0.is_empty() && id.0.len() <= shoal_ring::MAX_ID_LEN
}

/// The spec that registers `inst` again as it is.
fn spec_of(inst: &Instance) -> InstanceSpec {
    InstanceSpec {
        ip: inst.ip.clone(),
        port: inst.port,
        cluster: inst.cluster.clone(),
        weight: inst.weight,
        healthy: inst.healthy,
        enabled: inst.enabled,
        metadata: inst.metadata.clone(),
        ttl: match &inst.lease {
            Lease::Ttl(t) => Some(t.clone()),
            Lease::Session(_) => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use shoal_storage::ServiceKey;

    /// The engine places a service by the position its key computed when it was made
    /// (`ServiceKey::position`, storage's hash): it must be the ring's own position of
    /// the key's placement bytes, or nodes would disagree on owners with older nodes.
    #[test]
    fn a_service_keys_position_is_its_ring_position() {
        let long = "x".repeat(300);
        for (ns, g, s) in [
            ("public", "DEFAULT_GROUP", "orders"),
            ("", "", ""),
            ("dev", "g", "svc-1"),
            ("dev", "g", "svc-2"),
            ("ns", "g", long.as_str()),
            ("ns", "g", "é"),
        ] {
            let k = ServiceKey::new(ns, g, s);
            assert_eq!(
                k.position(),
                shoal_ring::position(&k.placement_bytes()),
                "{k}"
            );
        }
    }
}
