//! The write path of a client request, and the cluster views the CLI asks for.
//!
//! A write goes to the owner of its service (answered with the service's revision
//! there): applied here when this node owns it, else forwarded over the peer link, the
//! writes of one run that share an owner in one message. If an owner does not answer
//! in `forward_timeout_ms` (it may just have died, or be stalled), the writes it was
//! sent are routed again, once and together: by then the ring may name another owner,
//! possibly this node. What is still unanswered after that is `Unavailable`, so a run
//! is answered within about two forward timeouts however many writes it holds.

use std::sync::Arc;
use std::time::Duration;

use shoal_proto::{ErrorBody, ErrorCode, MemberView, Response, RingView};
use shoal_replication::{ForwardOutcome, MemberState, Route, Write};
use shoal_storage::ServiceKey;

use crate::state::{read, write as write_lock, Shared};

/// A batch of writes under way (a client's RegisterMany): those this node owns are
/// answered already, the others were forwarded, one message per owner.
pub struct PendingMany {
    results: Vec<Option<Result<u64, ErrorBody>>>,
    groups: Vec<ForwardedGroup>,
}

/// The writes of a batch that went to one owner in one message.
struct ForwardedGroup {
    id: u64,
    /// Their places in the batch.
    places: Vec<usize>,
    writes: Vec<Write>,
    rx: tokio::sync::oneshot::Receiver<Vec<ForwardOutcome>>,
}

/// Starts the writes of a run, in their order: applied here under one lock where this
/// node owns the service, else sent to each owner in one message. A session's writes
/// leave in its order (a forward goes over the one ordered link to the owner), while
/// the owners' answers are awaited concurrently ([`finish_forwarded`]).
pub fn start_many(shared: &Arc<Shared>, writes: Vec<Write>) -> PendingMany {
    let now = shared.now_ms();
    let mut results: Vec<Option<Result<u64, ErrorBody>>> = Vec::with_capacity(writes.len());
    let mut by_owner: Vec<(shoal_storage::NodeId, Vec<usize>, Vec<Write>)> = Vec::new();
    let mut groups = Vec::new();
    let mut replica = write_lock(&shared.replica);
    let mut actions = Vec::new();
    for (place, w) in writes.into_iter().enumerate() {
        match replica.route(w.service()) {
            Route::Local => {
                let service = unchanging_key(&w);
                let r = match replica.apply_write(w, now) {
                    Ok((change, more)) => {
                        actions.extend(more);
                        Ok(match change {
                            Some(c) => c.revision,
                            None => service
                                .and_then(|s| replica.registry().service_revision(&s))
                                .unwrap_or(0),
                        })
                    }
                    Err(e) => Err(ErrorBody::from(e)),
                };
                results.push(Some(r));
            }
            Route::Unavailable => results.push(Some(Err(ErrorBody::new(
                ErrorCode::NotReady,
                "no ready node owns services yet",
            )))),
            Route::Forward(owner) => {
                results.push(None);
                match by_owner.iter_mut().find(|(o, _, _)| *o == owner) {
                    Some((_, places, ws)) => {
                        places.push(place);
                        ws.push(w);
                    }
                    None => by_owner.push((owner, vec![place], vec![w])),
                }
            }
        }
    }
    for (owner, places, ws) in by_owner {
        metrics::counter!("shoal_forwarded_writes_total").increment(ws.len() as u64);
        let (id, more) = replica.forward_many(&owner, ws.clone(), now);
        let rx = shared.expect_forward_many(id);
        actions.extend(more);
        groups.push(ForwardedGroup {
            id,
            places,
            writes: ws,
            rx,
        });
    }
    shared.execute(&replica, actions);
    PendingMany { results, groups }
}

impl PendingMany {
    /// The outcomes known already (applied here or refused), with their places in the
    /// batch; each is handed out once.
    pub fn take_settled(&mut self) -> Vec<(usize, Result<u64, ErrorBody>)> {
        self.results
            .iter_mut()
            .enumerate()
            .filter_map(|(place, r)| r.take().map(|r| (place, r)))
            .collect()
    }

    /// True when nothing was forwarded: every outcome is known.
    pub fn is_settled(&self) -> bool {
        self.groups.is_empty()
    }
}

/// Awaits the owners' answers of a batch: the outcomes of its forwarded writes, with
/// their places in the batch. The groups share one deadline, `forward_timeout_ms`
/// from now. The writes of the groups not answered by then are routed again together
/// ([`start_many`]; the ring may have changed), with a second deadline; those still
/// unanswered after it are `Unavailable` (the client may retry them).
pub async fn finish_forwarded(
    shared: &Arc<Shared>,
    p: PendingMany,
) -> Vec<(usize, Result<u64, ErrorBody>)> {
    let timeout = Duration::from_millis(shared.config.forward_timeout_ms);
    let mut out = Vec::with_capacity(p.results.len());
    let unanswered = await_groups(shared, p.groups, timeout, &mut out, |place| place).await;
    if unanswered.is_empty() {
        return out;
    }
    tracing::debug!(
        writes = unanswered.len(),
        "forwarded writes got no answer; routing them again"
    );
    // A moment for the failure detector and the ring to catch up.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (places, writes): (Vec<usize>, Vec<Write>) = unanswered.into_iter().unzip();
    let mut again = start_many(shared, writes);
    for (i, r) in again.take_settled() {
        out.push((places[i], r));
    }
    let still = await_groups(shared, again.groups, timeout, &mut out, |i| places[i]).await;
    for (i, _) in still {
        out.push((
            places[i],
            Err(ErrorBody::new(
                ErrorCode::Unavailable,
                "the owner of this service did not answer; retry",
            )),
        ));
    }
    out
}

