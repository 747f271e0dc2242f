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
