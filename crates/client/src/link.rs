//! One connection to one node: the handshake, the session stream, and the two tasks
//! that write and read it.
//!
//! A link lives as long as its QUIC connection. When the stream or the connection
//! fails, the reader marks the link dead and fails every call in flight with
//! [`ClientError::Disconnected`]; the client's supervisor then opens a new link. A link
//! never reconnects by itself.

use foldhash::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_proto::{
    encode_frame, encode_request_compact, encode_write_compact, read_frame, write_frame,
    ClientFrameRef, ErrorBody, FrameReader, Hello, Request, RequestId, Response, ServerFrame,
    Welcome, WriteRef, REQUEST_SHAPE,
};
use shoal_storage::ServiceKey;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::error::{ClientError, Result};
use crate::subscription::SubscriptionCache;

/// QUIC application close code: the client ended the session with Goodbye.
pub(crate) const CLOSE_GOODBYE: u32 = 0;
/// QUIC application close code: the client dropped the connection without Goodbye
/// (`disconnect_abruptly`, `close_abruptly`); the node keeps the session for its grace
/// period.
pub(crate) const CLOSE_ABRUPT: u32 = 1;
/// QUIC application close code: the client saw the session stream fail.
pub(crate) const CLOSE_STREAM_FAILED: u32 = 2;
/// QUIC application close code: a request waited and the node sent nothing at all, not
/// even an acknowledgement of a probe; the client gave up on the connection and resumes
/// its session elsewhere (see [`watch_calls`]).
pub(crate) const CLOSE_UNRESPONSIVE: u32 = 3;

/// Frames waiting for the writer task. Bounded so that a stalled connection pushes
/// back on callers instead of growing without limit.
const OUTBOX_FRAMES: usize = 1024;

/// A call that has waited this long with nothing at all received from its node makes
/// the link probe the node (see [`watch_calls`]).
const SILENCE_BEFORE_PROBE: Duration = Duration::from_secs(2);
/// How long a probed node has to send anything before the link gives up on it.
const PROBE_PATIENCE: Duration = Duration::from_millis(1_500);
/// How often the watchdog of a link with calls waiting looks at them: a call's
/// deadline is kept to within this.
const WATCH_TICK: Duration = Duration::from_millis(100);

/// The answer a call waits for.
pub(crate) type Answer = std::result::Result<Response, ErrorBody>;

/// What a call's receiver gets: the node's answer, or `None` when the call's deadline
/// passed first.
pub(crate) type Reply = Option<Answer>;

struct Pending {
    tx: oneshot::Sender<Reply>,
    kind: CallKind,
    deadline: Instant,
}

/// What the reader must do with an answer before handing it over.
enum CallKind {
    /// Cache the view of this service first, in stream order, before any later Push.
    Subscribe(ServiceKey),
    /// Mark the link as ended by Goodbye first, so that the supervisor does not
    /// reconnect when the node then closes the connection.
    Goodbye,
    /// Nothing.
    Plain,
}

#[derive(Default)]
struct Calls {
    /// Set by the reader when it stops: no call may be added after that.
    closed: bool,
    waiting: HashMap<RequestId, Pending>,
}

/// What a call sends: any request, or a registration or deregistration by reference
/// (encoded from the caller's own copy of the instance, not from a request built for it).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Body<'a> {
    Request(&'a Request),
    Write(WriteRef<'a>),
}

/// An open session stream on one connection.
pub(crate) struct Link {
    /// The configured address (`host:port`) this link connected to.
    pub(crate) addr: String,
    /// The node's answer to Hello.
    pub(crate) welcome: Welcome,
    conn: quinn::Connection,
    max_frame_bytes: usize,
    outbox: mpsc::Sender<Vec<u8>>,
    calls: Mutex<Calls>,
    /// Woken when a call starts waiting on a link that had none: the watchdog then
    /// watches until none waits again.
    busy: Notify,
    dead: watch::Sender<bool>,
    /// The node answered Goodbye: the session is over and must not be resumed.
    ended: AtomicBool,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("addr", &self.addr)
            .field("node", &self.welcome.node_id)
            .field("session", &self.welcome.session_id)
            .finish_non_exhaustive()
    }
}

/// What one connection attempt needs.
pub(crate) struct Dial<'a> {
    pub(crate) endpoint: &'a quinn::Endpoint,
    pub(crate) quinn: quinn::ClientConfig,
    pub(crate) addr: &'a str,
    pub(crate) socket: SocketAddr,
    pub(crate) server_name: &'a str,
    pub(crate) hello: Hello,
    pub(crate) max_frame_bytes: usize,
    pub(crate) timeout: Duration,
}