/// Awaits `groups` until one deadline `timeout` from now: the outcomes of those
/// answered go to `out` (their places mapped by `place_of`); the writes of the others
/// are returned with their places in the groups' batch.
async fn await_groups(
    shared: &Arc<Shared>,
    groups: Vec<ForwardedGroup>,
    timeout: Duration,
    out: &mut Vec<(usize, Result<u64, ErrorBody>)>,
    place_of: impl Fn(usize) -> usize,
) -> Vec<(usize, Write)> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut unanswered = Vec::new();
    for group in groups {
        match tokio::time::timeout_at(deadline, group.rx).await {
            Ok(Ok(outcomes)) if outcomes.len() == group.places.len() => {
                for (place, outcome) in group.places.into_iter().zip(outcomes) {
                    out.push((
                        place_of(place),
                        match outcome {
                            ForwardOutcome::Applied { revision } => Ok(revision),
                            ForwardOutcome::Rejected { code, message } => {
                                Err(ErrorBody::new(code_of(&code), message))
                            }
                        },
                    ));
                }
            }
            // Dropped (no link to the owner), a malformed answer, or the deadline.
            _ => {
                shared.forget_forward_many(group.id);
                metrics::counter!("shoal_forward_failures_total").increment(1);
                unanswered.extend(group.places.into_iter().zip(group.writes));
            }
        }
    }
    unanswered
}

/// Awaits the owners' answers of a batch (see [`finish_forwarded`]): the answer to a
/// client's RegisterMany, every outcome in its place.
pub async fn finish_many(shared: &Arc<Shared>, mut p: PendingMany) -> Result<Response, ErrorBody> {
    let mut results: Vec<Option<Result<u64, ErrorBody>>> = vec![None; p.results.len()];
    for (place, r) in p.take_settled() {
        results[place] = Some(r);
    }
    for (place, r) in finish_forwarded(shared, p).await {
        results[place] = Some(r);
    }
    Ok(Response::AppliedMany(
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(ErrorBody::new(ErrorCode::Internal, "no outcome"))))
            .collect(),
    ))
}

/// The service of a write that may change nothing visible (a beat that only refreshes
/// a lease), whose answer then reads the service's revision; `None` for the others,
/// which always make a change (no copy of the key on every registration).
fn unchanging_key(w: &Write) -> Option<ServiceKey> {
    matches!(w, Write::Beat { .. }).then(|| w.service().clone())
}

/// Maps a storage error code carried by a forward reply back to the wire code.
fn code_of(code: &str) -> ErrorCode {
    match code {
        "invalid_name" => ErrorCode::InvalidName,
        "invalid_port" => ErrorCode::InvalidPort,
        "invalid_weight" => ErrorCode::InvalidWeight,
        "invalid_ip" => ErrorCode::InvalidIp,
        "invalid_metadata" => ErrorCode::InvalidMetadata,
        "invalid_setting" => ErrorCode::InvalidSetting,
        "unknown_namespace" => ErrorCode::UnknownNamespace,
        "not_found" => ErrorCode::NotFound,
        "unavailable" => ErrorCode::Unavailable,
        _ => ErrorCode::Internal,
    }
}

/// The members as this node sees them, itself included.
pub fn members(shared: &Shared) -> Vec<MemberView> {
    let now = shared.now_ms();
    let replica = read(&shared.replica);
    let mut out = vec![MemberView {
        id: shared.node_id.clone(),
        addr: shared.my_addr(),
        state: "up".into(),
        ready: replica.is_ready(),
        is_self: true,
        last_heard_ago_ms: None,
    }];
    for m in replica.members() {
        out.push(MemberView {
            id: m.id,
            addr: m.addr,
            state: match m.state {
                MemberState::Up => "up",
                MemberState::Suspect => "suspect",
                MemberState::Down => "down",
            }
            .into(),
            ready: m.ready,
            is_self: false,
            last_heard_ago_ms: m.last_heard_ms.map(|t| now.saturating_sub(t)),
        });
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// The ring as this node sees it, and the owner of `service` if given.
pub fn ring(shared: &Shared, service: Option<&ServiceKey>) -> Result<RingView, ErrorBody> {
    let replica = read(&shared.replica);
    if let Some(key) = service {
        let limits = replica.registry().limits().clone();
        shoal_storage::validate_service_key(key, &limits).map_err(ErrorBody::from)?;
    }
    let ring = replica.ring();
    let shares = ring
        .ownership_shares()
        .into_iter()
        .map(|(id, share)| (shoal_storage::NodeId(id), share))
        .collect();
    Ok(RingView {
        vnodes: ring.vnodes_per_weight(),
        shares,
        owner: service.and_then(|k| replica.owner(k)),
        position: service.map(|k| shoal_ring::position(&k.placement_bytes())),
    })
}
