//! The write path of a client request, and the cluster views the CLI asks for.
//!
//! A write goes to the owner of its service (answered with the service's revision
//! there): applied here when this node owns it, else forwarded over the peer link, the
//! writes of one run that share an owner in one message. If an owner does not answer
//! in `forward_timeout_ms` (it may just have died, or be stalled), the writes it was
//! sent are routed again, once and together: by then the ring may name another owner,
//! possibly this node. What is still unanswered after that is `Unavailable`, so a run
//! is answered within about two forward timeouts however many writes it holds. Writes
//! are not routed again if this node stalled since they were sent (their client has
//! likely moved on): they are `Unavailable` at once.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use shoal_proto::{ErrorBody, ErrorCode, MemberView, Response, RingView};
use shoal_replication::{ForwardOutcome, MemberState, Route, Write};
use shoal_storage::ServiceKey;

use crate::state::{read, write as write_lock, Shared};

/// A batch of writes under way (a client's RegisterMany, or a run of single writes):
/// those this node owns are answered already, the others were forwarded, one message
/// per owner.
pub struct PendingMany {
    results: Vec<Option<Result<u64, ErrorBody>>>,
    groups: Vec<ForwardedGroup>,
    /// This node's stall era when the writes were sent ([`Shared::stall_epoch`]).
    era: u64,
}

/// The writes of a batch that went to one owner in one message.
struct ForwardedGroup {
    id: u64,
    /// Their places in the batch.
    places: Vec<usize>,
    /// Shared with the message that carried them, kept to route them again.
    writes: Arc<Vec<Write>>,
    rx: tokio::sync::oneshot::Receiver<Vec<ForwardOutcome>>,
}

