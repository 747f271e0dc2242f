//! The node's heartbeat: one datagram per session and `heartbeat_interval_ms`, sent
//! in ten bursts spread over the interval. Received packets restart QUIC's keep-alive and idle
//! timers, so while heartbeats flow neither side sends a PING of its own, and the
//! session stays alive past the idle timeout on heartbeats alone.

use std::time::Duration;

use shoal_tests::*;

/// Generous bound for anything the node does on its own clock.
const PATIENCE: Duration = Duration::from_secs(20);

/// The client's own keep-alive: well above the heartbeat, well below the idle timeout.
const CLIENT_KEEP_ALIVE: Duration = Duration::from_millis(1_000);
const IDLE_MS: u64 = 2_000;

/// Starts a node with the given heartbeat (0: none) and a client whose keep-alive
/// would fire if nothing else arrived for `CLIENT_KEEP_ALIVE`; waits until the client
/// has seen `warm_up` heartbeats (the handshake's own probes are done by then), then
/// counts what each side sent over the next `window`. Returns the client, the node
/// and (client PINGs sent, node PINGs received, heartbeats received) in the window.
async fn pings_over(heartbeat_ms: u64, window: Duration) -> (RawClient, Node, u64, u64, u64) {
    let node = Node::start(
        NodeOptions::default()
            .idle_timeout_ms(IDLE_MS)
            .keep_alive_interval_ms(1_500)
            .heartbeat_interval_ms(heartbeat_ms),
    )
    .await;
    let opts = ClientOptions {
        keep_alive: Some(CLIENT_KEEP_ALIVE),
        idle_timeout: Duration::from_millis(IDLE_MS),
    };
    let mut client = RawClient::connect_to(node.quic_addr(), node.ca_file(), opts).await;
    client.hello(None).await;
    if heartbeat_ms > 0 {
        wait_for("the first heartbeats", PATIENCE, || {
            let datagrams = client.connection().stats().frame_rx.datagram;
            async move { datagrams >= 3 }
        })
        .await;
    }
    let before = client.connection().stats();
    // What is counted is what did not happen (PINGs), which only a window can show;
    // the thresholds leave a wide margin for a slow machine.
    tokio::time::sleep(window).await;
    let after = client.connection().stats();
    (
        client,
        node,
        after.frame_tx.ping - before.frame_tx.ping,
        after.frame_rx.ping - before.frame_rx.ping,
        after.frame_rx.datagram - before.frame_rx.datagram,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_a_quiet_session_alive_with_no_pings_either_way() {
    // 3 s: three of the client's keep-alive intervals and more than the idle timeout.
    let (mut client, node, client_pings, node_pings, heartbeats) =
        pings_over(200, Duration::from_secs(3)).await;
    assert!(
        heartbeats >= 5,
        "the node sent {heartbeats} heartbeats in 3 s at one per 200 ms"
    );
    assert_eq!(
        client_pings, 0,
        "each heartbeat restarts the client's keep-alive timer, so it never fires"
    );
    assert_eq!(
        node_pings, 0,
        "each acknowledged heartbeat restarts the node's keep-alive timer too"
    );
    // The session outlived the idle timeout on heartbeats alone.
    let orders = svc("orders");
    client.register(&orders, inst("10.0.0.1", 8080)).await;
    wait_for("the instance on the node", PATIENCE, || async {
        node.instance(&orders, "10.0.0.1", 8080).await.is_some()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_heartbeats_the_client_keeps_itself_alive() {
    // The control of the test above: the same window with heartbeats off.
    let (mut client, node, client_pings, _, heartbeats) =
        pings_over(0, Duration::from_secs(3)).await;
    assert_eq!(heartbeats, 0, "heartbeats are off");
    assert!(
        client_pings >= 1,
        "with nothing arriving, the client's 1 s keep-alive fires ({client_pings} PINGs in 3 s)"
    );
    let orders = svc("orders");
    client.register(&orders, inst("10.0.0.2", 8080)).await;
    wait_for("the instance on the node", PATIENCE, || async {
        node.instance(&orders, "10.0.0.2", 8080).await.is_some()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_to_many_sessions_leave_in_bursts_spread_over_the_interval() {
    // 1 s interval: ten bursts 100 ms apart, each session always in the same one
    // (its connection's id modulo ten); twenty sessions fill each burst twice.
    const PERIOD_MS: u128 = 1_000;
    let node = Node::start(NodeOptions::default().heartbeat_interval_ms(PERIOD_MS as u64)).await;
    let mut clients = Vec::new();
    let mut readers = Vec::new();
    for _ in 0..20 {
        let mut client =
            RawClient::connect_to(node.quic_addr(), node.ca_file(), ClientOptions::default()).await;
        client.hello(None).await;
        // Each session's heartbeats as they arrive: the first four.
        let conn = client.connection().clone();
        readers.push(tokio::spawn(async move {
            let mut at = Vec::new();
            while at.len() < 4 {
                let datagram = tokio::time::timeout(PATIENCE, conn.read_datagram()).await;
                datagram
                    .expect("a heartbeat within the patience")
                    .expect("the connection stays open");
                at.push(std::time::Instant::now());
            }
            at
        }));
        clients.push(client);
    }
    let mut arrivals = Vec::new();
    for reader in readers {
        arrivals.push(reader.await.expect("the reader"));
    }
    // Every session gets one heartbeat per interval: three intervals from its first to
    // its fourth (3 s), with bounds wide enough for a reader that a loaded machine
    // delays by a second, which a check of each gap would not survive.
    for at in &arrivals {
        let span = at[3] - at[0];
        assert!(
            span >= Duration::from_millis(1_500) && span <= Duration::from_millis(6_000),
            "a session's first and fourth heartbeats {span:?} apart at one per second"
        );
    }
    // The sessions' heartbeats do not all leave at one instant: their phases within
    // the interval (time since the first arrival, modulo the interval) fall in several
    // of its tenths. One burst for all would put them in one tenth, or two at an edge.
    let first = arrivals.iter().flatten().min().copied().expect("arrivals");
    let tenths: std::collections::BTreeSet<u128> = arrivals
        .iter()
        .map(|at| ((at[3] - first).as_millis() % PERIOD_MS) * 10 / PERIOD_MS)
        .collect();
    assert!(
        tenths.len() >= 5,
        "the last heartbeats of 20 sessions fell in {} tenth(s) of the interval: {tenths:?}",
        tenths.len()
    );
    drop(clients);
}
