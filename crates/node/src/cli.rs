//! Command-line entry points used by the `shoal` binary: `shoal server` and
//! `shoal dev`.

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::config::Config;

/// Arguments of `shoal server`. Each flag also reads a `SHOAL_*` environment
/// variable; flags win over the environment, which wins over the file.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServerArgs {
    /// Configuration file (TOML); see docs/configuration.md.
    #[arg(long, env = "SHOAL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Stable node id (default: generated once, kept in the data directory).
    #[arg(long, env = "SHOAL_NODE_ID")]
    pub node_id: Option<String>,
    /// Data directory (node id, development certificates).
    #[arg(long, env = "SHOAL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// QUIC (UDP) listen address, e.g. 0.0.0.0:7400; port 0 picks a free port.
    #[arg(long, env = "SHOAL_LISTEN_ADDR")]
    pub listen_addr: Option<std::net::SocketAddr>,
    /// HTTP listen address (health, readiness, metrics, JSON reads).
    #[arg(long, env = "SHOAL_HTTP_ADDR")]
    pub http_addr: Option<std::net::SocketAddr>,
    /// Host name or IP this node is reached at (put in its development certificate).
    #[arg(long, env = "SHOAL_ADVERTISE_HOST")]
    pub advertise_host: Option<String>,
    /// TLS certificate chain (PEM); with --tls-key and --tls-ca.
    #[arg(long, env = "SHOAL_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "SHOAL_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Cluster CA certificate (PEM).
    #[arg(long, env = "SHOAL_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Directory of the development CA (default: the data directory).
    #[arg(long, env = "SHOAL_DEV_CA_DIR")]
    pub dev_ca_dir: Option<PathBuf>,
    /// Grace period of a session after an unclean disconnect (ms).
    #[arg(long, env = "SHOAL_SESSION_GRACE_MS")]
    pub session_grace_ms: Option<u64>,
    /// Idle timeout of a client connection (ms).
    #[arg(long, env = "SHOAL_IDLE_TIMEOUT_MS")]
    pub idle_timeout_ms: Option<u64>,
    /// QUIC keep-alive interval (ms).
    #[arg(long, env = "SHOAL_KEEP_ALIVE_INTERVAL_MS")]
    pub keep_alive_interval_ms: Option<u64>,
    /// Interval of the heartbeat datagram sent to every client session (ms; 0: none).
    #[arg(long, env = "SHOAL_HEARTBEAT_INTERVAL_MS")]
    pub heartbeat_interval_ms: Option<u64>,
    /// Largest frame accepted (bytes).
    #[arg(long, env = "SHOAL_MAX_FRAME_BYTES")]
    pub max_frame_bytes: Option<usize>,
    /// Addresses of other nodes to join through (comma-separated or repeated).
    #[arg(long, env = "SHOAL_SEEDS", value_delimiter = ',')]
    pub seed: Vec<String>,
    /// How long a forwarded write waits for its owner (ms).
    #[arg(long, env = "SHOAL_FORWARD_TIMEOUT_MS")]
    pub forward_timeout_ms: Option<u64>,
    /// Namespaces besides `public` (comma-separated or repeated).
    #[arg(long, env = "SHOAL_NAMESPACES", value_delimiter = ',')]
    pub namespace: Vec<String>,
    /// Threads that run the node's tasks (0: one per CPU).
    #[arg(long, env = "SHOAL_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Longest spin of a busy worker before it parks (µs; 0: never).
    #[arg(long, env = "SHOAL_IDLE_SPIN_US")]
    pub idle_spin_us: Option<u64>,
}

