//! Starting and stopping a node: the QUIC endpoint, the HTTP side and the
//! background tasks.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use metrics_exporter_prometheus::PrometheusHandle;
use quinn::VarInt;
use shoal_storage::NodeId;

use crate::config::Config;
use crate::peer::LinkEvent;
use crate::state::{read, write, Shared};
use crate::tls::{self, TlsFiles};
use shoal_replication::{MemberState, PeerMsg, Replica};

/// Application close code: normal end of a session.
pub const CLOSE_NORMAL: VarInt = VarInt::from_u32(0);
/// Application close code: the peer broke the protocol.
pub const CLOSE_PROTOCOL: VarInt = VarInt::from_u32(1);
/// Application close code: the client did not read its pushes fast enough.
pub const CLOSE_SLOW_CONSUMER: VarInt = VarInt::from_u32(2);
/// Application close code: the node is shutting down; resume elsewhere.
pub const CLOSE_SHUTDOWN: VarInt = VarInt::from_u32(3);
/// Application close code: the node stalled (did not run for half the idle timeout)
/// and refuses the requests that waited meanwhile; reconnect and re-assert.
pub const CLOSE_STALLED: VarInt = VarInt::from_u32(4);

/// A node that is running.
pub struct RunningNode {
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    quic_addr: SocketAddr,
    http_addr: SocketAddr,
    ca_file: std::path::PathBuf,
    http_shutdown: tokio::sync::oneshot::Sender<()>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningNode {
    /// The bound QUIC (UDP) address.
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }
    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }
    /// The CA certificate clients must trust.
    pub fn ca_file(&self) -> &std::path::Path {
        &self.ca_file
    }
    /// This node's id.
    pub fn node_id(&self) -> &NodeId {
        &self.shared.node_id
    }

    /// Stops serving: no longer ready, closes every client connection with
    /// [`CLOSE_SHUTDOWN`] (clients resume on another node), waits for them briefly.
    pub async fn shutdown(self) {
        self.shared.ready.store(false, Ordering::Release);
        self.endpoint.close(CLOSE_SHUTDOWN, b"node shutting down");
        let timeout = Duration::from_millis(self.shared.config.shutdown_timeout_ms);
        let _ = tokio::time::timeout(timeout, self.endpoint.wait_idle()).await;
        let _ = self.http_shutdown.send(());
        for t in self.tasks {
            t.abort();
        }
    }
}

/// Reads the node id from config, else from `data_dir/node_id`, else makes one up
/// and keeps it there so it survives restarts.
fn node_id(config: &Config) -> Result<NodeId> {
    if let Some(id) = &config.node_id {
        return Ok(NodeId::new(id));
    }
    let path = config.data_dir.join("node_id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim();
        if !id.is_empty() {
            return Ok(NodeId::new(id));
        }
    }
    let id = format!("node-{:08x}", rand::random::<u32>());
    std::fs::write(&path, &id).with_context(|| format!("writing {}", path.display()))?;
    Ok(NodeId::new(id))
}

fn tls_files(config: &Config, node_id: &NodeId) -> Result<TlsFiles> {
    match (&config.tls.cert, &config.tls.key, &config.tls.ca) {
        (Some(cert), Some(key), Some(ca)) => Ok(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            ca: ca.clone(),
        }),
        _ => {
            let ca_dir = config
                .tls
                .dev_ca_dir
                .clone()
                .unwrap_or_else(|| config.data_dir.clone());
            tls::issue_dev_cert(
                &ca_dir,
                &config.data_dir.join("tls"),
                &node_id.0,
                &[config.advertise_host()],
            )
        }
    }
}

