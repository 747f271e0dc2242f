//! What clients are sent of a service's instances in query answers and pushes (the
//! rows of crates/proto/src/compact.rs): weights and Ttl leases exactly, no session ids,
//! no stamps, no registration times of session instances; while every node's own copy,
//! which peers replicate, keeps the session ids and the stamps.

use std::time::Duration;

use shoal_client::QueryOptions;
use shoal_storage::{Instance, Lease, ServiceView, SessionId, TtlLease};
use shoal_tests::*;

const PATIENCE: Duration = Duration::from_secs(30);

/// The weights registered, one instance each: whole, fractional (f32 and f64 exact),
/// the largest and zero.
const WEIGHTS: [f64; 6] = [1.0, 2.5, 0.1, 10_000.0, 0.0, 333.0];

const TTL: TtlLease = TtlLease {
    unhealthy_after_ms: 60_000,
    remove_after_ms: 120_000,
};

/// The row of `ip`, port 8080.
fn row<'a>(view: &'a ServiceView, ip: &str) -> &'a Instance {
    view.instances
        .iter()
        .find(|i| i.ip == ip)
        .unwrap_or_else(|| panic!("{ip} not in {view:?}"))
}

/// Checks every row of `view` as a client must see it; `with_ttl`: the Ttl instance
/// (cluster `edge`) is in it.
fn check_rows(view: &ServiceView, with_ttl: bool, what: &str) {
    let n = WEIGHTS.len() + usize::from(with_ttl);
    assert_eq!(view.instances.len(), n, "{what}: {view:?}");
    for (k, w) in WEIGHTS.iter().enumerate() {
        let i = row(view, &format!("10.7.0.{k}"));
        assert_eq!(i.weight.to_bits(), w.to_bits(), "{what}: {i:?}");
        assert_eq!(i.lease, Lease::Session(SessionId(0)), "{what}: {i:?}");
        assert_eq!((i.stamp, i.last_beat_ms), (0, 0), "{what}: {i:?}");
        assert_eq!(i.metadata.get("k").map(String::as_str), Some("v"), "{what}");
        assert_eq!((i.port, i.cluster.as_str()), (8080, "DEFAULT"), "{what}");
        assert!(i.healthy && i.enabled, "{what}: {i:?}");
    }
    if !with_ttl {
        return;
    }
    let ttl = row(view, "10.7.1.1");
    assert_eq!(ttl.lease, Lease::Ttl(TTL), "{what}: {ttl:?}");
    assert_eq!(ttl.weight, 7.0, "{what}: {ttl:?}");
    assert_eq!(ttl.cluster, "edge", "{what}: {ttl:?}");
    assert!(
        ttl.last_beat_ms > 0,
        "{what}: the last beat of a Ttl instance is kept"
    );
    assert_eq!(ttl.stamp, 0, "{what}: {ttl:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_and_pushes_carry_what_clients_use_and_nodes_keep_the_rest() {
    let cluster = Cluster::start(3).await;
    cluster.wait_until_converged().await;
    let rows = svc("rows");

    let reader = cluster.node(1).client().await;
    let mut sub = reader.subscribe(&rows).await.expect("subscribe");

    let writer = cluster.node(0).client().await;
    for (k, w) in WEIGHTS.iter().enumerate() {
        let mut spec = inst(&format!("10.7.0.{k}"), 8080);
        spec.weight = *w;
        spec.metadata.insert("k".into(), "v".into());
        writer.register(&rows, spec).await.expect("register");
    }
    let mut ttl = inst("10.7.1.1", 9090);
    ttl.cluster = "edge".into();
    ttl.weight = 7.0;
    ttl.ttl = Some(TTL);
    writer.register(&rows, ttl).await.expect("register ttl");

    // Pushed to the subscriber, homed on another node than the writer.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while sub.current().instances.len() < WEIGHTS.len() + 1 {
        tokio::time::timeout_at(deadline, sub.next())
            .await
            .expect("pushes within the patience")
            .expect("the subscription lives");
    }
    check_rows(&sub.current(), true, "push");

    // Answered by every node. Answers holding a Ttl instance are not cached; those of
    // the DEFAULT cluster are, and the second of them comes from the query cache.
    for i in 0..3 {
        let client = cluster.node(i).client().await;
        let id = cluster.node(i).id();
        let view = client
            .query(&rows, QueryOptions::all())
            .await
            .expect("query");
        check_rows(&view, true, &format!("query on {id}"));
        for round in 0..2 {
            let default = QueryOptions::all().in_clusters(["DEFAULT"]);
            let view = client.query(&rows, default).await.expect("query");
            check_rows(&view, false, &format!("query {round} of DEFAULT on {id}"));
        }
        client.close().await.unwrap();
    }

    // Every node's own copy keeps the writer's session and the stamps.
    let session = writer.session_id().to_string();
    assert_ne!(writer.session_id(), SessionId(0));
    for i in 0..3 {
        let node = cluster.node(i);
        wait_for("the copy of every node", PATIENCE, || async {
            instances_in_dump(&node.dump().await, &rows).len() == WEIGHTS.len() + 1
        })
        .await;
        for d in instances_in_dump(&node.dump().await, &rows) {
            if d["ip"] == "10.7.1.1" {
                assert_eq!(d["lease"]["Ttl"]["remove_after_ms"], 120_000, "{d}");
            } else {
                assert_eq!(d["lease"]["Session"], session.as_str(), "{d}");
            }
            assert!(d["version"][0].as_u64().unwrap_or(0) > 0, "{d}");
        }
    }

    reader.close().await.unwrap();
    writer.close().await.unwrap();
}
