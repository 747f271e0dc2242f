//! The SDK against fake nodes over real QUIC: sessions, writes, subscriptions, and
//! what happens when connections and nodes go away.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shoal_client::{
    Client, ClientConfig, ClientError, ErrorCode, InstanceSpec, QueryOptions, ServiceKey,
};
use support::{FakeNode, FakeRegistry, TestPki};

fn config(pki: &TestPki, nodes: &[&FakeNode]) -> ClientConfig {
    ClientConfig::new(nodes.iter().map(|n| n.address()), pki.ca())
        .with_request_timeout(Duration::from_secs(5))
        .with_connect_timeout(Duration::from_secs(2))
        .with_reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
}

async fn wait_generation(client: &Client, at_least: u64) {
    let mut rx = client.watch_generation();
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|g| *g >= at_least))
        .await
        .expect("reconnect within 10 s")
        .expect("client alive");
}

#[tokio::test]
async fn register_query_list_deregister() {
    let pki = TestPki::new("basic");
    let node = FakeNode::start(&pki, "n1", FakeRegistry::default());
    let client = Client::connect(config(&pki, &[&node])).await.unwrap();
    assert_eq!(client.home(), Some(node.address()));
    assert_eq!(client.generation(), 1);
    assert_eq!(client.welcome().unwrap().node_id.as_str(), "n1");

    let orders = ServiceKey::named("orders");
    let rev = client
        .register(&orders, InstanceSpec::new("10.0.0.1", 8080))
        .await
        .unwrap();
    assert!(rev > 0);
    assert_eq!(
        node.registry.instances(&orders),
        vec![("10.0.0.1".to_string(), 8080, Some(client.session_id()))]
    );

    let view = client.query(&orders, QueryOptions::all()).await.unwrap();
    assert_eq!(view.instances.len(), 1);
    let list = client.list_services("public", None).await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].key, orders);

    client.ping().await.unwrap();

    let spec = InstanceSpec::new("10.0.0.1", 8080);
    client.deregister(&orders, &spec.key()).await.unwrap();
    assert!(node.registry.instances(&orders).is_empty());
    assert!(client.registrations().is_empty());

    let err = client.deregister(&orders, &spec.key()).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    client.close().await.unwrap();
}

/// docs/protocol.md, "Requests as arrays": the SDK sends structs as arrays only to a
/// node that states the SDK's own request shape; to one that states none (an earlier
/// node) or another, it keeps to maps.
#[tokio::test]
async fn requests_go_as_arrays_only_to_a_node_of_the_same_shape() {
    let pki = TestPki::new("shape");
    let orders = ServiceKey::named("orders");
    for (shape, arrays) in [
        (0, false),
        (shoal_proto::REQUEST_SHAPE, true),
        (shoal_proto::REQUEST_SHAPE + 1, false),
    ] {
        let registry = FakeRegistry::default();
        registry.set_request_shape(shape);
        let node = FakeNode::start(&pki, "n1", registry.clone());
        let client = Client::connect(config(&pki, &[&node])).await.unwrap();
        client
            .register(&orders, InstanceSpec::new("10.0.0.1", 8080))
            .await
            .unwrap();
        let view = client
            .query(&orders, QueryOptions::default())
            .await
            .unwrap();
        assert_eq!(view.instances.len(), 1, "shape {shape}");
        client.close().await.unwrap();
        let forms = registry.request_forms();
        assert!(forms.len() >= 2, "shape {shape}: {forms:?}");
        assert!(
            forms.iter().all(|&f| f == arrays),
            "shape {shape}: arrays {forms:?}, expected all {arrays}"
        );
    }
}

#[tokio::test]
async fn a_refused_write_is_a_typed_error_and_not_remembered() {
    let pki = TestPki::new("refused");
    let node = FakeNode::start(&pki, "n1", FakeRegistry::default());
    let client = Client::connect(config(&pki, &[&node])).await.unwrap();
    let err = client
        .register(
            &ServiceKey::named("orders"),
            InstanceSpec::new("10.0.0.1", 0),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Server(b) if b.code == ErrorCode::InvalidPort),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "InvalidPort: invalid port 0: must be 1..=65535"
    );
    assert!(client.registrations().is_empty());
}

