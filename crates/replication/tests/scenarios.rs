//! Cluster scenarios over the simulated network: each reads like the incident it
//! models. Randomized ones print their seed and accept `SHOAL_TEST_SEED`.

use std::collections::BTreeMap;

use shoal_replication::sim::{test_seed as seed, NetConfig, Sim, WriteResult};
use shoal_replication::{Config, ForwardOutcome, MemberState, PeerMsg, Route, Write};
use shoal_storage::{InstanceKey, InstanceSpec, NodeId, ServiceKey, SessionId, TtlLease};

fn id(name: &str) -> NodeId {
    NodeId::new(name)
}

fn svc(i: usize) -> ServiceKey {
    ServiceKey::named(format!("svc-{i}"))
}

/// A cluster of `names`, each joining through the first, run until all are ready.
fn cluster(seed: u64, names: &[&str]) -> Sim {
    cluster_with(seed, Config::default(), names)
}

/// [`cluster`] with every engine on `config`.
fn cluster_with(seed: u64, config: Config, names: &[&str]) -> Sim {
    let mut sim = Sim::new(seed, config);
    for n in names {
        sim.add_node(n);
    }
    sim.run_for(4_000);
    assert!(sim.all_ready(), "cluster did not start");
    sim
}

fn register(sim: &mut Sim, via: &str, service: &ServiceKey, ip: &str, session: u128) {
    let w = Write::Register {
        service: service.clone(),
        instance: InstanceSpec::new(ip, 8080),
        session: SessionId(session),
    };
    match sim.write(&id(via), w) {
        WriteResult::Applied(Some(_)) | WriteResult::Forwarded { .. } => {}
        other => panic!("register via {via}: {other:?}"),
    }
}

fn instances(sim: &Sim, node: &str, service: &ServiceKey) -> Vec<String> {
    sim.replica(&id(node))
        .registry()
        .query(service, &[], false)
        .unwrap()
        .instances
        .into_iter()
        .map(|i| i.ip)
        .collect()
}

/// Nodes a, b, c whose batches wait 1 s (so that only a write's own flush sends it
/// sooner), run until all are ready.
fn slow_batches(seed: u64) -> Sim {
    let config = Config {
        batch_window_ms: 1_000,
        ..Config::default()
    };
    cluster_with(seed, config, &["a", "b", "c"])
}

/// Five nodes a..e; service `i` (of `n`) holds one instance of session `i`, homed on
/// node `i mod 5`; converged.
fn five_homes(seed: u64, n: usize) -> Sim {
    let mut sim = cluster(seed, &["a", "b", "c", "d", "e"]);
    let names = ["a", "b", "c", "d", "e"];
    for i in 0..n {
        let home = names[i % 5];
        sim.open_session(&id(home), SessionId(i as u128));
        register(&mut sim, home, &svc(i), "10.0.0.1", i as u128);
    }
    assert_converged(&mut sim, 2_000);
    sim
}

fn assert_converged(sim: &mut Sim, max_ms: u64) -> u64 {
    match sim.run_until_converged(max_ms) {
        Some(t) => t,
        None => {
            let ids = sim.ids();
            for n in &ids {
                eprintln!("{n}: {} services", sim.dump(n).len());
            }
            panic!("no convergence within {max_ms} ms");
        }
    }
}

#[test]
fn nodes_find_each_other_through_one_seed_and_agree_on_the_ring() {
    let sim = cluster(seed(1), &["a", "b", "c", "d", "e"]);
    let ring = sim.replica(&id("a")).ring().clone();
    assert_eq!(ring.len(), 5);
    for n in sim.ids() {
        let r = sim.replica(&n);
        assert_eq!(r.ring(), &ring, "{n} sees another ring");
        assert_eq!(r.members().len(), 4);
        assert!(r
            .members()
            .iter()
            .all(|m| m.state == MemberState::Up && m.ready));
    }
    // Same view, same owner for every key.
    for i in 0..200 {
        let owners: Vec<_> = sim
            .ids()
            .iter()
            .map(|n| sim.replica(n).owner(&svc(i)))
            .collect();
        assert!(owners.windows(2).all(|w| w[0] == w[1]));
    }
}

#[test]
fn writes_via_any_node_reach_every_node() {
    let mut sim = cluster(seed(2), &["a", "b", "c", "d", "e"]);
    let names = ["a", "b", "c", "d", "e"];
    for i in 0..100 {
        let via = names[i % 5];
        sim.open_session(&id(via), SessionId(i as u128));
        register(&mut sim, via, &svc(i), "10.0.0.1", i as u128);
    }
    let t = assert_converged(&mut sim, 2_000);
    eprintln!("converged {t} ms after the last write");
    for n in sim.ids() {
        assert_eq!(sim.dump(&n).len(), 100);
    }
    // Subscribers everywhere heard of every service.
    for n in sim.ids() {
        let mut keys: Vec<_> = sim.published(&n).iter().map(|c| c.key.clone()).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 100, "{n} published");
    }
}

#[test]
fn a_write_at_a_non_owner_is_forwarded_to_the_owner() {
    let mut sim = cluster(seed(3), &["a", "b", "c"]);
    let s = (0..)
        .map(svc)
        .find(|s| sim.replica(&id("a")).route(s) != Route::Local)
        .unwrap();
    let owner = sim.replica(&id("a")).owner(&s).unwrap();
    let w = Write::Register {
        service: s.clone(),
        instance: InstanceSpec::new("10.0.0.7", 80),
        session: SessionId(7),
    };
    let WriteResult::Forwarded { to, id: fid } = sim.write(&id("a"), w) else {
        panic!("not forwarded")
    };
    assert_eq!(to, owner);
    sim.run_for(50);
    assert!(matches!(
        sim.forward_outcome(&id("a"), fid),
        Some(ForwardOutcome::Applied { revision }) if *revision > 0
    ));
    assert_eq!(instances(&sim, &owner.0, &s), vec!["10.0.0.7"]);
    // A bad write is refused by the owner with the storage error's code.
    let bad = Write::Deregister {
        service: s.clone(),
        instance: InstanceKey {
            cluster: "DEFAULT".into(),
            ip: "10.0.0.99".into(),
            port: 0,
        },
    };
    let WriteResult::Forwarded { id: fid, .. } = sim.write(&id("a"), bad) else {
        panic!()
    };
    sim.run_for(50);
    assert!(matches!(
        sim.forward_outcome(&id("a"), fid),
        Some(ForwardOutcome::Rejected { code, .. }) if code == "invalid_port"
    ));
    assert_converged(&mut sim, 1_000);
    assert_eq!(instances(&sim, "c", &s), vec!["10.0.0.7"]);
}