/// Starts the writes of a run, in their order: applied here under one lock where this
/// node owns the service, else sent to each owner in one message. A session's writes
/// leave in its order (a forward goes over the one ordered link to the owner), while
/// the owners' answers are awaited concurrently ([`Answers`]).
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
    let forwarded = !by_owner.is_empty();
    for (owner, places, ws) in by_owner {
        crate::metrics::hot()
            .forwarded_writes
            .increment(ws.len() as u64);
        let ws = Arc::new(ws);
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
    drop(replica);
    if forwarded {
        shared.forwards_queued();
    }
    PendingMany {
        results,
        groups,
        era: shared.stall_epoch(now),
    }
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

/// The owners' answers to the forwarded writes of a batch, as they arrive
/// ([`PendingMany::answers`]).
///
/// The groups sent share one deadline, `forward_timeout_ms` after the answers are first
/// awaited; each group's outcomes are handed out as soon as its owner answers, so a
/// stalled owner does not hold up the answers of the others. The writes of the groups
/// not answered by the deadline (or whose link dropped) are routed again together
/// ([`start_many`]; the ring may have changed), under a second deadline; those still
/// unanswered after it are `Unavailable` (the client may retry them).
pub struct Answers {
    shared: Arc<Shared>,
    timeout: Duration,
    /// The groups awaited (`None` once answered or given up).
    groups: Vec<Option<ForwardedGroup>>,
    deadline: Option<tokio::time::Instant>,
    /// Once the unanswered writes were routed again (a batch of their own): the place
    /// in the original batch of each place in that one.
    rerouted: Option<Vec<usize>>,
    /// The writes not answered, with their places in the batch now awaited.
    unanswered: Vec<(usize, Write)>,
    /// This node's stall era when the writes were first sent ([`PendingMany::era`]):
    /// taken then, not when the answers are first awaited (a session may wait for room
    /// in between).
    era: u64,
}

impl PendingMany {
    /// The answers to come of the forwarded writes.
    pub fn answers(self, shared: &Arc<Shared>) -> Answers {
        Answers {
            shared: shared.clone(),
            timeout: Duration::from_millis(shared.config.forward_timeout_ms),
            groups: self.groups.into_iter().map(Some).collect(),
            deadline: None,
            rerouted: None,
            unanswered: Vec::new(),
            era: self.era,
        }
    }
}

/// Dropped before every answer came (the client went away): nothing waits for the
/// rest any more.
impl Drop for Answers {
    fn drop(&mut self) {
        for group in self.groups.iter().flatten() {
            self.shared.forget_forward_many(group.id);
        }
    }
}

impl Answers {
    /// The next outcomes known, with their places in the batch; `None` once every
    /// forwarded write has its outcome.
    pub async fn next(&mut self) -> Option<Vec<(usize, Result<u64, ErrorBody>)>> {
        loop {
            if self.groups.iter().all(Option::is_none) {
                if self.unanswered.is_empty() {
                    return None;
                }
                let unanswered = std::mem::take(&mut self.unanswered);
                // Not routed again if this node stalled since they were sent: the
                // client has likely given up on them, sent them again through another
                // node and written since (a deregistration, say); sent now, with a fresh
                // date that the owner's age check accepts, they would undo that (bug 14
                // of docs/reliability.md). The client is told to retry.
                let stalled = self.shared.stall_epoch(self.shared.now_ms()) != self.era;
                if self.rerouted.is_some() || stalled {
                    let why = if stalled {
                        "this node stalled while the owner of this service did not answer; retry"
                    } else {
                        "the owner of this service did not answer; retry"
                    };
                    return Some(
                        unanswered
                            .into_iter()
                            .map(|(place, _)| {
                                (
                                    self.place(place),
                                    Err(ErrorBody::new(ErrorCode::Unavailable, why)),
                                )
                            })
                            .collect(),
                    );
                }
                tracing::debug!(
                    writes = unanswered.len(),
                    "forwarded writes got no answer; routing them again"
                );
                // A moment for the failure detector and the ring to catch up.
                tokio::time::sleep(Duration::from_millis(50)).await;
                // Not routed again yet: the places are those of the original batch.
                let (places, writes): (Vec<usize>, Vec<Write>) = unanswered.into_iter().unzip();
                let mut again = start_many(&self.shared, writes);
                self.rerouted = Some(places);
                self.deadline = None;
                self.groups = again.groups.drain(..).map(Some).collect();
                let settled: Vec<_> = again
                    .take_settled()
                    .into_iter()
                    .map(|(i, r)| (self.place(i), r))
                    .collect();
                if !settled.is_empty() {
                    return Some(settled);
                }
                continue;
            }
            let deadline = *self
                .deadline
                .get_or_insert_with(|| tokio::time::Instant::now() + self.timeout);
            let ready = tokio::time::timeout_at(
                deadline,
                std::future::poll_fn(|cx| {
                    let mut ready = Vec::new();
                    for (i, g) in self.groups.iter_mut().enumerate() {
                        if let Some(g) = g {
                            if let std::task::Poll::Ready(r) =
                                std::pin::Pin::new(&mut g.rx).poll(cx)
                            {
                                ready.push((i, r.ok()));
                            }
                        }
                    }
                    if ready.is_empty() {
                        std::task::Poll::Pending
                    } else {
                        std::task::Poll::Ready(ready)
                    }
                }),
            )
            .await;
            let mut out = Vec::new();
            match ready {
                Ok(ready) => {
                    for (i, outcomes) in ready {
                        let group = self.groups[i].take().expect("a group polled once");
                        self.settle(group, outcomes, &mut out);
                    }
                }
                // The deadline: give up on every group still awaited.
                Err(_) => {
                    for i in 0..self.groups.len() {
                        if let Some(group) = self.groups[i].take() {
                            self.settle(group, None, &mut out);
                        }
                    }
                }
            }
            if !out.is_empty() {
                return Some(out);
            }
        }
    }

    /// The place in the original batch of place `i` of the batch now awaited.
    fn place(&self, i: usize) -> usize {
        self.rerouted.as_ref().map_or(i, |places| places[i])
    }

    /// A group's answer (`None`: none, or its link dropped): its outcomes go to `out`,
    /// or, without a well-formed answer, its writes to those to route again.
    fn settle(
        &mut self,
        group: ForwardedGroup,
        outcomes: Option<Vec<ForwardOutcome>>,
        out: &mut Vec<(usize, Result<u64, ErrorBody>)>,
    ) {
        match outcomes {
            Some(outcomes) if outcomes.len() == group.places.len() => {
                for (place, outcome) in group.places.into_iter().zip(outcomes) {
                    out.push((
                        self.place(place),
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
                self.shared.forget_forward_many(group.id);
                metrics::counter!("shoal_forward_failures_total").increment(1);
                self.unanswered.extend(
                    group
                        .places
                        .into_iter()
                        .zip(Arc::unwrap_or_clone(group.writes)),
                );
            }
        }
    }
}

/// Awaits the owners' answers of a batch (see [`Answers`]): the answer to a client's
/// RegisterMany, every outcome in its place.
pub async fn finish_many(shared: &Arc<Shared>, mut p: PendingMany) -> Result<Response, ErrorBody> {
    let mut results: Vec<Option<Result<u64, ErrorBody>>> = vec![None; p.results.len()];
    for (place, r) in p.take_settled() {
        results[place] = Some(r);
    }
    let mut answers = p.answers(shared);
    while let Some(outcomes) = answers.next().await {
        for (place, r) in outcomes {
            results[place] = Some(r);
        }
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
        .map(|(id, share)| (shoal_storage::NodeId::new(id), share))
        .collect();
    Ok(RingView {
        vnodes: ring.vnodes_per_weight(),
        shares,
        owner: service.and_then(|k| replica.owner(k)),
        position: service.map(|k| k.position()),
    })
}
