//! The visibility phase of `shoal-bench cluster`: how long a write takes to reach the
//! subscribers on every node.
//!
//! - One SDK client per node (homed there) subscribes to `--visibility-services` fresh
//!   services (M) before the first write; their views start empty.
//! - A writer homed on node-1 makes `rate x --visibility-seconds` writes on a fixed
//!   schedule (write `n` is due at `n / rate` s), at most `--visibility-in-flight` at
//!   once; with `--visibility-writers W`, W sessions on node-1 share the writes
//!   (write `n` goes to session `n mod W`). Write `n` registers, in service `n mod M`, the instance of slot
//!   `(n / M) mod --visibility-slots` (a fixed address per slot, so a slot's later
//!   write replaces its earlier one) with metadata `seq = n` and `t` = the moment of
//!   the call in microseconds on this process's monotonic clock.
//! - Each subscriber, on every new view, records for each instance whose `seq` it has
//!   not seen yet `now - t`: the latency from the write's call to its push being in
//!   that node's subscriber. Writer and subscribers are one process, so one clock.
//! - A write's visible-on-every-node latency is the largest of its per-node latencies;
//!   writes not seen on every node are counted, not measured. A write can go unseen
//!   on a node only if the same slot was written again before that node pushed it
//!   (M x slots writes later), or if a push was lost.
//! - After the last acknowledgement the phase waits until every write is seen
//!   everywhere or nothing new arrives for 2 s. Then the writer says Goodbye and the
//!   phase waits until every node is back to its former instance count.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use shoal_client::{InstanceSpec, ServiceKey, Subscription};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::cluster::{all_seconds, instance_count, time_until_count, Cluster, NodeSeconds};
use crate::cpu::{CpuMark, PhaseCpu, QuietWait};
use crate::progress::Progress;
use crate::single_node::{connect_all, NAMESPACE};
use crate::stats::{Latency, Samples};
use crate::ClusterArgs;

/// Group of the visibility phases' services.
const GROUP: &str = "shoal-bench-vis";
/// Address of every instance of the phase; the slot is in the port.
const IP: &str = "10.250.0.1";
/// Port of slot 0.
const BASE_PORT: u16 = 20_000;
/// The drain ends when no new write was seen for this long.
const DRAIN_IDLE: Duration = Duration::from_secs(2);
/// The longest drain.
const DRAIN_MAX: Duration = Duration::from_secs(30);
/// How long the writer's instances may take to disappear after its Goodbye.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Figures of one visibility phase.
#[derive(Debug, Serialize)]
pub struct VisibilityPhase {
    /// The wait for a quiet machine before it.
    pub quiet: QuietWait,
    /// The writes per second asked for.
    pub target_rate: u64,
    /// Planned length of the writing, in seconds.
    pub planned_seconds: u64,
    /// Services written round-robin, and instance slots per service.
    pub services: usize,
    pub slots: usize,
    /// The node the writers are homed on, and how many sessions wrote.
    pub writer_node: String,
    pub writers: usize,
    /// Writes made, and how many failed.
    pub writes: u64,
    pub write_errors: u64,
    pub first_error: Option<String>,
    /// From the first write's call to the last write's call.
    pub send_seconds: f64,
    /// Writes / send_seconds: the rate actually offered.
    pub sent_per_second: f64,
    /// The latest a write's call came after its scheduled time: how far the writer fell
    /// behind its schedule (waiting for an in-flight slot, or for CPU).
    pub max_behind_schedule_ms: f64,
    /// From a write's call to its acknowledgement.
    pub ack_latency: Latency,
    /// Per node: from a write's call to its push in that node's subscriber.
    pub per_node: Vec<NodeVisibility>,
    /// From a write's call until its push was in the subscribers of every node (the
    /// largest of the per-node latencies), over the writes seen on every node.
    pub all_nodes: Latency,
    /// Successful writes not seen on every node.
    pub not_seen_everywhere: u64,
    /// The slowest writes and their latency on each node.
    pub slowest: Vec<SlowWrite>,
    /// From the last acknowledgement until every write was seen (or the drain gave
    /// up).
    pub drain_seconds: f64,
    /// CPU and memory from the first write to the end of the drain.
    pub cpu: PhaseCpu,
    /// After the writer's Goodbye: until each node no longer counts its instances.
    pub cleanup: Vec<NodeSeconds>,
}