/// Sends every connection that holds a session one heartbeat datagram per
/// `heartbeat_interval_ms`, in [`HEARTBEAT_SLOTS`] bursts spread over the interval.
///
/// A heartbeat is what keeps an idle session alive: every packet received restarts
/// QUIC's idle and keep-alive timers on both sides, so with heartbeats more frequent
/// than the clients' keep-alive and the node's own, neither side ever sends a PING.
/// The packets per session are the same as with client keep-alives (one each way
/// per interval), but a client keep-alive arrives whenever that client's timer says
/// and each one wakes the node twice (the packet, then its delayed acknowledgement),
/// while heartbeats leave in bursts and their acknowledgements come back in bursts,
/// read many per system call. Holding 10 000 idle sessions, that cost the cluster
/// about a fifth less CPU at the same packet rate (docs/benchmarks.md).
///
/// A connection's slot is its id modulo [`HEARTBEAT_SLOTS`], so it gets its heartbeat
/// every interval exactly, and one burst is a tenth of the node's sessions: the
/// acknowledgements of a burst arrive together, and those of 10 000 sessions at once
/// overflowed the node's 4 MiB receive buffer (docs/benchmarks.md, twenty-ninth series).
///
/// A client that did not offer datagram support is skipped by quinn
/// (`SendDatagramError::UnsupportedByPeer`); it keeps itself alive with its own
/// keep-alives, or the node's.
async fn heartbeat_loop(shared: Arc<Shared>) {
    let period = Duration::from_millis(shared.config.heartbeat_interval_ms);
    let slot_period = (period / HEARTBEAT_SLOTS as u32).max(Duration::from_millis(1));
    let mut interval = tokio::time::interval(slot_period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut conns = Vec::new();
    let mut slot = 0;
    loop {
        interval.tick().await;
        conns.extend(
            crate::state::lock(&shared.session_conns)
                .iter()
                .filter(|(id, _)| **id % HEARTBEAT_SLOTS == slot)
                .map(|(_, conn)| conn.clone()),
        );
        slot = (slot + 1) % HEARTBEAT_SLOTS;
        let mut sent = 0u64;
        for conn in conns.drain(..) {
            // One byte, whose value means nothing yet; `from_static` does not allocate.
            if conn.send_datagram(bytes::Bytes::from_static(&[0])).is_ok() {
                sent += 1;
            }
        }
        metrics::counter!("shoal_heartbeats_sent_total").increment(sent);
    }
}

/// The bursts a heartbeat interval is divided into (see `heartbeat_loop`).
const HEARTBEAT_SLOTS: u64 = 10;

/// Starts a node and returns once it serves.
pub async fn start(config: Config, metrics: Option<PrometheusHandle>) -> Result<RunningNode> {
    config.validate()?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let node_id = node_id(&config)?;
    let files = tls_files(&config, &node_id)?;
    let tls_config = tls::server_config(&files, &[shoal_proto::ALPN, shoal_proto::PEER_ALPN])?;
    let quic_crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls_config)
        .context("QUIC needs TLS 1.3 with an initial cipher suite")?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(quic_crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(
            Duration::from_millis(config.idle_timeout_ms)
                .try_into()
                .context("idle_timeout_ms too large")?,
        ))
        .keep_alive_interval(Some(Duration::from_millis(config.keep_alive_interval_ms)))
        // Clients may send datagrams (the SDK probes a silent node with one); the node
        // never reads them, so quinn keeps at most a few and drops the oldest.
        .datagram_receive_buffer_size(Some(512))
        // One session stream, plus room for a misbehaving client to be refused.
        .max_concurrent_bidi_streams(VarInt::from_u32(4))
        // Peer links send on one unidirectional stream each way.
        .max_concurrent_uni_streams(VarInt::from_u32(2));
    server_config.transport_config(Arc::new(transport));

    let socket = udp_socket(config.listen_addr, config.udp_buffer_bytes)
        .with_context(|| format!("binding QUIC on {}", config.listen_addr))?;
    let runtime = quinn::default_runtime().context("no async runtime found")?;
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server_config),
        socket,
        runtime,
    )
    .with_context(|| format!("starting QUIC on {}", config.listen_addr))?;
    let quic_addr = endpoint.local_addr()?;
    let my_addr = format!(
        "{}:{}",
        fmt_host(&config.advertise_host()),
        quic_addr.port()
    );

    let peer_tls = tls::peer_client_config(&files)?;
    let mut peer_client = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(peer_tls)
            .context("QUIC needs TLS 1.3 with an initial cipher suite")?,
    ));
    let mut peer_transport = quinn::TransportConfig::default();
    peer_transport
        .max_idle_timeout(Some(
            Duration::from_millis(config.replication.down_after_ms.max(1_000))
                .try_into()
                .context("down_after_ms too large")?,
        ))
        .keep_alive_interval(Some(Duration::from_millis(
            config.replication.probe_interval_ms,
        )));
    peer_client.transport_config(Arc::new(peer_transport));
    let (links, link_events) = crate::peer::Links::new(
        node_id.clone(),
        my_addr.clone(),
        endpoint.clone(),
        peer_client,
        config.peer_max_frame_bytes,
        config.peer_queue_messages,
    );

    let now = crate::state::wall_ms();
    let mut registry = shoal_storage::Registry::new((&config.limits).into());
    for ns in &config.namespaces {
        // Names were validated with the config; a duplicate is harmless.
        let _ = registry.add_namespace(ns);
    }
    let replica = Replica::with_registry(
        node_id.clone(),
        my_addr.clone(),
        config.engine_config(),
        registry,
        rand::random::<u64>(),
        now,
    );
    let shared = Shared::new(
        node_id.clone(),
        my_addr.clone(),
        config.clone(),
        replica,
        links,
    );

    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("binding HTTP on {}", config.http_addr))?;
    let http_addr = listener.local_addr()?;
    let (http_shutdown, http_stop) = tokio::sync::oneshot::channel::<()>();
    let app = crate::http::router(Arc::clone(&shared), metrics.clone());
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(async {
            let _ = http_stop.await;
        });
        if let Err(e) = serve.await {
            tracing::error!("HTTP server failed: {e}");
        }
    }));

    tasks.push(tokio::spawn(accept_loop(
        Arc::clone(&shared),
        endpoint.clone(),
    )));
    tasks.push(tokio::spawn(tick_loop(Arc::clone(&shared))));
    tasks.push(tokio::spawn(link_loop(Arc::clone(&shared), link_events)));
    tasks.push(tokio::spawn(forward_loop(Arc::clone(&shared))));
    tasks.push(tokio::spawn(seed_loop(Arc::clone(&shared))));
    tasks.push(tokio::spawn(gauge_loop(Arc::clone(&shared), metrics)));
    if config.heartbeat_interval_ms > 0 {
        tasks.push(tokio::spawn(heartbeat_loop(Arc::clone(&shared))));
    }

    // Ready when the engine says so: at once for a node without seeds, after the
    // snapshot load (or the bootstrap wait) otherwise.
    let deadline = tokio::time::Instant::now()
        + Duration::from_millis(config.replication.bootstrap_wait_ms + 30_000);
    while !shared.is_ready() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "not ready: could not load the registry from a peer"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::info!(node = %node_id, %quic_addr, %http_addr, "node ready");
    Ok(RunningNode {
        shared,
        endpoint,
        quic_addr,
        http_addr,
        ca_file: files.ca,
        http_shutdown,
        tasks,
    })
}

