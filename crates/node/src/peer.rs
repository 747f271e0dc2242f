//! Peer links: one QUIC connection per pair of nodes, mutual TLS with the cluster CA,
//! ALPN `shoal-peer/1`. This is the QUIC implementation of the replication engine's
//! transport: it moves opaque peer messages and reports links going up and down;
//! every protocol decision is the engine's.
//!
//! Each side of a link opens one unidirectional stream for what it sends. The first
//! frame on it is a [`PeerHello`] naming the sender; the rest are messages. When both
//! nodes dial each other at once, the link dialed by the lower node id is kept.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use shoal_proto::mpack::ServiceKeyCache;
use shoal_proto::{read_frame, write_frame, FrameReader};
use shoal_storage::NodeId;
use tokio::sync::mpsc;

use crate::state::lock;

/// Version of the peer protocol.
pub const PEER_PROTOCOL_VERSION: u32 = 1;

/// The shape of the peer messages (their fields, in order). Two nodes that announce the
/// same shape in their hellos send each other MessagePack arrays, without field names
/// (a quarter less node CPU per batched registration, docs/benchmarks.md); otherwise
/// maps with field names, which a node of another version reads whatever fields it
/// lacks or does not know. Raise it whenever a field of any peer message is added,
/// removed or moved, and change the readers and writers of `peer_codec` with it (they
/// read and write the arrays of this shape; their tests compare them with serde).
pub const PEER_MESSAGE_SHAPE: u32 = 1;

/// Close code: a duplicate link between the same pair of nodes.
const CLOSE_DUPLICATE: quinn::VarInt = quinn::VarInt::from_u32(10);
/// Close code: a peer without a certificate from the cluster CA.
const CLOSE_UNAUTHENTICATED: quinn::VarInt = quinn::VarInt::from_u32(11);

/// First frame on a peer stream.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerHello {
    /// The sender's node id.
    pub node_id: NodeId,
    /// The address the sender's QUIC endpoint is dialed at.
    pub addr: String,
    /// Peer protocol version.
    pub version: u32,
    /// Random per process start: a hello from a new incarnation of a node replaces the
    /// link of the old one (which may not have timed out yet after a kill -9).
    #[serde(default)]
    pub incarnation: u64,
    /// The sender's [`PEER_MESSAGE_SHAPE`]; 0 from a node that sends only maps.
    #[serde(default)]
    pub shape: u32,
}

/// How a link encodes and decodes peer messages: serde's generic MessagePack, unless
/// the type has a faster way that gives the same bytes and values ([`PeerMsg`]'s, in
/// `peer_codec`).
///
/// [`PeerMsg`]: shoal_replication::PeerMsg
pub trait PeerCodec: Serialize + DeserializeOwned {
    /// Decodes one message body; `keys` are the service keys the link read before.
    fn decode_body(
        body: &[u8],
        keys: &mut ServiceKeyCache,
    ) -> Result<Self, shoal_proto::FrameError> {
        let _ = keys;
        shoal_proto::decode(body)
    }

    /// Appends the message as one frame with structs as arrays (to a peer of the same
    /// [`PEER_MESSAGE_SHAPE`]).
    fn append_compact(&self, out: &mut Vec<u8>, max: usize) -> Result<(), shoal_proto::FrameError> {
        shoal_proto::append_frame_compact(out, self, max)
    }
}

impl PeerCodec for shoal_replication::PeerMsg {
    fn decode_body(
        body: &[u8],
        keys: &mut ServiceKeyCache,
    ) -> Result<Self, shoal_proto::FrameError> {
        crate::peer_codec::decode_peer_msg(body, keys)
    }

    fn append_compact(&self, out: &mut Vec<u8>, max: usize) -> Result<(), shoal_proto::FrameError> {
        crate::peer_codec::append_peer_msg(out, self, max)
    }
}

/// What the links report to the node.
#[derive(Debug)]
pub enum LinkEvent<M> {
    /// A link to `id` is up.
    Up {
        /// The peer.
        id: NodeId,
        /// Its dial address.
        addr: String,
    },
    /// The link to `id` went down.
    Down {
        /// The peer.
        id: NodeId,
    },
    /// A message arrived.
    Message {
        /// The sender.
        from: NodeId,
        /// The message.
        msg: M,
    },
}

