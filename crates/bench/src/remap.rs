//! The remap phase of `shoal-bench cluster`: how many services change owner when a
//! node dies and when one joins, against Distro's `hash % N` rule.
//!
//! 1. Ask every node, over the SDK (`Client::ring(Some(key))`), for the owner and the
//!    ring position of each of `--remap-keys` service keys. The first node's answers
//!    are the reference; answers of other nodes that differ are counted.
//! 2. Kill the last node (node-N) with SIGKILL; wait until every survivor's ring
//!    excludes it; ask the survivors again. Compare.
//! 3. Restart node-N (same id and address, fresh data directory); wait until all N
//!    are in every ring; ask again: the owners should be those of step 1.
//! 4. Start node-(N+1), seeded with node-1; wait until all N+1 are in every ring; ask
//!    again and compare with step 3.
//!
//! For each change, the same keys are also assigned with Distro's rule, owner =
//! `members[position % members.len()]` with the members sorted by id and `position`
//! the key's ring position as the node reports it (`shoal_ring::position` of the key's
//! placement bytes): the fraction that rule would move for the same change.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use shoal_client::{Client, ServiceKey};
use tokio::task::JoinSet;

use crate::cluster::{free_udp_ports, node_id, Cluster};
use crate::cpu::{CpuMark, PhaseCpu, QuietWait};
use crate::single_node::NAMESPACE;
use crate::ClusterArgs;

/// Group of the remap phase's service keys (never registered: only asked about).
const GROUP: &str = "shoal-bench-remap";
/// Ring questions in flight per client.
const IN_FLIGHT: usize = 64;

/// Figures of the remap phase.
#[derive(Debug, Serialize)]
pub struct RemapPhase {
    /// The wait for a quiet machine before it.
    pub quiet: QuietWait,
    /// Service keys compared.
    pub keys: usize,
    /// The owners on the starting ring.
    pub start: Ownership,
    /// node-N killed.
    pub kill: Change,
    /// node-N restarted: keys whose owner differs from the starting ring (expected 0).
    pub rejoin_differs: usize,
    /// Seconds from the restart until every ring held all N nodes again.
    pub rejoin_converged_seconds: f64,
    /// The owners after the restart.
    pub rejoined: Ownership,
    /// node-(N+1) added to the N-node ring.
    pub join: Change,
    /// CPU and memory of the original nodes over the whole phase (the killed node's
    /// figures are missing).
    pub cpu: PhaseCpu,
}

/// Who owns the keys on one ring.
#[derive(Debug, Clone, Serialize)]
pub struct Ownership {
    /// The ring's members, sorted by id.
    pub members: Vec<String>,
    /// Keys owned per member, in the order of `members`.
    pub owned: Vec<usize>,
    /// Answers from other nodes that differ from the first node's (expected 0).
    pub disagreements: usize,
    #[serde(skip)]
    owners: Vec<String>,
    #[serde(skip)]
    positions: Vec<u64>,
}

/// What one membership change moved.
#[derive(Debug, Serialize)]
pub struct Change {
    /// The node that died or joined.
    pub node: String,
    /// Seconds from the kill (or start) until every running node's ring was the new one.
    pub converged_seconds: f64,
    /// The owners after the change.
    pub after: Ownership,
    /// Keys whose owner changed, and their share of all keys.
    pub moved: usize,
    pub moved_fraction: f64,
    /// Of the moved keys: those that moved from (kill) or to (join) the changed node.
    /// The rest moved between nodes that did not change (expected 0).
    pub moved_via_changed_node: usize,
    /// What a consistent ring moves at best: the killed node's share of the keys
    /// before, or the joined node's share after.
    pub minimum_fraction: f64,
    /// Keys Distro's `hash % N` rule would move for the same change, and their share.
    pub modulo_moved: usize,
    pub modulo_fraction: f64,
}

/// Asks `client`'s node for the owner and ring position of every key.
async fn owners_from(client: &Client, keys: &Arc<Vec<ServiceKey>>) -> Result<Vec<(String, u64)>> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..IN_FLIGHT {
        let (client, keys, next) = (client.clone(), keys.clone(), next.clone());
        tasks.spawn(async move {
            let mut got = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(key) = keys.get(i) else {
                    return Ok::<_, anyhow::Error>(got);
                };
                let view = client
                    .ring(Some(key))
                    .await
                    .with_context(|| format!("ring of {}", key.service))?;
                let owner = view
                    .owner
                    .ok_or_else(|| anyhow!("no owner for {}", key.service))?;
                let position = view
                    .position
                    .ok_or_else(|| anyhow!("no position for {}", key.service))?;
                got.push((i, owner.0.to_string(), position));
            }
        });
    }
    let mut all = vec![(String::new(), 0u64); keys.len()];
    while let Some(joined) = tasks.join_next().await {
        for (i, owner, position) in joined?? {
            all[i] = (owner, position);
        }
    }
    Ok(all)
}

