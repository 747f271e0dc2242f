//! Runs of forwarded client writes: the runs queued for one owner leave in one
//! message, each run is answered under its own id, and nothing this node sends the
//! owner in a batch overtakes them.

use std::collections::BTreeMap;
use std::sync::Arc;

use shoal_replication::sim::{test_seed, Sim};
use shoal_replication::{Action, Config, ForwardOutcome, PeerMsg, Replica, Write, WriteRuns};
use shoal_storage::{InstanceSpec, NodeId, ServiceKey, SessionId};

fn id(name: &str) -> NodeId {
    NodeId::new(name)
}

fn register(service: &str, port: u16, session: u128) -> Write {
    Write::Register {
        service: ServiceKey::named(service),
        instance: InstanceSpec::new("10.0.0.1", port),
        session: SessionId(session),
    }
}

fn replica() -> Replica {
    Replica::new(id("a"), "a:1".into(), Config::default(), 7, 0)
}

fn applied(revision: u64) -> ForwardOutcome {
    ForwardOutcome::Applied { revision }
}

/// The forward messages among `actions`: (to, id, writes, sent_ms).
fn forwards(actions: &[Action]) -> Vec<(NodeId, u64, Vec<Write>, u64)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send {
                to,
                msg:
                    PeerMsg::ForwardMany {
                        id,
                        writes,
                        sent_ms,
                    },
            } => Some((
                to.clone(),
                *id,
                writes.clone().into_writes().collect(),
                *sent_ms,
            )),
            _ => None,
        })
        .collect()
}

