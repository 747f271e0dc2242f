//! Replication across a 3-node cluster of real processes: a write made through any node
//! is read on every node; a subscriber homed on one node is pushed the writes made
//! through another; a deregistration propagates; and bad input sent to a node that does
//! not own the service still gets its typed error and changes nothing anywhere.

use std::time::Duration;

use shoal_client::{Client, ClientError, QueryOptions, Subscription};
use shoal_proto::ErrorCode;
use shoal_storage::{ServiceKey, ServiceView, DEFAULT_GROUP};
use shoal_tests::*;

/// Generous bound for a change to reach every node (replication batches leave within
/// milliseconds; anti-entropy repairs within 5 s).
const PATIENCE: Duration = Duration::from_secs(30);

/// Waits until the subscription's view satisfies `wanted`; returns it.
async fn view_until(
    sub: &mut Subscription,
    what: &str,
    wanted: impl Fn(&ServiceView) -> bool,
) -> ServiceView {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let current = sub.current();
        if wanted(&current) {
            return current;
        }
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the subscription ended while waiting for {what}"),
            Err(_) => panic!(
                "no push with {what} within {PATIENCE:?}; last view {:?}",
                sub.current()
            ),
        }
    }
}

fn code_of(result: Result<u64, ClientError>) -> Option<ErrorCode> {
    match result {
        Err(e) => e.code(),
        Ok(revision) => panic!("expected a refusal, got Applied {{ revision: {revision} }}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_any_node_is_read_on_every_node() {
    let cluster = Cluster::start(3).await;
    cluster.wait_until_converged().await;
    let orders = svc("orders");
    let owner = cluster.node(0).owner_of(&orders).await.expect("a ring");

    // One client homed on each node registers one instance of the same service: the
    // owner applies one write itself, the other two nodes forward theirs to it.
    let mut clients: Vec<Client> = Vec::new();
    let mut expected = Vec::new();
    for i in 0..3 {
        let client = cluster.node(i).client().await;
        assert_eq!(
            client.welcome().expect("connected").node_id.as_str(),
            cluster.node(i).id()
        );
        let ip = format!("10.0.0.{}", i + 1);
        let mut spec = inst(&ip, 8080);
        spec.weight = 2.5;
        spec.metadata
            .insert("via".into(), cluster.node(i).id().to_string());
        client
            .register(&orders, spec)
            .await
            .unwrap_or_else(|e| panic!("register through {}: {e}", cluster.node(i).id()));
        expected.push(addr(&ip, 8080));
        clients.push(client);
    }
    println!("orders is owned by {owner}");

    // Every node serves all three from its own copy, with every field intact.
    for i in 0..3 {
        wait_for_listing(cluster.node(i), PATIENCE, &orders, &expected).await;
        for (k, (ip, port)) in expected.iter().enumerate() {
            let got = cluster
                .node(i)
                .instance(&orders, ip, *port)
                .await
                .expect("listed above");
            assert_eq!(got["weight"], 2.5, "{got}");
            assert_eq!(got["metadata"]["via"], cluster.node(k).id(), "{got}");
        }
    }
    cluster.wait_until_converged().await;

    // The SDK's query, answered by each home node, agrees.
    for client in &clients {
        let view = client
            .query(&orders, QueryOptions::all())
            .await
            .expect("query");
        assert_eq!(addrs(&view), expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_on_one_node_is_pushed_the_writes_made_through_another() {
    let cluster = Cluster::start(3).await;
    cluster.wait_until_converged().await;
    // Subscriber homed on n0, writer homed on n1, the service owned by n2: the write is
    // forwarded to n2, applied there and replicated to n0, which pushes it.
    let payments = cluster.service_owned_by(2, "payments").await;
    let subscriber = cluster.node(0).client().await;
    let writer = cluster.node(1).client().await;

    let mut sub = subscriber.subscribe(&payments).await.expect("subscribe");
    assert!(sub.current().instances.is_empty(), "{:?}", sub.current());

    writer
        .register(&payments, inst("10.0.1.1", 9000))
        .await
        .expect("register through n1");
    let view = view_until(&mut sub, "the instance registered through n1", |v| {
        addrs(v) == vec![addr("10.0.1.1", 9000)]
    })
    .await;
    assert!(view.revision > 0);

    // An update made through n1 is pushed too.
    let mut changed = inst("10.0.1.1", 9000);
    changed.weight = 7.0;
    writer.update(&payments, changed).await.expect("update");
    view_until(&mut sub, "weight 7", |v| {
        v.instances.len() == 1 && v.instances[0].weight == 7.0
    })
    .await;

    // The deregistration propagates: pushed to n0's subscriber, gone on every node.
    writer
        .deregister(&payments, &inst("10.0.1.1", 9000).key())
        .await
        .expect("deregister through n1");
    view_until(&mut sub, "no instance", |v| v.instances.is_empty()).await;
    for i in 0..3 {
        wait_for_listing(cluster.node(i), PATIENCE, &payments, &[]).await;
    }
    cluster.wait_until_converged().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_through_a_node_that_does_not_own_the_service_gets_the_typed_error() {
    let cluster = Cluster::start_with(3, NodeOptions::default().namespace("staging")).await;
    cluster.wait_until_converged().await;
    let home = cluster.node(0).id().to_string();
    let not_home = |owner: &str| owner != home;
    let inventory = cluster
        .find_service(
            |k| ServiceKey::new("staging", DEFAULT_GROUP, format!("inventory-{k}")),
            not_home,
        )
        .await;
    let unknown_ns = cluster
        .find_service(
            |k| ServiceKey::new("no-such-namespace", DEFAULT_GROUP, format!("inventory-{k}")),
            not_home,
        )
        .await;
    let client = cluster.node(0).client().await;

    // Each invalid write is refused with its own code, though the owner is elsewhere.
    assert_eq!(
        code_of(client.register(&inventory, inst("10.0.2.1", 0)).await),
        Some(ErrorCode::InvalidPort)
    );
    let mut heavy = inst("10.0.2.1", 80);
    heavy.weight = 10_001.0;
    assert_eq!(
        code_of(client.register(&inventory, heavy).await),
        Some(ErrorCode::InvalidWeight)
    );
    assert_eq!(
        code_of(client.register(&inventory, inst("not-an-ip", 80)).await),
        Some(ErrorCode::InvalidIp)
    );
    let mut chatty = inst("10.0.2.1", 80);
    for k in 0..1000 {
        chatty.metadata.insert(format!("k{k}"), "v".into());
    }
    assert_eq!(
        code_of(client.register(&inventory, chatty).await),
        Some(ErrorCode::InvalidMetadata)
    );
    assert_eq!(
        code_of(client.register(&unknown_ns, inst("10.0.2.1", 80)).await),
        Some(ErrorCode::UnknownNamespace)
    );
    assert_eq!(
        code_of(
            client
                .register(&svc("no spaces allowed"), inst("10.0.2.1", 80))
                .await
        ),
        Some(ErrorCode::InvalidName)
    );
    assert_eq!(
        code_of(
            client
                .deregister(&inventory, &inst("10.0.2.1", 80).key())
                .await
        ),
        Some(ErrorCode::NotFound)
    );
    assert_eq!(
        code_of(client.update(&inventory, inst("10.0.2.1", 80)).await),
        Some(ErrorCode::NotFound)
    );

    // The node keeps serving: a valid write through the same node and session works.
    client
        .register(&inventory, inst("10.0.2.1", 80))
        .await
        .expect("a valid write after the refused ones");
    for i in 0..3 {
        wait_for_listing(
            cluster.node(i),
            PATIENCE,
            &inventory,
            &[addr("10.0.2.1", 80)],
        )
        .await;
    }

    // Nothing refused left a trace on any node: every dump holds that one instance only.
    cluster.wait_until_converged().await;
    for (i, dump) in cluster.dumps().await {
        let services = dump.as_array().cloned().unwrap_or_default();
        assert_eq!(services.len(), 1, "{}: {dump}", cluster.node(i).id());
        assert_eq!(
            instances_in_dump(&dump, &inventory).len(),
            1,
            "{}: {dump}",
            cluster.node(i).id()
        );
    }
}

/// A session's requests are served in parallel with the forwarded writes that wait for
/// their owner: a write to a frozen owner does not hold up the session's next requests
/// (before, a session was served one request at a time, so one slow owner stalled
/// everything its clients did through that node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_waiting_for_a_frozen_owner_does_not_hold_up_the_session() {
    use shoal_proto::{ClientFrame, Request, Response, ServerFrame};
    let cluster = Cluster::start(3).await;
    let mut raw = RawClient::connect(cluster.node(0)).await;
    raw.hello(None).await;
    // A service node-2 owns, as node-1 sees the ring.
    let owner = cluster.node(2).id().to_string();
    let mut service = None;
    for k in 0..1000 {
        let s = ServiceKey::named(format!("frozen-owner-{k}"));
        if let Response::Ring(r) = raw
            .ok(Request::Ring {
                service: Some(s.clone()),
            })
            .await
        {
            if r.owner.as_ref().map(|o| o.as_str()) == Some(owner.as_str()) {
                service = Some(s);
                break;
            }
        }
    }
    let service = service.expect("node-2 owns none of 1000 services");
    let pid = cluster.node(2).pid();
    send_signal("STOP", pid);
    raw.send_frame(&ClientFrame::Request {
        id: 1_000,
        body: Request::Register {
            service: service.clone(),
            instance: shoal_storage::InstanceSpec::new("10.6.0.1", 7000),
        },
    })
    .await;
    // The next request is answered while the Register waits for node-2.
    let pong = raw.request(Request::Ping).await;
    send_signal("CONT", pid);
    assert_eq!(pong, Ok(Response::Done));
    // Then the Register gets its answer (applied, or Unavailable if node-2 stayed
    // silent past the forward timeout twice).
    match raw.next_event(PATIENCE).await {
        Event::Frame(ServerFrame::Response { id: 1_000, result }) => match result {
            Ok(Response::Applied { .. }) => {}
            Err(e) => assert_eq!(e.code, ErrorCode::Unavailable, "{e}"),
            Ok(other) => panic!("Register answered {other:?}"),
        },
        other => panic!("expected the Register's answer, got {other:?}"),
    }
}

/// RegisterMany: one request registers instances of many services, whichever node
/// owns each (the home applies its own and forwards the rest, one message per owner);
/// a bad item is refused alone; every node then lists them all, under the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_many_spreads_over_owners_and_refuses_bad_items_alone() {
    let cluster = Cluster::start(3).await;
    cluster.wait_until_converged().await;
    let client = cluster.node(0).client().await;
    let services: Vec<ServiceKey> = (0..30).map(|k| svc(&format!("batch-{k}"))).collect();
    let mut items = Vec::new();
    for (k, s) in services.iter().enumerate() {
        for j in 0..10u16 {
            items.push((s.clone(), inst(&format!("10.9.{k}.1"), 9000 + j)));
        }
    }
    items.insert(17, (services[3].clone(), inst("10.9.3.1", 0)));
    items.insert(40, (svc("bad name!"), inst("10.9.99.1", 9000)));
    let outcomes = client.register_many(items).await.expect("an answer");
    assert_eq!(outcomes.len(), 302);
    for (k, o) in outcomes.iter().enumerate() {
        match k {
            17 => assert_eq!(
                o.as_ref().err().and_then(|e| e.code()),
                Some(ErrorCode::InvalidPort)
            ),
            40 => assert_eq!(
                o.as_ref().err().and_then(|e| e.code()),
                Some(ErrorCode::InvalidName)
            ),
            _ => assert!(o.is_ok(), "item {k}: {o:?}"),
        }
    }
    // The refused items are not held for re-registration; the others are.
    assert_eq!(client.registrations().len(), 300);
    for i in 0..3 {
        for (k, s) in services.iter().enumerate() {
            let expected: Vec<(String, u16)> = (0..10u16)
                .map(|j| (format!("10.9.{k}.1"), 9000 + j))
                .collect();
            wait_for_listing(cluster.node(i), PATIENCE, s, &expected).await;
        }
    }
    // Another client reads them, without the session's id: a session id resumes a
    // session, so answers never carry one.
    let reader = cluster.node(1).client().await;
    let view = reader
        .query(&services[0], QueryOptions::all())
        .await
        .unwrap();
    assert_eq!(view.instances.len(), 10);
    for i in &view.instances {
        assert_eq!(
            i.lease,
            shoal_storage::Lease::Session(shoal_storage::SessionId(0)),
            "{i:?}"
        );
    }
    assert_ne!(client.session_id(), shoal_storage::SessionId(0));
    reader.close().await.unwrap();
    // A clean close removes them all, everywhere.
    client.close().await.unwrap();
    for i in 0..3 {
        for s in &services {
            wait_for_listing(cluster.node(i), PATIENCE, s, &[]).await;
        }
    }
}
