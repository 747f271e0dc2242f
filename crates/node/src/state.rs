//! The state one node shares between its tasks: the replica (registry + cluster view),
//! the peer links, the sessions homed here and the subscribers, and the rules that tie
//! them together.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use shoal_proto::mpack::ServiceKeyCache;
use shoal_proto::ServerFrame;
use shoal_replication::{Action, ForwardOutcome, PeerMsg, Replica};
use shoal_storage::{Change, NodeId, ServiceKey, SessionId};
use tokio::sync::{mpsc, oneshot};

use crate::config::Config;
use crate::peer::Links;

/// Identifies one client connection on this node (sessions outlive connections).
pub type ConnId = u64;

/// One frame queued towards a client.
pub enum Outgoing {
    /// A frame the writer encodes.
    Frame(ServerFrame),
    /// The answer to request `id` whose result is already encoded (a cached query
    /// answer): the writer only frames it with the id.
    Answer {
        /// The request's id.
        id: u64,
        /// The encoded result (see [`shoal_proto::encode_result`]).
        result: crate::query_cache::EncodedAnswer,
    },
    /// A whole frame already encoded (a push, the same bytes for every subscriber):
    /// the writer copies it as it is.
    Encoded(crate::push::EncodedFrame),
    /// Several frames that leave in one write (the answers to a run of writes).
    Frames(Vec<ServerFrame>),
}

impl From<ServerFrame> for Outgoing {
    fn from(frame: ServerFrame) -> Self {
        Outgoing::Frame(frame)
    }
}

/// The way to reach one connected client: its queue of outgoing frames, and its
/// connection, to close it when it cannot keep up.
#[derive(Clone)]
pub struct Outbox {
    /// Frames to write on the session stream.
    pub tx: mpsc::Sender<Outgoing>,
    /// The QUIC connection, closed when the queue overflows.
    pub conn: quinn::Connection,
}

/// One subscription: the connection's outbox and what was last queued to it.
struct Subscriber {
    outbox: Outbox,
    sent: Sent,
}

/// What a subscriber was last sent: the revision of its last view (so that views only
/// go forward; see [`crate::push`]), and whether that view was of a service that does
/// not exist (so that it is not sent the same emptiness twice).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Sent {
    revision: u64,
    gone: bool,
}

impl Sent {
    /// Whether a view at `revision` (of a service that is `gone`, or not) is to be
    /// queued, and notes it as sent if so. Every view of a service that is gone reads
    /// the same, whatever its label: when a later change than the one noted has emptied
    /// the service, its emptiness was pushed already, labelled with the earlier change's
    /// revision, and is not pushed again at the later change's.
    fn admit(&mut self, revision: u64, gone: bool) -> bool {
        if revision <= self.revision {
            return false;
        }
        self.revision = revision;
        if gone && self.gone {
            return false;
        }
        self.gone = gone;
        true
    }
}

/// A push ready for a service's subscribers.
struct EncodedPush {
    frame: crate::push::EncodedFrame,
    /// The revision it is labelled with.
    revision: u64,
    /// Whether the service does not exist (the view has no instances).
    gone: bool,
}

/// A session homed here: the connection carrying it, `None` once it disconnected.
struct SessionEntry {
    conn: Option<ConnId>,
    since_ms: u64,
}

