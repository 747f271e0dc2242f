//! The end-to-end test harness: real `shoal` processes, raw protocol clients, and the
//! small helpers that let an integration test read as the scenario it models.
//!
//! - [`Node`] runs `shoal server` as an OS process on ephemeral ports with a fresh data
//!   directory, learns its addresses from the one line it prints when it serves, and
//!   kills it on drop. [`Node::kill9`] models a crash, [`Node::terminate`] a clean stop.
//! - [`RawClient`] speaks the client protocol frame by frame over QUIC, so a test can
//!   send exactly the bytes it means (garbage included) and see every frame the node
//!   sends back.
//! - [`UdpRelay`] sits between a client and a node and can cut the path silently, the
//!   way a crashed host or a dead network looks to the node: no close, just silence.
//! - [`shoal_cli`] runs a client command to its end; [`CliProcess`] holds a long-running
//!   one (`shoal register`) that a test can SIGKILL or SIGTERM.
//! - [`PresenceWatch`] proves an instance never went missing during a stretch of time.
//! - [`Cluster`] runs N nodes on loopback that share one development CA, each seeded
//!   with the nodes started before it; it kills, restarts (same id, data directory and,
//!   by default, ports) and adds nodes, and [`Cluster::wait_until_converged`] waits until
//!   every node sees every live node up and ready and every `/v1/dump` is identical.
//!   [`DumpWatch`] proves a set of instances never went missing on a node.
//! - [`http_get`], [`Node::dump`] and [`wait_for`] observe the node from outside and
//!   wait for outcomes with generous, bounded timeouts. Tests assert what a user would
//!   notice, never how fast it happened.
//!
//! Helpers panic with a message that says what failed (a harness failure is a test
//! failure); answers of the protocol (`Result<Response, ErrorBody>`) are returned as
//! values so tests can assert on errors. When a test panics, the nodes it started print
//! the tail of their log and keep their data directory for inspection.
//!
//! # Which `shoal` binary
//!
//! `SHOAL_BIN`, if set, names the binary. Otherwise the harness runs
//! `cargo build -p shoal-cli --bin shoal` once per test binary (same profile and target
//! directory as the tests, so `cargo test -p shoal-tests` alone is enough and never tests
//! a stale server), then uses the `shoal` next to the test executable's `deps/`
//! directory. `SHOAL_TEST_NO_BUILD=1` skips the build and uses whatever binary is there.
//!
//! Every process the harness starts has the `SHOAL_*` variables of the test's own
//! environment removed, so a developer's `SHOAL_SERVERS` or `SHOAL_SESSION_GRACE_MS`
//! cannot change what a test means.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use shoal_proto::{
    ClientFrame, ErrorBody, ErrorCode, Hello, Request, Response, ServerFrame, Welcome,
    PROTOCOL_VERSION,
};
use shoal_storage::{InstanceKey, InstanceSpec, ServiceKey, ServiceView, SessionId};
use tokio::sync::mpsc;

pub use serde_json::Value;

/// How long a node may take to print its ready line.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a test waits for one answer from a node before calling it lost.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest frame the raw client accepts from a node.
const CLIENT_MAX_FRAME_BYTES: usize = 64 << 20;

// ---------------------------------------------------------------------------------------
// The binary
// ---------------------------------------------------------------------------------------

/// The `shoal` binary the tests run; see the crate docs for how it is found and built.
pub fn shoal_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(locate_or_build).clone()
}

fn locate_or_build() -> PathBuf {
    if let Some(bin) = std::env::var_os("SHOAL_BIN") {
        let bin = PathBuf::from(bin);
        assert!(bin.is_file(), "SHOAL_BIN={} is not a file", bin.display());
        return bin;
    }
    let (dir, profile) = profile_dir();
    let bin = dir.join(format!("shoal{}", std::env::consts::EXE_SUFFIX));
    if std::env::var_os("SHOAL_TEST_NO_BUILD").is_none() {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the tests crate sits inside the workspace")
            .to_path_buf();
        let out = Command::new(env!("CARGO"))
            .current_dir(&workspace)
            .args(["build", "--quiet", "-p", "shoal-cli", "--bin", "shoal"])
            .args(["--profile", &profile])
            .output()
            .unwrap_or_else(|e| panic!("cannot run cargo to build the shoal binary: {e}"));
        assert!(
            out.status.success(),
            "building the shoal binary failed ({}); set SHOAL_BIN to use a prebuilt one\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        bin.is_file(),
        "no shoal binary at {}; run `cargo build --bin shoal` or set SHOAL_BIN",
        bin.display()
    );
    bin
}

/// The directory the tests' profile builds into (`target/debug`, `target/release`...)
/// and the cargo profile name for it. A test executable lives in `<that dir>/deps/`,
/// which also covers CARGO_TARGET_DIR and target directories set in cargo config.
fn profile_dir() -> (PathBuf, String) {
    let from_exe = std::env::current_exe().ok().and_then(|exe| {
        let deps = exe.parent()?;
        (deps.file_name()? == "deps").then(|| deps.parent().map(Path::to_path_buf))?
    });
    let dir = from_exe.unwrap_or_else(|| {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
        target.join(if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        })
    });
    let profile = match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_string(),
        Some(other) => other.to_string(),
    };
    (dir, profile)
}

/// A fresh directory under the system temp dir, unique across processes and calls.
pub fn unique_temp_dir(prefix: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "{prefix}-{}-{}-{nanos:08x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create temp dir {}: {e}", dir.display()));
    dir
}

// ---------------------------------------------------------------------------------------
// Nodes
// ---------------------------------------------------------------------------------------

/// How to start a node. Unset timings keep the node's defaults.
#[derive(Clone, Debug, Default)]
pub struct NodeOptions {
    /// `--node-id`.
    pub node_id: Option<String>,
    /// `--session-grace-ms`.
    pub session_grace_ms: Option<u64>,
    /// `--idle-timeout-ms`.
    pub idle_timeout_ms: Option<u64>,
    /// `--keep-alive-interval-ms`.
    pub keep_alive_interval_ms: Option<u64>,
    /// `--heartbeat-interval-ms`.
    pub heartbeat_interval_ms: Option<u64>,
    /// `--seed`: other nodes to join through.
    pub seeds: Vec<String>,
    /// `--dev-ca-dir`: the development CA shared by the nodes of one cluster.
    pub dev_ca_dir: Option<PathBuf>,
    /// `--namespace`, besides `public`.
    pub namespaces: Vec<String>,
    /// Any further arguments of `shoal server`.
    pub extra_args: Vec<String>,
    /// `--listen-addr`; `127.0.0.1:0` (a free port) when unset.
    pub listen_addr: Option<SocketAddr>,
    /// `--http-addr`; `127.0.0.1:0` (a free port) when unset.
    pub http_addr: Option<SocketAddr>,
}

