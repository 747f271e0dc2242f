//! Node configuration: every default timing and limit in one place.
//!
//! Sources, lowest to highest precedence: built-in defaults, the TOML file
//! (`--config`), `SHOAL_*` environment variables, command-line flags. Every option is
//! documented with its default and unit in docs/configuration.md.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// The configuration of one node.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Stable id of this node. Default: generated once and kept in `data_dir/node_id`.
    pub node_id: Option<String>,
    /// Where the node keeps its id and its development certificates.
    pub data_dir: PathBuf,
    /// UDP address of the QUIC endpoint (clients and, later, peers).
    pub listen_addr: SocketAddr,
    /// Host name or address other nodes and clients reach this node by; also put in
    /// the development certificate. Default: the listen address's IP.
    pub advertise_host: Option<String>,
    /// TCP address of the HTTP side (health, readiness, metrics, JSON reads).
    pub http_addr: SocketAddr,
    /// TLS files; all unset means development certificates.
    pub tls: TlsConfig,
    /// How long a session's instances outlive an unclean disconnect, waiting for the
    /// client to resume (ms).
    pub session_grace_ms: u64,
    /// A client connection with no traffic (not even keep-alives) for this long is
    /// considered lost (ms).
    pub idle_timeout_ms: u64,
    /// QUIC keep-alive interval the node sends on client connections (ms): a
    /// fallback for clients that do not take heartbeats, since every packet a client
    /// sends (a heartbeat's acknowledgement too) restarts it.
    pub keep_alive_interval_ms: u64,
    /// Interval of the heartbeat datagram the node sends every client session, in ten
    /// bursts spread over the interval (ms; 0: none). It keeps sessions alive in both
    /// directions, and because a burst's heartbeats are sent together their
    /// acknowledgements come back together, which costs
    /// the node far fewer wake-ups than each client's own keep-alive timer.
    pub heartbeat_interval_ms: u64,
    /// Largest frame accepted or sent (bytes).
    pub max_frame_bytes: usize,
    /// Receive and send buffer the node asks the kernel for on its one UDP socket,
    /// which every client and peer connection shares (bytes; 0: the system default).
    /// The kernel caps it at `net.core.rmem_max` / `wmem_max`; the node logs a warning
    /// when it got less.
    pub udp_buffer_bytes: usize,
    /// Threads that run the node's tasks (0: one per CPU the process may use). Nodes
    /// that share a machine do better with its CPUs divided among them: three nodes
    /// of two threads each on two CPUs used 30 % more CPU per registration than of
    /// one thread each, much of it waking and switching threads (docs/benchmarks.md,
    /// twenty-fourth series).
    pub worker_threads: usize,
    /// Longest a worker thread that parks often and briefly (a busy node) yields its
    /// CPU before it parks, so that the next packet finds it awake instead of waking a
    /// halted CPU (µs; 0: never). Adapted park by park, so an idle node does not spin
    /// (`idle_spin` module; docs/benchmarks.md, twenty-eighth series).
    pub idle_spin_us: u64,
    /// Frames queued towards one client before the node gives up on it as too slow
    /// and closes its connection (the client then resumes and re-subscribes).
    pub outbound_queue_frames: usize,
    /// Bytes of encoded query answers each node keeps, by service revision, to answer
    /// repeated queries without reading and encoding the instances again (0: none).
    pub query_cache_bytes: usize,
    /// How long a SIGTERM shutdown waits for connections to close (ms).
    pub shutdown_timeout_ms: u64,
    /// Namespaces that exist besides `public`. Requests naming any other namespace
    /// get `UnknownNamespace`.
    pub namespaces: Vec<String>,
    /// Validation limits.
    pub limits: LimitsConfig,
    /// Addresses (`host:port`, DNS names allowed) of other nodes to join through.
    /// Empty: a cluster of one, ready at once.
    pub seeds: Vec<String>,
    /// How long a write forwarded to its owner waits for the answer before it is
    /// routed again (ms).
    pub forward_timeout_ms: u64,
    /// Messages queued towards one peer before further ones are dropped
    /// (anti-entropy repairs what a drop loses; a dropped forward is routed again).
    /// Each forwarded client write is one message: 4 096 overflowed at 5 000 sessions
    /// with 4 writes in flight each (13 000 forwards), so the default is 65 536. A peer
    /// that stops reading is marked Down within `down_after_ms`, after which nothing more
    /// is queued for it.
    pub peer_queue_messages: usize,
    /// Largest frame sent to or accepted from a peer (bytes). Peers are authenticated
    /// (mutual TLS) and their snapshot chunks and repairs carry many services, so this
    /// is larger than `max_frame_bytes`, which bounds what clients may send.
    pub peer_max_frame_bytes: usize,
    /// Replication timings and limits (the `[replication]` table); see
    /// docs/replication.md.
    pub replication: shoal_replication::Config,
}

impl Config {
    /// The engine's settings from this configuration.
    pub fn engine_config(&self) -> shoal_replication::Config {
        shoal_replication::Config {
            session_grace_ms: self.session_grace_ms,
            forward_ttl_ms: self.forward_timeout_ms,
            // A node without seeds is a cluster of one: nothing to wait for.
            bootstrap_wait_ms: if self.seeds.is_empty() {
                0
            } else {
                self.replication.bootstrap_wait_ms
            },
            ..self.replication.clone()
        }
    }
}

