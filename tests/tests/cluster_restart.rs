//! Restarts and zombies in a 3-node cluster of real processes.
//!
//! - A node killed with SIGKILL and started again with the same id and data directory
//!   (on its old ports, and another time on new ones) loads the registry from a peer
//!   before it says ready, and the cluster converges: identical dumps everywhere within
//!   [`CONVERGENCE_TIMEOUT`].
//! - No zombies: the instance of a `shoal register` process killed with SIGKILL leaves
//!   every node within idle timeout + grace + a bounded delay; when its home node dies
//!   with it, within down detection + grace + a bounded delay.

use std::time::{Duration, Instant};

use shoal_client::Client;
use shoal_storage::ServiceKey;
use shoal_tests::*;

/// Generous bound for membership changes (a dead node is down after 3 s).
const PATIENCE: Duration = Duration::from_secs(60);
/// Slack allowed on top of a lease's documented timeout before an instance of a dead
/// client must be gone (probe interval, replication, a loaded machine).
const ZOMBIE_SLACK: Duration = Duration::from_secs(15);

/// Polls `/readyz` on `http` until it says 200, then takes that node's `/v1/dump` at
/// once: what the node serves the moment it calls itself ready.
fn dump_at_first_ready(http: std::net::SocketAddr) -> tokio::task::JoinHandle<Value> {
    tokio::spawn(async move {
        loop {
            match http_get(http, "/readyz").await {
                Ok(r) if r.status == 200 => {
                    let dump = http_get(http, "/v1/dump").await.expect("dump when ready");
                    return serde_json::from_str::<Value>(&dump.body).expect("dump is JSON");
                }
                _ => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        }
    })
}

/// Whether every live node of `cluster` lists `ip:port` in `service`.
async fn everywhere(cluster: &Cluster, service: &ServiceKey, ip: &str, port: u16) -> bool {
    for i in cluster.live() {
        if cluster.node(i).instance(service, ip, port).await.is_none() {
            return false;
        }
    }
    true
}

/// Whether no live node of `cluster` lists `ip:port` in `service`.
async fn nowhere(cluster: &Cluster, service: &ServiceKey, ip: &str, port: u16) -> bool {
    for i in cluster.live() {
        if cluster.node(i).instance(service, ip, port).await.is_some() {
            return false;
        }
    }
    true
}

/// A converged 3-node cluster holding data: clients homed on n0 and n1 register 2
/// instances in each of 20 services and in one that n2 owns (returned, with the
/// clients, which must stay alive to keep their instances).
async fn cluster_with_data() -> (Cluster, ServiceKey, [Client; 2]) {
    let cluster = Cluster::start(3).await;
    cluster.wait_until_converged().await;
    let owned = cluster.service_owned_by(2, "restart").await;
    println!("n2 owns {}", owned.service);
    let clients = [
        cluster.node(0).client().await,
        cluster.node(1).client().await,
    ];
    let mut services: Vec<ServiceKey> = (0..20).map(|k| svc(&format!("restart-{k}"))).collect();
    if !services.contains(&owned) {
        services.push(owned.clone());
    }
    for service in &services {
        for (c, client) in clients.iter().enumerate() {
            client
                .register(service, inst(&format!("10.7.{c}.1"), port_of(service)))
                .await
                .expect("register");
        }
    }
    cluster.wait_until_converged().await;
    (cluster, owned, clients)
}

/// Waits for the readiness watch and checks that what the node served the moment it
/// said ready was the whole registry (no writes are in flight in these scenarios).
async fn assert_full_at_ready(
    cluster: &Cluster,
    restarted: usize,
    watch: tokio::task::JoinHandle<Value>,
) {
    let first = tokio::time::timeout(PATIENCE, watch)
        .await
        .expect("the restarted node said ready")
        .expect("the readiness watch");
    let reference = cluster.node(0).dump().await;
    assert_eq!(
        first,
        reference,
        "{} said ready before it held the registry: {}",
        cluster.node(restarted).id(),
        dump_difference(&reference, &first)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_after_its_crash_was_noticed_rejoins_with_the_full_registry() {
    let (mut cluster, owned, clients) = cluster_with_data().await;
    let restarted = 2;
    let id = cluster.node(restarted).id().to_string();

    // A crash the others notice, writes while the node is down (to a service it owned),
    // then a restart with the same id and data directory on new ports: the others must
    // learn its new address from it.
    let old_addr = cluster.node(restarted).quic_addr();
    cluster.kill9(restarted);
    cluster.wait_until_seen_down(restarted, PATIENCE).await;
    clients[0]
        .register(&owned, inst("10.7.9.1", 4000))
        .await
        .expect("a write to a service the dead node owned");
    clients[1]
        .deregister(&owned, &inst("10.7.1.1", port_of(&owned)).key())
        .await
        .expect("a deregistration while it is down");
    cluster.wait_until_converged().await;

    let http = free_tcp_addr();
    let watch = dump_at_first_ready(http);
    cluster.restart_at(restarted, None, Some(http)).await;
    assert_full_at_ready(&cluster, restarted, watch).await;
    let new_addr = cluster.node(restarted).quic_addr();
    println!("{id} moved from {old_addr} to {new_addr}");
    let took = cluster.wait_until_converged().await;
    println!("converged {took:?} after the restart");
    for i in [0, 1] {
        let seen = member_entry(&cluster.node(i).members().await, &id);
        assert_eq!(
            seen,
            Some(("up".to_string(), true, new_addr.to_string())),
            "{} must know {id} at its new address",
            cluster.node(i).id()
        );
    }
    let dump = cluster.node(restarted).dump().await;
    assert!(dump_has(&dump, &owned, "10.7.9.1", 4000), "{dump}");
    assert!(
        !dump_has(&dump, &owned, "10.7.1.1", port_of(&owned)),
        "{dump}"
    );

    // The restarted node takes writes again, and they reach everyone.
    let client = cluster.node(restarted).client().await;
    client
        .register(&owned, inst("10.7.2.1", 5000))
        .await
        .expect("a write through the restarted node");
    wait_for(
        "the write through the restarted node to reach every node",
        PATIENCE,
        || everywhere(&cluster, &owned, "10.7.2.1", 5000),
    )
    .await;
    cluster.wait_until_converged().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_at_once_after_a_crash_converges_and_the_others_lose_nothing() {
    let (mut cluster, _owned, _clients) = cluster_with_data().await;
    let restarted = 2;
    let mut expected = Vec::new();
    let dump = cluster.node(0).dump().await;
    for service in dump.as_array().into_iter().flatten() {
        let key: ServiceKey =
            serde_json::from_value(service["key"].clone()).expect("a service key");
        for i in service["instances"].as_array().into_iter().flatten() {
            let ip = i["ip"].as_str().expect("ip").to_string();
            let port = i["port"].as_u64().expect("port") as u16;
            expected.push((key.clone(), ip, port));
        }
    }
    let watches: Vec<DumpWatch> = [0, 1]
        .iter()
        .map(|&i| DumpWatch::start(cluster.node(i), expected.clone(), Duration::from_millis(50)))
        .collect();

    // A crash and an immediate restart on the same ports (a supervisor restarting the
    // process), before the others notice it was gone.
    cluster.kill9(restarted);
    let restarted_at = Instant::now();
    cluster.restart(restarted).await;
    let took = cluster.wait_until_converged().await;
    println!(
        "converged {:?} after the immediate restart ({took:?} after it said ready)",
        restarted_at.elapsed()
    );
    for watch in watches {
        let report = watch.stop().await;
        assert!(report.polls > 0, "{report:?}");
        assert!(
            report.misses.is_empty(),
            "{} lost instances while n2 restarted: {:?}",
            report.node,
            &report.misses[..report.misses.len().min(10)]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_at_once_after_a_crash_loads_the_registry_before_it_is_ready() {
    let (mut cluster, _owned, _clients) = cluster_with_data().await;
    let restarted = 2;

    // A crash and an immediate restart on the same ports (a supervisor restarting the
    // process), before the others notice it was gone.
    cluster.kill9(restarted);
    let watch = dump_at_first_ready(cluster.node(restarted).http_addr());
    cluster.restart(restarted).await;
    assert_full_at_ready(&cluster, restarted, watch).await;
    let took = cluster.wait_until_converged().await;
    println!("converged {took:?} after the immediate restart");
}

/// The port of the instances registered in `restart-{k}`: 1000 + k.
fn port_of(service: &ServiceKey) -> u16 {
    let k: u16 = service
        .service
        .strip_prefix("restart-")
        .and_then(|k| k.parse().ok())
        .expect("a restart-{k} service");
    1000 + k
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_client_process_leaves_every_node_within_idle_timeout_plus_grace() {
    const IDLE_MS: u64 = 2_000;
    const GRACE_MS: u64 = 1_500;
    let cluster = Cluster::start_with(
        3,
        NodeOptions::default()
            .session_grace_ms(GRACE_MS)
            .idle_timeout_ms(IDLE_MS)
            .keep_alive_interval_ms(500),
    )
    .await;
    cluster.wait_until_converged().await;
    // Homed on n0, owned by n2: the home reports the lost session, the owner reaps.
    let zombie = cluster.service_owned_by(2, "zombie").await;
    let mut register = CliProcess::spawn(
        cluster.node(0),
        &["register", &zombie.service, "10.8.0.1:80", "--json"],
    );
    let line = register.next_line(PATIENCE).await;
    assert!(line.contains("registered"), "{line}");
    wait_for("the instance on every node", PATIENCE, || {
        everywhere(&cluster, &zombie, "10.8.0.1", 80)
    })
    .await;

    register.kill9();
    let killed = Instant::now();
    let bound = Duration::from_millis(IDLE_MS + GRACE_MS) + ZOMBIE_SLACK;
    wait_for(
        "the killed client's instance to leave every node",
        bound,
        || nowhere(&cluster, &zombie, "10.8.0.1", 80),
    )
    .await;
    println!(
        "gone everywhere {:?} after the kill (idle timeout {IDLE_MS} ms + grace {GRACE_MS} ms)",
        killed.elapsed()
    );
    cluster.wait_until_converged().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_of_a_client_that_died_with_its_home_node_leave_after_down_plus_grace() {
    const GRACE_MS: u64 = 1_500;
    const DOWN_AFTER_MS: u64 = 2_500;
    let mut cluster =
        Cluster::start_with(3, NodeOptions::default().session_grace_ms(GRACE_MS)).await;
    cluster.wait_until_converged().await;
    // Homed on n2, owned by n0; n2 and the client die together: nobody reports the
    // session closed, the owner must reap it as an orphan.
    let orphan = cluster.service_owned_by(0, "orphan").await;
    let mut register = CliProcess::spawn(
        cluster.node(2),
        &["register", &orphan.service, "10.8.1.1:80", "--json"],
    );
    let line = register.next_line(PATIENCE).await;
    assert!(line.contains("registered"), "{line}");
    wait_for("the instance on every node", PATIENCE, || {
        everywhere(&cluster, &orphan, "10.8.1.1", 80)
    })
    .await;

    register.kill9();
    cluster.kill9(2);
    let killed = Instant::now();
    let bound = Duration::from_millis(DOWN_AFTER_MS + GRACE_MS) + ZOMBIE_SLACK;
    wait_for(
        "the orphaned instance to leave every survivor",
        bound,
        || nowhere(&cluster, &orphan, "10.8.1.1", 80),
    )
    .await;
    println!(
        "gone everywhere {:?} after the kill (down after {DOWN_AFTER_MS} ms + grace {GRACE_MS} ms)",
        killed.elapsed()
    );
    cluster.wait_until_converged().await;
}
