//! The short chaos suite (part of `make test`): fixed seeds, real node processes, a
//! steady load of SDK and CLI clients, and the invariant checkers of
//! `shoal_tests::chaos` watching every node throughout. See docs/reliability.md.
//!
//! Replay a failure with the seed it printed:
//! `SHOAL_CHAOS_SEED=<seed> cargo test -p shoal-tests --test chaos -- --nocapture <test>`.
//!
//! The long run `chaos_long` (many seeds, longer schedules) is ignored here and run by
//! `make chaos`: `cargo test -p shoal-tests --test chaos -- --ignored --nocapture chaos_long`.

use shoal_tests::chaos::*;

/// (a) One node at a time is killed (-9) and restarted, or frozen (SIGSTOP) and thawed,
/// for 40 s on a 3-node cluster while 4 clients churn registrations, doomed clients
/// crash and a subscriber per node checks every push.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_restart_freeze_three_nodes() {
    let _one_at_a_time = exclusive().await;
    let seed = chaos_seed(7);
    let schedule = ScheduleSpec::kill_and_freeze(3, 40_000).generate(seed);
    let scenario = Scenario::new(
        "kill-restart-freeze",
        3,
        Mode::Loopback,
        schedule,
        LoadSpec::steady(3, 4),
    );
    run(scenario).await.assert_ok();
}

/// (b) Full-cluster restart: every node killed (-9) at once and restarted while the
/// clients keep running. The registry is rebuilt from the clients (they fail over,
/// resume their sessions on the new nodes and register again); nothing a live client
/// registered is lost for good, nothing a crashed client registered comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_cluster_restart() {
    let _one_at_a_time = exclusive().await;
    let seed = chaos_seed(11);
    let scenario = Scenario::new(
        "full-cluster-restart",
        3,
        Mode::Loopback,
        Schedule::full_restart(seed, 3),
        LoadSpec::steady(3, 4),
    );
    run(scenario).await.assert_ok();
}

/// (c) Self-preservation: 3 of 5 nodes killed at once. The 2 survivors turn
/// self-preservation on and keep the whole registry (instances of clients homed on the
/// dead nodes included) for 20 s, far past the grace period; writes keep working on
/// them. The victims come back one at a time, 3 s apart: no live client's instance may
/// vanish meanwhile (its home is on its way back), the mode ends, and the instances of
/// the clients that died with the nodes are deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_preservation_three_of_five() {
    let _one_at_a_time = exclusive().await;
    let seed = chaos_seed(5);
    let (schedule, victims) = Schedule::self_preservation(seed);
    let survivors: Vec<usize> = (0..5).filter(|i| !victims.contains(i)).collect();
    // Two clients homed on each node (and only there: those of the victims cannot fail
    // over), 6 instances each; one more on each survivor keeps writing.
    let mut clients = Vec::new();
    for node in 0..5 {
        for _ in 0..2 {
            clients.push(ClientPlan {
                servers: vec![node],
                min_held: 6,
                max_held: 6,
                pause_ms: (500, 1_000),
                churn: false,
            });
        }
    }
    for &s in &survivors {
        clients.push(ClientPlan {
            servers: vec![s],
            min_held: 1,
            max_held: 4,
            pause_ms: (300, 900),
            churn: true,
        });
    }
    let load = LoadSpec {
        services: 8,
        clients,
        sdk_subscriber: true,
    };
    let report = run(Scenario::new(
        "self-preservation",
        5,
        Mode::Loopback,
        schedule,
        load,
    ))
    .await;

    // What /v1/node said on the survivors while most of the cluster was gone.
    let killed = report
        .executed_at("kill -9")
        .expect("the kill was carried out");
    let restarted = report
        .executed_at("restart")
        .expect("the restart was carried out");
    let mut problems = Vec::new();
    for &s in &survivors {
        let during = report.samples_between(s, killed + 6_000, restarted);
        if during.len() < 10 {
            problems.push(format!(
                "n{s}: only {} samples while preserving",
                during.len()
            ));
        }
        if let Some(off) = during.iter().find(|x| !x.self_preservation) {
            problems.push(format!("n{s}: self_preservation false at +{} ms", off.ms));
        }
        // 60 held instances + 6 of the doomed clients + the writers' (at least 1 each).
        if let Some(low) = during.iter().find(|x| x.instances < 66) {
            problems.push(format!(
                "n{s}: only {} instances at +{} ms",
                low.instances, low.ms
            ));
        }
    }
    for i in 0..5 {
        let after = report.samples_between(i, restarted + 15_000, u64::MAX);
        if let Some(on) = after.iter().find(|x| x.self_preservation) {
            problems.push(format!("n{i}: self_preservation still on at +{} ms", on.ms));
        }
    }
    for p in &problems {
        println!("self-preservation: {p}");
    }
    report.assert_ok();
    assert!(
        problems.is_empty(),
        "self-preservation (seed {seed}, victims {victims:?}): {problems:#?}"
    );
}

