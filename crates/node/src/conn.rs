//! One client connection: the session stream, its requests and its pushes.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use shoal_proto::{
    decode_client_frame, read_frame, ClientFrame, ErrorBody, ErrorCode, FrameError, FrameReader,
    Hello, Request, Response, ServerFrame, Welcome, PROTOCOL_VERSION,
};
use shoal_replication::Write;
use shoal_storage::{ServiceKey, SessionId};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::metrics::Kind;
use crate::query_cache::{cacheable, QueryKey};
use crate::server::{CLOSE_NORMAL, CLOSE_PROTOCOL, CLOSE_STALLED};
use crate::state::{lock, read, ConnId, Outbox, Outgoing, Shared};

/// How long a new connection may take to open its session stream and say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one accepted connection until it ends.
pub async fn serve(shared: Arc<Shared>, conn: quinn::Connection) {
    let conn_id = shared.next_conn_id();
    let remote = conn.remote_address();
    let span = tracing::info_span!("conn", node = %shared.node_id, conn = conn_id, %remote);
    async move {
        let (send, mut recv) = match tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!("connection ended before its session stream: {e}");
                return;
            }
            Err(_) => {
                conn.close(CLOSE_PROTOCOL, b"no session stream");
                return;
            }
        };
        let max = shared.config.max_frame_bytes;
        let (tx, rx) = mpsc::channel(shared.config.outbound_queue_frames);
        let outbox = Outbox {
            tx,
            conn: conn.clone(),
        };
        let writer = tokio::spawn(write_loop(send, rx, max));
        tokio::spawn(refuse_extra_streams(conn.clone(), max));

        let hello =
            tokio::time::timeout(HELLO_TIMEOUT, read_frame::<ClientFrame, _>(&mut recv, max)).await;
        let hello = match hello {
            Ok(Ok(Some(ClientFrame::Hello(h)))) => h,
            Ok(Ok(Some(ClientFrame::Request { .. }))) => {
                return refuse(
                    outbox,
                    writer,
                    ErrorCode::ProtocolViolation,
                    "the first frame must be Hello",
                )
                .await;
            }
            Ok(Ok(None)) => return,
            Ok(Err(e)) => return refuse_frame(outbox, writer, e).await,
            Err(_) => {
                return refuse(
                    outbox,
                    writer,
                    ErrorCode::ProtocolViolation,
                    "no Hello in time",
                )
                .await;
            }
        };
        if hello.version != PROTOCOL_VERSION {
            let msg = format!(
                "protocol version {} is not supported; this node speaks {PROTOCOL_VERSION}",
                hello.version
            );
            return refuse(outbox, writer, ErrorCode::UnsupportedVersion, &msg).await;
        }
        if !shared.is_ready() {
            return refuse(outbox, writer, ErrorCode::NotReady, "node is not ready").await;
        }
        let session = open_session(&shared, &hello, conn_id, &outbox);
        lock(&shared.session_conns).insert(conn_id, conn.clone());
        let span = tracing::info_span!("session", %session, client = %hello.client_name);
        let end = request_loop(&shared, conn_id, session, &outbox, &mut recv)
            .instrument(span)
            .await;
        lock(&shared.session_conns).remove(&conn_id);
        // After a Goodbye this is a no-op: the session was closed before its answer.
        shared.detach(session, conn_id, end == SessionEnd::Goodbye);
        metrics::gauge!("shoal_connections").decrement(1.0);
        // Let the writer flush what is queued (a Goodbye's answer, an error).
        let conn = outbox.conn.clone();
        drop(outbox);
        let _ = tokio::time::timeout(Duration::from_secs(3), writer).await;
        match end {
            SessionEnd::Violation => conn.close(CLOSE_PROTOCOL, b"protocol violation"),
            SessionEnd::Goodbye | SessionEnd::Lost => conn.close(CLOSE_NORMAL, b"bye"),
            SessionEnd::Stalled => conn.close(CLOSE_STALLED, b"node stalled; reconnect"),
        }
    }
    .instrument(span)
    .await
}

