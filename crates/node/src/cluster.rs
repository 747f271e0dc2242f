//! The write path of a client request, and the cluster views the CLI asks for.
//!
//! A write goes to the owner of its service (answered with the service's revision
//! there): applied here when this node owns it, else forwarded once over the peer link. If the owner does not answer in
//! `forward_timeout_ms` (it may just have died), the route is looked up again, once:
//! by then the ring may name another owner, possibly this node.

use std::sync::Arc;
use std::time::Duration;

use shoal_proto::{ErrorBody, ErrorCode, MemberView, Response, RingView};
use shoal_replication::{ForwardOutcome, MemberState, Route, Write};
use shoal_storage::ServiceKey;

use crate::state::{read, write as write_lock, Shared};

/// A write under way: answered already (applied here or refused), or forwarded to its
/// owner and waiting for the answer.
pub enum Started {
    /// The answer.
    Done(Result<Response, ErrorBody>),
    /// Forwarded: [`finish_write`] awaits the owner's answer.
    Forwarded(Pending),
}

/// A forwarded write waiting for its owner's answer.
pub struct Pending {
    id: u64,
    owner: shoal_storage::NodeId,
    rx: tokio::sync::oneshot::Receiver<ForwardOutcome>,
    write: Write,
}

/// The part of a write that runs at once and in the order the requests came: route,
/// then apply here or send to the owner. A session's writes leave in its order (a
/// forward goes over the one ordered link to the owner), while the answers of
/// forwarded writes are awaited concurrently.
pub fn start_write(shared: &Arc<Shared>, w: Write) -> Started {
    let route = read(&shared.replica).route(w.service());
    match route {
        Route::Local => Started::Done(apply_here(shared, w)),
        Route::Unavailable => Started::Done(Err(ErrorBody::new(
            ErrorCode::NotReady,
            "no ready node owns services yet",
        ))),
        Route::Forward(owner) => {
            metrics::counter!("shoal_forwarded_writes_total").increment(1);
            let mut replica = write_lock(&shared.replica);
            let (id, actions) = replica.forward(&owner, w.clone(), shared.now_ms());
            let rx = shared.expect_forward(id);
            shared.execute(&replica, actions);
            Started::Forwarded(Pending {
                id,
                owner,
                rx,
                write: w,
            })
        }
    }
}

/// Awaits a forwarded write's answer. If the owner does not answer in
/// `forward_timeout_ms` (it may just have died), the route is looked up again, once.
pub async fn finish_write(shared: &Arc<Shared>, p: Pending) -> Result<Response, ErrorBody> {
    let timeout = Duration::from_millis(shared.config.forward_timeout_ms);
    let mut pending = p;
    for attempt in 0..2 {
        match tokio::time::timeout(timeout, &mut pending.rx).await {
            Ok(Ok(ForwardOutcome::Applied { revision })) => {
                return Ok(Response::Applied { revision })
            }
            Ok(Ok(ForwardOutcome::Rejected { code, message })) => {
                return Err(ErrorBody::new(code_of(&code), message))
            }
            // Dropped (no link to the owner) or timed out: look again.
            Ok(Err(_)) | Err(_) => {
                shared.forget_forward(pending.id);
                metrics::counter!("shoal_forward_failures_total").increment(1);
                tracing::debug!(owner = %pending.owner, "forwarded write got no answer; routing again");
                if attempt == 1 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                match start_write(shared, pending.write.clone()) {
                    Started::Done(r) => return r,
                    Started::Forwarded(next) => pending = next,
                }
            }
        }
    }
    Err(ErrorBody::new(
        ErrorCode::Unavailable,
        "the owner of this service did not answer; retry",
    ))
}

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

/// Like [`start_write`] for several writes at once, in their order: applied here under
/// one lock where this node owns the service, else sent to each owner in one message.
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
/// their places in the batch. A group whose owner does not answer in
/// `forward_timeout_ms` is routed again write by write, as [`finish_write`] does.
pub async fn finish_forwarded(
    shared: &Arc<Shared>,
    p: PendingMany,
) -> Vec<(usize, Result<u64, ErrorBody>)> {
    let timeout = Duration::from_millis(shared.config.forward_timeout_ms);
    let mut out = Vec::with_capacity(p.results.len());
    for group in p.groups {
        match tokio::time::timeout(timeout, group.rx).await {
            Ok(Ok(outcomes)) if outcomes.len() == group.places.len() => {
                for (place, outcome) in group.places.into_iter().zip(outcomes) {
                    out.push((
                        place,
                        match outcome {
                            ForwardOutcome::Applied { revision } => Ok(revision),
                            ForwardOutcome::Rejected { code, message } => {
                                Err(ErrorBody::new(code_of(&code), message))
                            }
                        },
                    ));
                }
            }
            _ => {
                shared.forget_forward_many(group.id);
                metrics::counter!("shoal_forward_failures_total").increment(1);
                tracing::debug!("forwarded batch got no answer; routing its writes again");
                for (place, w) in group.places.into_iter().zip(group.writes) {
                    let r = match start_write(shared, w) {
                        Started::Done(r) => r,
                        Started::Forwarded(next) => finish_write(shared, next).await,
                    };
                    out.push((
                        place,
                        r.and_then(|resp| match resp {
                            Response::Applied { revision } => Ok(revision),
                            other => Err(ErrorBody::new(
                                ErrorCode::Internal,
                                format!("unexpected answer to a write: {other:?}"),
                            )),
                        }),
                    ));
                }
            }
        }
    }
    out
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

fn apply_here(shared: &Arc<Shared>, w: Write) -> Result<Response, ErrorBody> {
    let now = shared.now_ms();
    let service = unchanging_key(&w);
    let mut replica = write_lock(&shared.replica);
    let (change, actions) = replica.apply_write(w, now).map_err(ErrorBody::from)?;
    shared.execute(&replica, actions);
    let revision = match change {
        Some(c) => c.revision,
        None => service
            .and_then(|s| replica.registry().service_revision(&s))
            .unwrap_or(0),
    };
    Ok(Response::Applied { revision })
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
