//! The load: stable clients that register and deregister all along (and stay alive to
//! the end), and doomed clients that the schedule crashes.
//!
//! Every write is retried on transient errors (the SDK itself waits for a reconnect
//! within its request timeout; the load retries on top, as an application would) and
//! recorded in the [`super::Ledger`] before it is sent and when it is answered.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shoal_client::{Client, ClientConfig, ClientError, ErrorCode};
use shoal_storage::{InstanceSpec, ServiceKey};

use super::ledger::InstKey;
use super::run::Shared;
use super::schedule::DoomedKind;
use super::world::NodeState;

/// How long the load keeps retrying one write before it calls the cluster unavailable.
pub const WRITE_RETRY_LIMIT: Duration = Duration::from_secs(60);

/// One stable client.
#[derive(Clone, Debug)]
pub struct ClientPlan {
    /// The nodes (by index) in its server list.
    pub servers: Vec<usize>,
    /// Instances it registers before the faults start, and never goes below.
    pub min_held: usize,
    /// Most instances it holds.
    pub max_held: usize,
    /// Pause between two writes, ms (min, max).
    pub pause_ms: (u64, u64),
    /// Whether it keeps registering and deregistering during the run (else it just
    /// holds its first `min_held` instances).
    pub churn: bool,
}

/// The whole load.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    /// How many services the instances are spread over (`chaos-0`, `chaos-1`...).
    pub services: usize,
    /// The stable clients.
    pub clients: Vec<ClientPlan>,
    /// Whether an SDK subscriber (all servers, fails over) runs.
    pub sdk_subscriber: bool,
}

impl LoadSpec {
    /// `clients` stable clients that know every node, churning 2..=6 instances each
    /// over 6 services.
    pub fn steady(nodes: usize, clients: usize) -> LoadSpec {
        LoadSpec {
            services: 6,
            clients: (0..clients)
                .map(|_| ClientPlan {
                    servers: (0..nodes).collect(),
                    min_held: 2,
                    max_held: 6,
                    pause_ms: (200, 900),
                    churn: true,
                })
                .collect(),
            sdk_subscriber: true,
        }
    }
}

/// The service names of a load.
pub fn services(n: usize) -> Vec<ServiceKey> {
    (0..n)
        .map(|i| ServiceKey::named(format!("chaos-{i}")))
        .collect()
}

/// SDK settings for a client of nodes `servers`.
pub fn client_config(shared: &Shared, servers: &[usize], name: &str) -> ClientConfig {
    let addrs: Vec<String> = servers
        .iter()
        .map(|&i| shared.quic[i].to_string())
        .collect();
    ClientConfig::new(addrs, shared.ca_file.clone()).with_client_name(name)
}

