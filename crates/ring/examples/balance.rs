//! Prints the balance table of `docs/ring.md`: how evenly rings of N members with V vnodes
//! each spread 100,000 service keys, how long they take to build, and how many keys move
//! on a membership change compared with `hash % N`.
//!
//! Run: `cargo run -p shoal-ring --release --example balance`

use std::collections::HashMap;
use std::time::Instant;

use shoal_ring::{position, Member, Ring};

const KEYS: usize = 100_000;
/// Each (N, V) cell is averaged over this many clusters with different node ids, so the
/// table shows what to expect rather than the luck of one set of names.
const CLUSTERS: usize = 20;

/// `ServiceKey::placement_bytes` of `("public", "DEFAULT_GROUP", service)`.
fn placement_bytes(service: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for part in ["public", "DEFAULT_GROUP", service] {
        out.extend_from_slice(&(part.len() as u32).to_le_bytes());
        out.extend_from_slice(part.as_bytes());
    }
    out
}

fn ids(cluster: usize, n: usize) -> Vec<Member> {
    (0..n)
        .map(|i| Member::new(format!("shoal-{cluster}-node-{i}")))
        .collect()
}

fn median_build_micros(vnodes: u32, members: &[Member]) -> f64 {
    let mut times: Vec<f64> = (0..15)
        .map(|_| {
            let t = Instant::now();
            let ring = Ring::from_members(vnodes, members.iter().cloned()).unwrap();
            let e = t.elapsed().as_secs_f64() * 1e6;
            std::hint::black_box(ring);
            e
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    let keys: Vec<Vec<u8>> = (0..KEYS)
        .map(|k| placement_bytes(&format!("svc-{k}")))
        .collect();

    println!("Balance over {KEYS} keys, mean of {CLUSTERS} clusters per row (worst in brackets).");
    println!("max/mean: keys of the busiest member over the mean; sd: std dev of the members'");
    println!("key shares as % of the mean share; exact: max/mean of the exact arc shares.\n");
    println!("| N | vnodes/member | max/mean keys | sd of share | max/mean exact | build (µs) |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for n in [3usize, 5, 10, 20] {
        for v in [16u32, 32, 64, 128, 256, 512] {
            let (mut sum_max, mut worst_max, mut sum_sd, mut sum_exact, mut worst_exact) =
                (0.0, 0.0f64, 0.0, 0.0, 0.0f64);
            for c in 0..CLUSTERS {
                let ring = Ring::from_members(v, ids(c, n)).unwrap();
                let mut counts = vec![0usize; n];
                let member_index: HashMap<&str, usize> = ring
                    .members()
                    .iter()
                    .enumerate()
                    .map(|(i, m)| (m.id.as_str(), i))
                    .collect();
                for k in &keys {
                    counts[member_index[ring.owner(k).unwrap()]] += 1;
                }
                let mean = KEYS as f64 / n as f64;
                let max = *counts.iter().max().unwrap() as f64 / mean;
                let var = counts
                    .iter()
                    .map(|&c| (c as f64 - mean).powi(2))
                    .sum::<f64>()
                    / n as f64;
                let exact_max = ring
                    .ownership_shares()
                    .values()
                    .fold(0.0f64, |a, &s| a.max(s))
                    * n as f64;
                sum_max += max;
                worst_max = worst_max.max(max);
                sum_sd += var.sqrt() / mean * 100.0;
                sum_exact += exact_max;
                worst_exact = worst_exact.max(exact_max);
            }
            let build = median_build_micros(v, &ids(0, n));
            let c = CLUSTERS as f64;
            println!(
                "| {n} | {v} | {:.3} ({:.3}) | {:.1}% | {:.3} ({:.3}) | {build:.0} |",
                sum_max / c,
                worst_max,
                sum_sd / c,
                sum_exact / c,
                worst_exact,
            );
        }
    }

    println!("\nBuild time of a 100-member ring (median of 15 builds):\n");
    println!("| vnodes/member | vnodes | build (µs) |");
    println!("|---:|---:|---:|");
    for v in [64u32, 128, 256, 512] {
        let members = ids(0, 100);
        let ring = Ring::from_members(v, members.iter().cloned()).unwrap();
        println!(
            "| {v} | {} | {:.0} |",
            ring.vnode_count(),
            median_build_micros(v, &members)
        );
    }

    println!("\nKeys moved by a membership change, mean of {CLUSTERS} clusters (min..max):\n");
    println!("| change | vnodes/member | ring moves | ideal | `hash % N` moves |");
    println!("|---|---:|---:|---:|---:|");
    for v in [64u32, 128, 256] {
        let (mut rem, mut add) = (Vec::new(), Vec::new());
        for c in 0..CLUSTERS {
            let five = Ring::from_members(v, ids(c, 5)).unwrap();
            let mut four = five.clone();
            four.remove(&five.members()[2].id).unwrap();
            let mut six = five.clone();
            six.add(Member::new(format!("shoal-{c}-node-5"))).unwrap();
            rem.push(Ring::moved(&five, &four, &keys) as f64 / KEYS as f64);
            add.push(Ring::moved(&five, &six, &keys) as f64 / KEYS as f64);
        }
        let stats = |xs: &[f64]| {
            let mean = xs.iter().sum::<f64>() / xs.len() as f64;
            let min = xs.iter().copied().fold(f64::MAX, f64::min);
            let max = xs.iter().copied().fold(0.0, f64::max);
            format!(
                "{:.1}% ({:.1}..{:.1})",
                mean * 100.0,
                min * 100.0,
                max * 100.0
            )
        };
        println!(
            "| remove 1 of 5 | {v} | {} | 20.0% | {:.1}% |",
            stats(&rem),
            modulo_moved(5, Some(2), &keys) * 100.0
        );
        println!(
            "| add a 6th to 5 | {v} | {} | 16.7% | {:.1}% |",
            stats(&add),
            modulo_moved(5, None, &keys) * 100.0
        );
    }
}

/// The share of keys that change owner under Distro's `members[hash % members.len()]`
/// when member `removed` leaves a list of `n` (or, with `None`, a member joins at the end).
fn modulo_moved(n: usize, removed: Option<usize>, keys: &[Vec<u8>]) -> f64 {
    let before: Vec<usize> = (0..n).collect();
    let after: Vec<usize> = match removed {
        Some(r) => before.iter().copied().filter(|&m| m != r).collect(),
        None => (0..=n).collect(),
    };
    let moved = keys
        .iter()
        .filter(|k| {
            let h = position(k) as usize;
            before[h % before.len()] != after[h % after.len()]
        })
        .count();
    moved as f64 / keys.len() as f64
}