/// One of five nodes crashes: only its services change owner; the instances of the
/// sessions it was home to go after the grace period, unless their client resumed
/// on another node; everybody else's instances stay throughout.
#[test]
fn a_crash_moves_only_its_services_and_reaps_only_its_orphans() {
    let mut sim = cluster(seed(4), &["a", "b", "c", "d", "e"]);
    let names = ["a", "b", "c", "d", "e"];
    for i in 0..200 {
        let home = names[i % 5];
        sim.open_session(&id(home), SessionId(i as u128));
        register(&mut sim, home, &svc(i), "10.0.0.1", i as u128);
    }
    assert_converged(&mut sim, 2_000);
    let before: BTreeMap<usize, NodeId> = (0..200)
        .map(|i| (i, sim.replica(&id("a")).owner(&svc(i)).unwrap()))
        .collect();

    // Session 2 (home c) resumes on d before the grace period ends.
    sim.kill(&id("c"));
    sim.run_for(4_000);
    sim.open_session(&id("d"), SessionId(2));
    for n in ["a", "b", "d", "e"] {
        let r = sim.replica(&id(n));
        assert_eq!(r.ring().len(), 4, "{n} still has c in its ring");
        for i in 0..200 {
            let now = r.owner(&svc(i)).unwrap();
            if before[&i] != id("c") {
                assert_eq!(now, before[&i], "svc-{i} moved though its owner lives");
            } else {
                assert_ne!(now, id("c"));
            }
        }
    }
    // Before the grace period ends, nothing is gone anywhere.
    for n in ["a", "b", "d", "e"] {
        assert_eq!(sim.replica(&id(n)).registry().instance_count(), 200);
    }
    sim.run_for(12_000);
    assert_converged(&mut sim, 2_000);
    for i in 0..200 {
        let orphan = i % 5 == 2 && i != 2;
        let got = instances(&sim, "a", &svc(i));
        assert_eq!(got.is_empty(), orphan, "svc-{i}");
    }
    assert!(!sim.replica(&id("a")).self_preservation_active());
}

#[test]
fn a_clean_close_deletes_at_once_everywhere() {
    let mut sim = cluster(seed(5), &["a", "b", "c"]);
    for i in 0..20 {
        sim.open_session(&id("b"), SessionId(1));
        register(&mut sim, "b", &svc(i), "10.0.0.1", 1);
    }
    assert_converged(&mut sim, 1_000);
    sim.close_session(&id("b"), SessionId(1), true);
    // Within one probe interval and a batch window.
    sim.run_for(700);
    for n in sim.ids() {
        assert_eq!(sim.replica(&n).registry().instance_count(), 0, "{n}");
    }
}

#[test]
fn a_disconnected_session_keeps_its_instances_for_the_grace_period() {
    let mut sim = cluster(seed(6), &["a", "b", "c"]);
    sim.open_session(&id("a"), SessionId(1));
    sim.open_session(&id("a"), SessionId(2));
    for i in 0..10 {
        register(&mut sim, "a", &svc(i), "10.0.0.1", 1);
        register(&mut sim, "a", &svc(i), "10.0.0.2", 2);
    }
    sim.run_for(100);
    sim.close_session(&id("a"), SessionId(1), false);
    sim.close_session(&id("a"), SessionId(2), false);
    sim.run_for(5_000);
    // Session 2 resumes on c within the grace period.
    sim.open_session(&id("c"), SessionId(2));
    sim.run_for(9_000);
    assert_converged(&mut sim, 1_000);
    for i in 0..10 {
        assert_eq!(instances(&sim, "b", &svc(i)), vec!["10.0.0.2"]);
    }
}

#[test]
fn ttl_instances_are_expired_by_their_owner_and_the_expiry_replicates() {
    let mut sim = cluster(seed(7), &["a", "b", "c"]);
    let s = svc(1);
    let mut spec = InstanceSpec::new("10.0.0.1", 80);
    spec.ttl = Some(TtlLease::default());
    let w = Write::Register {
        service: s.clone(),
        instance: spec,
        session: SessionId(1),
    };
    sim.write(&id("a"), w);
    sim.run_for(10_000);
    let beat = Write::Beat {
        service: s.clone(),
        instance: InstanceKey {
            cluster: "DEFAULT".into(),
            ip: "10.0.0.1".into(),
            port: 80,
        },
    };
    sim.write(&id("b"), beat);
    sim.run_for(16_000);
    for n in sim.ids() {
        let v = sim.replica(&n).registry().query(&s, &[], false).unwrap();
        assert_eq!(v.instances.len(), 1);
        assert!(
            !v.instances[0].healthy,
            "{n}: unhealthy after 15 s without beat"
        );
    }
    sim.run_for(15_000);
    for n in sim.ids() {
        assert!(
            instances(&sim, &n.0, &s).is_empty(),
            "{n}: removed after 30 s"
        );
    }
}

#[test]
fn anti_entropy_repairs_lost_batches() {
    let mut sim = cluster(seed(8), &["a", "b", "c"]);
    sim.set_filter(Box::new(|_, to, msg| {
        to.as_str() == "c" && matches!(msg, PeerMsg::Batch(_))
    }));
    for i in 0..50 {
        sim.open_session(&id("a"), SessionId(1));
        register(&mut sim, "a", &svc(i), "10.0.0.1", 1);
    }
    sim.run_for(500);
    assert!(sim.replica(&id("c")).registry().instance_count() < 50);
    sim.clear_filter();
    let t = assert_converged(&mut sim, 12_000);
    eprintln!("repaired in {t} ms");
    assert_eq!(sim.replica(&id("c")).registry().instance_count(), 50);
}

#[test]
fn in_sync_anti_entropy_is_a_few_hashes() {
    let mut sim = cluster(seed(9), &["a", "b", "c"]);
    for i in 0..50 {
        register(&mut sim, "a", &svc(i), "10.0.0.1", 1);
    }
    assert_converged(&mut sim, 1_000);
    let digests = std::rc::Rc::new(std::cell::Cell::new(0));
    let seen = digests.clone();
    sim.set_filter(Box::new(move |_, _, msg| {
        match msg {
            PeerMsg::Digest { .. } => seen.set(seen.get() + 1),
            PeerMsg::DigestReply { .. } | PeerMsg::Repair { .. } => {
                panic!("in-sync copies exchanged {msg:?}")
            }
            _ => {}
        }
        false
    }));
    sim.run_for(11_000);
    // Two rounds, each owner to each of its two peers.
    assert_eq!(digests.get(), 12);
}

#[test]
fn a_joiner_loads_a_snapshot_before_it_is_ready() {
    let mut sim = cluster(seed(10), &["a", "b", "c"]);
    for i in 0..600 {
        register(&mut sim, "a", &svc(i), "10.0.0.1", 1);
    }
    assert_converged(&mut sim, 2_000);
    let d = sim.add_node("d");
    assert!(!sim.replica(&d).is_ready());
    assert_eq!(sim.replica(&d).route(&svc(1)), Route::Unavailable);
    let mut waited = 0;
    while !sim.replica(&d).is_ready() {
        // While not ready it owns nothing, and nobody routes to it.
        assert!(!sim.replica(&id("a")).ring().contains("d"));
        sim.run_for(5);
        waited += 5;
        assert!(waited < 2_000, "d never became ready");
    }
    // Ready with the full data, well before the bootstrap wait would have run out.
    assert!(waited < 1_000, "{waited} ms");
    assert_eq!(sim.dump(&d), sim.dump(&id("a")));
    sim.run_for(1_000);
    assert!(sim.replica(&id("a")).ring().contains("d"));
    // A join moves about a quarter of the services, all to the joiner.
    let moved = (0..600)
        .filter(|i| sim.replica(&id("a")).owner(&svc(*i)) == Some(d.clone()))
        .count();
    assert!((90..=240).contains(&moved), "{moved} of 600 moved");
}