fn done(actions: &[Action]) -> Vec<(u64, Vec<ForwardOutcome>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::ForwardManyDone { id, outcomes } => Some((*id, outcomes.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn runs_for_one_owner_leave_together_and_are_answered_apart() {
    let mut a = replica();
    let first = vec![register("s1", 1, 1), register("s2", 2, 1)];
    let second = vec![register("s3", 3, 2)];
    let other = vec![register("s4", 4, 3)];
    let (run1, sent) = a.forward_many(&id("c"), Arc::new(first.clone()), 10);
    assert!(sent.is_empty(), "a run is queued, not sent: {sent:?}");
    let (run2, sent) = a.forward_many(&id("c"), Arc::new(second.clone()), 11);
    assert!(sent.is_empty());
    let (run3, _) = a.forward_many(&id("b"), Arc::new(other.clone()), 12);
    assert!(a.has_queued_forwards());
    assert_ne!(run1, run2);

    let actions = a.flush_forwards();
    assert!(!a.has_queued_forwards());
    let mut sent = forwards(&actions);
    assert_eq!(sent.len(), 2, "one message per owner: {actions:?}");
    sent.sort_by(|x, y| x.0.cmp(&y.0));
    let (to_b, id_b, writes_b, _) = sent[0].clone();
    let (to_c, id_c, writes_c, sent_ms) = sent[1].clone();
    assert_eq!((to_b, to_c), (id("b"), id("c")));
    let both: Vec<Write> = first.iter().chain(&second).cloned().collect();
    assert_eq!(writes_c, both, "the runs in the order they were queued");
    assert_eq!(writes_b, other);
    assert_eq!(sent_ms, 10, "sent as of the first run queued");
    assert_eq!(a.forwarded_runs(id_c).collect::<Vec<_>>(), vec![run1, run2]);

    let refused = ForwardOutcome::Rejected {
        code: "invalid_port".into(),
        message: "no".into(),
    };
    let reply = PeerMsg::ForwardManyReply {
        id: id_c,
        outcomes: vec![applied(5), applied(6), refused.clone()],
    };
    let answered = done(&a.handle(&id("c"), reply.clone(), 20));
    assert_eq!(
        answered,
        vec![(run1, vec![applied(5), applied(6)]), (run2, vec![refused])]
    );
    assert!(
        done(&a.handle(&id("c"), reply, 21)).is_empty(),
        "an answer counts once"
    );
    let answered = done(&a.handle(
        &id("b"),
        PeerMsg::ForwardManyReply {
            id: id_b,
            outcomes: vec![applied(9)],
        },
        22,
    ));
    assert_eq!(answered, vec![(run3, vec![applied(9)])]);
}

#[test]
fn an_answer_of_the_wrong_length_answers_each_run_with_nothing() {
    let mut a = replica();
    let (run1, _) = a.forward_many(&id("c"), Arc::new(vec![register("s1", 1, 1)]), 1);
    let (run2, _) = a.forward_many(&id("c"), Arc::new(vec![register("s2", 2, 2)]), 1);
    let (_, wire, _, _) = forwards(&a.flush_forwards()).remove(0);
    let answered = done(&a.handle(
        &id("c"),
        PeerMsg::ForwardManyReply {
            id: wire,
            outcomes: vec![applied(1)],
        },
        2,
    ));
    // No outcome for a run: the node routes its writes again.
    assert_eq!(answered, vec![(run1, vec![]), (run2, vec![])]);
}

#[test]
fn a_run_that_does_not_fit_sends_those_queued_before_it() {
    let mut a = replica();
    let many: Vec<Write> = (0..1000).map(|p| register("s", p + 1, 1)).collect();
    let (_, sent) = a.forward_many(&id("c"), Arc::new(many.clone()), 1);
    assert!(sent.is_empty());
    let more: Vec<Write> = (0..100).map(|p| register("t", p + 1, 2)).collect();
    let (_, sent) = a.forward_many(&id("c"), Arc::new(more.clone()), 2);
    let sent = forwards(&sent);
    assert_eq!(
        sent.len(),
        1,
        "1 100 writes are more than one message holds"
    );
    assert_eq!(sent[0].2, many);
    let rest = forwards(&a.flush_forwards());
    assert_eq!(rest[0].2, more);

    // By size: two writes with about 40 KiB of metadata each go apart.
    let big = |port: u16| {
        let mut instance = InstanceSpec::new("10.0.0.1", port);
        instance.metadata = (0..40)
            .map(|k| (format!("k{k}"), "v".repeat(1000)))
            .collect::<BTreeMap<_, _>>();
        Write::Register {
            service: ServiceKey::named("big"),
            instance,
            session: SessionId(1),
        }
    };
    let (_, sent) = a.forward_many(&id("c"), Arc::new(vec![big(1)]), 3);
    assert!(sent.is_empty());
    let (_, sent) = a.forward_many(&id("c"), Arc::new(vec![big(2)]), 3);
    assert_eq!(forwards(&sent).len(), 1);
    assert_eq!(forwards(&a.flush_forwards()).len(), 1);
}

/// The owner's batch to the forwarding node leaves at once when a forward from it is
/// answered: the runs this node queued for that owner go before it, so a session's
/// announcement in the batch (its end, say) never overtakes the writes it made.
#[test]
fn queued_runs_leave_before_a_batch_to_their_owner() {
    let mut sim = Sim::new(test_seed(11), Config::default());
    for n in ["a", "b", "c"] {
        sim.add_node(n);
    }
    sim.run_for(4_000);
    assert!(sim.all_ready(), "cluster did not start");
    let now = sim.now_ms();
    // A service a owns, written by c's client, forwarded to a.
    let mine = (0..200)
        .map(|i| ServiceKey::named(format!("svc-{i}")))
        .find(|s| sim.replica(&id("a")).owns(s))
        .expect("a owns none of 200 services");
    let a = sim.replica_mut(&id("a"));
    let (_, queued) = a.forward_many(&id("c"), Arc::new(vec![register("x", 1, 9)]), now);
    assert!(queued.is_empty());
    let actions = a.handle(
        &id("c"),
        PeerMsg::ForwardMany {
            id: 1,
            writes: WriteRuns::one(Arc::new(vec![Write::Register {
                service: mine,
                instance: InstanceSpec::new("10.0.0.2", 80),
                session: SessionId(4),
            }])),
            sent_ms: now,
        },
        now,
    );
    let kinds: Vec<&str> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { to, msg } if *to == id("c") => Some(match msg {
                PeerMsg::ForwardMany { .. } => "forward",
                PeerMsg::Batch(_) => "batch",
                PeerMsg::ForwardManyReply { .. } => "reply",
                _ => "other",
            }),
            _ => None,
        })
        .collect();
    assert_eq!(kinds, vec!["forward", "batch", "reply"]);
}
