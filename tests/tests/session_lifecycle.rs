//! The life of a client session against a real node, at the protocol level: register,
//! query, subscribe, deregister; Goodbye; an unclean disconnect and its grace period;
//! a silent client found by the idle timeout; resuming a session; Ttl instances.

use std::time::Duration;

use shoal_proto::{ErrorCode, Request, Response};
use shoal_storage::{InstanceKey, ServiceView, TtlLease};
use shoal_tests::*;

/// Generous bound for anything the node does on its own clock.
const PATIENCE: Duration = Duration::from_secs(20);

fn key(ip: &str, port: u16) -> InstanceKey {
    inst(ip, port).key()
}

fn healthy_of(view: &ServiceView, ip: &str, port: u16) -> Option<bool> {
    view.instances
        .iter()
        .find(|i| i.ip == ip && i.port == port)
        .map(|i| i.healthy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_query_subscribe_push_deregister() {
    let node = Node::start(NodeOptions::default()).await;
    let orders = svc("orders");

    let (mut a, welcome) = RawClient::session(&node).await;
    assert!(!welcome.resumed);
    assert_eq!(welcome.node_id.as_str(), node.id());
    assert_eq!(
        welcome.max_frame_bytes as usize,
        shoal_proto::DEFAULT_MAX_FRAME_BYTES
    );
    let r1 = a.register(&orders, inst("10.0.0.1", 8080)).await;
    let view = a.query(&orders).await;
    assert_eq!(addrs(&view), vec![addr("10.0.0.1", 8080)]);
    assert_eq!(view.revision, r1);

    // A subscribes; a second client registers another instance of the same service.
    let current = a.subscribe(&orders).await;
    assert_eq!(addrs(&current), vec![addr("10.0.0.1", 8080)]);
    let (mut b, _) = RawClient::session(&node).await;
    let r2 = b.register(&orders, inst("10.0.0.2", 8080)).await;
    assert!(r2 > r1, "revisions grow: {r1} then {r2}");
    let push = a.next_push(PATIENCE).await;
    assert_eq!(
        addrs(&push),
        vec![addr("10.0.0.1", 8080), addr("10.0.0.2", 8080)]
    );
    assert_eq!(push.revision, r2);

    // B reads the same from its own query, and the HTTP side agrees.
    assert_eq!(addrs(&b.query(&orders).await), addrs(&push));
    assert_eq!(node.instances(&orders).await.len(), 2);

    // A deregisters its instance: A's subscription sees only B's left.
    let r3 = a.deregister(&orders, key("10.0.0.1", 8080)).await;
    let push = a.next_push(PATIENCE).await;
    assert_eq!(addrs(&push), vec![addr("10.0.0.2", 8080)]);
    assert_eq!(push.revision, r3);
    assert!(node.instance(&orders, "10.0.0.1", 8080).await.is_none());

    // Deregistering it again is NotFound and changes nothing.
    let again = a
        .request(Request::Deregister {
            service: orders.clone(),
            instance: key("10.0.0.1", 8080),
        })
        .await;
    assert_err(&again, ErrorCode::NotFound);

    // After Unsubscribe no more pushes: B's next write is not pushed to A.
    assert_eq!(
        a.ok(Request::Unsubscribe {
            service: orders.clone()
        })
        .await,
        Response::Done
    );
    b.register(&orders, inst("10.0.0.3", 8080)).await;
    a.ping().await;
    assert_eq!(a.take_pushes(), vec![], "push after Unsubscribe");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goodbye_removes_the_sessions_instances_at_once() {
    // A long grace period: if the instances go, it is Goodbye that removed them.
    let node = Node::start(NodeOptions::default().session_grace_ms(120_000)).await;
    let orders = svc("orders");
    let payments = svc("payments");

    let (mut watcher, _) = RawClient::session(&node).await;
    watcher.subscribe(&orders).await;

    let (mut a, _) = RawClient::session(&node).await;
    a.register(&orders, inst("10.0.0.1", 8080)).await;
    a.register(&payments, inst("10.0.0.1", 9090)).await;
    assert_eq!(addrs(&watcher.next_push(PATIENCE).await).len(), 1);

    a.goodbye().await;

    let push = watcher.next_push(PATIENCE).await;
    assert_eq!(addrs(&push), vec![], "the subscriber sees the instance go");
    wait_for("both instances gone from the dump", PATIENCE, || async {
        node.instances(&orders).await.is_empty() && node.instances(&payments).await.is_empty()
    })
    .await;
    wait_for("the session forgotten", PATIENCE, || async {
        node.info().await["sessions"] == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unclean_close_keeps_instances_for_the_grace_period_then_removes_them() {
    let node = Node::start(
        NodeOptions::default()
            .session_grace_ms(1_500)
            .idle_timeout_ms(2_000)
            .keep_alive_interval_ms(500),
    )
    .await;
    let orders = svc("orders");
    let (mut watcher, _) = RawClient::session(&node).await;
    watcher.subscribe(&orders).await;

    let (mut a, welcome) = RawClient::session(&node).await;
    assert_eq!(welcome.session_grace_ms, 1_500);
    a.register(&orders, inst("10.0.0.1", 8080)).await;
    watcher.next_push(PATIENCE).await;

    // The connection ends without Goodbye.
    a.close_abruptly().await;
    assert!(
        node.instance(&orders, "10.0.0.1", 8080).await.is_some(),
        "the instance must outlive an unclean close by the grace period"
    );
    wait_for(
        "the instance removed after the grace period",
        PATIENCE,
        || async { node.instance(&orders, "10.0.0.1", 8080).await.is_none() },
    )
    .await;
    let push = watcher.next_push(PATIENCE).await;
    assert_eq!(addrs(&push), vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_silent_is_found_by_the_idle_timeout() {
    // The client's packets stop (host crash, cable cut): no close ever reaches the
    // node. It must notice through its idle timeout, then wait out the grace period.
    let node = Node::start(
        NodeOptions::default()
            .session_grace_ms(1_500)
            .idle_timeout_ms(2_000)
            .keep_alive_interval_ms(500),
    )
    .await;
    let orders = svc("orders");
    let relay = UdpRelay::start(node.quic_addr()).await;
    let mut a = RawClient::connect_to(relay.addr(), node.ca_file(), ClientOptions::default()).await;
    a.hello(None).await;
    a.register(&orders, inst("10.0.0.1", 8080)).await;

    relay.cut();
    a.abandon();
    assert!(
        node.instance(&orders, "10.0.0.1", 8080).await.is_some(),
        "the node cannot know yet"
    );
    wait_for(
        "the silent client's instance removed (idle timeout + grace)",
        PATIENCE,
        || async { node.instance(&orders, "10.0.0.1", 8080).await.is_none() },
    )
    .await;
    wait_for("its session forgotten", PATIENCE, || async {
        node.info().await["sessions"] == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_within_the_grace_period_keeps_the_instances() {
    let node = Node::start(NodeOptions::default().session_grace_ms(30_000)).await;
    let orders = svc("orders");
    let (mut a, first) = RawClient::session(&node).await;
    a.register(&orders, inst("10.0.0.1", 8080)).await;

    let watch = PresenceWatch::start(&node, &orders, "10.0.0.1", 8080);
    a.close_abruptly().await;
    // Let the node see the close and a few dumps pass during the gap.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut again = RawClient::connect(&node).await;
    let welcome = again.hello(Some(first.session_id)).await;
    assert!(
        welcome.resumed,
        "a session inside its grace period is resumed"
    );
    assert_eq!(welcome.session_id, first.session_id);
    let view = again.query(&orders).await;
    assert_eq!(addrs(&view), vec![addr("10.0.0.1", 8080)]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let report = watch.stop().await;
    assert!(report.polls > 0, "the watch read no dump");
    assert_eq!(report.missing, 0, "the instance went missing: {report:?}");

    // The resumed session still owns its instance: Goodbye removes it.
    again.goodbye().await;
    wait_for("the instance removed by Goodbye", PATIENCE, || async {
        node.instance(&orders, "10.0.0.1", 8080).await.is_none()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_session_wins_over_the_end_of_its_old_connection() {
    // The client's old path goes silent, and it resumes on a new connection while the
    // node still holds the old one. When the old one times out later, and its grace
    // period passes, nothing may be removed: the session lives on the new connection.
    let grace_ms = 1_500;
    let idle_ms = 2_000;
    let node = Node::start(
        NodeOptions::default()
            .session_grace_ms(grace_ms)
            .idle_timeout_ms(idle_ms)
            .keep_alive_interval_ms(500),
    )
    .await;
    let orders = svc("orders");
    let relay = UdpRelay::start(node.quic_addr()).await;
    let mut old =
        RawClient::connect_to(relay.addr(), node.ca_file(), ClientOptions::default()).await;
    let first = old.hello(None).await;
    old.register(&orders, inst("10.0.0.1", 8080)).await;

    let watch = PresenceWatch::start(&node, &orders, "10.0.0.1", 8080);
    relay.cut();
    let mut new = RawClient::connect(&node).await;
    let welcome = new.hello(Some(first.session_id)).await;
    assert!(welcome.resumed);
    old.abandon();

    // Outlast the old connection's idle timeout and a whole grace period after it.
    tokio::time::sleep(Duration::from_millis(idle_ms + grace_ms + 2_000)).await;
    new.ping().await;
    let report = watch.stop().await;
    assert_eq!(
        report.missing, 0,
        "the stale connection's end removed a resumed session's instance: {report:?}"
    );
    assert_eq!(node.info().await["sessions"], 1);

    // The session's own end still works: an unclean close of the new connection
    // removes the instance after the grace period.
    new.close_abruptly().await;
    wait_for(
        "the instance removed after the new grace",
        PATIENCE,
        || async { node.instance(&orders, "10.0.0.1", 8080).await.is_none() },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_an_unknown_session_is_a_fresh_start_with_that_id() {
    // What a client does after its home node died: resume elsewhere. The node does
    // not know the id, takes it as is, and says it did not resume anything.
    let node = Node::start(NodeOptions::default()).await;
    let mut c = RawClient::connect(&node).await;
    let id = shoal_storage::SessionId(0x5eed_0000_0000_0000_0000_0000_0000_0001);
    let welcome = c.hello(Some(id)).await;
    assert!(!welcome.resumed);
    assert_eq!(welcome.session_id, id);
    c.register(&svc("orders"), inst("10.0.0.1", 8080)).await;
    c.goodbye().await;
    wait_for("instance removed", PATIENCE, || async {
        node.instances(&svc("orders")).await.is_empty()
    })
    .await;
}

/// A node for Ttl scenarios. Ttl leases are checked on the replication engine's tick
/// (every few ms); the waits below allow for a check interval of up to seconds.
fn ttl_node() -> NodeOptions {
    NodeOptions::default()
}

fn ttl_instance(ip: &str, port: u16) -> shoal_storage::InstanceSpec {
    let mut spec = inst(ip, port);
    spec.ttl = Some(TtlLease {
        unhealthy_after_ms: 1_000,
        remove_after_ms: 2_000,
    });
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttl_instance_without_beats_turns_unhealthy_then_disappears() {
    let node = Node::start(ttl_node()).await;
    let legacy = svc("legacy");
    let (mut watcher, _) = RawClient::session(&node).await;
    watcher.subscribe(&legacy).await;

    // Registered by a client that then leaves cleanly: a Ttl instance does not belong
    // to the session, it lives by its beats.
    let (mut a, _) = RawClient::session(&node).await;
    a.register(&legacy, ttl_instance("10.0.0.1", 8080)).await;
    a.goodbye().await;
    let push = watcher.next_push(PATIENCE).await;
    assert_eq!(healthy_of(&push, "10.0.0.1", 8080), Some(true));
    let dumped = node.instance(&legacy, "10.0.0.1", 8080).await;
    let dumped = dumped.expect("a Ttl instance outlives its registering session");
    assert!(
        dumped["lease"].get("Ttl").is_some(),
        "lease: {}",
        dumped["lease"]
    );

    // No beats: first unhealthy, then gone, in that order.
    let push = watcher.next_push(PATIENCE).await;
    assert_eq!(
        healthy_of(&push, "10.0.0.1", 8080),
        Some(false),
        "first change without beats: unhealthy, still listed ({push:?})"
    );
    let push = watcher.next_push(PATIENCE).await;
    assert_eq!(addrs(&push), vec![], "then removed");
    assert!(node.instance(&legacy, "10.0.0.1", 8080).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttl_instance_with_beats_stays_healthy() {
    let node = Node::start(ttl_node()).await;
    let legacy = svc("legacy");
    let (mut watcher, _) = RawClient::session(&node).await;
    watcher.subscribe(&legacy).await;
    let (mut a, _) = RawClient::session(&node).await;
    let registered = a.register(&legacy, ttl_instance("10.0.0.1", 8080)).await;
    assert_eq!(addrs(&watcher.next_push(PATIENCE).await).len(), 1);

    // Beat every 100 ms for well past remove_after (2 s).
    let beat = Request::Beat {
        service: legacy.clone(),
        instance: key("10.0.0.1", 8080),
    };
    let until = std::time::Instant::now() + Duration::from_millis(3_500);
    while std::time::Instant::now() < until {
        // A beat that only refreshes the lease changes nothing visible: it answers
        // with the service's revision as it stands.
        assert_eq!(
            a.ok(beat.clone()).await,
            Response::Applied {
                revision: registered
            }
        );
        let seen = node.instance(&legacy, "10.0.0.1", 8080).await;
        assert_eq!(
            seen.as_ref().map(|i| i["healthy"].clone()),
            Some(Value::Bool(true)),
            "a beaten Ttl instance must stay listed and healthy"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    watcher.ping().await;
    assert_eq!(
        watcher.take_pushes(),
        vec![],
        "no health flap while beating"
    );

    // The beats were what kept it: without them it lapses, and a beat revives it.
    let push = watcher.next_push(PATIENCE).await;
    assert_eq!(healthy_of(&push, "10.0.0.1", 8080), Some(false));
    a.ok(beat.clone()).await;
    let push = watcher.next_push(PATIENCE).await;
    assert_eq!(
        healthy_of(&push, "10.0.0.1", 8080),
        Some(true),
        "a beat revives a lapsed instance"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_beat_for_an_unknown_instance_is_not_found() {
    let node = Node::start(ttl_node()).await;
    let (mut a, _) = RawClient::session(&node).await;
    let r = a
        .request(Request::Beat {
            service: svc("legacy"),
            instance: key("10.0.0.1", 8080),
        })
        .await;
    assert_err(&r, ErrorCode::NotFound);
}

/// SDK clients that share one UDP endpoint (`Client::connect_on`, as a process that
/// registers for many applications would) are separate sessions: each holds its own
/// instances, and closing one ends its session only, not the endpoint: the other keeps
/// working, and a client connected on the endpoint afterwards works too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_sharing_an_endpoint_are_separate_sessions() {
    use shoal_client::{new_endpoint, Client, ClientConfig, QueryOptions};
    let node = Node::start(NodeOptions::default()).await;
    let orders = svc("orders");
    let config = || ClientConfig::new([node.quic_addr().to_string()], node.ca_file());
    let endpoint = new_endpoint(false).expect("an endpoint");
    let a = Client::connect_on(config(), endpoint.clone())
        .await
        .expect("a connects");
    let b = Client::connect_on(config(), endpoint.clone())
        .await
        .expect("b connects");
    assert_ne!(a.session_id(), b.session_id());
    a.register(&orders, inst("10.0.0.1", 8080))
        .await
        .expect("a registers");
    b.register(&orders, inst("10.0.0.2", 8080))
        .await
        .expect("b registers");
    let view = b
        .query(&orders, QueryOptions::default())
        .await
        .expect("b queries");
    assert_eq!(
        addrs(&view),
        vec![addr("10.0.0.1", 8080), addr("10.0.0.2", 8080)]
    );

    // Closing a ends a's session (Goodbye removes its instance), and only a's.
    a.close().await.expect("a closes");
    wait_for("a's instance removed by its Goodbye", PATIENCE, || async {
        node.instance(&orders, "10.0.0.1", 8080).await.is_none()
    })
    .await;
    let view = b
        .query(&orders, QueryOptions::default())
        .await
        .expect("b still queries after a closed");
    assert_eq!(addrs(&view), vec![addr("10.0.0.2", 8080)]);
    b.register(&orders, inst("10.0.0.3", 8080))
        .await
        .expect("b still registers after a closed");

    // The endpoint is still open: a new client connects on it.
    let c = Client::connect_on(config(), endpoint.clone())
        .await
        .expect("c connects on the endpoint a used");
    let view = c
        .query(&orders, QueryOptions::default())
        .await
        .expect("c queries");
    assert_eq!(
        addrs(&view),
        vec![addr("10.0.0.2", 8080), addr("10.0.0.3", 8080)]
    );
    c.close().await.expect("c closes");
    b.close().await.expect("b closes");
    wait_for("b's instances removed by its Goodbye", PATIENCE, || async {
        node.instances(&orders).await.is_empty()
    })
    .await;
}