/// Three of five nodes vanish at once. The two left suspect they are cut off rather
/// than that the others died, and keep every instance.
#[test]
fn self_preservation_stops_a_mass_deletion() {
    let mut sim = five_homes(seed(11), 100);
    for n in ["c", "d", "e"] {
        sim.kill(&id(n));
    }
    sim.run_for(30_000);
    for n in ["a", "b"] {
        let r = sim.replica(&id(n));
        assert!(r.self_preservation_active());
        assert_eq!(r.registry().instance_count(), 100, "{n} deleted instances");
    }
    // A clean close still deletes.
    sim.close_session(&id("a"), SessionId(0), true);
    sim.run_for(1_000);
    assert!(instances(&sim, "b", &svc(0)).is_empty());
}

/// A partition: both sides keep serving and re-own the other side's services. After
/// the heal every copy converges, and every instance whose session is alive stays,
/// even those the other side reaped as orphans meanwhile.
#[test]
fn partition_and_heal_converge_and_live_sessions_stay() {
    let mut sim = cluster(seed(12), &["a", "b", "c", "d", "e"]);
    let names = ["a", "b", "c", "d", "e"];
    for i in 0..100 {
        let home = names[i % 5];
        sim.open_session(&id(home), SessionId(i as u128));
        register(&mut sim, home, &svc(i), "10.0.0.1", i as u128);
    }
    assert_converged(&mut sim, 2_000);
    sim.partition(&[&["a", "b"], &["c", "d", "e"]]);
    sim.run_for(5_000);
    // Each side writes, also to the same services.
    for i in 0..100 {
        let (home, sid) = if i % 2 == 0 { ("a", 1000) } else { ("d", 2000) };
        sim.open_session(&id(home), SessionId(sid));
        register(&mut sim, home, &svc(i), "10.0.0.2", sid);
    }
    sim.run_for(20_000);
    assert!(sim.replica(&id("a")).self_preservation_active());
    assert!(!sim.replica(&id("c")).self_preservation_active());
    // The majority side reaped the instances of sessions homed on the minority side
    // (it cannot tell them from dead ones); the minority side kept everything.
    assert!(!instances(&sim, "c", &svc(0)).contains(&"10.0.0.1".to_string()));
    assert!(instances(&sim, "a", &svc(2)).contains(&"10.0.0.1".to_string()));
    sim.heal();
    let t = assert_converged(&mut sim, 30_000);
    eprintln!("converged {t} ms after the heal");
    sim.run_for(15_000);
    assert_converged(&mut sim, 10_000);
    for i in 0..100 {
        let got = instances(&sim, "e", &svc(i));
        assert!(got.contains(&"10.0.0.1".to_string()), "svc-{i}: {got:?}");
        assert!(got.contains(&"10.0.0.2".to_string()), "svc-{i}: {got:?}");
    }
}

/// Random writes, sessions, lossy links and partitions; after the last fault heals,
/// every copy is identical.
#[test]
fn chaos_converges() {
    let seed = seed(13);
    let mut sim = cluster(seed, &["a", "b", "c", "d", "e"]);
    sim.set_net(NetConfig {
        drop_probability: 0.05,
        min_delay_ms: 1,
        max_delay_ms: 20,
        tick_ms: 5,
    });
    let names = ["a", "b", "c", "d", "e"];
    let mut rng = seed | 1;
    let mut next = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    for round in 0..40 {
        if round % 10 == 3 {
            let k = 1 + next(3) as usize;
            let (l, r) = names.split_at(k);
            sim.partition(&[l, r]);
        }
        if round % 10 == 7 {
            sim.heal();
        }
        for _ in 0..10 {
            let via = names[next(5) as usize];
            let s = svc(next(30) as usize);
            let session = SessionId(u128::from(next(8)));
            match next(4) {
                0 | 1 => {
                    sim.open_session(&id(via), session);
                    let ip = format!("10.0.0.{}", next(5));
                    let w = Write::Register {
                        service: s,
                        instance: InstanceSpec::new(ip, 80),
                        session,
                    };
                    sim.write(&id(via), w);
                }
                2 => {
                    let w = Write::Deregister {
                        service: s,
                        instance: InstanceKey {
                            cluster: "DEFAULT".into(),
                            ip: format!("10.0.0.{}", next(5)),
                            port: 80,
                        },
                    };
                    sim.write(&id(via), w);
                }
                _ => sim.close_session(&id(via), session, next(2) == 0),
            }
        }
        sim.run_for(500);
    }
    sim.heal();
    sim.set_net(NetConfig::default());
    let t = assert_converged(&mut sim, 60_000);
    eprintln!("converged {t} ms after the heal");
}

/// A node crashes and is restarted at once, before its peers notice (faster than
/// `down_after_ms`). The sessions it homed belong to its old incarnation: their
/// clients are gone unless they resume. Once the restarted node is ready it reports
/// them disconnected, and the owners delete their instances after the grace period.
#[test]
fn sessions_of_a_node_restarted_before_anyone_noticed_are_not_kept_forever() {
    let mut sim = cluster(seed(21), &["a", "b", "c"]);
    let c = id("c");
    sim.open_session(&c, SessionId(77));
    for i in 0..30 {
        register(&mut sim, "c", &svc(i), "10.0.0.77", 77);
    }
    assert_converged(&mut sim, 2_000);
    assert_eq!(instances(&sim, "a", &svc(3)), vec!["10.0.0.77".to_string()]);

    sim.kill(&c);
    sim.add_node_with_seeds("c", vec![id("a"), id("b")]);
    sim.run_for(1_000);
    assert!(
        sim.replica(&c).is_ready(),
        "the restarted node loaded its snapshot"
    );

    // Grace (10 s) plus probes and batches.
    sim.run_for(Config::default().session_grace_ms + 3_000);
    for node in ["a", "b", "c"] {
        for i in 0..30 {
            assert!(
                instances(&sim, node, &svc(i)).is_empty(),
                "{node} still holds svc-{i} of the old incarnation's session"
            );
        }
    }
}

/// Services `a_node` owns, among the first `n`.
fn owned_by(sim: &Sim, node: &str, n: usize) -> Vec<ServiceKey> {
    (0..n)
        .map(svc)
        .filter(|s| sim.replica(&id(node)).owner(s) == Some(id(node)))
        .collect()
}

/// The first of `svc(0..50)` that `node` owns.
fn first_owned_by(sim: &Sim, node: &str) -> ServiceKey {
    owned_by(sim, node, 50)
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("{node} owns none of 50 services"))
}

/// A service that `from` owns now and `to` owns once `from` is gone (`after`: the
/// members then), among `svc(0..n)`.
fn passing_to(sim: &Sim, from: &str, to: &str, after: &[&str], n: usize) -> ServiceKey {
    let ring = shoal_ring::Ring::from_members(
        sim.replica(&id(to)).ring().vnodes_per_weight(),
        after.iter().copied(),
    )
    .unwrap();
    owned_by(sim, from, n)
        .into_iter()
        .find(|s| s.with_placement_bytes(|k| ring.owner(k)) == Some(to))
        .unwrap_or_else(|| panic!("no service {from} owns passes to {to}"))
}