impl ServerArgs {
    /// The configuration: defaults, then the file, then environment and flags.
    pub fn to_config(&self) -> Result<Config> {
        let mut c = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        macro_rules! set {
            ($($field:ident),*) => {$(
                if let Some(v) = &self.$field { c.$field = v.clone().into(); }
            )*};
        }
        set!(node_id, advertise_host);
        if let Some(v) = &self.data_dir {
            c.data_dir = v.clone();
        }
        if let Some(v) = self.listen_addr {
            c.listen_addr = v;
        }
        if let Some(v) = self.http_addr {
            c.http_addr = v;
        }
        if let Some(v) = &self.tls_cert {
            c.tls.cert = Some(v.clone());
        }
        if let Some(v) = &self.tls_key {
            c.tls.key = Some(v.clone());
        }
        if let Some(v) = &self.tls_ca {
            c.tls.ca = Some(v.clone());
        }
        if let Some(v) = &self.dev_ca_dir {
            c.tls.dev_ca_dir = Some(v.clone());
        }
        macro_rules! set_copy {
            ($($field:ident),*) => {$(
                if let Some(v) = self.$field { c.$field = v; }
            )*};
        }
        set_copy!(
            session_grace_ms,
            idle_timeout_ms,
            keep_alive_interval_ms,
            heartbeat_interval_ms,
            max_frame_bytes,
            forward_timeout_ms,
            worker_threads,
            idle_spin_us
        );
        if !self.seed.is_empty() {
            c.seeds = self.seed.clone();
        }
        if !self.namespace.is_empty() {
            c.namespaces = self.namespace.clone();
        }
        c.validate()?;
        Ok(c)
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs `shoal server` until SIGTERM or Ctrl-C.
pub fn run_server(args: ServerArgs) -> Result<()> {
    init_tracing();
    let config = args.to_config()?;
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.worker_threads > 0 {
        builder.worker_threads(config.worker_threads);
    }
    crate::idle_spin::install(
        &mut builder,
        std::time::Duration::from_micros(config.idle_spin_us),
    );
    let rt = builder
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(crate::server::run(config))
}

/// Worker threads for each of `nodes` nodes that share this machine: its CPUs divided
/// among them, at least one each.
pub fn shared_worker_threads(nodes: usize) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cpus / nodes.max(1)).max(1)
}

/// Arguments of `shoal dev`.
#[derive(clap::Args, Debug, Clone)]
pub struct DevArgs {
    /// Number of nodes to start.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Directory for the development CA and the nodes' data.
    #[arg(long, default_value = ".shoal")]
    pub dir: PathBuf,
    /// QUIC port of the first node; node i listens on base + 10*i (QUIC) and
    /// base + 10*i + 1 (HTTP).
    #[arg(long, default_value_t = 7400)]
    pub base_port: u16,
}

