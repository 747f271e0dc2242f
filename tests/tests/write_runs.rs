//! Single writes that a client sends without waiting reach the node together, and the
//! node takes them as one run (one lock, one forward per owner, which may share its
//! message with the runs of other sessions). Each still gets its own answer, a refused
//! one its own error, and they apply in the order sent.

use std::collections::HashMap;
use std::time::Duration;

use shoal_proto::{ClientFrame, ErrorCode, Request, Response, ServerFrame};
use shoal_storage::ServiceKey;
use shoal_tests::*;

/// Generous bound for answers and replication.
const PATIENCE: Duration = Duration::from_secs(20);

/// What a request of the burst must be answered.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Applied,
    Refused(ErrorCode),
    View,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_sent_together_are_answered_one_by_one_in_order() {
    let cluster = Cluster::start(3).await;
    cluster.wait_until_converged().await;
    // Owned by the node the client talks to, and by each of the two others.
    let services: Vec<ServiceKey> = vec![
        cluster.service_owned_by(0, "run-here").await,
        cluster.service_owned_by(1, "run-there").await,
        cluster.service_owned_by(2, "run-far").await,
    ];
    let (mut client, _) = RawClient::session(cluster.node(0)).await;

    let mut requests: Vec<(Request, Expect)> = Vec::new();
    for i in 0..60u16 {
        let service = services[i as usize % 3].clone();
        let ip = format!("10.1.0.{i}");
        let (instance, expect) = if i % 10 == 7 {
            // Refused by the owner (here, or at the end of a forward).
            let mut bad = inst(&ip, 8080);
            bad.port = 0;
            (bad, Expect::Refused(ErrorCode::InvalidPort))
        } else {
            (inst(&ip, 8080), Expect::Applied)
        };
        requests.push((Request::Register { service, instance }, expect));
        if i == 30 {
            // A query in the middle ends one run; the next starts after it.
            requests.push((
                Request::Query {
                    service: services[0].clone(),
                    clusters: vec![],
                    healthy_only: false,
                },
                Expect::View,
            ));
        }
    }
    // Registered, then deregistered in the same burst, on each owner: gone at the end.
    for (i, service) in services.iter().enumerate() {
        let instance = inst(&format!("10.2.0.{i}"), 9090);
        let key = instance.key();
        requests.push((
            Request::Register {
                service: service.clone(),
                instance,
            },
            Expect::Applied,
        ));
        requests.push((
            Request::Deregister {
                service: service.clone(),
                instance: key,
            },
            Expect::Applied,
        ));
    }

    // One buffer, one write: the node reads many of them at once.
    let mut bytes = Vec::new();
    let mut expected: HashMap<u64, Expect> = HashMap::new();
    for (i, (body, expect)) in requests.iter().enumerate() {
        let id = 1_000 + i as u64;
        expected.insert(id, *expect);
        let frame = ClientFrame::Request {
            id,
            body: body.clone(),
        };
        bytes.extend(shoal_proto::encode_frame(&frame, 1 << 20).unwrap());
    }
    client.send_raw(&bytes).await;

    let writes = requests.iter().filter(|(_, e)| *e != Expect::View).count();
    while !expected.is_empty() {
        let (id, result) = match client.next_event(PATIENCE).await {
            Event::Frame(ServerFrame::Response { id, result }) => (id, result),
            other => panic!("expected answers, got {other:?}"),
        };
        let expect = expected
            .remove(&id)
            .unwrap_or_else(|| panic!("a second answer, or one to no request: {id}"));
        match (expect, &result) {
            (Expect::Applied, Ok(Response::Applied { revision })) => assert!(*revision > 0),
            (Expect::Refused(code), Err(e)) => {
                assert_eq!(e.code, code, "request {id}: {e}");
                assert!(!e.message.is_empty());
            }
            (Expect::View, Ok(Response::View(_))) => {}
            _ => panic!("request {id}: expected {expect:?}, got {result:?}"),
        }
    }

    // Every node ends with the applied registrations and nothing else.
    let mut want: Vec<Vec<(String, u16)>> = vec![Vec::new(); 3];
    for i in 0..60u16 {
        if i % 10 != 7 {
            want[i as usize % 3].push(addr(&format!("10.1.0.{i}"), 8080));
        }
    }
    for node in cluster.nodes() {
        for (service, want) in services.iter().zip(&want) {
            wait_for_listing(node, PATIENCE, service, want).await;
        }
    }

    // The writes went as runs, not one by one: fewer runs than writes.
    let metrics = cluster.node(0).get("/metrics").await.body;
    let runs = counter(&metrics, "shoal_write_run_ops_count");
    let ops = counter(&metrics, "shoal_write_run_ops_sum");
    assert_eq!(ops, writes as f64, "every write went through a run");
    assert!(
        runs < writes as f64,
        "{writes} writes sent together went as {runs} runs"
    );
    // Each answer counted by its kind and outcome: 54 + 3 registrations applied, 6
    // refused, 3 deregistrations, the query; the forwarded ones came back in replies.
    for (series, want) in [
        (
            r#"shoal_requests_total{kind="register",outcome="ok"}"#,
            57.0,
        ),
        (
            r#"shoal_requests_total{kind="register",outcome="error"}"#,
            6.0,
        ),
        (
            r#"shoal_requests_total{kind="deregister",outcome="ok"}"#,
            3.0,
        ),
        (r#"shoal_requests_total{kind="query",outcome="ok"}"#, 1.0),
    ] {
        assert_eq!(counter(&metrics, series), want, "{series}");
    }
    assert!(
        counter(
            &metrics,
            r#"shoal_peer_messages_received_total{kind="forward_many_reply"}"#
        ) >= 2.0,
        "the writes forwarded to the two other owners were answered"
    );

    // The session still works one request at a time.
    let revision = client.register(&services[1], inst("10.3.0.1", 80)).await;
    assert!(revision > 0);
}

/// Many sessions send their bursts through one node at once: the runs they forward to
/// the same owner may leave in one message, and each session still gets exactly its own
/// outcomes (each session's refused writes sit at other places of its burst), and every
/// node ends with exactly the writes applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runs_of_many_sessions_forwarded_together_get_their_own_answers() {
    const SESSIONS: u16 = 16;
    const WRITES: u16 = 20;
    let cluster = Cluster::start(3).await;
    cluster.wait_until_converged().await;
    let services = [
        cluster.service_owned_by(1, "runs-one").await,
        cluster.service_owned_by(2, "runs-two").await,
    ];
    let mut clients = Vec::new();
    for _ in 0..SESSIONS {
        clients.push(RawClient::session(cluster.node(0)).await.0);
    }
    // Session s refuses the writes at places i with i % 5 == s % 5 (port 0).
    let refused = |s: u16, i: u16| i % 5 == s % 5;
    let ip = |s: u16, i: u16| format!("10.5.{s}.{i}");
    let bursts: Vec<Vec<u8>> = (0..SESSIONS)
        .map(|s| {
            let mut bytes = Vec::new();
            for i in 0..WRITES {
                let mut instance = inst(&ip(s, i), 8080);
                if refused(s, i) {
                    instance.port = 0;
                }
                let frame = ClientFrame::Request {
                    id: u64::from(i),
                    body: Request::Register {
                        service: services[usize::from(i % 2)].clone(),
                        instance,
                    },
                };
                bytes.extend(shoal_proto::encode_frame(&frame, 1 << 20).unwrap());
            }
            bytes
        })
        .collect();
    // Every session sends its burst at once, then reads its answers.
    let sessions = clients
        .into_iter()
        .zip(bursts)
        .enumerate()
        .map(|(s, (mut client, burst))| {
            tokio::spawn(async move {
                let s = s as u16;
                client.send_raw(&burst).await;
                let mut answered = std::collections::BTreeMap::new();
                while answered.len() < usize::from(WRITES) {
                    match client.next_event(PATIENCE).await {
                        Event::Frame(ServerFrame::Response { id, result }) => {
                            assert!(
                                answered.insert(id, result).is_none(),
                                "session {s}: a second answer to {id}"
                            );
                        }
                        other => panic!("session {s}: expected answers, got {other:?}"),
                    }
                }
                for (id, result) in answered {
                    let i = u16::try_from(id).expect("an id of the burst");
                    match (refused(s, i), &result) {
                        (false, Ok(Response::Applied { revision })) => assert!(*revision > 0),
                        (true, Err(e)) if e.code == ErrorCode::InvalidPort => {}
                        _ => panic!("session {s}, write {i}: got {result:?}"),
                    }
                }
                client
            })
        });
    let mut clients = Vec::new();
    for session in sessions.collect::<Vec<_>>() {
        clients.push(session.await.expect("a session's check failed"));
    }

    let mut want: Vec<Vec<(String, u16)>> = vec![Vec::new(); 2];
    for s in 0..SESSIONS {
        for i in (0..WRITES).filter(|&i| !refused(s, i)) {
            want[usize::from(i % 2)].push(addr(&ip(s, i), 8080));
        }
    }
    for node in cluster.nodes() {
        for (service, want) in services.iter().zip(&want) {
            wait_for_listing(node, PATIENCE, service, want).await;
        }
    }
    drop(clients);
}