/// Runs in 5 ms steps, for at most `max_ms`, until `reader` lists `count` instances of
/// `service`; returns how long after `new_owner` took `service` over that was (panics
/// if it never did).
fn listed_after_takeover(
    sim: &mut Sim,
    new_owner: &str,
    service: &ServiceKey,
    reader: &str,
    count: usize,
    max_ms: u64,
) -> u64 {
    let mut taken_at = None;
    for _ in 0..max_ms / 5 {
        sim.run_for(5);
        if taken_at.is_none() && sim.replica(&id(new_owner)).owner(service) == Some(id(new_owner)) {
            taken_at = Some(sim.now_ms());
        }
        if instances(sim, reader, service).len() == count {
            break;
        }
    }
    let taken_at = taken_at.unwrap_or_else(|| panic!("{new_owner} never took {service} over"));
    sim.now_ms() - taken_at
}

/// How node `at` sees node `of`.
fn member_state(sim: &Sim, at: &str, of: &str) -> MemberState {
    sim.replica(&id(at))
        .members()
        .into_iter()
        .find(|m| m.id == id(of))
        .unwrap_or_else(|| panic!("{of} is not a member of {at}"))
        .state
}

fn deregister(sim: &mut Sim, via: &str, service: &ServiceKey, ip: &str) -> WriteResult {
    let w = Write::Deregister {
        service: service.clone(),
        instance: InstanceSpec::new(ip, 8080).key(),
    };
    sim.write(&id(via), w)
}

/// Bug 4 of docs/reliability.md: a node resuming from a stall used to mark every peer
/// Down on its first (late) tick, own every service for a moment, and apply the writes
/// queued meanwhile without replicating them to anyone.
#[test]
fn writes_made_right_after_a_stall_are_replicated() {
    let mut sim = cluster(seed(21), &["a", "b", "c"]);
    sim.open_session(&id("c"), SessionId(1));
    let theirs: Vec<ServiceKey> = (0..60)
        .map(svc)
        .filter(|s| sim.replica(&id("c")).owner(s) != Some(id("c")))
        .take(5)
        .collect();
    sim.run_for(100);
    sim.freeze(&id("c"));
    sim.run_for(5_000);
    assert_eq!(
        sim.replica(&id("a")).ring().len(),
        2,
        "a still has c in its ring"
    );
    sim.thaw(&id("c"));
    // The requests that queued up during the stall are served right after it.
    assert_eq!(
        sim.replica(&id("c")).ring().len(),
        3,
        "c dropped its peers from its ring on resuming"
    );
    for (i, s) in theirs.iter().enumerate() {
        register(&mut sim, "c", s, &format!("10.0.1.{i}"), 1);
    }
    sim.run_for(200);
    for n in ["a", "b"] {
        for s in &theirs {
            assert_eq!(instances(&sim, n, s).len(), 1, "{s} not on {n}");
        }
    }
    assert_converged(&mut sim, 2_000);
}

/// Bug 6 of docs/reliability.md: deletions made while the owner was frozen never
/// reached it (anti-entropy asked a peer for its records only when the peer still held
/// live instances), and its stale copies spread back once the tombstones expired.
#[test]
fn deletions_made_while_the_owner_was_frozen_reach_it_and_stay_deleted() {
    let mut sim = cluster(seed(22), &["a", "b", "c"]);
    let services = owned_by(&sim, "c", 60);
    assert!(services.len() >= 4, "c owns too few of 60 services");
    let services = &services[..4];
    sim.open_session(&id("a"), SessionId(1));
    for s in services {
        for ip in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
            register(&mut sim, "a", s, ip, 1);
        }
    }
    assert_converged(&mut sim, 2_000);

    sim.freeze(&id("c"));
    sim.run_for(4_000);
    // The services moved to a and b; delete one instance of the first two, and every
    // instance of the last two (a copy holding only tombstones has digest 0).
    for (i, s) in services.iter().enumerate() {
        let ips: &[&str] = if i < 2 {
            &["10.0.0.1"]
        } else {
            &["10.0.0.1", "10.0.0.2", "10.0.0.3"]
        };
        for ip in ips {
            match deregister(&mut sim, "a", s, ip) {
                WriteResult::Applied(Some(_)) | WriteResult::Forwarded { .. } => {}
                other => panic!("deregister {s} {ip}: {other:?}"),
            }
        }
    }
    sim.run_for(1_000);
    sim.thaw(&id("c"));
    // Anti-entropy runs at once after a stall.
    sim.run_for(2_000);
    let expect = |i: usize| -> Vec<String> {
        if i < 2 {
            vec!["10.0.0.2".into(), "10.0.0.3".into()]
        } else {
            Vec::new()
        }
    };
    for (i, s) in services.iter().enumerate() {
        assert_eq!(
            instances(&sim, "c", s),
            expect(i),
            "{s} on c after the thaw"
        );
    }
    // Past the tombstones' lifetime nothing comes back.
    sim.run_for(70_000);
    assert_converged(&mut sim, 2_000);
    for n in ["a", "b", "c"] {
        for (i, s) in services.iter().enumerate() {
            assert_eq!(instances(&sim, n, s), expect(i), "{s} on {n} after 70 s");
        }
    }
}

/// Bug 3 of docs/reliability.md: a Deregister forwarded to an owner that just resumed
/// and does not hold the instance yet (it was registered during the freeze) deleted
/// nothing: the instance stayed registered on every other node.
#[test]
fn a_deregister_through_an_owner_that_just_resumed_deletes_everywhere() {
    let mut sim = cluster(seed(23), &["a", "b", "c"]);
    let services = owned_by(&sim, "c", 60);
    let s = services[0].clone();
    sim.open_session(&id("a"), SessionId(1));
    sim.run_for(100);
    sim.freeze(&id("c"));
    sim.run_for(4_000);
    register(&mut sim, "a", &s, "10.0.0.7", 1);
    sim.run_for(100);
    // Anti-entropy would repair c within a round; cut it so that the Deregister
    // reaches c first, as it did in the chaos run.
    sim.set_filter(Box::new(|_, to, msg| {
        to.as_str() == "c" && matches!(msg, PeerMsg::Repair { .. } | PeerMsg::Batch(_))
    }));
    sim.thaw(&id("c"));
    sim.run_for(100);
    assert_eq!(sim.replica(&id("a")).owner(&s), Some(id("c")));
    assert!(
        instances(&sim, "c", &s).is_empty(),
        "c got the instance already"
    );
    let WriteResult::Forwarded { to, id: fwd } = deregister(&mut sim, "a", &s, "10.0.0.7") else {
        panic!("a should forward to c");
    };
    assert_eq!(to, id("c"));
    sim.run_for(100);
    // c answers what its copy knows, and deletes the instance everywhere all the same.
    match sim.forward_outcome(&id("a"), fwd) {
        Some(ForwardOutcome::Rejected { code, .. }) if code == "not_found" => {}
        other => panic!("the owner answered {other:?}"),
    }
    sim.clear_filter();
    sim.run_for(6_000);
    assert_converged(&mut sim, 2_000);
    for n in ["a", "b", "c"] {
        assert!(instances(&sim, n, &s).is_empty(), "{s} still on {n}");
    }
}