fn open_session(
    shared: &Arc<Shared>,
    hello: &Hello,
    conn_id: ConnId,
    outbox: &Outbox,
) -> SessionId {
    let session = hello
        .resume
        .unwrap_or_else(|| SessionId(rand::random::<u128>()));
    let attached = shared.attach(session, conn_id);
    metrics::gauge!("shoal_connections").increment(1.0);
    metrics::counter!("shoal_sessions_opened_total", "resumed" => if attached.resumed { "true" } else { "false" }).increment(1);
    tracing::debug!(%session, resumed = attached.resumed, "session attached");
    crate::state::push(
        outbox,
        ServerFrame::Welcome(Welcome {
            session_id: session,
            resumed: attached.resumed,
            node_id: shared.node_id.clone(),
            session_grace_ms: shared.config.session_grace_ms,
            max_frame_bytes: shared.config.max_frame_bytes as u32,
            request_shape: shoal_proto::REQUEST_SHAPE,
        }),
    );
    session
}

/// How a session stream ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SessionEnd {
    /// The client said Goodbye: its instances go now.
    Goodbye,
    /// The stream or connection was lost: the session may resume within its grace.
    Lost,
    /// The client broke the protocol (it was told why); treated as lost for the
    /// session, closed with the protocol-violation code.
    Violation,
    /// This node stalled (see [`Shared::stall_epoch`]): treated as lost for the
    /// session; closed so that the client reconnects.
    Stalled,
}

/// Reads and answers requests until the session stream ends.
async fn request_loop(
    shared: &Arc<Shared>,
    conn_id: ConnId,
    session: SessionId,
    outbox: &Outbox,
    recv: &mut quinn::RecvStream,
) -> SessionEnd {
    let max = shared.config.max_frame_bytes;
    let mut subscriptions: HashSet<ServiceKey> = HashSet::new();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_FORWARDS_IN_FLIGHT));
    let era = shared.stall_epoch(shared.now_ms());
    // One buffer for the stream: a read takes every frame that has arrived, up to
    // SESSION_READ_BYTES (a node may hold tens of thousands of sessions).
    let mut frames = FrameReader::with_read_bytes(recv, max, SESSION_READ_BYTES);
    // A frame read while gathering a run of writes, served next.
    let mut held: Option<Result<ClientFrame, FrameError>> = None;
    let end = loop {
        let next = match held.take() {
            Some(frame) => frame.map(Some),
            None => {
                frames
                    .next_with(|b| decode_client_frame(b, &mut lock(&shared.client_keys)))
                    .await
            }
        };
        let frame = match next {
            Ok(Some(f)) => f,
            Ok(None) => break SessionEnd::Lost,
            Err(e) => {
                if refuse_frame_now(outbox, e) {
                    break SessionEnd::Violation;
                }
                break SessionEnd::Lost;
            }
        };
        let (id, body) = match frame {
            ClientFrame::Request { id, body } => (id, body),
            ClientFrame::Hello(_) => {
                send_error(
                    outbox,
                    ErrorCode::ProtocolViolation,
                    "Hello may come only once",
                );
                break SessionEnd::Violation;
            }
        };
        if shared.stall_epoch(shared.now_ms()) != era {
            // This node stalled since the session's connection opened: the request
            // may have waited out the stall, and its client have moved on. Close; a
            // client that is still there reconnects and re-asserts its instances.
            metrics::counter!("shoal_requests_refused_after_stall_total").increment(1);
            break SessionEnd::Stalled;
        }
        let body = match write_of(body, session) {
            Ok(first) => {
                // Writes that arrived together (one read of the stream) go as one
                // batch: applied under one lock, one message per owner.
                let mut run = vec![(id, first)];
                while run.len() < shoal_proto::MAX_BATCH_ITEMS {
                    match frames
                        .try_next_with(|b| decode_client_frame(b, &mut lock(&shared.client_keys)))
                    {
                        Some(Ok(ClientFrame::Request { id, body })) => {
                            match write_of(body, session) {
                                Ok(w) => run.push((id, w)),
                                Err(body) => {
                                    held = Some(Ok(ClientFrame::Request { id, body }));
                                    break;
                                }
                            }
                        }
                        Some(other) => {
                            held = Some(other);
                            break;
                        }
                        None => break,
                    }
                }
                if !write_run(shared, outbox, &in_flight, run).await {
                    break SessionEnd::Lost;
                }
                continue;
            }
            Err(body) => body,
        };
        let kind = request_kind(&body);
        let started = std::time::Instant::now();
        let goodbye = matches!(body, Request::Goodbye);
        if goodbye {
            // Remove the session's instances before answering, so that a client that
            // sees the answer can rely on them being gone (at least on this node).
            shared.detach(session, conn_id, true);
        }
        let result = match handle(
            shared,
            conn_id,
            session,
            outbox,
            &mut subscriptions,
            id,
            body,
        ) {
            Handled::Now(result) => result,
            Handled::Encoded(result) => {
                observe_ok(kind, started);
                if outbox
                    .tx
                    .send(Outgoing::Answer { id, result })
                    .await
                    .is_err()
                {
                    break SessionEnd::Lost;
                }
                continue;
            }
            Handled::Forwarded(pending) => {
                // The owner answers later; meanwhile this session's next requests are
                // served. At most MAX_FORWARDS_IN_FLIGHT wait at once (a batch counts
                // once), then reading the stream waits too (back-pressure on the
                // client).
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    break SessionEnd::Lost;
                };
                let shared = shared.clone();
                let tx = outbox.tx.clone();
                tokio::spawn(async move {
                    let result = crate::cluster::finish_many(&shared, pending).await;
                    observe(kind, started, &result);
                    let _ = tx.send(ServerFrame::Response { id, result }.into()).await;
                    drop(permit);
                });
                continue;
            }
        };
        if let Some(result) = result {
            observe(kind, started, &result);
            if outbox
                .tx
                .send(ServerFrame::Response { id, result }.into())
                .await
                .is_err()
            {
                break SessionEnd::Lost;
            }
        } else {
            crate::metrics::request(kind).ok.increment(1);
        }
        if goodbye {
            break SessionEnd::Goodbye;
        }
    };
    shared.unsubscribe_all(conn_id, &subscriptions);
    end
}

