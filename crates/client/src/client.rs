//! The client: one session with the cluster, kept alive across node failures.
//!
//! A [`Client`] is a cheap handle onto a shared state and a background *supervisor*
//! task. The supervisor owns the connection's lifecycle: when the current link dies
//! (and the client was not closed) it connects to the next address, resumes the same
//! session, re-registers every session-bound instance this client holds, repeats its
//! deregistrations of the last 30 s (the node that acknowledged one may have died
//! before replicating it), subscribes again to every subscribed service, and only
//! then lets requests through the new link. Requests made meanwhile wait for it, up to the request timeout.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::Rng;
use shoal_proto::{
    ErrorCode, Hello, MemberView, Request, Response, RingView, Welcome, WriteRef, PROTOCOL_VERSION,
};
use shoal_storage::{
    Instance, InstanceKey, InstanceSpec, ServiceKey, ServiceMeta, ServiceSummary, ServiceView,
    SessionId,
};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::addr::{resolve, split_host_port};
use crate::balance::choose_weighted;
use crate::config::ClientConfig;
use crate::error::{ClientError, Result};
use crate::held::Slots;
use crate::link::{Body, Dial, Link, CLOSE_ABRUPT, CLOSE_GOODBYE, CLOSE_STREAM_FAILED};
use crate::subscription::{Subscription, SubscriptionCache};

/// First pause before asking again after `Unavailable` or `NotReady`; it doubles up
/// to [`RETRY_PAUSE_MAX`], within the request timeout.
const RETRY_PAUSE_FIRST: Duration = Duration::from_millis(50);
/// Longest pause between retries after `Unavailable` or `NotReady`.
const RETRY_PAUSE_MAX: Duration = Duration::from_secs(1);
/// How long a client that is dropped (not closed) waits for its Goodbye to be answered.
const LINGER: Duration = Duration::from_secs(2);
/// How long closing waits for the endpoint to go idle, so that the QUIC close reaches
/// the node before the process exits. The close is sent at once; waiting for the full
/// draining period (three probe timeouts) would only delay exit.
const CLOSE_FLUSH: Duration = Duration::from_millis(250);

/// Which instances a [`Client::query`] returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueryOptions {
    /// Only instances of these clusters; all clusters when empty.
    pub clusters: Vec<String>,
    /// Only healthy, enabled instances; the node still returns every instance when the
    /// service's protection threshold is reached, and says so in
    /// [`ServiceView::protected`].
    pub healthy_only: bool,
}

impl QueryOptions {
    /// Every instance of every cluster.
    pub fn all() -> Self {
        QueryOptions::default()
    }

    /// Only healthy, enabled instances (subject to the protection threshold).
    pub fn healthy() -> Self {
        QueryOptions {
            healthy_only: true,
            ..QueryOptions::default()
        }
    }

    /// Restricts the query to these clusters.
    pub fn in_clusters<S: Into<String>>(mut self, clusters: impl IntoIterator<Item = S>) -> Self {
        self.clusters = clusters.into_iter().map(Into::into).collect();
        self
    }
}

/// A handle onto one session with a Shoal cluster. Cloning is cheap; every clone shares
/// the session, its connection, its registrations and its subscriptions.
///
/// The session ends when [`Client::close`] is called, or when the last handle is
/// dropped (then the client says Goodbye in the background, on a best-effort basis).
#[derive(Clone, Debug)]
pub struct Client {
    handle: Arc<Handle>,
}

/// The last handle going away stops the supervisor.
#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
    stop: watch::Sender<Stop>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.stop.send_if_modified(|s| {
            if *s == Stop::Running {
                *s = Stop::Dropped;
                true
            } else {
                false
            }
        });
    }
}

/// What the supervisor is told to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// Keep the session alive.
    Running,
    /// Every handle was dropped: say Goodbye if connected, then stop.
    Dropped,
    /// `close` or `close_abruptly` did the work: just stop.
    Closed,
}

/// The current link as requests see it.
#[derive(Clone, Debug, Default)]
struct LinkState {
    /// The usable link; `None` while (re)connecting.
    link: Option<Arc<Link>>,
    /// The client was closed: no link will come.
    closed: bool,
}

/// State shared by the handles and the supervisor.
#[derive(Debug)]
struct Shared {
    config: ClientConfig,
    quinn: quinn::ClientConfig,
    /// An endpoint shared with other clients ([`Client::connect_on`]): used for nodes
    /// of its address family, never closed here.
    given_endpoint: Option<quinn::Endpoint>,
    /// The client's own endpoints, closed with it.
    endpoints: Mutex<Endpoints>,
    next_id: AtomicU64,
    state: watch::Sender<LinkState>,
    generation: watch::Sender<u64>,
    session: Mutex<SessionId>,
    /// Session-bound registrations to re-assert after a reconnect, by service and
    /// instance key.
    registrations: Mutex<Slots<Arc<InstanceSpec>>>,
    /// Deregistrations of the last [`RECENT_DEREGISTRATIONS`], sent again after a
    /// reconnect: a node that acknowledged one and died before replicating it (its
    /// batch leaves a few ms after the answer) would otherwise leave the instance
    /// registered, under this live session, for good.
    deregistered: Mutex<Slots<(InstanceKey, Instant)>>,
    subscriptions: Arc<SubscriptionCache>,
}

/// How long a deregistration is repeated after reconnects (see `Shared::deregistered`):
/// far longer than a client takes to notice a dead node and resume elsewhere.
const RECENT_DEREGISTRATIONS: Duration = Duration::from_secs(30);