fn fmt_host(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

async fn accept_loop(shared: Arc<Shared>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            match incoming.await {
                Ok(conn) if alpn(&conn).as_deref() == Some(shoal_proto::PEER_ALPN) => {
                    shared.links.accept(conn)
                }
                Ok(conn) => crate::conn::serve(shared, conn).await,
                Err(e) => {
                    metrics::counter!("shoal_handshake_failures_total").increment(1);
                    tracing::debug!("handshake failed: {e}");
                }
            }
        });
    }
}

fn alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

/// Drives the engine's timers: batches, probes, anti-entropy, leases.
///
/// While operations wait in a peer's batch it runs every `batch_window_ms`; otherwise
/// at an idle pace (`Config::idle_tick_ms`), and a write that queues operations wakes it at
/// once ([`crate::state::Shared::execute`]). An idle node (one holding sessions but
/// taking no writes) thus runs it a tenth as often, and the engine's other timers
/// (probes every `probe_interval_ms`, suspicion, anti-entropy, leases) are late by
/// at most that pace.
async fn tick_loop(shared: Arc<Shared>) {
    let busy = Duration::from_millis(shared.config.replication.batch_window_ms.max(1));
    let idle = Duration::from_millis(shared.config.replication.idle_tick_ms());
    loop {
        // Idle unless a batch waits. A write that queues one after the check leaves
        // a wake (Notify keeps one if nobody waits yet): none is lost.
        if read(&shared.replica).has_queued() {
            tokio::time::sleep(busy).await;
        } else {
            tokio::select! {
                () = tokio::time::sleep(idle) => {}
                () = shared.tick_wake.notified() => {
                    metrics::counter!("shoal_engine_tick_wakes_total").increment(1);
                }
            }
        }
        metrics::counter!("shoal_engine_ticks_total").increment(1);
        let now = shared.now_ms();
        if let Some(ms) = shared.ticked(now) {
            metrics::counter!("shoal_stalls_total").increment(1);
            tracing::warn!(
                stalled_ms = ms,
                "this node did not run for {ms} ms; client requests that waited out the stall are refused (their clients reconnect)"
            );
            shared.end_connections_after_stall();
        }
        let activity = shared.links.activity();
        let mut replica = write(&shared.replica);
        for (peer, at) in activity {
            let ago = u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX);
            replica.link_activity(&peer, now.saturating_sub(ago));
        }
        let actions = replica.tick(now);
        shared.execute(&replica, actions);
    }
}

