//! A fake Shoal node: just enough of the client protocol, over real QUIC and TLS, to
//! test the SDK's connection handling (resume, restore, failover, subscriptions)
//! without the real server. Several fake nodes may share one `FakeRegistry`, which
//! then plays a perfectly replicated cluster.
//!
//! It keeps the instances of a session whose connection was lost (an infinite grace
//! period), removes them on Goodbye, and counts what it was asked, so that tests can
//! assert what the client sent.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use shoal_proto::{
    decode, decode_len, read_frame, write_frame, ClientFrame, ErrorBody, ErrorCode, Request,
    Response, ServerFrame, Welcome, DEFAULT_MAX_FRAME_BYTES,
};
use shoal_storage::{
    Instance, InstanceKey, Lease, NodeId, ServiceKey, ServiceSummary, ServiceView, SessionId,
};
use tokio::sync::mpsc;

/// A CA and a node certificate for 127.0.0.1, ::1 and localhost, written to a temp dir.
pub struct TestPki {
    pub dir: PathBuf,
    pub ca_file: PathBuf,
    cert: CertificateDer<'static>,
    key: Vec<u8>,
}

impl TestPki {
    pub fn new(name: &str) -> TestPki {
        let dir = std::env::temp_dir().join(format!(
            "shoal-client-test-{}-{}-{}",
            name,
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();

        let node_key = rcgen::KeyPair::generate().unwrap();
        let node_params = rcgen::CertificateParams::new(vec![
            "127.0.0.1".to_string(),
            "::1".to_string(),
            "localhost".to_string(),
        ])
        .unwrap();
        let cert = node_params.signed_by(&node_key, &ca).unwrap();
        TestPki {
            dir,
            ca_file,
            cert: cert.der().clone(),
            key: node_key.serialize_der(),
        }
    }

    pub fn ca(&self) -> &Path {
        &self.ca_file
    }

    fn server_config(&self) -> quinn::ServerConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![self.cert.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone())),
            )
            .unwrap();
        tls.alpn_protocols = vec![shoal_proto::ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
        quinn::ServerConfig::with_crypto(Arc::new(quic))
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Default)]
struct Service {
    revision: u64,
    instances: BTreeMap<InstanceKey, Instance>,
}

#[derive(Default)]
struct State {
    services: BTreeMap<ServiceKey, Service>,
    sessions: HashSet<SessionId>,
    /// Subscribers: (connection id, service) -> where its pushes go.
    subscribers: HashMap<(u64, ServiceKey), mpsc::UnboundedSender<ServerFrame>>,
    next_conn: u64,
    /// Every request received, by kind name, for assertions.
    seen: Vec<(String, Request)>,
    hellos: Vec<Option<SessionId>>,
    /// The request shape the nodes state in Welcome (0: none, as an earlier node).
    request_shape: u32,
    /// For each request received, in order: true if its structs were arrays.
    compact: Vec<bool>,
    /// The next this many requests fail with this code (a failing owner).
    failures: Option<(usize, ErrorCode)>,
    /// The next this many requests get no answer at all (a node that lost them).
    unanswered: usize,
}

/// The registry that one or more fake nodes serve.
#[derive(Clone, Default)]
pub struct FakeRegistry {
    state: Arc<Mutex<State>>,
}