/// Everything a node's tasks share.
pub struct Shared {
    /// This node's id.
    pub node_id: NodeId,
    my_addr: String,
    /// The configuration it runs with.
    pub config: Config,
    /// The replica: the registry and the engine's view of the cluster. Whoever
    /// changes it holds the write lock while executing the engine's actions, so every
    /// change is noted for a push before the lock is released.
    pub replica: RwLock<Replica>,
    /// The links to the other nodes.
    pub links: Arc<Links<PeerMsg>>,
    sessions: Mutex<HashMap<SessionId, SessionEntry>>,
    subscribers: Mutex<HashMap<ServiceKey, HashMap<ConnId, Subscriber>>>,
    /// Services changed and waiting for the push thread (see [`crate::push`]).
    pushes: Arc<crate::push::PushQueue>,
    /// Forwarded runs of client writes (one message per owner) waiting for their owner.
    pending_batches: Mutex<HashMap<u64, oneshot::Sender<Vec<ForwardOutcome>>>>,
    /// Whether the node answers clients (false while loading its snapshot, and while
    /// stopping).
    pub ready: AtomicBool,
    next_conn: AtomicU64,
    /// The connections that hold a session, for the heartbeat (see
    /// [`crate::server`]'s `heartbeat_loop`).
    pub session_conns: Mutex<HashMap<ConnId, quinn::Connection>>,
    /// When the node started (ms, wall clock): for the snapshot-load duration metric.
    pub started_ms: u64,
    /// When the tick loop last ran (ms, wall clock; 0 before it first ran).
    last_tick_ms: AtomicU64,
    /// How many stalls this process came out of (see [`Shared::stall_epoch`]).
    stalls: AtomicU64,
    /// Wakes the tick loop from its idle pace when operations wait in a peer's batch
    /// (see [`Shared::execute`]).
    pub tick_wake: tokio::sync::Notify,
    /// Wakes the task that sends the runs of writes queued for their owners
    /// ([`Shared::forwards_queued`]).
    pub forward_wake: tokio::sync::Notify,
    /// Encoded query answers by service revision.
    pub query_cache: crate::query_cache::QueryCache,
    /// The service keys clients' writes named, by their bytes, for all the node's
    /// client connections (see `shoal_proto::decode_client_frame`).
    pub client_keys: Mutex<ServiceKeyCache>,
}

/// How many service keys [`Shared::client_keys`] holds (about 100 bytes each): one set
/// per node, not per connection, whatever the number of sessions.
const CLIENT_SERVICE_KEYS: usize = 16_384;

/// The outcome of attaching a connection to a session.
pub struct Attached {
    /// True if the session was known here (live or disconnected within its grace
    /// period): its instances were kept.
    pub resumed: bool,
}

