//! Real network partitions: every node in its own network namespace on a bridge, links
//! cut with iptables inside the namespaces (see `shoal_tests::chaos::NetLab`). Needs
//! root; without it the test says why and passes without running.
//!
//! Replay: `SHOAL_CHAOS_SEED=<seed> cargo test -p shoal-tests --test chaos_partition -- --nocapture`.

use shoal_tests::chaos::*;

/// Split brain: 5 nodes cut 2 | 3 for 25 s. Both sides keep serving; clients on each
/// side register and deregister all along; the minority preserves, the majority reaps
/// the minority's sessions after the grace period (it cannot tell them from dead ones).
/// After the heal every node converges to the union of the live registrations, and
/// the instances of clients that crashed on either side are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_brain_heals_to_the_union_of_live_registrations() {
    let _one_at_a_time = exclusive().await;
    if let Some(why) = NetLab::unavailable() {
        // CI sets SHOAL_REQUIRE_NETNS: there, a missing tool is a failure, not a skip.
        assert!(
            std::env::var_os("SHOAL_REQUIRE_NETNS").is_none(),
            "split brain cannot run: {why}"
        );
        println!("split brain skipped: {why}");
        return;
    }
    let seed = chaos_seed(3);
    let (schedule, sides) = Schedule::split_brain(seed, 5);
    let churn = |servers: &[usize]| ClientPlan {
        servers: servers.to_vec(),
        min_held: 2,
        max_held: 6,
        pause_ms: (200, 900),
        churn: true,
    };
    let load = LoadSpec {
        services: 6,
        clients: vec![
            churn(&sides[0]),
            churn(&sides[0]),
            churn(&sides[1]),
            churn(&sides[1]),
            // Knows every node: homed on one side or the other.
            churn(&[0, 1, 2, 3, 4]),
        ],
        sdk_subscriber: true,
    };
    let report = run(Scenario::new("split-brain", 5, Mode::Netns, schedule, load)).await;
    assert!(
        report.skipped.is_none(),
        "split brain could not set up its network: {:?}",
        report.skipped
    );
    report.assert_ok();
}

/// Bug 10 of docs/reliability.md: a Deregister acknowledged by the client's home, which
/// also owned the service, was lost when the home died before its batch left (here: it
/// was cut from the other nodes, then killed). The client failed over and resumed its
/// session, which kept the instance registered on the survivors for good. Now the SDK
/// sends its recent deregistrations again after a reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deregistration_lost_with_its_home_is_sent_again_after_failover() {
    use shoal_client::{Client, ClientConfig};
    use shoal_storage::InstanceSpec;
    use std::time::{Duration, Instant};

    let _one_at_a_time = exclusive().await;
    if let Some(why) = NetLab::unavailable() {
        assert!(
            std::env::var_os("SHOAL_REQUIRE_NETNS").is_none(),
            "the lost-deregistration test cannot run: {why}"
        );
        println!("lost-deregistration test skipped: {why}");
        return;
    }
    let args = shoal_tests::chaos::node_args();
    let mut c = ChaosCluster::start(3, Mode::Netns, &args).await.unwrap();
    let formed = Instant::now();
    while let Err(why) = c.check_converged().await {
        assert!(
            formed.elapsed() < Duration::from_secs(60),
            "no cluster: {why}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let service = c.service_owned_by(0, 0).await;
    // Homed on n0 (the owner), failing over to n1.
    let servers = c.servers(&[0, 1]);
    let client = loop {
        let client = Client::connect(ClientConfig::new(servers.clone(), c.ca_file()))
            .await
            .unwrap();
        if client.home().as_deref() == Some(servers[0].as_str()) {
            break client;
        }
        client.close().await.unwrap();
    };
    let instance = InstanceSpec::new("10.6.0.1", 4100);
    client.register(&service, instance.clone()).await.unwrap();
    let registered = Instant::now();
    while c.holders(&service, 4100).await != [0, 1, 2] {
        assert!(
            registered.elapsed() < Duration::from_secs(20),
            "the registration did not reach every node"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // n0 answers the Deregister (the test process still reaches it), but nothing it
    // sends reaches n1 or n2 before it dies.
    c.partition(&[vec![0], vec![1, 2]]).unwrap();
    client.deregister(&service, &instance.key()).await.unwrap();
    c.kill9(0);
    c.heal().unwrap();

    let killed = Instant::now();
    loop {
        let on = c.holders(&service, 4100).await;
        if on.is_empty() {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(40),
            "the deregistered instance is still on {on:?} 40 s after its home died (client now on {:?})",
            client.home()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(client.home().as_deref(), Some(servers[1].as_str()));
    client.close().await.unwrap();
}