/// Bug 9 of docs/reliability.md: an owner acknowledged a forwarded Deregister and was
/// killed before its next batch left. The deletion was lost with it, and the instance,
/// whose session lives on, stayed registered on every other node for good.
#[test]
fn a_write_acknowledged_by_an_owner_that_dies_at_once_is_not_lost() {
    // A long batch window: without the fix the batch would not leave before the kill.
    let mut sim = slow_batches(seed(24));
    let s = owned_by(&sim, "c", 60)[0].clone();
    sim.open_session(&id("a"), SessionId(1));
    register(&mut sim, "a", &s, "10.0.0.7", 1);
    sim.run_for(2_500);
    for n in ["a", "b", "c"] {
        assert_eq!(instances(&sim, n, &s).len(), 1, "{s} not on {n}");
    }
    let WriteResult::Forwarded { to, id: fwd } = deregister(&mut sim, "a", &s, "10.0.0.7") else {
        panic!("a should forward to c");
    };
    assert_eq!(to, id("c"));
    // The moment a (the client's home) has the answer, c dies.
    for _ in 0..200 {
        if sim.forward_outcome(&id("a"), fwd).is_some() {
            break;
        }
        sim.run_for(1);
    }
    match sim.forward_outcome(&id("a"), fwd) {
        Some(ForwardOutcome::Applied { .. }) => {}
        other => panic!("the owner answered {other:?}"),
    }
    sim.kill(&id("c"));
    sim.run_for(12_000);
    assert_converged(&mut sim, 10_000);
    for n in ["a", "b"] {
        assert!(instances(&sim, n, &s).is_empty(), "{s} still on {n}");
    }
}

/// A client's batch registration: the writes forwarded together are applied in order
/// and answered together, one outcome each (a bad one refused alone), and the sender
/// holds their operations by the time the answer arrives.
#[test]
fn writes_forwarded_together_are_answered_together() {
    let mut sim = slow_batches(seed(25));
    let services: Vec<ServiceKey> = owned_by(&sim, "c", 60).into_iter().take(3).collect();
    assert_eq!(services.len(), 3, "c owns too few of 60 services");
    sim.open_session(&id("a"), SessionId(1));
    let register = |s: &ServiceKey, port: u16| Write::Register {
        service: s.clone(),
        instance: InstanceSpec::new("10.0.0.9", port),
        session: SessionId(1),
    };
    let mut writes: Vec<Write> = services.iter().map(|s| register(s, 8080)).collect();
    writes.push(register(&services[0], 0));
    let fwd = sim.forward_many(&id("a"), &id("c"), writes);
    for _ in 0..200 {
        if sim.forward_many_outcomes(&id("a"), fwd).is_some() {
            break;
        }
        sim.run_for(1);
    }
    let outcomes = sim
        .forward_many_outcomes(&id("a"), fwd)
        .expect("no answer")
        .to_vec();
    assert_eq!(outcomes.len(), 4);
    for o in &outcomes[..3] {
        assert!(matches!(o, ForwardOutcome::Applied { .. }), "{o:?}");
    }
    match &outcomes[3] {
        ForwardOutcome::Rejected { code, .. } if code == "invalid_port" => {}
        other => panic!("port 0 was answered {other:?}"),
    }
    for s in &services {
        assert_eq!(
            instances(&sim, "a", s).len(),
            1,
            "a lacks {s} at the answer"
        );
    }
    assert_converged(&mut sim, 3_000);
    for s in &services {
        assert_eq!(instances(&sim, "b", s).len(), 1, "{s} not on b");
    }
}

/// An owner answers NotFound for an instance it does not hold; only while it is
/// settling does it also write a tombstone (a settled owner's copy is complete).
#[test]
fn only_a_settling_owner_writes_a_tombstone_for_what_it_does_not_hold() {
    let mut sim = cluster(seed(24), &["a", "b", "c"]);
    let s = owned_by(&sim, "a", 60)[0].clone();
    // Just formed: a's ring changed moments ago.
    assert!(sim.replica(&id("a")).is_settling(sim.now_ms()));
    match deregister(&mut sim, "a", &s, "10.9.9.8") {
        WriteResult::Rejected(e) => assert_eq!(e.code(), "not_found"),
        other => panic!("{other:?}"),
    }
    assert_eq!(sim.replica(&id("a")).registry().tombstone_count(), 1);
    sim.run_for(12_000);
    assert!(!sim.replica(&id("a")).is_settling(sim.now_ms()));
    let before = sim.replica(&id("a")).registry().tombstone_count();
    match deregister(&mut sim, "a", &s, "10.9.9.9") {
        WriteResult::Rejected(e) => assert_eq!(e.code(), "not_found"),
        other => panic!("{other:?}"),
    }
    assert_eq!(sim.replica(&id("a")).registry().tombstone_count(), before);
}

/// Bug 5 of docs/reliability.md: when the first of several dead members came back,
/// the survivors left self-preservation and deleted at once the instances of the
/// sessions whose homes were still down.
#[test]
fn leaving_self_preservation_gives_the_homes_still_down_a_grace_period() {
    let mut sim = five_homes(seed(25), 50);
    for n in ["c", "d", "e"] {
        sim.kill(&id(n));
    }
    sim.run_for(20_000);
    assert!(sim.replica(&id("a")).self_preservation_active());
    // The victims come back one at a time, 3 s apart; each one's clients resume there
    // once it is ready.
    for (k, n) in ["c", "d", "e"].iter().enumerate() {
        sim.add_node_with_seeds(n, vec![id("a")]);
        for _ in 0..30 {
            sim.run_for(100);
            for survivor in ["a", "b"] {
                assert_eq!(
                    sim.replica(&id(survivor)).registry().instance_count(),
                    50,
                    "{survivor} deleted instances {} ms after {n} came back",
                    sim.now_ms()
                );
            }
        }
        assert!(sim.replica(&id(n)).is_ready(), "{n} not ready in 3 s");
        for i in (0..50).filter(|i| i % 5 == 2 + k) {
            sim.open_session(&id(n), SessionId(i as u128));
        }
    }
    sim.run_for(15_000);
    assert_converged(&mut sim, 2_000);
    assert_eq!(sim.replica(&id("a")).registry().instance_count(), 50);
}

/// Bug 7 of docs/reliability.md: a node that became ready during a deletion served
/// the deleted instance until the next anti-entropy round (up to 5 s). Owners now send
/// their digests to a member as soon as it says it is ready.
#[test]
fn a_node_that_becomes_ready_gets_deletions_it_missed_at_once() {
    let mut sim = cluster(seed(26), &["a", "b", "c"]);
    let s = owned_by(&sim, "a", 60)[0].clone();
    sim.open_session(&id("a"), SessionId(1));
    for ip in ["10.0.0.1", "10.0.0.2"] {
        register(&mut sim, "a", &s, ip, 1);
    }
    assert_converged(&mut sim, 2_000);
    sim.kill(&id("c"));
    sim.run_for(4_000);
    // c restarts; batches to it are lost while it loads (the deletion below falls
    // between its snapshot and its being ready).
    sim.set_filter(Box::new(|_, to, msg| {
        to.as_str() == "c" && matches!(msg, PeerMsg::Batch(_))
    }));
    sim.add_node_with_seeds("c", vec![id("b")]);
    let mut deleted = false;
    for _ in 0..400 {
        sim.run_for(5);
        if !deleted && !instances(&sim, "c", &s).is_empty() {
            match deregister(&mut sim, "a", &s, "10.0.0.1") {
                WriteResult::Applied(Some(_)) => deleted = true,
                other => panic!("{other:?}"),
            }
        }
        if sim.replica(&id("c")).is_ready() {
            break;
        }
    }
    assert!(deleted && sim.replica(&id("c")).is_ready());
    // With the deletion's batch lost, and well within one anti-entropy interval (5 s).
    sim.run_for(300);
    assert_eq!(instances(&sim, "c", &s), vec!["10.0.0.2"]);
    sim.clear_filter();
}