/// Writes forwarded to an owner that stalls (SIGSTOP) but stays in the ring (its peers
/// are told to wait minutes before they call it Down) are answered as a whole within
/// about two forward timeouts: a burst of single writes and a RegisterMany of 100 each
/// get `Unavailable` for every write (retry), none waits for the others one by one.
/// The node keeps serving its other sessions meanwhile, and once the owner runs again
/// writes to it are applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_forwarded_to_a_stalled_owner_are_answered_unavailable_within_two_timeouts() {
    const FORWARD_TIMEOUT_MS: u64 = 1_000;
    const WRITES: usize = 100;
    let (cluster, dir) = stall_tolerant_cluster(FORWARD_TIMEOUT_MS).await;
    let stalled = cluster.service_owned_by(1, "stalled").await;
    let here = cluster.service_owned_by(0, "unstalled").await;
    let (mut client, _) = RawClient::session(cluster.node(0)).await;
    let (mut other, _) = RawClient::session(cluster.node(0)).await;

    send_signal("STOP", cluster.node(1).pid());
    let instance = |i: usize| inst(&format!("10.5.{}.{}", i / 200, i % 200), 8080);
    // Ids 1..=WRITES: single writes; id 0: one RegisterMany of WRITES more.
    let mut bytes = Vec::new();
    let mut frames = vec![ClientFrame::Request {
        id: 0,
        body: Request::RegisterMany {
            items: (0..WRITES)
                .map(|i| (stalled.clone(), instance(WRITES + i)))
                .collect(),
        },
    }];
    for i in 0..WRITES {
        frames.push(ClientFrame::Request {
            id: 1 + i as u64,
            body: Request::Register {
                service: stalled.clone(),
                instance: instance(i),
            },
        });
    }
    for frame in &frames {
        bytes.extend(shoal_proto::encode_frame(frame, 1 << 20).unwrap());
    }
    client.send_raw(&bytes).await;

    // Another session of the same node is served while they wait.
    other.register(&here, inst("10.6.0.1", 8080)).await;

    // Together the writes take two forward timeouts. Routed again one by one, each
    // with its own attempts, they took 13-17 s here. The bound: five forward timeouts.
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_millis(5 * FORWARD_TIMEOUT_MS);
    let mut answered = [false; WRITES + 1];
    for _ in 0..=WRITES {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let (id, result) = match client.next_event(left).await {
            Event::Frame(ServerFrame::Response { id, result }) => (id, result),
            other => panic!("expected answers, got {other:?}"),
        };
        assert!(!answered[id as usize], "a second answer to {id}");
        answered[id as usize] = true;
        let outcomes = match (id, result) {
            (0, Ok(Response::AppliedMany(outcomes))) => outcomes,
            (0, r) => panic!("the RegisterMany: {r:?}"),
            (_, r) => vec![r.map(|_| 0)],
        };
        for r in outcomes {
            let e = r.expect_err("the owner is stalled: no write can be applied");
            assert_eq!(e.code, ErrorCode::Unavailable, "request {id}: {e}");
        }
    }
    println!("{} writes answered in {:?}", 2 * WRITES, started.elapsed());

    // The owner runs again: the link carries its answers again.
    send_signal("CONT", cluster.node(1).pid());
    let thawed = tokio::time::Instant::now();
    loop {
        match other
            .request(Request::Register {
                service: stalled.clone(),
                instance: inst("10.6.0.2", 8080),
            })
            .await
        {
            Ok(Response::Applied { revision }) => {
                assert!(revision > 0);
                break;
            }
            Err(e) if e.code == ErrorCode::Unavailable && thawed.elapsed() < PATIENCE => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            r => panic!("a write to the thawed owner: {r:?}"),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Three nodes that wait minutes before they suspect a silent peer (so a stalled owner
/// stays in the ring), with this forward timeout. Returns the directory of their
/// configuration file too.
async fn stall_tolerant_cluster(forward_timeout_ms: u64) -> (Cluster, std::path::PathBuf) {
    stall_tolerant_cluster_with(forward_timeout_ms, NodeOptions::default()).await
}

/// [`stall_tolerant_cluster`] with these node options besides.
async fn stall_tolerant_cluster_with(
    forward_timeout_ms: u64,
    base: NodeOptions,
) -> (Cluster, std::path::PathBuf) {
    let dir = unique_temp_dir("shoal-test-stall-config");
    let config = dir.join("shoal.toml");
    std::fs::write(
        &config,
        "[replication]\nsuspect_after_ms = 120000\ndown_after_ms = 240000\n",
    )
    .unwrap();
    let cluster = Cluster::start_with(
        3,
        base.arg("--config")
            .arg(&config.display().to_string())
            .arg("--forward-timeout-ms")
            .arg(&forward_timeout_ms.to_string()),
    )
    .await;
    cluster.wait_until_converged().await;
    (cluster, dir)
}

/// A run of writes to three owners, one of them stalled (SIGSTOP): the writes applied
/// here and those the live owner applied are answered at once, while the stalled
/// owner's still wait (the forward timeout is a minute). Once it runs again it answers
/// them, applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_owner_does_not_hold_up_the_answers_of_the_others() {
    const WRITES: u64 = 30;
    let (cluster, dir) = stall_tolerant_cluster(60_000).await;
    let here = cluster.service_owned_by(0, "mixed-here").await;
    let stalled = cluster.service_owned_by(1, "mixed-stalled").await;
    let live = cluster.service_owned_by(2, "mixed-live").await;
    let (mut client, _) = RawClient::session(cluster.node(0)).await;

    send_signal("STOP", cluster.node(1).pid());
    // Interleaved, in one buffer: ids 1000.. here, 2000.. to the stalled owner, 3000..
    // to the live one.
    let mut bytes = Vec::new();
    for i in 0..WRITES {
        for (base, service) in [(1_000, &here), (2_000, &stalled), (3_000, &live)] {
            let frame = ClientFrame::Request {
                id: base + i,
                body: Request::Register {
                    service: service.clone(),
                    instance: inst(&format!("10.7.0.{i}"), 8080),
                },
            };
            bytes.extend(shoal_proto::encode_frame(&frame, 1 << 20).unwrap());
        }
    }
    client.send_raw(&bytes).await;

    let answer = async |client: &mut RawClient| match client.next_event(PATIENCE).await {
        Event::Frame(ServerFrame::Response { id, result }) => (id, result),
        other => panic!("expected answers, got {other:?}"),
    };
    let mut seen = HashMap::new();
    for _ in 0..2 * WRITES {
        let (id, result) = answer(&mut client).await;
        assert!(
            !(2_000..3_000).contains(&id),
            "write {id} to the stalled owner was answered ({result:?}) before the others"
        );
        assert!(
            matches!(result, Ok(Response::Applied { .. })),
            "{id}: {result:?}"
        );
        assert!(seen.insert(id, ()).is_none(), "a second answer to {id}");
    }

    send_signal("CONT", cluster.node(1).pid());
    for _ in 0..WRITES {
        let (id, result) = answer(&mut client).await;
        assert!((2_000..3_000).contains(&id), "{id} answered twice");
        assert!(
            matches!(result, Ok(Response::Applied { revision }) if revision > 0),
            "{id}: {result:?}"
        );
        assert!(seen.insert(id, ()).is_none(), "a second answer to {id}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The answers to a run of writes, some applied by the node the client talks to and
/// some forwarded to each of the two other owners, leave the node together, in one
/// write: the client reads them all at once (one packet, where it was one for those
/// applied here and one per owner).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_answers_to_a_run_of_writes_leave_the_node_together() {
    let cluster = Cluster::start(3).await;
    cluster.wait_until_converged().await;
    let services = [
        cluster.service_owned_by(0, "together-here").await,
        cluster.service_owned_by(1, "together-there").await,
        cluster.service_owned_by(2, "together-far").await,
    ];
    let (mut client, _) = RawClient::session(cluster.node(0)).await;
    for round in 0..5u64 {
        // Six writes, two per owner, in one buffer of well under a packet.
        let mut bytes = Vec::new();
        let mut ids = Vec::new();
        for (k, service) in services.iter().enumerate() {
            for j in 0..2u64 {
                let id = 1_000 + 100 * round + 10 * k as u64 + j;
                let frame = ClientFrame::Request {
                    id,
                    body: Request::Register {
                        service: service.clone(),
                        instance: inst(&format!("10.8.{round}.{}", 10 * k as u64 + j), 8080),
                    },
                };
                // Structs as arrays, as the SDK sends them.
                bytes.extend(shoal_proto::encode_frame_compact(&frame, 1 << 20).unwrap());
                ids.push(id);
            }
        }
        assert!(
            bytes.len() < 1_000,
            "the run must fit in one packet: {}",
            bytes.len()
        );
        client.send_raw(&bytes).await;
        for _ in 0..ids.len() {
            match client.next_event(PATIENCE).await {
                Event::Frame(ServerFrame::Response { id, result }) => assert!(
                    matches!(result, Ok(Response::Applied { .. })),
                    "{id}: {result:?}"
                ),
                other => panic!("expected answers, got {other:?}"),
            }
        }
        let reads: Vec<Option<u64>> = ids.iter().map(|id| client.read_of(*id)).collect();
        assert!(
            reads.iter().all(|r| r.is_some() && *r == reads[0]),
            "round {round}: the answers to {ids:?} came in reads {reads:?}"
        );
    }
}

/// Bug 14 of docs/reliability.md: a home that stalled while a write it had forwarded
/// awaited its owner's answer routed the write again when it resumed, with a fresh date
/// that the owner's age check accepted, though the client had long given up on it (and
/// could have deregistered the instance through another node since). Now a write that
/// waited out its home's stall is answered Unavailable, not routed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_waited_out_its_homes_stall_is_not_routed_again() {
    // The ring does not change while nodes are frozen; a stall of 2 s counts as one
    // (half the idle timeout).
    let (mut cluster, dir) = stall_tolerant_cluster_with(
        1_000,
        NodeOptions::default()
            .idle_timeout_ms(4_000)
            .keep_alive_interval_ms(1_000),
    )
    .await;
    let service = cluster.service_owned_by(1, "stalled-home").await;
    let (mut client, _) = RawClient::session(cluster.node(0)).await;

    // The owner is frozen: the write forwarded to it waits for an answer.
    let forwarded = async |node: &Node| {
        counter(
            &node.get("/metrics").await.body,
            "shoal_forwarded_writes_total",
        )
    };
    let before = forwarded(cluster.node(0)).await;
    send_signal("STOP", cluster.node(1).pid());
    let frame = ClientFrame::Request {
        id: 1,
        body: Request::Register {
            service: service.clone(),
            instance: inst("10.8.0.1", 8080),
        },
    };
    client
        .send_raw(&shoal_proto::encode_frame(&frame, 1 << 20).unwrap())
        .await;
    wait_for("the home forwarded the write", PATIENCE, async || {
        forwarded(cluster.node(0)).await > before
    })
    .await;
    // Then the home is frozen, past its forward timeout, while the owner dies and comes
    // back: the forward will never be answered.
    send_signal("STOP", cluster.node(0).pid());
    cluster.kill9(1);
    cluster.restart(1).await;
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    send_signal("CONT", cluster.node(0).pid());

    match client.next_event(PATIENCE).await {
        Event::Frame(ServerFrame::Response { id: 1, result }) => assert!(
            matches!(&result, Err(e) if e.code == ErrorCode::Unavailable),
            "the write that waited out the stall: {result:?}"
        ),
        // Closed for the stall before its answer: not applied either.
        Event::Failed(_) | Event::End => {}
        other => panic!("expected the write's answer, got {other:?}"),
    }
    // Routed again, it would be applied within a few milliseconds.
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    for i in 0..3 {
        assert!(
            cluster
                .node(i)
                .instance(&service, "10.8.0.1", 8080)
                .await
                .is_none(),
            "node {i} lists the write that waited out its home's stall"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A node that comes out of a stall closes at once the client connections opened
/// before it (their requests would be refused anyway), not at each one's next request
/// or idle timeout, and ends their sessions there (disconnected: their instances stay
/// for the grace period, for the clients to resume): it does not go on announcing
/// sessions live at itself whose clients may have moved on during the stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stalled_closes_its_clients_connections_at_once() {
    let cluster = Cluster::start_with(
        3,
        NodeOptions::default()
            .idle_timeout_ms(4_000)
            .keep_alive_interval_ms(1_000),
    )
    .await;
    cluster.wait_until_converged().await;
    let service = cluster.service_owned_by(1, "stalled-client").await;
    let (mut client, _) = RawClient::session(cluster.node(0)).await;
    client.register(&service, inst("10.8.1.1", 8080)).await;

    // Half the idle timeout (2 s) and more: a stall.
    send_signal("STOP", cluster.node(0).pid());
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    send_signal("CONT", cluster.node(0).pid());
    match client.next_event(Duration::from_secs(2)).await {
        Event::Failed(_) | Event::End => {}
        other => panic!("expected the connection closed for the stall, got {other:?}"),
    }
    // The session is disconnected, not gone: its instance stays for the grace period.
    assert!(cluster
        .node(2)
        .instance(&service, "10.8.1.1", 8080)
        .await
        .is_some());
}
