//! The state one node shares between its tasks: the registry, the sessions and the
//! subscribers, and the rules that tie them together.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use shoal_proto::ServerFrame;
use shoal_storage::{Change, NodeId, Registry, ServiceKey, SessionId};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::Config;

/// Identifies one client connection on this node (sessions outlive connections).
pub type ConnId = u64;

/// The way to reach one connected client: its queue of outgoing frames, and its
/// connection, to close it when it cannot keep up.
#[derive(Clone)]
pub struct Outbox {
    /// Frames to write on the session stream.
    pub tx: mpsc::Sender<ServerFrame>,
    /// The QUIC connection, closed when the queue overflows.
    pub conn: quinn::Connection,
}

/// A session as this node knows it.
struct SessionEntry {
    /// The connection carrying it now, `None` while it waits out its grace period.
    conn: Option<ConnId>,
    /// Grows on every attach, so a stale grace timer knows it lost.
    generation: u64,
}

/// Everything a node's tasks share.
pub struct Shared {
    /// This node's id.
    pub node_id: NodeId,
    /// The configuration it runs with.
    pub config: Config,
    /// The registry. Writers hold the write lock while they queue pushes, so every
    /// subscriber sees changes in revision order.
    pub registry: RwLock<Registry>,
    sessions: Mutex<HashMap<SessionId, SessionEntry>>,
    subscribers: Mutex<HashMap<ServiceKey, HashMap<ConnId, Outbox>>>,
    /// Whether the node answers requests (false while starting or stopping).
    pub ready: AtomicBool,
    next_conn: AtomicU64,
    started: Instant,
}

/// The outcome of attaching a connection to a session.
pub struct Attached {
    /// True if the session was known here (live or in its grace period): its
    /// instances were kept.
    pub resumed: bool,
}

impl Shared {
    /// New state for a node.
    pub fn new(node_id: NodeId, config: Config) -> Arc<Self> {
        let limits = (&config.limits).into();
        let mut registry = Registry::new(limits);
        for ns in &config.namespaces {
            // Names were validated with the config; a duplicate is harmless.
            let _ = registry.add_namespace(ns);
        }
        Arc::new(Shared {
            node_id,
            config,
            registry: RwLock::new(registry),
            sessions: Mutex::new(HashMap::new()),
            subscribers: Mutex::new(HashMap::new()),
            ready: AtomicBool::new(false),
            next_conn: AtomicU64::new(1),
            started: Instant::now(),
        })
    }

    /// Milliseconds on this node's clock (tokio time, so tests can pause it).
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// A fresh connection id.
    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether the node serves requests.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Number of sessions known (connected or in grace).
    pub fn session_count(&self) -> usize {
        lock(&self.sessions).len()
    }

    /// Number of (connection, service) subscriptions.
    pub fn subscription_count(&self) -> usize {
        lock(&self.subscribers).values().map(|m| m.len()).sum()
    }

    /// Binds `session` to connection `conn`. A session already known here is resumed;
    /// an unknown id (a new session, or one whose home node died) is taken as is.
    pub fn attach(&self, session: SessionId, conn: ConnId) -> Attached {
        let mut sessions = lock(&self.sessions);
        match sessions.get_mut(&session) {
            Some(entry) => {
                entry.conn = Some(conn);
                entry.generation += 1;
                Attached { resumed: true }
            }
            None => {
                sessions.insert(
                    session,
                    SessionEntry {
                        conn: Some(conn),
                        generation: 0,
                    },
                );
                Attached { resumed: false }
            }
        }
    }

    /// The connection `conn` of `session` ended. On a clean end (Goodbye) the session's
    /// instances go now; otherwise they wait `session_grace_ms` for a resume.
    pub fn detach(self: &Arc<Self>, session: SessionId, conn: ConnId, clean: bool) {
        let generation = {
            let mut sessions = lock(&self.sessions);
            let Some(entry) = sessions.get_mut(&session) else {
                return;
            };
            if entry.conn != Some(conn) {
                // Another connection has taken the session over: nothing ends.
                return;
            }
            if clean {
                sessions.remove(&session);
                drop(sessions);
                self.end_session(session);
                return;
            }
            entry.conn = None;
            entry.generation
        };
        let shared = Arc::clone(self);
        let grace = std::time::Duration::from_millis(self.config.session_grace_ms);
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let expired = {
                let mut sessions = lock(&shared.sessions);
                match sessions.get(&session) {
                    Some(e) if e.conn.is_none() && e.generation == generation => {
                        sessions.remove(&session);
                        true
                    }
                    _ => false,
                }
            };
            if expired {
                tracing::info!(%session, "session not resumed within its grace period");
                metrics::counter!("shoal_sessions_expired_total").increment(1);
                shared.end_session(session);
            }
        });
    }

    fn end_session(&self, session: SessionId) {
        let mut registry = write(&self.registry);
        let changes = registry.remove_session(session);
        self.publish(&registry, &changes);
    }

    /// Queues a push of each changed service to its subscribers. Call with the
    /// registry's write lock held (pass the guarded registry), so pushes leave in
    /// revision order.
    pub fn publish(&self, registry: &Registry, changes: &[Change]) {
        if changes.is_empty() {
            return;
        }
        let subscribers = lock(&self.subscribers);
        for change in changes {
            let Some(subs) = subscribers.get(&change.key) else {
                continue;
            };
            let view = match registry.query(&change.key, &[], false) {
                Ok(v) => v,
                Err(_) => continue,
            };
            for outbox in subs.values() {
                push(outbox, ServerFrame::Push(view.clone()));
            }
        }
    }

    /// Adds a subscription and queues the current view as the response to request
    /// `id`, under the registry's read lock so that no push can overtake it.
    pub fn subscribe(
        &self,
        conn: ConnId,
        outbox: &Outbox,
        key: &ServiceKey,
        id: u64,
    ) -> Result<(), shoal_storage::StorageError> {
        let registry = read(&self.registry);
        let view = registry.query(key, &[], false)?;
        lock(&self.subscribers)
            .entry(key.clone())
            .or_default()
            .insert(conn, outbox.clone());
        push(
            outbox,
            ServerFrame::Response {
                id,
                result: Ok(shoal_proto::Response::View(view)),
            },
        );
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
pub fn push(outbox: &Outbox, frame: ServerFrame) {
    if let Err(mpsc::error::TrySendError::Full(_)) = outbox.tx.try_send(frame) {
        metrics::counter!("shoal_slow_consumers_closed_total").increment(1);
        outbox
            .conn
            .close(crate::server::CLOSE_SLOW_CONSUMER, b"outbound queue full");
    }
}

/// Locks a mutex. A poisoned lock means a thread panicked while holding it; the data
/// is still consistent (every critical section here leaves it so), so carry on.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Read-locks the registry (see [`lock`] about poisoning).
pub fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

/// Write-locks the registry (see [`lock`] about poisoning).
pub fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}