/// Bug 8 of docs/reliability.md (the peer half): a forward that waited out its owner's
/// stall was applied on arrival, long after its sender had given up on it (and the
/// client had retried elsewhere and perhaps deregistered since). It is refused now.
#[test]
fn a_forward_that_waited_out_its_owners_stall_is_refused() {
    let mut sim = cluster(seed(27), &["a", "b", "c"]);
    let s = owned_by(&sim, "c", 60)[0].clone();
    sim.open_session(&id("a"), SessionId(1));
    sim.run_for(100);
    sim.freeze(&id("c"));
    let w = Write::Register {
        service: s.clone(),
        instance: InstanceSpec::new("10.0.0.8", 8080),
        session: SessionId(1),
    };
    let WriteResult::Forwarded { to, id: fwd } = sim.write(&id("a"), w) else {
        panic!("a should forward to c");
    };
    assert_eq!(to, id("c"));
    sim.run_for(5_000);
    sim.thaw(&id("c"));
    sim.run_for(200);
    match sim.forward_outcome(&id("a"), fwd) {
        Some(ForwardOutcome::Rejected { code, .. }) if code == "unavailable" => {}
        other => panic!("the stale forward got {other:?}"),
    }
    sim.run_for(6_000);
    for n in ["a", "b", "c"] {
        assert!(
            instances(&sim, n, &s).is_empty(),
            "the stale write was applied on {n}"
        );
    }
}

/// Snapshot chunks and repairs are bounded by operations, not only by services, so a
/// registry of large services travels in moderate messages (before, a chunk of 256
/// services of 100 instances exceeded the peer frame limit and was dropped, so a
/// node could not load or repair at that scale).
#[test]
fn snapshot_and_repair_messages_stay_within_the_operation_bound() {
    use std::cell::Cell;
    use std::rc::Rc;
    let config = Config {
        chunk_max_ops: 50,
        ..Config::default()
    };
    let mut sim = Sim::new(seed(28), config);
    for n in ["a", "b"] {
        sim.add_node(n);
    }
    sim.run_for(4_000);
    sim.open_session(&id("a"), SessionId(1));
    for i in 0..20 {
        for k in 0..30 {
            register(&mut sim, "a", &svc(i), &format!("10.0.{i}.{k}"), 1);
        }
    }
    assert_converged(&mut sim, 2_000);
    let largest = Rc::new(Cell::new(0usize));
    let seen = largest.clone();
    // Every batch to c is lost: it must load and be repaired in bounded messages.
    sim.set_filter(Box::new(move |_, to, msg| {
        let ops = match msg {
            PeerMsg::SnapshotChunk(c) => c.records.iter().map(|r| r.ops.len()).sum(),
            PeerMsg::Repair { records } => records.iter().map(|r| r.ops.len()).sum(),
            _ => 0,
        };
        seen.set(seen.get().max(ops));
        to.as_str() == "c" && matches!(msg, PeerMsg::Batch(_))
    }));
    sim.add_node("c");
    sim.run_for(4_000);
    assert!(sim.replica(&id("c")).is_ready());
    for i in 20..24 {
        for k in 0..30 {
            register(&mut sim, "a", &svc(i), &format!("10.1.{i}.{k}"), 1);
        }
    }
    assert_converged(&mut sim, 12_000);
    // A chunk ends once it holds 50 operations: at most 50 + one 30-instance service.
    assert!(
        largest.get() > 0 && largest.get() < 80,
        "largest message: {} operations",
        largest.get()
    );
}

/// The owned-services gauge counts over the ring ranges; it must agree with the owner
/// of every service, and the nodes' counts must add up to the registry.
#[test]
fn owned_service_counts_match_the_owners() {
    let mut sim = cluster(seed(29), &["a", "b", "c"]);
    sim.open_session(&id("a"), SessionId(1));
    for i in 0..100 {
        register(&mut sim, "a", &svc(i), "10.0.0.1", 1);
    }
    assert_converged(&mut sim, 2_000);
    let mut total = 0;
    for n in ["a", "b", "c"] {
        let r = sim.replica(&id(n));
        let by_owner = (0..100).filter(|&i| r.owns(&svc(i))).count();
        assert_eq!(r.owned_service_count(), by_owner, "{n}");
        total += by_owner;
    }
    assert_eq!(total, 100);
}

/// An anti-entropy exchange repairs at most `repair_max_services` services per peer,
/// quietest first, so that a registry under heavy writes (where many services differ
/// at any moment) is not resent every round; the rest follows in later rounds.
#[test]
fn anti_entropy_repairs_are_bounded_per_exchange() {
    use std::cell::Cell;
    use std::rc::Rc;
    let config = Config {
        repair_max_services: 10,
        ..Config::default()
    };
    let mut sim = Sim::new(seed(30), config);
    for n in ["a", "b"] {
        sim.add_node(n);
    }
    sim.run_for(4_000);
    let largest = Rc::new(Cell::new(0usize));
    let seen = largest.clone();
    // b loses every batch: only anti-entropy brings it a's writes.
    sim.set_filter(Box::new(move |_, to, msg| {
        if let PeerMsg::Repair { records } = msg {
            seen.set(seen.get().max(records.len()));
        }
        to.as_str() == "b" && matches!(msg, PeerMsg::Batch(_))
    }));
    sim.open_session(&id("a"), SessionId(1));
    let mine = owned_by(&sim, "a", 200);
    let mine = &mine[..mine.len().min(40)];
    for s in mine {
        register(&mut sim, "a", s, "10.0.0.1", 1);
    }
    sim.run_for(6_000);
    let on_b = mine
        .iter()
        .filter(|s| !instances(&sim, "b", s).is_empty())
        .count();
    assert!(
        on_b > 0 && on_b <= 20,
        "after one or two rounds b has {on_b} of {}",
        mine.len()
    );
    sim.run_for(30_000);
    let on_b = mine
        .iter()
        .filter(|s| !instances(&sim, "b", s).is_empty())
        .count();
    assert_eq!(on_b, mine.len());
    assert!(
        largest.get() <= 10,
        "a repair carried {} services",
        largest.get()
    );
}

/// Under a flood a node may process its peers' messages seconds after they arrived.
/// The transport reports that their bytes keep arriving, so the busy node does not take
/// its peers for dead (which would move their services and add work); a peer whose
/// bytes stop arriving still goes Down.
#[test]
fn a_peer_whose_bytes_keep_arriving_is_not_taken_for_dead() {
    let mut sim = cluster(seed(31), &["a", "b", "c"]);
    let (a, b, c) = (id("a"), id("b"), id("c"));
    // What b and c send to a is not processed (as if it waited in a's queue) ...
    sim.partition(&[&["a"], &["b", "c"]]);
    let down_after = Config::default().down_after_ms;
    let state = |sim: &Sim, of: &NodeId| {
        sim.replica(&a)
            .members()
            .into_iter()
            .find(|m| &m.id == of)
            .map(|m| m.state)
    };
    for _ in 0..(2 * down_after / 100) {
        sim.run_for(100);
        // ... but b's bytes are seen arriving; c's are not.
        let now = sim.now_ms();
        sim.replica_mut(&a).link_activity(&b, now);
    }
    assert_eq!(
        state(&sim, &b),
        Some(MemberState::Up),
        "b was taken for dead"
    );
    assert_eq!(state(&sim, &c), Some(MemberState::Down), "c stayed up");
    // Activity does not bring back a peer that is Down: a processed message does.
    let now = sim.now_ms();
    sim.replica_mut(&a).link_activity(&c, now);
    assert_eq!(state(&sim, &c), Some(MemberState::Down));
    sim.heal();
    sim.run_for(down_after);
    assert_eq!(state(&sim, &c), Some(MemberState::Up));
}