// ---------------------------------------------------------------------------------------
// Regressions: each bug the chaos suite found, reduced to a deterministic scenario.
// ---------------------------------------------------------------------------------------

mod regressions {
    use std::time::{Duration, Instant};

    use shoal_client::{Client, ClientConfig};
    use shoal_storage::{InstanceSpec, ServiceKey};
    use shoal_tests::chaos::*;
    use shoal_tests::{inst, svc, Node, NodeOptions, RawClient};

    fn node_args() -> Vec<String> {
        shoal_tests::chaos::node_args()
    }

    /// Found by `kill_restart_freeze_three_nodes` (seed 7): a node that resumes after
    /// a freeze owns its services again before it has caught up. A Deregister routed to
    /// it for an instance registered while it was frozen was answered NotFound and
    /// deleted nothing: the instance stayed registered on every other node for good
    /// (its session is alive). Now the owner still answers from its copy, but deletes
    /// the instance everywhere.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deregister_through_an_owner_that_just_resumed_deletes_everywhere() {
        let _one_at_a_time = exclusive().await;
        let mut c = ChaosCluster::start(3, Mode::Loopback, &node_args())
            .await
            .unwrap();
        let service = c.service_owned_by(2, 0).await;
        let client = Client::connect(ClientConfig::new([c.quic(2).to_string()], c.ca_file()))
            .await
            .unwrap();
        c.freeze(0);
        // n0 is down for the others after 2.5 s; its services move.
        tokio::time::sleep(Duration::from_secs(6)).await;
        client
            .register(&service, InstanceSpec::new("10.5.0.1", 4000))
            .await
            .unwrap();
        c.thaw(0);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let answer = client
            .deregister(&service, &InstanceSpec::new("10.5.0.1", 4000).key())
            .await;
        let started = Instant::now();
        let mut left = c.holders(&service, 4000).await;
        while !left.is_empty() && started.elapsed() < Duration::from_secs(15) {
            tokio::time::sleep(Duration::from_millis(250)).await;
            left = c.holders(&service, 4000).await;
        }
        // The owner may answer NotFound (its copy does not hold the instance yet), but
        // the instance must be gone everywhere.
        let answered = match &answer {
            Ok(_) => true,
            Err(shoal_client::ClientError::Server(b)) => b.code == shoal_proto::ErrorCode::NotFound,
            Err(_) => false,
        };
        assert!(
            answered && left.is_empty(),
            "Deregister answered {answer:?}; 15 s later the instance is still on nodes {left:?}"
        );
    }

    /// Found while reducing `kill_restart_freeze_three_nodes` (seed 7): a node that
    /// resumes after a stall (SIGSTOP here; a VM pause or a long GC in production)
    /// first finds every peer silent for the length of the stall and marks them down,
    /// then drains the requests that queued up meanwhile while its ring holds only
    /// itself: it applies and acknowledges them as their owner, and sends them to no
    /// peer (changes are queued only for peers that are not down). They spread by
    /// anti-entropy at best; if the node dies first they are lost.
    ///
    /// Since the fix of bug 8, a 4 s stall (past half the 5 s idle timeout) also makes
    /// the node refuse those requests and close the connection; the SDK sends them
    /// again. So this test checks the outcome end to end (every write acknowledged and
    /// on every node within 2 s); the engine's own half of bug 4 is pinned by the
    /// simulator scenario `writes_made_right_after_a_stall_are_replicated`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_queued_during_a_stall_reach_the_other_nodes() {
        let _one_at_a_time = exclusive().await;
        let mut c = ChaosCluster::start(3, Mode::Loopback, &node_args())
            .await
            .unwrap();
        let client = Client::connect(
            ClientConfig::new([c.quic(0).to_string()], c.ca_file())
                .with_request_timeout(Duration::from_secs(30)),
        )
        .await
        .unwrap();
        c.freeze(0);
        let mut pending = Vec::new();
        for i in 0..8u16 {
            let client = client.clone();
            pending.push(tokio::spawn(async move {
                let service = ServiceKey::named(format!("stalled-{i}"));
                let r = client
                    .register(&service, InstanceSpec::new("10.5.0.4", 5000 + i))
                    .await;
                (service, 5000 + i, r.is_ok(), Instant::now())
            }));
        }
        tokio::time::sleep(Duration::from_secs(4)).await;
        c.thaw(0);
        // The node refuses the requests that waited out its stall (longer than half
        // the idle timeout) and closes the connection; the SDK reconnects, resumes and
        // sends them again. Every one is acknowledged in the end...
        let mut acked = Vec::new();
        let mut last = Instant::now();
        for p in pending {
            let (service, port, ok, at) = p.await.unwrap();
            assert!(ok, "registration {port} failed");
            acked.push((service, port));
            last = last.max(at);
        }
        // ...and on every node within the replication bound of the chaos checkers (2 s).
        tokio::time::sleep_until((last + Duration::from_millis(2_100)).into()).await;
        let mut absent = Vec::new();
        for (service, port) in &acked {
            let on = c.holders(service, *port).await;
            if on != vec![0, 1, 2] {
                absent.push(format!("{} :{port} only on {on:?}", service.service));
            }
        }
        assert!(
            absent.is_empty(),
            "2 s after being acknowledged, {} of {} registrations are missing on other nodes: {absent:?}",
            absent.len(),
            acked.len()
        );
    }

    /// Found by the long run (seeds 100, 101, 104, 105: "stale", then "final-extra" on
    /// every node): instances deregistered while a node was frozen stayed on that node
    /// after it resumed, in the services it owns again (anti-entropy, run by owners,
    /// never carried the deletions to it), and about 60 s later, once the others had
    /// dropped their tombstones (`tombstone_ttl_ms`), its live copies spread back to
    /// every node: deleted instances of a live session came back for good.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deletions_made_while_a_node_was_frozen_reach_it() {
        let _one_at_a_time = exclusive().await;
        let mut c = ChaosCluster::start(3, Mode::Loopback, &node_args())
            .await
            .unwrap();
        let client = Client::connect(ClientConfig::new([c.quic(1).to_string()], c.ca_file()))
            .await
            .unwrap();
        let services: Vec<ServiceKey> = (0..12)
            .map(|k| ServiceKey::named(format!("frozen-{k}")))
            .collect();
        for (i, s) in services.iter().enumerate() {
            client
                .register(s, InstanceSpec::new("10.5.0.5", 6000 + i as u16))
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        c.freeze(2);
        // n2 is down for the others after 2.5 s; its services move.
        tokio::time::sleep(Duration::from_secs(4)).await;
        for (i, s) in services.iter().enumerate() {
            client
                .deregister(s, &InstanceSpec::new("10.5.0.5", 6000 + i as u16).key())
                .await
                .unwrap();
        }
        c.thaw(2);
        // The bound the chaos checkers give a resumed node (12 s), and some.
        let started = Instant::now();
        let mut left = Vec::new();
        while started.elapsed() < Duration::from_secs(20) {
            left.clear();
            for (i, s) in services.iter().enumerate() {
                let on = c.holders(s, 6000 + i as u16).await;
                if !on.is_empty() {
                    left.push(format!("{} on {on:?}", s.service));
                }
            }
            if left.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert!(
            left.is_empty(),
            "20 s after n2 resumed, deregistered instances are still listed: {left:?}"
        );
    }

    /// Found by every scenario (the raw subscribers' revision check): when a service
    /// loses its last instance, the push carried revision 0 (the view of a service that
    /// does not exist) instead of the removal's revision, so revisions went backwards
    /// on the subscription and a client ordering pushes by revision would ignore the
    /// removal and keep the last instance.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_push_that_empties_a_service_has_a_higher_revision() {
        let node = Node::start(NodeOptions::default()).await;
        let service = svc("emptied");
        let (mut watcher, _) = RawClient::session(&node).await;
        let (mut writer, _) = RawClient::session(&node).await;
        watcher.subscribe(&service).await;
        writer.register(&service, inst("10.5.0.3", 4002)).await;
        let first = watcher.next_push(Duration::from_secs(10)).await;
        writer
            .deregister(&service, inst("10.5.0.3", 4002).key())
            .await;
        let second = watcher.next_push(Duration::from_secs(10)).await;
        assert!(second.instances.is_empty());
        assert!(
            second.revision > first.revision,
            "the push that emptied the service has revision {} after {}",
            second.revision,
            first.revision
        );
    }
}