/// What a session's reader keeps between frames: a page, so that 10 000 sessions keep
/// at most 40 MB (with the SDK's 64 KiB, up to 640 MB once their clients had sent that
/// much). A larger frame (a RegisterMany) grows it until that frame is taken.
const SESSION_READ_BYTES: usize = 4 << 10;

/// Forwarded writes of one session that may wait for their owners' answers at once.
const MAX_FORWARDS_IN_FLIGHT: usize = 1024;

/// What [`handle`] did with a request.
enum Handled {
    /// The answer (`None` when it was already queued: Subscribe).
    Now(Option<Result<Response, ErrorBody>>),
    /// A batch of writes forwarded to their owners: the answer comes later.
    Forwarded(crate::cluster::PendingMany),
    /// A successful answer, already encoded (a query answered from the cache).
    Encoded(crate::query_cache::EncodedAnswer),
}

fn observe(kind: Kind, started: std::time::Instant, result: &Result<Response, ErrorBody>) {
    if result.is_ok() {
        return observe_ok(kind, started);
    }
    let m = crate::metrics::request(kind);
    m.error.increment(1);
    m.duration.record(started.elapsed().as_secs_f64());
}

fn observe_ok(kind: Kind, started: std::time::Instant) {
    let m = crate::metrics::request(kind);
    m.ok.increment(1);
    m.duration.record(started.elapsed().as_secs_f64());
}

/// Serves one request, in the order they came. Writes are applied or sent to their
/// owner at once; a forwarded write's answer is awaited by the caller, concurrently.
fn handle(
    shared: &Arc<Shared>,
    conn_id: ConnId,
    session: SessionId,
    outbox: &Outbox,
    subscriptions: &mut HashSet<ServiceKey>,
    id: u64,
    body: Request,
) -> Handled {
    let storage_err = |e: shoal_storage::StorageError| ErrorBody::from(e);
    Handled::Now(Some(match body {
        Request::RegisterMany { items } => {
            if items.len() > shoal_proto::MAX_BATCH_ITEMS {
                return Handled::Now(Some(Err(ErrorBody::new(
                    ErrorCode::BadRequest,
                    format!(
                        "RegisterMany takes at most {} items, not {}",
                        shoal_proto::MAX_BATCH_ITEMS,
                        items.len()
                    ),
                ))));
            }
            let writes = items
                .into_iter()
                .map(|(service, instance)| Write::Register {
                    service,
                    instance,
                    session,
                })
                .collect();
            return Handled::Forwarded(crate::cluster::start_many(shared, writes));
        }
        Request::Register { .. }
        | Request::Update { .. }
        | Request::Deregister { .. }
        | Request::Beat { .. }
        | Request::SetServiceMeta { .. } => Err(ErrorBody::new(
            ErrorCode::Internal,
            "a single write reached the request handler",
        )),
        Request::Query {
            service,
            clusters,
            healthy_only,
        } => {
            return query(
                shared,
                QueryKey {
                    service,
                    clusters,
                    healthy_only,
                },
            )
        }
        Request::ListServices { namespace, group } => read(&shared.replica)
            .registry()
            .list_services(&namespace, group.as_deref())
            .map(Response::Services)
            .map_err(storage_err),
        Request::Subscribe { service } => match shared.subscribe(conn_id, outbox, &service, id) {
            Ok(()) => {
                subscriptions.insert(service);
                return Handled::Now(None);
            }
            Err(e) => Err(e.into()),
        },
        Request::Unsubscribe { service } => {
            if subscriptions.remove(&service) {
                shared.unsubscribe(conn_id, &service);
                Ok(Response::Done)
            } else {
                Err(ErrorBody::new(
                    ErrorCode::BadRequest,
                    format!("not subscribed to {service}"),
                ))
            }
        }
        Request::Members => Ok(Response::Members(crate::cluster::members(shared))),
        Request::Ring { service } => {
            crate::cluster::ring(shared, service.as_ref()).map(Response::Ring)
        }
        Request::Ping | Request::Goodbye => Ok(Response::Done),
    }))
}

