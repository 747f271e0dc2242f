//! Subscribers that check every push.
//!
//! - One *raw* subscriber per node: a protocol-level client connected to that node
//!   only, subscribed to every service the load uses. One connection is one
//!   subscription: on it, each service's revisions must grow strictly (the node's
//!   revisions are its own counter, so a new connection after a restart starts a new
//!   sequence), and every instance a view lists must be one a client really tried to
//!   register (no phantom). When the node dies the subscriber ends; the supervisor
//!   starts a new one once the node is back. At the end its latest views must equal
//!   the node's dump.
//! - One SDK subscriber that knows every node and fails over: its cached views must
//!   end equal to the final registry (the SDK re-subscribes after a failover).

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_proto::{ClientFrame, Hello, Request, Response, ServerFrame, PROTOCOL_VERSION};
use shoal_storage::{ServiceKey, ServiceView};

use super::run::Shared;

const MAX_FRAME: usize = 64 << 20;

/// The instances of a view as `(ip, port)`.
pub type ViewSet = BTreeSet<(String, u16)>;

/// The set of `(ip, port)` in a view.
pub fn view_set(view: &ServiceView) -> ViewSet {
    view.instances
        .iter()
        .map(|i| (i.ip.clone(), i.port))
        .collect()
}

/// What the subscriber of one node has seen on its current connection.
#[derive(Debug, Default)]
pub struct NodeSub {
    /// Connections made so far.
    pub incarnation: u64,
    /// Whether the current one is running.
    pub alive: bool,
    /// Per service: the latest revision and instances.
    pub views: HashMap<String, (u64, ViewSet)>,
}

/// Every subscriber's state, and counters for the report.
#[derive(Debug, Default)]
pub struct SubBook {
    /// Per node.
    pub nodes: Vec<NodeSub>,
    /// Views received (initial views and pushes) by the raw subscribers.
    pub views_seen: usize,
    /// A push identical to the previous one (same revision, same instances).
    pub duplicates: usize,
    /// Views received by the SDK subscriber.
    pub sdk_views_seen: usize,
}

/// Records a view that node `node`'s subscriber got on connection `incarnation`, and
/// checks it.
fn observe(shared: &Shared, node: usize, incarnation: u64, view: &ServiceView) {
    let now = Instant::now();
    let service = view.key.service.clone();
    let set = view_set(view);
    let phantoms: Vec<(String, u16)> = {
        let ledger = shared.ledger.lock().unwrap();
        set.iter()
            .filter(|(ip, port)| {
                ledger
                    .regs
                    .get(&(service.clone(), ip.clone(), *port))
                    .is_none_or(|r| r.attempted > now)
            })
            .cloned()
            .collect()
    };
    let mut order: Option<String> = None;
    {
        let mut book = shared.subs.lock().unwrap();
        book.views_seen += 1;
        let mut duplicate = false;
        let sub = &mut book.nodes[node];
        if sub.incarnation != incarnation {
            return;
        }
        if let Some((last_rev, last_set)) = sub.views.get(&service) {
            if view.revision < *last_rev || (view.revision == *last_rev && *last_set != set) {
                order = Some(format!(
                    "revision {} after {} (connection {incarnation})",
                    view.revision, last_rev
                ));
            } else if view.revision == *last_rev {
                duplicate = true;
            }
        }
        sub.views.insert(service.clone(), (view.revision, set));
        if duplicate {
            book.duplicates += 1;
        }
    }
    if order.is_none() && phantoms.is_empty() {
        return;
    }
    let ms = shared.world.lock().unwrap().ms(now);
    let mut v = shared.violations.lock().unwrap();
    if let Some(what) = order {
        v.add(
            "push-order",
            &format!("n{node} subscriber"),
            &service,
            ms,
            what,
        );
    }
    for (ip, port) in phantoms {
        v.add(
            "push-phantom",
            &format!("n{node} subscriber"),
            &format!("{service} {ip}:{port}"),
            ms,
            "pushed an instance no client registered".into(),
        );
    }
}