/// One UDP endpoint per address family, made on first use.
#[derive(Debug, Default)]
struct Endpoints {
    v4: Option<quinn::Endpoint>,
    v6: Option<quinn::Endpoint>,
}

/// The receive buffer a client endpoint asks of the kernel: 4 MiB, as a node's socket.
///
/// Every connection of an endpoint receives on its one socket, and a node sends the
/// heartbeats of its sessions in bursts (a tenth of them at a time): an endpoint that
/// many clients share ([`Client::connect_on`]) gets them by the thousand. With the system's
/// default (about 200 KB on Linux) 10 000 sessions over three nodes lost about a
/// quarter of the datagrams there, and each loss cost its node a QUIC loss-recovery
/// round (probes, and their acknowledgements) on top (docs/benchmarks.md, twenty-ninth series).
/// The kernel grants at most `net.core.rmem_max`; less is not an error. The buffer
/// is a limit, not memory taken up front.
pub const ENDPOINT_RECV_BUFFER_BYTES: usize = 4 << 20;

/// A client endpoint (a UDP socket on an ephemeral port, IPv6 or IPv4, with a receive
/// buffer of [`ENDPOINT_RECV_BUFFER_BYTES`]), as each client makes for itself, for
/// clients to share ([`Client::connect_on`]).
pub fn new_endpoint(ipv6: bool) -> Result<quinn::Endpoint> {
    let runtime =
        quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime found"))?;
    Ok(quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        endpoint_socket(ipv6)?,
        runtime,
    )?)
}