/// Connects, retrying for up to `limit`.
async fn connect(config: ClientConfig, limit: Duration) -> Result<Client, String> {
    let started = Instant::now();
    loop {
        match Client::connect(config.clone()).await {
            Ok(c) => return Ok(c),
            Err(e) if started.elapsed() < limit => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Registers `key` for client `tag`, retrying transient errors for up to `limit`.
/// Records everything in the ledger. Returns whether it was applied.
async fn register(
    shared: &Shared,
    client: &Client,
    tag: &str,
    servers: &[usize],
    key: &InstKey,
    limit: Duration,
) -> bool {
    shared.ledger.lock().unwrap().attempt(key, tag, servers);
    let service = ServiceKey::named(key.0.clone());
    let spec = InstanceSpec::new(key.1.clone(), key.2);
    let started = Instant::now();
    let mut retried = false;
    loop {
        match client.register(&service, spec.clone()).await {
            Ok(_) => {
                let via = client.welcome().map(|w| w.node_id.0.to_string());
                let mut ledger = shared.ledger.lock().unwrap();
                ledger.acked(key, via);
                ledger.write_latencies.push(started.elapsed());
                if retried {
                    ledger.retried_writes += 1;
                }
                return true;
            }
            Err(e) if e.is_transient() && started.elapsed() < limit => {
                retried = true;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => {
                shared.ledger.lock().unwrap().failed(key);
                write_failure(shared, tag, "register", key, &e, started.elapsed());
                return false;
            }
        }
    }
}

/// Deregisters `key`, retrying transient errors for up to `limit`. Returns whether it
/// is known to be gone.
async fn deregister(
    shared: &Shared,
    client: &Client,
    tag: &str,
    key: &InstKey,
    limit: Duration,
) -> bool {
    let sent = Instant::now();
    shared.ledger.lock().unwrap().dereg_requested(key);
    let service = ServiceKey::named(key.0.clone());
    let spec = InstanceSpec::new(key.1.clone(), key.2);
    let mut retried = false;
    loop {
        match client.deregister(&service, &spec.key()).await {
            Ok(0) => {
                // The SDK's "already gone after a retry": note it like a NotFound.
                if let Some(r) = shared.ledger.lock().unwrap().regs.get_mut(key) {
                    r.dereg_not_found = true;
                }
                break;
            }
            Ok(_) => break,
            Err(ClientError::Server(body)) if body.code == ErrorCode::NotFound => {
                if !retried {
                    not_found(shared, tag, key, sent);
                }
                break;
            }
            Err(e) if e.is_transient() && sent.elapsed() < limit => {
                retried = true;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => {
                write_failure(shared, tag, "deregister", key, &e, sent.elapsed());
                return false;
            }
        }
    }
    let via = client.welcome().map(|w| w.node_id.0.to_string());
    let mut ledger = shared.ledger.lock().unwrap();
    ledger.dereg_acked(key, via);
    ledger.write_latencies.push(sent.elapsed());
    if retried {
        ledger.retried_writes += 1;
    }
    true
}

fn write_failure(
    shared: &Shared,
    tag: &str,
    what: &str,
    key: &InstKey,
    e: &ClientError,
    took: Duration,
) {
    let ms = shared.world.lock().unwrap().ms(Instant::now());
    shared.violations.lock().unwrap().add(
        "write-unavailable",
        tag,
        &format!("{what} {} {}:{}", key.0, key.1, key.2),
        ms,
        format!("gave up after {took:?}: {e}"),
    );
}

/// A first Deregister answered NotFound. In a quiet moment (every node up and
/// consistent, no partition) that means the cluster lost an acknowledged instance;
/// while a stale node may be answering, it is only counted.
fn not_found(shared: &Shared, tag: &str, key: &InstKey, sent: Instant) {
    if let Some(r) = shared.ledger.lock().unwrap().regs.get_mut(key) {
        r.dereg_not_found = true;
    }
    let (quiet, ms) = {
        let world = shared.world.lock().unwrap();
        let quiet = world.groups.is_none()
            && world
                .nodes
                .iter()
                .all(|n| n.state == NodeState::Up && n.check_from <= sent);
        (quiet, world.ms(Instant::now()))
    };
    let acked_long_ago = shared
        .ledger
        .lock()
        .unwrap()
        .regs
        .get(key)
        .and_then(|r| r.acked)
        .is_some_and(|a| a + shared.bounds.replication <= sent);
    if quiet && acked_long_ago {
        shared.violations.lock().unwrap().add(
            "lost",
            tag,
            &format!("{} {}:{}", key.0, key.1, key.2),
            ms,
            "Deregister of an acknowledged instance answered NotFound in a quiet moment".into(),
        );
    } else {
        shared.stats.lock().unwrap().stale_not_found += 1;
    }
}

/// A stable client: connects, registers its first instances, then churns until
/// `stop`; returns the client (still connected: its instances must outlive the run).
pub async fn stable_client(
    shared: Arc<Shared>,
    index: usize,
    plan: ClientPlan,
    seed: u64,
    stop: Arc<AtomicBool>,
    started: Arc<tokio::sync::Semaphore>,
) -> Option<Client> {
    let tag = format!("c{index}");
    let mut rng = StdRng::seed_from_u64(seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let config = client_config(&shared, &plan.servers, &format!("chaos-{tag}"));
    let client = match connect(config, Duration::from_secs(60)).await {
        Ok(c) => c,
        Err(e) => {
            let ms = shared.world.lock().unwrap().ms(Instant::now());
            shared.violations.lock().unwrap().add(
                "harness",
                &tag,
                "connect",
                ms,
                format!("could not connect: {e}"),
            );
            started.add_permits(1);
            return None;
        }
    };
    let mut seq: u16 = 0;
    let mut held: Vec<InstKey> = Vec::new();
    let mut fresh = |rng: &mut StdRng| {
        seq += 1;
        let service = rng.random_range(0..shared.services.len());
        (
            shared.services[service].service.clone(),
            format!("10.88.{index}.1"),
            10_000 + seq,
        )
    };
    for _ in 0..plan.min_held {
        let key = fresh(&mut rng);
        if register(
            &shared,
            &client,
            &tag,
            &plan.servers,
            &key,
            WRITE_RETRY_LIMIT,
        )
        .await
        {
            held.push(key);
        }
    }
    started.add_permits(1);
    if !plan.churn {
        return Some(client);
    }
    while !stop.load(Ordering::SeqCst) {
        let pause = rng.random_range(plan.pause_ms.0..=plan.pause_ms.1);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let grow =
            held.len() < plan.min_held || (held.len() < plan.max_held && rng.random_bool(0.55));
        if grow {
            let key = fresh(&mut rng);
            if register(
                &shared,
                &client,
                &tag,
                &plan.servers,
                &key,
                WRITE_RETRY_LIMIT,
            )
            .await
            {
                held.push(key);
            } else {
                // It may have been applied: take it back out, so the final registry
                // is known.
                deregister(&shared, &client, &tag, &key, WRITE_RETRY_LIMIT).await;
            }
        } else if held.len() > plan.min_held {
            let k = rng.random_range(0..held.len());
            let key = held.swap_remove(k);
            deregister(&shared, &client, &tag, &key, WRITE_RETRY_LIMIT).await;
        }
    }
    Some(client)
}

/// A doomed client, alive until the schedule crashes it.
pub enum Doomed {
    /// An SDK client.
    Sdk(Client),
    /// A `shoal register` process.
    Cli(KillOnDrop),
}

/// A child process killed when dropped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts doomed client `id` and registers its instances.
pub async fn spawn_doomed(
    shared: Arc<Shared>,
    id: usize,
    kind: DoomedKind,
    servers: Vec<usize>,
    instances: usize,
    seed: u64,
) -> Option<Doomed> {
    let tag = format!("d{id}");
    let mut rng = StdRng::seed_from_u64(seed ^ 0xD00D ^ ((id as u64) << 20));
    let keys: Vec<InstKey> = (0..instances.max(1))
        .map(|k| {
            let service = rng.random_range(0..shared.services.len());
            (
                shared.services[service].service.clone(),
                format!("10.99.{}.{}", id % 250, id / 250 + 1),
                20_000 + k as u16,
            )
        })
        .collect();
    match kind {
        DoomedKind::Sdk => {
            let config = client_config(&shared, &servers, &format!("chaos-{tag}"));
            let client = match connect(config, Duration::from_secs(30)).await {
                Ok(c) => c,
                Err(_) => return None,
            };
            for key in &keys {
                register(
                    &shared,
                    &client,
                    &tag,
                    &servers,
                    key,
                    Duration::from_secs(30),
                )
                .await;
            }
            Some(Doomed::Sdk(client))
        }
        DoomedKind::Cli => {
            let key = &keys[0];
            shared.ledger.lock().unwrap().attempt(key, &tag, &servers);
            let mut cmd = crate::shoal_command();
            cmd.arg("register")
                .arg(&key.0)
                .arg(format!("{}:{}", key.1, key.2))
                .arg("--json");
            for &s in &servers {
                cmd.arg("--server").arg(shared.quic[s].to_string());
            }
            cmd.arg("--ca")
                .arg(&shared.ca_file)
                .stdout(Stdio::piped())
                .stderr(Stdio::null());
            let mut child = match cmd.spawn() {
                Ok(c) => c,
                Err(e) => panic!("cannot run shoal register: {e}"),
            };
            let stdout = child.stdout.take().expect("stdout was piped");
            let mut child = KillOnDrop(child);
            let (tx, rx) = std::sync::mpsc::channel::<String>();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let _ = tx.send(line);
                }
            });
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if rx.try_iter().any(|l| l.contains("registered")) {
                    let mut ledger = shared.ledger.lock().unwrap();
                    ledger.acked(key, Some("cli".into()));
                    break;
                }
                let exited = matches!(child.0.try_wait(), Ok(Some(_)));
                if exited || Instant::now() > deadline {
                    shared.ledger.lock().unwrap().failed(key);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Some(Doomed::Cli(child))
        }
    }
}

/// Crashes a doomed client: `close_abruptly` for SDK clients, `kill -9` for CLI ones.
pub async fn crash(doomed: Doomed) {
    match doomed {
        Doomed::Sdk(client) => client.close_abruptly().await,
        Doomed::Cli(child) => drop(child),
    }
}
