//! Ownership across real processes: every node names the same owner for each of 10,000
//! service keys; when one of 5 nodes dies, exactly the keys it owned change owner and
//! the survivors agree on their new owners; when a sixth node joins, about 1/6 of the
//! keys move, all of them to it, and the joiner answers reads only once it holds the
//! full registry.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use shoal_storage::ServiceKey;
use shoal_tests::*;

/// How many service keys the owners are compared for.
const KEYS: usize = 10_000;
/// Requests in flight per node while asking for owners.
const IN_FLIGHT: usize = 32;
/// Generous bound for membership changes (a dead node is down after 3 s).
const PATIENCE: Duration = Duration::from_secs(60);

/// The owner of every key as `node` computes it, asked over the SDK (`Ring` requests,
/// pipelined on one connection).
async fn owners_on(node: &Node, keys: &Arc<Vec<ServiceKey>>) -> Vec<String> {
    let client = node.client().await;
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..IN_FLIGHT {
        let (client, keys) = (client.clone(), Arc::clone(keys));
        tasks.spawn(async move {
            let mut found = Vec::new();
            for i in (worker..keys.len()).step_by(IN_FLIGHT) {
                let ring = client
                    .ring(Some(&keys[i]))
                    .await
                    .unwrap_or_else(|e| panic!("ring of {}: {e}", keys[i]));
                let owner = ring
                    .owner
                    .unwrap_or_else(|| panic!("no owner for {}", keys[i]));
                found.push((i, owner.0));
            }
            found
        });
    }
    let mut owners = vec![String::new(); keys.len()];
    while let Some(found) = tasks.join_next().await {
        for (i, owner) in found.expect("an owner worker panicked") {
            owners[i] = owner.to_string();
        }
    }
    let _ = client.close().await;
    owners
}

/// The owners computed on each of `nodes`, checked to be identical; returns them.
async fn agreed_owners(
    cluster: &Cluster,
    nodes: &[usize],
    keys: &Arc<Vec<ServiceKey>>,
) -> Vec<String> {
    let started = Instant::now();
    let mut agreed: Option<(usize, Vec<String>)> = None;
    for &i in nodes {
        let owners = owners_on(cluster.node(i), keys).await;
        match &agreed {
            None => agreed = Some((i, owners)),
            Some((first, reference)) => {
                let differ: Vec<String> = (0..keys.len())
                    .filter(|&k| owners[k] != reference[k])
                    .take(5)
                    .map(|k| format!("{}: {} vs {}", keys[k], reference[k], owners[k]))
                    .collect();
                assert!(
                    differ.is_empty(),
                    "{} and {} name different owners, e.g. {differ:?}",
                    cluster.node(*first).id(),
                    cluster.node(i).id()
                );
            }
        }
    }
    println!(
        "{} nodes agree on the owners of {} keys ({:?})",
        nodes.len(),
        keys.len(),
        started.elapsed()
    );
    agreed.expect("at least one node").1
}

/// How many keys each node owns.
fn tally(owners: &[String]) -> BTreeMap<&str, usize> {
    let mut t = BTreeMap::new();
    for o in owners {
        *t.entry(o.as_str()).or_default() += 1;
    }
    t
}