/// Asks every client; the first one's answers are the reference.
async fn ownership(
    clients: &[Client],
    keys: &Arc<Vec<ServiceKey>>,
    members: &[String],
) -> Result<Ownership> {
    let mut answers = Vec::new();
    for client in clients {
        answers.push(owners_from(client, keys).await?);
    }
    let reference = answers
        .first()
        .ok_or_else(|| anyhow!("no node to ask"))?
        .clone();
    let disagreements = answers[1..]
        .iter()
        .map(|a| a.iter().zip(&reference).filter(|(x, y)| x != y).count())
        .sum();
    let mut members = members.to_vec();
    members.sort();
    let owned = members
        .iter()
        .map(|m| reference.iter().filter(|(o, _)| o == m).count())
        .collect();
    let unknown: Vec<&String> = reference
        .iter()
        .map(|(o, _)| o)
        .filter(|o| !members.contains(o))
        .collect();
    if let Some(o) = unknown.first() {
        bail!("owner {o} is not among the members {members:?}");
    }
    Ok(Ownership {
        members,
        owned,
        disagreements,
        owners: reference.iter().map(|(o, _)| o.clone()).collect(),
        positions: reference.iter().map(|(_, p)| *p).collect(),
    })
}

/// Distro's owner: `members[position % members.len()]`, members sorted by id.
fn modulo_owner(sorted_members: &[String], position: u64) -> &str {
    &sorted_members[(position % sorted_members.len() as u64) as usize]
}

/// Compares two rings over the same keys; `changed` is the node that left or joined.
fn compare(before: &Ownership, after: Ownership, changed: &str, converged: f64) -> Change {
    let keys = before.owners.len();
    let moved_keys: Vec<usize> = (0..keys)
        .filter(|&i| before.owners[i] != after.owners[i])
        .collect();
    let moved_via_changed_node = moved_keys
        .iter()
        .filter(|&&i| before.owners[i] == changed || after.owners[i] == changed)
        .count();
    let share_of = |o: &Ownership| {
        o.members
            .iter()
            .position(|m| m == changed)
            .map_or(0, |i| o.owned[i])
    };
    let minimum = share_of(before).max(share_of(&after));
    let modulo_moved = (0..keys)
        .filter(|&i| {
            let p = before.positions[i];
            modulo_owner(&before.members, p) != modulo_owner(&after.members, p)
        })
        .count();
    let fraction = |n: usize| n as f64 / keys.max(1) as f64;
    Change {
        node: changed.to_string(),
        converged_seconds: converged,
        moved: moved_keys.len(),
        moved_fraction: fraction(moved_keys.len()),
        moved_via_changed_node,
        minimum_fraction: fraction(minimum),
        modulo_moved,
        modulo_fraction: fraction(modulo_moved),
        after,
    }
}

/// One client per running node, homed there, in node order.
async fn clients_of(cluster: &Cluster) -> Result<Vec<Client>> {
    let mut clients = Vec::new();
    for node in cluster.live() {
        clients.push(
            crate::target::connect_shoal(cluster.client_config(node))
                .await
                .with_context(|| format!("connecting to {}", node.id))?,
        );
    }
    Ok(clients)
}

async fn close_all(clients: Vec<Client>) {
    for client in clients {
        if let Err(e) = client.close().await {
            eprintln!("warning: closing a client: {e}");
        }
    }
}