/// Sends the runs of client writes that sessions queued for their owners
/// ([`Shared::forwards_queued`]), one message per owner. Woken by the first run queued,
/// it first lets the tasks that are ready run (the sessions among them queue their runs
/// too), so that under load one message carries the runs of many sessions; on an idle
/// node nothing else is ready and the run leaves at once.
async fn forward_loop(shared: Arc<Shared>) {
    loop {
        shared.forward_wake.notified().await;
        tokio::task::yield_now().await;
        let mut replica = write(&shared.replica);
        if replica.has_queued_forwards() {
            let actions = replica.flush_forwards();
            shared.execute(&replica, actions);
        }
    }
}

/// Feeds what the peer links report into the engine.
async fn link_loop(
    shared: Arc<Shared>,
    mut events: tokio::sync::mpsc::UnboundedReceiver<LinkEvent<PeerMsg>>,
) {
    while let Some(event) = events.recv().await {
        let now = shared.now_ms();
        let mut replica = write(&shared.replica);
        let actions = match event {
            LinkEvent::Up { id, addr } => replica.peer_link_up(id, addr, now),
            LinkEvent::Down { id } => replica.peer_link_down(&id, now),
            LinkEvent::Message { from, msg } => {
                count_peer_message(&msg);
                replica.handle(&from, msg, now)
            }
        };
        shared.execute(&replica, actions);
    }
}

/// Counts what crosses the peer links, for the dashboards.
fn count_peer_message(msg: &PeerMsg) {
    crate::metrics::peer_received(msg).increment(1);
    if let PeerMsg::Repair { records } = msg {
        metrics::counter!("shoal_anti_entropy_repairs_total").increment(records.len() as u64);
    }
}