impl Link {
    /// Connects, opens the session stream, says Hello and waits for Welcome, all
    /// within `dial.timeout`; then starts the writer and reader tasks.
    pub(crate) async fn open(dial: Dial<'_>, cache: Arc<SubscriptionCache>) -> Result<Arc<Link>> {
        let timeout = dial.timeout;
        match tokio::time::timeout(timeout, Self::handshake(&dial)).await {
            Ok(Ok((conn, send, recv, welcome))) => {
                Ok(Self::start(dial, conn, send, recv, welcome, cache))
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ClientError::Connect(format!(
                "no answer within {timeout:?} (is a node listening on {}?)",
                dial.socket
            ))),
        }
    }

    async fn handshake(
        dial: &Dial<'_>,
    ) -> Result<(
        quinn::Connection,
        quinn::SendStream,
        quinn::RecvStream,
        Welcome,
    )> {
        let connecting = dial
            .endpoint
            .connect_with(dial.quinn.clone(), dial.socket, dial.server_name)
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        let conn = connecting
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        write_frame(
            &mut send,
            &ClientFrameRef::Hello(&dial.hello),
            dial.max_frame_bytes,
        )
        .await
        .map_err(|e| ClientError::Connect(format!("sending Hello: {e}")))?;
        let first: Option<ServerFrame> = read_frame(&mut recv, dial.max_frame_bytes)
            .await
            .map_err(|e| ClientError::Connect(format!("reading Welcome: {e}")))?;
        match first {
            Some(ServerFrame::Welcome(w)) => Ok((conn, send, recv, w)),
            Some(ServerFrame::Error(body)) => {
                conn.close(CLOSE_STREAM_FAILED.into(), b"refused");
                Err(ClientError::Server(body))
            }
            Some(other) => {
                conn.close(CLOSE_STREAM_FAILED.into(), b"protocol");
                Err(ClientError::Protocol(format!(
                    "expected Welcome, got {other:?}"
                )))
            }
            None => Err(ClientError::Connect(
                "the node closed the stream before Welcome".into(),
            )),
        }
    }

    fn start(
        dial: Dial<'_>,
        conn: quinn::Connection,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        welcome: Welcome,
        cache: Arc<SubscriptionCache>,
    ) -> Arc<Link> {
        let (outbox, rx) = mpsc::channel(OUTBOX_FRAMES);
        let max_frame_bytes = dial
            .max_frame_bytes
            .min(welcome.max_frame_bytes as usize)
            .max(1024);
        let link = Arc::new(Link {
            addr: dial.addr.to_string(),
            welcome,
            conn: conn.clone(),
            max_frame_bytes,
            outbox,
            calls: Mutex::new(Calls::default()),
            busy: Notify::new(),
            dead: watch::channel(false).0,
            ended: AtomicBool::new(false),
        });
        let writer = tokio::spawn(write_loop(send, rx, conn));
        tokio::spawn(watch_calls(link.clone()));
        tokio::spawn(read_loop(
            link.clone(),
            recv,
            dial.max_frame_bytes,
            cache,
            writer,
        ));
        link
    }

    fn calls(&self) -> std::sync::MutexGuard<'_, Calls> {
        // Every critical section is a single map operation: a panic inside one cannot
        // leave the map half-changed, so a poisoned lock is still consistent.
        self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends a request and returns where its answer will arrive: the answer, or `None`
    /// once `deadline` has passed without one (the link's watchdog, within
    /// [`WATCH_TICK`]). Fails with [`ClientError::Disconnected`] if the link is dead,
    /// and with [`ClientError::Frame`] if the request is larger than the node accepts.
    /// If the link dies first, the receiver fails (its sender is dropped).
    pub(crate) async fn start_call(
        &self,
        id: RequestId,
        body: Body<'_>,
        deadline: Instant,
    ) -> Result<oneshot::Receiver<Reply>> {
        // Encoded by reference: the caller keeps the request to retry it. A node of
        // this SDK's request shape reads structs as arrays: sent so, without field
        // names (docs/protocol.md, "Requests as arrays"), writes encoded by hand.
        let compact = self.welcome.request_shape == REQUEST_SHAPE;
        let bytes = match body {
            Body::Write(write) if compact => encode_write_compact(id, write, self.max_frame_bytes)?,
            Body::Request(body) if compact => {
                encode_request_compact(id, body, self.max_frame_bytes)?
            }
            Body::Write(write) => encode_frame(
                &ClientFrameRef::Request {
                    id,
                    body: &write.to_request(),
                },
                self.max_frame_bytes,
            )?,
            Body::Request(body) => {
                encode_frame(&ClientFrameRef::Request { id, body }, self.max_frame_bytes)?
            }
        };
        let kind = match body {
            Body::Request(Request::Subscribe { service }) => CallKind::Subscribe(service.clone()),
            Body::Request(Request::Goodbye) => CallKind::Goodbye,
            _ => CallKind::Plain,
        };
        let (tx, rx) = oneshot::channel();
        {
            let mut calls = self.calls();
            if calls.closed {
                return Err(ClientError::Disconnected);
            }
            if calls.waiting.is_empty() {
                self.busy.notify_one();
            }
            calls.waiting.insert(id, Pending { tx, kind, deadline });
        }
        if self.outbox.send(bytes).await.is_err() {
            self.forget(id);
            return Err(ClientError::Disconnected);
        }
        Ok(rx)
    }