/// Visibility on one node.
#[derive(Debug, Serialize)]
pub struct NodeVisibility {
    /// The node's id.
    pub node: String,
    /// Successful writes its subscriber never saw.
    pub not_seen: u64,
    /// Latency of the writes it saw (`count` = how many).
    pub latency: Latency,
}

/// How many of the slowest writes the result lists.
const SLOWEST: usize = 5;

/// One of the slowest writes, for a look at outliers.
#[derive(Debug, Serialize)]
pub struct SlowWrite {
    /// The write's number.
    pub seq: u64,
    /// Its service's index (`...-svc-NNNN`).
    pub service: usize,
    /// Its latency per node, in node order (`None`: not seen there).
    pub per_node_ms: Vec<Option<f64>>,
}

/// The `k` writes with the largest visible-on-every-node latency (unseen counting as
/// the slowest), slowest first.
fn slowest_writes(arrivals: &[Arrivals], services: usize, k: usize) -> Vec<SlowWrite> {
    let total = arrivals.first().map_or(0, |a| a.len());
    let mut worst: Vec<(u64, usize)> = (0..total)
        .map(|seq| {
            let w = arrivals
                .iter()
                .map(|cells| match cells[seq].load(Ordering::Relaxed) {
                    0 => u64::MAX,
                    v => v - 1,
                })
                .max()
                .unwrap_or(0);
            (w, seq)
        })
        .collect();
    worst.sort_unstable_by(|a, b| b.cmp(a));
    worst
        .into_iter()
        .take(k)
        .map(|(_, seq)| SlowWrite {
            seq: seq as u64,
            service: seq % services,
            per_node_ms: arrivals
                .iter()
                .map(|cells| match cells[seq].load(Ordering::Relaxed) {
                    0 => None,
                    v => Some((v - 1) as f64 / 1000.0),
                })
                .collect(),
        })
        .collect()
}

/// Per node, per write: 0 while unseen, else the latency in microseconds plus 1.
type Arrivals = Arc<Vec<AtomicU64>>;

/// Microseconds since `epoch`.
fn micros_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// The instance of write `n`.
fn write_spec(n: u64, services: usize, slots: usize, epoch: Instant) -> InstanceSpec {
    let slot = (n / services as u64) % slots as u64;
    let mut spec = InstanceSpec::new(IP, BASE_PORT + u16::try_from(slot).unwrap_or(0));
    spec.metadata.insert("seq".into(), n.to_string());
    spec.metadata
        .insert("t".into(), micros_since(epoch).to_string());
    spec
}