/// Waits until every node in `nodes` has a ring of exactly `members`, identical
/// (shares included) everywhere.
async fn wait_for_same_ring(cluster: &Cluster, nodes: &[usize], members: &[&str]) {
    let mut want: Vec<String> = members.iter().map(|m| m.to_string()).collect();
    want.sort();
    wait_for(
        &format!("every node's ring to be exactly {want:?}"),
        PATIENCE,
        || async {
            let mut rings = Vec::new();
            for &i in nodes {
                rings.push(cluster.node(i).ring_shares().await);
            }
            let ids: Vec<String> = rings[0].iter().map(|(id, _)| id.clone()).collect();
            ids == want && rings.iter().all(|r| *r == rings[0])
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_agree_on_owners_and_a_failure_or_a_join_moves_only_what_it_must() {
    let mut rng = test_rng("ownership");
    let keys: Arc<Vec<ServiceKey>> = Arc::new(
        (0..KEYS)
            .map(|k| {
                let group = ["DEFAULT_GROUP", "blue", "green"][k % 3];
                ServiceKey::new("public", group, format!("svc-{:016x}", rng.random::<u64>()))
            })
            .collect(),
    );
    let mut cluster = Cluster::start(5).await;
    cluster.wait_until_converged().await;
    let ids: Vec<String> = (0..5).map(|i| cluster.node(i).id().to_string()).collect();
    let victim = rng.random_range(0..5);
    let survivors: Vec<usize> = (0..5).filter(|&i| i != victim).collect();
    println!("killing {} of {ids:?}", ids[victim]);

    // Some data, held by a client homed on a survivor, for the joiner to load later.
    let home = survivors[0];
    let client = cluster.node(home).client().await;
    for k in 0..60 {
        client
            .register(&svc(&format!("data-{k}")), inst("10.3.0.1", 1000 + k))
            .await
            .expect("register");
    }
    cluster.wait_until_converged().await;

    // Same member view, same ring, same owner for every key, on every node.
    let all: Vec<&str> = ids.iter().map(String::as_str).collect();
    wait_for_same_ring(&cluster, &[0, 1, 2, 3, 4], &all).await;
    let before = agreed_owners(&cluster, &[0, 1, 2, 3, 4], &keys).await;
    let shares = tally(&before);
    println!("owners with 5 nodes: {shares:?}");
    assert_eq!(shares.len(), 5, "every node owns some keys: {shares:?}");

    // One node dies. Once the survivors see it down, its keys, and only its keys, move.
    cluster.kill9(victim);
    cluster.wait_until_seen_down(victim, PATIENCE).await;
    let alive: Vec<&str> = survivors.iter().map(|&i| ids[i].as_str()).collect();
    wait_for_same_ring(&cluster, &survivors, &alive).await;
    let after = agreed_owners(&cluster, &survivors, &keys).await;
    let mut moved = 0;
    for k in 0..KEYS {
        if before[k] == ids[victim] {
            assert_ne!(after[k], ids[victim], "{} still on the dead node", keys[k]);
            moved += 1;
        } else {
            assert_eq!(
                after[k], before[k],
                "{} moved from {} to {} although its owner lives",
                keys[k], before[k], after[k]
            );
        }
    }
    println!(
        "{moved} of {KEYS} keys moved off {}; owners now {:?}",
        ids[victim],
        tally(&after)
    );
    assert_eq!(moved, shares[ids[victim].as_str()]);
    cluster.wait_until_converged().await;

    // A sixth node joins through one survivor. Watch its readiness from the start: the
    // first time it says ready, its copy must already be the cluster's.
    let http = free_tcp_addr();
    let watch = tokio::spawn(async move {
        let mut not_ready = 0;
        loop {
            match http_get(http, "/readyz").await {
                Ok(r) if r.status == 200 => {
                    let dump = http_get(http, "/v1/dump").await.expect("dump when ready");
                    let dump = serde_json::from_str::<Value>(&dump.body).expect("dump is JSON");
                    return (dump, not_ready);
                }
                Ok(r) => {
                    assert_eq!(r.status, 503, "/readyz of a starting node: {}", r.body);
                    not_ready += 1;
                }
                Err(_) => {} // not listening yet
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    let mut opts = cluster.options_for("n5").http_addr(http);
    opts.seeds = vec![cluster.node(survivors[0]).quic_addr().to_string()];
    let joiner = cluster.add_node_with(opts).await;
    let (first_ready_dump, not_ready) = tokio::time::timeout(PATIENCE, watch)
        .await
        .expect("the joiner said ready")
        .expect("the readiness watch");
    println!("the joiner answered /readyz 503 {not_ready} time(s) before 200");
    let reference = cluster.node(home).dump().await;
    assert_eq!(
        first_ready_dump,
        reference,
        "the joiner answered ready before it held the registry: {}",
        dump_difference(&reference, &first_ready_dump)
    );

    let mut now_live = survivors.clone();
    now_live.push(joiner);
    let mut members = alive.clone();
    members.push(cluster.node(joiner).id());
    wait_for_same_ring(&cluster, &now_live, &members).await;
    let joined = agreed_owners(&cluster, &now_live, &keys).await;
    let mut to_joiner = 0;
    for k in 0..KEYS {
        if joined[k] != after[k] {
            assert_eq!(
                joined[k],
                cluster.node(joiner).id(),
                "{} moved from {} to {}, not to the joiner",
                keys[k],
                after[k],
                joined[k]
            );
            to_joiner += 1;
        }
    }
    let share = to_joiner as f64 / KEYS as f64;
    println!(
        "{to_joiner} of {KEYS} keys ({:.1}%) moved to the joiner; owners now {:?}",
        share * 100.0,
        tally(&joined)
    );
    assert!(
        (0.08..=0.30).contains(&share),
        "a join of a 5th live node should move about 1/5 of the keys, moved {share}"
    );
    cluster.wait_until_converged().await;
}