/// Dials the seeds until this node has a link; again whenever it has none.
async fn seed_loop(shared: Arc<Shared>) {
    if shared.config.seeds.is_empty() {
        return;
    }
    let me = shared.my_addr();
    loop {
        if shared.links.linked().is_empty() {
            for seed in &shared.config.seeds {
                if seed != &me && seed != &shared.config.listen_addr.to_string() {
                    shared.links.dial(seed.clone());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(
            shared.config.replication.probe_interval_ms * 2,
        ))
        .await;
    }
}

/// Refreshes gauges once a second.
async fn gauge_loop(shared: Arc<Shared>, metrics: Option<PrometheusHandle>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // The owned count, with what it depends on: counted again only when that changed
    // (counting walks every service this node owns; holding 10 000 services still,
    // that was a tenth of a node's CPU).
    let mut owned_count: Option<((u64, u64), usize)> = None;
    loop {
        tick.tick().await;
        let (services, instances, members, ring, owned, self_preservation) = {
            let r = read(&shared.replica);
            let members = r.members();
            // Counted over the ring ranges this node owns, without building a list of
            // every service (that took 11 % of a node's CPU at 450 000 instances).
            let generation = r.ownership_generation();
            let owned = match owned_count {
                Some((g, n)) if g == generation => n,
                _ => {
                    let n = r.owned_service_count();
                    owned_count = Some((generation, n));
                    n
                }
            };
            (
                r.registry().service_count(),
                r.registry().instance_count(),
                members,
                r.ring().len(),
                owned,
                r.self_preservation_active(),
            )
        };
        for state in [MemberState::Up, MemberState::Suspect, MemberState::Down] {
            let n = members.iter().filter(|m| m.state == state).count();
            let label = match state {
                MemberState::Up => "up",
                MemberState::Suspect => "suspect",
                MemberState::Down => "down",
            };
            metrics::gauge!("shoal_members", "state" => label).set(n as f64);
        }
        metrics::gauge!("shoal_ring_members").set(ring as f64);
        metrics::gauge!("shoal_owned_services").set(owned as f64);
        metrics::gauge!("shoal_self_preservation").set(if self_preservation { 1.0 } else { 0.0 });
        metrics::gauge!("shoal_services").set(services as f64);
        metrics::gauge!("shoal_instances").set(instances as f64);
        metrics::gauge!("shoal_sessions").set(shared.session_count() as f64);
        metrics::gauge!("shoal_subscriptions").set(shared.subscription_count() as f64);
        metrics::gauge!("shoal_ready").set(if shared.is_ready() { 1.0 } else { 0.0 });
        if let Some(m) = &metrics {
            m.run_upkeep();
        }
    }
}

/// Runs a node until SIGTERM or Ctrl-C, then shuts it down gracefully.
pub async fn run(config: Config) -> Result<()> {
    let metrics = crate::metrics::install()?;
    let node = start(config, Some(metrics)).await?;
    // One line for people and scripts alike; tests parse it to learn the ports.
    println!(
        "shoal node {} ready: quic={} http={} ca={}",
        node.node_id(),
        node.quic_addr(),
        node.http_addr(),
        node.ca_file().display()
    );
    stop_signal(false).await;
    tracing::info!("shutting down");
    node.shutdown().await;
    Ok(())
}

/// A future that completes on Ctrl-C or SIGTERM, and with `hangup` also on SIGHUP
/// (the terminal that started `shoal dev` was closed). The handlers are in place when
/// this returns, not when the future is first polled: a signal that comes in between
/// is not lost and does not kill the process (SIGTERM's default). Must be called
/// within a runtime.
pub(crate) fn stop_signal(hangup: bool) -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, Signal, SignalKind};
        // A kind whose handler cannot be installed never fires; with none at all,
        // Ctrl-C still works through tokio's own handler.
        let interrupt = signal(SignalKind::interrupt()).ok();
        let terminate = signal(SignalKind::terminate()).ok();
        let hangup = hangup.then(|| signal(SignalKind::hangup()).ok()).flatten();
        async fn recv(s: Option<Signal>) {
            match s {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        async move {
            if interrupt.is_none() && terminate.is_none() {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
            tokio::select! {
                _ = recv(interrupt) => {}
                _ = recv(terminate) => {}
                _ = recv(hangup) => {}
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = hangup;
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The node's UDP socket, bound to `addr`, with receive and send buffers of `bytes`
/// (0: the system's). Every client and peer connection shares it: with the system's
/// default (about 200 KB) a burst from a few thousand clients overflows it, and each
/// datagram dropped there costs its sender a QUIC loss-recovery round.
fn udp_socket(addr: std::net::SocketAddr, bytes: usize) -> Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if bytes > 0 {
        let _ = socket.set_recv_buffer_size(bytes);
        let _ = socket.set_send_buffer_size(bytes);
        // Linux reports twice what it grants (it counts its own overhead).
        let reported = socket.recv_buffer_size().unwrap_or(0);
        let got = if cfg!(target_os = "linux") {
            reported / 2
        } else {
            reported
        };
        if got < bytes {
            tracing::warn!(
                asked = bytes,
                got,
                "the UDP receive buffer is smaller than udp_buffer_bytes; raise net.core.rmem_max"
            );
        }
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::udp_socket;

    /// What Linux grants a socket that asks for `bytes`: up to `rmem_max`, reported
    /// doubled.
    fn granted(bytes: usize) -> usize {
        let max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(bytes);
        bytes.min(max) * 2
    }

    #[test]
    fn the_node_socket_gets_the_buffer_it_asks_for_within_the_system_limit() {
        let addr = "127.0.0.1:0".parse().unwrap();
        let default = udp_socket(addr, 0).unwrap();
        let asked = udp_socket(addr, 1 << 20).unwrap();
        let size = |s: &std::net::UdpSocket| socket2::SockRef::from(s).recv_buffer_size().unwrap();
        if cfg!(target_os = "linux") {
            assert_eq!(size(&asked), granted(1 << 20));
        }
        assert!(size(&asked) >= size(&default));
        // Bound, and usable.
        assert_ne!(asked.local_addr().unwrap().port(), 0);
        asked.send_to(b"x", default.local_addr().unwrap()).unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(default.recv(&mut buf).unwrap(), 1);
    }
}