struct Link<M> {
    conn: quinn::Connection,
    tx: mpsc::Sender<M>,
    dialed_by: NodeId,
    incarnation: u64,
}

/// The set of peer links of one node.
pub struct Links<M> {
    me: NodeId,
    my_addr: String,
    incarnation: u64,
    /// The message shape announced in hellos: [`PEER_MESSAGE_SHAPE`] (a test plays an
    /// older node with another).
    shape: u32,
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    max_frame: usize,
    queue: usize,
    links: Mutex<HashMap<NodeId, Link<M>>>,
    dialing: Mutex<std::collections::HashSet<String>>,
    events: mpsc::UnboundedSender<LinkEvent<M>>,
    /// When a frame last arrived from each peer (before the node processed it).
    activity: Mutex<HashMap<NodeId, std::time::Instant>>,
}

impl<M> Links<M>
where
    M: PeerCodec + Send + 'static,
{
    /// When a frame last arrived from each peer, whether or not the node has
    /// processed it yet (see `Replica::link_activity`).
    pub fn activity(&self) -> Vec<(NodeId, std::time::Instant)> {
        lock(&self.activity)
            .iter()
            .map(|(id, t)| (id.clone(), *t))
            .collect()
    }

    fn note_activity(&self, peer: &NodeId) {
        let now = std::time::Instant::now();
        let mut activity = lock(&self.activity);
        match activity.get_mut(peer) {
            Some(t) => *t = now,
            None => {
                activity.insert(peer.clone(), now);
            }
        }
    }

    /// Links of node `me`, reachable at `my_addr`, using `endpoint` both to dial and to
    /// accept. Events arrive on the returned receiver.
    pub fn new(
        me: NodeId,
        my_addr: String,
        endpoint: quinn::Endpoint,
        client_config: quinn::ClientConfig,
        max_frame: usize,
        queue: usize,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<LinkEvent<M>>) {
        let (events, rx) = mpsc::unbounded_channel();
        (
            Arc::new(Links {
                me,
                my_addr,
                incarnation: rand::random::<u64>(),
                shape: PEER_MESSAGE_SHAPE,
                endpoint,
                client_config,
                max_frame,
                queue,
                links: Mutex::new(HashMap::new()),
                dialing: Mutex::new(Default::default()),
                events,
                activity: Mutex::new(HashMap::new()),
            }),
            rx,
        )
    }

    /// Queues `msg` for `to`. False if there is no link or its queue is full (the
    /// message is dropped: the engine's anti-entropy repairs what a drop loses).
    pub fn send(&self, to: &NodeId, msg: M) -> bool {
        let links = lock(&self.links);
        match links.get(to) {
            Some(link) => link.tx.try_send(msg).is_ok(),
            None => false,
        }
    }

    /// Whether a link to `id` is up.
    pub fn is_linked(&self, id: &NodeId) -> bool {
        lock(&self.links).contains_key(id)
    }

    /// Ids of the peers linked now.
    pub fn linked(&self) -> Vec<NodeId> {
        lock(&self.links).keys().cloned().collect()
    }

    /// Dials `addr` (host:port) unless a dial to it is under way. Runs in the
    /// background; the outcome arrives as an event.
    pub fn dial(self: &Arc<Self>, addr: String) {
        if !lock(&self.dialing).insert(addr.clone()) {
            return;
        }
        let links = Arc::clone(self);
        tokio::spawn(async move {
            let result = links.dial_once(&addr).await;
            lock(&links.dialing).remove(&addr);
            if let Err(e) = result {
                tracing::debug!(peer = %addr, "dial failed: {e:#}");
            }
        });
    }

    async fn dial_once(self: &Arc<Self>, addr: &str) -> anyhow::Result<()> {
        let sock: SocketAddr = resolve(addr).await?;
        let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let connecting = self
            .endpoint
            .connect_with(self.client_config.clone(), sock, host)?;
        let conn = tokio::time::timeout(Duration::from_secs(5), connecting).await??;
        let me = self.me.clone();
        self.run_link(conn, me).await
    }

    /// Takes over an accepted connection with the peer ALPN.
    pub fn accept(self: &Arc<Self>, conn: quinn::Connection) {
        // The TLS layer verified any certificate presented; a peer must present one.
        if conn.peer_identity().is_none() {
            metrics::counter!("shoal_peer_refused_total", "reason" => "no_certificate")
                .increment(1);
            tracing::warn!(remote = %conn.remote_address(), "peer link without a cluster certificate refused");
            conn.close(CLOSE_UNAUTHENTICATED, b"peer certificate required");
            return;
        }
        let links = Arc::clone(self);
        tokio::spawn(async move {
            // The dialer is the remote; its id is learned from its hello.
            if let Err(e) = links.run_link(conn, NodeId::new("")).await {
                tracing::debug!("peer link ended: {e:#}");
            }
        });
    }

    /// Exchanges hellos on a fresh connection, registers the link and pumps it.
    /// `dialed_by` is our id when we dialed; empty when the remote dialed.
    async fn run_link(
        self: &Arc<Self>,
        conn: quinn::Connection,
        dialed_by: NodeId,
    ) -> anyhow::Result<()> {
        let mut send = conn.open_uni().await?;
        let hello = PeerHello {
            node_id: self.me.clone(),
            addr: self.my_addr.clone(),
            version: PEER_PROTOCOL_VERSION,
            incarnation: self.incarnation,
            shape: self.shape,
        };
        write_frame(&mut send, &hello, self.max_frame).await?;
        let mut recv = tokio::time::timeout(Duration::from_secs(5), conn.accept_uni()).await??;
        let their: PeerHello = tokio::time::timeout(
            Duration::from_secs(5),
            read_frame(&mut recv, self.max_frame),
        )
        .await??
        .ok_or_else(|| anyhow::anyhow!("peer closed before its hello"))?;
        anyhow::ensure!(
            their.version == PEER_PROTOCOL_VERSION,
            "peer speaks version {}",
            their.version
        );
        if their.node_id == self.me {
            conn.close(CLOSE_DUPLICATE, b"self");
            return Ok(());
        }
        let dialed_by = if dialed_by.0.is_empty() {
            their.node_id.clone()
        } else {
            dialed_by
        };
        let (tx, mut rx) = mpsc::channel::<M>(self.queue);
        {
            let mut links = lock(&self.links);
            if let Some(existing) = links.get(&their.node_id) {
                // Two links between the same pair of processes: keep the one dialed by
                // the lower id. A link from a new incarnation of the peer always wins:
                // the old process is gone even if its link has not timed out yet.
                let same_process = existing.incarnation == their.incarnation;
                let keep_existing = same_process
                    && existing.dialed_by <= dialed_by
                    && existing.conn.close_reason().is_none();
                if keep_existing {
                    drop(links);
                    conn.close(CLOSE_DUPLICATE, b"duplicate link");
                    return Ok(());
                }
                existing.conn.close(CLOSE_DUPLICATE, b"duplicate link");
            }
            links.insert(
                their.node_id.clone(),
                Link {
                    conn: conn.clone(),
                    tx,
                    dialed_by,
                    incarnation: their.incarnation,
                },
            );
        }
        let peer = their.node_id.clone();
        let compact = their.shape == self.shape && self.shape != 0;
        tracing::info!(%peer, addr = %their.addr, compact, "peer link up");
        let _ = self.events.send(LinkEvent::Up {
            id: peer.clone(),
            addr: their.addr.clone(),
        });

        let max = self.max_frame;
        let append = if compact {
            M::append_compact
        } else {
            |msg: &M, out: &mut Vec<u8>, max| shoal_proto::append_frame(out, msg, max)
        };
        let writer = tokio::spawn(async move {
            let mut buf = Vec::with_capacity(64 * 1024);
            while let Some(msg) = rx.recv().await {
                buf.clear();
                let mut next = Some(msg);
                while let Some(msg) = next.take() {
                    if let Err(e) = append(&msg, &mut buf, max) {
                        tracing::warn!("peer message not sent: {e}");
                    }
                    if buf.len() < 256 * 1024 {
                        next = rx.try_recv().ok();
                    }
                }
                if send.write_all(&buf).await.is_err() {
                    return;
                }
            }
        });
        // One buffer for the link: a read takes every message that has arrived.
        let mut frames = FrameReader::new(&mut recv, max);
        let mut keys = ServiceKeyCache::new(crate::peer_codec::LINK_SERVICE_KEYS);
        let result = loop {
            match frames
                .next_with(|body| M::decode_body(body, &mut keys))
                .await
            {
                Ok(Some(msg)) => {
                    self.note_activity(&peer);
                    let _ = self.events.send(LinkEvent::Message {
                        from: peer.clone(),
                        msg,
                    });
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(anyhow::Error::from(e)),
            }
        };
        writer.abort();
        let removed = {
            let mut links = lock(&self.links);
            match links.get(&peer) {
                Some(l) if l.conn.stable_id() == conn.stable_id() => {
                    links.remove(&peer);
                    true
                }
                _ => false,
            }
        };
        if removed {
            tracing::info!(%peer, "peer link down");
            let _ = self.events.send(LinkEvent::Down { id: peer });
        }
        result
    }
}

async fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(a) = addr.parse() {
        return Ok(a);
    }
    tokio::net::lookup_host(addr)
        .await?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{addr} resolves to nothing"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message as a newer node has it: one field more than [`Older`].
    #[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
    struct Newer {
        a: u32,
        b: String,
        #[serde(default)]
        c: u32,
    }

    impl PeerCodec for Newer {}

    /// The same message as an older node has it.
    #[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
    struct Older {
        a: u32,
        b: String,
    }

    impl PeerCodec for Older {}

    /// Links of node `id` with its own endpoint on loopback, accepting peer links.
    fn node<M>(dir: &std::path::Path, id: &str, shape: u32) -> (Arc<Links<M>>, LinkRx<M>, String)
    where
        M: PeerCodec + Send + 'static,
    {
        let files = crate::tls::issue_dev_cert(&dir.join("ca"), &dir.join(id), id, &[]).unwrap();
        let tls = crate::tls::server_config(&files, &[shoal_proto::PEER_ALPN]).unwrap();
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
        let endpoint = quinn::Endpoint::server(
            quinn::ServerConfig::with_crypto(Arc::new(crypto)),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let addr = endpoint.local_addr().unwrap().to_string();
        let client = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(
                crate::tls::peer_client_config(&files).unwrap(),
            )
            .unwrap(),
        ));
        let (links, rx) = Links::new(
            NodeId(id.into()),
            addr.clone(),
            endpoint.clone(),
            client,
            1 << 20,
            64,
        );
        let mut links = Arc::try_unwrap(links).ok().expect("not shared yet");
        links.shape = shape;
        let links = Arc::new(links);
        let accepting = Arc::clone(&links);
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                if let Ok(conn) = incoming.await {
                    accepting.accept(conn);
                }
            }
        });
        (links, rx, addr)
    }

    type LinkRx<M> = mpsc::UnboundedReceiver<LinkEvent<M>>;

    /// The next message on `rx`, skipping link events (10 s at most).
    async fn next_message<M: std::fmt::Debug>(rx: &mut LinkRx<M>) -> M {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(LinkEvent::Message { msg, .. })) => return msg,
                Ok(Some(_)) => continue,
                other => panic!("no message: {other:?}"),
            }
        }
    }

    /// Sends `msg` once the link to `to` is up (10 s at most).
    async fn send_when_linked<M>(links: &Links<M>, to: &str, msg: M)
    where
        M: PeerCodec + Send + Clone + 'static,
    {
        let to = NodeId(to.into());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !links.send(&to, msg.clone()) {
            assert!(std::time::Instant::now() < deadline, "no link to {to}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn scratch_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "shoal-peer-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A node of the current shape and an older one (shape 0: maps only) talk in maps,
    /// which the older one reads although its message lacks a field.
    #[tokio::test]
    async fn a_link_to_an_older_node_carries_maps() {
        let dir = scratch_dir("older");
        let (newer, _newer_rx, _) = node::<Newer>(&dir, "newer", PEER_MESSAGE_SHAPE);
        let (_older, mut older_rx, older_addr) = node::<Older>(&dir, "older", 0);
        newer.dial(older_addr);
        let msg = Newer {
            a: 1,
            b: "x".into(),
            c: 3,
        };
        send_when_linked(&newer, "older", msg).await;
        assert_eq!(
            next_message(&mut older_rx).await,
            Older {
                a: 1,
                b: "x".into()
            }
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A frame counts as activity of its sender as soon as the link has read it,
    /// before the node takes the message from its queue: a node whose own queue is
    /// behind still hears from its peers (`Replica::link_activity`).
    #[tokio::test]
    async fn a_frame_read_is_activity_before_the_node_takes_it() {
        let dir = scratch_dir("activity");
        let (a, _a_rx, _) = node::<Older>(&dir, "a", PEER_MESSAGE_SHAPE);
        let (b, mut b_rx, b_addr) = node::<Older>(&dir, "b", PEER_MESSAGE_SHAPE);
        assert!(b.activity().is_empty(), "nothing read yet");
        a.dial(b_addr);
        let msg = Older {
            a: 7,
            b: "queued".into(),
        };
        let sent = std::time::Instant::now();
        send_when_linked(&a, "b", msg.clone()).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let heard = loop {
            if let Some((_, at)) = b.activity().into_iter().find(|(id, _)| id.as_str() == "a") {
                break at;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no activity of a noted"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert!(heard >= sent, "the activity is the frame's arrival");
        // The message itself still waits for the node, which had not taken it.
        assert_eq!(next_message(&mut b_rx).await, msg);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Two nodes of the same shape talk in arrays: a reader whose message has a field
    /// less but announces the same shape cannot read them (which is why the shape must
    /// change with the fields), while one of the same fields reads them whole.
    #[tokio::test]
    async fn a_link_between_nodes_of_one_shape_carries_arrays() {
        let dir = scratch_dir("same");
        let (a, _a_rx, _) = node::<Newer>(&dir, "a", PEER_MESSAGE_SHAPE);
        let (_b, mut b_rx, b_addr) = node::<Newer>(&dir, "b", PEER_MESSAGE_SHAPE);
        let (_c, mut c_rx, c_addr) = node::<Older>(&dir, "c", PEER_MESSAGE_SHAPE);
        a.dial(b_addr);
        a.dial(c_addr);
        let msg = Newer {
            a: 1,
            b: "x".into(),
            c: 3,
        };
        send_when_linked(&a, "b", msg.clone()).await;
        assert_eq!(next_message(&mut b_rx).await, msg);
        send_when_linked(&a, "c", msg).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            match tokio::time::timeout_at(deadline, c_rx.recv()).await {
                Ok(Some(LinkEvent::Message { msg, .. })) => {
                    panic!("an array with an extra field was read: {msg:?}")
                }
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A forward message carrying the runs of several sessions is, on the wire, the
    /// message of one run holding all their writes, in both shapes: a peer of any
    /// version reads it as before, and reads it back as one run.
    #[test]
    fn runs_of_writes_go_as_one_sequence() {
        use shoal_replication::{PeerMsg, Write, WriteRuns};
        use shoal_storage::{InstanceSpec, ServiceKey, SessionId};
        let write = |port| Write::Register {
            service: ServiceKey::named("orders"),
            instance: InstanceSpec::new("10.0.0.1", port),
            session: SessionId(port.into()),
        };
        let msg = |writes| PeerMsg::ForwardMany {
            id: 7,
            writes,
            sent_ms: 9,
        };
        let runs = msg(WriteRuns(vec![
            Arc::new(vec![write(1), write(2)]),
            Arc::new(vec![write(3)]),
        ]));
        let one = msg(WriteRuns::one(Arc::new(vec![write(1), write(2), write(3)])));
        for append in [
            shoal_proto::append_frame::<PeerMsg>,
            shoal_proto::append_frame_compact::<PeerMsg>,
        ] {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            append(&mut a, &runs, 1 << 20).unwrap();
            append(&mut b, &one, 1 << 20).unwrap();
            assert_eq!(a, b);
            let back: PeerMsg = shoal_proto::decode(&a[shoal_proto::LEN_PREFIX_BYTES..]).unwrap();
            assert_eq!(back, one);
        }
    }
}