/// Runs `shoal dev`: starts N local nodes as processes sharing one development CA,
/// prints how to use them, and stops them all on Ctrl-C.
pub fn run_dev(args: DevArgs) -> Result<()> {
    anyhow::ensure!(
        args.nodes >= 1 && args.nodes <= 20,
        "--nodes must be 1..=20"
    );
    std::fs::create_dir_all(&args.dir)?;
    let dir = args.dir.canonicalize()?;
    let ca = crate::tls::ensure_dev_ca(&dir)?;
    let exe = std::env::current_exe().context("finding the shoal binary")?;
    let rt = tokio::runtime::Runtime::new()?;
    // Handlers first: Ctrl-C, SIGTERM or SIGHUP from now on stop the nodes started so
    // far instead of killing this process and leaving them running.
    let stop = {
        let _in_runtime = rt.enter();
        crate::server::stop_signal(true)
    };
    // Stops every node started so far however this function ends: a node that fails
    // to start must not leave the others running on their ports.
    let mut children = DevNodes(Vec::new());
    let mut servers = Vec::new();
    let all: Vec<String> = (0..args.nodes)
        .map(|i| format!("127.0.0.1:{}", args.base_port as usize + 10 * i))
        .collect();
    // The nodes share this machine: each gets its share of the CPUs.
    let workers = shared_worker_threads(args.nodes);
    for i in 0..args.nodes {
        let port = args.base_port as usize + 10 * i;
        anyhow::ensure!(port < u16::MAX as usize, "--base-port too high");
        let quic = format!("127.0.0.1:{port}");
        let http = format!("127.0.0.1:{}", port + 1);
        let node_dir = dir.join(format!("node-{}", i + 1));
        std::fs::create_dir_all(&node_dir)?;
        let log = std::fs::File::create(node_dir.join("node.log"))?;
        let child = std::process::Command::new(&exe)
            .arg("server")
            .args(["--node-id", &format!("node-{}", i + 1)])
            .arg("--data-dir")
            .arg(&node_dir)
            .arg("--dev-ca-dir")
            .arg(&dir)
            .args(["--listen-addr", &quic, "--http-addr", &http])
            .args(["--worker-threads", &workers.to_string()])
            .args(
                all.iter()
                    .filter(|a| **a != quic)
                    .flat_map(|a| ["--seed".to_string(), a.clone()]),
            )
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting a node")?;
        children.0.push(child);
        servers.push((quic, http, node_dir));
    }
    let mut stop = Box::pin(stop);
    let ready = rt.block_on(async {
        tokio::select! {
            ready = all_ready(&mut children, &servers) => ready.map(|()| true),
            _ = &mut stop => Ok(false),
        }
    })?;
    if !ready {
        println!("stopping...");
        return Ok(());
    }
    let list: Vec<String> = servers.iter().map(|s| s.0.clone()).collect();
    println!("Shoal dev cluster: {} node(s) running.\n", args.nodes);
    for (i, (quic, http, node_dir)) in servers.iter().enumerate() {
        println!(
            "  node-{}  quic={quic}  http=http://{http}  log={}",
            i + 1,
            node_dir.join("node.log").display()
        );
    }
    println!("\nUse it from another terminal:\n");
    println!("  export SHOAL_SERVERS={}", list.join(","));
    println!("  export SHOAL_CA={}", ca.display());
    println!("  shoal register orders 10.0.0.1:8080 --meta version=1   # holds until Ctrl-C");
    println!(
        "  shoal list orders --server {}   # any node answers",
        list.last().cloned().unwrap_or_default()
    );
    println!("  shoal members");
    println!("  shoal ring orders");
    println!("  shoal services");
    println!("  shoal watch orders");
    println!("  curl http://{}/metrics", servers[0].1);
    println!("\n(`shoal` is target/release/shoal.) Ctrl-C stops the cluster.");
    rt.block_on(async {
        let mut reported = vec![false; children.0.len()];
        let mut check = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = check.tick() => {
                    // A node that dies (a crash, or someone killed it) is said once;
                    // the others keep running.
                    for (i, child) in children.0.iter_mut().enumerate() {
                        if let (false, Ok(Some(status))) = (reported[i], child.try_wait()) {
                            reported[i] = true;
                            eprintln!(
                                "node-{} exited ({status}); see {}",
                                i + 1,
                                servers[i].2.join("node.log").display()
                            );
                        }
                    }
                }
            }
        }
    });
    println!("stopping...");
    drop(children);
    Ok(())
}

/// Waits until every node answers /readyz; fails if one exits first or is not ready
/// within 30 s.
async fn all_ready(children: &mut DevNodes, servers: &[(String, String, PathBuf)]) -> Result<()> {
    for (i, (_, http, node_dir)) in servers.iter().enumerate() {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if http_ok(http, "/readyz").await {
                break;
            }
            if let Ok(Some(status)) = children.0[i].try_wait() {
                anyhow::bail!(
                    "node-{} exited ({status}); see {}",
                    i + 1,
                    node_dir.join("node.log").display()
                );
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "node-{} did not become ready in 30 s",
                i + 1
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// The node processes of `shoal dev`. Dropping it stops them: SIGTERM first, which
/// lets each node close its sessions cleanly, then waits for every one.
struct DevNodes(Vec<std::process::Child>);

impl Drop for DevNodes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            if let Ok(None) = child.try_wait() {
                sigterm(child);
            }
        }
        for child in &mut self.0 {
            let _ = child.wait();
        }
    }
}

/// Whether `GET path` on `addr` answers 200 within 2 s (something else listening on
/// the port, that never answers, must not hold `shoal dev` up).
async fn http_ok(addr: &str, path: &str) -> bool {
    tokio::time::timeout(std::time::Duration::from_secs(2), http_ok_now(addr, path))
        .await
        .unwrap_or(false)
}

async fn http_ok_now(addr: &str, path: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    buf.starts_with(b"HTTP/1.1 200")
}

fn sigterm(child: &mut std::process::Child) {
    // `kill` from the shell avoids an FFI dependency for one signal; where it cannot
    // run, the node is killed outright.
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    if !sent {
        let _ = child.kill();
    }
}