/// The SDK records a session-bound registration before sending it (a reconnect racing
/// with the request re-asserts it) and undoes the record when the node refuses: a
/// refused replacement leaves the instance as it was held, a refused deregistration
/// keeps it held, a refused new instance is not held.
#[tokio::test]
async fn refused_writes_leave_the_held_registrations_as_they_were() {
    let pki = TestPki::new("undo");
    let registry = FakeRegistry::default();
    let node = FakeNode::start(&pki, "n1", registry.clone());
    let client = Client::connect(config(&pki, &[&node])).await.unwrap();
    let orders = ServiceKey::named("orders");
    let mut first = InstanceSpec::new("10.0.0.1", 8080);
    first.weight = 1.0;
    client.register(&orders, first.clone()).await.unwrap();
    assert_eq!(
        client.registrations(),
        vec![(orders.clone(), first.clone())]
    );

    let mut heavier = first.clone();
    heavier.weight = 5.0;
    registry.fail_next(1, ErrorCode::Internal);
    client.register(&orders, heavier.clone()).await.unwrap_err();
    assert_eq!(
        client.registrations(),
        vec![(orders.clone(), first.clone())]
    );

    registry.fail_next(1, ErrorCode::Internal);
    client.deregister(&orders, &first.key()).await.unwrap_err();
    assert_eq!(
        client.registrations(),
        vec![(orders.clone(), first.clone())]
    );

    registry.fail_next(1, ErrorCode::Internal);
    client
        .register(&orders, InstanceSpec::new("10.0.0.2", 8080))
        .await
        .unwrap_err();
    assert_eq!(
        client.registrations(),
        vec![(orders.clone(), first.clone())]
    );

    // Accepted, the replacement is what is held; another instance is held beside it.
    client.register(&orders, heavier.clone()).await.unwrap();
    let second = InstanceSpec::new("10.0.0.2", 8080);
    client.register(&orders, second.clone()).await.unwrap();
    assert_eq!(
        client.registrations(),
        vec![(orders.clone(), heavier), (orders.clone(), second)]
    );
    client.close().await.unwrap();
}

#[tokio::test]
async fn close_says_goodbye_and_removes_the_sessions_instances() {
    let pki = TestPki::new("close");
    let node = FakeNode::start(&pki, "n1", FakeRegistry::default());
    let client = Client::connect(config(&pki, &[&node])).await.unwrap();
    let orders = ServiceKey::named("orders");
    client
        .register(&orders, InstanceSpec::new("10.0.0.1", 8080))
        .await
        .unwrap();
    let other = client.clone();
    client.close().await.unwrap();
    assert_eq!(node.registry.count("Goodbye"), 1);
    assert!(node.registry.instances(&orders).is_empty());
    assert!(matches!(other.ping().await, Err(ClientError::Closed)));
}