impl FakeRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// The instances of a service, as (ip, port, session) tuples.
    pub fn instances(&self, key: &ServiceKey) -> Vec<(String, u16, Option<SessionId>)> {
        self.lock()
            .services
            .get(key)
            .map(|s| {
                s.instances
                    .values()
                    .map(|i| (i.ip.clone(), i.port, i.session()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// How many requests of this kind ("Register", "Subscribe", ...) were received.
    pub fn count(&self, kind: &str) -> usize {
        self.lock().seen.iter().filter(|(k, _)| k == kind).count()
    }

    /// The nodes of this registry state `shape` in Welcome from now on.
    pub fn set_request_shape(&self, shape: u32) {
        self.lock().request_shape = shape;
    }

    /// For each request received, in order: true if its structs came as arrays, false
    /// if as maps.
    pub fn request_forms(&self) -> Vec<bool> {
        self.lock().compact.clone()
    }

    /// The `resume` field of every Hello received, in order.
    pub fn hellos(&self) -> Vec<Option<SessionId>> {
        self.lock().hellos.clone()
    }

    /// The next `n` requests (other than Goodbye) fail with `code`.
    pub fn fail_next(&self, n: usize, code: ErrorCode) {
        self.lock().failures = Some((n, code));
    }

    /// The next `n` requests get no answer; the node stays up and its QUIC stack keeps
    /// acknowledging packets.
    pub fn leave_unanswered(&self, n: usize) {
        self.lock().unanswered = n;
    }

    /// Registers an instance as another client would, and pushes the change.
    pub fn register_external(&self, key: &ServiceKey, ip: &str, port: u16) {
        let mut st = self.lock();
        let spec = shoal_storage::InstanceSpec::new(ip, port);
        apply_register(&mut st, key, spec, SessionId(u128::MAX));
    }

    fn view(st: &State, key: &ServiceKey) -> ServiceView {
        let svc = st.services.get(key);
        ServiceView {
            key: key.clone(),
            revision: svc.map(|s| s.revision).unwrap_or(0),
            instances: svc
                .map(|s| s.instances.values().cloned().collect())
                .unwrap_or_default(),
            protected: false,
        }
    }
}

fn push(st: &mut State, key: &ServiceKey) {
    let view = FakeRegistry::view(st, key);
    st.subscribers
        .retain(|(_, k), tx| k != key || tx.send(ServerFrame::Push(view.clone())).is_ok());
}

fn apply_register(
    st: &mut State,
    key: &ServiceKey,
    spec: shoal_storage::InstanceSpec,
    session: SessionId,
) -> u64 {
    let ikey = spec.key();
    let svc = st.services.entry(key.clone()).or_default();
    svc.revision += 1;
    let stamp = svc.revision;
    let inst = Instance {
        ip: spec.ip.clone(),
        port: spec.port,
        cluster: spec.cluster.clone(),
        weight: spec.weight,
        healthy: spec.healthy,
        enabled: spec.enabled,
        metadata: spec.metadata.clone(),
        lease: match spec.ttl {
            Some(t) => Lease::Ttl(t),
            None => Lease::Session(session),
        },
        last_beat_ms: 0,
        stamp,
    };
    svc.instances.insert(ikey, inst);
    let rev = svc.revision;
    push(st, key);
    rev
}

fn kind(req: &Request) -> &'static str {
    match req {
        Request::Register { .. } => "Register",
        Request::RegisterMany { .. } => "RegisterMany",
        Request::Update { .. } => "Update",
        Request::Deregister { .. } => "Deregister",
        Request::Beat { .. } => "Beat",
        Request::SetServiceMeta { .. } => "SetServiceMeta",
        Request::Query { .. } => "Query",
        Request::ListServices { .. } => "ListServices",
        Request::Subscribe { .. } => "Subscribe",
        Request::Unsubscribe { .. } => "Unsubscribe",
        Request::Members => "Members",
        Request::Ring { .. } => "Ring",
        Request::Ping => "Ping",
        Request::Goodbye => "Goodbye",
    }
}

fn handle(
    reg: &FakeRegistry,
    conn_id: u64,
    session: SessionId,
    req: Request,
    out: &mpsc::UnboundedSender<ServerFrame>,
) -> Result<Response, ErrorBody> {
    let mut st = reg.lock();
    st.seen.push((kind(&req).to_string(), req.clone()));
    if let Some((n, code)) = st.failures {
        if n > 0 && !matches!(req, Request::Goodbye) {
            st.failures = Some((n - 1, code));
            return Err(ErrorBody::new(code, "injected failure"));
        }
    }
    match req {
        Request::Register { service, instance } | Request::Update { service, instance } => {
            if instance.port == 0 {
                return Err(ErrorBody::new(
                    ErrorCode::InvalidPort,
                    "invalid port 0: must be 1..=65535",
                ));
            }
            let revision = apply_register(&mut st, &service, instance, session);
            Ok(Response::Applied { revision })
        }
        Request::RegisterMany { items } => Ok(Response::AppliedMany(
            items
                .into_iter()
                .map(|(service, instance)| {
                    if instance.port == 0 {
                        Err(ErrorBody::new(
                            ErrorCode::InvalidPort,
                            "invalid port 0: must be 1..=65535",
                        ))
                    } else {
                        Ok(apply_register(&mut st, &service, instance, session))
                    }
                })
                .collect(),
        )),
        Request::Deregister { service, instance } => {
            let removed = st
                .services
                .get_mut(&service)
                .and_then(|s| s.instances.remove(&instance))
                .is_some();
            if !removed {
                return Err(ErrorBody::new(ErrorCode::NotFound, format!("{instance}")));
            }
            let svc = st.services.get_mut(&service).expect("just removed from it");
            svc.revision += 1;
            let revision = svc.revision;
            push(&mut st, &service);
            Ok(Response::Applied { revision })
        }
        Request::Beat { .. } | Request::SetServiceMeta { .. } => {
            Ok(Response::Applied { revision: 0 })
        }
        Request::Query { service, .. } => Ok(Response::View(FakeRegistry::view(&st, &service))),
        Request::ListServices { namespace, group } => Ok(Response::Services(
            st.services
                .iter()
                .filter(|(k, _)| {
                    k.namespace == namespace && group.as_ref().is_none_or(|g| *g == k.group)
                })
                .map(|(k, s)| ServiceSummary {
                    key: k.clone(),
                    instances: s.instances.len(),
                    healthy: s.instances.values().filter(|i| i.healthy).count(),
                    revision: s.revision,
                })
                .collect(),
        )),
        Request::Subscribe { service } => {
            st.subscribers
                .insert((conn_id, service.clone()), out.clone());
            Ok(Response::View(FakeRegistry::view(&st, &service)))
        }
        Request::Unsubscribe { service } => {
            st.subscribers.remove(&(conn_id, service));
            Ok(Response::Done)
        }
        Request::Members | Request::Ring { .. } => Err(ErrorBody::new(
            ErrorCode::BadRequest,
            "the fake node has no cluster",
        )),
        Request::Ping => Ok(Response::Done),
        Request::Goodbye => {
            let keys: Vec<ServiceKey> = st.services.keys().cloned().collect();
            for key in keys {
                let svc = st.services.get_mut(&key).expect("listed above");
                let before = svc.instances.len();
                svc.instances.retain(|_, i| i.session() != Some(session));
                if svc.instances.len() != before {
                    svc.revision += 1;
                    push(&mut st, &key);
                }
            }
            st.sessions.remove(&session);
            Ok(Response::Done)
        }
    }
}

/// One fake node listening on 127.0.0.1.
pub struct FakeNode {
    pub addr: SocketAddr,
    pub registry: FakeRegistry,
    endpoint: quinn::Endpoint,
    conns: Arc<Mutex<Vec<quinn::Connection>>>,
}

impl FakeNode {
    pub fn start(pki: &TestPki, name: &str, registry: FakeRegistry) -> FakeNode {
        let endpoint =
            quinn::Endpoint::server(pki.server_config(), "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let conns = Arc::new(Mutex::new(Vec::new()));
        let node_id = NodeId::new(name);
        let ep = endpoint.clone();
        let reg = registry.clone();
        let cs = conns.clone();
        tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                let reg = reg.clone();
                let cs = cs.clone();
                let node_id = node_id.clone();
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    cs.lock().unwrap().push(conn.clone());
                    serve(conn, reg, node_id).await;
                });
            }
        });
        FakeNode {
            addr,
            registry,
            endpoint,
            conns,
        }
    }

    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// Closes every client connection from the node's side (the node stays up).
    pub fn drop_connections(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            c.close(7u32.into(), b"fake node drops you");
        }
    }

    /// The node dies: every connection is closed and no new one is accepted.
    pub fn kill(&self) {
        self.endpoint.close(9u32.into(), b"fake node dies");
    }
}