/// Wall-clock milliseconds since the UNIX epoch. Replication stamps are hybrid logical
/// clocks built on it, so nodes of a cluster need roughly synchronized clocks (NTP);
/// the logical part keeps stamps monotonic when a clock steps back.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Shared {
    /// New state for a node.
    pub fn new(
        node_id: NodeId,
        my_addr: String,
        config: Config,
        replica: Replica,
        links: Arc<Links<PeerMsg>>,
    ) -> Arc<Self> {
        let shared = Arc::new(Shared {
            node_id,
            my_addr,
            replica: RwLock::new(replica),
            links,
            sessions: Mutex::new(HashMap::new()),
            subscribers: Mutex::new(HashMap::new()),
            pushes: Arc::default(),
            pending_batches: Mutex::new(HashMap::new()),
            ready: AtomicBool::new(false),
            next_conn: AtomicU64::new(1),
            session_conns: Mutex::new(HashMap::new()),
            started_ms: wall_ms(),
            last_tick_ms: AtomicU64::new(0),
            stalls: AtomicU64::new(0),
            tick_wake: tokio::sync::Notify::new(),
            forward_wake: tokio::sync::Notify::new(),
            query_cache: crate::query_cache::QueryCache::new(config.query_cache_bytes),
            config,
            client_keys: Mutex::new(ServiceKeyCache::new(CLIENT_SERVICE_KEYS)),
        });
        // The push thread holds the state weakly: it ends when the state is dropped
        // (which closes the queue), so a stopped node leaves nothing running.
        let queue = shared.pushes.clone();
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("shoal-push".into())
            .spawn(move || {
                while let Some(changed) = queue.take() {
                    let Some(shared) = weak.upgrade() else { break };
                    shared.push_changed(changed);
                }
            })
            .expect("cannot start the push thread");
        shared
    }

    /// A stall (the process did not run: SIGSTOP, a paused VM, a long GC) this long may
    /// be long enough for clients to have given up on this node: half the idle timeout,
    /// but at least 2 s (a busy machine delays a tick by less) and at most the idle
    /// timeout (by then every client has given up).
    fn stall_ms(&self) -> u64 {
        let idle = self.config.idle_timeout_ms.max(1);
        (idle / 2).max(2_000).min(idle)
    }

    /// Called by the tick loop each time it runs: counts a stall when the previous run
    /// is older than [`Shared::stall_ms`]; returns its length if so.
    pub fn ticked(&self, now_ms: u64) -> Option<u64> {
        let prev = self.last_tick_ms.swap(now_ms, Ordering::AcqRel);
        let gap = now_ms.saturating_sub(prev);
        if prev != 0 && gap > self.stall_ms() {
            self.stalls.fetch_add(1, Ordering::AcqRel);
            Some(gap)
        } else {
            None
        }
    }

    /// Which stall this process is in the era of, as of `now_ms`: it changes when the
    /// process comes out of a stall, even before the tick loop noticed. A request read
    /// on a connection opened in an earlier era may have waited out the stall in the
    /// socket buffers; its client has likely given up, sent it again through another
    /// node, and written since: serving it now could undo a later write.
    pub fn stall_epoch(&self, now_ms: u64) -> u64 {
        let stalls = self.stalls.load(Ordering::Acquire);
        let last = self.last_tick_ms.load(Ordering::Acquire);
        if last != 0 && now_ms.saturating_sub(last) > self.stall_ms() {
            stalls + 1
        } else {
            stalls
        }
    }

    /// The clock every engine and registry call uses.
    pub fn now_ms(&self) -> u64 {
        wall_ms()
    }

    /// The address peers and clients reach this node at.
    pub fn my_addr(&self) -> String {
        self.my_addr.clone()
    }

    /// A fresh connection id.
    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether the node serves clients.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Number of sessions connected here now.
    pub fn session_count(&self) -> usize {
        lock(&self.sessions)
            .values()
            .filter(|e| e.conn.is_some())
            .count()
    }

    /// Number of (connection, service) subscriptions.
    pub fn subscription_count(&self) -> usize {
        lock(&self.subscribers).values().map(|m| m.len()).sum()
    }

    /// Binds `session` to connection `conn` and announces it to the cluster. A session
    /// known here is resumed; an unknown id (a new session, or one whose home node
    /// died) is taken as is.
    pub fn attach(&self, session: SessionId, conn: ConnId) -> Attached {
        let now = self.now_ms();
        let resumed = {
            let mut sessions = lock(&self.sessions);
            let grace = self.config.session_grace_ms;
            sessions.retain(|_, e| e.conn.is_some() || now.saturating_sub(e.since_ms) < grace);
            sessions
                .insert(
                    session,
                    SessionEntry {
                        conn: Some(conn),
                        since_ms: now,
                    },
                )
                .is_some()
        };
        let mut replica = write(&self.replica);
        let actions = replica.session_opened(session, now);
        self.execute(&replica, actions);
        Attached { resumed }
    }

    /// This node came out of a stall ([`Shared::stall_epoch`]): the requests on the
    /// client connections open now would be refused anyway (they may have waited out
    /// the stall), and their clients have likely moved on. End their sessions here now
    /// (disconnected: each may resume within its grace, here or elsewhere) and close the
    /// connections, rather than at each one's next request or idle timeout, so that
    /// this node does not go on announcing sessions live at itself whose clients left
    /// during the stall (a new link to a peer sends it this node's sessions again).
    pub fn end_connections_after_stall(&self) {
        let attached: Vec<(SessionId, ConnId)> = lock(&self.sessions)
            .iter()
            .filter_map(|(s, e)| e.conn.map(|c| (*s, c)))
            .collect();
        for &(session, conn) in &attached {
            self.detach(session, conn, false);
        }
        let conns: Vec<quinn::Connection> = lock(&self.session_conns).values().cloned().collect();
        for conn in &conns {
            conn.close(crate::server::CLOSE_STALLED, b"node stalled; reconnect");
        }
        tracing::info!(
            sessions = attached.len(),
            connections = conns.len(),
            "closed the client connections opened before the stall; their clients reconnect"
        );
    }

    /// The connection `conn` of `session` ended. On a clean end (Goodbye) the
    /// session's instances go now; otherwise the owners keep them for
    /// `session_grace_ms`, waiting for a resume here or on another node.
    pub fn detach(&self, session: SessionId, conn: ConnId, clean: bool) {
        let now = self.now_ms();
        {
            let mut sessions = lock(&self.sessions);
            let Some(entry) = sessions.get_mut(&session) else {
                return;
            };
            if entry.conn != Some(conn) {
                // Another connection has taken the session over, or it was ended already
                // (after a stall): nothing ends.
                tracing::debug!(%session, ?conn, "connection ended; the session was no longer attached to it");
                return;
            }
            tracing::debug!(%session, ?conn, clean, "session detached");
            if clean {
                sessions.remove(&session);
            } else {
                entry.conn = None;
                entry.since_ms = now;
            }
        }
        let mut replica = write(&self.replica);
        let actions = replica.session_closed(session, clean, now);
        self.execute(&replica, actions);
    }

    /// Does what the engine asked. Call with the replica's write lock held (pass the
    /// guarded replica), so that every change is noted for a push before another
    /// reader (a Subscribe, the push thread) can see it.
    ///
    /// When operations now wait in a peer's batch, the tick loop is woken if it waits
    /// at its idle pace (else the wake is kept for its next wait, and costs one early
    /// run), so that the batch leaves within `batch_window_ms`.
    pub fn execute(&self, replica: &Replica, actions: Vec<Action>) {
        if replica.has_queued() {
            self.tick_wake.notify_one();
        }
        for action in actions {
            match action {
                Action::Send { to, msg } => {
                    // The engine's own single forwards are awaited by nobody.
                    let forward_id = match &msg {
                        PeerMsg::ForwardMany { id, .. } => Some(*id),
                        _ => None,
                    };
                    if !self.links.send(&to, msg) {
                        metrics::counter!("shoal_peer_messages_dropped_total").increment(1);
                        if let Some(id) = forward_id {
                            // The owner is unreachable: fail the runs it carried now.
                            let mut pending = lock(&self.pending_batches);
                            for run in replica.forwarded_runs(id) {
                                pending.remove(&run);
                            }
                        }
                    }
                }
                Action::Connect { addr, .. } => self.links.dial(addr),
                Action::Publish(changes) => self.publish(&changes),
                // Only the engine's own single forwards (registrations it asserts
                // again for a live session here after a partition): nobody awaits them.
                Action::ForwardDone { .. } => {}
                Action::ForwardManyDone { id, outcomes } => {
                    if let Some(tx) = lock(&self.pending_batches).remove(&id) {
                        let _ = tx.send(outcomes);
                    }
                }
                Action::BatchApplied {
                    ops, max_lag_ms, ..
                } => {
                    let hot = crate::metrics::hot();
                    hot.batch_ops.record(ops as f64);
                    hot.replication_lag.record(max_lag_ms as f64 / 1000.0);
                }
                Action::Ready => {
                    let took = self.now_ms().saturating_sub(self.started_ms);
                    metrics::counter!("shoal_snapshot_loads_total").increment(1);
                    metrics::histogram!("shoal_snapshot_load_seconds").record(took as f64 / 1000.0);
                    tracing::info!(node = %self.node_id, took_ms = took, "ready: registry loaded");
                    self.ready.store(true, Ordering::Release);
                }
                Action::RingChanged(members) => {
                    metrics::counter!("shoal_ring_changes_total").increment(1);
                    tracing::info!(node = %self.node_id, ?members, "ring changed");
                }
            }
        }
    }

    /// Runs of writes were queued for their owners ([`Replica::forward_many`]): they
    /// leave soon, with the runs other sessions queue meanwhile (see `forward_loop` in
    /// `server.rs`).
    pub fn forwards_queued(&self) {
        self.forward_wake.notify_one();
    }

    /// Registers a pending batch forward; the answers arrive through
    /// [`Action::ForwardManyDone`].
    pub fn expect_forward_many(&self, id: u64) -> oneshot::Receiver<Vec<ForwardOutcome>> {
        let (tx, rx) = oneshot::channel();
        lock(&self.pending_batches).insert(id, tx);
        rx
    }

    /// Gives up on a pending batch forward (timed out).
    pub fn forget_forward_many(&self, id: u64) {
        lock(&self.pending_batches).remove(&id);
    }

    /// Notes each changed service that has subscribers here for the push thread,
    /// which pushes its latest state (see [`crate::push`]). Call with the replica's
    /// write lock held, so that no push can miss the change.
    pub fn publish(&self, changes: &[Change]) {
        if changes.is_empty() {
            return;
        }
        let subscribers = lock(&self.subscribers);
        let changed: Vec<(ServiceKey, u64)> = changes
            .iter()
            .filter(|c| subscribers.contains_key(&c.key))
            .map(|c| (c.key.clone(), c.revision))
            .collect();
        drop(subscribers);
        if !changed.is_empty() {
            self.pushes.add(changed);
        }
    }

    /// The push thread's work: reads the current view of each changed service, encodes
    /// it once and queues the bytes to each of its subscribers that has not seen this
    /// revision yet.
    fn push_changed(&self, changed: Vec<(ServiceKey, u64)>) {
        for (key, revision) in changed {
            if !lock(&self.subscribers).contains_key(&key) {
                continue;
            }
            let Some(EncodedPush {
                frame,
                revision,
                gone,
            }) = self.encode_push(&key, revision)
            else {
                continue;
            };
            let mut subscribers = lock(&self.subscribers);
            let Some(subs) = subscribers.get_mut(&key) else {
                continue;
            };
            let mut queued = 0;
            for sub in subs.values_mut() {
                if sub.sent.admit(revision, gone) {
                    push(&sub.outbox, Outgoing::Encoded(frame.clone()));
                    queued += 1;
                }
            }
            drop(subscribers);
            metrics::counter!("shoal_pushes_total").increment(queued);
        }
    }

    /// The `Push` frame of `key`'s current view and its revision, at least `changed`
    /// (the revision of the latest change noted): a service emptied by that change, or
    /// by a later one, no longer exists (revision 0), and its push still carries the
    /// change's revision so revisions never go back.
    fn encode_push(&self, key: &ServiceKey, changed: u64) -> Option<EncodedPush> {
        if let Some(cached) = self.cached_push(key, changed) {
            return Some(cached);
        }
        // Read under the lock, encode after it.
        let mut view = read(&self.replica).registry().query(key, &[], false).ok()?;
        let gone = view.revision == 0;
        view.revision = view.revision.max(changed);
        let revision = view.revision;
        match shoal_proto::encode_frame(&ServerFrame::Push(view), self.config.max_frame_bytes) {
            Ok(bytes) => Some(EncodedPush {
                frame: bytes.into(),
                revision,
                gone,
            }),
            Err(e) => {
                // A view too large for one frame: the subscribers miss this change.
                tracing::warn!(service = %key, "cannot push: {e}");
                None
            }
        }
    }

    /// [`Shared::encode_push`] from the query cache's answer of an unfiltered query of
    /// `key` at its current revision, if it holds one.
    fn cached_push(&self, key: &ServiceKey, changed: u64) -> Option<EncodedPush> {
        if !self.query_cache.enabled() {
            return None;
        }
        let query = crate::query_cache::QueryKey {
            service: key.clone(),
            clusters: Vec::new(),
            healthy_only: false,
        };
        let (answer, current) = {
            let replica = read(&self.replica);
            let current = replica.registry().service_revision(key)?;
            (self.query_cache.peek(&query, current)?, current)
        };
        let frame = crate::push::push_frame_from_answer(&answer, self.config.max_frame_bytes)?;
        // The service exists: it has a revision.
        Some(EncodedPush {
            frame,
            revision: current.max(changed),
            gone: false,
        })
    }

    /// Adds a subscription and queues the current view as the response to request
    /// `id`, under the replica's read lock so that no push can overtake it.
    pub fn subscribe(
        &self,
        conn: ConnId,
        outbox: &Outbox,
        key: &ServiceKey,
        id: u64,
    ) -> Result<(), shoal_storage::StorageError> {
        let replica = read(&self.replica);
        let view = replica.registry().query(key, &[], false)?;
        // The answer is queued with the subscribers locked, so that the push thread
        // queues to this connection only views of a later revision, after it.
        let mut subscribers = lock(&self.subscribers);
        subscribers.entry(key.clone()).or_default().insert(
            conn,
            Subscriber {
                outbox: outbox.clone(),
                sent: Sent {
                    revision: view.revision,
                    gone: view.revision == 0,
                },
            },
        );
        push(
            outbox,
            ServerFrame::Response {
                id,
                result: Ok(shoal_proto::Response::View(view)),
            },
        );
        drop(subscribers);
        drop(replica);
        Ok(())
    }

    /// Removes one subscription.
    pub fn unsubscribe(&self, conn: ConnId, key: &ServiceKey) {
        let mut subs = lock(&self.subscribers);
        if let Some(m) = subs.get_mut(key) {
            m.remove(&conn);
            if m.is_empty() {
                subs.remove(key);
            }
        }
    }

    /// Removes every subscription of a connection.
    pub fn unsubscribe_all(&self, conn: ConnId, keys: &HashSet<ServiceKey>) {
        for key in keys {
            self.unsubscribe(conn, key);
        }
    }
}