/// Instances of a session that no node ever announced (a lost announcement, a
/// client of a node that went away before telling anyone) are deleted by their
/// owners after the grace period, also when they arrive long after the owners'
/// sweeps settled on the sessions they know, and while nothing else changes.
/// Announced sessions keep theirs.
#[test]
fn instances_of_a_session_never_announced_go_after_the_grace_period() {
    let mut sim = cluster(seed(23), &["a", "b", "c"]);
    sim.open_session(&id("a"), SessionId(1));
    for i in 0..10 {
        register(&mut sim, "a", &svc(i), "10.0.0.1", 1);
    }
    // Many sweeps over the same sessions.
    sim.run_for(5_000);
    assert_converged(&mut sim, 1_000);

    for i in 10..20 {
        register(&mut sim, "b", &svc(i), "10.0.0.99", 99);
    }
    sim.run_for(1_000);
    assert_eq!(instances(&sim, "c", &svc(12)), vec!["10.0.0.99"]);

    sim.run_for(Config::default().session_grace_ms + 3_000);
    for node in ["a", "b", "c"] {
        for i in 10..20 {
            assert!(
                instances(&sim, node, &svc(i)).is_empty(),
                "{node} still holds svc-{i} of the session no node announced"
            );
        }
        for i in 0..10 {
            assert_eq!(instances(&sim, node, &svc(i)), vec!["10.0.0.1"], "{node}");
        }
    }
}

/// Under a steady stream of writes, the copies differ at any moment only by the batches
/// on their way: anti-entropy must see that and send no repairs (before, every round
/// resent whole the services written in it, which under a burst of registrations
/// stalled the nodes). A copy that really lost writes is still repaired.
#[test]
fn writes_on_their_way_are_not_repaired() {
    use std::cell::Cell;
    use std::rc::Rc;
    let mut sim = cluster(seed(31), &["a", "b", "c"]);
    sim.open_session(&id("a"), SessionId(1));
    let mine = owned_by(&sim, "a", 100);
    assert!(mine.len() >= 10, "a owns {} of 100 services", mine.len());
    let repaired = Rc::new(Cell::new(0usize));
    let seen = repaired.clone();
    sim.set_filter(Box::new(move |_, _, msg| {
        if let PeerMsg::Repair { records } = msg {
            seen.set(seen.get() + records.len());
        }
        false
    }));
    // Three anti-entropy rounds of one write every millisecond, each to a service
    // that a owns, in turn.
    for i in 0..16_000 {
        let s = &mine[i % mine.len()];
        register(
            &mut sim,
            "a",
            s,
            &format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256),
            1,
        );
        sim.run_for(1);
    }
    assert_converged(&mut sim, 2_000);
    assert_eq!(
        repaired.get(),
        0,
        "services repaired while nothing was lost"
    );

    // c loses a's batches for a while, during the writes: it is repaired once the
    // services are quiet.
    sim.set_filter(Box::new(|from, to, msg| {
        from.as_str() == "a" && to.as_str() == "c" && matches!(msg, PeerMsg::Batch(_))
    }));
    for i in 0..2_000 {
        let s = &mine[i % mine.len()];
        register(
            &mut sim,
            "a",
            s,
            &format!("10.200.{}.{}", i / 256, i % 256),
            1,
        );
        sim.run_for(1);
    }
    sim.clear_filter();
    let t = assert_converged(&mut sim, 12_000);
    eprintln!("repaired in {t} ms");
}

/// Bug 11 of docs/reliability.md: a home that resumed from a freeze announced the end
/// of a session on a link its peer had already given up; the link was replaced at
/// once, neither side having seen the other Down, and the announcement was never sent
/// again. The owner of the session's instance kept it, under a session it believed
/// live at a home that was up, for good.
#[test]
fn a_session_end_lost_with_its_link_reaches_the_owner_over_the_next_one() {
    let mut sim = cluster(seed(31), &["a", "b", "c"]);
    let service = first_owned_by(&sim, "b");
    sim.open_session(&id("a"), SessionId(7));
    register(&mut sim, "a", &service, "10.0.0.7", 7);
    assert_converged(&mut sim, 2_000);
    assert_eq!(instances(&sim, "b", &service), vec!["10.0.0.7"]);

    // The session's end leaves for b on a link that then dies: it is lost.
    sim.set_filter(Box::new(|from, to, msg| {
        from == &id("a")
            && to == &id("b")
            && matches!(msg, PeerMsg::Batch(b) if !b.sessions.is_empty())
    }));
    sim.close_session(&id("a"), SessionId(7), false);
    sim.run_for(100);
    sim.clear_filter();
    sim.partition(&[&["a"], &["b"]]);
    sim.run_for(200);
    sim.heal();
    // A new link, well within `suspect_after_ms`: neither saw the other Down.
    sim.run_for(1_000);
    for (x, y) in [("a", "b"), ("b", "a")] {
        assert_eq!(member_state(&sim, x, y), MemberState::Up, "{x} sees {y}");
    }

    sim.run_for(Config::default().session_grace_ms + 3_000);
    for node in ["a", "b", "c"] {
        assert!(
            instances(&sim, node, &service).is_empty(),
            "{node} still lists the instance of the session that ended"
        );
    }
}

/// Bug 12 of docs/reliability.md: a node that restarts loads its snapshot from one
/// peer, which may itself have missed writes (it was frozen, or had just restarted);
/// the node used to be ready, own services and serve reads from that copy at once, and
/// listed a deleted instance (and missed a new one) until anti-entropy caught up. It is
/// now ready only once the owners have compared the copy with theirs.
#[test]
fn a_restarted_node_is_ready_only_once_its_snapshot_agrees_with_the_owners() {
    let mut sim = cluster(seed(37), &["a", "b", "c"]);
    let service = first_owned_by(&sim, "a");
    sim.open_session(&id("a"), SessionId(1));
    register(&mut sim, "a", &service, "10.0.0.1", 1);
    register(&mut sim, "a", &service, "10.0.0.2", 1);
    assert_converged(&mut sim, 2_000);

    // b goes on hearing a's probes but nothing else: it misses what a writes next. The
    // restarting c cannot load its snapshot from a.
    sim.set_filter(Box::new(|from, to, msg| {
        let a_to_b = from == &id("a")
            && to == &id("b")
            && !matches!(msg, PeerMsg::Ping(_) | PeerMsg::Ack(_));
        let snapshot_from_a = from == &id("a") && matches!(msg, PeerMsg::SnapshotChunk(_));
        a_to_b || snapshot_from_a
    }));
    assert!(matches!(
        deregister(&mut sim, "a", &service, "10.0.0.1"),
        WriteResult::Applied(Some(_))
    ));
    register(&mut sim, "a", &service, "10.0.0.3", 1);
    sim.run_for(200);
    assert_eq!(instances(&sim, "b", &service), vec!["10.0.0.1", "10.0.0.2"]);
    assert_eq!(instances(&sim, "c", &service), vec!["10.0.0.2", "10.0.0.3"]);

    sim.kill(&id("c"));
    sim.run_for(200);
    sim.add_node_with_seeds("c", vec![id("b")]);
    for _ in 0..300 {
        sim.run_for(100);
        if sim.replica(&id("c")).is_ready() {
            break;
        }
    }
    assert!(sim.replica(&id("c")).is_ready(), "c did not become ready");
    let at_ready: Vec<String> = sim
        .dump_at_ready(&id("c"))
        .expect("c became ready")
        .iter()
        .filter(|s| s.key == service)
        .flat_map(|s| s.instances.iter().map(|(_, i)| i.ip.clone()))
        .collect();
    assert_eq!(
        at_ready,
        vec!["10.0.0.2", "10.0.0.3"],
        "c was ready with what the peer its snapshot came from held"
    );
}