/// Answers a query from the cache when it holds the answer at the service's current
/// revision; otherwise reads the registry, and caches the encoded answer.
fn query(shared: &Shared, key: QueryKey) -> Handled {
    let cache = &shared.query_cache;
    let view = {
        let replica = read(&shared.replica);
        let registry = replica.registry();
        if cache.enabled() {
            // A hit implies the same query was valid at this revision: a service key,
            // clusters and namespace that passed validation then pass it now.
            if let Some(revision) = registry.service_revision(&key.service) {
                if let Some(answer) = cache.get(&key, revision) {
                    return Handled::Encoded(answer);
                }
            }
        }
        match registry.query(&key.service, &key.clusters, key.healthy_only) {
            Ok(view) => view,
            Err(e) => return Handled::Now(Some(Err(e.into()))),
        }
    };
    if !cache.enabled() || !cacheable(&view) {
        return Handled::Now(Some(Ok(Response::View(view))));
    }
    let revision = view.revision;
    let result = Ok(Response::View(view));
    match shoal_proto::encode_result(&result) {
        Ok(bytes) => {
            let answer: crate::query_cache::EncodedAnswer = bytes.into();
            cache.put(key, revision, answer.clone());
            Handled::Encoded(answer)
        }
        // Cannot happen for a view; the writer reports it if it does.
        Err(_) => Handled::Now(Some(result)),
    }
}

/// The write a request asks for, or the request back if it is not a single write.
// The `Err` is the request handed back, moved, not an error to propagate.
#[allow(clippy::result_large_err)]
fn write_of(body: Request, session: SessionId) -> Result<Write, Request> {
    Ok(match body {
        Request::Register { service, instance } => Write::Register {
            service,
            instance,
            session,
        },
        Request::Update { service, instance } => Write::Update { service, instance },
        Request::Deregister { service, instance } => Write::Deregister { service, instance },
        Request::Beat { service, instance } => Write::Beat { service, instance },
        Request::SetServiceMeta { service, meta } => Write::SetServiceMeta { service, meta },
        other => return Err(other),
    })
}

/// The metrics label of a write, as [`request_kind`] names its request.
fn write_kind(w: &Write) -> Kind {
    match w {
        Write::Register { .. } => Kind::Register,
        Write::Update { .. } => Kind::Update,
        Write::Deregister { .. } => Kind::Deregister,
        Write::Beat { .. } => Kind::Beat,
        Write::SetServiceMeta { .. } => Kind::SetServiceMeta,
    }
}

/// How long the answers to a run of writes wait for each other: those applied here
/// wait, at most this long, for those forwarded to their owners, so that the whole
/// run's answers leave in one write (one packet to the client, where they were one
/// write each way before: at 4 writes in flight per session that halved the packets
/// per registration, docs/benchmarks.md, eighteenth series). A stalled owner holds up
/// the others' answers by this much at most; after it each owner's outcomes leave as
/// they come.
const ANSWER_HOLD: Duration = Duration::from_millis(20);