impl NodeOptions {
    /// Sets `--node-id`.
    pub fn node_id(mut self, id: &str) -> Self {
        self.node_id = Some(id.to_string());
        self
    }
    /// Sets `--session-grace-ms`.
    pub fn session_grace_ms(mut self, ms: u64) -> Self {
        self.session_grace_ms = Some(ms);
        self
    }
    /// Sets `--idle-timeout-ms`.
    pub fn idle_timeout_ms(mut self, ms: u64) -> Self {
        self.idle_timeout_ms = Some(ms);
        self
    }
    /// Sets `--keep-alive-interval-ms`.
    pub fn keep_alive_interval_ms(mut self, ms: u64) -> Self {
        self.keep_alive_interval_ms = Some(ms);
        self
    }
    /// Sets `--heartbeat-interval-ms` (0: none).
    pub fn heartbeat_interval_ms(mut self, ms: u64) -> Self {
        self.heartbeat_interval_ms = Some(ms);
        self
    }
    /// Adds a `--seed`.
    pub fn seed(mut self, addr: impl Into<String>) -> Self {
        self.seeds.push(addr.into());
        self
    }
    /// Sets `--dev-ca-dir` (the nodes of one cluster share one development CA).
    pub fn dev_ca_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dev_ca_dir = Some(dir.into());
        self
    }
    /// Adds a namespace besides `public`.
    pub fn namespace(mut self, ns: &str) -> Self {
        self.namespaces.push(ns.to_string());
        self
    }
    /// Adds raw arguments to `shoal server`.
    pub fn arg(mut self, arg: &str) -> Self {
        self.extra_args.push(arg.to_string());
        self
    }
    /// Sets `--listen-addr` (the QUIC address) instead of a free port.
    pub fn listen_addr(mut self, addr: SocketAddr) -> Self {
        self.listen_addr = Some(addr);
        self
    }
    /// Sets `--http-addr` instead of a free port.
    pub fn http_addr(mut self, addr: SocketAddr) -> Self {
        self.http_addr = Some(addr);
        self
    }

    fn args(&self, data_dir: &Path) -> Vec<String> {
        let any_port =
            |a: Option<SocketAddr>| a.map_or("127.0.0.1:0".to_string(), |a| a.to_string());
        let mut args = vec![
            "server".to_string(),
            "--listen-addr".into(),
            any_port(self.listen_addr),
            "--http-addr".into(),
            any_port(self.http_addr),
            "--data-dir".into(),
            data_dir.display().to_string(),
        ];
        let mut flag = |name: &str, v: Option<String>| {
            if let Some(v) = v {
                args.push(format!("--{name}"));
                args.push(v);
            }
        };
        flag("node-id", self.node_id.clone());
        flag(
            "session-grace-ms",
            self.session_grace_ms.map(|v| v.to_string()),
        );
        flag(
            "idle-timeout-ms",
            self.idle_timeout_ms.map(|v| v.to_string()),
        );
        flag(
            "keep-alive-interval-ms",
            self.keep_alive_interval_ms.map(|v| v.to_string()),
        );
        flag(
            "heartbeat-interval-ms",
            self.heartbeat_interval_ms.map(|v| v.to_string()),
        );
        flag(
            "dev-ca-dir",
            self.dev_ca_dir.as_ref().map(|d| d.display().to_string()),
        );
        for seed in &self.seeds {
            args.push("--seed".into());
            args.push(seed.clone());
        }
        for ns in &self.namespaces {
            args.push("--namespace".into());
            args.push(ns.clone());
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }
}

/// A `shoal server` process. Dropping it kills the process and removes its directory
/// (kept, with the path printed, when the test is panicking).
pub struct Node {
    child: Child,
    exited: Option<ExitStatus>,
    id: String,
    quic: SocketAddr,
    http: SocketAddr,
    ca: PathBuf,
    root: PathBuf,
    log: PathBuf,
    opts: NodeOptions,
}

impl Node {
    /// Starts a node and waits (up to [`START_TIMEOUT`]) for its ready line.
    pub async fn start(opts: NodeOptions) -> Node {
        let root = unique_temp_dir("shoal-test-node");
        let log = root.join("node.log");
        let (child, ready) = spawn_server(&root, &log, &opts).await;
        Node {
            child,
            exited: None,
            id: ready.id,
            quic: ready.quic,
            http: ready.http,
            ca: ready.ca,
            root,
            log,
            opts,
        }
    }
}

/// Runs `shoal server` with `opts` in `root` (data in `root/data`, stderr appended to
/// `log`) and waits (up to [`START_TIMEOUT`]) for its ready line.
async fn spawn_server(root: &Path, log: &Path, opts: &NodeOptions) -> (Child, ReadyLine) {
    let data_dir = root.join("data");
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
    let mut child = Command::new(shoal_bin())
        .args(opts.args(&data_dir))
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or("info".into()),
        )
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", shoal_bin().display()));

    // The node prints one line on stdout; a thread hands lines over and keeps
    // draining so the node can never block on a full pipe.
    let stdout = child.stdout.take().expect("stdout was piped above");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                // Nobody listens any more; keep draining.
                continue;
            }
        }
    });

    let deadline = Instant::now() + START_TIMEOUT;
    let mut seen = Vec::new();
    let parsed = loop {
        if let Some(p) = take_ready_line(&rx, &mut seen) {
            break Some(p);
        }
        if let Ok(Some(status)) = child.try_wait() {
            // One more look: the line may have come just before the exit.
            if let Some(p) = take_ready_line(&rx, &mut seen) {
                break Some(p);
            }
            panic!(
                "shoal server exited ({status}) before it was ready\nstdout: {seen:?}\n{}",
                tail(log, 60)
            );
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let Some(ready) = parsed else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "shoal server printed no ready line within {START_TIMEOUT:?}\nstdout: {seen:?}\n{}",
            tail(log, 60)
        );
    };
    (child, ready)
}