    /// Sends a request and waits for its answer, at most `timeout`.
    pub(crate) async fn call(
        &self,
        id: RequestId,
        body: &Request,
        timeout: Duration,
    ) -> Result<Response> {
        let rx = self
            .start_call(id, Body::Request(body), Instant::now() + timeout)
            .await?;
        match rx.await {
            Ok(Some(answer)) => answer.map_err(ClientError::Server),
            Ok(None) => Err(ClientError::Timeout(timeout)),
            Err(_) => Err(ClientError::Disconnected),
        }
    }

    /// Stops waiting for a call (its request could not be sent).
    fn forget(&self, id: RequestId) {
        self.calls().waiting.remove(&id);
    }

    /// True once the session stream or the connection has failed.
    pub(crate) fn is_dead(&self) -> bool {
        *self.dead.borrow()
    }

    /// True once the node answered Goodbye on this link: the session is over.
    pub(crate) fn ended_by_goodbye(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    /// Waits until the link is dead.
    pub(crate) async fn wait_dead(&self) {
        let mut rx = self.dead.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|dead| *dead).await;
    }

    /// UDP datagrams received on this connection so far: anything at all the node
    /// sent (answers, pushes, heartbeats, acknowledgements).
    pub(crate) fn packets_received(&self) -> u64 {
        self.conn.stats().udp_rx.datagrams
    }

    /// Sends the node a one-byte datagram, which it ignores but its QUIC stack
    /// acknowledges within its acknowledgement delay (25 ms) if it is alive.
    pub(crate) fn probe(&self) {
        let _ = self.conn.send_datagram(bytes::Bytes::from_static(&[0]));
    }

    /// Closes the QUIC connection with an application code. The reader then stops
    /// and marks the link dead.
    pub(crate) fn close(&self, code: u32, reason: &[u8]) {
        self.conn.close(code.into(), reason);
    }

    /// Marks the link dead and fails every call in flight.
    fn mark_dead(&self) {
        let waiting = {
            let mut calls = self.calls();
            calls.closed = true;
            std::mem::take(&mut calls.waiting)
        };
        // Dropping the senders wakes each caller with Disconnected.
        drop(waiting);
        self.dead.send_replace(true);
    }

    fn answer(&self, id: RequestId, result: Answer, cache: &SubscriptionCache) {
        let pending = self.calls().waiting.remove(&id);
        let Some(pending) = pending else {
            debug!(id, "answer to a request nobody waits for (timed out)");
            return;
        };
        match (&pending.kind, &result) {
            (CallKind::Subscribe(key), Ok(Response::View(view))) => {
                cache.apply(key, view.clone());
            }
            (CallKind::Goodbye, Ok(_)) => self.ended.store(true, Ordering::SeqCst),
            _ => {}
        }
        let _ = pending.tx.send(Some(result));
    }

    /// Ends the calls whose deadline has passed (their receivers get `None`); says
    /// whether any call still waits.
    fn expire(&self, now: Instant) -> bool {
        let (expired, waiting) = {
            let mut calls = self.calls();
            let ids: Vec<RequestId> = calls
                .waiting
                .iter()
                .filter(|(_, p)| p.deadline <= now)
                .map(|(&id, _)| id)
                .collect();
            let expired: Vec<Pending> = ids
                .iter()
                .filter_map(|id| calls.waiting.remove(id))
                .collect();
            (expired, !calls.waiting.is_empty())
        };
        for pending in expired {
            let _ = pending.tx.send(None);
        }
        waiting
    }
}