/// Starts a run of single writes that arrived together, in their order, as one batch
/// ([`crate::cluster::start_many`]), and answers each with its own id, all in one
/// write once every outcome is known (or [`ANSWER_HOLD`] passed), from a task of their
/// own when some were forwarded (at most [`MAX_FORWARDS_IN_FLIGHT`] runs wait at once).
/// False when the session's outbox is gone.
async fn write_run(
    shared: &Arc<Shared>,
    outbox: &Outbox,
    in_flight: &Arc<tokio::sync::Semaphore>,
    run: Vec<(u64, Write)>,
) -> bool {
    let started = std::time::Instant::now();
    crate::metrics::hot().write_run_ops.record(run.len() as f64);
    let mut ids = Vec::with_capacity(run.len());
    let writes = run
        .into_iter()
        .map(|(id, w)| {
            ids.push((id, write_kind(&w)));
            w
        })
        .collect();
    let mut pending = crate::cluster::start_many(shared, writes);
    let mut held = RunAnswers::new(ids, started);
    held.add(pending.take_settled());
    if pending.is_settled() {
        return held.send(&outbox.tx).await;
    }
    let Ok(permit) = in_flight.clone().acquire_owned().await else {
        return false;
    };
    let mut answers = pending.answers(shared);
    let tx = outbox.tx.clone();
    tokio::spawn(async move {
        let hold = tokio::time::sleep(ANSWER_HOLD);
        tokio::pin!(hold);
        let mut holding = true;
        loop {
            let next = answers.next();
            tokio::pin!(next);
            // The hold ends without dropping `next` (it may be part-way through routing
            // unanswered writes again).
            let outcomes = loop {
                tokio::select! {
                    outcomes = &mut next => break outcomes,
                    _ = &mut hold, if holding => {
                        holding = false;
                        if !held.send(&tx).await {
                            return;
                        }
                    }
                }
            };
            let Some(outcomes) = outcomes else { break };
            held.add(outcomes);
            if !holding && !held.send(&tx).await {
                return;
            }
        }
        let _ = held.send(&tx).await;
        drop(permit);
    });
    true
}

/// The answers of a run of writes not sent yet.
struct RunAnswers {
    /// Each write's request id and kind, by its place in the run.
    ids: Vec<(u64, Kind)>,
    started: std::time::Instant,
    frames: Vec<ServerFrame>,
    /// The kind of the write each frame answers.
    kinds: Vec<Kind>,
}

impl RunAnswers {
    fn new(ids: Vec<(u64, Kind)>, started: std::time::Instant) -> Self {
        let n = ids.len();
        RunAnswers {
            ids,
            started,
            frames: Vec::with_capacity(n),
            kinds: Vec::with_capacity(n),
        }
    }

    fn add(&mut self, outcomes: Vec<(usize, Result<u64, ErrorBody>)>) {
        for (place, result) in outcomes {
            let (id, kind) = self.ids[place];
            let result = result.map(|revision| Response::Applied { revision });
            self.frames.push(ServerFrame::Response { id, result });
            self.kinds.push(kind);
        }
    }

    /// Queues the answers held (if any) as one write, and records their latency as the
    /// client sees it from here. False when the session's outbox is gone.
    async fn send(&mut self, tx: &tokio::sync::mpsc::Sender<Outgoing>) -> bool {
        if self.frames.is_empty() {
            return true;
        }
        let frames = std::mem::take(&mut self.frames);
        for (frame, kind) in frames.iter().zip(self.kinds.drain(..)) {
            if let ServerFrame::Response { result, .. } = frame {
                observe(kind, self.started, result);
            }
        }
        tx.send(Outgoing::Frames(frames)).await.is_ok()
    }
}

fn request_kind(body: &Request) -> Kind {
    match body {
        Request::Register { .. } => Kind::Register,
        Request::RegisterMany { .. } => Kind::RegisterMany,
        Request::Update { .. } => Kind::Update,
        Request::Deregister { .. } => Kind::Deregister,
        Request::Beat { .. } => Kind::Beat,
        Request::SetServiceMeta { .. } => Kind::SetServiceMeta,
        Request::Query { .. } => Kind::Query,
        Request::ListServices { .. } => Kind::ListServices,
        Request::Subscribe { .. } => Kind::Subscribe,
        Request::Unsubscribe { .. } => Kind::Unsubscribe,
        Request::Members => Kind::Members,
        Request::Ring { .. } => Kind::Ring,
        Request::Ping => Kind::Ping,
        Request::Goodbye => Kind::Goodbye,
    }
}