async fn serve(conn: quinn::Connection, reg: FakeRegistry, node_id: NodeId) {
    let Ok((mut send, mut recv)) = conn.accept_bi().await else {
        return;
    };
    let max = DEFAULT_MAX_FRAME_BYTES;
    let hello = match read_frame::<ClientFrame, _>(&mut recv, max).await {
        Ok(Some(ClientFrame::Hello(h))) => h,
        _ => return,
    };
    let (conn_id, session, resumed) = {
        let mut st = reg.lock();
        st.hellos.push(hello.resume);
        st.next_conn += 1;
        let conn_id = st.next_conn;
        match hello.resume {
            Some(s) if st.sessions.contains(&s) => (conn_id, s, true),
            _ => {
                let s = SessionId(rand::random());
                st.sessions.insert(s);
                (conn_id, s, false)
            }
        }
    };
    let welcome = ServerFrame::Welcome(Welcome {
        session_id: session,
        resumed,
        node_id,
        session_grace_ms: 60_000,
        max_frame_bytes: max as u32,
        request_shape: reg.lock().request_shape,
    });
    if write_frame(&mut send, &welcome, max).await.is_err() {
        return;
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<ServerFrame>();
    let writer = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if write_frame(&mut send, &frame, max).await.is_err() {
                return;
            }
        }
    });
    loop {
        // Read raw, to note the form: {"Request": [id, body]} with structs as arrays,
        // {"Request": {"id": .., "body": ..}} with maps.
        let mut prefix = [0u8; 4];
        if recv.read_exact(&mut prefix).await.is_err() {
            break;
        }
        let Ok(len) = decode_len(prefix, max) else {
            break;
        };
        let mut bytes = vec![0u8; len];
        if recv.read_exact(&mut bytes).await.is_err() {
            break;
        }
        let Ok(ClientFrame::Request { id, body }) = decode::<ClientFrame>(&bytes) else {
            break;
        };
        let compact = bytes.starts_with(b"\x81\xa7Request\x92");
        {
            let mut st = reg.lock();
            st.compact.push(compact);
            if st.unanswered > 0 {
                st.unanswered -= 1;
                continue;
            }
        }
        let result = handle(&reg, conn_id, session, body, &tx);
        if tx.send(ServerFrame::Response { id, result }).is_err() {
            break;
        }
    }
    reg.lock().subscribers.retain(|(c, _), _| *c != conn_id);
    drop(tx);
    let _ = writer.await;
}