/// Records every write a subscription shows for the first time.
async fn watch(
    mut sub: Subscription,
    arrivals: Arrivals,
    seen: Arc<AtomicU64>,
    epoch: Instant,
    slots: usize,
) {
    let mut last: Vec<Option<u64>> = vec![None; slots];
    while let Some(view) = sub.next().await {
        let now = micros_since(epoch);
        for instance in &view.instances {
            let field = |k: &str| instance.metadata.get(k).and_then(|v| v.parse::<u64>().ok());
            let (Some(seq), Some(t)) = (field("seq"), field("t")) else {
                continue;
            };
            let Some(slot) = instance
                .port
                .checked_sub(BASE_PORT)
                .map(usize::from)
                .filter(|s| *s < slots)
            else {
                continue;
            };
            if last[slot].is_some_and(|l| l >= seq) {
                continue;
            }
            last[slot] = Some(seq);
            if let Some(cell) = arrivals.get(seq as usize) {
                if cell.swap(now.saturating_sub(t) + 1, Ordering::Relaxed) == 0 {
                    seen.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

pub async fn run(
    args: &ClusterArgs,
    cluster: &mut Cluster,
    index: usize,
    rate: u64,
    quiet: QuietWait,
) -> Result<VisibilityPhase> {
    let m = args.visibility_services;
    let slots = args.visibility_slots;
    let total = rate
        .checked_mul(args.visibility_seconds)
        .ok_or_else(|| anyhow!("--visibility-rate x --visibility-seconds is too large"))?;
    let services: Arc<Vec<ServiceKey>> = Arc::new(
        (0..m)
            .map(|j| ServiceKey::new(NAMESPACE, GROUP, format!("p{index}-r{rate}-svc-{j:04}")))
            .collect(),
    );
    let nodes: Vec<(String, String)> = cluster
        .live()
        .map(|n| (n.id.clone(), n.http_addr.clone()))
        .collect();
    let writer_node = cluster
        .live()
        .next()
        .ok_or_else(|| anyhow!("no node runs"))?;
    let writer_id = writer_node.id.clone();
    let writers = connect_all(&cluster.client_config(writer_node), args.visibility_writers)
        .await
        .context("connecting the writers")?;
    let mut baseline = Vec::new();
    for (_, http) in &nodes {
        baseline.push(instance_count(http).await?);
    }
    eprintln!(
        "visibility: {total} writes at {rate}/s from {} writer(s) on {writer_id} over {m} \
         services x {slots} slots; one subscriber per node",
        writers.len()
    );

    // Subscribers: one client per node, subscribed to every service before any write.
    let epoch = Instant::now();
    let mut subscribers = Vec::new();
    let mut watchers = JoinSet::new();
    let mut arrivals: Vec<Arrivals> = Vec::new();
    let mut seen: Vec<Arc<AtomicU64>> = Vec::new();
    for node in cluster.live() {
        let client = crate::target::connect_shoal(cluster.client_config(node))
            .await
            .with_context(|| format!("connecting the subscriber on {}", node.id))?;
        let cells: Arrivals = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
        let count = Arc::new(AtomicU64::new(0));
        let mut subscribing = JoinSet::new();
        for service in services.iter() {
            let (client, service) = (client.clone(), service.clone());
            subscribing.spawn(async move { client.subscribe(&service).await });
        }
        while let Some(joined) = subscribing.join_next().await {
            let sub = joined?.with_context(|| format!("subscribing on {}", node.id))?;
            if !sub.current().instances.is_empty() {
                bail!("service {} is not fresh", sub.key().service);
            }
            watchers.spawn(watch(sub, cells.clone(), count.clone(), epoch, slots));
        }
        subscribers.push(client);
        arrivals.push(cells);
        seen.push(count);
    }

    // The writer, on schedule.
    let done = Arc::new(AtomicU64::new(0));
    let progress = Progress::start("visibility", done.clone(), Some(total));
    let mark = CpuMark::now(&cluster.pids());
    let permits = Arc::new(Semaphore::new(args.visibility_in_flight));
    let mut writes = JoinSet::new();
    let start = Instant::now();
    let mut max_behind = Duration::ZERO;
    let mut last_call = start;
    let mut n = 0u64;
    while n < total {
        let due = start + Duration::from_secs_f64(n as f64 / rate as f64);
        tokio::time::sleep_until(due.into()).await;
        let elapsed = start.elapsed().as_secs_f64();
        let due_now = ((elapsed * rate as f64) as u64 + 1).min(total);
        while n < due_now {
            let permit = permits.clone().acquire_owned().await?;
            let scheduled = start + Duration::from_secs_f64(n as f64 / rate as f64);
            last_call = Instant::now();
            max_behind = max_behind.max(last_call.saturating_duration_since(scheduled));
            let client = writers[(n % writers.len() as u64) as usize].clone();
            let (services, done) = (services.clone(), done.clone());
            writes.spawn(async move {
                let service = &services[(n % services.len() as u64) as usize];
                let spec = write_spec(n, services.len(), slots, epoch);
                let called = Instant::now();
                let result = client.register(service, spec).await;
                drop(permit);
                done.fetch_add(1, Ordering::Relaxed);
                result
                    .map(|_| called.elapsed())
                    .map_err(|e| format!("register {}: {e}", service.service))
            });
            n += 1;
        }
    }
    let send_seconds = last_call.duration_since(start).as_secs_f64();
    let mut acks = Samples::with_capacity(total as usize);
    let mut write_errors = 0;
    let mut first_error = None;
    while let Some(joined) = writes.join_next().await {
        match joined? {
            Ok(latency) => acks.record(latency),
            Err(e) => {
                write_errors += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    drop(progress);
    let acked = acks.len() as u64;
    eprintln!(
        "visibility: {acked} writes acknowledged ({write_errors} failed) in {:.2} s; \
         waiting for the last pushes",
        start.elapsed().as_secs_f64()
    );

    // Drain: until every node saw every write, or nothing new for DRAIN_IDLE.
    let drain_start = Instant::now();
    let mut last_total = 0;
    let mut last_change = Instant::now();
    loop {
        let counts: Vec<u64> = seen.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        if counts.iter().all(|&c| c >= acked) {
            break;
        }
        let sum: u64 = counts.iter().sum();
        if sum != last_total {
            last_total = sum;
            last_change = Instant::now();
        }
        if last_change.elapsed() >= DRAIN_IDLE || drain_start.elapsed() >= DRAIN_MAX {
            eprintln!("visibility: drain ended with {counts:?} of {acked} writes seen per node");
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drain_seconds = drain_start.elapsed().as_secs_f64();
    let cpu = mark.since();
    cluster.check_alive()?;
    watchers.abort_all();

    // Figures.
    let mut per_node = Vec::new();
    for ((id, _), cells) in nodes.iter().zip(&arrivals) {
        let mut samples = Samples::with_capacity(total as usize);
        for cell in cells.iter() {
            let v = cell.load(Ordering::Relaxed);
            if v > 0 {
                samples.record(Duration::from_micros(v - 1));
            }
        }
        per_node.push(NodeVisibility {
            node: id.clone(),
            not_seen: acked.saturating_sub(samples.len() as u64),
            latency: samples.summarize(),
        });
    }
    let mut everywhere = Samples::with_capacity(total as usize);
    for seq in 0..total as usize {
        let worst = arrivals
            .iter()
            .map(|cells| cells[seq].load(Ordering::Relaxed))
            .try_fold(0u64, |acc, v| (v > 0).then_some(acc.max(v - 1)));
        if let Some(us) = worst {
            everywhere.record(Duration::from_micros(us));
        }
    }
    let not_seen_everywhere = acked.saturating_sub(everywhere.len() as u64);
    let slowest = slowest_writes(&arrivals, m, SLOWEST);

    // Clean up: subscribers and writer leave; wait until the writer's instances are gone.
    for client in subscribers {
        if let Err(e) = client.close().await {
            eprintln!("warning: closing a subscriber: {e}");
        }
    }
    let cleanup_start = Instant::now();
    let writer_count = writers.len();
    for writer in writers {
        if let Err(e) = writer.close().await {
            eprintln!("warning: closing a writer: {e}");
        }
    }
    let mut cleanup = Vec::new();
    for ((id, http), base) in nodes.iter().zip(&baseline) {
        let mut got = time_until_count(
            vec![(id.clone(), http.clone())],
            *base,
            cleanup_start,
            cleanup_start + CLEANUP_TIMEOUT,
        )
        .await;
        cleanup.append(&mut got);
    }
    if all_seconds(&cleanup).is_none() {
        eprintln!("warning: the writer's instances did not all disappear: {cleanup:?}");
    }

    let writes_made = acked + write_errors;
    Ok(VisibilityPhase {
        quiet,
        target_rate: rate,
        planned_seconds: args.visibility_seconds,
        services: m,
        slots,
        writer_node: writer_id,
        writers: writer_count,
        writes: writes_made,
        write_errors,
        first_error,
        send_seconds,
        sent_per_second: if send_seconds > 0.0 {
            // Calls 0..n-1 span n-1 intervals.
            (writes_made.saturating_sub(1)) as f64 / send_seconds
        } else {
            0.0
        },
        max_behind_schedule_ms: max_behind.as_secs_f64() * 1000.0,
        ack_latency: acks.summarize(),
        per_node,
        all_nodes: everywhere.summarize(),
        not_seen_everywhere,
        slowest,
        drain_seconds,
        cpu,
        cleanup,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_rotate_over_services_then_slots() {
        let epoch = Instant::now();
        let a = write_spec(0, 200, 16, epoch);
        let b = write_spec(199, 200, 16, epoch);
        let c = write_spec(200, 200, 16, epoch);
        let d = write_spec(200 * 16, 200, 16, epoch);
        assert_eq!(
            (a.port, b.port, c.port, d.port),
            (20_000, 20_000, 20_001, 20_000)
        );
        assert_eq!(c.metadata["seq"], "200");
        assert!(c.metadata["t"].parse::<u64>().is_ok());
    }
}