fn quic_config(ca_file: &Path) -> Result<quinn::ClientConfig, String> {
    let pem = std::fs::read(ca_file).map_err(|e| format!("reading {}: {e}", ca_file.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|e| format!("parsing {}: {e}", ca_file.display()))?;
        roots.add(cert).map_err(|e| format!("adding the CA: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![shoal_proto::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_millis(1_000)));
    transport.max_idle_timeout(Some(
        Duration::from_secs(5)
            .try_into()
            .expect("5 s fits QUIC's range"),
    ));
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// One subscription connection to node `node` at `addr`; returns when the connection
/// ends (why, as text).
async fn raw_subscriber(
    shared: Arc<Shared>,
    node: usize,
    addr: SocketAddr,
    ca_file: std::path::PathBuf,
    incarnation: u64,
) -> String {
    let run = async {
        let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([0, 0, 0, 0], 0)))
            .map_err(|e| format!("client socket: {e}"))?;
        endpoint.set_default_client_config(quic_config(&ca_file)?);
        let connecting = endpoint
            .connect(addr, &addr.ip().to_string())
            .map_err(|e| format!("connect: {e}"))?;
        let conn = tokio::time::timeout(Duration::from_secs(10), connecting)
            .await
            .map_err(|_| "handshake timed out".to_string())?
            .map_err(|e| format!("handshake: {e}"))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| format!("stream: {e}"))?;
        let hello = ClientFrame::Hello(Hello {
            version: PROTOCOL_VERSION,
            client_name: format!("chaos-subscriber-n{node}"),
            resume: None,
        });
        shoal_proto::write_frame(&mut send, &hello, MAX_FRAME)
            .await
            .map_err(|e| format!("hello: {e}"))?;
        for (k, service) in shared.services.iter().enumerate() {
            let req = ClientFrame::Request {
                id: k as u64 + 1,
                body: Request::Subscribe {
                    service: service.clone(),
                },
            };
            shoal_proto::write_frame(&mut send, &req, MAX_FRAME)
                .await
                .map_err(|e| format!("subscribe: {e}"))?;
        }
        loop {
            match shoal_proto::read_frame::<ServerFrame, _>(&mut recv, MAX_FRAME).await {
                Ok(Some(ServerFrame::Response {
                    result: Ok(Response::View(view)),
                    ..
                }))
                | Ok(Some(ServerFrame::Push(view))) => {
                    observe(&shared, node, incarnation, &view);
                }
                Ok(Some(ServerFrame::Response { result: Err(e), .. })) => {
                    return Err(format!("subscribe refused: {e}"));
                }
                Ok(Some(ServerFrame::Error(e))) => return Err(format!("error frame: {e}")),
                Ok(Some(_)) => {}
                Ok(None) => return Err("stream ended".into()),
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    };
    let why: Result<(), String> = run.await;
    why.err().unwrap_or_default()
}

/// Keeps a raw subscriber on every node that is up; stops when `stop` is set.
pub async fn supervise_raw(
    shared: Arc<Shared>,
    quic: Vec<SocketAddr>,
    ca_file: std::path::PathBuf,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    use super::world::NodeState;
    use std::sync::atomic::Ordering;
    let mut tasks: Vec<Option<tokio::task::JoinHandle<()>>> = quic.iter().map(|_| None).collect();
    while !stop.load(Ordering::SeqCst) {
        for node in 0..quic.len() {
            let up = shared.world.lock().unwrap().nodes[node].state == NodeState::Up;
            let start = {
                let mut book = shared.subs.lock().unwrap();
                let sub = &mut book.nodes[node];
                if up && !sub.alive {
                    sub.incarnation += 1;
                    sub.alive = true;
                    sub.views.clear();
                    Some(sub.incarnation)
                } else {
                    None
                }
            };
            if let Some(incarnation) = start {
                let (shared, addr, ca) = (Arc::clone(&shared), quic[node], ca_file.clone());
                tasks[node] = Some(tokio::spawn(async move {
                    let _why =
                        raw_subscriber(Arc::clone(&shared), node, addr, ca, incarnation).await;
                    let mut book = shared.subs.lock().unwrap();
                    let sub = &mut book.nodes[node];
                    if sub.incarnation == incarnation {
                        sub.alive = false;
                    }
                }));
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for t in tasks.into_iter().flatten() {
        t.abort();
    }
}

/// Compares node `node`'s subscriber with its dump (per service: `(ip, port)` sets).
/// `Err` with the first difference.
pub fn raw_matches(
    shared: &Shared,
    node: usize,
    dump: &HashMap<String, ViewSet>,
) -> Result<(), String> {
    let book = shared.subs.lock().unwrap();
    let sub = &book.nodes[node];
    if !sub.alive {
        return Err(format!("n{node}'s subscriber is not connected"));
    }
    for service in &shared.services {
        let name = &service.service;
        let empty = ViewSet::new();
        let want = dump.get(name).unwrap_or(&empty);
        match sub.views.get(name) {
            Some((_, got)) if got == want => {}
            Some((rev, got)) => {
                return Err(format!(
                "n{node}'s subscriber has {} instance(s) of {name} at revision {rev}, the dump {}",
                got.len(),
                want.len()
            ))
            }
            None => return Err(format!("n{node}'s subscriber has no view of {name}")),
        }
    }
    Ok(())
}

/// An SDK client subscribed to every service; checks that no view lists a phantom.
pub struct SdkSubscriber {
    /// The client (kept to read its cached views).
    pub client: shoal_client::Client,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl SdkSubscriber {
    /// Connects with `config` and subscribes to every service.
    pub async fn start(
        shared: Arc<Shared>,
        config: shoal_client::ClientConfig,
    ) -> Result<SdkSubscriber, String> {
        let client = shoal_client::Client::connect(config)
            .await
            .map_err(|e| format!("SDK subscriber: {e}"))?;
        let mut tasks = Vec::new();
        for service in shared.services.clone() {
            let mut sub = client
                .subscribe(&service)
                .await
                .map_err(|e| format!("SDK subscriber: subscribe {}: {e}", service.service))?;
            let shared = Arc::clone(&shared);
            tasks.push(tokio::spawn(async move {
                while let Some(view) = sub.next().await {
                    check_sdk_view(&shared, &service, &view);
                }
            }));
        }
        Ok(SdkSubscriber { client, tasks })
    }

    /// The cached view of `service`.
    pub fn cached(&self, service: &ServiceKey) -> Option<ViewSet> {
        self.client.query_cached(service).map(|v| view_set(&v))
    }

    /// Stops the checks and closes the client.
    pub async fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.client.close()).await;
    }
}

fn check_sdk_view(shared: &Shared, service: &ServiceKey, view: &ServiceView) {
    let now = Instant::now();
    let phantoms: Vec<(String, u16)> = {
        let ledger = shared.ledger.lock().unwrap();
        view_set(view)
            .into_iter()
            .filter(|(ip, port)| {
                ledger
                    .regs
                    .get(&(service.service.clone(), ip.clone(), *port))
                    .is_none_or(|r| r.attempted > now)
            })
            .collect()
    };
    shared.subs.lock().unwrap().sdk_views_seen += 1;
    if phantoms.is_empty() {
        return;
    }
    let ms = shared.world.lock().unwrap().ms(now);
    let mut v = shared.violations.lock().unwrap();
    for (ip, port) in phantoms {
        v.add(
            "push-phantom",
            "SDK subscriber",
            &format!("{} {ip}:{port}", service.service),
            ms,
            "the SDK's view listed an instance no client registered".into(),
        );
    }
}