/// The UDP socket of [`new_endpoint`].
fn endpoint_socket(ipv6: bool) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let bind = if ipv6 {
        std::net::SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    } else {
        std::net::SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0))
    };
    let socket = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))?;
    if ipv6 {
        // Dual-stack where the system allows, as quinn's own client endpoints are.
        let _ = socket.set_only_v6(false);
    }
    let _ = socket.set_recv_buffer_size(ENDPOINT_RECV_BUFFER_BYTES);
    socket.bind(&bind.into())?;
    Ok(socket.into())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The client's critical sections are single reads or writes of plain data; a panic
    // inside one cannot leave it half-changed, so a poisoned lock is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Client {
    /// Connects to one of `config.servers` (starting at a random one, trying each once)
    /// and opens a new session.
    ///
    /// Fails with [`ClientError::Config`] or [`ClientError::Tls`] if the settings or the
    /// CA file cannot work, and with [`ClientError::Connect`] if no node answered.
    pub async fn connect(config: ClientConfig) -> Result<Client> {
        Self::open(config, None).await
    }

    /// Like [`Client::connect`], with its connections on `endpoint`, a UDP socket that
    /// other clients of this process share (make one with [`new_endpoint`]): many
    /// clients in one process (an agent that registers for many applications, a load
    /// generator) then take one socket and one receiving task between them, not one
    /// each. A load generator of 100 sessions used 13-28 % less CPU per registration so
    /// (four alternating pairs, median 15 %; docs/benchmarks.md, twenty-fifth series). Closing the client closes its
    /// connection, not the endpoint; a connection that a reconnect was opening at that
    /// moment ends with its idle timeout. A node address of the other address family
    /// than `endpoint`'s gets an endpoint of the client's own, as with `connect`.
    pub async fn connect_on(config: ClientConfig, endpoint: quinn::Endpoint) -> Result<Client> {
        Self::open(config, Some(endpoint)).await
    }

    async fn open(config: ClientConfig, given: Option<quinn::Endpoint>) -> Result<Client> {
        config.check()?;
        let quinn = crate::tls::quinn_config(&config)?;
        let shared = Arc::new(Shared {
            quinn,
            given_endpoint: given,
            endpoints: Mutex::new(Endpoints::default()),
            next_id: AtomicU64::new(1),
            state: watch::channel(LinkState::default()).0,
            generation: watch::channel(0).0,
            session: Mutex::new(SessionId(0)),
            registrations: Mutex::new(Slots::default()),
            deregistered: Mutex::new(Slots::default()),
            subscriptions: Arc::new(SubscriptionCache::default()),
            config,
        });
        let n = shared.config.servers.len();
        let start = rand::rng().random_range(0..n);
        let mut failures = Vec::new();
        let mut first = None;
        for i in 0..n {
            let index = (start + i) % n;
            match shared.dial(index, None).await {
                Ok(link) => {
                    first = Some((index, link));
                    break;
                }
                Err(ClientError::Connect(why)) => {
                    failures.push(format!("{}: {why}", shared.config.servers[index]))
                }
                Err(e) => failures.push(format!("{}: {e}", shared.config.servers[index])),
            }
        }
        let Some((index, link)) = first else {
            return Err(ClientError::Connect(failures.join("; ")));
        };
        info!(
            node = %link.welcome.node_id,
            addr = %link.addr,
            session = %link.welcome.session_id,
            "session opened"
        );
        shared.publish(link.clone());
        let (stop, stop_rx) = watch::channel(Stop::Running);
        tokio::spawn(supervise(shared.clone(), link, index, stop_rx));
        Ok(Client {
            handle: Arc::new(Handle { shared, stop }),
        })
    }

    fn shared(&self) -> &Shared {
        &self.handle.shared
    }

    /// The settings this client was made with.
    pub fn config(&self) -> &ClientConfig {
        &self.shared().config
    }

    /// The session id: minted by the first node, kept across reconnects as long as a
    /// node resumes it.
    pub fn session_id(&self) -> SessionId {
        *lock(&self.shared().session)
    }

    /// The address (as configured) of the node the client is connected to; `None`
    /// while reconnecting or after close.
    pub fn home(&self) -> Option<String> {
        self.shared()
            .state
            .borrow()
            .link
            .as_ref()
            .map(|l| l.addr.clone())
    }

    /// The Welcome of the current connection (node id, session, whether it was
    /// resumed); `None` while reconnecting or after close.
    pub fn welcome(&self) -> Option<Welcome> {
        self.shared()
            .state
            .borrow()
            .link
            .as_ref()
            .map(|l| l.welcome.clone())
    }

    /// True while a connection is usable.
    pub fn is_connected(&self) -> bool {
        self.shared()
            .state
            .borrow()
            .link
            .as_ref()
            .is_some_and(|l| !l.is_dead())
    }

    /// The connection generation: 1 after [`Client::connect`], one more after each
    /// reconnect, counted once the session was resumed and the registrations and
    /// subscriptions restored.
    pub fn generation(&self) -> u64 {
        *self.shared().generation.borrow()
    }

    /// How many times the client has reconnected (`generation() - 1`).
    pub fn reconnects(&self) -> u64 {
        self.generation().saturating_sub(1)
    }

    /// A receiver of [`Client::generation`], to wait for a reconnect:
    /// `rx.wait_for(|g| *g > before).await`.
    pub fn watch_generation(&self) -> watch::Receiver<u64> {
        self.shared().generation.subscribe()
    }

    /// The session-bound registrations this client re-asserts after a reconnect.
    /// In order of service, then instance key.
    pub fn registrations(&self) -> Vec<(ServiceKey, InstanceSpec)> {
        let regs = lock(&self.shared().registrations);
        let mut held: Vec<_> = regs
            .iter()
            .map(|(service, spec)| (service, spec.key(), spec))
            .collect();
        held.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        held.into_iter()
            .map(|(service, _, spec)| (service.clone(), InstanceSpec::clone(spec)))
            .collect()
    }

    /// The services this client is subscribed to.
    pub fn subscriptions(&self) -> Vec<ServiceKey> {
        self.shared().subscriptions.keys()
    }

    /// Registers (or replaces) an instance and returns the service's new revision.
    ///
    /// Without a Ttl in `instance` it is bound to this session: it lives until it is
    /// deregistered or the session ends, and the client registers it again after a
    /// reconnect. With a Ttl it must be kept alive with [`Client::beat`].
    pub async fn register(&self, service: &ServiceKey, instance: InstanceSpec) -> Result<u64> {
        let shared = self.shared();
        // Remember it before sending, so that a reconnect racing with this request
        // re-asserts it; undo on failure. The record is the request's own copy, sent
        // from there by reference: a registration copies nothing for it.
        let instance = Arc::new(instance);
        let before = {
            {
                let mut recent = lock(&shared.deregistered);
                if !recent.is_empty() {
                    recent.remove(service, &instance.key());
                }
            }
            let mut regs = lock(&shared.registrations);
            if instance.ttl.is_none() {
                regs.insert(service, instance.clone())
            } else {
                regs.remove(service, &instance.key())
            }
        };
        let body = Body::Write(WriteRef::Register {
            service,
            instance: &instance,
        });
        let result = shared.request_tracked(body).await.0.and_then(applied);
        if result.is_err() {
            let mut regs = lock(&shared.registrations);
            match before {
                Some(spec) => regs.insert(service, spec),
                None => regs.remove(service, &instance.key()),
            };
        }
        result
    }

    /// Registers several instances in one request, each as [`Client::register`] would
    /// (at most [`shoal_proto::MAX_BATCH_ITEMS`]; the node applies those of each
    /// service owner together). Returns one outcome per item, in order: the service's
    /// revision, or why that item was refused (the others apply all the same). The
    /// whole call fails only if the request got no answer.
    pub async fn register_many(
        &self,
        items: Vec<(ServiceKey, InstanceSpec)>,
    ) -> Result<Vec<Result<u64>>> {
        let shared = self.shared();
        if items.len() > shoal_proto::MAX_BATCH_ITEMS {
            return Err(ClientError::Config(format!(
                "register_many takes at most {} items, not {}",
                shoal_proto::MAX_BATCH_ITEMS,
                items.len()
            )));
        }
        let keys: Vec<InstanceKey> = items.iter().map(|(_, i)| i.key()).collect();
        // Remember them before sending, as `register` does; undo those that fail.
        let before: Vec<Option<Arc<InstanceSpec>>> = {
            let mut regs = lock(&shared.registrations);
            let mut recent = lock(&shared.deregistered);
            items
                .iter()
                .zip(&keys)
                .map(|((service, spec), key)| {
                    recent.remove(service, key);
                    if spec.ttl.is_none() {
                        regs.insert(service, Arc::new(spec.clone()))
                    } else {
                        regs.remove(service, key)
                    }
                })
                .collect()
        };
        // The services, for undo (the items themselves go into the request).
        let services: Vec<ServiceKey> = items.iter().map(|(s, _)| s.clone()).collect();
        let undo = |which: &[usize]| {
            let mut regs = lock(&shared.registrations);
            for &k in which {
                match &before[k] {
                    Some(spec) => regs.insert(&services[k], spec.clone()),
                    None => regs.remove(&services[k], &keys[k]),
                };
            }
        };
        let n = items.len();
        let outcomes = match shared.request(Request::RegisterMany { items }).await {
            Ok(Response::AppliedMany(outcomes)) if outcomes.len() == n => outcomes,
            Ok(other) => {
                undo(&(0..n).collect::<Vec<_>>());
                return Err(unexpected("RegisterMany", &other));
            }
            Err(e) => {
                undo(&(0..n).collect::<Vec<_>>());
                return Err(e);
            }
        };
        let failed: Vec<usize> = (0..n).filter(|&k| outcomes[k].is_err()).collect();
        undo(&failed);
        Ok(outcomes
            .into_iter()
            .map(|r| r.map_err(ClientError::Server))
            .collect())
    }

    /// Changes a registered instance (weight, health, enabled, metadata); it keeps its
    /// lease. `(cluster, ip, port)` of `instance` says which. Returns the new revision.
    pub async fn update(&self, service: &ServiceKey, instance: InstanceSpec) -> Result<u64> {
        let shared = self.shared();
        let key = instance.key();
        let before = {
            let mut regs = lock(&shared.registrations);
            match regs.get_mut(service, &key) {
                Some(held) => {
                    let mut spec = instance.clone();
                    spec.ttl = None;
                    Some(std::mem::replace(held, Arc::new(spec)))
                }
                None => None,
            }
        };
        let result = shared
            .request(Request::Update {
                service: service.clone(),
                instance,
            })
            .await
            .and_then(applied);
        if result.is_err() {
            if let Some(spec) = before {
                lock(&shared.registrations).insert(service, spec);
            }
        }
        result
    }

    /// Removes an instance and returns the service's new revision.
    ///
    /// If the connection was lost while the request was in flight and the retry finds
    /// the instance already gone, the first attempt removed it: this returns `Ok(0)`
    /// (revision unknown) rather than [`ErrorCode::NotFound`].
    pub async fn deregister(&self, service: &ServiceKey, instance: &InstanceKey) -> Result<u64> {
        let shared = self.shared();
        // Forget it first, so that a reconnect meanwhile does not register it again
        // (and deregisters it again instead).
        let before = lock(&shared.registrations).remove(service, instance);
        {
            // Only the last RECENT_DEREGISTRATIONS are kept, also without reconnects.
            let mut recent = lock(&shared.deregistered);
            recent.retain(|(_, at)| at.elapsed() < RECENT_DEREGISTRATIONS);
            recent.insert(service, (instance.clone(), Instant::now()));
        }
        let (result, retried) = shared
            .request_tracked(Body::Write(WriteRef::Deregister { service, instance }))
            .await;
        match result.and_then(applied) {
            Err(ClientError::Server(body)) if retried && body.code == ErrorCode::NotFound => Ok(0),
            Err(ClientError::Server(body)) => {
                if body.code != ErrorCode::NotFound {
                    lock(&shared.deregistered).remove(service, instance);
                    if let Some(spec) = before {
                        lock(&shared.registrations).insert(service, spec);
                    }
                }
                Err(ClientError::Server(body))
            }
            other => other,
        }
    }

    /// Keeps a Ttl instance alive. Send one every few seconds (5 s is the usual
    /// interval with the default Ttl of 15 s to unhealthy, 30 s to removal).
    pub async fn beat(&self, service: &ServiceKey, instance: &InstanceKey) -> Result<()> {
        match self
            .shared()
            .request(Request::Beat {
                service: service.clone(),
                instance: instance.clone(),
            })
            .await?
        {
            Response::Applied { .. } | Response::Done => Ok(()),
            other => Err(unexpected("Beat", &other)),
        }
    }

    /// Sets a service's protection threshold and metadata; returns its new revision.
    pub async fn set_service_meta(&self, service: &ServiceKey, meta: ServiceMeta) -> Result<u64> {
        self.shared()
            .request(Request::SetServiceMeta {
                service: service.clone(),
                meta,
            })
            .await
            .and_then(applied)
    }

    /// Reads the instances of a service from the home node's copy.
    ///
    /// Answers (and pushes) carry what a client uses: an instance's `stamp` reads 0, a
    /// session lease reads `Session(SessionId(0))` and its `last_beat_ms` 0 (see
    /// docs/protocol.md); order views by the view's `revision`.
    pub async fn query(&self, service: &ServiceKey, options: QueryOptions) -> Result<ServiceView> {
        match self
            .shared()
            .request(Request::Query {
                service: service.clone(),
                clusters: options.clusters,
                healthy_only: options.healthy_only,
            })
            .await?
        {
            Response::View(view) => Ok(view),
            other => Err(unexpected("Query", &other)),
        }
    }

    /// The cached view of a subscribed service: every instance, as last pushed. It
    /// answers without a round trip, also while the client is reconnecting. `None`
    /// when the service is not subscribed.
    pub fn query_cached(&self, service: &ServiceKey) -> Option<ServiceView> {
        self.shared().subscriptions.cached(service)
    }

    /// Lists the services of a namespace, or of one group of it.
    pub async fn list_services(
        &self,
        namespace: &str,
        group: Option<&str>,
    ) -> Result<Vec<ServiceSummary>> {
        match self
            .shared()
            .request(Request::ListServices {
                namespace: namespace.to_string(),
                group: group.map(str::to_string),
            })
            .await?
        {
            Response::Services(list) => Ok(list),
            other => Err(unexpected("ListServices", &other)),
        }
    }

    /// Subscribes to a service: the returned [`Subscription`] holds its current view
    /// and yields each change. Subscribing again to the same service shares the cached
    /// view without a round trip. Subscriptions survive reconnects.
    pub async fn subscribe(&self, service: &ServiceKey) -> Result<Subscription> {
        let shared = self.shared();
        if let Some(sub) = shared.subscriptions.begin(service) {
            return Ok(sub);
        }
        let result = shared
            .request(Request::Subscribe {
                service: service.clone(),
            })
            .await;
        match result {
            Ok(Response::View(view)) => match shared.subscriptions.attach(service) {
                Some(sub) => Ok(sub),
                // Unsubscribed while the Subscribe was in flight: an ended subscription.
                None => Ok(Subscription::new(service.clone(), watch::channel(view).1)),
            },
            Ok(other) => {
                shared.subscriptions.abandon(service);
                Err(unexpected("Subscribe", &other))
            }
            Err(e) => {
                shared.subscriptions.abandon(service);
                Err(e)
            }
        }
    }

    /// Subscribes to a service and calls `callback` with its current view, then with
    /// each new view, from a task of its own. A callback slower than the changes sees
    /// only the latest view (views are full instance lists, so nothing is lost). The
    /// task ends on [`Client::unsubscribe`] or close; abort the returned handle to stop
    /// only this callback.
    pub async fn subscribe_with(
        &self,
        service: &ServiceKey,
        callback: impl Fn(&ServiceView) + Send + Sync + 'static,
    ) -> Result<tokio::task::JoinHandle<()>> {
        let mut sub = self.subscribe(service).await?;
        Ok(tokio::spawn(async move {
            callback(&sub.current());
            while let Some(view) = sub.next().await {
                callback(&view);
            }
        }))
    }

    /// Stops the pushes of a service. Its [`Subscription`]s end (`next` returns
    /// `None`) and its cached view is dropped.
    pub async fn unsubscribe(&self, service: &ServiceKey) -> Result<()> {
        let shared = self.shared();
        shared.subscriptions.remove(service);
        match shared
            .request(Request::Unsubscribe {
                service: service.clone(),
            })
            .await
        {
            Ok(_) => Ok(()),
            // The node did not know the subscription (it was lost with a connection).
            Err(ClientError::Server(b)) if b.code == ErrorCode::BadRequest => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Picks one instance to call: a weighted random choice among the healthy, enabled
    /// instances with a positive weight. It uses the cached view when the service is
    /// subscribed, else it queries the home node. `None` when no instance is usable.
    pub async fn select_one(&self, service: &ServiceKey) -> Result<Option<Instance>> {
        let view = match self.query_cached(service) {
            Some(view) => view,
            None => self.query(service, QueryOptions::healthy()).await?,
        };
        Ok(choose_weighted(&view.instances, &mut rand::rng()).cloned())
    }

    /// The cluster's members as the home node sees them.
    pub async fn members(&self) -> Result<Vec<MemberView>> {
        match self.shared().request(Request::Members).await? {
            Response::Members(members) => Ok(members),
            other => Err(unexpected("Members", &other)),
        }
    }

    /// The ring as the home node sees it: each member's share and, when `service` is
    /// given, the service's owner.
    pub async fn ring(&self, service: Option<&ServiceKey>) -> Result<RingView> {
        match self
            .shared()
            .request(Request::Ring {
                service: service.cloned(),
            })
            .await?
        {
            Response::Ring(ring) => Ok(ring),
            other => Err(unexpected("Ring", &other)),
        }
    }

    /// A round trip to the home node; returns how long it took.
    pub async fn ping(&self) -> Result<Duration> {
        let started = Instant::now();
        self.shared().request(Request::Ping).await?;
        Ok(started.elapsed())
    }

    /// Ends the session cleanly: says Goodbye (the nodes remove this session's instances
    /// at once) and closes the connection. Every clone of this client is closed too.
    ///
    /// While reconnecting, it waits for a connection (up to the request timeout) only if
    /// the client holds session-bound registrations; else it closes at once. If no node
    /// can be reached in time the client is closed anyway and the error returned; the
    /// nodes then remove the instances after the session grace period.
    pub async fn close(self) -> Result<()> {
        let shared = self.handle.shared.clone();
        // Nothing to restore any more, even if a reconnect races with the Goodbye.
        let held = std::mem::take(&mut *lock(&shared.registrations));
        let connected = self.is_connected();
        let result = if held.is_empty() && !connected {
            // Nothing of this session would be removed by a Goodbye: do not wait for a
            // reconnection just to say it.
            Ok(Response::Done)
        } else {
            shared.request_once(Request::Goodbye).await.0
        };
        self.handle.stop.send_replace(Stop::Closed);
        shared.shut(CLOSE_GOODBYE, b"goodbye").await;
        result.map(|_| ())
    }

    /// Ends the client like a crash: the connection is dropped without Goodbye and is
    /// not re-established. The nodes keep the session's instances for the grace period
    /// (another client could resume it), then remove them. For tests and chaos drills.
    pub async fn close_abruptly(self) {
        let shared = self.handle.shared.clone();
        self.handle.stop.send_replace(Stop::Closed);
        shared.shut(CLOSE_ABRUPT, b"abrupt").await;
    }

    /// Drops the current connection without Goodbye, like a network blip: the client
    /// then reconnects (to the next address) and resumes the session. For tests and
    /// chaos drills; watch [`Client::watch_generation`] to see the reconnect finish.
    pub fn disconnect_abruptly(&self) {
        let link = self.shared().state.borrow().link.clone();
        if let Some(link) = link {
            info!(addr = %link.addr, "dropping the connection on purpose");
            link.close(CLOSE_ABRUPT, b"disconnect_abruptly");
        }
    }
}

/// The revision of an Applied answer.
fn applied(response: Response) -> Result<u64> {
    match response {
        Response::Applied { revision } => Ok(revision),
        other => Err(unexpected("a write", &other)),
    }
}

fn unexpected(what: &str, response: &Response) -> ClientError {
    ClientError::Protocol(format!("unexpected answer to {what}: {response:?}"))
}

/// Whether a request may be sent again after the connection was lost in flight. Every
/// request is idempotent except Goodbye, which ends the session.
fn retryable(body: Body<'_>) -> bool {
    !matches!(body, Body::Request(Request::Goodbye))
}

impl Shared {
    /// Sends a request on the current link, waiting for one while reconnecting; retries
    /// on the next link if the connection is lost in flight, and after a short pause if
    /// the node answers `Unavailable` or `NotReady`; all within the request timeout.
    async fn request(&self, body: Request) -> Result<Response> {
        self.request_tracked(Body::Request(&body)).await.0
    }

    /// Like [`Shared::request`], and says whether the request was sent more than once.
    async fn request_tracked(&self, body: Body<'_>) -> (Result<Response>, bool) {
        let timeout = self.config.request_timeout;
        let deadline = Instant::now() + timeout;
        let mut retried = false;
        let mut pause = RETRY_PAUSE_FIRST;
        loop {
            match self.attempt(body, deadline).await {
                Err(ClientError::Disconnected) if retryable(body) && Instant::now() < deadline => {
                    debug!("connection lost with a request in flight; retrying after reconnect");
                    retried = true;
                }
                Err(ClientError::Server(b))
                    if retryable(body)
                        && matches!(b.code, ErrorCode::Unavailable | ErrorCode::NotReady)
                        && Instant::now() + pause < deadline =>
                {
                    // The owner of the service just failed, or the node is starting:
                    // the ring settles within moments, so ask again shortly.
                    debug!(error = %b, ?pause, "node cannot serve the request yet; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(RETRY_PAUSE_MAX);
                    retried = true;
                }
                other => return (other, retried),
            }
        }
    }

    /// Sends a request once (no retry after a lost connection).
    async fn request_once(&self, body: Request) -> (Result<Response>, bool) {
        let deadline = Instant::now() + self.config.request_timeout;
        (self.attempt(Body::Request(&body), deadline).await, false)
    }

    /// Sends a request once and waits for its answer until `deadline`.
    ///
    /// The link's watchdog ends the wait at the deadline, and gives up on a node that
    /// sends nothing at all while a call waits (the call then fails with
    /// `Disconnected` and is retried on the next link): see `link::watch_calls`.
    async fn attempt(&self, body: Body<'_>, deadline: Instant) -> Result<Response> {
        let link = self.usable_link(deadline).await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let rx = link.start_call(id, body, deadline).await?;
        match rx.await {
            Ok(Some(answer)) => answer.map_err(ClientError::Server),
            Ok(None) => Err(ClientError::Timeout(self.config.request_timeout)),
            Err(_) => Err(ClientError::Disconnected),
        }
    }

    /// Waits for a live link until `deadline`.
    async fn usable_link(&self, deadline: Instant) -> Result<Arc<Link>> {
        // Nearly always there is one: take it without subscribing to the state.
        {
            let state = self.state.borrow();
            if let (Some(link), false) = (&state.link, state.closed) {
                if !link.is_dead() {
                    return Ok(link.clone());
                }
            }
        }
        let mut rx = self.state.subscribe();
        let waited = tokio::time::timeout_at(
            deadline,
            rx.wait_for(|s| s.closed || s.link.as_ref().is_some_and(|l| !l.is_dead())),
        )
        .await;
        match waited {
            Err(_) => Err(ClientError::Timeout(self.config.request_timeout)),
            // The sender lives in `self`: the channel cannot close while we wait.
            Ok(Err(_)) => Err(ClientError::Closed),
            Ok(Ok(state)) => match (&state.link, state.closed) {
                (Some(link), false) => Ok(link.clone()),
                _ => Err(ClientError::Closed),
            },
        }
    }

    /// Lets requests through a new link.
    fn publish(&self, link: Arc<Link>) {
        *lock(&self.session) = link.welcome.session_id;
        self.state.send_modify(|s| s.link = Some(link));
        self.generation.send_modify(|g| *g += 1);
    }

    /// Holds requests back: the link died.
    fn unpublish(&self) {
        self.state.send_modify(|s| s.link = None);
    }

    /// The endpoint for this address family, made on first use.
    fn endpoint(&self, ipv6: bool) -> Result<quinn::Endpoint> {
        if let Some(ep) = &self.given_endpoint {
            if ep.local_addr().is_ok_and(|a| a.is_ipv6() == ipv6) {
                return Ok(ep.clone());
            }
        }
        let mut eps = lock(&self.endpoints);
        let slot = if ipv6 { &mut eps.v6 } else { &mut eps.v4 };
        if let Some(ep) = slot {
            return Ok(ep.clone());
        }
        let ep = new_endpoint(ipv6)?;
        *slot = Some(ep.clone());
        Ok(ep)
    }

    /// Connects to `servers[index]` (each of its resolved addresses in turn) and says
    /// Hello, resuming `resume` if given.
    async fn dial(&self, index: usize, resume: Option<SessionId>) -> Result<Arc<Link>> {
        let addr = &self.config.servers[index];
        let (host, _) = split_host_port(addr)?;
        let mut failures = Vec::new();
        for socket in resolve(addr).await? {
            let endpoint = self.endpoint(socket.is_ipv6())?;
            let dial = Dial {
                endpoint: &endpoint,
                quinn: self.quinn.clone(),
                addr,
                socket,
                server_name: host,
                hello: Hello {
                    version: PROTOCOL_VERSION,
                    client_name: self.config.client_name.clone(),
                    resume,
                },
                max_frame_bytes: self.config.max_frame_bytes,
                timeout: self.config.connect_timeout,
            };
            match Link::open(dial, self.subscriptions.clone()).await {
                Ok(link) => return Ok(link),
                // A node that refused the Hello gave a reason worth keeping as it is.
                Err(ClientError::Server(body)) => failures.push(body.to_string()),
                Err(ClientError::Connect(why)) => failures.push(why),
                Err(e) => failures.push(e.to_string()),
            }
        }
        Err(ClientError::Connect(failures.join("; ")))
    }

    /// After a reconnect: registers every held session-bound instance and subscribes to
    /// every subscribed service again, pipelined, before the link is published. The
    /// reader caches each Subscribe answer, which wakes subscribers if the view changed.
    /// What the node answers `Unavailable` or `NotReady` (the service's owner just
    /// failed) is asked again after a short pause, within the request timeout.
    async fn restore(&self, link: &Link) -> Result<()> {
        let mut todo: Vec<(String, Request)> = lock(&self.registrations)
            .iter()
            .map(|(service, spec)| {
                (
                    format!("registration of {service} {}", spec.key()),
                    Request::Register {
                        service: service.clone(),
                        instance: InstanceSpec::clone(spec),
                    },
                )
            })
            .collect();
        {
            // After the registrations: a slot is in one map or the other, never both.
            let mut recent = lock(&self.deregistered);
            recent.retain(|(_, at)| at.elapsed() < RECENT_DEREGISTRATIONS);
            for (service, (key, _)) in recent.iter() {
                todo.push((
                    format!("deregistration of {service} {key}"),
                    Request::Deregister {
                        service: service.clone(),
                        instance: key.clone(),
                    },
                ));
            }
        }
        for service in self.subscriptions.keys() {
            todo.push((
                format!("subscription to {service}"),
                Request::Subscribe { service },
            ));
        }
        let deadline = Instant::now() + self.config.request_timeout;
        let mut pause = RETRY_PAUSE_FIRST;
        loop {
            let mut waiting = Vec::with_capacity(todo.len());
            for (what, body) in todo {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let rx = link.start_call(id, Body::Request(&body), deadline).await?;
                waiting.push((what, body, rx));
            }
            let mut again = Vec::new();
            for (what, body, rx) in waiting {
                match rx.await {
                    Ok(Some(Ok(_))) => debug!("restored {what}"),
                    // A repeated deregistration finds the instance gone: as it should.
                    Ok(Some(Err(b)))
                        if b.code == ErrorCode::NotFound
                            && matches!(body, Request::Deregister { .. }) =>
                    {
                        debug!("{what}: already gone")
                    }
                    Ok(Some(Err(b)))
                        if matches!(b.code, ErrorCode::Unavailable | ErrorCode::NotReady) =>
                    {
                        debug!(error = %b, "{what} must wait; asking again");
                        again.push((what, body));
                    }
                    // Kept: it is asserted again on the next reconnect.
                    Ok(Some(Err(b))) => warn!(error = %b, "node refused to restore {what}"),
                    Ok(None) => return Err(ClientError::Timeout(self.config.request_timeout)),
                    Err(_) => return Err(ClientError::Disconnected),
                }
            }
            if again.is_empty() {
                return Ok(());
            }
            if Instant::now() + pause >= deadline {
                return Err(ClientError::Timeout(self.config.request_timeout));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(RETRY_PAUSE_MAX);
            todo = again;
        }
    }

    /// Closes the client for good: no link any more, subscriptions ended, the
    /// connection closed with `code`, and a short wait for the close to be sent.
    async fn shut(&self, code: u32, reason: &[u8]) {
        let link = {
            let mut link = None;
            self.state.send_modify(|s| {
                link = s.link.take();
                s.closed = true;
            });
            link
        };
        if let Some(link) = link {
            link.close(code, reason);
        }
        lock(&self.registrations).clear();
        lock(&self.deregistered).clear();
        self.subscriptions.clear();
        let endpoints: Vec<quinn::Endpoint> = {
            let eps = lock(&self.endpoints);
            eps.v4.iter().chain(eps.v6.iter()).cloned().collect()
        };
        for ep in endpoints {
            // A connection closed by the supervisor's racing dial may still be open.
            ep.close(code.into(), reason);
            let _ = tokio::time::timeout(CLOSE_FLUSH, ep.wait_idle()).await;
        }
    }
}

/// The supervisor: waits for the link to die, then reconnects, resumes, restores and
/// publishes the new link; stops when told to.
async fn supervise(
    shared: Arc<Shared>,
    mut link: Arc<Link>,
    mut index: usize,
    mut stop: watch::Receiver<Stop>,
) {
    let n = shared.config.servers.len();
    loop {
        tokio::select! {
            _ = link.wait_dead() => {}
            _ = stopped(&mut stop) => {
                finish(&shared, &link, &stop).await;
                return;
            }
        }
        shared.unpublish();
        if link.ended_by_goodbye() {
            // `close` said Goodbye and the node hung up: nothing to resume. `close`
            // finishes the shutdown.
            debug!("session ended by Goodbye");
            stopped(&mut stop).await;
            return;
        }
        info!(addr = %link.addr, node = %link.welcome.node_id, "connection lost; reconnecting");

        let mut backoff = shared.config.reconnect_backoff;
        let mut failures = 0usize;
        link = loop {
            index = (index + 1) % n;
            let resume = Some(*lock(&shared.session));
            let dialed = tokio::select! {
                r = shared.dial(index, resume) => r,
                _ = stopped(&mut stop) => {
                    shared.shut(CLOSE_GOODBYE, b"closed").await;
                    return;
                }
            };
            match dialed {
                Ok(new) => break new,
                Err(e) => {
                    let reason = match e {
                        ClientError::Connect(why) => why,
                        other => other.to_string(),
                    };
                    warn!(addr = %shared.config.servers[index], error = %reason, "reconnect failed");
                    failures += 1;
                    if failures % n == 0 {
                        let pause = jitter(backoff);
                        tokio::select! {
                            _ = tokio::time::sleep(pause) => {}
                            _ = stopped(&mut stop) => {
                                shared.shut(CLOSE_GOODBYE, b"closed").await;
                                return;
                            }
                        }
                        backoff = (backoff * 2).min(shared.config.reconnect_backoff_max);
                    }
                }
            }
        };
        let asked = *lock(&shared.session);
        if link.welcome.resumed {
            info!(addr = %link.addr, node = %link.welcome.node_id, session = %asked, "session resumed");
        } else if link.welcome.session_id == asked {
            // The node did not know the session (it lived on another node), but kept its
            // id: the registrations below re-assert the instances under it.
            info!(addr = %link.addr, node = %link.welcome.node_id, session = %asked, "session continued on a new node");
        } else {
            warn!(
                addr = %link.addr,
                node = %link.welcome.node_id,
                old = %asked,
                new = %link.welcome.session_id,
                "the session had expired; registering its instances again under a new one"
            );
        }
        // Session id first, so that anything restored is bound to the right session.
        *lock(&shared.session) = link.welcome.session_id;
        let restored = tokio::select! {
            r = shared.restore(&link) => r,
            _ = stopped(&mut stop) => {
                finish(&shared, &link, &stop).await;
                return;
            }
        };
        match restored {
            Ok(()) if !link.is_dead() => shared.publish(link.clone()),
            Ok(()) => {}
            Err(e) => {
                // Try the next node rather than serve from one that cannot take the
                // session's registrations.
                warn!(error = %e, addr = %link.addr, "restoring the session failed; reconnecting again");
                link.close(CLOSE_STREAM_FAILED, b"restore failed");
            }
        }
    }
}

/// Resolves once the supervisor is told to stop (or every handle is gone).
async fn stopped(stop: &mut watch::Receiver<Stop>) {
    let _ = stop.wait_for(|s| *s != Stop::Running).await;
}

/// What the supervisor does when stopping: after `close` nothing (it already did the
/// work); after the last handle was dropped, a best-effort Goodbye and close.
async fn finish(shared: &Shared, link: &Link, stop: &watch::Receiver<Stop>) {
    if *stop.borrow() == Stop::Closed {
        return;
    }
    lock(&shared.registrations).clear();
    if !link.is_dead() {
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = link.call(id, &Request::Goodbye, LINGER).await {
            debug!(error = %e, "Goodbye of a dropped client failed");
        }
    }
    shared.shut(CLOSE_GOODBYE, b"goodbye").await;
}

/// `base` scaled by a random factor in 0.5..1.5, so that many clients that lost the
/// same node do not reconnect in lockstep.
fn jitter(base: Duration) -> Duration {
    base.mul_f64(rand::rng().random_range(0.5..1.5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_goodbye_is_not_retried() {
        assert!(!retryable(Body::Request(&Request::Goodbye)));
        assert!(retryable(Body::Request(&Request::Ping)));
        let service = ServiceKey::named("a");
        let instance = InstanceSpec::new("10.0.0.1", 1);
        assert!(retryable(Body::Request(&Request::Register {
            service: service.clone(),
            instance: instance.clone(),
        })));
        assert!(retryable(Body::Write(WriteRef::Register {
            service: &service,
            instance: &instance,
        })));
        assert!(retryable(Body::Write(WriteRef::Deregister {
            service: &service,
            instance: &instance.key(),
        })));
    }

    #[test]
    fn jitter_stays_within_half_and_one_and_a_half() {
        let base = Duration::from_millis(200);
        for _ in 0..1000 {
            let j = jitter(base);
            assert!(j >= base / 2 && j <= base * 3 / 2, "{j:?}");
        }
    }

    #[test]
    fn an_endpoint_asks_for_its_receive_buffer_within_the_system_limit() {
        let socket = endpoint_socket(false).unwrap();
        let size = socket2::SockRef::from(&socket).recv_buffer_size().unwrap();
        let plain = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let default = socket2::SockRef::from(&plain).recv_buffer_size().unwrap();
        if cfg!(target_os = "linux") {
            // Linux grants up to rmem_max and reports twice what it grants.
            let max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(ENDPOINT_RECV_BUFFER_BYTES);
            assert_eq!(size, ENDPOINT_RECV_BUFFER_BYTES.min(max) * 2);
        }
        assert!(size >= default, "{size} < the default {default}");
        // Bound to an ephemeral port, and usable.
        let port = socket.local_addr().unwrap().port();
        assert_ne!(port, 0);
        plain.send_to(b"x", ("127.0.0.1", port)).unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(socket.recv(&mut buf).unwrap(), 1);
    }

    #[test]
    fn query_options_builders() {
        let q = QueryOptions::healthy().in_clusters(["a", "b"]);
        assert!(q.healthy_only);
        assert_eq!(q.clusters, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(QueryOptions::all(), QueryOptions::default());
    }
}