/// The long run (`make chaos`): many seeds, longer schedules, every kind of scenario.
/// `SHOAL_CHAOS_RUNS` seeds (default 10) from `SHOAL_CHAOS_SEED` on (default: from the
/// clock); with only `SHOAL_CHAOS_SEED` set it replays that one seed. The seed picks
/// the scenario (seed % 5): kill/freeze on 3 nodes, kill/freeze on 5 nodes with two
/// out at once, full-cluster restart, self-preservation, and random partitions with
/// kills and freezes in network namespaces (skipped without root). Prints a table for
/// docs/reliability.md; fails if any run found a violation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run with `make chaos` or --ignored"]
async fn chaos_long() {
    let _one_at_a_time = exclusive().await;
    let given = std::env::var("SHOAL_CHAOS_SEED")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let runs: u64 = std::env::var("SHOAL_CHAOS_RUNS")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(if given.is_some() { 1 } else { 10 });
    let base = given.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() % 100_000)
            .unwrap_or(0)
    });
    println!("chaos long run: {runs} seed(s) from {base}");
    let mut reports = Vec::new();
    for seed in base..base + runs {
        let scenario = long_scenario(seed);
        let report = run(scenario).await;
        println!("{}", report.summary());
        if !report.violations.is_empty() {
            println!("{}", report.violations.render(30));
        }
        reports.push(report);
    }
    println!("\n| seed | scenario | faults | registrations acked / deregistrations | instances of crashed clients | convergence | violations |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for r in &reports {
        println!("{}", r.table_row());
    }
    println!("\nviolations by kind over the run: {:?}", tally(&reports));
    let failed: Vec<u64> = reports
        .iter()
        .filter(|r| r.failed())
        .map(|r| r.seed)
        .collect();
    assert!(
        failed.is_empty(),
        "chaos long run: violations with seeds {failed:?}; replay one with `make chaos SEED=<seed>`"
    );
}