/// Writes queued frames, coalescing whatever is queued into one write.
async fn write_loop(mut send: quinn::SendStream, mut rx: mpsc::Receiver<Outgoing>, max: usize) {
    let mut buf = Vec::with_capacity(64 * 1024);
    while let Some(frame) = rx.recv().await {
        buf.clear();
        let mut next = Some(frame);
        while let Some(frame) = next.take() {
            match frame {
                Outgoing::Frame(frame) => append_or_refuse(&mut buf, &frame, max),
                Outgoing::Answer { id, result } => {
                    if let Err(e) = shoal_proto::append_response_frame(&mut buf, id, &result, max) {
                        refuse_answer(&mut buf, Some(id), e, max);
                    }
                }
                // A push, encoded once for every subscriber (within the limit).
                Outgoing::Encoded(frame) => buf.extend_from_slice(&frame),
                // The answers to a run of writes, in one write.
                Outgoing::Frames(frames) => {
                    for frame in &frames {
                        append_or_refuse(&mut buf, frame, max);
                    }
                }
            }
            if buf.len() < 256 * 1024 {
                next = rx.try_recv().ok();
            }
        }
        if send.write_all(&buf).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
    // Wait (briefly) until the peer has the last bytes: closing the connection now
    // would discard them, and they may carry the error that explains the close.
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
}

/// Appends `frame`; a frame too large to send (a view over the limit) becomes an
/// error answer to its request instead.
fn append_or_refuse(buf: &mut Vec<u8>, frame: &ServerFrame, max: usize) {
    let appended = match frame {
        // The answer to every write, written by hand (the same bytes).
        ServerFrame::Response {
            id,
            result: Ok(Response::Applied { revision }),
        } => shoal_proto::append_applied_answer(buf, *id, *revision, max),
        _ => shoal_proto::append_frame(buf, frame, max),
    };
    if let Err(e) = appended {
        let id = match frame {
            ServerFrame::Response { id, .. } => Some(*id),
            _ => None,
        };
        refuse_answer(buf, id, e, max);
    }
}

/// Tells the client that the answer to request `id` could not be sent.
fn refuse_answer(buf: &mut Vec<u8>, id: Option<u64>, e: shoal_proto::FrameError, max: usize) {
    tracing::warn!("cannot send frame: {e}");
    if let Some(id) = id {
        let err = ServerFrame::Response {
            id,
            result: Err(ErrorBody::new(ErrorCode::Internal, e.to_string())),
        };
        if let Ok(bytes) = shoal_proto::encode_frame(&err, max) {
            buf.extend_from_slice(&bytes);
        }
    }
}

/// A client opens one stream; any further stream gets an error and is closed.
async fn refuse_extra_streams(conn: quinn::Connection, max: usize) {
    while let Ok((mut send, _recv)) = conn.accept_bi().await {
        metrics::counter!("shoal_frame_errors_total", "kind" => "extra_stream").increment(1);
        let frame = ServerFrame::Error(ErrorBody::new(
            ErrorCode::ProtocolViolation,
            "one session stream per connection",
        ));
        if let Ok(bytes) = shoal_proto::encode_frame(&frame, max) {
            let _ = send.write_all(&bytes).await;
        }
        let _ = send.finish();
    }
}

fn send_error(outbox: &Outbox, code: ErrorCode, message: &str) {
    crate::state::push(outbox, ServerFrame::Error(ErrorBody::new(code, message)));
}

/// Tells the client why its frame was refused. False when there is nothing to tell
/// (the stream failed underneath).
fn refuse_frame_now(outbox: &Outbox, e: FrameError) -> bool {
    let (code, kind) = match &e {
        FrameError::TooLarge { .. } => (ErrorCode::FrameTooLarge, "too_large"),
        FrameError::Malformed(_) => (ErrorCode::MalformedFrame, "malformed"),
        FrameError::Truncated => (ErrorCode::MalformedFrame, "truncated"),
        FrameError::Io(_) | FrameError::Encode(_) => return false,
    };
    metrics::counter!("shoal_frame_errors_total", "kind" => kind).increment(1);
    tracing::info!("closing session stream: {e}");
    send_error(outbox, code, &e.to_string());
    true
}

/// Sends a connection-level error, lets the writer flush it, and closes.
async fn refuse(
    outbox: Outbox,
    writer: tokio::task::JoinHandle<()>,
    code: ErrorCode,
    message: &str,
) {
    send_error(&outbox, code, message);
    close_after_flush(outbox, writer).await;
}

async fn refuse_frame(outbox: Outbox, writer: tokio::task::JoinHandle<()>, e: FrameError) {
    refuse_frame_now(&outbox, e);
    close_after_flush(outbox, writer).await;
}

/// Drops the last sender so the writer drains its queue, finishes the stream and
/// waits for the peer's acknowledgement; then closes the connection.
async fn close_after_flush(outbox: Outbox, writer: tokio::task::JoinHandle<()>) {
    let conn = outbox.conn.clone();
    drop(outbox);
    let _ = tokio::time::timeout(Duration::from_secs(3), writer).await;
    conn.close(CLOSE_PROTOCOL, b"refused");
}