/// TLS files of a node.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain (PEM).
    pub cert: Option<PathBuf>,
    /// Private key (PEM).
    pub key: Option<PathBuf>,
    /// The cluster CA (PEM).
    pub ca: Option<PathBuf>,
    /// Directory of the development CA (`ca.pem`, `ca.key`) used when no cert is
    /// configured. Default: `data_dir`.
    pub dev_ca_dir: Option<PathBuf>,
}

/// Validation limits, see `shoal_storage::Limits`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Longest namespace, group, service or cluster name (bytes).
    pub max_name_len: usize,
    /// Most metadata entries on one instance or service.
    pub max_metadata_entries: usize,
    /// Longest metadata key (bytes).
    pub max_metadata_key_len: usize,
    /// Longest metadata value (bytes).
    pub max_metadata_value_len: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let l = shoal_storage::Limits::default();
        LimitsConfig {
            max_name_len: l.max_name_len,
            max_metadata_entries: l.max_metadata_entries,
            max_metadata_key_len: l.max_metadata_key_len,
            max_metadata_value_len: l.max_metadata_value_len,
        }
    }
}

impl From<&LimitsConfig> for shoal_storage::Limits {
    fn from(c: &LimitsConfig) -> Self {
        shoal_storage::Limits {
            max_name_len: c.max_name_len,
            max_metadata_entries: c.max_metadata_entries,
            max_metadata_key_len: c.max_metadata_key_len,
            max_metadata_value_len: c.max_metadata_value_len,
        }
    }
}

/// The most worker threads a node may be given.
pub const MAX_WORKER_THREADS: usize = 1024;

/// The longest spin before a park a node may be given (µs): a bound on the CPU a
/// worker may spend waiting awake; the windows measured (20-200 µs) all helped under
/// load (docs/benchmarks.md, twenty-eighth series).
pub const MAX_IDLE_SPIN_US: u64 = 1_000;

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: None,
            data_dir: PathBuf::from("shoal-data"),
            listen_addr: "127.0.0.1:7400".parse().expect("literal address"),
            advertise_host: None,
            http_addr: "127.0.0.1:7401".parse().expect("literal address"),
            tls: TlsConfig::default(),
            session_grace_ms: 15_000,
            idle_timeout_ms: 12_000,
            keep_alive_interval_ms: 8_000,
            heartbeat_interval_ms: 5_000,
            max_frame_bytes: shoal_proto::DEFAULT_MAX_FRAME_BYTES,
            udp_buffer_bytes: 4 << 20,
            worker_threads: 0,
            idle_spin_us: 50,
            outbound_queue_frames: 4_096,
            query_cache_bytes: 64 << 20,
            shutdown_timeout_ms: 3_000,
            namespaces: Vec::new(),
            limits: LimitsConfig::default(),
            seeds: Vec::new(),
            forward_timeout_ms: 2_000,
            peer_queue_messages: 65_536,
            peer_max_frame_bytes: 64 << 20,
            replication: shoal_replication::Config::default(),
        }
    }
}

impl Config {
    /// Reads a TOML file over the defaults.
    pub fn from_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))
    }

    /// Checks values that would make the node misbehave.
    pub fn validate(&self) -> Result<()> {
        anyhow::ensure!(
            self.worker_threads <= MAX_WORKER_THREADS,
            "worker_threads ({}) must be at most {MAX_WORKER_THREADS} (0: one per CPU)",
            self.worker_threads
        );
        anyhow::ensure!(
            self.idle_spin_us <= MAX_IDLE_SPIN_US,
            "idle_spin_us ({}) must be at most {MAX_IDLE_SPIN_US}",
            self.idle_spin_us
        );
        anyhow::ensure!(
            self.keep_alive_interval_ms > 0 && self.keep_alive_interval_ms < self.idle_timeout_ms,
            "keep_alive_interval_ms ({}) must be above 0 and below idle_timeout_ms ({})",
            self.keep_alive_interval_ms,
            self.idle_timeout_ms
        );
        anyhow::ensure!(
            self.max_frame_bytes >= 1024 && self.max_frame_bytes <= u32::MAX as usize,
            "max_frame_bytes must be between 1024 and 4294967295"
        );
        anyhow::ensure!(
            self.peer_max_frame_bytes >= 65_536 && self.peer_max_frame_bytes <= u32::MAX as usize,
            "peer_max_frame_bytes must be between 65536 and 4294967295"
        );
        anyhow::ensure!(
            self.outbound_queue_frames > 0,
            "outbound_queue_frames must be above 0"
        );
        let tls = &self.tls;
        let set = [tls.cert.is_some(), tls.key.is_some(), tls.ca.is_some()];
        anyhow::ensure!(
            set.iter().all(|s| *s) || set.iter().all(|s| !*s),
            "tls.cert, tls.key and tls.ca must be set together (or none, for development certificates)"
        );
        let limits: shoal_storage::Limits = (&self.limits).into();
        for ns in &self.namespaces {
            shoal_storage::validate_name(shoal_storage::NameKind::Namespace, ns, &limits)
                .with_context(|| format!("namespace {ns:?} in the configuration"))?;
        }
        Ok(())
    }

    /// The host put in certificates and told to others.
    pub fn advertise_host(&self) -> String {
        self.advertise_host
            .clone()
            .unwrap_or_else(|| self.listen_addr.ip().to_string())
    }
}