/// Queues a frame without waiting; a client whose queue is full is too slow to keep
/// and is disconnected (it will resume and re-subscribe, getting fresh state).
pub fn push(outbox: &Outbox, frame: impl Into<Outgoing>) {
    if let Err(mpsc::error::TrySendError::Full(_)) = outbox.tx.try_send(frame.into()) {
        metrics::counter!("shoal_slow_consumers_closed_total").increment(1);
        outbox
            .conn
            .close(crate::server::CLOSE_SLOW_CONSUMER, b"outbound queue full");
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.pushes.close();
    }
}

/// Locks a mutex. A poisoned lock means a thread panicked while holding it; the data
/// is still consistent (every critical section here leaves it so), so carry on.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Read-locks (see [`lock`] about poisoning).
pub fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

/// Write-locks (see [`lock`] about poisoning).
pub fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::Sent;

    #[test]
    fn views_only_go_forward() {
        let mut sent = Sent {
            revision: 5,
            gone: false,
        };
        assert!(!sent.admit(5, false), "the same revision again");
        assert!(!sent.admit(3, false), "an older revision");
        assert!(sent.admit(6, false));
        assert_eq!(sent.revision, 6);
    }

    #[test]
    fn a_service_that_is_gone_is_pushed_once_until_it_exists_again() {
        // Subscribed while the service existed.
        let mut sent = Sent {
            revision: 10,
            gone: false,
        };
        // The change noted at 12 is read after a later change (20) emptied the
        // service: the emptiness goes out labelled 12.
        assert!(sent.admit(12, true));
        // The change at 20 finds it still gone: nothing new to say.
        assert!(!sent.admit(20, true));
        assert_eq!(sent.revision, 20, "later views still have to be newer");
        assert!(!sent.admit(15, false), "older than what was noted");
        // It exists again, then is emptied again.
        assert!(sent.admit(21, false));
        assert!(sent.admit(22, true));
    }

    #[test]
    fn a_subscriber_to_a_service_that_does_not_exist_is_not_told_so_again() {
        let mut sent = Sent {
            revision: 0,
            gone: true,
        };
        // Registered and emptied again before the push thread read it.
        assert!(!sent.admit(3, true));
        assert!(sent.admit(4, false));
    }
}
