//! No flap when a node dies: 5 nodes, 10 SDK clients with 5 instances each. One node is
//! killed with SIGKILL. Its clients fail over to other nodes and resume their sessions;
//! no instance of a live client ever goes missing on any surviving node, through the
//! whole grace period in which the owners could have reaped the orphaned sessions;
//! writes keep succeeding; and the survivors converge to identical copies.

use std::time::{Duration, Instant};

use shoal_client::{Client, ClientConfig};
use shoal_storage::{InstanceSpec, ServiceKey, SessionId};
use shoal_tests::*;

const CLIENTS: usize = 10;
const INSTANCES_PER_CLIENT: usize = 5;
const SESSION_GRACE_MS: u64 = 10_000;
/// The nodes' `down_after_ms` (default).
const DOWN_AFTER_MS: u64 = 2_500;
/// Generous bound for a client to notice its node died and resume elsewhere (its idle
/// timeout is 6 s).
const FAILOVER_BOUND: Duration = Duration::from_secs(30);

fn instance_of(client: usize, s: usize) -> InstanceSpec {
    inst(&format!("10.4.{client}.{s}"), 7000)
}

/// Registers, retrying what the SDK calls transient (the owner just died, the node is
/// reconnecting) for up to 30 s. Returns how many attempts it took.
async fn register_retrying(client: &Client, service: &ServiceKey, spec: InstanceSpec) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut attempts = 0;
    loop {
        attempts += 1;
        match client.register(service, spec.clone()).await {
            Ok(_) => return attempts,
            Err(e) if e.is_transient() && Instant::now() < deadline => {
                println!("register {} {}: {e}; retrying", service.service, spec.ip);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!(
                "register {} {} failed for good: {e}",
                service.service, spec.ip
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_killed_node_fail_over_and_no_live_instance_ever_goes_missing() {
    let mut cluster =
        Cluster::start_with(5, NodeOptions::default().session_grace_ms(SESSION_GRACE_MS)).await;
    cluster.wait_until_converged().await;

    // Five services, one owned by each node: whichever node dies owns one of them.
    let mut services = Vec::new();
    for n in 0..5 {
        services.push(cluster.service_owned_by(n, "failover").await);
    }
    let service = |s: usize| services[s].clone();

    // Ten clients, each given every node; the SDK picks where it starts.
    let mut clients = Vec::new();
    let mut expected = Vec::new();
    for c in 0..CLIENTS {
        let config = ClientConfig::new(cluster.servers(), cluster.ca_file())
            .with_client_name(format!("failover-client-{c}"));
        let client = Client::connect(config).await.expect("connect");
        for s in 0..INSTANCES_PER_CLIENT {
            client
                .register(&service(s), instance_of(c, s))
                .await
                .expect("register");
            expected.push((service(s), instance_of(c, s).ip, 7000));
        }
        clients.push(client);
    }
    let homes: Vec<usize> = clients
        .iter()
        .map(|c| {
            let home = c.home().expect("connected");
            cluster.index_of_addr(&home).expect("home is a node")
        })
        .collect();
    // Ten clients on five nodes: some node homes at least two. Kill the busiest.
    let victim = (0..5)
        .max_by_key(|&n| homes.iter().filter(|&&h| h == n).count())
        .expect("five nodes");
    let orphans: Vec<usize> = (0..CLIENTS).filter(|&c| homes[c] == victim).collect();
    assert!(orphans.len() >= 2, "homes {homes:?}");
    let survivors: Vec<usize> = (0..5).filter(|&n| n != victim).collect();
    println!(
        "homes {homes:?}; killing {} which homes clients {orphans:?}",
        cluster.node(victim).id()
    );
    println!(
        "{} owns {}",
        cluster.node(victim).id(),
        services[victim].service
    );
    wait_for(
        "every node to hold all 50 instances",
        CONVERGENCE_TIMEOUT,
        || async {
            cluster.check_converged().await.is_ok()
                && instances_count(&cluster.node(0).dump().await) == expected.len()
        },
    )
    .await;

    // Every survivor is watched every 50 ms for every instance, from before the kill
    // until well after the owners could have reaped the orphaned sessions.
    let watches: Vec<DumpWatch> = survivors
        .iter()
        .map(|&n| DumpWatch::start(cluster.node(n), expected.clone(), Duration::from_millis(50)))
        .collect();
    let before: Vec<(u64, SessionId)> = clients
        .iter()
        .map(|c| (c.generation(), c.session_id()))
        .collect();
    let victim_addr = cluster.node(victim).quic_addr().to_string();

    let killed_at = Instant::now();
    cluster.kill9(victim);

    // Writes keep succeeding: right after the kill every client registers one more
    // instance in the service the dead node owned (retrying is fine).
    let mut writes = tokio::task::JoinSet::new();
    let mut added = Vec::new();
    for (c, client) in clients.iter().enumerate() {
        let (client, service) = (client.clone(), services[victim].clone());
        let spec = inst(&format!("10.5.{c}.1"), 7100);
        added.push((service.clone(), spec.ip.clone(), 7100));
        writes.spawn(async move {
            let attempts = register_retrying(&client, &service, spec).await;
            (c, attempts, killed_at.elapsed())
        });
    }

    // The orphaned clients reconnect elsewhere and resume the same session.
    for &c in &orphans {
        let mut generation = clients[c].watch_generation();
        tokio::time::timeout(FAILOVER_BOUND, generation.wait_for(|g| *g > before[c].0))
            .await
            .unwrap_or_else(|_| panic!("client {c} did not reconnect within {FAILOVER_BOUND:?}"))
            .expect("the client lives");
        let home = clients[c].home();
        assert!(
            home.as_ref().is_some_and(|h| *h != victim_addr),
            "client {c} is homed on {home:?} after the failover"
        );
        assert_eq!(
            clients[c].session_id(),
            before[c].1,
            "client {c} resumed its session"
        );
        println!(
            "client {c} failed over to {home:?} after {:?}",
            killed_at.elapsed()
        );
    }
    for c in (0..CLIENTS).filter(|c| !orphans.contains(c)) {
        assert_eq!(
            clients[c].generation(),
            before[c].0,
            "client {c} kept its link"
        );
    }

    while let Some(done) = writes.join_next().await {
        let (c, attempts, after) = done.expect("a write task panicked");
        println!(
            "client {c}'s write after the kill succeeded after {attempts} attempt(s), {after:?}"
        );
    }

    // Keep watching through down_after + grace and a margin.
    let watch_until = killed_at + Duration::from_millis(DOWN_AFTER_MS + SESSION_GRACE_MS + 5_000);
    tokio::time::sleep_until(watch_until.into()).await;
    for watch in watches {
        let report = watch.stop().await;
        println!(
            "{}: {} polls, {} failed, {} misses",
            report.node,
            report.polls,
            report.failed_polls,
            report.misses.len()
        );
        assert!(report.polls > 50, "{report:?}");
        assert!(
            report.misses.is_empty(),
            "instances of live clients went missing on {}: {:?}",
            report.node,
            &report.misses[..report.misses.len().min(20)]
        );
    }

    // The survivors converge, holding every instance of every live client.
    cluster.wait_until_converged().await;
    for (n, dump) in cluster.dumps().await {
        for (service, ip, port) in expected.iter().chain(&added) {
            assert!(
                dump_has(&dump, service, ip, *port),
                "{} lacks {} {ip}:{port}",
                cluster.node(n).id(),
                service.service
            );
        }
        assert_eq!(
            instances_count(&dump),
            expected.len() + added.len(),
            "{}: {dump}",
            cluster.node(n).id()
        );
    }
    for client in clients {
        let _ = client.close().await;
    }
}

fn instances_count(dump: &Value) -> usize {
    dump.as_array()
        .into_iter()
        .flatten()
        .map(|s| s["instances"].as_array().map_or(0, Vec::len))
        .sum()
}

/// With the default liveness (a 12 s idle timeout) and request timeout (10 s), a write
/// sent just after its home node died succeeds in one call only if the SDK notices the
/// dead node by itself: while a request waits, it probes a node that sends nothing and
/// gives it up when the probe goes unanswered, then resumes elsewhere and retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_sent_as_its_home_node_dies_succeeds_within_one_request_timeout() {
    let mut cluster = Cluster::start_with(3, NodeOptions::default()).await;
    cluster.wait_until_converged().await;
    let config =
        ClientConfig::new(cluster.servers(), cluster.ca_file()).with_client_name("probing-client");
    let client = Client::connect(config).await.expect("connect");
    let service = svc("probed");
    client
        .register(&service, inst("10.6.0.1", 7000))
        .await
        .expect("register");
    let home = client.home().expect("connected");
    let victim = cluster.index_of_addr(&home).expect("home is a node");
    let (generation, session) = (client.generation(), client.session_id());
    cluster.kill9(victim);
    let started = Instant::now();
    client
        .register(&service, inst("10.6.0.2", 7000))
        .await
        .expect("one write, sent as the home node died, within the request timeout");
    println!("the write succeeded after {:?}", started.elapsed());
    assert!(client.generation() > generation, "the client reconnected");
    assert_ne!(client.home(), Some(home), "on another node");
    assert_eq!(client.session_id(), session, "resuming its session");
}