pub async fn run(
    args: &ClusterArgs,
    cluster: &mut Cluster,
    quiet: QuietWait,
) -> Result<RemapPhase> {
    let n = args.nodes;
    let keys: Arc<Vec<ServiceKey>> = Arc::new(
        (0..args.remap_keys)
            .map(|k| ServiceKey::new(NAMESPACE, GROUP, format!("svc-{k:05}")))
            .collect(),
    );
    let all: Vec<String> = (0..n).map(node_id).collect();
    let survivors: Vec<String> = all[..n - 1].to_vec();
    let victim = all[n - 1].clone();
    let mark = CpuMark::now(&cluster.pids());

    // 1. The starting ring.
    let clients = clients_of(cluster).await?;
    let start = ownership(&clients, &keys, &all).await?;
    close_all(clients).await;
    eprintln!(
        "remap: {} keys on {:?}: {:?} owned, {} disagreements",
        keys.len(),
        start.members,
        start.owned,
        start.disagreements
    );

    // 2. Kill the last node.
    let victim_addr = cluster.node(&victim)?.quic_addr.clone();
    let killed_at = Instant::now();
    cluster.kill(&victim).await?;
    cluster.wait_converged(&survivors).await?;
    let converged = killed_at.elapsed().as_secs_f64();
    let clients = clients_of(cluster).await?;
    let after_kill = ownership(&clients, &keys, &survivors).await?;
    close_all(clients).await;
    let kill = compare(&start, after_kill, &victim, converged);
    eprintln!(
        "remap: {victim} killed; rings converged after {converged:.2} s; {} keys moved \
         ({:.1}%), hash % N would move {:.1}%",
        kill.moved,
        100.0 * kill.moved_fraction,
        100.0 * kill.modulo_fraction
    );

    // 3. Restart it: back to the starting ring.
    let seeds: Vec<String> = cluster.live().map(|node| node.quic_addr.clone()).collect();
    let restarted_at = Instant::now();
    cluster
        .start_node(&victim, &victim_addr, seeds, "-restarted")
        .await?;
    cluster.wait_converged(&all).await?;
    let rejoin_converged_seconds = restarted_at.elapsed().as_secs_f64();
    let clients = clients_of(cluster).await?;
    let rejoined = ownership(&clients, &keys, &all).await?;
    close_all(clients).await;
    let rejoin_differs = (0..keys.len())
        .filter(|&i| rejoined.owners[i] != start.owners[i])
        .count();
    eprintln!(
        "remap: {victim} restarted; rings converged after {rejoin_converged_seconds:.2} s; \
         {rejoin_differs} keys differ from the starting ring"
    );

    // 4. Add one more node.
    let joiner = node_id(n);
    let addr = format!("127.0.0.1:{}", free_udp_ports(1)?[0]);
    let seed = cluster.node(&node_id(0))?.quic_addr.clone();
    let joined_at = Instant::now();
    cluster.start_node(&joiner, &addr, vec![seed], "").await?;
    let mut grown = all.clone();
    grown.push(joiner.clone());
    cluster.wait_converged(&grown).await?;
    let converged = joined_at.elapsed().as_secs_f64();
    let clients = clients_of(cluster).await?;
    let after_join = ownership(&clients, &keys, &grown).await?;
    close_all(clients).await;
    let join = compare(&rejoined, after_join, &joiner, converged);
    eprintln!(
        "remap: {joiner} joined; rings converged after {converged:.2} s; {} keys moved \
         ({:.1}%), hash % N would move {:.1}%",
        join.moved,
        100.0 * join.moved_fraction,
        100.0 * join.modulo_fraction
    );
    let cpu = mark.since();
    cluster.check_alive()?;
    Ok(RemapPhase {
        quiet,
        keys: keys.len(),
        start,
        kill,
        rejoin_differs,
        rejoin_converged_seconds,
        rejoined,
        join,
        cpu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(members: &[&str], owners: &[&str], positions: &[u64]) -> Ownership {
        let members: Vec<String> = members.iter().map(|m| m.to_string()).collect();
        Ownership {
            owned: members
                .iter()
                .map(|m| owners.iter().filter(|o| *o == m).count())
                .collect(),
            members,
            disagreements: 0,
            owners: owners.iter().map(|o| o.to_string()).collect(),
            positions: positions.to_vec(),
        }
    }

    #[test]
    fn modulo_rule_moves_two_thirds_from_three_to_two() {
        let three: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let two: Vec<String> = ["a", "b"].map(String::from).to_vec();
        let moved = (0..6u64)
            .filter(|&p| modulo_owner(&three, p) != modulo_owner(&two, p))
            .count();
        assert_eq!(moved, 4);
    }

    #[test]
    fn a_kill_moves_the_victims_keys() {
        let positions = [0, 1, 2, 3, 4, 5];
        let before = ring(
            &["a", "b", "c"],
            &["a", "b", "c", "c", "a", "b"],
            &positions,
        );
        let after = ring(&["a", "b"], &["a", "b", "a", "b", "a", "b"], &positions);
        let change = compare(&before, after, "c", 1.0);
        assert_eq!(change.moved, 2);
        assert_eq!(change.moved_via_changed_node, 2);
        assert!((change.minimum_fraction - 2.0 / 6.0).abs() < 1e-9);
        // positions 0..6: a,b,c,a,b,c under % 3 and a,b,a,b,a,b under % 2.
        assert_eq!(change.modulo_moved, 4);
    }
}