#[tokio::test]
async fn dropping_the_last_handle_says_goodbye_too() {
    let pki = TestPki::new("drop");
    let node = FakeNode::start(&pki, "n1", FakeRegistry::default());
    let client = Client::connect(config(&pki, &[&node])).await.unwrap();
    let orders = ServiceKey::named("orders");
    client
        .register(&orders, InstanceSpec::new("10.0.0.1", 8080))
        .await
        .unwrap();
    drop(client);
    for _ in 0..100 {
        if node.registry.count("Goodbye") == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(node.registry.count("Goodbye"), 1);
    assert!(node.registry.instances(&orders).is_empty());
}

#[tokio::test]
async fn subscription_gets_initial_view_then_pushes() {
    let pki = TestPki::new("subscribe");
    let node = FakeNode::start(&pki, "n1", FakeRegistry::default());
    let client = Client::connect(config(&pki, &[&node])).await.unwrap();
    let payments = ServiceKey::named("payments");
    node.registry.register_external(&payments, "10.0.0.9", 9000);

    let mut sub = client.subscribe(&payments).await.unwrap();
    assert_eq!(sub.current().instances.len(), 1);
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    client
        .subscribe_with(&payments, move |_| {
            seen.fetch_add(1, Ordering::SeqCst);
        })
        .await
        .unwrap();

    node.registry
        .register_external(&payments, "10.0.0.10", 9000);
    let view = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(view.instances.len(), 2);
    assert_eq!(client.query_cached(&payments).unwrap().instances.len(), 2);
    let picked = client.select_one(&payments).await.unwrap().unwrap();
    assert_eq!(picked.port, 9000);
    assert_eq!(node.registry.count("Query"), 0, "select_one used the cache");
    // Only one Subscribe crossed the wire: the second subscriber shared the cache.
    assert_eq!(node.registry.count("Subscribe"), 1);
    for _ in 0..100 {
        if calls.load(Ordering::SeqCst) >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        calls.load(Ordering::SeqCst) >= 2,
        "callback saw the initial view and the change"
    );

    client.unsubscribe(&payments).await.unwrap();
    assert_eq!(sub.next().await, None);
    assert!(client.query_cached(&payments).is_none());
}

#[tokio::test]
async fn a_blip_resumes_the_session_and_restores_everything() {
    let pki = TestPki::new("blip");
    let node = FakeNode::start(&pki, "n1", FakeRegistry::default());
    let client = Client::connect(config(&pki, &[&node])).await.unwrap();
    let session = client.session_id();
    let orders = ServiceKey::named("orders");
    let payments = ServiceKey::named("payments");
    client
        .register(&orders, InstanceSpec::new("10.0.0.1", 8080))
        .await
        .unwrap();
    let mut sub = client.subscribe(&payments).await.unwrap();

    client.disconnect_abruptly();
    wait_generation(&client, 2).await;
    assert_eq!(client.reconnects(), 1);
    assert_eq!(client.session_id(), session, "same session after resume");
    assert!(client.welcome().unwrap().resumed);
    assert_eq!(node.registry.hellos(), vec![None, Some(session)]);
    assert_eq!(
        node.registry.count("Register"),
        2,
        "registration re-asserted"
    );
    assert_eq!(node.registry.count("Subscribe"), 2, "subscription renewed");

    // Pushes keep coming on the new connection.
    node.registry.register_external(&payments, "10.0.0.9", 9000);
    let view = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(view.instances.len(), 1);
    client.close().await.unwrap();
}

#[tokio::test]
async fn failover_to_another_node_resumes_and_requests_wait_for_it() {
    let pki = TestPki::new("failover");
    let cluster = FakeRegistry::default();
    let a = FakeNode::start(&pki, "a", cluster.clone());
    let b = FakeNode::start(&pki, "b", cluster.clone());
    let client = Client::connect(config(&pki, &[&a, &b])).await.unwrap();
    let session = client.session_id();
    let orders = ServiceKey::named("orders");
    client
        .register(&orders, InstanceSpec::new("10.0.0.1", 8080))
        .await
        .unwrap();
    let mut sub = client.subscribe(&orders).await.unwrap();

    let (home, other) = if client.home() == Some(a.address()) {
        (&a, &b)
    } else {
        (&b, &a)
    };
    home.kill();
    // A request made right away waits for the new connection instead of failing.
    client.ping().await.unwrap();
    assert_eq!(client.home(), Some(other.address()));
    assert_eq!(client.session_id(), session);
    assert_eq!(cluster.count("Register"), 2);

    // The cache answers while reconnecting, and after it.
    assert_eq!(client.query_cached(&orders).unwrap().instances.len(), 1);
    cluster.register_external(&orders, "10.0.0.2", 8080);
    // The re-registration itself changed the view (new revision), so a view with one
    // instance may come first.
    let two = async {
        while let Some(view) = sub.next().await {
            if view.instances.len() == 2 {
                return view;
            }
        }
        panic!("subscription ended");
    };
    let view = tokio::time::timeout(Duration::from_secs(5), two)
        .await
        .unwrap();
    assert_eq!(view.key, orders);
}

#[tokio::test]
async fn a_node_that_forgot_the_session_gets_the_instances_again() {
    let pki = TestPki::new("forgot");
    let a = FakeNode::start(&pki, "a", FakeRegistry::default());
    let b = FakeNode::start(&pki, "b", FakeRegistry::default());
    let mut cfg = config(&pki, &[&a]);
    cfg.servers.push(b.address());
    let client = loop {
        // Start on `a` (the start is random).
        let c = Client::connect(cfg.clone()).await.unwrap();
        if c.home() == Some(a.address()) {
            break c;
        }
        c.close().await.unwrap();
    };
    let orders = ServiceKey::named("orders");
    client
        .register(&orders, InstanceSpec::new("10.0.0.1", 8080))
        .await
        .unwrap();
    let old = client.session_id();
    a.kill();
    wait_generation(&client, 2).await;
    assert!(!client.welcome().unwrap().resumed);
    let new = client.session_id();
    assert_ne!(new, old);
    assert_eq!(
        b.registry.instances(&orders),
        vec![("10.0.0.1".to_string(), 8080, Some(new))]
    );
}

#[tokio::test]
async fn requests_time_out_when_no_node_comes_back() {
    let pki = TestPki::new("timeout");
    let node = FakeNode::start(&pki, "n1", FakeRegistry::default());
    let cfg = config(&pki, &[&node]).with_request_timeout(Duration::from_millis(500));
    let client = Client::connect(cfg).await.unwrap();
    node.kill();
    let err = client.ping().await.unwrap_err();
    assert!(matches!(err, ClientError::Timeout(_)), "{err}");
    assert!(!client.is_connected());
    client.close_abruptly().await;
}

/// A live node that never answers one request: the call ends with `Timeout` at its
/// deadline (the link's watchdog), the connection is kept (the node acknowledges
/// packets, so it is not given up) and the next request is answered on it.
#[tokio::test]
async fn a_request_left_unanswered_by_a_live_node_times_out_on_the_same_link() {
    let pki = TestPki::new("unanswered");
    let node = FakeNode::start(&pki, "n1", FakeRegistry::default());
    let cfg = config(&pki, &[&node]).with_request_timeout(Duration::from_millis(400));
    let client = Client::connect(cfg).await.unwrap();
    let generation = client.generation();
    node.registry.leave_unanswered(1);
    let started = std::time::Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(10), client.ping())
        .await
        .expect("the call ends by its deadline, not never")
        .unwrap_err();
    let waited = started.elapsed();
    assert!(matches!(err, ClientError::Timeout(_)), "{err}");
    assert!(
        waited >= Duration::from_millis(400),
        "not before its deadline: {waited:?}"
    );
    client.ping().await.expect("the next request is answered");
    assert!(client.is_connected());
    assert_eq!(client.generation(), generation, "on the same connection");
    client.close().await.unwrap();
}

