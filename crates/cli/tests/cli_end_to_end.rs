//! The `shoal` binary end to end: a real node on ephemeral ports, and the client
//! commands as a user runs them.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");

/// A `shoal server` on ephemeral ports, killed when dropped.
struct Node {
    child: Child,
    quic: String,
    ca: PathBuf,
    dir: PathBuf,
}

impl Node {
    fn start(name: &str) -> Node {
        let dir = std::env::temp_dir().join(format!(
            "shoal-cli-e2e-{name}-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut child = Command::new(SHOAL)
            .args([
                "server",
                "--listen-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start shoal server");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the ready line");
        // "shoal node ID ready: quic=ADDR http=ADDR ca=PATH"
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {line:?}"))
                .to_string()
        };
        let quic = field("quic=");
        let ca = PathBuf::from(field("ca="));
        Node {
            child,
            quic,
            ca,
            dir,
        }
    }

    /// `shoal ARGS --server QUIC --ca CA`, to completion.
    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run shoal")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(SHOAL);
        cmd.args(args)
            .env_remove("SHOAL_SERVERS")
            .env_remove("SHOAL_CA")
            .env_remove("RUST_LOG")
            .args(["--server", &self.quic])
            .arg("--ca")
            .arg(&self.ca)
            .stdin(Stdio::null());
        cmd
    }

    /// Starts a long-running command (register, watch) with piped stdout.
    fn spawn(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn shoal")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Sends SIGINT (Ctrl-C) to a child and waits for it.
fn interrupt(child: &mut Child) -> std::process::ExitStatus {
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the command did not stop on Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads the first line a long-running command prints.
fn first_line(child: &mut Child) -> (String, BufReader<std::process::ChildStdout>) {
    let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("read a line");
    (line, out)
}

/// Polls `shoal list --json` until `check` holds (replication and pushes are async).
fn eventually_list(node: &Node, service: &str, check: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = node.run(&["list", service, "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let view: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("list --json");
        if check(&view) {
            return;
        }
        assert!(Instant::now() < deadline, "never held; last view {view}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn instance_count(view: &serde_json::Value) -> usize {
    view["instances"].as_array().map(Vec::len).unwrap_or(0)
}

#[test]
fn register_holds_until_ctrl_c_and_list_services_deregister_show_it() {
    let node = Node::start("register");
    let mut reg = node.spawn(&[
        "register",
        "orders",
        "10.0.0.1:8080",
        "--meta",
        "version=1",
        "--weight",
        "3",
    ]);
    let (line, _out) = first_line(&mut reg);
    assert!(
        line.starts_with("registered public/DEFAULT_GROUP/orders DEFAULT/10.0.0.1:8080"),
        "{line}"
    );
    assert!(line.contains("session "), "{line}");

    let o = node.run(&["list", "orders"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    let mut lines = text.lines();
    assert_eq!(
        lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
        ["CLUSTER", "IP", "PORT", "WEIGHT", "HEALTHY", "ENABLED", "METADATA"]
    );
    assert_eq!(
        lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
        [
            "DEFAULT",
            "10.0.0.1",
            "8080",
            "3",
            "true",
            "true",
            "version=1"
        ]
    );
    assert!(lines.next().unwrap().contains("1 instance"), "{text}");

    let o = node.run(&["services", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(list[0]["key"]["service"], "orders");
    assert_eq!(list[0]["instances"], 1);

    // Ctrl-C says Goodbye: the instance is gone at once, not after a grace period.
    assert!(interrupt(&mut reg).success());
    let o = node.run(&["list", "orders", "--json"]);
    let view: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(instance_count(&view), 0, "{view}");
}

#[test]
fn deregister_removes_and_a_second_time_is_not_found() {
    let node = Node::start("deregister");
    let mut reg = node.spawn(&["register", "orders", "[::1]:9090", "--cluster", "east"]);
    let (line, _out) = first_line(&mut reg);
    assert!(line.contains("east/[::1]:9090"), "{line}");

    let o = node.run(&["deregister", "orders", "[::1]:9090", "--cluster", "east"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("deregistered public/DEFAULT_GROUP/orders east/[::1]:9090"));
    eventually_list(&node, "orders", |v| instance_count(v) == 0);

    let o = node.run(&["deregister", "orders", "[::1]:9090", "--cluster", "east"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).starts_with("error: NotFound: "),
        "{}",
        stderr(&o)
    );
    let _ = interrupt(&mut reg);
}

#[test]
fn errors_are_one_line_with_the_right_exit_code() {
    let node = Node::start("errors");
    // Validation by the node: its typed code is in the message.
    let o = node.run(&["register", "orders", "10.0.0.1:0"]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        stderr(&o),
        "error: InvalidPort: invalid port 0: must be 1..=65535\n"
    );

    // Validation before asking: a malformed address.
    let o = node.run(&["register", "orders", "10.0.0.1"]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).starts_with("error: invalid address \"10.0.0.1\""),
        "{}",
        stderr(&o)
    );

    // Clap's own usage errors are one line too.
    let o = node.run(&["list"]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));

    // A CA that does not exist.
    let o = Command::new(SHOAL)
        .args([
            "list",
            "orders",
            "--server",
            &node.quic,
            "--ca",
            "/nonexistent/ca.pem",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("cannot open CA file"), "{}", stderr(&o));
}

#[test]
fn no_node_listening_is_exit_code_1() {
    let node = Node::start("unreachable");
    // A UDP port with nothing behind it: the node's HTTP port is TCP.
    let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap().to_string();
    drop(closed);
    let o = Command::new(SHOAL)
        .args(["list", "orders", "--server", &addr])
        .arg("--ca")
        .arg(&node.ca)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: cannot connect to any node: "),
        "{err}"
    );
}

#[test]
fn watch_prints_the_list_then_each_change() {
    let node = Node::start("watch");
    let mut watch = node.spawn(&["watch", "payments", "--json"]);
    let (line, mut out) = first_line(&mut watch);
    let first: serde_json::Value = serde_json::from_str(&line).expect("one JSON object per line");
    assert_eq!(instance_count(&first["view"]), 0);
    assert!(first["time"].as_str().unwrap().ends_with('Z'));

    let mut reg = node.spawn(&["register", "payments", "10.0.0.9:9000"]);
    let _ = first_line(&mut reg);
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let change: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(instance_count(&change["view"]), 1, "{change}");
    assert_eq!(change["view"]["instances"][0]["ip"], "10.0.0.9");

    assert!(interrupt(&mut reg).success());
    line.clear();
    out.read_line(&mut line).unwrap();
    let gone: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(instance_count(&gone["view"]), 0, "{gone}");
    assert!(interrupt(&mut watch).success());
}
