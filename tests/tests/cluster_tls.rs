//! Peer links are mutual TLS with the cluster CA: a node whose certificate comes from
//! another CA, seeded with a cluster node, cannot join. No cluster node ever lists it,
//! it sees only itself, and the cluster keeps working without it.

use std::time::{Duration, Instant};

use shoal_client::{Client, ClientConfig};
use shoal_tests::*;

/// How long the outsider keeps trying to join before the verdict.
const TRYING: Duration = Duration::from_secs(10);
/// Generous bound for a write to reach every node.
const PATIENCE: Duration = Duration::from_secs(30);

fn ids(members: &[Value]) -> Vec<String> {
    members
        .iter()
        .filter_map(|m| m["id"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_certificate_from_another_ca_cannot_join() {
    let cluster = Cluster::start(3).await;
    cluster.wait_until_converged().await;
    let client = Client::connect(cluster.client_config())
        .await
        .expect("connect");
    client
        .register(&svc("before"), inst("10.9.0.1", 80))
        .await
        .expect("register");
    cluster.wait_until_converged().await;

    // The outsider has its own development CA and is seeded with a cluster node.
    let other_ca = unique_temp_dir("shoal-test-other-ca");
    let outsider = Node::start(
        NodeOptions::default()
            .node_id("outsider")
            .dev_ca_dir(&other_ca)
            .seed(cluster.node(0).quic_addr().to_string()),
    )
    .await;
    assert_ne!(
        std::fs::read(outsider.ca_file()).expect("the outsider's CA"),
        std::fs::read(cluster.ca_file()).expect("the cluster's CA"),
        "the outsider must have a CA of its own"
    );

    // For 10 s: no cluster node lists it or puts it in its ring, and it sees only itself.
    let started = Instant::now();
    let mut looks = 0;
    while started.elapsed() < TRYING {
        for i in 0..3 {
            let node = cluster.node(i);
            let members = ids(&node.members().await);
            assert!(
                !members.contains(&"outsider".to_string()),
                "{} lists the outsider: {members:?}",
                node.id()
            );
            let ring = node.ring_shares().await;
            assert_eq!(ring.len(), 3, "{} ring {ring:?}", node.id());
        }
        let seen = ids(&outsider.members().await);
        assert_eq!(
            seen,
            vec!["outsider".to_string()],
            "the outsider sees {seen:?}"
        );
        looks += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!("{looks} looks over {TRYING:?}: the outsider never got in");
    let outsider_ring = outsider.ring_shares().await;
    assert!(
        outsider_ring.iter().all(|(id, _)| id == "outsider"),
        "{outsider_ring:?}"
    );

    // The cluster keeps working: a write reaches every member, and not the outsider.
    client
        .register(&svc("after"), inst("10.9.0.2", 80))
        .await
        .expect("register after the attempt");
    wait_for("the write to reach every member", PATIENCE, || async {
        for i in 0..3 {
            if cluster
                .node(i)
                .instance(&svc("after"), "10.9.0.2", 80)
                .await
                .is_none()
            {
                return false;
            }
        }
        true
    })
    .await;
    cluster.wait_until_converged().await;
    let dump = outsider.dump().await;
    assert_eq!(
        dump,
        Value::Array(Vec::new()),
        "the outsider got data: {dump}"
    );

    // A client that trusts the cluster's CA does not trust the outsider either.
    let refused = Client::connect(
        ClientConfig::new([outsider.quic_addr().to_string()], cluster.ca_file())
            .with_connect_timeout(Duration::from_secs(5)),
    )
    .await;
    assert!(
        refused.is_err(),
        "a client trusting the cluster CA connected to the outsider"
    );

    let _ = client.close().await;
    drop(outsider);
    let _ = std::fs::remove_dir_all(&other_ca);
}