impl Node {
    /// The node id it announced.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// The bound QUIC (UDP) address.
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic
    }
    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http
    }
    /// The CA certificate clients must trust.
    pub fn ca_file(&self) -> &Path {
        &self.ca
    }
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    /// The last `lines` lines of the node's log (stderr).
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// SIGKILL: the node dies without a word, as in a crash. Waits for it to exit.
    pub fn kill9(&mut self) -> ExitStatus {
        if let Some(s) = self.exited {
            return s;
        }
        // std's Child::kill sends SIGKILL on Unix.
        let _ = self.child.kill();
        let status = self.child.wait().expect("waiting for a killed node");
        self.exited = Some(status);
        status
    }

    /// SIGTERM: the node stops cleanly. Waits up to 30 s for it to exit (then kills it
    /// and panics).
    pub async fn terminate(&mut self) -> ExitStatus {
        if let Some(s) = self.exited {
            return s;
        }
        send_sigterm(self.child.id());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exited = Some(status);
                return status;
            }
            if Instant::now() > deadline {
                self.kill9();
                panic!(
                    "node {} did not exit within 30 s of SIGTERM\n{}",
                    self.id,
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `GET path` on the node's HTTP side.
    pub async fn get(&self, path: &str) -> HttpResponse {
        http_get(self.http, path).await.unwrap_or_else(|e| {
            panic!("GET {path} on node {}: {e}\n{}", self.id, self.log_tail(20))
        })
    }

    /// `GET /v1/dump`: every service with its settings and instances.
    pub async fn dump(&self) -> Value {
        let r = self.get("/v1/dump").await;
        assert_eq!(r.status, 200, "GET /v1/dump: {}", r.body);
        r.json()
    }

    /// `GET /v1/node`: id, readiness and counts (services, instances, sessions).
    pub async fn info(&self) -> Value {
        let r = self.get("/v1/node").await;
        assert_eq!(r.status, 200, "GET /v1/node: {}", r.body);
        r.json()
    }

    /// `GET /v1/instances` of `service`: its [`ServiceView`] as JSON (all instances,
    /// `revision` 0 when it does not exist).
    pub async fn view(&self, service: &ServiceKey) -> Value {
        let r = self.get(&instances_path(service)).await;
        assert_eq!(r.status, 200, "GET {}: {}", instances_path(service), r.body);
        r.json()
    }

    /// The instances of `service` as the node's HTTP side lists them.
    pub async fn instances(&self, service: &ServiceKey) -> Vec<Value> {
        self.view(service).await["instances"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The instance `ip:port` of `service`, if listed.
    pub async fn instance(&self, service: &ServiceKey, ip: &str, port: u16) -> Option<Value> {
        self.instances(service)
            .await
            .into_iter()
            .find(|i| i["ip"] == ip && i["port"] == port)
    }
}

/// The `/v1/instances` path of a service. Valid names need no escaping (letters,
/// digits and `- _ . : @`); anything else is percent-encoded.
pub fn instances_path(service: &ServiceKey) -> String {
    fn enc(s: &str) -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b':' | b'@' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    }
    format!(
        "/v1/instances?namespace={}&group={}&service={}",
        enc(&service.namespace),
        enc(&service.group),
        enc(&service.service)
    )
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- node {} (pid {}) log tail; data kept in {} ---\n{}",
                self.id,
                self.child.id(),
                self.root.display(),
                self.log_tail(60)
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// The parts of `shoal node <id> ready: quic=IP:PORT http=IP:PORT ca=PATH`.
#[derive(Debug, PartialEq)]
struct ReadyLine {
    id: String,
    quic: SocketAddr,
    http: SocketAddr,
    ca: PathBuf,
}

fn parse_ready_line(line: &str) -> Option<ReadyLine> {
    let rest = line.trim().strip_prefix("shoal node ")?;
    let (id, rest) = rest.split_once(" ready: ")?;
    let rest = rest.strip_prefix("quic=")?;
    let (quic, rest) = rest.split_once(" http=")?;
    let (http, ca) = rest.split_once(" ca=")?;
    Some(ReadyLine {
        id: id.to_string(),
        quic: quic.parse().ok()?,
        http: http.parse().ok()?,
        ca: PathBuf::from(ca),
    })
}

/// Takes the lines received so far; returns the ready line's parts if one came.
fn take_ready_line(
    rx: &std::sync::mpsc::Receiver<String>,
    seen: &mut Vec<String>,
) -> Option<ReadyLine> {
    for line in rx.try_iter() {
        match parse_ready_line(&line) {
            Some(p) => return Some(p),
            None => seen.push(line),
        }
    }
    None
}

/// The last `lines` lines of a file, for failure messages.
fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            let from = all.len().saturating_sub(lines);
            format!("--- {} ---\n{}", path.display(), all[from..].join("\n"))
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// SIGTERM by pid.
pub fn send_sigterm(pid: u32) {
    send_signal("TERM", pid);
}

/// Sends signal `sig` (`TERM`, `STOP`, `CONT`, ...) by pid, via `kill(1)` (no FFI
/// for a few signals). `STOP` returns once every thread of the process is stopped.
pub fn send_signal(sig: &str, pid: u32) {
    kill(sig, pid);
    if sig == "STOP" {
        wait_until_stopped(pid);
    }
}

fn kill(sig: &str, pid: u32) {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap_or_else(|e| panic!("cannot run kill: {e}"));
    assert!(status.success(), "kill -{sig} {pid} failed: {status}");
}

/// Waits until every thread of `pid` is stopped (state `T` in /proc), sending SIGSTOP
/// again every 100 ms meanwhile. On a loaded machine a SIGSTOP was seen not to take
/// (the node kept running, state `R`, and served requests the test meant to go
/// unanswered); a test that freezes a node must know it is frozen.
fn wait_until_stopped(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut sent = 1;
    loop {
        if all_threads_stopped(pid) {
            if sent > 1 {
                eprintln!("kill -STOP {pid}: stopped after {sent} signals");
            }
            return;
        }
        assert!(
            Instant::now() < deadline,
            "process {pid} not stopped 10 s after {sent} SIGSTOPs"
        );
        std::thread::sleep(Duration::from_millis(100));
        if !all_threads_stopped(pid) {
            kill("STOP", pid);
            sent += 1;
        }
    }
}

/// Whether /proc shows every thread of `pid` stopped (or the process gone).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat")).map_or(true, |st| {
            // The state follows the command name, which is in parentheses.
            st.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_none_or(|state| state == "T" || state == "t" || state == "Z" || state == "X")
        })
    })
}

/// The instances of `service` in a `/v1/dump` document.
pub fn instances_in_dump(dump: &Value, service: &ServiceKey) -> Vec<Value> {
    dump.as_array()
        .into_iter()
        .flatten()
        .find(|s| {
            s["key"]["namespace"] == service.namespace.as_str()
                && s["key"]["group"] == service.group.as_str()
                && s["key"]["service"] == service.service.as_str()
        })
        .and_then(|s| s["instances"].as_array().cloned())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// The CLI as a user runs it
// ---------------------------------------------------------------------------------------

/// A `shoal` command line with SHOAL_* variables of the test's environment removed, so
/// that neither a node nor a client command picks up settings the test did not give.
pub fn shoal_command() -> Command {
    let mut cmd = Command::new(shoal_bin());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("SHOAL_") {
            cmd.env_remove(name);
        }
    }
    cmd.env("NO_COLOR", "1").stdin(Stdio::null());
    cmd
}

