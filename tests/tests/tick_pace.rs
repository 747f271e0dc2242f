//! The replication engine's timer: a node that takes no writes runs it at the idle pace
//! (a tenth of `probe_interval_ms`, at most 50 ms), not every `batch_window_ms`; what
//! queues operations for the peers (a session's opening, a write) wakes it, and the
//! write still reaches every node.

use std::time::Duration;

use shoal_tests::*;

/// Generous bound for replication.
const PATIENCE: Duration = Duration::from_secs(20);

async fn metric(node: &Node, name: &str) -> f64 {
    counter(&node.get("/metrics").await.body, name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_node_ticks_at_its_idle_pace_and_queued_operations_wake_it() {
    let cluster = Cluster::start(3).await;
    cluster.wait_until_converged().await;
    let node = cluster.node(0);

    // What is counted is how often the timer ran, which only a window can show. A slow
    // machine runs it less often, never more: 2 s at the idle pace (50 ms with the
    // default probe interval) is about 40 runs; every 5 ms it would be 400.
    let window = Duration::from_secs(2);
    let before = metric(node, "shoal_engine_ticks_total").await;
    tokio::time::sleep(window).await;
    let idle_ticks = metric(node, "shoal_engine_ticks_total").await - before;
    assert!(
        idle_ticks >= 1.0,
        "the timer did not run at all in {window:?}"
    );
    assert!(
        idle_ticks <= 120.0,
        "an idle node ran its timer {idle_ticks} times in {window:?} (idle pace: about 40)"
    );

    // Opening a session (its announcement) and a write on the service's owner queue
    // operations for both peers: they wake the timer, and the batches reach them.
    let service = cluster.service_owned_by(0, "tick-pace").await;
    let wakes = metric(node, "shoal_engine_tick_wakes_total").await;
    let (mut client, _) = RawClient::session(node).await;
    client.register(&service, inst("10.9.0.1", 8080)).await;
    for i in 0..3 {
        wait_for_listing(
            cluster.node(i),
            PATIENCE,
            &service,
            &[("10.9.0.1".to_string(), 8080)],
        )
        .await;
    }
    let woken = metric(node, "shoal_engine_tick_wakes_total").await - wakes;
    assert!(
        woken >= 1.0,
        "neither the session's opening nor the write woke the timer"
    );
}