/// Bug 13 of docs/reliability.md: a write applied by a node that did not own its service
/// in its own ring (its view lagged another's), and whose batch to a peer was lost with
/// a link, was repaired only by the next periodic round of the node that came to own it,
/// up to `anti_entropy_interval_ms` after the ring settled. A node whose ring loses a
/// member now compares its ranges at once.
#[test]
fn a_node_that_takes_over_a_range_compares_it_at_once() {
    // Periodic rounds far apart: only the one the ring change starts can repair b.
    let config = Config {
        anti_entropy_interval_ms: 60_000,
        ..Config::default()
    };
    let mut sim = cluster_with(seed(41), config, &["a", "b", "c"]);
    // A service c owns, and a owns once c is gone.
    let service = passing_to(&sim, "c", "a", &["a", "b"], 200);
    sim.open_session(&id("c"), SessionId(5));
    register(&mut sim, "c", &service, "10.0.0.5", 5);
    assert_converged(&mut sim, 2_000);

    // b misses c's next write; a has it. Then c dies.
    sim.set_filter(Box::new(|from, to, msg| {
        from == &id("c") && to == &id("b") && !matches!(msg, PeerMsg::Ping(_) | PeerMsg::Ack(_))
    }));
    register(&mut sim, "c", &service, "10.0.0.6", 5);
    sim.run_for(100);
    sim.clear_filter();
    assert_eq!(instances(&sim, "a", &service), vec!["10.0.0.5", "10.0.0.6"]);
    assert_eq!(instances(&sim, "b", &service), vec!["10.0.0.5"]);
    sim.kill(&id("c"));

    // a takes the range over when it sees c Down; b has the write a moment later.
    let waited = listed_after_takeover(&mut sim, "a", &service, "b", 2, 10_000);
    assert_eq!(instances(&sim, "b", &service), vec!["10.0.0.5", "10.0.0.6"]);
    assert!(
        waited <= 200,
        "b got the write {waited} ms after a took the range over"
    );
}

/// Bug 16 of docs/reliability.md: an owner acknowledged a forwarded write and died before
/// its batch left; the client's home held the write (bug 9), and the node that took the
/// range over got it from the home when it compared the range at once (bug 13), but
/// the other copies only at its next periodic round, up to `anti_entropy_interval_ms`
/// later. An owner that a repair gives something new in its own range now compares
/// that range with every peer at once.
#[test]
fn what_an_owner_learns_from_a_repair_reaches_the_other_copies_at_once() {
    // Periodic rounds far apart: only the rounds the takeover and the repair start can
    // spread the write.
    let config = Config {
        anti_entropy_interval_ms: 60_000,
        ..Config::default()
    };
    let mut sim = cluster_with(seed(44), config, &["a", "b", "c", "d"]);
    // A service c owns, and a owns once c is gone.
    let service = passing_to(&sim, "c", "a", &["a", "b", "d"], 400);
    sim.open_session(&id("d"), SessionId(7));
    register(&mut sim, "d", &service, "10.0.0.5", 7);
    assert_converged(&mut sim, 2_000);

    // c takes d's next write, which d forwards to it, and dies before its batch reaches
    // a or b: only d, the client's home, holds it.
    sim.set_filter(Box::new(|from, to, msg| {
        from == &id("c")
            && (to == &id("a") || to == &id("b"))
            && !matches!(msg, PeerMsg::Ping(_) | PeerMsg::Ack(_))
    }));
    let WriteResult::Forwarded { to, id: fwd } = sim.write(
        &id("d"),
        Write::Register {
            service: service.clone(),
            instance: InstanceSpec::new("10.0.0.6", 8080),
            session: SessionId(7),
        },
    ) else {
        panic!("d should forward to c");
    };
    assert_eq!(to, id("c"));
    for _ in 0..200 {
        if sim.forward_outcome(&id("d"), fwd).is_some() {
            break;
        }
        sim.run_for(1);
    }
    assert!(
        matches!(
            sim.forward_outcome(&id("d"), fwd),
            Some(ForwardOutcome::Applied { .. })
        ),
        "c applied the write"
    );
    sim.kill(&id("c"));
    sim.clear_filter();
    assert_eq!(instances(&sim, "d", &service), vec!["10.0.0.5", "10.0.0.6"]);
    for n in ["a", "b"] {
        assert_eq!(instances(&sim, n, &service), vec!["10.0.0.5"], "{n}");
    }

    // a takes the range over when it sees c Down and gets the write from d; b has it
    // a moment later.
    let waited = listed_after_takeover(&mut sim, "a", &service, "b", 2, 20_000);
    assert_eq!(instances(&sim, "a", &service), vec!["10.0.0.5", "10.0.0.6"]);
    assert_eq!(instances(&sim, "b", &service), vec!["10.0.0.5", "10.0.0.6"]);
    assert!(
        waited <= 1_000,
        "b got the write {waited} ms after a took the range over"
    );
}

/// Bug 15 of docs/reliability.md: an owner that saw a session's home Down, and was then
/// frozen for longer than the grace period, reaped the session's instances on its first
/// tick after resuming, though the home had been back for seconds (it had not heard
/// yet); the home put them back (it holds the session live), but they were gone
/// everywhere meanwhile. A stall no longer counts towards a grace period.
#[test]
fn an_owner_that_resumes_from_a_stall_does_not_reap_at_once() {
    let mut sim = cluster(seed(43), &["a", "b", "c"]);
    let service = first_owned_by(&sim, "a");
    sim.open_session(&id("b"), SessionId(9));
    register(&mut sim, "b", &service, "10.0.0.9", 9);
    assert_converged(&mut sim, 2_000);

    // The home is frozen long enough for a to see it Down and start the session's
    // grace clock; then a is frozen, past the grace period, and b resumes meanwhile.
    sim.freeze(&id("b"));
    sim.run_for(4_000);
    assert_eq!(
        member_state(&sim, "a", "b"),
        MemberState::Down,
        "a sees b Down"
    );
    sim.freeze(&id("a"));
    sim.run_for(1_000);
    sim.thaw(&id("b"));
    sim.run_for(Config::default().session_grace_ms + 2_000);
    sim.thaw(&id("a"));
    for step in 0..600 {
        sim.run_for(5);
        assert_eq!(
            instances(&sim, "c", &service),
            vec!["10.0.0.9"],
            "{} ms after a resumed, c lost the instance of the live session",
            5 * (step + 1)
        );
    }
}