/// What a finished client command did.
#[derive(Debug, Clone)]
pub struct CliOutput {
    /// Its exit status.
    pub status: ExitStatus,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

impl CliOutput {
    /// Stdout as JSON; panics with both outputs if the command failed or it is not JSON.
    pub fn json(&self) -> Value {
        assert!(self.status.success(), "command failed: {self:?}");
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }
}

/// The arguments that point a client command at `node`.
pub fn client_args(node: &Node) -> Vec<String> {
    vec![
        "--server".into(),
        node.quic_addr().to_string(),
        "--ca".into(),
        node.ca_file().display().to_string(),
    ]
}

/// Runs a client command against `node` (`args`, then `--server` and `--ca`) to its
/// end; kills it and panics if it runs longer than 30 s.
pub async fn shoal_cli(node: &Node, args: &[&str]) -> CliOutput {
    let mut cmd = shoal_command();
    cmd.args(args).args(client_args(node));
    run_to_end(cmd, &format!("shoal {args:?}")).await
}

/// Runs `cmd` (a [`shoal_command`] with its arguments) to its end, collecting both
/// outputs; kills it and panics if it runs longer than 30 s.
pub async fn run_to_end(mut cmd: Command, what: &str) -> CliOutput {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            let out = child.wait_with_output().expect("collecting the output");
            return CliOutput {
                status: out.status,
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            };
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collecting the output");
            panic!(
                "{what} ran longer than 30 s\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A long-running client command (`shoal register`, `shoal watch`) as a process: its
/// stdout lines as they come, and signals. Dropping it kills the process.
pub struct CliProcess {
    child: Child,
    exited: Option<ExitStatus>,
    lines: std::sync::mpsc::Receiver<String>,
    stderr: PathBuf,
    root: PathBuf,
}

impl CliProcess {
    /// Starts `shoal <args> --server <node> --ca <node's CA>`.
    pub fn spawn(node: &Node, args: &[&str]) -> CliProcess {
        let root = unique_temp_dir("shoal-test-cli");
        let stderr = root.join("stderr.log");
        let err_file = std::fs::File::create(&stderr)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", stderr.display()));
        let mut child = shoal_command()
            .args(args)
            .args(client_args(node))
            .stdout(Stdio::piped())
            .stderr(err_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run shoal {args:?}: {e}"));
        let stdout = child.stdout.take().expect("stdout was piped above");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        CliProcess {
            child,
            exited: None,
            lines,
            stderr,
            root,
        }
    }

    /// The next line on stdout, waiting up to `timeout`; panics (with stderr) if none
    /// comes or the process exits first.
    pub async fn next_line(&mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            match self.lines.try_recv() {
                Ok(line) => return line,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => panic!(
                    "the command closed stdout ({:?})\n{}",
                    self.child.try_wait(),
                    tail(&self.stderr, 40)
                ),
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
            }
            if Instant::now() > deadline {
                panic!(
                    "no line on stdout within {timeout:?}\n{}",
                    tail(&self.stderr, 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// SIGKILL: the client dies without a word. Waits for it.
    pub fn kill9(&mut self) -> ExitStatus {
        if let Some(s) = self.exited {
            return s;
        }
        let _ = self.child.kill();
        let status = self.child.wait().expect("waiting for a killed command");
        self.exited = Some(status);
        status
    }

    /// SIGTERM, then waits up to 30 s for it to exit.
    pub async fn terminate(&mut self) -> ExitStatus {
        if let Some(s) = self.exited {
            return s;
        }
        send_sigterm(self.child.id());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exited = Some(status);
                return status;
            }
            if Instant::now() > deadline {
                self.kill9();
                panic!(
                    "command did not exit within 30 s of SIGTERM\n{}",
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for CliProcess {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- client command stderr ---\n{}", tail(&self.stderr, 40));
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

// ---------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------

/// A status code and a body.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// The body, decoded as UTF-8 (lossily).
    pub body: String,
}

impl HttpResponse {
    /// The body as JSON; panics with the body if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }
}

/// A minimal HTTP/1.1 GET over a fresh TCP connection (`Connection: close`); handles
/// `Content-Length`, chunked and read-to-end bodies. Times out after [`ANSWER_TIMEOUT`].
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<HttpResponse> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(buf)
    };
    let buf = tokio::time::timeout(ANSWER_TIMEOUT, exchange)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {ANSWER_TIMEOUT:?}"))??;
    parse_http_response(&buf)
}

fn parse_http_response(buf: &[u8]) -> anyhow::Result<HttpResponse> {
    anyhow::ensure!(
        !buf.is_empty(),
        "the node closed the connection without a response (did the handler panic? see its log)"
    );
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| {
            anyhow::anyhow!("no end of headers in {:?}", String::from_utf8_lossy(buf))
        })?;
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let mut body = &buf[split + 4..];
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("bad status line {status_line:?}"))?;
    let mut chunked = false;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            if name == "transfer-encoding" && value.eq_ignore_ascii_case("chunked") {
                chunked = true;
            } else if name == "content-length" {
                let len: usize = value.parse()?;
                body = &body[..len.min(body.len())];
            }
        }
    }
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok(HttpResponse {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow::anyhow!("bad chunked body"))?;
        let size_text = String::from_utf8_lossy(&data[..eol]).to_string();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        anyhow::ensure!(data.len() >= size + 2, "chunk longer than the body");
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

// ---------------------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------------------

/// Polls `cond` every 50 ms until it is true; panics after `timeout` with `what`.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if cond().await {
            return;
        }
        if started.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Watches one instance in a node's `/v1/instances` in the background, every 20 ms, to
/// prove it never went missing during some stretch of a scenario.
pub struct PresenceWatch {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<PresenceReport>,
}

/// What a [`PresenceWatch`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceReport {
    /// Dumps read.
    pub polls: usize,
    /// Dumps in which the instance was missing.
    pub missing: usize,
}

impl PresenceWatch {
    /// Starts watching `ip:port` of `service` on `node`.
    pub fn start(node: &Node, service: &ServiceKey, ip: &str, port: u16) -> PresenceWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let (http, path, ip) = (node.http_addr(), instances_path(service), ip.to_string());
        let flag = Arc::clone(&stop);
        let task = tokio::spawn(async move {
            let mut report = PresenceReport {
                polls: 0,
                missing: 0,
            };
            while !flag.load(Ordering::SeqCst) {
                if let Ok(r) = http_get(http, &path).await {
                    if let Ok(view) = serde_json::from_str::<Value>(&r.body) {
                        report.polls += 1;
                        let present = view["instances"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|i| i["ip"] == ip.as_str() && i["port"] == port);
                        if !present {
                            report.missing += 1;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            report
        });
        PresenceWatch { stop, task }
    }

    /// Stops watching and says what was seen.
    pub async fn stop(self) -> PresenceReport {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("the presence watch does not panic")
    }
}

// ---------------------------------------------------------------------------------------
// Raw protocol client
// ---------------------------------------------------------------------------------------

/// What the node did on the session stream, as the raw client's reader saw it.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A frame arrived.
    Frame(ServerFrame),
    /// The node finished its side of the stream cleanly (between frames).
    End,
    /// The stream or connection failed, or a frame did not decode; the reason.
    Failed(String),
}

/// How a node refused a connection or a stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// It sent this error frame (and then closed).
    Error(ErrorBody),
    /// It closed without an error frame; the reason as the client saw it.
    Closed(String),
}

/// Transport settings of a raw client.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// QUIC keep-alive interval sent by the client; `None` for none.
    pub keep_alive: Option<Duration>,
    /// The client's idle timeout (the connection uses the smaller of both sides').
    pub idle_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            keep_alive: Some(Duration::from_millis(500)),
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// A protocol-level client: one QUIC connection, one session stream, frames in and
/// out exactly as the test says. Pushes that arrive while a test waits for a response
/// are kept for [`RawClient::next_push`].
pub struct RawClient {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    events: mpsc::UnboundedReceiver<Event>,
    reader: tokio::task::JoinHandle<()>,
    /// The read of the session stream that brought each answer, by request id.
    reads: Arc<std::sync::Mutex<HashMap<u64, u64>>>,
    pushes: VecDeque<ServiceView>,
    next_id: u64,
    ended: bool,
    /// Requests are sent with structs as arrays, as the SDK sends them to a node of its
    /// request shape.
    compact: bool,
}

impl RawClient {
    /// Connects to `node` and opens the session stream; sends nothing yet.
    pub async fn connect(node: &Node) -> RawClient {
        Self::connect_to(node.quic_addr(), node.ca_file(), ClientOptions::default()).await
    }

    /// Connects to `node` and says Hello (a new session). Returns the Welcome too.
    pub async fn session(node: &Node) -> (RawClient, Welcome) {
        let mut c = Self::connect(node).await;
        let w = c.hello(None).await;
        (c, w)
    }

    /// Connects to a QUIC address trusting the CA in `ca_file`, and opens the session
    /// stream. The stream reaches the node with the first bytes sent on it.
    pub async fn connect_to(addr: SocketAddr, ca_file: &Path, opts: ClientOptions) -> RawClient {
        let config = client_config(ca_file, &opts);
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("literal"))
            .expect("binding a client UDP socket");
        endpoint.set_default_client_config(config);
        let connecting = endpoint
            .connect(addr, "localhost")
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        let conn = tokio::time::timeout(ANSWER_TIMEOUT, connecting)
            .await
            .unwrap_or_else(|_| panic!("QUIC handshake with {addr} timed out"))
            .unwrap_or_else(|e| panic!("QUIC handshake with {addr}: {e}"));
        let (send, recv) = conn
            .open_bi()
            .await
            .unwrap_or_else(|e| panic!("opening the session stream: {e}"));
        let (tx, events) = mpsc::unbounded_channel();
        let reads = Arc::default();
        let reader = tokio::spawn(read_loop(recv, tx, Arc::clone(&reads)));
        RawClient {
            endpoint,
            conn,
            send,
            events,
            reader,
            reads,
            pushes: VecDeque::new(),
            next_id: 1,
            ended: false,
            compact: false,
        }
    }

    /// From now on sends requests with structs as arrays (`encode_frame_compact`), or
    /// as maps again.
    pub fn set_compact(&mut self, compact: bool) {
        self.compact = compact;
    }

    /// The number of the read of the session stream that brought the answer to
    /// request `id` (reads are numbered from 1), once it came.
    pub fn read_of(&self, id: u64) -> Option<u64> {
        self.reads.lock().expect("reads").get(&id).copied()
    }

    /// The QUIC connection (to open extra streams, read close reasons...).
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Writes raw bytes on the session stream.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.send
            .write_all(bytes)
            .await
            .unwrap_or_else(|e| panic!("writing {} raw bytes: {e}", bytes.len()));
    }

    /// Writes one frame (a request with structs as arrays after `set_compact(true)`).
    pub async fn send_frame(&mut self, frame: &ClientFrame) {
        let encoded = match frame {
            ClientFrame::Request { .. } if self.compact => {
                shoal_proto::encode_frame_compact(frame, CLIENT_MAX_FRAME_BYTES)
            }
            _ => shoal_proto::encode_frame(frame, CLIENT_MAX_FRAME_BYTES),
        };
        let bytes = encoded.unwrap_or_else(|e| panic!("encoding {frame:?}: {e}"));
        self.send_raw(&bytes).await;
    }

    /// Finishes the client's side of the session stream (no more bytes).
    pub fn finish(&mut self) {
        let _ = self.send.finish();
    }

    /// Sends Hello and waits for Welcome; panics on anything else.
    pub async fn hello(&mut self, resume: Option<SessionId>) -> Welcome {
        self.send_frame(&ClientFrame::Hello(Hello {
            version: PROTOCOL_VERSION,
            client_name: "shoal-tests".into(),
            resume,
        }))
        .await;
        match self.next_event(ANSWER_TIMEOUT).await {
            Event::Frame(ServerFrame::Welcome(w)) => w,
            other => panic!("expected Welcome after Hello, got {other:?}"),
        }
    }

    /// The next thing the node did, or panics after `timeout`.
    pub async fn next_event(&mut self, timeout: Duration) -> Event {
        if self.ended {
            return Event::End;
        }
        match tokio::time::timeout(timeout, self.events.recv()).await {
            Ok(Some(e)) => {
                if !matches!(e, Event::Frame(_)) {
                    self.ended = true;
                }
                e
            }
            Ok(None) => {
                self.ended = true;
                Event::End
            }
            Err(_) => panic!("nothing from the node within {timeout:?}"),
        }
    }

    /// Sends a request and waits for its response, keeping pushes that come first.
    /// Panics if the stream fails or the node sends a connection error instead.
    pub async fn request(&mut self, body: Request) -> Result<Response, ErrorBody> {
        let id = self.next_id;
        self.next_id += 1;
        let what = format!("{body:?}");
        self.send_frame(&ClientFrame::Request { id, body }).await;
        loop {
            match self.next_event(ANSWER_TIMEOUT).await {
                Event::Frame(ServerFrame::Response { id: got, result }) if got == id => {
                    return result
                }
                Event::Frame(ServerFrame::Push(view)) => self.pushes.push_back(view),
                other => panic!("waiting for the answer to {what} (id {id}), got {other:?}"),
            }
        }
    }

    /// Like [`RawClient::request`], but the request must succeed.
    pub async fn ok(&mut self, body: Request) -> Response {
        let what = format!("{body:?}");
        self.request(body)
            .await
            .unwrap_or_else(|e| panic!("{what} failed: {e}"))
    }

    /// Registers `instance` in `service`; panics unless applied. Returns the revision.
    pub async fn register(&mut self, service: &ServiceKey, instance: InstanceSpec) -> u64 {
        match self
            .ok(Request::Register {
                service: service.clone(),
                instance,
            })
            .await
        {
            Response::Applied { revision } => revision,
            other => panic!("Register answered {other:?}"),
        }
    }

    /// Deregisters an instance; panics unless applied.
    pub async fn deregister(&mut self, service: &ServiceKey, instance: InstanceKey) -> u64 {
        match self
            .ok(Request::Deregister {
                service: service.clone(),
                instance,
            })
            .await
        {
            Response::Applied { revision } => revision,
            other => panic!("Deregister answered {other:?}"),
        }
    }

    /// Queries all instances of a service.
    pub async fn query(&mut self, service: &ServiceKey) -> ServiceView {
        match self
            .ok(Request::Query {
                service: service.clone(),
                clusters: Vec::new(),
                healthy_only: false,
            })
            .await
        {
            Response::View(v) => v,
            other => panic!("Query answered {other:?}"),
        }
    }

    /// Subscribes to a service; returns the current view.
    pub async fn subscribe(&mut self, service: &ServiceKey) -> ServiceView {
        match self
            .ok(Request::Subscribe {
                service: service.clone(),
            })
            .await
        {
            Response::View(v) => v,
            other => panic!("Subscribe answered {other:?}"),
        }
    }

    /// Ping; panics unless answered `Done`.
    pub async fn ping(&mut self) {
        assert_eq!(self.ok(Request::Ping).await, Response::Done);
    }

    /// The next push, waiting up to `timeout`; panics on anything else.
    pub async fn next_push(&mut self, timeout: Duration) -> ServiceView {
        if let Some(v) = self.pushes.pop_front() {
            return v;
        }
        match self.next_event(timeout).await {
            Event::Frame(ServerFrame::Push(view)) => view,
            other => panic!("expected a Push, got {other:?}"),
        }
    }

    /// Takes the pushes received so far (while waiting for responses).
    pub fn take_pushes(&mut self) -> Vec<ServiceView> {
        self.pushes.drain(..).collect()
    }

    /// Waits for the node to refuse: an error frame, or the stream or connection
    /// closing. After an error frame, also checks that the stream then ends.
    pub async fn refusal(&mut self) -> Refusal {
        match self.next_event(ANSWER_TIMEOUT).await {
            Event::Frame(ServerFrame::Error(e)) => {
                match self.next_event(ANSWER_TIMEOUT).await {
                    Event::End | Event::Failed(_) => {}
                    other => panic!("after Error({e}) the stream must close, got {other:?}"),
                }
                Refusal::Error(e)
            }
            Event::End => Refusal::Closed("stream finished".into()),
            Event::Failed(why) => Refusal::Closed(why),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// Closes the connection without Goodbye: the node sees the connection end and
    /// starts the session's grace period.
    pub async fn close_abruptly(self) {
        self.conn.close(0u32.into(), b"test drops the connection");
        self.reader.abort();
        // Let the close packet leave before the socket goes.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }

    /// Says Goodbye, expects `Done`, and waits for the node to end the stream.
    pub async fn goodbye(mut self) {
        assert_eq!(self.ok(Request::Goodbye).await, Response::Done);
        loop {
            match self.next_event(ANSWER_TIMEOUT).await {
                Event::Frame(ServerFrame::Push(_)) => continue,
                Event::End | Event::Failed(_) => break,
                other => panic!("after Goodbye expected the stream to end, got {other:?}"),
            }
        }
        self.endpoint.close(0u32.into(), b"bye");
    }

    /// Drops the client without closing anything; use with a cut [`UdpRelay`] to make
    /// the client vanish silently.
    pub fn abandon(self) {
        self.reader.abort();
        // The endpoint's drop would send CONNECTION_CLOSE; through a cut relay it is
        // lost, which is the point.
        drop(self);
    }
}

/// Reads the session stream. Each answer's id is recorded with the number of the read
/// of the stream that brought it ([`RawClient::read_of`]): frames the node wrote
/// together, in one packet, arrive in one read; frames written apart, a moment apart,
/// in different ones.
async fn read_loop(
    recv: quinn::RecvStream,
    tx: mpsc::UnboundedSender<Event>,
    reads: Arc<std::sync::Mutex<HashMap<u64, u64>>>,
) {
    let mut frames = shoal_proto::FrameReader::new(recv, CLIENT_MAX_FRAME_BYTES);
    let mut read = 0u64;
    loop {
        let next = match frames.try_next::<ServerFrame>() {
            Some(frame) => frame.map(Some),
            None => {
                read += 1;
                frames.next::<ServerFrame>().await
            }
        };
        let event = match next {
            Ok(Some(frame)) => {
                if let ServerFrame::Response { id, .. } = &frame {
                    reads.lock().expect("reads").insert(*id, read);
                }
                Event::Frame(frame)
            }
            Ok(None) => Event::End,
            Err(e) => Event::Failed(e.to_string()),
        };
        let last = !matches!(event, Event::Frame(_));
        if tx.send(event).is_err() || last {
            return;
        }
    }
}

fn client_config(ca_file: &Path, opts: &ClientOptions) -> quinn::ClientConfig {
    let pem =
        std::fs::read(ca_file).unwrap_or_else(|e| panic!("reading CA {}: {e}", ca_file.display()));
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.unwrap_or_else(|e| panic!("parsing CA {}: {e}", ca_file.display()));
        roots.add(cert).expect("adding the node's CA as a root");
    }
    assert!(!roots.is_empty(), "no certificate in {}", ca_file.display());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![shoal_proto::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .expect("TLS 1.3 with ring has an initial cipher suite");
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(opts.keep_alive);
    transport.max_idle_timeout(Some(
        opts.idle_timeout
            .try_into()
            .expect("idle timeout fits QUIC's range"),
    ));
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport));
    config
}

/// Asserts that a request failed with `code`; returns the message.
#[track_caller]
pub fn assert_err(result: &Result<Response, ErrorBody>, code: ErrorCode) -> String {
    match result {
        Err(e) if e.code == code => e.message.clone(),
        other => panic!("expected Err({code:?}), got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Fault injection
// ---------------------------------------------------------------------------------------

/// A UDP relay between clients and a node that can go silent. Clients connect to
/// [`UdpRelay::addr`]; while [`UdpRelay::cut`] is in effect every datagram is dropped
/// in both directions, so neither side hears a close: the node only learns of the loss
/// through its idle timeout, exactly as with a crashed client host.
pub struct UdpRelay {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl UdpRelay {
    /// Starts a relay in front of `target` (one client at a time).
    pub async fn start(target: SocketAddr) -> UdpRelay {
        let front = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("binding the relay's front socket");
        let back = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("binding the relay's back socket");
        back.connect(target)
            .await
            .expect("connecting the relay to its target");
        let addr = front.local_addr().expect("bound socket has an address");
        let cut = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(relay_loop(front, back, Arc::clone(&cut)));
        UdpRelay { addr, cut, task }
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every datagram from now on, both ways.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    /// Forwards datagrams again.
    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay_loop(
    front: tokio::net::UdpSocket,
    back: tokio::net::UdpSocket,
    cut: Arc<AtomicBool>,
) {
    let mut client: Option<SocketAddr> = None;
    let mut up = vec![0u8; 65536];
    let mut down = vec![0u8; 65536];
    loop {
        tokio::select! {
            r = front.recv_from(&mut up) => {
                let Ok((n, from)) = r else { continue };
                if cut.load(Ordering::SeqCst) { continue; }
                client = Some(from);
                let _ = back.send(&up[..n]).await;
            }
            r = back.recv(&mut down) => {
                // ICMP "port unreachable" surfaces as an error on a connected socket.
                let Ok(n) = r else { continue };
                if cut.load(Ordering::SeqCst) { continue; }
                if let Some(to) = client {
                    let _ = front.send_to(&down[..n], to).await;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Restarts and clusters
// ---------------------------------------------------------------------------------------

/// The bound the cluster tests assert for convergence: after a fault heals (or a node
/// starts or restarts), every live node sees every other live node up and ready and
/// every node's `/v1/dump` is identical within this long. Anti-entropy runs every 5 s
/// and a batch leaves within milliseconds, so this is generous even on a loaded machine.
pub const CONVERGENCE_TIMEOUT: Duration = Duration::from_secs(30);

impl Node {
    /// The options it was last started with (with its node id filled in after a
    /// restart).
    pub fn options(&self) -> &NodeOptions {
        &self.opts
    }

    /// Its data directory; a restart keeps it.
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// Whether the process was stopped ([`Node::kill9`], [`Node::terminate`]) and not
    /// restarted.
    pub fn is_stopped(&self) -> bool {
        self.exited.is_some()
    }

    /// Starts a stopped node again: same node id, same data directory, same QUIC and
    /// HTTP ports (so its peers find it where they knew it), seeded with `seeds`. Waits
    /// for its ready line like [`Node::start`]. Panics if the node is still running.
    pub async fn restart(&mut self, seeds: Vec<String>) {
        let (quic, http) = (self.quic, self.http);
        self.restart_at(seeds, Some(quic), Some(http)).await
    }

    /// Like [`Node::restart`], but on new free ports: its peers must learn its new
    /// address from it.
    pub async fn restart_on_new_ports(&mut self, seeds: Vec<String>) {
        self.restart_at(seeds, None, None).await
    }

    /// Like [`Node::restart`], on these QUIC and HTTP addresses (`None`: a free port).
    pub async fn restart_at(
        &mut self,
        seeds: Vec<String>,
        quic: Option<SocketAddr>,
        http: Option<SocketAddr>,
    ) {
        assert!(
            self.exited.is_some(),
            "node {} is running; kill9 or terminate it before restarting it",
            self.id
        );
        let mut opts = self.opts.clone();
        opts.node_id = Some(self.id.clone());
        opts.seeds = seeds;
        opts.listen_addr = quic;
        opts.http_addr = http;
        {
            use std::io::Write;
            if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(&self.log) {
                let _ = writeln!(f, "----- test harness: restarting node {} -----", self.id);
            }
        }
        let (child, ready) = spawn_server(&self.root, &self.log, &opts).await;
        assert_eq!(ready.id, self.id, "a restarted node keeps its id");
        self.child = child;
        self.exited = None;
        self.quic = ready.quic;
        self.http = ready.http;
        self.ca = ready.ca;
        self.opts = opts;
    }

    /// `GET /readyz` answered 200.
    pub async fn is_ready(&self) -> bool {
        matches!(http_get(self.http, "/readyz").await, Ok(r) if r.status == 200)
    }

    /// `GET /v1/members`: the cluster as this node sees it (itself included).
    pub async fn members(&self) -> Vec<Value> {
        let r = self.get("/v1/members").await;
        assert_eq!(r.status, 200, "GET /v1/members: {}", r.body);
        r.json().as_array().cloned().unwrap_or_default()
    }

    /// `GET /v1/ring`, with the owner of `service` when given.
    pub async fn ring(&self, service: Option<&ServiceKey>) -> Value {
        let path = ring_path(service);
        let r = self.get(&path).await;
        assert_eq!(r.status, 200, "GET {path}: {}", r.body);
        r.json()
    }

    /// The members of this node's ring with their shares, sorted by id.
    pub async fn ring_shares(&self) -> Vec<(String, f64)> {
        shares_of(&self.ring(None).await)
    }

    /// The owner of `service` on this node's ring (`None` when the ring is empty).
    pub async fn owner_of(&self, service: &ServiceKey) -> Option<String> {
        self.ring(Some(service)).await["owner"]
            .as_str()
            .map(str::to_string)
    }

    /// SDK settings that reach only this node (so the client is homed here and stays
    /// here while the node lives).
    pub fn client_config(&self) -> shoal_client::ClientConfig {
        shoal_client::ClientConfig::new([self.quic.to_string()], self.ca.clone())
    }

    /// An SDK client homed on this node.
    pub async fn client(&self) -> shoal_client::Client {
        shoal_client::Client::connect(self.client_config())
            .await
            .unwrap_or_else(|e| panic!("SDK client to node {}: {e}", self.id))
    }
}

/// The `/v1/ring` path, with the owner of `service` when given.
pub fn ring_path(service: Option<&ServiceKey>) -> String {
    match service {
        None => "/v1/ring".to_string(),
        Some(s) => {
            let path = instances_path(s);
            let query = path.split_once('?').map(|(_, q)| q).unwrap_or_default();
            format!("/v1/ring?{query}")
        }
    }
}

/// The `(member, share)` pairs of a `/v1/ring` document, sorted by member id.
pub fn shares_of(ring: &Value) -> Vec<(String, f64)> {
    let mut shares: Vec<(String, f64)> = ring["shares"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|pair| Some((pair[0].as_str()?.to_string(), pair[1].as_f64()?)))
        .collect();
    shares.sort_by(|a, b| a.0.cmp(&b.0));
    shares
}

/// The entry for node `id` in a `/v1/members` document: `(state, ready, addr)`.
pub fn member_entry(members: &[Value], id: &str) -> Option<(String, bool, String)> {
    members.iter().find(|m| m["id"] == id).map(|m| {
        (
            m["state"].as_str().unwrap_or_default().to_string(),
            m["ready"].as_bool().unwrap_or(false),
            m["addr"].as_str().unwrap_or_default().to_string(),
        )
    })
}

/// A local address with a port that was free a moment ago (for a node whose HTTP
/// address the test must know before the node prints it).
pub fn free_tcp_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding an ephemeral TCP port")
}

/// A seeded RNG for a test's random choices. The seed is printed (shown when the test
/// fails); `SHOAL_TEST_SEED=<seed>` replays it.
pub fn test_rng(test: &str) -> rand::rngs::StdRng {
    use rand::SeedableRng;
    let seed = std::env::var("SHOAL_TEST_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
    println!("{test}: seed {seed} (replay with SHOAL_TEST_SEED={seed})");
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// A cluster of real nodes on loopback that share one development CA.
///
/// Node `i` has the id `n{i}` and is seeded with the QUIC addresses of the nodes started
/// before it, the way an operator would start them one by one. Nodes keep their index
/// when they are killed (see [`Cluster::live`]). Dropping the cluster kills every node.
pub struct Cluster {
    nodes: Vec<Node>,
    ca_dir: PathBuf,
    base: NodeOptions,
}

impl Cluster {
    /// Starts `n` nodes with default settings, one after another (each waits for its
    /// ready line, so each has loaded the registry from the ones before).
    pub async fn start(n: usize) -> Cluster {
        Self::start_with(n, NodeOptions::default()).await
    }

    /// Starts `n` nodes with `base` as every node's options (timings, namespaces);
    /// the id, the CA directory and the seeds are the cluster's.
    pub async fn start_with(n: usize, base: NodeOptions) -> Cluster {
        let mut cluster = Cluster {
            nodes: Vec::new(),
            ca_dir: unique_temp_dir("shoal-test-ca"),
            base,
        };
        for _ in 0..n {
            cluster.add_node().await;
        }
        cluster
    }

    /// The development CA directory every node of this cluster shares.
    pub fn ca_dir(&self) -> &Path {
        &self.ca_dir
    }

    /// The CA certificate clients must trust.
    pub fn ca_file(&self) -> PathBuf {
        self.ca_dir.join("ca.pem")
    }

    /// The options a new node `id` of this cluster gets: the base options, the
    /// cluster's CA, and the addresses of every live node as seeds.
    pub fn options_for(&self, id: &str) -> NodeOptions {
        let mut opts = self.base.clone().node_id(id).dev_ca_dir(&self.ca_dir);
        opts.seeds = self.servers();
        opts
    }

    /// Starts one more node (id `n{index}`, seeded with every live node); returns its
    /// index once it is ready.
    pub async fn add_node(&mut self) -> usize {
        let opts = self.options_for(&format!("n{}", self.nodes.len()));
        self.add_node_with(opts).await
    }

    /// Starts one more node with exactly these options; returns its index.
    pub async fn add_node_with(&mut self, opts: NodeOptions) -> usize {
        self.nodes.push(Node::start(opts).await);
        self.nodes.len() - 1
    }

    /// How many nodes were started (killed ones included).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True before any node was started.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// Node `i`, to kill or restart it.
    pub fn node_mut(&mut self, i: usize) -> &mut Node {
        &mut self.nodes[i]
    }

    /// Every node started, killed ones included.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The indices of the nodes that run.
    pub fn live(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| !self.nodes[i].is_stopped())
            .collect()
    }

    /// SIGKILL node `i` (a crash).
    pub fn kill9(&mut self, i: usize) -> ExitStatus {
        self.nodes[i].kill9()
    }

    /// Restarts the stopped node `i` with its id, data directory and ports, seeded
    /// with every other live node.
    pub async fn restart(&mut self, i: usize) {
        let seeds = self.servers();
        self.nodes[i].restart(seeds).await;
    }

    /// Like [`Cluster::restart`] but on new ports.
    pub async fn restart_on_new_ports(&mut self, i: usize) {
        let seeds = self.servers();
        self.nodes[i].restart_on_new_ports(seeds).await;
    }

    /// Like [`Cluster::restart`] on these addresses (`None`: a free port).
    pub async fn restart_at(
        &mut self,
        i: usize,
        quic: Option<SocketAddr>,
        http: Option<SocketAddr>,
    ) {
        let seeds = self.servers();
        self.nodes[i].restart_at(seeds, quic, http).await;
    }

    /// The QUIC addresses of the live nodes.
    pub fn servers(&self) -> Vec<String> {
        self.live()
            .into_iter()
            .map(|i| self.nodes[i].quic_addr().to_string())
            .collect()
    }

    /// SDK settings listing every live node.
    pub fn client_config(&self) -> shoal_client::ClientConfig {
        shoal_client::ClientConfig::new(self.servers(), self.ca_file())
    }

    /// The index of the node at QUIC address `addr` (as [`shoal_client::Client::home`]
    /// says it).
    pub fn index_of_addr(&self, addr: &str) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| n.quic_addr().to_string() == addr)
    }

    /// The index of node `id`.
    pub fn index_of_id(&self, id: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.id() == id)
    }

    /// The first of `make(0)`, `make(1)`... whose owner (on the first live node's ring)
    /// satisfies `wanted`. Panics after 10,000 tries.
    pub async fn find_service(
        &self,
        make: impl Fn(usize) -> ServiceKey,
        wanted: impl Fn(&str) -> bool,
    ) -> ServiceKey {
        let asked = &self.nodes[*self.live().first().expect("a live node")];
        for i in 0..10_000 {
            let key = make(i);
            if asked.owner_of(&key).await.is_some_and(|o| wanted(&o)) {
                return key;
            }
        }
        panic!("no service among 10,000 tries has a wanted owner");
    }

    /// A service `{prefix}-{k}` in `public` that node `owner` owns.
    pub async fn service_owned_by(&self, owner: usize, prefix: &str) -> ServiceKey {
        let id = self.nodes[owner].id().to_string();
        self.find_service(|k| svc(&format!("{prefix}-{k}")), |o| o == id)
            .await
    }

    /// Each live node's `/v1/dump`, by index.
    pub async fn dumps(&self) -> Vec<(usize, Value)> {
        let mut out = Vec::new();
        for i in self.live() {
            out.push((i, self.nodes[i].dump().await));
        }
        out
    }

    /// One look: `Ok` when every live node sees every live node up and ready and every
    /// live node's `/v1/dump` is identical; else what differs.
    pub async fn check_converged(&self) -> Result<(), String> {
        let live = self.live();
        for &i in &live {
            let r = http_get(self.nodes[i].http_addr(), "/v1/members")
                .await
                .map_err(|e| format!("{}: GET /v1/members: {e}", self.nodes[i].id()))?;
            let members: Vec<Value> = serde_json::from_str::<Value>(&r.body)
                .ok()
                .and_then(|v| v.as_array().cloned())
                .ok_or_else(|| format!("{}: /v1/members: {}", self.nodes[i].id(), r.body))?;
            for &j in &live {
                let id = self.nodes[j].id();
                match member_entry(&members, id) {
                    Some((state, true, _)) if state == "up" => {}
                    other => {
                        return Err(format!(
                            "{} sees {id} as {other:?}, not up and ready",
                            self.nodes[i].id()
                        ))
                    }
                }
            }
        }
        let mut first: Option<(usize, Value)> = None;
        for &i in &live {
            let r = http_get(self.nodes[i].http_addr(), "/v1/dump")
                .await
                .map_err(|e| format!("{}: GET /v1/dump: {e}", self.nodes[i].id()))?;
            let dump: Value = serde_json::from_str(&r.body)
                .map_err(|e| format!("{}: /v1/dump is not JSON: {e}", self.nodes[i].id()))?;
            match &first {
                None => first = Some((i, dump)),
                Some((f, reference)) => {
                    if *reference != dump {
                        return Err(format!(
                            "dumps of {} and {} differ: {}",
                            self.nodes[*f].id(),
                            self.nodes[i].id(),
                            dump_difference(reference, &dump)
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Waits (up to [`CONVERGENCE_TIMEOUT`]) until [`Cluster::check_converged`] holds;
    /// returns how long it took, or panics with what still differed.
    pub async fn wait_until_converged(&self) -> Duration {
        self.wait_until_converged_within(CONVERGENCE_TIMEOUT).await
    }

    /// Like [`Cluster::wait_until_converged`] with another bound; returns how long it
    /// took.
    pub async fn wait_until_converged_within(&self, timeout: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let why = match self.check_converged().await {
                Ok(()) => return started.elapsed(),
                Err(why) => why,
            };
            if started.elapsed() > timeout {
                panic!("the cluster did not converge within {timeout:?}: {why}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every live node lists node `i` as down and its ring no longer holds
    /// it.
    pub async fn wait_until_seen_down(&self, i: usize, timeout: Duration) {
        let id = self.nodes[i].id().to_string();
        for j in self.live() {
            let node = &self.nodes[j];
            wait_for(
                &format!("{} to see {id} down and out of its ring", node.id()),
                timeout,
                || async {
                    let down = matches!(
                        member_entry(&node.members().await, &id),
                        Some((state, _, _)) if state == "down"
                    );
                    down && !node.ring_shares().await.iter().any(|(m, _)| *m == id)
                },
            )
            .await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Nodes first (they print their logs when the test panics).
        self.nodes.clear();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.ca_dir);
        }
    }
}

/// A short description of how two `/v1/dump` documents differ: services only in one,
/// and services whose content differs (a few of each).
pub fn dump_difference(a: &Value, b: &Value) -> String {
    fn by_key(d: &Value) -> std::collections::BTreeMap<String, Value> {
        d.as_array()
            .into_iter()
            .flatten()
            .map(|s| (s["key"].to_string(), s.clone()))
            .collect()
    }
    let (a, b) = (by_key(a), by_key(b));
    let only_a: Vec<&String> = a.keys().filter(|k| !b.contains_key(*k)).take(5).collect();
    let only_b: Vec<&String> = b.keys().filter(|k| !a.contains_key(*k)).take(5).collect();
    let differ: Vec<String> = a
        .iter()
        .filter(|(k, v)| b.get(*k).is_some_and(|w| w != *v))
        .take(3)
        .map(|(k, v)| format!("{k}: {v} vs {}", b[k]))
        .collect();
    format!(
        "{} vs {} services; only in the first: {only_a:?}; only in the second: {only_b:?}; different: {differ:?}",
        a.len(),
        b.len()
    )
}

/// Whether `/v1/dump` document `dump` holds instance `ip:port` of `service`.
pub fn dump_has(dump: &Value, service: &ServiceKey, ip: &str, port: u16) -> bool {
    instances_in_dump(dump, service)
        .iter()
        .any(|i| i["ip"] == ip && i["port"] == port)
}

/// Watches, every `every`, that a set of instances is present in one node's
/// `/v1/dump`, recording each poll in which one was missing: proof that no instance
/// went missing on that node during some stretch of a scenario.
pub struct DumpWatch {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<DumpWatchReport>,
}

/// What a [`DumpWatch`] saw.
#[derive(Debug, Clone, Default)]
pub struct DumpWatchReport {
    /// The node watched.
    pub node: String,
    /// Dumps read.
    pub polls: usize,
    /// Polls that got no dump (no answer or not JSON).
    pub failed_polls: usize,
    /// Each miss: when (ms since the watch started) and which instance.
    pub misses: Vec<String>,
}

impl DumpWatch {
    /// Starts watching `expected` (`service`, ip, port) on `node`.
    pub fn start(node: &Node, expected: Vec<(ServiceKey, String, u16)>, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let (http, id) = (node.http_addr(), node.id().to_string());
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut report = DumpWatchReport {
                node: id,
                ..DumpWatchReport::default()
            };
            while !flag.load(Ordering::SeqCst) {
                let dump = http_get(http, "/v1/dump")
                    .await
                    .ok()
                    .filter(|r| r.status == 200)
                    .and_then(|r| serde_json::from_str::<Value>(&r.body).ok());
                match dump {
                    None => report.failed_polls += 1,
                    Some(dump) => {
                        report.polls += 1;
                        for (service, ip, port) in &expected {
                            if !dump_has(&dump, service, ip, *port) {
                                report.misses.push(format!(
                                    "+{} ms: {} {ip}:{port} missing",
                                    started.elapsed().as_millis(),
                                    service.service
                                ));
                            }
                        }
                    }
                }
                tokio::time::sleep(every).await;
            }
            report
        });
        DumpWatch { stop, task }
    }

    /// Stops watching and says what was seen.
    pub async fn stop(self) -> DumpWatchReport {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("the dump watch does not panic")
    }
}

// ---------------------------------------------------------------------------------------
// Small builders
// ---------------------------------------------------------------------------------------

/// A service key in `public` / `DEFAULT_GROUP`.
pub fn svc(name: &str) -> ServiceKey {
    ServiceKey::named(name)
}

/// An instance spec at `ip:port` with defaults.
pub fn inst(ip: &str, port: u16) -> InstanceSpec {
    InstanceSpec::new(ip, port)
}

/// The `(ip, port)` pairs of a view, sorted.
pub fn addrs(view: &ServiceView) -> Vec<(String, u16)> {
    let mut v: Vec<(String, u16)> = view
        .instances
        .iter()
        .map(|i| (i.ip.clone(), i.port))
        .collect();
    v.sort();
    v
}

/// `(ip, port)` as owned values, for comparing with [`addrs`].
pub fn addr(ip: &str, port: u16) -> (String, u16) {
    (ip.to_string(), port)
}

/// Waits, at most `patience`, until `node` lists exactly `expected` as the
/// `(ip, port)`s of `service` (in any order).
pub async fn wait_for_listing(
    node: &Node,
    patience: Duration,
    service: &ServiceKey,
    expected: &[(String, u16)],
) {
    let mut expected = expected.to_vec();
    expected.sort();
    wait_for(
        &format!("{} to list {expected:?} in {}", node.id(), service.service),
        patience,
        || async {
            let mut got: Vec<(String, u16)> = node
                .instances(service)
                .await
                .iter()
                .map(|i| {
                    (
                        i["ip"].as_str().unwrap_or_default().to_string(),
                        i["port"].as_u64().unwrap_or_default() as u16,
                    )
                })
                .collect();
            got.sort();
            got == expected
        },
    )
    .await;
}

/// The value of an unlabelled counter, gauge or histogram series (`name` with its
/// suffix, e.g. `_count`) in Prometheus text; 0 when absent.
pub fn counter(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_ready_line() {
        let r = parse_ready_line(
            "shoal node node-1a2b ready: quic=127.0.0.1:40000 http=127.0.0.1:40001 ca=/tmp/x y/ca.pem",
        )
        .unwrap();
        assert_eq!(r.id, "node-1a2b");
        assert_eq!(r.quic, "127.0.0.1:40000".parse().unwrap());
        assert_eq!(r.http, "127.0.0.1:40001".parse().unwrap());
        assert_eq!(r.ca, PathBuf::from("/tmp/x y/ca.pem"));
        assert!(parse_ready_line("shoal node x starting").is_none());
    }

    #[test]
    fn parses_http_responses() {
        let r =
            parse_http_response(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\nextra").unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
        let r = parse_http_response(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_str()), (404, "abcde"));
    }
}
pub mod chaos;