/// The scenario of a long-run seed.
fn long_scenario(seed: u64) -> Scenario {
    match seed % 5 {
        0 => {
            let mut spec = ScheduleSpec::kill_and_freeze(3, 90_000);
            spec.doomed = 8;
            Scenario::new(
                "long-kill-freeze-3",
                3,
                Mode::Loopback,
                spec.generate(seed),
                LoadSpec::steady(3, 5),
            )
        }
        1 => {
            let mut spec = ScheduleSpec::kill_and_freeze(5, 90_000);
            spec.max_faulty = 2;
            spec.doomed = 8;
            Scenario::new(
                "long-kill-freeze-5",
                5,
                Mode::Loopback,
                spec.generate(seed),
                LoadSpec::steady(5, 6),
            )
        }
        2 => Scenario::new(
            "long-full-restart",
            3,
            Mode::Loopback,
            Schedule::full_restart(seed, 3),
            LoadSpec::steady(3, 5),
        ),
        3 => {
            let (schedule, _) = Schedule::self_preservation(seed);
            Scenario::new(
                "long-self-preservation",
                5,
                Mode::Loopback,
                schedule,
                LoadSpec::steady(5, 6),
            )
        }
        _ => {
            let spec = ScheduleSpec {
                nodes: 5,
                duration_ms: 90_000,
                max_faulty: 1,
                kills: true,
                freezes: true,
                partitions: true,
                doomed: 8,
                gap_ms: (2_000, 6_000),
            };
            Scenario::new(
                "long-partitions",
                5,
                Mode::Netns,
                spec.generate(seed),
                LoadSpec::steady(5, 6),
            )
        }
    }
}