#[tokio::test]
async fn connect_fails_clearly_when_nothing_listens() {
    let pki = TestPki::new("nothing");
    let cfg = ClientConfig::new(["127.0.0.1:9"], pki.ca())
        .with_connect_timeout(Duration::from_millis(300));
    let err = Client::connect(cfg).await.unwrap_err();
    assert!(matches!(err, ClientError::Connect(_)), "{err}");
    assert!(err.to_string().contains("127.0.0.1:9"), "{err}");
}

#[tokio::test]
async fn a_node_dropping_connections_is_survived() {
    let pki = TestPki::new("drops");
    let node = FakeNode::start(&pki, "n1", FakeRegistry::default());
    let client = Client::connect(config(&pki, &[&node])).await.unwrap();
    let orders = ServiceKey::named("orders");
    client
        .register(&orders, InstanceSpec::new("10.0.0.1", 8080))
        .await
        .unwrap();
    for round in 2..=4 {
        node.drop_connections();
        wait_generation(&client, round).await;
    }
    assert_eq!(client.session_id(), node.registry.hellos()[1].unwrap());
    assert_eq!(node.registry.count("Register"), 4);
    client.close().await.unwrap();
    assert!(node.registry.instances(&orders).is_empty());
}

#[tokio::test]
async fn unavailable_owner_is_retried_until_it_answers() {
    let pki = TestPki::new("unavailable");
    let node = FakeNode::start(&pki, "n1", FakeRegistry::default());
    let client = Client::connect(config(&pki, &[&node])).await.unwrap();
    let orders = ServiceKey::named("orders");
    node.registry.fail_next(2, ErrorCode::Unavailable);
    client
        .register(&orders, InstanceSpec::new("10.0.0.1", 8080))
        .await
        .unwrap();
    assert_eq!(node.registry.count("Register"), 3);

    // A refusal that retrying cannot fix is returned at once.
    node.registry.fail_next(1, ErrorCode::InvalidName);
    let err = client.ping().await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidName));
    assert_eq!(node.registry.count("Ping"), 1);
    client.close().await.unwrap();
}

#[tokio::test]
async fn restore_waits_out_an_unavailable_owner() {
    let pki = TestPki::new("restore-unavailable");
    let node = FakeNode::start(&pki, "n1", FakeRegistry::default());
    let client = Client::connect(config(&pki, &[&node])).await.unwrap();
    let orders = ServiceKey::named("orders");
    client
        .register(&orders, InstanceSpec::new("10.0.0.1", 8080))
        .await
        .unwrap();
    // The first two requests after the reconnect (the restore's) are refused.
    node.registry.fail_next(2, ErrorCode::Unavailable);
    client.disconnect_abruptly();
    wait_generation(&client, 2).await;
    assert_eq!(
        node.registry.count("Register"),
        4,
        "1 + refused twice + accepted"
    );
    client.close().await.unwrap();
}