/// The link's watchdog: one timer for every call on the link, instead of one per
/// call. While any call waits it looks every [`WATCH_TICK`]: it ends the calls whose
/// deadline has passed, probes a node that has sent nothing at all for
/// [`SILENCE_BEFORE_PROBE`] with a datagram, and gives up on one that still sends
/// nothing for [`PROBE_PATIENCE`] (the connection is closed with
/// `CLOSE_UNRESPONSIVE`, so the calls fail with `Disconnected` and are retried on the
/// next link). A live node acknowledges any packet within milliseconds even when an
/// answer itself takes long, so only a dead or frozen node is given up; an idle client
/// still relies on the QUIC idle timeout (12 s by default), but one waiting for an
/// answer notices within about 3.5 s. With no call waiting it sleeps until one starts.
async fn watch_calls(link: Arc<Link>) {
    let mut dead = link.dead.subscribe();
    loop {
        tokio::select! {
            _ = link.busy.notified() => {}
            _ = dead.wait_for(|d| *d) => return,
        }
        let mut heard = link.packets_received();
        let mut quiet_since = Instant::now();
        let mut probed = false;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(WATCH_TICK) => {}
                _ = dead.wait_for(|d| *d) => return,
            }
            let now = Instant::now();
            if !link.expire(now) {
                break;
            }
            let packets = link.packets_received();
            if packets != heard {
                heard = packets;
                quiet_since = now;
                probed = false;
            } else if !probed && now >= quiet_since + SILENCE_BEFORE_PROBE {
                link.probe();
                probed = true;
            } else if probed && now >= quiet_since + SILENCE_BEFORE_PROBE + PROBE_PATIENCE {
                warn!(
                    node = %link.addr,
                    "the node sent nothing for {:?} while a request waited; giving up on the connection",
                    SILENCE_BEFORE_PROBE + PROBE_PATIENCE
                );
                // The reader then marks the link dead, which fails every call with
                // Disconnected.
                link.close(CLOSE_UNRESPONSIVE, b"unresponsive");
                return;
            }
        }
    }
}

/// At most this many bytes of queued frames are gathered into one write.
const COALESCE_BYTES: usize = 64 << 10;

async fn write_loop(
    mut send: quinn::SendStream,
    mut rx: mpsc::Receiver<Vec<u8>>,
    conn: quinn::Connection,
) {
    // Frames queued while the last write went out leave together in one write.
    let mut buf = Vec::new();
    while let Some(first) = rx.recv().await {
        let bytes = if rx.is_empty() {
            &first[..]
        } else {
            buf.clear();
            buf.extend_from_slice(&first);
            while buf.len() < COALESCE_BYTES {
                match rx.try_recv() {
                    Ok(more) => buf.extend_from_slice(&more),
                    Err(_) => break,
                }
            }
            &buf[..]
        };
        if let Err(e) = send.write_all(bytes).await {
            debug!(error = %e, "session stream write failed");
            conn.close(CLOSE_STREAM_FAILED.into(), b"write failed");
            return;
        }
    }
    // Every sender is gone: the link was dropped. End the stream politely.
    let _ = send.finish();
}

async fn read_loop(
    link: Arc<Link>,
    recv: quinn::RecvStream,
    max_frame_bytes: usize,
    cache: Arc<SubscriptionCache>,
    writer: tokio::task::JoinHandle<()>,
) {
    // One buffer for the stream's life: a read takes every frame that has arrived, and
    // answers and pushes are decoded from it by the fast path.
    let mut frames = FrameReader::new(recv, max_frame_bytes);
    loop {
        match frames.next_server_frame().await {
            Ok(Some(ServerFrame::Response { id, result })) => link.answer(id, result, &cache),
            Ok(Some(ServerFrame::Push(view))) => {
                cache.apply_push(view);
            }
            Ok(Some(ServerFrame::Error(body))) => {
                warn!(node = %link.welcome.node_id, error = %body, "node ended the session stream");
                break;
            }
            Ok(Some(ServerFrame::Welcome(_))) => {
                warn!(node = %link.welcome.node_id, "unexpected second Welcome; ignored");
            }
            Ok(None) => {
                debug!(node = %link.welcome.node_id, "node closed the session stream");
                break;
            }
            Err(e) => {
                debug!(node = %link.welcome.node_id, error = %e, "session stream failed");
                break;
            }
        }
    }
    link.mark_dead();
    writer.abort();
    link.close(CLOSE_STREAM_FAILED, b"session stream ended");
}
